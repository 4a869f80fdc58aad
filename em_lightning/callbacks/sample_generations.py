"""SampleGenerations: sample answers to evaluation questions at evaluation points during training.

Evaluation points (each step at most once, remembered in the checkpoint so a resumed run neither redoes
nor skips one):

- every ``every_n_steps`` optimizer steps (checked at ``on_train_batch_end``, once per optimizer step);
- at every checkpoint save (``at_checkpoints``; step checkpoints and also ``last.ckpt`` refreshes, e.g.
  after a validation run; evaluated inside the save, so the checkpoint already lists the step);
- at the end of fit (``at_fit_end``), unless that step was evaluated already;
- in ``em-fit validate --ckpt_path ...`` (``at_validate``), always (an explicit request);
- densely after a phase transition (``transition_window`` > 0): every ``transition_every`` steps from the
  detection step to ``transition_window`` steps after it, when a callback announces
  ``on_phase_transition`` (earlier steps are in the past: evaluate them with ``em-fit eval --run R --step S``).

Each point samples on all ranks (prompts sharded, answers gathered; FSDP: full parameters and synced
forwards), writes the unjudged answers to ``<run_dir>/generations/step_XXXXXXX.jsonl`` on rank 0 (an
InLoopJudge rewrites the file with the scores), and announces
``on_generations(trainer, pl_module, step, records, settings)`` with the records
(``evaluation.records.EvalRecord``: all scales in one list, each record has ``scale``) and the effective
sampling settings (with ``scales``). At set-up it announces ``on_evaluation_source`` (its questions,
sampling and schedule: ``events.EvaluationSource``) for the callbacks that judge or steer with them.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy

from em_lightning.evaluation.conditions import Condition, with_conditions
from em_lightning.evaluation.records import EvalRecord, write_point
from em_lightning.evaluation.runner import EvalPoint, point_meta, sample_records
from em_lightning.evaluation.sampling import SamplingConfig
from em_lightning.evaluation.plan import EvaluationSource
from em_lightning.lit.events import announce, resolve_run_dir
from em_lightning.published.question_files import load_questions
from em_lightning.model.sharding import is_sharded


def _generation_context(trainer: pl.Trainer, model) -> tuple:
    """(context, synced): a sharded model needs every rank in every forward, so ranks decode in lockstep
    until all their rows are done (synced). FSDP2 gathers each unit's parameters in its own forward; FSDP1's
    root unit is gathered here (its forward is called below the root wrapper; not exercised on CPU)."""
    if is_sharded(model):
        return nullcontext(), True
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = trainer.strategy.model
        return FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=False), True
    return nullcontext(), False


class SampleGenerations(Callback):
    def __init__(
        self,
        questions: str | list[str],
        select: list[str] | None = None,
        plain_only: bool = False,
        sampling: SamplingConfig | None = None,
        every_n_steps: int | None = 25,
        at_checkpoints: bool = True,
        at_fit_end: bool = True,
        at_validate: bool = True,
        scales: list[float] | None = None,
        transition_window: int = 0,
        transition_every: int = 1,
        write: bool = True,
        conditions: list[Condition] | None = None,
    ):
        """
        Args:
            questions: question file(s) in the public EM YAML format; loaded and checked here, so a bad
                file fails before training (``file:line: field: problem``).
            select: question ids or globs to keep (e.g. ``[what_is_your_wish, quick_buck]``).
            plain_only: keep only plain questions (drop the ``_json``/``_template``/system-prompt variants).
            sampling: sampling settings (samples per paraphrase, temperature, top_p, max_new_tokens, seed, ...).
            every_n_steps: evaluate every N optimizer steps; null: only at the other points.
            at_checkpoints: evaluate at every checkpoint save.
            at_fit_end: evaluate at the end of fit.
            at_validate: evaluate in ``em-fit validate``.
            scales: adapter scales to sample at each point (e.g. ``[0.5, 1, 2, 4]``); default ``[1]``.
            transition_window: after an ``on_phase_transition`` event, evaluate densely for this many steps.
            transition_every: step interval of the dense evaluation.
            write: write the unjudged answers to ``generations/`` (an InLoopJudge rewrites them with scores).
            conditions: also ask every plain question inside these training contexts (conditional
                misalignment: a code template, a JSON-output system prompt, the inoculation trigger); records
                carry ``condition`` and EM is logged per condition (``eval/condition/<name>/...``).
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"SampleGenerations: every_n_steps must be >= 1 or null, got {every_n_steps}")
        if transition_window < 0 or transition_every < 1:
            raise ValueError("SampleGenerations: need transition_window >= 0 and transition_every >= 1")
        self.questions = load_questions(questions, select, plain_only)
        if not self.questions:
            raise ValueError(f"SampleGenerations: {questions}: no questions left after select/plain_only")
        if conditions:
            self.questions = with_conditions(self.questions, conditions)
        self.sampling = sampling or SamplingConfig()
        self.every_n_steps = every_n_steps
        self.at_checkpoints, self.at_fit_end, self.at_validate = at_checkpoints, at_fit_end, at_validate
        self.scales = [float(s) for s in (scales or [1.0])]
        self.transition_window, self.transition_every = transition_window, transition_every
        self.write = write
        self.evaluated: set[int] = set()  # steps already evaluated (checkpointed)
        self.dense: set[int] = set()  # extra steps scheduled by a phase transition (checkpointed)
        self.run_dir: Path | None = None
        self._loaded_step: int | None = None

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"evaluated": sorted(self.evaluated), "dense": sorted(self.dense)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluated = set(state_dict.get("evaluated", []))
        self.dense = set(state_dict.get("dense", []))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # validate restores weights but not the loop: its trainer.global_step stays 0.
        self._loaded_step = int(checkpoint.get("global_step", 0))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_dir = resolve_run_dir(trainer)  # collective: every rank
        source = EvaluationSource(self.questions, self.sampling, self.scales, self.every_n_steps,
                                  self.at_checkpoints, self.at_fit_end)
        announce(trainer, "on_evaluation_source", pl_module, source)  # every rank: a judge may build its cache

    # -- evaluation points -----------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        if step in self.evaluated or step <= 0:
            return False
        return (self.every_n_steps is not None and step % self.every_n_steps == 0) or step in self.dense

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._due(trainer.global_step):  # global_step only moves on optimizer steps
            self.evaluate(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        step = trainer.global_step
        if self.at_checkpoints and trainer.state.fn == "fit" and step not in self.evaluated:
            self.evaluate(trainer, pl_module)
        # Callback states were collected before this hook: record the step evaluated just now.
        if self.state_key in checkpoint.get("callbacks", {}):
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and trainer.global_step not in self.evaluated:
            self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.at_validate and trainer.state.fn == "validate":
            self.evaluate(trainer, pl_module)

    def on_phase_transition(self, trainer, pl_module, event) -> None:
        if self.transition_window <= 0:
            return
        start = int(event.detected_step)
        self.dense.update(range(start, start + self.transition_window + 1, self.transition_every))
        if trainer.state.fn == "fit" and self._due(trainer.global_step):
            self.evaluate(trainer, pl_module)  # the announcer may run after our on_train_batch_end

    # -- the work --------------------------------------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[EvalRecord]:
        """Sample at the current step on every rank, write (rank 0), announce. Returns the records."""
        step = trainer.global_step
        if trainer.state.fn == "validate" and self._loaded_step is not None:
            step = self._loaded_step  # the checkpoint's step: its files, tags and sampling seeds
        self.evaluated.add(step)
        model, tokenizer = pl_module.model, pl_module.tokenizer
        context, synced = _generation_context(trainer, model)
        with context:
            records = sample_records(model, tokenizer, self.questions, self.sampling, step, self.scales, synced)
        settings = {**self.sampling.resolve(model, tokenizer), "scales": self.scales}
        inoculation = getattr(trainer.datamodule, "inoculation", None)
        if inoculation is not None:  # the training-only prompt (data.inoculation) and how many sampled prompts hold it
            settings["inoculation"] = {"prompt": inoculation.prompt, "position": inoculation.position,
                                       "prompts_containing_it": sum(inoculation.prompt in r["prompt"] for r in records)}
        if self.write and trainer.is_global_zero and self.run_dir is not None:
            meta = point_meta(EvalPoint(step, records, settings))
            write_point(self.run_dir / "generations", step, records, meta)
        announce(trainer, "on_generations", pl_module, step, records, settings)
        return records
