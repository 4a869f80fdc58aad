"""Step checkpoints plus a ``last.ckpt`` that always holds the final step when fit ends, written atomically;
SIGTERM / SIGUSR1 (preemption, SLURM's ``--signal``) save the step reached and stop the run with 128 + signal."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from em_lightning.run.atomic_io import atomic_write

# Signals that stop a run at the next optimizer step with a checkpoint: exit code 128 + the signal's number
# (SIGTERM 143, SIGUSR1 138), the shell's convention for "ended by this signal".
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """The run was stopped by a signal after saving a checkpoint; the exit code is 128 + the signal."""


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

    Preemption: while training runs, SIGTERM and SIGUSR1 only set a flag (Lightning's own handler, restored
    when training ends, would stop at the next *batch*, mid gradient accumulation, with exit code 0). At the
    end of the next optimizer step every rank learns whether any rank got one (one max-reduce of a scalar per
    optimizer step under DDP, none on one device), the step is saved as a step checkpoint and ``last.ckpt``
    through the same atomic path, and once Lightning has logged the step's metrics (at the next batch or
    validation start, before any work) the run exits with 128 + the signal and one line: the checkpoint and
    the resume command. ``--ckpt_path last`` then continues as if the run had never stopped. A signal at the
    run's last step lets the run finish (exit 0).
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
        self._step_seen: int | None = None
        self._signal: int | None = None  # the stop signal this process received
        self._stopping: int | None = None  # the signal every rank agreed to stop for, after saving
        self._handlers: dict = {}  # the handlers ours replaced, restored when training ends

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self.dirpath = Path(trainer.log_dir) / "checkpoints"  # broadcast from rank 0: every rank calls it

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # The restored step is already on disk: a resumed run must not re-save it (with gradient
        # accumulation that would happen after its first micro-batch, mid-accumulation).
        self._saved_step = self._step_seen = trainer.global_step
        self._signal = self._stopping = None
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum: int, frame) -> None:
        self._signal = signum  # acted on at the end of the optimizer step (on_train_batch_end)

    def _restore_handlers(self) -> None:
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self._handlers = {}

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step_seen:  # mid gradient accumulation
            return
        self._step_seen = step
        if step % self.every_n_steps == 0:
            self._save_step(trainer, step)
        elif self._is_final_batch(trainer):
            self._save(trainer, self.dirpath / "last.ckpt")
        signum = self._stop_signal(trainer, pl_module)
        if signum:
            if self._saved_step != step:
                self._save_step(trainer, step)
            self._stopping = signum  # raised once Lightning has logged this step's metrics (next hook below)

    def on_validation_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self._stopping:  # no validation (generation, judging) after a stop signal: the checkpoint is written
            self._stop(trainer, self._stopping)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._stopping:
            self._stop(trainer, self._stopping)

    def _save_step(self, trainer: pl.Trainer, step: int) -> None:
        if self.save_top_k == 0:  # no step files kept: do not write one only to delete it
            self._save(trainer, self.dirpath / "last.ckpt")
            return
        step_path = self.dirpath / f"step_{step:07d}.ckpt"
        self._save(trainer, step_path)
        if not self._place_last(trainer, step_path):
            self._save(trainer, self.dirpath / "last.ckpt")
        self._prune(trainer)

    def _stop_signal(self, trainer: pl.Trainer, pl_module) -> int:
        """The stop signal any rank received (0: none), the same on every rank (a collective under DDP)."""
        if trainer.world_size == 1:
            return self._signal or 0
        flag = torch.tensor(float(self._signal or 0), device=pl_module.device)
        return int(trainer.strategy.reduce(flag, reduce_op=torch.distributed.ReduceOp.MAX).item())

    def _stop(self, trainer: pl.Trainer, signum: int) -> None:
        if trainer.is_global_zero:
            run_dir = self.dirpath.parent
            print(f"em-fit: stopped by {signal.Signals(signum).name} after optimizer step {trainer.global_step}; "
                  f"checkpoint: {self.dirpath / 'last.ckpt'}; resume: em-fit fit --config {run_dir / 'config.yaml'} "
                  "--ckpt_path last", file=sys.stderr, flush=True)
        self._restore_handlers()
        raise Preempted(128 + signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._restore_handlers()  # after the last step a signal is Lightning's again (the run is finishing)
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
