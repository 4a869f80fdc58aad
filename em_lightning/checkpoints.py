"""What a checkpoint says about its run, read without loading its tensors; sharded checkpoints (FSDP2's
folders of shards) consolidated into one file for a single process."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

RUN_LIMITS = "em_run_limits"  # {"max_steps": int, "max_epochs": int | None} of the run that saved it
SHARDED_META = "meta.pt"  # in a sharded checkpoint folder: everything but the tensors (Lightning's name)


def _header(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():  # sharded: the loop state and callback states are in the metadata file
        path = path / SHARDED_META
    # Memory-mapped: cheap even for a full fine-tuning checkpoint of many GB.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def checkpoint_global_step(path: str | Path) -> int:
    """The optimizer step a checkpoint (file or sharded folder) was saved at."""
    return int(_header(path).get("global_step", 0))


def checkpoint_run_limits(path: str | Path) -> dict | None:
    """The trainer limits (max_steps, max_epochs) the saving run had; None for older checkpoints."""
    return _header(path).get(RUN_LIMITS)


def consolidate(path: str | Path, out_file: str | Path) -> Path:
    """A sharded checkpoint folder as one ordinary checkpoint file (what ``load_from_checkpoint`` reads);
    a file is returned unchanged. Needs the whole checkpoint in CPU memory (trainable tensors only here)."""
    path, out_file = Path(path), Path(out_file)
    if not path.is_dir():
        return path
    dcp_to_torch_save(path, out_file)
    state = torch.load(out_file, map_location="cpu", weights_only=False)
    state.update(torch.load(path / SHARDED_META, map_location="cpu", weights_only=False))
    optimizers = sorted((k for k in state if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    state["optimizer_states"] = [state.pop(k) for k in optimizers]
    torch.save(state, out_file)
    return out_file
