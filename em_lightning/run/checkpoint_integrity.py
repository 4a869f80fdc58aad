"""Is a checkpoint intact? Checked before a run resumes from it, so a truncated, random or bit-flipped
file gives one line naming it (and, for ``--ckpt_path last``, the newest intact checkpoint) instead of an
UnpicklingError traceback after the run directory was touched.

A torch checkpoint is a zip archive whose members carry CRC-32s: ``testzip`` reads every byte once and
catches a flipped bit that ``torch.load`` would load silently. No Lightning.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

SHARDED_META = "meta.pt"  # a sharded (FSDP2) checkpoint is a folder; its loop state lives in this file
_STEP = re.compile(r"step_(\d+)\.ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message is one line naming the file."""


def check_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless ``path`` (a file, or a sharded folder's metadata) loads intact."""
    path = Path(path)
    if path.is_dir():
        path = path / SHARDED_META  # the shards themselves are checked by torch.distributed.checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
            raise CheckpointError(f"{path}: corrupt checkpoint (not a complete zip archive: truncated, or not a checkpoint)")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt checkpoint (checksum mismatch in {bad})")
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no global_step)")


def newest_intact(checkpoint_dir: str | Path, exclude: str | Path | None = None) -> Path | None:
    """The ``step_XXXXXXX.ckpt`` with the highest step in ``checkpoint_dir`` that passes check_checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _STEP.fullmatch(p.name))), reverse=True
    )
    for _, candidate in steps:
        if exclude is not None and candidate == Path(exclude):
            continue
        try:
            check_checkpoint(candidate)
        except (CheckpointError, FileNotFoundError):
            continue
        return candidate
    return None


def check_resume_checkpoint(path: str | Path, resolved_from_last: bool = False) -> None:
    """check_checkpoint, and when ``--ckpt_path last`` was corrupt, say which checkpoint to use instead."""
    try:
        check_checkpoint(path)
    except CheckpointError as e:
        if not resolved_from_last:
            raise
        instead = newest_intact(Path(path).parent)
        hint = (f"; the newest intact checkpoint is {instead}: resume with --ckpt_path {instead}" if instead
                else f"; no intact step checkpoint in {Path(path).parent}")
        raise CheckpointError(f"--ckpt_path last: {e}{hint}") from None
