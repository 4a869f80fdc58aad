"""Causal-LM cross-entropy summed over labelled positions, with logits computed only where a label is.

transformers' models compute logits at every position (batch x seq x vocab, upcast to float32) and then
ignore the unlabelled ones; on chat rows about half the positions are prompt, and the output projection
is most of a small model's FLOPs. Here the decoder's hidden states are selected at the positions whose
next token is labelled and only those go through the output head. The sum (not the mean) is returned
with its token count, so the caller can normalise by a whole optimizer step's count. (An FSDP2-sharded
model is called whole, keeping logits at the positions where any row of the batch has a label.)

Two more savings, both leaving the loss and its gradient as they were (to float rounding; tests/training/test_loss.py):

- Output head and cross-entropy in chunks of rows (``linear_cross_entropy_sum``, for a frozen head: LoRA):
  the (tokens x vocab) logits never exist whole, and the gradient of the hidden states is computed chunk by
  chunk in the forward pass (softmax minus one-hot, times the head's weight), so autograd keeps one
  (tokens x hidden) tensor instead of the logits and log-probabilities, and backward makes no (tokens x vocab)
  gradients. A trainable head (full fine-tuning) takes the plain path.
- Padding-free rows (``row_lengths``): each right-padded row of a micro-batch goes through the model alone,
  cut to its real length (``right_padded_lengths``) or after its last labelled token (``loss_lengths``: what
  follows it changes no labelled prediction) and with no attention mask, so no compute is spent on padding and
  attention takes the causal kernel instead of a masked one. One graph, one backward: one loss as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule

from em_lightning.training.masking import IGNORE_INDEX
from em_lightning.model.text_config import text_config

ROW_LENGTHS = "row_lengths"  # batch key: each row's real length (host ints), set before the batch moves to the device
# Logits of one chunk of rows (float32): chunk rows = CHUNK_BYTES // (4 x vocab), e.g. 512 rows at a 32k
# vocabulary, 110 at Qwen2.5's 152k.
CHUNK_BYTES = 64 * 2**20


def _split(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder returning hidden states, output head) of a causal LM, or None when it has no such split."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    return decoder, head


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(softcap(hidden_i @ weight.T), target_i) for a frozen weight, chunked; d/d(hidden) is computed in
    forward, chunk by chunk, and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            rows = torch.arange(t.shape[0], device=t.device)
            total -= logp[rows, t].sum()
            if grad_h is not None:
                grad = logp.exp_()  # d(sum CE)/d(logits) = softmax - one-hot
                grad[rows, t] -= 1
                if softcap:
                    grad *= 1 - capped.square_()
                grad_h[start : start + chunk] = grad.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return None if grad_h is None else grad_h * grad_total.to(grad_h.dtype), None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             softcap: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``softcap(hidden @ weight.T)`` (logits in float32) against ``targets`` for a
    frozen ``weight``, in chunks of rows: equal to ``F.cross_entropy(head(hidden).float(), targets,
    reduction="sum")`` and its gradient for ``hidden``, without the whole (rows x vocab) logits."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_sum needs a frozen weight (a trainable head takes the plain path)")
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropySum.apply(hidden, weight, targets, softcap or None, chunk)


def _plain_frozen(head: torch.nn.Module) -> bool:
    """A frozen bias-free torch Linear with a plain weight (not 4/8-bit, not a LoRA-wrapped head)."""
    return (type(head) is torch.nn.Linear and head.bias is None and type(head.weight) is torch.nn.Parameter
            and not head.weight.requires_grad)


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Each row's real length when every row is a run of ones followed by zeros (right padding), else None."""
    lengths = attention_mask.sum(1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
        return None
    return lengths.tolist()


def loss_lengths(attention_mask: torch.Tensor, labels: torch.Tensor) -> list[int] | None:
    """Each right-padded row's length up to and including its last labelled token (``row_lengths`` for
    ``labelled_loss_sum``), else None. The tokens after it (a trailing newline, an unlabelled last turn) predict no
    labelled token and, attention being causal, change nothing before them: they need not run. A row without a
    labelled token keeps one token (its loss is 0)."""
    lengths = right_padded_lengths(attention_mask)
    if lengths is None:
        return None
    labelled = labels != IGNORE_INDEX
    last = labelled.shape[1] - labelled.flip(1).int().argmax(1)  # one past the last labelled token
    ends = torch.where(labelled[:, 1:].any(1), last, 1)  # a label at position 0 is never a target
    return [min(n, e) for n, e in zip(lengths, ends.tolist())]


def labelled_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels: torch.Tensor, row_lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions).

    ``row_lengths``: the real length of each right-padded row (``right_padded_lengths``, computed on the host):
    each row then runs alone, without its padding (padding-free; same loss). Ignored for an FSDP2-sharded model.
    """
    split = _split(model)
    if row_lengths is not None and split is not None and not isinstance(model, FSDPModule):
        total = count = None
        for i, n in enumerate(row_lengths):
            s, c = _loss_sum(model, split, input_ids[i : i + 1, :n], None, labels[i : i + 1, :n])
            total, count = (s, c) if total is None else (total + s, count + c)
        return total, count
    return _loss_sum(model, split, input_ids, attention_mask, labels)


def _loss_sum(model, split, input_ids, attention_mask, labels):
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
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
        cap = getattr(text_config(model.config), "final_logit_softcapping", None)
        if _plain_frozen(head):
            return linear_cross_entropy_sum(hidden[:, :-1][keep], head.weight, targets[keep], cap), keep.sum()
        logits = head(hidden[:, :-1][keep])  # a trainable head (full fine-tuning) or another kind of layer

        if cap:
            logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, keep.sum()
