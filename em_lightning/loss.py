"""Causal-LM cross-entropy summed over labelled positions, with logits computed only where a label is.

transformers' models compute logits at every position (batch x seq x vocab, upcast to float32) and then
ignore the unlabelled ones; on chat rows about half the positions are prompt, and the output projection
is most of a small model's FLOPs. Here the decoder's hidden states are selected at the positions whose
next token is labelled and only those go through the output head. The sum (not the mean) is returned
with its token count, so the caller can normalise by a whole optimizer step's count. (An FSDP2-sharded
model is called whole, keeping logits at the positions where any row of the batch has a label.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule

from em_lightning.masking import IGNORE_INDEX


def text_config(config):
    """The language model's settings: ``text_config`` of multimodal configs (Gemma-3-it), else the config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _split(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder returning hidden states, output head) of a causal LM, or None when it has no such split."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    return decoder, head


def labelled_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    split = _split(model)
    if isinstance(model, FSDPModule):
        # A sharded root gathers its own parameters (embeddings, head) only inside its forward: go through
        # it, keeping the logits of the positions where any row has a label.
        cols = keep.any(0).nonzero().squeeze(1)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=cols)
        logits = out.logits[keep[:, cols]]
    elif split is None:  # an architecture without decoder/head attributes: full logits, same result
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][keep]
    else:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
        cap = getattr(text_config(model.config), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, keep.sum()
