"""What callbacks share: the run directory, and events one callback announces to the others.

Events are plain method calls on every callback that defines the hook, made on every rank in the same
order (the announcing callback computes the event identically on all ranks), so a subscriber may run
collectives in its handler. Hooks:

- ``on_phase_transition(trainer, pl_module, event)``: the adapter trajectory turned sharply
  (``event`` is an ``AdapterTrajectory`` ``ModuleTransition``: a ``phase.TransitionEvent`` plus ``.module``).
- ``on_generations(trainer, pl_module, step, records, settings)``: answers were sampled at an
  evaluation point: ``records`` are the runner's record dicts for every adapter scale (the full list, on
  every rank); ``settings`` the effective sampling settings plus the scales.
- ``on_point_judged(trainer, pl_module, step, records)``: InLoopJudge finished a point (possibly steps
  after it was sampled): the same records with every score, on every rank at the same moment.

Set-up events (announced during ``setup``; a subscriber may be set up before or after the announcer, so it
acts once it has both its own set-up and the event; checks that an event came belong in ``on_fit_start`` /
``on_validation_start``, after every callback's ``setup``):

- ``on_evaluation_source(trainer, pl_module, source)``: SampleGenerations' questions, sampling and
  schedule (``evaluation.plan.EvaluationSource``); InLoopJudge judges them, MechanisticProbes steers with them.
- ``on_judges_ready(trainer, pl_module, judging)``: InLoopJudge built its judges (``judges.factory.Judging``:
  cached, API keys checked); MechanisticProbes judges its steered answers with them.

Callbacks never look each other up in ``trainer.callbacks``: what one needs from another arrives here.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl



def resolve_run_dir(trainer: pl.Trainer) -> Path:
    """The run directory (the logger's log_dir). Collective (a broadcast from rank 0): call it on every
    rank, e.g. in ``setup``, and keep the result."""
    return Path(trainer.log_dir)


def announce(trainer: pl.Trainer, hook: str, *args) -> None:
    for callback in trainer.callbacks:
        handler = getattr(callback, hook, None)
        if callable(handler):
            handler(trainer, *args)
