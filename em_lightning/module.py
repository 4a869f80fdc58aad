"""EMFineTune: a Hugging Face causal LM with an adapter, trained on assistant tokens."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from em_lightning.adapters import AdapterSpec, apply_adapter, is_peft, trainable_parameter_count
from em_lightning.models import ModelSpec, load_model, load_tokenizer
from em_lightning.schedule import ScheduleKind, lr_factor, resolve_schedule_steps


class EMFineTune(pl.LightningModule):
    """Fine-tune a chat model into an emergent-misalignment model organism.

    Args:
        base: the base model to load (hub id, folder or ``tiny:<arch>``) and how.
        adapter: what trains: rank-1 LoRA on chosen layers, several rank-1 adapters, rank-N LoRA, or full.
        lr: peak learning rate.
        weight_decay: AdamW weight decay (not applied to 1-D parameters: biases, norms).
        betas: AdamW betas.
        optimizer: ``adamw`` (torch) or ``adamw_8bit`` (bitsandbytes, as in the published recipes).
        schedule: LR shape after warmup: ``linear`` or ``cosine`` decay to 0, or ``constant``.
        warmup_steps: optimizer steps of linear warmup from 0 (transformers' convention).
        schedule_steps: length of the schedule in optimizer steps; unset = the planned run length
            (``trainer.max_steps`` or epochs x batches). Extending a finished run with a larger
            ``--trainer.max_steps`` then stretches the schedule to the new end (see schedule.py).
    """

    def __init__(
        self,
        base: ModelSpec | None = None,
        adapter: AdapterSpec | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        optimizer: Literal["adamw", "adamw_8bit"] = "adamw",
        schedule: ScheduleKind = "linear",
        warmup_steps: int = 5,
        schedule_steps: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.base = base or ModelSpec()
        self.adapter = adapter or AdapterSpec()
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        # Checkpoints hold only trainable weights; the frozen base is rebuilt from `base`.
        self.strict_loading = False
        self._last_batch_end: float | None = None

    # -- model ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.base)
        model = load_model(self.base, self.tokenizer)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = apply_adapter(model, self.adapter)
        self.model.config.use_cache = False  # no KV cache while training; generation asks for it

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    # -- steps ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        self._log_throughput(batch)
        return loss

    def _log_throughput(self, batch: dict) -> None:
        # Tokens processed by all ranks per second of wall time between consecutive batches.
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = batch["attention_mask"].sum().float()
            rate = tokens / max(now - self._last_batch_end, 1e-9)
            self.log("train/tokens_per_s", rate, on_step=True, sync_dist=True, reduce_fx="sum")
        self._last_batch_end = now

    def on_train_epoch_start(self) -> None:
        self._last_batch_end = None

    def on_train_start(self) -> None:
        # A restored optimizer carries the LR of the checkpoint's schedule; when a finished run is
        # extended the schedule is stretched, so re-evaluate the LR of the current step right away.
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            for group, base_lr, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base_lr * fn(sched.last_epoch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self(**batch).loss
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True)

    # -- optimisation --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        hp = self.hparams
        params = self.trainable_parameters()
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if hp.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(groups, lr=hp.lr, betas=hp.betas)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas)
        total = resolve_schedule_steps(hp.schedule_steps, int(self.trainer.estimated_stepping_batches), hp.schedule)
        rank_zero_info(
            f"LR schedule: {hp.schedule}, warmup {hp.warmup_steps}, length {total} optimizer steps; "
            f"{trainable_parameter_count(self.model):,} trainable parameters"
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, hp.schedule, hp.warmup_steps, total)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints and export ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_fit_end(self) -> None:
        run_dir = Path(self.trainer.log_dir)  # broadcast from rank 0: called on every rank
        if self.trainer.is_global_zero:
            export_model(self.model, self.tokenizer, run_dir / "adapter")


def export_model(model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """PEFT adapter files (``adapter_config.json`` + ``adapter_model.safetensors``), or for full
    fine-tuning the whole model and tokenizer via ``save_pretrained``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if not is_peft(model) and tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
