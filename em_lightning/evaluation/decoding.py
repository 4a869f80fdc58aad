"""The decode loop: batched, KV-cached, with per-row randomness.

Why not ``model.generate``: its sampling draws from one global RNG over the whole batch, so an answer
depends on which other rows share the batch (and, under sharding, on the number of ranks). Here every row
owns a ``random.Random`` seeded by the caller, and a token is drawn by inverse-CDF sampling with one
uniform number per row and step -- the same distribution as ``torch.multinomial`` at a fraction of its
random-number cost. Logits are processed like transformers does (repetition penalty, then temperature,
top-k, top-p, min-p, using transformers' own warpers), so a row's answer is a function of its prompt, its
seed and the settings only. (Batched forwards may round differently from unbatched ones at the last bit;
a token flips only if a uniform lands within that rounding of a CDF boundary.)

Prompts shared by several rows are prefilled once and the cache rows are then repeated
(``DynamicCache.batch_select_indices`` with repeated indices).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class DecodeSettings:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0  # 1 = off
    max_new_tokens: int = 600


def _forward_names(model: torch.nn.Module) -> tuple[str, bool]:
    """The cache keyword of this transformers version (``cache`` in 5.2x, ``past_key_values`` before)
    and whether forward takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrapper
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _warpers(s: DecodeSettings) -> list:
    """Same warpers, same order as transformers' ``_get_logits_processor`` for sampling."""
    out = []
    if s.temperature != 1.0:
        out.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k:
        out.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=1))
    if s.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=1))
    if s.min_p is not None and s.min_p > 0:
        out.append(MinPLogitsWarper(min_p=s.min_p, min_tokens_to_keep=1))
    return out


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor with a (rows, vocab) mask of tokens already present."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def sample_inverse_cdf(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores), using the row's uniform number in [0, 1)."""
    probs = torch.softmax(scores.float(), dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    # Keep the target strictly below the total mass, so the token found has positive probability.
    target = torch.minimum(uniforms.to(cdf)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=scores.shape[-1] - 1)


def decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[int],
    rngs: Sequence[random.Random],
    settings: DecodeSettings,
    eos_ids: Sequence[int],
    pad_id: int,
    all_done: Callable[[bool], bool] | None = None,
) -> list[tuple[list[int], bool]]:
    """Generate for ``rows`` (each an index into ``prompts``, token id lists); returns per row the new
    tokens (without the stop token) and whether it stopped at an eos.

    ``all_done(local_done) -> global_done`` lets ranks keep stepping together (FSDP); it is called once
    per step after the first, identically on every rank. Call under ``torch.no_grad()`` in eval mode.
    """
    device = next(model.parameters()).device
    cache_kw, has_keep = _forward_names(model)
    keep = {"logits_to_keep": 1} if has_keep else {}
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: the last column is every prompt's last token
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache}, **keep)

    # Expand the prefilled prompts to their rows (repeated indices copy the cache rows).
    sel = torch.tensor(list(rows), dtype=torch.long, device=device)
    cache.batch_select_indices(sel)
    logits = out.logits[:, -1, :][sel].float()
    mask, next_pos = mask[sel], mask[sel].sum(-1)
    n_rows, vocab = logits.shape
    seen = None
    if settings.repetition_penalty != 1.0:  # prompt tokens count, padding does not (as transformers 5)
        counts = torch.zeros((n_rows, vocab), dtype=torch.int32, device=device)
        seen = counts.scatter_add_(1, ids[sel], mask.int()) > 0
    warpers = [] if settings.temperature == 0 else _warpers(settings)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    arange = torch.arange(n_rows, device=device)
    steps: list[torch.Tensor] = []
    for t in range(settings.max_new_tokens):
        scores = logits if seen is None else apply_repetition_penalty(logits, seen, settings.repetition_penalty)
        if settings.temperature == 0:
            nxt = scores.argmax(-1)
        else:
            for w in warpers:
                scores = w(None, scores)
            # Every row draws one number per step, finished or not: a row's stream never depends on others.
            u = torch.tensor([r.random() for r in rngs], dtype=torch.float64, device=device)
            nxt = sample_inverse_cdf(scores, u)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        steps.append(nxt)
        finished |= torch.isin(nxt, eos)
        if t == settings.max_new_tokens - 1:
            break
        done = bool(finished.all())
        if all_done is not None:
            done = all_done(done)
        if done:
            break
        if seen is not None:
            seen[arange, nxt] = True
        mask = torch.cat([mask, mask.new_ones((n_rows, 1))], dim=1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_kw: cache},
            **keep,
        )
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :].float()

    tokens = torch.stack(steps, dim=1).tolist()
    eos_set = set(eos.tolist())
    results = []
    for row in tokens:
        stop = next((i for i, tok in enumerate(row) if tok in eos_set), None)
        results.append((row, False) if stop is None else (row[:stop], True))
    return results
