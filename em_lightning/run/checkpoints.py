"""What a checkpoint says about its run, read without loading its tensors; sharded checkpoints (FSDP2's
folders of shards) consolidated into one file for a single process."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from em_lightning.run.fingerprint import FINGERPRINT

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


def checkpoint_fingerprint(path: str | Path) -> dict | None:
    """The run fingerprint the saving run recorded (fingerprint.py); None for checkpoints saved before it."""
    return _header(path).get(FINGERPRINT)


def run_finished(path: str | Path, max_steps: int, max_epochs: int | None) -> bool:
    """Whether a run resumed from this checkpoint under these limits has nothing left to train (a finished
    run started again with the same limits)."""
    header = _header(path)
    if max_steps not in (-1, None) and int(header.get("global_step", 0)) >= max_steps:
        return True
    if max_epochs in (-1, None):
        return False
    progress = header.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("completed", 0)) >= max_epochs


def checkpoint_mid_epoch(path: str | Path) -> bool:
    """Whether the checkpoint was saved inside an epoch (its data position counts batches of this world size)."""
    progress = _header(path).get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    return int(progress.get("current", {}).get("ready", 0)) > 0 and not progress.get("is_last_batch", False)


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
