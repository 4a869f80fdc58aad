"""KLToBase: the KL defense (callbacks/defenses/kl.yaml). Adds ``weight x KL(p_base || p_model)`` on a
stream of off-domain rows to every training micro-batch's loss (``EMFineTune.add_loss_term``), the base being
the adapter at scale 0; logs ``train/kl`` (the unweighted mean per labelled token) beside the unchanged
``train/loss``. The math and the row stream are in ``defenses/kl.py``; the stream position is checkpointed,
so a resumed run draws the same rows."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from em_lightning.defenses.kl import OffDomainStream, encode_rows, kl_to_base
from em_lightning.training.rows import read_rows


class KLToBase(Callback):
    affects_training = True  # the resume fingerprint includes these init args

    def __init__(self, rows: str | list[str], weight: float = 1.0, batch_size: int = 2, max_length: int = 512,
                 seed: int = 0, name: str = "kl"):
        """
        Args:
            rows: JSONL chat rows (the data-rows contract) off the training domain; the KL is taken at their
                assistant tokens.
            weight: multiplier of the KL term in the loss (model-organisms used 1e5 on Qwen3-14B; the scale
                that matters depends on the model and the data).
            batch_size: off-domain rows per training micro-batch on each rank (one extra forward with and
                one without gradient per micro-batch).
            max_length: off-domain rows are cut to this many tokens.
            seed: seed of the off-domain rows' order.
            name: logged as ``train/<name>``.
        """
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ValueError(f"KLToBase.weight: expected a number >= 0, got {weight!r}")
        if batch_size < 1 or max_length < 2:
            raise ValueError("KLToBase: need batch_size >= 1 and max_length >= 2")
        self.files = [rows] if isinstance(rows, str) else list(rows)
        self.rows = read_rows(self.files, None, "train")  # bad files fail here (file:line), before training
        self.weight, self.batch_size, self.max_length, self.seed, self.name = float(weight), batch_size, max_length, seed, name
        self.consumed = 0  # training micro-batches that drew off-domain rows (checkpointed)
        self._stream: OffDomainStream | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed = int(state_dict.get("consumed", 0))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.name not in pl_module.loss_terms:
            pl_module.add_loss_term(self.name, self._compute, self.weight)

    def _compute(self, module, batch_idx: int) -> torch.Tensor:
        if self._stream is None:  # the tokenizer exists once the model is configured
            dm = module.trainer.datamodule
            rows = encode_rows(module.tokenizer, self.rows, self.max_length, getattr(dm, "template_kwargs", None))
            self._stream = OffDomainStream(rows, self.batch_size, self.seed)
        trainer = module.trainer
        batch = self._stream.batch(self.consumed, trainer.global_rank, trainer.world_size, module.tokenizer.pad_token_id)
        self.consumed += 1
        kl_sum, tokens = kl_to_base(module.model, **{k: v.to(module.device) for k, v in batch.items()})
        return kl_sum / tokens.clamp(min=1)
