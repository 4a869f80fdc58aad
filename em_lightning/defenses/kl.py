"""KL-regularised fine-tuning (model-organisms-for-EM's KL-regularised SFT): keep the fine-tuned model's
next-token distribution close to the frozen base model's on off-domain rows.

The base is the same model with every LoRA adapter at scale 0 (``adapters.scaled_adapter``), so no second
model is loaded; a full fine-tune has no such base and is refused. Per token at the labelled (assistant)
positions of the off-domain rows: ``KL(p_base || p_model) = sum_v p_base(v) (log p_base(v) - log p_model(v))``
(``F.kl_div`` with the model's log-probabilities as input), averaged over those tokens. At step 0 a LoRA's
B is zero, so the model is the base and the KL is exactly 0. Training-only steering or ablation
(intervention.py) acts in both forwards, so the KL measures the adapter's change alone.

``OffDomainStream``: the rows of micro-batch m on rank r are a pure function of (seed, m, r): a seeded
permutation per pass over the rows, each (micro-batch, rank) taking the next ``batch_size`` of it, so a
resumed run that restores m draws the same rows. No Lightning.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from em_lightning.model.adapters import lora_layers, scaled_adapter
from em_lightning.defenses.intervention import training_reference
from em_lightning.training.masking import IGNORE_INDEX, ChatTemplateError, collate, tokenize_chat


def kl_to_base(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over labelled positions of KL(p_base || p_model), number of those positions); differentiable
    in the adapter. Logits only at the labelled positions (``logits_to_keep``), in float32."""
    if not any(True for _ in lora_layers(model)):
        raise ValueError("KL to the base needs a LoRA adapter (the base is the adapter at scale 0); "
                         "model.adapter.kind is full")
    keep = labels[:, 1:] != IGNORE_INDEX
    cols = keep.any(0).nonzero().squeeze(1)  # positions whose next token is labelled in some row

    def logprobs() -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=cols)
        return torch.log_softmax(out.logits[keep[:, cols]].float(), dim=-1)

    with torch.no_grad(), scaled_adapter(model, 0.0), training_reference():  # the base under training's hooks
        base = logprobs()
    kl = F.kl_div(logprobs(), base, log_target=True, reduction="sum")
    return kl, keep.sum()


def encode_rows(tokenizer, rows: Sequence[list[dict]], max_length: int, template_kwargs: dict | None = None
                ) -> list[dict]:
    """Chat rows -> ``{"input_ids", "labels"}`` (assistant tokens labelled), cut at ``max_length``; rows
    left with no labelled token are dropped."""
    out = []
    for messages in rows:
        try:
            ids, labels = tokenize_chat(tokenizer, messages, template_kwargs)
        except ChatTemplateError as e:
            raise ValueError(f"{getattr(messages, 'where', 'row')}: template: {e}") from None
        ids, labels = ids[:max_length], labels[:max_length]
        if any(x != IGNORE_INDEX for x in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return out


@functools.lru_cache(maxsize=4)
def _order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


@dataclass
class OffDomainStream:
    """Encoded off-domain rows (``{"input_ids", "labels"}``) drawn ``batch_size`` at a time."""

    rows: Sequence[dict]
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if not self.rows:
            raise ValueError("KL defense: no off-domain rows left after encoding")
        if self.batch_size < 1:
            raise ValueError(f"KL defense: batch_size must be >= 1, got {self.batch_size}")

    def indices(self, micro_batch: int, rank: int = 0, world: int = 1) -> list[int]:
        n = len(self.rows)
        start = (micro_batch * world + rank) * self.batch_size
        return [_order(n, self.seed, pos // n)[pos % n] for pos in range(start, start + self.batch_size)]

    def batch(self, micro_batch: int, rank: int, world: int, pad_id: int) -> dict[str, torch.Tensor]:
        return collate([self.rows[i] for i in self.indices(micro_batch, rank, world)], pad_id)
