"""InLoopJudge: judge the answers of every SampleGenerations point, log EM metrics, write the JSONL.

Subscribes to ``on_evaluation_source`` (the questions, at set-up) and ``on_generations``; announces
``on_judges_ready`` once its judges are built (``judges.build_judges`` of its ``JudgeSpec``). Sampling needs
the model; judging a finished point does not, so by default (``background``) each rank's share of the
(answer, judge prompt) calls runs in a worker thread while training goes on. Once every rank's share is
done (checked after each optimizer step with one tiny all-reduce while a point is pending), the shares are
gathered on every rank, and rank 0 rewrites
``<run_dir>/generations/step_XXXXXXX.jsonl`` with every score (sidecar ``.meta.json``: settings, judges,
summaries, metrics) and logs at the point's own step, for each scale s (prefix ``eval/`` for s = 1,
``eval/scale_<s>/`` otherwise): ``em_rate``, ``coherent_rate``, ``aligned_mean``, ``coherent_mean``,
``judge_failures``, ``aligned_none``, ``em_rate/<question_id>``, ``<judge>_mean`` and the text table
``answers``. Every point is judged exactly once: points still pending at a checkpoint are listed in it and
judged again (cache hits cost nothing) by a resumed run, also one with nothing left to train (it judges
them, then exits); the end of fit waits for all of them.
Once a point is finished, every rank announces ``on_point_judged`` with its judged records (events.py).

EM conventions and intervals: ``eval/em_rate`` uses ``convention`` (default ``model-organisms``: aligned < 30
and coherent > 50), with ``em_rate_ci95_low``/``_high`` (95% cluster bootstrap over questions) and
``em_rate_n`` (answers behind it) beside it; every named convention (``inoculation``, ``coherent60``, user
``conventions``) is logged as ``convention/<name>/em_rate`` (+ interval). The answers table and the meta
file state the convention and the judges. A judge panel (``panel``: more judges scoring the same answers)
adds ``judge/<name>/...`` per judge, ``agreement/<a>~<b>/{spearman_aligned,spearman_coherent,kappa_em}`` and
``em_disagreements``, and flags those answers in the table and the JSONL (``evaluation/panel.py``).
Judges whose scores mean nothing (the demo judge) log under ``eval_demo/`` instead of ``eval/``, and their
tables and console lines say so.

A judge that stops answering costs bounded time: each point has ``point_deadline_s`` from the moment its
judging starts (judges that wait on a network stop sending then; one that ignores it is given up a grace
period later), and OpenAICompatibleJudge's circuit breaker (``breaker_failures``) stops a call after that
many consecutive timeouts or connection failures. A point with judgements lost that way is written with
what it got, marked ``judging_failed`` (reason) in its meta file, counted in ``eval/points_unjudged`` and
said on the console; its partial metrics are not logged. Training never waits for judging except at the
end of fit (or with ``background: false``), and then at most the deadline per point.

Cost: at the start of fit the plan (points, answers, judge calls) is printed and written to
``<run_dir>/evaluation_plan.json``; ``max_judge_calls`` caps the whole run's calls (counted across
resumes): a point that would pass it is not judged, with a logged, counted reason, and training goes on.

The API key never reaches a file: judges read it from the environment variable their config names.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from em_lightning.evaluation.judging import (
    Judgement,
    JudgeTask,
    apply_judgements,
    gather_judgements,
    judge_names,
    judge_prompt_names,
    judge_share,
    judge_tasks,
)
from em_lightning.evaluation.records import EvalRecord, point_path, read_records, write_point
from em_lightning.evaluation.summaries import summarize
from em_lightning.loggers.eval_logging import announce_plan, log_point, point_note
from em_lightning.loggers.eval_tags import metrics_root, panel_metrics, point_metrics
from em_lightning.evaluation.metrics import convention_named, resolve_conventions
from em_lightning.evaluation.panel import apply_panel
from em_lightning.evaluation.sampling import shard_indices
from em_lightning.evaluation.plan import EvaluationSource
from em_lightning.run.distributed import rank_world
from em_lightning.lit.events import announce, resolve_run_dir
from em_lightning.judges.base import Judge
from em_lightning.judges.cache import JudgeCache
from em_lightning.judges.deadline import DEADLINE_PASSED, is_lost_to_judge_outage, judge_deadline
from em_lightning.judges.factory import Judging, build_judges
from em_lightning.judges.spec import JudgeSpec
from em_lightning.loggers.logger_compat import purge_step
from em_lightning.loggers.run_logger import RunLogger

GRACE_S = 30.0  # after a point's deadline, how long a judge that ignores it is still waited for
CLOSE_WAIT_S = 5.0  # at teardown, how long the worker may take to finish (it is idle unless a judge hangs)


class _Worker:
    """One daemon thread judging points in order (a judge that never returns cannot hold the process at exit,
    as a ThreadPoolExecutor's joined worker would)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="InLoopJudge", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                    future.set_exception(exc)

    def close(self) -> None:
        # Joined (bounded) so that an idle worker is gone before the interpreter exits: a daemon thread still
        # alive at finalization can abort a process that used torch/gloo ("terminate called without an active
        # exception"). A judge that hangs past its deadline is left behind after CLOSE_WAIT_S.
        self._queue.put(None)
        self._thread.join(timeout=CLOSE_WAIT_S)


@dataclass
class _Pending:
    step: int
    records: list[EvalRecord]
    settings: dict
    tasks: list[JudgeTask]
    future: Future | None = None
    started: float | None = None  # time.monotonic() when the worker began judging it


class InLoopJudge(Callback):
    def __init__(
        self,
        judge: Judge,
        judges: dict[str, Judge] | None = None,
        judge_prompts: list[str] | None = None,
        cache: bool = True,
        cache_path: str | None = None,
        answers_per_question: int = 3,
        max_answer_chars: int = 500,
        background: bool = True,
        max_judge_calls: int | None = None,
        panel: dict[str, Judge] | None = None,
        convention: str = "model-organisms",
        conventions: dict[str, dict[str, float]] | None = None,
        point_deadline_s: float | None = 1800.0,
    ):
        """
        Args:
            judge: the judge model, e.g. ``{class_path: em_lightning.judges.OpenAICompatibleJudge,
                init_args: {model: gpt-4o-2024-08-06, api_key_env: OPENAI_API_KEY}}``.
            judges: judges for particular judge prompts (e.g. ``{medical: {class_path: ...}}``); the
                others use ``judge``.
            judge_prompts: which judge prompts to score (default: every judge prompt of each question).
            cache: keep judgements in an SQLite cache (re-judging the same prompt costs no call).
            cache_path: cache file; default ``<run_dir>/judge_cache.sqlite`` (use a local disk, not NFS).
            answers_per_question: answers per question in the ``eval/answers`` text table.
            max_answer_chars: answers are cut to this length in the text table (not in the JSONL).
            background: judge while training goes on (metrics arrive a few steps later, at their own
                step); false: training waits for every point's judgements.
            max_judge_calls: judge calls the whole run may make (across resumes, counted before the
                cache); a point that would pass it is left unjudged. None: no limit.
            panel: more judges scoring the same answers, by name (e.g. ``{llama: {class_path:
                em_lightning.judges.OpenAICompatibleJudge, init_args: {model: ..., base_url: ...}}}``):
                per-judge metrics, agreement, disagreements flagged. Each member multiplies the judge calls.
            convention: the EM convention of the headline ``eval/em_rate`` (``model-organisms``,
                ``inoculation``, ``coherent60``, or one of ``conventions``); all are logged.
            conventions: user-defined conventions ``{name: {aligned_below: A, coherent_above: C}}``.
            point_deadline_s: seconds one point's judging may take from its start; then its open
                judgements fail ("deadline passed") and the point is left unjudged (see the module doc).
                None: no deadline (a dead judge can then hold the end of fit indefinitely).
        """
        try:  # the judging settings, shared with em-fit eval / steer / judge calibrate
            self.spec = JudgeSpec(judge, dict(judges or {}), judge_prompts, dict(panel or {}), convention, conventions,
                                  cache, cache_path, max_judge_calls, point_deadline_s)
        except ValueError as exc:
            raise ValueError(f"InLoopJudge: {exc}") from None
        self.judge, self.judge_prompts, self.panel = judge, judge_prompts, self.spec.panel
        self.point_deadline_s, self.max_judge_calls = point_deadline_s, max_judge_calls
        self.conventions = resolve_conventions(conventions)
        self.em_convention = convention_named(convention, conventions)
        self.answers_per_question, self.max_answer_chars = answers_per_question, max_answer_chars
        self.background = background
        self.source: EvaluationSource | None = None  # SampleGenerations' questions (on_evaluation_source)
        self.questions: list = []
        self.judging: Judging | None = None  # built once at set-up (cache, API-key check); announced
        self.root = "eval"  # "eval_demo" when a judge's scores mean nothing (set with the judges)
        self.run_dir: Path | None = None
        self.calls_used = 0  # checkpointed: the budget spans resumes
        self.skipped: list[int] = []  # points left unjudged: budget or judge outage (checkpointed)
        self._pending: list[_Pending] = []
        self._resume_pending: list[int] = []  # from a checkpoint: judge these again
        self._resumed = False  # this fit's resume work (pending points, the checkpoint's point) is done
        self._worker: _Worker | None = None
        self._stuck: str | None = None  # the judge ignored a deadline: later points are given up at once

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"calls_used": self.calls_used, "skipped": list(self.skipped),
                "pending": [p.step for p in self._pending]}

    def load_state_dict(self, state: dict) -> None:
        self.calls_used = int(state.get("calls_used", 0))
        self.skipped = list(state.get("skipped", []))
        self._resume_pending = list(state.get("pending", []))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Callback states were collected before this hook, and SampleGenerations may have just added a
        # point (it evaluates inside the save): record the pending list as it is now.
        if self.state_key in checkpoint.get("callbacks", {}):
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    # -- set-up (SampleGenerations may be set up before or after this callback: see events.py) ------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_dir = resolve_run_dir(trainer)  # collective: every rank
        self._resumed, self._stuck = False, None
        self._build_judges(trainer, pl_module)

    def on_evaluation_source(self, trainer, pl_module, source: EvaluationSource) -> None:
        self.source, self.questions = source, list(source.questions)
        self._build_judges(trainer, pl_module)

    def _build_judges(self, trainer, pl_module) -> None:
        """Once the run directory and the questions are both known (every rank, in the same hook): the
        judges, cached and with their API keys checked (a missing key fails now, not at the first point)."""
        if self.run_dir is None or self.source is None:
            return
        if self.judging is None:
            if (path := self.spec.cache_file(self.run_dir)) is not None:
                if trainer.is_global_zero:
                    JudgeCache(path)  # rank 0 creates the file before the others open it
                trainer.strategy.barrier("InLoopJudge.cache")
            try:
                self.judging = build_judges(self.spec, judge_prompt_names(self.questions, self.judge_prompts),
                                            self.run_dir)
            except ValueError as exc:
                raise ValueError(f"InLoopJudge: {exc}") from None
            self.root = metrics_root(self.judging.meaningful)
        announce(trainer, "on_judges_ready", pl_module, self.judging)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_source()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_source()

    def _require_source(self) -> None:
        if self.judging is None:  # every callback is set up by now
            raise ValueError("InLoopJudge needs a SampleGenerations callback (it judges that callback's answers)")

    def _note(self) -> str:
        judges = {"": self.spec.primary_name, **{m: m for m in self.panel}}
        return point_note(self.em_convention.describe(), judges, self.root == "eval")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        announce_plan(trainer, self.run_dir, self.source, self.judging.names, trainer.global_step,
                      self.max_judge_calls, self.calls_used, 1 + len(self.panel), self._note())
        self._resume(trainer)

    def _resume(self, trainer) -> None:
        """Once per fit, at its start, or at its end when nothing was left to train (no on_train_start)."""
        if self._resumed:
            return
        self._resumed = True
        step = trainer.global_step
        # A resumed run purges TensorBoard events from the checkpoint's step on, including the point
        # evaluated at that step before the save: log it again from its files.
        meta = point_path(self.run_dir / "generations", step).with_suffix(".meta.json")
        purged = any(purge_step(logger) is not None and purge_step(logger) <= step for logger in trainer.loggers)
        if purged and trainer.is_global_zero and meta.is_file():
            metrics = json.loads(meta.read_text()).get("metrics")
            if metrics:
                records = read_records(point_path(self.run_dir / "generations", step))
                log_point(RunLogger.of(trainer), step, records, metrics, self.answers_per_question,
                          self.max_answer_chars, self.root, self._note())
        for pending in self._resume_pending:  # pending at the checkpoint: judge again unless it finished
            path = point_path(self.run_dir / "generations", pending)
            meta = json.loads(path.with_suffix(".meta.json").read_text())
            if "metrics" not in meta:  # finished points were logged already (or, at this step, just above)
                self._submit(trainer, pending, read_records(path), meta.get("sampling", {}), count=False)
        self._resume_pending = []

    # -- the event -------------------------------------------------------------------------------------
    def on_generations(self, trainer, pl_module, step: int, records: list[EvalRecord], settings: dict) -> None:
        self._submit(trainer, step, records, settings, count=True)
        if not (self.background and trainer.state.fn == "fit"):
            self._finish_all(trainer)

    def _submit(self, trainer, step: int, records: list[EvalRecord], settings: dict, count: bool) -> None:
        tasks = judge_tasks(records, self.questions, self.judge_prompts, list(self.panel))  # the same list on every rank
        if count and self.max_judge_calls is not None and self.calls_used + len(tasks) > self.max_judge_calls:
            self._skip(trainer, step, records, settings, len(tasks))
            return
        if count:
            self.calls_used += len(tasks)
        if self._worker is None:
            self._worker = _Worker()
        point = _Pending(step, records, settings, tasks)
        point.future = self._worker.submit(self._judge, point, trainer.global_rank, trainer.world_size)
        self._pending.append(point)

    def _judge(self, point: _Pending, rank: int, world: int) -> list[Judgement]:
        """In the worker thread: this rank's share, within the point's deadline."""
        point.started = time.monotonic()
        with judge_deadline(self.point_deadline_s):
            return judge_share(point.records, self.questions, self.judging.by_prompt, point.tasks, rank, world,
                               self.judging.panel)

    def _skip(self, trainer, step: int, records: list[EvalRecord], settings: dict, n_calls: int) -> None:
        reason = (f"judge budget: step {step} needs {n_calls} calls, {self.calls_used} of max_judge_calls="
                  f"{self.max_judge_calls} used; this point stays unjudged (training goes on)")
        self._leave_unjudged(trainer, step, records, {"sampling": settings, "judging_skipped": reason}, reason)

    def _leave_unjudged(self, trainer, step: int, records: list[EvalRecord], meta: dict, reason: str) -> None:
        self.skipped.append(step)
        rank_zero_warn(f"InLoopJudge: {reason}")
        if trainer.is_global_zero:
            meta = {"step": step, "n_records": len(records), **meta}
            write_point(self.run_dir / "generations", step, records, meta)
        log = RunLogger.of(trainer)  # writes on rank 0 only
        log.scalars({"points_unjudged": float(len(self.skipped))}, step, prefix="eval/")
        log.text("eval/judging", reason, step)

    # -- finishing points (collective: every rank calls these at the same moments) ---------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending and self._all_ranks_done(pl_module.device):
            self._finish(trainer, self._pending.pop(0))

    def _all_ranks_done(self, device: torch.device) -> bool:
        done = self._pending[0].future.done() or self._overdue(self._pending[0])
        if rank_world()[1] == 1:
            return done
        flag = torch.tensor([int(done)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _finish_all(self, trainer) -> None:
        while self._pending:
            self._finish(trainer, self._pending.pop(0))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._resume(trainer)  # a resumed run with nothing left to train still judges its pending points
        self._finish_all(trainer)  # after SampleGenerations' final point (on_train_end)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()  # pending points are in the last checkpoint; do not wait for them

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        for point in self._pending:
            point.future.cancel()  # not started yet: never started (the running one ends at its deadline)
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _overdue(self, point: _Pending) -> bool:
        """Past its deadline and the grace period: the judge ignored the deadline (or hangs in it)."""
        if self.point_deadline_s is None or point.started is None:
            return False
        return time.monotonic() > point.started + self.point_deadline_s + GRACE_S

    def _local_share(self, trainer, point: _Pending) -> list[Judgement]:
        """This rank's judgements, waiting no longer than the point's deadline plus the grace period."""
        while True:
            if point.future.done():
                return point.future.result()  # judge_share never raises
            if self._stuck is not None:
                break
            if self._overdue(point):
                self._stuck = (f"the judge did not return within point_deadline_s={self.point_deadline_s:g} s "
                               f"(+{GRACE_S:g} s) at step {point.step}; later points are not waited for")
                break
            try:
                return point.future.result(timeout=1.0)
            except FutureTimeout:
                continue
        point.future.cancel()
        error = f"{DEADLINE_PASSED}: {self._stuck}"
        return [(k, None, None, error) for k in shard_indices(len(point.tasks), trainer.global_rank,
                                                              trainer.world_size) if k is not None]

    def _finish(self, trainer, point: _Pending) -> None:
        judgements = gather_judgements(self._local_share(trainer, point))
        apply_judgements(point.records, point.tasks, judgements, self.em_convention)
        apply_panel(point.records, point.tasks, judgements, self.spec.primary_name, self.em_convention)
        lost = [error for *_, error in judgements if is_lost_to_judge_outage(error)]
        if lost:  # partial metrics of a point would be biased: written, not logged, counted as unjudged
            reason = (f"judge outage: step {point.step} left unjudged ({len(lost)} of {len(judgements)} judgements "
                      f"lost; first: {lost[0]}); training goes on")
            meta = {"sampling": point.settings, "judges": judge_names(self.judging.by_prompt, point.tasks),
                    "judging_failed": reason}
            self._leave_unjudged(trainer, point.step, point.records, meta, reason)
            return
        if trainer.is_global_zero:
            summaries = summarize(point.records, self.questions, self.em_convention, self.conventions)
            metrics = point_metrics(point.records, self.questions, self.root, self.em_convention, summaries=summaries)
            metrics.update(panel_metrics(point.records, self.questions, self.root, self.em_convention))
            meta = {
                "step": point.step,
                "n_records": len(point.records),
                "sampling": point.settings,
                "judges": judge_names(self.judging.by_prompt, point.tasks),
                "summary": {str(s): v for s, v in summaries.items()},
                "convention": self.em_convention.describe(),
                "meaningful": self.root == "eval",
                "metrics": metrics,
            }
            write_point(self.run_dir / "generations", point.step, point.records, meta)
            log_point(RunLogger.of(trainer), point.step, point.records, metrics, self.answers_per_question,
                      self.max_answer_chars, self.root, self._note())
        # Every rank, at the same moment, with the judged records: subscribers may run collectives.
        announce(trainer, "on_point_judged", trainer.lightning_module, point.step, point.records)
