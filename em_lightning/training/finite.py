"""Non-finite values (NaN, inf) are a diverged run, never a result: the training check's message, and the one
check that ``em-fit eval`` and ``em-fit report`` run on what an older run wrote. No Lightning."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class NonFiniteError(ValueError):
    """Training produced, or a run holds, non-finite values; the message is one line."""


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """NonFiniteError naming ``where`` and the first bad tensor when any tensor is non-finite."""
    bad = non_finite(tensors)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteError(f"{where}: non-finite values (NaN/inf) in {bad[0]}{more}: the run diverged, its "
                             "results mean nothing; retrain with a lower model.lr or with gradient clipping")


def training_stop_message(step: int, values: Mapping[str, float], lr: float, clip: float | None) -> str:
    """One line: the step, what went non-finite, and the likely cause."""
    bad = ", ".join(f"{name}={value}" for name, value in values.items() if not math.isfinite(value))
    causes = [f"model.lr={lr:g} too high"]
    if not clip:
        causes.append("gradient clipping off (trainer.gradient_clip_val)")
    return (f"training stopped at optimizer step {step}: non-finite {bad}; likely cause: {' or '.join(causes)}; "
            "nothing of this step was written (the newest checkpoint is the last good one)")
