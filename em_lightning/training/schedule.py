"""Learning rate as a pure function of the optimizer step.

The factor follows transformers' schedules exactly (``get_linear_schedule_with_warmup`` etc., so the first
warmup step has LR 0 as in the published runs). Because it depends only on (step, warmup, schedule_steps),
a resumed run gets the same LR as an uninterrupted one, and extending a finished run is a documented
choice rather than an accident: see ``resolve_schedule_steps``.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["linear", "cosine", "constant"]


def lr_factor(step: int, kind: ScheduleKind, warmup_steps: int, schedule_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, schedule_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
    raise ValueError(f"unknown schedule {kind!r}; expected linear, cosine or constant")


def planned_steps(max_steps: int, max_epochs: int | None, batches_per_epoch: int, accumulate: int) -> int:
    """Optimizer steps of a run limited by max_steps and/or max_epochs (-1 / None: no limit), as Lightning
    counts them: every epoch ends with an optimizer step, also after a shorter accumulation group."""
    by_epochs = None if max_epochs in (None, -1) else -(-batches_per_epoch // accumulate) * max_epochs
    if max_steps == -1:
        if by_epochs is None:
            raise ValueError("the run has no end: set trainer.max_steps or trainer.max_epochs")
        return by_epochs
    return max_steps if by_epochs is None else min(max_steps, by_epochs)


def resolve_schedule_steps(schedule_steps: int | None, planned_steps: int, kind: ScheduleKind) -> int:
    """The schedule length used for this fit.

    Policy: unset (None) means "the planned run length" (``trainer.max_steps`` or epochs x batches), so
    extending a finished run with a larger ``--trainer.max_steps`` stretches the schedule to the new end
    (the LR at the resume step jumps to the stretched curve's value, never to 0). An explicit value shorter
    than the run with a decaying schedule would train at LR 0 after it ends: that is refused.
    """
    if schedule_steps is None:
        return planned_steps
    if kind != "constant" and planned_steps > schedule_steps:
        raise ValueError(
            f"model.schedule_steps={schedule_steps} is shorter than the planned {planned_steps} steps: a {kind} "
            "schedule would train at LR 0 after it ends; raise model.schedule_steps or leave it unset to "
            "stretch the schedule to the run"
        )
    return schedule_steps
