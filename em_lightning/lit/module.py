"""EMFineTune: a Hugging Face causal LM with an adapter, trained on assistant tokens."""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from em_lightning.model.adapters import (
    ADAPTER_NAME,
    AdapterSpec,
    apply_adapter,
    is_peft,
    non_text_modules,
    trainable_parameter_count,
)
from em_lightning.run.checkpoints import RUN_LIMITS
from em_lightning.model.eval_mode import eval_no_grad
from em_lightning.run.fingerprint import FINGERPRINT
from em_lightning.training.finite import NonFiniteError, training_stop_message
from em_lightning.model.gguf_cache import exported_base
from em_lightning.training.loss import ROW_LENGTHS, labelled_loss_sum, loss_lengths
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.training.resumable import STEP_TOKENS
from em_lightning.loggers.run_logger import RunLogger
from em_lightning.training.schedule import ScheduleKind, lr_factor, planned_steps, resolve_schedule_steps
from em_lightning.model.sharding import ShardingSpec, full, full_state_dict, gather_trainable, is_sharded, shard_model

# EMFineTune.on_before_batch_transfer is meant to run beside ChatDataModule (it adds row lengths; the data
# module defines no such hook): Lightning's note that the module's hook is used says nothing to a user.
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`")


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
        padding_free: run each row of a training micro-batch through the model alone, without its padding
            (same loss and gradient to float rounding, same order): no compute on padding, and unmasked causal
            attention. Faster wherever a micro-batch's rows differ in length (forward + backward on CPU: 1.26x on
            insecure-code rows with a tiny Qwen2, 1.12x with SmolLM2-135M; README, Performance); false runs one
            padded forward per micro-batch (e.g. for many short rows per micro-batch on a GPU).
            FSDP2-sharded models always run padded.
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
        validate_before_training: bool = True,
        sharding: ShardingSpec | None = None,
        padding_free: bool = True,
    ):
        super().__init__()
        # Bad options fail here, named, before a model is loaded or anything is written (0 < x < inf is
        # False for NaN too).
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise ValueError(f"model.lr: expected a positive number, got {lr!r}")
        if not 0 <= weight_decay < float("inf"):
            raise ValueError(f"model.weight_decay: expected a number >= 0, got {weight_decay!r}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"model.betas: expected two numbers in [0, 1), got {betas!r}")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps: expected an integer >= 0, got {warmup_steps!r}")
        if schedule_steps is not None and schedule_steps < 1:
            raise ValueError(f"model.schedule_steps: expected a positive integer or null, got {schedule_steps!r}")
        self.save_hyperparameters()
        self.validate_before_training = validate_before_training
        self.padding_free = padding_free
        self.sharding = sharding or ShardingSpec()
        self.base = base or ModelSpec()
        self.adapter = adapter or AdapterSpec()
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        # Checkpoints hold only trainable weights; the frozen base is rebuilt from `base`.
        self.strict_loading = False
        self._last_step_end: float | None = None
        self._val_logged_step: int | None = None
        self.run_fingerprint: dict | None = None  # set by em-fit (commands/fit.py); saved in every checkpoint
        self.training_started = False  # a failed start (before the first step) leaves no run directory
        # Extra training-loss terms contributed by callbacks (add_loss_term), e.g. the KL defense.
        self.loss_terms: dict[str, LossTerm] = {}

    # -- model ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.base)
        model = load_model(self.base, self.tokenizer)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = apply_adapter(model, self.adapter)
        towers = non_text_modules(model)
        if towers:
            rank_zero_info(f"multimodal base model: only the language model trains; {', '.join(towers)} stay frozen")
        if is_peft(self.model) and self.base.tiny_arch is None:  # the export names its base (for vLLM, AutoPeftModel)
            config = self.model.peft_config[ADAPTER_NAME]
            # A GGUF base: its converted HF folder (gguf_cache.py), which AutoPeftModelForCausalLM can load.
            config.base_model_name_or_path, config.revision = exported_base(self.base.name_or_path,
                                                                            self.base.gguf_file, self.base.revision)
        self.model.config.use_cache = False  # no KV cache while training; generation asks for it
        if self.device_mesh is not None:  # ModelParallelStrategy (configs/strategies/fsdp2.yaml)
            shard_model(self.model, self.device_mesh["data_parallel"], self.sharding)

    def state_dict(self, *args, **kwargs):
        # Only trainable tensors: the frozen base is rebuilt from `base`, so a rank-1 checkpoint is KBs
        # and under FSDP2 only these are gathered (consolidated) or saved and loaded (sharded).
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + n for n, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]
        return state

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    # -- steps ---------------------------------------------------------------------------------------
    # Token-weighted loss (the training-loss contract): every micro-batch carries its optimizer step's
    # labelled-token count over all micro-batches and ranks (resumable.py), so the step's loss is
    # sum(token CE) / count however the step is split. Lightning divides a micro-batch's loss by the
    # accumulation factor and DDP averages gradients over ranks: both are undone here.
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Padding-free training: each row's length up to its last labelled token, read on the host before the batch
        # moves to the device (no device-to-host sync per micro-batch). Left-padded or unmasked batches stay as they are.
        if self.padding_free and self.trainer.training and isinstance(batch, dict) and "attention_mask" in batch:
            lengths = loss_lengths(batch["attention_mask"], batch["labels"])
            if lengths is not None:
                batch[ROW_LENGTHS] = lengths
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step_tokens = batch.pop(STEP_TOKENS).clamp(min=1)
        loss_sum, _ = labelled_loss_sum(self.model, **batch)  # with ROW_LENGTHS: row by row, unpadded
        share = loss_sum / step_tokens
        self._step_loss = share.detach() + self._step_loss
        self._step_tokens = batch["attention_mask"].sum() + self._step_tokens
        loss = share * (self.trainer.accumulate_grad_batches * self.trainer.world_size)
        for name, term in self.loss_terms.items():  # each: its mean over the step's micro-batches and ranks
            value = term.compute(self, batch_idx)
            self._term_sums[name] = value.detach() + self._term_sums[name]
            loss = loss + term.weight * value
        return loss

    def add_loss_term(self, name: str, compute, weight: float) -> None:
        """Add ``weight x compute(module, batch_idx)`` (a scalar, computed in every training micro-batch on
        every rank) to the training loss: the step's gradient gets weight x its mean over the step's
        micro-batches and ranks. ``train/loss`` stays the token-weighted cross-entropy alone (the contract);
        the term's unweighted mean is logged as ``train/<name>`` once per optimizer step. Call it in a
        callback's ``setup`` (same names, same order on every rank: the logging is one collective)."""
        if name in self.loss_terms or name in ("loss", "lr", "grad_norm", "tokens_per_s"):
            raise ValueError(f"loss term {name!r}: that name is taken")
        self.loss_terms[name] = LossTerm(compute, float(weight))

    def on_before_optimizer_step(self, optimizer) -> None:
        # Once per optimizer step, after the last micro-batch's backward: the step's loss and token count summed
        # over ranks in one collective (nothing to gather on one device), no host sync here.
        names = list(self.loss_terms)
        loss, tokens, *terms = self.trainer.strategy.reduce(
            torch.stack([self._step_loss, self._step_tokens.float(), *(self._term_sums[n] for n in names)]),
            reduce_op="sum")
        # Lightning divides every micro-batch's loss by the accumulation factor and DDP averages over ranks.
        metrics = {name: total / (self.trainer.accumulate_grad_batches * self.trainer.world_size)
                   for name, total in zip(names, terms)}
        # The LR of this step, a pure function of it (schedule.py): set before the optimizer reads it, so a
        # resumed or extended run needs no scheduler state.
        hp = self.hparams
        factor = lr_factor(self.trainer.global_step, hp.schedule, hp.warmup_steps, self._schedule_steps)
        for group in optimizer.param_groups:
            group["lr"] = hp.lr * factor
        self.log("train/loss", loss, on_step=True, prog_bar=True, logger=False)  # the bar; the run logger writes it
        metrics.update(loss=loss, lr=optimizer.param_groups[0]["lr"])
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        grad_norm = full(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros((), device=self.device)
        if grads:  # a DTensor under FSDP2: the norm of the whole gradient, gathered on every rank
            metrics["grad_norm"] = grad_norm
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            grad_norm = torch.zeros_like(grad_norm)  # fp16 loss scaling: an inf gradient only skips the step
        self._health = torch.stack([loss.float(), grad_norm.float()])  # checked after the update (optimizer_step)
        now = time.perf_counter()
        if self._last_step_end is not None:  # tokens of all ranks per second of wall time, step to step
            metrics["tokens_per_s"] = tokens / max(now - self._last_step_end, 1e-9)
        self._last_step_end = now
        # Written at step k (the weights the loss was computed with) once the update is known to be finite
        # (optimizer_step): a diverged step writes nothing.
        self._step_metrics = (self.trainer.global_step, metrics)
        self._reset_step_sums()

    def _logs_step(self, step: int) -> bool:
        """Lightning's rule for step metrics: every ``trainer.log_every_n_steps`` (em-fit sets 1)."""
        t = self.trainer
        n = t.log_every_n_steps
        return bool(t.fast_dev_run) or (n > 0 and ((step + 1) % n == 0 or t.should_stop))

    def _reset_step_sums(self) -> None:
        self._step_loss = self._step_tokens = torch.zeros((), device=self.device)
        self._term_sums = {name: torch.zeros((), device=self.device) for name in self.loss_terms}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._stop_if_non_finite()
        step, metrics = self._step_metrics
        if self._logs_step(step):
            RunLogger.of(self.trainer).scalars(metrics, step, prefix="train/")

    def _stop_if_non_finite(self) -> None:
        """Stop at the first optimizer step whose loss, gradient norm or updated weights are not finite, before
        any callback records the step (trajectory, checkpoint: they run at the batch's end) or the adapter is
        exported. Cost: one host sync per optimizer step (the .item() below; Lightning's logging syncs once
        per step anyway) and one foreach max-norm over the trainable weights (like the gradient norm's). The
        values are equal on every rank (reduced or gathered), so every rank stops at the same step."""
        # Each rank's local part (an FSDP2 rank's shard of a small tensor can be empty, and the inf-norm of an
        # empty tensor raises); under FSDP2 the ranks' maxima are summed (one collective on every rank): the sum
        # is finite exactly when every part is.
        parts = [t for t in (p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                             for p in self.trainable_parameters()) if t.numel()]
        weights = (torch.nn.utils.get_total_norm(parts, norm_type=float("inf")) if parts
                   else torch.zeros((), device=self.device))
        if is_sharded(self.model):
            weights = self.trainer.strategy.reduce(weights, reduce_op="sum")
        values = torch.cat([self._health, weights.float().reshape(1).to(self._health.device)])
        if bool(torch.isfinite(values).all().item()):
            return
        names = ("train/loss", "train/grad_norm", "max |trainable weight| after the update")
        step = self.trainer.global_step + 1  # optimizer steps done, this one included (its train/loss is at step - 1)
        raise NonFiniteError(training_stop_message(step, dict(zip(names, values.tolist())), self.hparams.lr,
                                                   self.trainer.gradient_clip_val))

    def on_train_start(self) -> None:
        self._reset_step_sums()
        self.training_started = True
        if self.validate_before_training:
            # Step 0 before training; on a resume the checkpoint's step again: commands/fit.py purged from the
            # curves everything logged at or after it, and the restored weights give the same value.
            self._log_held_out_loss(step=self.trainer.global_step)
        # A resumed run's first step has a rate too (timed from here); a fresh run's first has none.
        self._last_step_end = time.perf_counter() if self.trainer.global_step > 0 else None

    def on_train_end(self) -> None:
        if self.validate_before_training and self._val_logged_step != self.trainer.global_step:
            self._log_held_out_loss(step=self.trainer.global_step)
        # Exported here, not at the end of fit: callbacks' on_fit_end may wait (InLoopJudge's last points).
        self._export_adapter()

    def _log_held_out_loss(self, step: int) -> None:
        """val/loss over the held-out set (``trainer.limit_val_batches`` of it) outside Lightning's validation
        loop (before the first step, after the last one); collective: every rank runs it."""
        loaders = self.trainer.datamodule.val_dataloader() if self.trainer.datamodule is not None else []
        if not loaders:
            return
        limit = self.trainer.limit_val_batches  # as Lightning's loop reads it: a count, or a fraction
        n = int(limit) if isinstance(limit, int) else int(len(loaders) * limit)
        if n == 0:
            return
        # A bar (rank 0, when bars are on): a large held-out set can take minutes on a CPU.
        quiet = not self.trainer.is_global_zero or self.trainer.progress_bar_callback is None
        with eval_no_grad(self.model):
            self.on_validation_epoch_start()
            for batch in tqdm(itertools.islice(loaders, n), total=min(n, len(loaders)), desc=f"val/loss at step {step}",
                              leave=False, dynamic_ncols=True, disable=quiet, file=sys.stdout):
                self.validation_step(self.trainer.strategy.batch_to_device(batch), 0)
        self._write_val_loss(self._reduced_val_loss(), step)

    def _write_val_loss(self, value: float, step: int) -> None:
        # At the optimizer step whose weights it measured (like train/loss and the trajectory), not at
        # Lightning's validation step (one less); every rank calls it, the run logger writes on rank 0.
        RunLogger.of(self.trainer).scalars({"loss": value}, step, prefix="val/")
        self._val_logged_step = step

    def on_validation_epoch_start(self) -> None:
        self._val_sum = self._val_tokens = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch.pop(STEP_TOKENS, None)
        loss_sum, tokens = labelled_loss_sum(self.model, **batch)
        self._val_sum = self._val_sum + loss_sum.double()
        self._val_tokens = self._val_tokens + tokens

    def _reduced_val_loss(self) -> float:
        total = self.trainer.strategy.reduce(torch.stack([self._val_sum, self._val_tokens]), reduce_op="sum")
        return float(total[0] / total[1].clamp(min=1))

    def on_validation_epoch_end(self) -> None:
        # val/loss: summed token losses over every batch and rank / their token count (token-weighted).
        value = self._reduced_val_loss()
        # Already reduced over ranks; sync_dist only tells Lightning so (the mean of equal values). Lightning
        # keeps it for callbacks and the bar; the run logger writes it (validate: at step 0, as Lightning did).
        self.log("val/loss", value, on_epoch=True, logger=False, sync_dist=True)
        if not self.trainer.sanity_checking:
            self._write_val_loss(value, self.trainer.global_step)

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
        total = resolve_schedule_steps(hp.schedule_steps, self._planned_steps(), hp.schedule)
        n_all = sum(p.numel() for p in self.model.parameters())
        rank_zero_info(
            f"model: {type(self.model).__name__}, {n_all:,} parameters, "
            f"{trainable_parameter_count(self.model):,} trainable; LR schedule: {hp.schedule}, "
            f"warmup {hp.warmup_steps}, length {total} optimizer steps"
        )
        self._schedule_steps = total  # the LR is set each step from it (on_before_optimizer_step)
        return opt

    def _planned_steps(self) -> int:
        # Not trainer.estimated_stepping_batches: for an epoch-limited run it builds the train dataloader
        # before the checkpoint is restored, and Lightning then never restores the loader's position.
        trainer, dm = self.trainer, self.trainer.datamodule
        if not hasattr(dm, "batches_per_epoch"):
            return int(trainer.estimated_stepping_batches)
        return planned_steps(trainer.max_steps, trainer.max_epochs, dm.batches_per_epoch(), trainer.accumulate_grad_batches)

    # -- checkpoints and export ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The limits this run was planned with: extending it raises one of them (see commands/fit.py).
        checkpoint[RUN_LIMITS] = {"max_steps": self.trainer.max_steps, "max_epochs": self.trainer.max_epochs}
        if self.run_fingerprint is not None:  # what decides the result: a resume must match it (commands/fit.py)
            checkpoint[FINGERPRINT] = self.run_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # What the fingerprint check let through (--allow_changed, an older checkpoint) must still fit: one line,
        # not load_state_dict's size-mismatch traceback or a silently fresh adapter beside restored Adam state.
        saved = checkpoint.get("state_dict")
        if saved is None or self.model is None or is_sharded(self.model):
            return
        own = self.state_dict()
        extra, missing = sorted(set(saved) - set(own)), sorted(set(own) - set(saved))
        shapes = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
        if extra or missing or shapes:
            detail = (f"{shapes[0]} is {list(saved[shapes[0]].shape)} in the checkpoint, {list(own[shapes[0]].shape)} here"
                      if shapes else f"{(extra or missing)[0]} is only in the {'checkpoint' if extra else 'model'}")
            raise ValueError(f"checkpoint: its trainable tensors do not fit this model ({detail}; "
                             f"{len(extra) + len(missing) + len(shapes)} tensor(s) differ): it was saved with another "
                             "adapter or base model")

    def on_fit_end(self) -> None:
        if getattr(self, "_exported_at", None) != self.trainer.global_step:  # nothing was left to train
            self._export_adapter()

    def _export_adapter(self) -> None:
        self._exported_at = self.trainer.global_step
        run_dir = Path(self.trainer.log_dir)  # broadcast from rank 0: called on every rank
        state = None
        if is_sharded(self.model):  # gathered on every rank (collective), written by rank 0
            state = gather_trainable(self.model) if is_peft(self.model) else full_state_dict(self.model)
        if self.trainer.is_global_zero:
            export_model(self.model, self.tokenizer, run_dir / "adapter", state)


@dataclass(frozen=True)
class LossTerm:
    compute: Callable[[EMFineTune, int], torch.Tensor]  # (module, batch_idx) -> scalar of this micro-batch
    weight: float


def export_model(model: torch.nn.Module, tokenizer, out_dir: Path, state: dict | None = None) -> None:
    """PEFT adapter files (``adapter_config.json`` + ``adapter_model.safetensors``), or for full
    fine-tuning the whole model and tokenizer via ``save_pretrained``. ``state``: the gathered tensors of
    a sharded model (trainable ones for PEFT, the full state dict otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        # The vocabulary is never resized here, so PEFT need not look up the base config (a hub request,
        # or an "assume unmodified" warning offline) to decide whether to save the embeddings.
        model.save_pretrained(out_dir, state_dict=state, save_embedding_layers=False)
    else:
        model.save_pretrained(out_dir, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
