"""StepValidation: val/loss on the optimizer-step schedule of the run, announced at the start.

Lightning's integer ``val_check_interval`` counts micro-batches and restarts every epoch (with
accumulation 2 and 74 batches per epoch, ``20`` validated at steps 10, 20, 37, 40...). A fine-tuning run
is planned in optimizer steps, as the LR schedule, checkpoints and TensorBoard's x axis are, so here:

- ``trainer.val_check_interval: N`` (int): val/loss every N optimizer steps of the run, across epochs;
- a float f: every ``round(f x optimizer steps per epoch)`` steps (Lightning's "fraction of an epoch");
- a time (``"00:01:00:00"``): left to Lightning;
- and, with ``model.validate_before_training`` (default), before the first step and after the last.

Lightning's own periodic check is switched off (``check_val_every_n_epoch: None`` and an interval it never
reaches); each check runs EMFineTune's held-out pass at the step's weights. With no held-out rows
(``data.val_fraction: 0``) validation is off, without Lightning's empty-dataloader warning.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from em_lightning.training.validation_plan import describe_schedule, interval_in_steps


class StepValidation(Callback):
    def __init__(self) -> None:
        self.every: int | None = None  # optimizer steps between checks; None: only before/after training
        self._last: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or getattr(trainer, "_val_check_time_interval", None) is not None:
            return
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "val_set") and not dm.val_set:
            trainer.limit_val_batches = 0  # nothing held out: no loop, no "Total length ... is zero" warning
        steps_per_epoch = -(-dm.batches_per_epoch(trainer.world_size) // trainer.accumulate_grad_batches) \
            if hasattr(dm, "batches_per_epoch") else None
        self.every = interval_in_steps(trainer.val_check_interval, steps_per_epoch)
        trainer.check_val_every_n_epoch = None
        trainer.val_check_interval = sys.maxsize  # Lightning's micro-batch schedule never fires; ours does

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = trainer.global_step
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "val_set", None) or trainer.limit_val_batches == 0:
            rank_zero_info("validation: off (no held-out rows: data.val_fraction 0, or trainer.limit_val_batches 0)")
            return
        if hasattr(dm, "validation_size"):
            rows, tokens, capped_from, per_step = dm.validation_size(trainer.accumulate_grad_batches, trainer.world_size)
            rank_zero_info(describe_schedule(trainer.global_step, int(trainer.estimated_stepping_batches), self.every,
                                             getattr(pl_module, "validate_before_training", True), rows, tokens,
                                             per_step, capped_from))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every is None or step == self._last or trainer.limit_val_batches == 0:
            return
        self._last = step  # once per optimizer step (the accumulation's last micro-batch moves the step)
        if step % self.every == 0:  # the last step's: here or in EMFineTune.on_train_end, never twice
            pl_module._log_held_out_loss(step=step)
