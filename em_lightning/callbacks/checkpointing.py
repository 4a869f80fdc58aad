"""Step checkpoints plus a ``last.ckpt`` that always holds the final step when fit ends, written atomically."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from em_lightning.atomic_io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes a temporary file next to the checkpoint, fsyncs and renames it.

    Lightning's own save goes through fsspec, which stages the file in the system temp dir and, when that
    is another file system (a tmpfs /tmp), copies it into place: a full disk or a kill mid-copy left a
    truncated checkpoint under its final name. Here the previous checkpoint (or none) survives, and a
    failure is an OSError naming the checkpoint. em-fit (commands/fit.py) installs it; remote URLs keep Lightning's path.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), functools.partial(torch.save, checkpoint))


class StepCheckpoint(Checkpoint):
    """``checkpoints/step_XXXXXXX.ckpt`` every ``every_n_train_steps`` optimizer steps, and ``last.ckpt``
    refreshed at each of them and at the final step (max_steps reached mid-epoch, the last epoch's end,
    or any other way out of the loop). Checkpoints of an adapter run hold only trainable weights, so
    keeping all of them is cheap. Public Lightning API only: ``trainer.save_checkpoint`` (every rank calls
    it; the strategy decides who writes: rank 0, or every rank its shard under FSDP2).
    """

    def __init__(self, every_n_train_steps: int = 50, save_top_k: int = -1, save_weights_only: bool = False):
        """
        Args:
            every_n_train_steps: optimizer steps between step checkpoints.
            save_top_k: how many step checkpoints to keep, newest first (-1: all; rank-1 checkpoints are KBs).
            save_weights_only: drop optimizer and loop state (such a checkpoint cannot resume exactly).
        """
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ValueError(f"checkpoint.every_n_train_steps: expected a positive integer, got {every_n_train_steps!r}")
        if save_top_k < -1:
            raise ValueError(f"checkpoint.save_top_k: expected -1 (all) or a count >= 0, got {save_top_k}")
        self.every_n_steps, self.save_top_k, self.save_weights_only = every_n_train_steps, save_top_k, save_weights_only
        self.dirpath: Path | None = None
        self._saved_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self.dirpath = Path(trainer.log_dir) / "checkpoints"  # broadcast from rank 0: every rank calls it

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # The restored step is already on disk: a resumed run must not re-save it (with gradient
        # accumulation that would happen after its first micro-batch, mid-accumulation).
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._saved_step:  # mid gradient accumulation, or saved already
            return
        if step % self.every_n_steps == 0:
            if self.save_top_k == 0:  # no step files kept: do not write one only to delete it
                self._save(trainer, self.dirpath / "last.ckpt")
                return
            step_path = self.dirpath / f"step_{step:07d}.ckpt"
            self._save(trainer, step_path)
            if not self._place_last(trainer, step_path):
                self._save(trainer, self.dirpath / "last.ckpt")
            self._prune(trainer)
        elif self._is_final_batch(trainer):
            self._save(trainer, self.dirpath / "last.ckpt")

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        # Any other way out of the loop (time limit, early stop): still leave the final step in last.ckpt.
        if self._saved_step != trainer.global_step:
            self._save(trainer, self.dirpath / "last.ckpt")

    @staticmethod
    def _is_final_batch(trainer: pl.Trainer) -> bool:
        if 0 <= trainer.max_steps <= trainer.global_step:
            return True
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs - 1
        return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def _save(self, trainer: pl.Trainer, path: Path) -> None:
        trainer.save_checkpoint(path, weights_only=self.save_weights_only)
        self._saved_step = trainer.global_step

    def _place_last(self, trainer: pl.Trainer, step_path: Path) -> bool:
        """Make last.ckpt the step file just written without serializing the state again: a hard link (a
        copy where links fail) under a temporary name, renamed over last.ckpt. Only when checkpoints are
        written by AtomicCheckpointIO, whose temp + rename never writes into a linked file; sharded folders
        and other CheckpointIOs are saved again (False)."""
        if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO) or step_path.is_dir():
            return False
        if trainer.is_global_zero:
            tmp = self.dirpath / f".last.ckpt.em-tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            try:
                os.link(step_path, tmp)
            except OSError:
                shutil.copyfile(step_path, tmp)
            os.replace(tmp, self.dirpath / "last.ckpt")
        trainer.strategy.barrier("StepCheckpoint.last")
        return True

    def _prune(self, trainer: pl.Trainer) -> None:
        """Keep the newest ``save_top_k`` step checkpoints (files, or folders of shards under FSDP2)."""
        if self.save_top_k < 0 or not trainer.is_global_zero:
            return
        steps = sorted(self.dirpath.glob("step_*.ckpt"))
        for old in steps[: max(0, len(steps) - self.save_top_k)]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
