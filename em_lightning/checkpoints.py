"""What a checkpoint says about its run, read without loading its tensors."""

from __future__ import annotations

from pathlib import Path

import torch

RUN_LIMITS = "em_run_limits"  # {"max_steps": int, "max_epochs": int | None} of the run that saved it


def _header(path: str | Path) -> dict:
    # Memory-mapped: cheap even for a full fine-tuning checkpoint of many GB.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def checkpoint_global_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at."""
    return int(_header(path).get("global_step", 0))


def checkpoint_run_limits(path: str | Path) -> dict | None:
    """The trainer limits (max_steps, max_epochs) the saving run had; None for older checkpoints."""
    return _header(path).get(RUN_LIMITS)
