"""StepProgressBar: one bar over the optimizer steps of the planned run, across epochs.

Lightning's bars count the micro-batches of each epoch and restart every epoch ("Epoch 2/-2 ... 26/13"
with accumulation and a step limit); a fine-tuning run is planned in optimizer steps, and the LR schedule,
checkpoints and TensorBoard's x axis all count those.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=int(trainer.estimated_stepping_batches))  # the train loader exists by now
        bar.n = bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        of = f"/{epochs}" if epochs else ""
        self.train_progress_bar.set_description(f"step (epoch {trainer.current_epoch + 1}{of})")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar.n != n and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            if n >= bar.total:  # done: printed once, before the last validation and Lightning's "stopped" line
                bar.close()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
