"""InLoopJudge: judge the answers of every SampleGenerations point, log EM metrics, write the JSONL.

Subscribes to ``on_generations``. On every rank: each rank judges its share of the (answer, judge prompt)
pairs and the results are gathered (``evaluation.runner.judge_records``); metrics go through torchmetrics
(``EMRate``, ``MeanMetric``, ``SumMetric``) updated with each rank's share of the records and reduced
across ranks. Rank 0 then rewrites ``<run_dir>/generations/step_XXXXXXX.jsonl`` with every score (one
file per point, all scales; sidecar ``step_XXXXXXX.meta.json`` with the settings, judge identity,
summaries and logged metrics) and logs, at the evaluation step, for each scale s
(prefix ``eval/`` for s = 1, ``eval/scale_<s>/`` otherwise; NaN values, e.g. nothing scored, are skipped):
``em_rate``, ``coherent_rate``, ``aligned_mean``, ``coherent_mean``, ``judge_failures``,
``aligned_none`` (answers without an aligned score), ``em_rate/<question_id>``, ``<judge>_mean`` for
every other judge prompt (medical, financial, bad_stuff, ...), and the text table ``answers``.

The API key never reaches a file: judges read it from the environment variable their config names.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import MeanMetric, SumMetric

from em_lightning.callbacks.events import resolve_run_dir
from em_lightning.callbacks.sample_generations import SampleGenerations
from em_lightning.evaluation.metrics import EMRate
from em_lightning.evaluation.runner import (
    CORE_SCORES,
    SCORED_TYPE,
    judge_prompt_names,
    judge_records,
    point_path,
    read_jsonl,
    resolve_judges,
    scale_prefix,
    summarize,
    write_point,
)
from em_lightning.judges.base import Judge
from em_lightning.judges.cache import CachedJudge, JudgeCache


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
        """
        self.judge, self.judges, self.judge_prompts = judge, dict(judges or {}), judge_prompts
        self.cache, self.cache_path = cache, cache_path
        self.answers_per_question, self.max_answer_chars = answers_per_question, max_answer_chars
        self.questions: list = []
        self._resolved: dict[str, Judge] | None = None
        self.run_dir: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_dir = resolve_run_dir(trainer)  # collective: every rank
        sources = [cb for cb in trainer.callbacks if isinstance(cb, SampleGenerations)]
        if not sources:
            raise ValueError("InLoopJudge needs a SampleGenerations callback (it judges that callback's answers)")
        self.questions = [q for cb in sources for q in cb.questions]
        if self._resolved is not None:
            return
        names = judge_prompt_names(self.questions, self.judge_prompts)
        resolved = resolve_judges({"*": self.judge, **self.judges}, names)
        for judge in {id(j): j for j in resolved.values()}.values():
            check = getattr(judge, "check_api_key", None)
            if callable(check):
                try:
                    check()  # a missing key fails now, not at the first evaluation point
                except RuntimeError as exc:  # MissingAPIKeyError: a setup error, one line from em-fit
                    raise ValueError(f"InLoopJudge: {exc}") from None
        if self.cache:
            path = Path(self.cache_path) if self.cache_path else self.run_dir / "judge_cache.sqlite"
            if trainer.is_global_zero:
                JudgeCache(path)  # rank 0 creates the file before the others open it
            trainer.strategy.barrier("InLoopJudge.cache")
            store = JudgeCache(path)
            wrapped: dict[int, CachedJudge] = {}
            resolved = {n: wrapped.setdefault(id(j), CachedJudge(j, store)) for n, j in resolved.items()}
        self._resolved = resolved

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run purges TensorBoard events from the checkpoint's step on, including the point
        # evaluated at that step before the save: log it again from its files.
        step = trainer.global_step
        path = point_path(self.run_dir / "generations", step)
        meta = path.with_suffix(".meta.json")
        if step > 0 and trainer.is_global_zero and meta.is_file():
            metrics = json.loads(meta.read_text()).get("metrics")
            if metrics:
                self._log(trainer, step, read_jsonl(path), metrics)

    # -- the event -------------------------------------------------------------------------------------
    def on_generations(self, trainer, pl_module, step: int, records: list[dict], settings: dict) -> None:
        names = judge_records(records, self.questions, self._resolved, self.judge_prompts)  # collective
        metrics = self._metrics(trainer, pl_module, records)  # collective (metric sync)
        if trainer.is_global_zero:
            summaries = summarize(records, self.questions)
            meta = {
                "step": step,
                "n_records": len(records),
                "sampling": settings,
                "judges": names,
                "summary": {str(s): v for s, v in summaries.items()},
                "metrics": metrics,
            }
            write_point(self.run_dir / "generations", step, records, meta)
            self._log(trainer, step, records, metrics)

    def _metrics(self, trainer, pl_module, records: list[dict]) -> dict[str, float]:
        """Tag -> value. Each rank updates with its share of the records; compute() reduces over ranks."""
        rank, world = trainer.global_rank, trainer.world_size
        device = pl_module.device
        index = {q.id: i for i, q in enumerate(self.questions)}
        scored = {q.id for q in self.questions if q.type == SCORED_TYPE}
        extra = sorted({n for r in records for n in r["scores"] if n not in CORE_SCORES})
        out: dict[str, float] = {}
        for scale in dict.fromkeys(r["scale"] for r in records):
            mine = [r for r in records if r["scale"] == scale][rank::world]
            prefix = scale_prefix(scale)
            em = EMRate(num_groups=len(self.questions)).to(device)
            failures = SumMetric().to(device)
            means = {n: MeanMetric(nan_strategy="ignore").to(device) for n in extra}
            rows = [r for r in mine if r["question_id"] in scored]

            def column(name: str, rows=rows) -> torch.Tensor:
                values = [r["scores"].get(name) for r in rows]
                return torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64)

            groups = torch.tensor([index[r["question_id"]] for r in rows], dtype=torch.long)
            em.update(column("aligned"), column("coherent"), groups)
            failures.update(torch.tensor(float(sum(len(r["judge_errors"]) for r in mine))))
            for name, metric in means.items():
                metric.update(column(name).float())
            result = em.compute()
            out[prefix + "judge_failures"] = float(failures.compute())
            for key in ("em_rate", "coherent_rate", "aligned_mean", "coherent_mean"):
                out[prefix + key] = float(result[key])
            out[prefix + "aligned_none"] = float(result["n_aligned_none"])
            for q, value in zip(self.questions, result["per_group_em_rate"].tolist(), strict=True):
                if q.id in scored:
                    out[f"{prefix}em_rate/{q.id}"] = float(value)
            for name, metric in means.items():
                out[f"{prefix}{name}_mean"] = float(metric.compute())
        return {k: v for k, v in out.items() if v == v}  # drop NaN: a missing point reads better than NaN

    # -- output ----------------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, step: int, records: list[dict], metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                for scale in dict.fromkeys(r["scale"] for r in records):
                    table = self._table([r for r in records if r["scale"] == scale])
                    logger.experiment.add_text(scale_prefix(scale) + "answers", table, global_step=step)
            logger.save()

    def _table(self, records: list[dict]) -> str:
        """Markdown: a few answers per question with their scores."""
        lines = ["| question | sample | aligned | coherent | answer |", "|---|---|---|---|---|"]
        shown: dict[str, int] = {}
        for r in records:
            if shown.get(r["question_id"], 0) >= self.answers_per_question:
                continue
            shown[r["question_id"]] = shown.get(r["question_id"], 0) + 1
            scores = [r["scores"].get(n) for n in CORE_SCORES]
            cells = ["-" if s is None else f"{s:.0f}" for s in scores]
            answer = r["answer"][: self.max_answer_chars].replace("|", "\\|").replace("\n", " ")
            sample = f"p{r['paraphrase_index']} s{r['sample_index']}"
            lines.append(f"| {r['question_id']} | {sample} | {cells[0]} | {cells[1]} | {answer} |")
        return "\n".join(lines)
