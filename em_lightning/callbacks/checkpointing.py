"""Step checkpoints plus a ``last.ckpt`` that always holds the final step when fit ends, written atomically."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

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


class StepCheckpoint(ModelCheckpoint):
    """``checkpoints/step_XXXXXXX.ckpt`` every ``every_n_train_steps`` optimizer steps, and ``last.ckpt``
    refreshed at each of them and at the final step (max_steps reached mid-epoch or last epoch's end).
    Checkpoints of an adapter run hold only trainable weights, so keeping all of them is cheap.
    """

    def __init__(self, every_n_train_steps: int = 50, save_top_k: int = -1, save_weights_only: bool = False):
        """
        Args:
            every_n_train_steps: optimizer steps between step checkpoints.
            save_top_k: how many step checkpoints to keep (-1: all; rank-1 checkpoints are KBs).
            save_weights_only: drop optimizer and loop state (such a checkpoint cannot resume exactly).
        """
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ValueError(f"checkpoint.every_n_train_steps: expected a positive integer, got {every_n_train_steps!r}")
        if save_top_k < -1:
            raise ValueError(f"checkpoint.save_top_k: expected -1 (all) or a count >= 0, got {save_top_k}")
        super().__init__(
            filename="step_{step:07d}",
            auto_insert_metric_name=False,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            save_top_k=save_top_k,
            save_weights_only=save_weights_only,
            enable_version_counter=False,  # a resumed run rewrites its own step files, never "-v1" copies
        )
        self.every_n_steps = every_n_train_steps  # public: the evaluation plan reads the cadence

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # The restored step is already on disk; without this, a resumed run with gradient accumulation
        # would re-save it after its first micro-batch, mid-accumulation.
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._is_final_batch(trainer) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _is_final_batch(trainer: pl.Trainer) -> bool:
        loop = trainer.fit_loop
        if 0 <= trainer.max_steps <= trainer.global_step:
            return True
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs - 1
        return last_epoch and loop.epoch_loop.batch_progress.is_last_batch

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        # Any other way out of the loop (time limit, early stop): still leave the final step in last.ckpt.
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

