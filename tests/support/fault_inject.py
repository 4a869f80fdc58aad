"""Faults for tests/e2e/test_faults.py, injected into an em-fit subprocess through its config (PYTHONPATH holds
tests/). Each fires only while the environment variable ARMED is set, so the run's own config.yaml can
resume the run without firing it again."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

ARMED = "EM_FAULT_ARMED"


def _armed() -> bool:
    return bool(os.environ.get(ARMED))


class KillDuringCheckpointWrite(Callback):
    """At ``at_step``, make the checkpoint big (``ballast_mb`` of zeros) and SIGKILL this process while a
    file whose name starts with ``target`` (the final file or a temporary one) is growing past 1 MB in the
    checkpoint folder: a kill -9 in the middle of writing it."""

    def __init__(self, at_step: int, target: str = "last.ckpt", ballast_mb: int = 64):
        self.at_step, self.target, self.ballast_mb = at_step, target, ballast_mb
        self._watching = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not _armed() or trainer.global_step != self.at_step:
            return
        checkpoint["fault_ballast"] = torch.zeros(self.ballast_mb << 18)  # float32: 4 bytes each
        if not self._watching:
            self._watching = True
            folder = Path(trainer.checkpoint_callback.dirpath)
            threading.Thread(target=self._watch, args=(folder,), daemon=True).start()

    def _watch(self, folder: Path) -> None:
        while True:
            for p in folder.iterdir() if folder.is_dir() else ():
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    continue
                if p.name.startswith(self.target) and size > 1 << 20:
                    (folder.parent / "killed_while_writing").write_text(f"{p.name} {size}\n")
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0002)


class FillDisk(Callback):
    """After optimizer step ``at_step``, fill the file system holding ``path`` by writing ``path`` until
    ENOSPC: the next checkpoint finds the disk full."""

    def __init__(self, at_step: int, path: str):
        self.at_step, self.path = at_step, path
        self._done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _armed() or self._done or trainer.global_step != self.at_step:
            return
        self._done = True
        with open(self.path, "wb", buffering=0) as f:
            for chunk in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise


class SlowVersionLogger(TensorBoardLogger):
    """A TensorBoardLogger that takes ``delay`` seconds between choosing its version number and anything
    that creates the folder: what a loaded machine does to two runs started at once."""

    def __init__(self, *args, delay: float = 3.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def _get_next_version(self) -> int:
        version = super()._get_next_version()
        if _armed():
            time.sleep(self.delay)
        return version


class SignalAtStep(Callback):
    """Send ``signum`` to this process (rank 0 only: what a scheduler's kill of the launcher does) right after
    the first micro-batch of optimizer step ``at_step`` + 1: mid gradient accumulation when there is one."""

    def __init__(self, at_step: int, signum: int = int(signal.SIGTERM)):
        self.at_step, self.signum = at_step, signum
        self._sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _armed() or self._sent or trainer.global_step != self.at_step or not trainer.is_global_zero:
            return
        if trainer.accumulate_grad_batches > 1 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            return  # the step's last micro-batch: wait for the next step's first one
        self._sent = True
        os.kill(os.getpid(), self.signum)
