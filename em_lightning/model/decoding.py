"""The decode loop: batched, KV-cached, with per-row randomness.

Why not ``model.generate``: its sampling draws from one global RNG over the whole batch, so an answer
depends on which other rows share the batch (and, under sharding, on the number of ranks). Here every row
has its own 64-bit seed, and a token is drawn by inverse-CDF sampling with one uniform number per row and
step -- the same distribution as ``torch.multinomial`` at a fraction of its random-number cost.

Random numbers (``row_uniforms``): the uniform of row r at step t is a pure function of (seed_r, t), the
t-th output of SplitMix64 started at seed_r, computed for all rows and steps at once with int64 tensor
ops (wrapping multiplication, masked shifts; integer ops only, so no device-dependent rounding -- checked
bit-exact against a Python SplitMix64 on CPU), no per-row Python work, and a row's stream does not depend
on which other rows run, or whether they have finished. (Before ``SAMPLER`` v2 each row drew from a
``random.Random``: the same seeds now give other answers, from the same distribution.)

Logits are processed like transformers does (repetition penalty, then temperature, top-k, top-p, min-p,
same rules and order as its warpers). When top-k is on (transformers fills top_k 50 when nothing sets it),
everything after the top-k runs on the k candidates only -- not on the whole vocabulary -- with the
candidates ordered by token id, so the inverse CDF picks the same token as one over the full, masked
vocabulary would. Tokens tied with the k-th score are kept too (as transformers does): 16 more candidates
are fetched, and only a row whose ties run past them is handled on its full vocabulary row, so the kept
set is always transformers'. So a row's answer is a
function of its prompt, its seed and the settings only. (Batched forwards may round differently from
unbatched ones at the last bit; a token flips only if a uniform lands within that rounding of a CDF
boundary. Temperature is applied to the candidates after the top-k: equal to transformers' order except
where dividing by it rounds two different scores at the k-th place to one value.)

Prompts shared by several rows are prefilled once and the cache rows are then repeated
(``DynamicCache.batch_select_indices`` with repeated indices); the attention mask and the full-attention
KV cache are allocated once for the whole decode (no per-step concatenation); the repetition penalty
gathers and scatters only the tokens each row has seen; rows that have stopped are dropped from the batch
(and its cache) once they are an eighth of it -- under lockstep decoding (FSDP) a rank whose rows have all
stopped keeps stepping its last batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from em_lightning.model.padding import pad_sequences

SAMPLER = "inverse-cdf/splitmix64-v2"  # written to each point's settings: which random scheme made the answers
TIE_SLACK = 16  # candidates fetched beyond top_k (bf16 ties at the k-th value: 69% of SmolLM2's rows)

_M64 = (1 << 64) - 1
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


@dataclass(frozen=True)
class DecodeSettings:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0  # 1 = off
    max_new_tokens: int = 600


# -- random numbers ---------------------------------------------------------------------------------------
def _int64(x: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def row_uniforms(seeds: Sequence[int] | torch.Tensor, steps: int, start: int = 0, device=None) -> torch.Tensor:
    """(rows, steps) float64 uniforms in [0, 1): entry [r, j] is output ``start + j`` of SplitMix64 seeded
    with ``seeds[r]`` (53 high bits / 2**53). A pure function of (seed, index), identical on any device."""
    if not isinstance(seeds, torch.Tensor):
        seeds = torch.tensor([_int64(int(s)) for s in seeds], dtype=torch.int64)
    seeds = seeds.to(device=device if device is not None else seeds.device, dtype=torch.int64)
    t = torch.arange(start + 1, start + steps + 1, dtype=torch.int64, device=seeds.device)
    z = seeds[:, None] + t[None, :] * _int64(_GAMMA)  # int64 arithmetic wraps: mod 2**64, as SplitMix64
    z = (z ^ _srl(z, 30)) * _int64(_MIX1)
    z = (z ^ _srl(z, 27)) * _int64(_MIX2)
    z = z ^ _srl(z, 31)
    return _srl(z, 11).to(torch.float64) * 2.0**-53


# -- logits processing ------------------------------------------------------------------------------------
def _forward_names(model: torch.nn.Module) -> tuple[str, bool]:
    """The cache keyword of this transformers version (``cache`` in 5.2x, ``past_key_values`` before)
    and whether forward takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrapper
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor with a (rows, vocab) mask of tokens already present."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def penalise_seen_(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """The same, in place, from a (rows, n) tensor of token ids each row has seen (repeats allowed; every id
    must be a real token of its row: a repeat stands in for padding). Touches n entries per row, not the
    vocabulary -- the gather/where/scatter of transformers' processor."""
    got = scores.gather(1, history)
    return scores.scatter_(1, history, torch.where(got < 0, got * penalty, got / penalty))


def topk_blocked(x: torch.Tensor, k: int, blocks: Sequence[int] = (64, 32, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k)`` values (descending) and indices of a (rows, n) tensor, in fewer element visits:
    the k blocks with the largest maxima hold the k largest values, so only they are searched (recursively).
    Same values as torch.topk; among tied values the indices may differ (torch.topk promises no order)."""
    rows, n = x.shape
    b = next((b for b in blocks if n % b == 0 and n // b >= 4 * k), None)
    if b is None or not x.is_contiguous() or x.device.type != "cpu":  # GPUs: one topk kernel beats several
        return torch.topk(x, k, dim=-1)
    nb = n // b
    _, top_blocks = topk_blocked(x.view(rows, nb, b).amax(dim=-1), k, blocks)
    flat = (top_blocks + torch.arange(rows, device=x.device)[:, None] * nb).view(-1)
    vals, j = topk_blocked(x.view(rows * nb, b).index_select(0, flat).view(rows, k * b), k, blocks)
    return vals, top_blocks.gather(1, torch.div(j, b, rounding_mode="floor")) * b + j % b


def _warp_candidates(vals: torch.Tensor, s: DecodeSettings) -> torch.Tensor:
    """Temperature, top-p, min-p on candidate scores (-inf = removed), the rules of transformers' warpers."""
    if s.temperature != 1.0:
        vals = vals / s.temperature
    if s.top_p < 1.0:
        sorted_vals, order = torch.sort(vals, descending=False)
        cumulative = sorted_vals.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - s.top_p)
        drop_sorted[..., -1:] = False  # min_tokens_to_keep = 1
        vals = vals.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if s.min_p is not None and s.min_p > 0:
        probs = vals.softmax(dim=-1)
        drop = probs < s.min_p * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        vals = vals.masked_fill(drop, float("-inf"))
    return vals


def candidate_groups(
    scores: torch.Tensor, s: DecodeSettings
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]]:
    """The warped candidates of every row, in groups: (row indices or None = all rows, candidate scores
    (rows, m) with -inf for removed ones, their token ids in ascending order (rows, m) or None = the whole
    vocabulary in order). Rows whose top-k boundary ties run past the fetched candidates come as their own
    full-vocabulary group."""
    vocab = scores.shape[-1]
    k = s.top_k if 0 < s.top_k < vocab else 0  # transformers: min(top_k, vocab); k >= vocab keeps all
    if not k:
        yield None, _warp_candidates(scores, s), None
        return
    # transformers keeps every token scoring >= the k-th value. bf16 logits tie there in most rows, so
    # TIE_SLACK more are fetched and those below the k-th value removed; only a row whose ties may run past
    # them (its last fetched score equals the k-th) needs its full vocabulary row.
    m = min(k + TIE_SLACK, vocab)
    vals, idx = topk_blocked(scores, m)  # descending
    kth = vals[:, k - 1 : k]
    tie = (vals[:, -1] == kth[:, 0]) & (kth[:, 0] > float("-inf")) & (m < vocab)
    idx, order = idx.sort(dim=-1)  # token order: the CDF walks the vocabulary like the full one
    vals = vals.gather(1, order)
    vals = vals.masked_fill(vals < kth, float("-inf"))
    if not bool(tie.any()):
        yield None, _warp_candidates(vals, s), idx
        return
    plain, tied = (~tie).nonzero().squeeze(1), tie.nonzero().squeeze(1)
    if plain.numel():
        yield plain, _warp_candidates(vals[plain], s), idx[plain]
    full = scores[tied]
    yield tied, _warp_candidates(full.masked_fill(full < kth[tied], float("-inf")), s), None


def sample_inverse_cdf(scores: torch.Tensor, uniforms: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(scores), using the row's uniform number in [0, 1); ``ids`` maps
    columns to token ids (None: column = token id)."""
    cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    # Keep the target strictly below the total mass, so the token found has positive probability.
    target = torch.minimum(uniforms.to(cdf)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    col = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.shape[-1] - 1)
    return (col if ids is None else ids.gather(1, col)).squeeze(-1)


def sample_tokens(scores: torch.Tensor, uniforms: torch.Tensor, s: DecodeSettings) -> torch.Tensor:
    """One token per row: transformers' sampling warpers (temperature, top-k, top-p, min-p; repetition
    penalty already applied), then inverse CDF with the row's uniform. Row i depends on row i only."""
    out = None
    for rows, vals, ids in candidate_groups(scores, s):
        if rows is None:
            return sample_inverse_cdf(vals, uniforms, ids)
        if out is None:
            out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        out[rows] = sample_inverse_cdf(vals, uniforms[rows], ids)
    return out


def candidate_probs(scores: torch.Tensor, s: DecodeSettings) -> torch.Tensor:
    """The (rows, vocab) distribution ``sample_tokens`` draws from (for tests and diagnostics)."""
    out = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    for rows, vals, ids in candidate_groups(scores, s):
        probs = torch.softmax(vals.double(), dim=-1)
        rows = torch.arange(scores.shape[0], device=scores.device) if rows is None else rows
        if ids is None:
            out[rows] = probs
        else:
            out[rows[:, None], ids] = probs
    return out


# -- the loop ---------------------------------------------------------------------------------------------
class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer that writes each step into a buffer sized for the whole decode and hands
    out views of its filled part, instead of concatenating (copying the whole cache) every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0
        self._k = self._v = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._k is None or end > self._k.shape[-2]:  # first call, or beyond the planned size: grow
            cap = max(self.capacity, end)
            k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
            if self.length:
                k[:, :, : self.length] = self.keys
                v[:, :, : self.length] = self.values
            self._k, self._v = k, v
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:  # index_select copies whole rows (advanced indexing went element by element: 9x slower)
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("PreallocatedLayer serves em-lightning's decode loop only")

    crop = batch_repeat_interleave = reorder_cache = offload = _unsupported


def _new_cache(model: torch.nn.Module, capacity: int) -> DynamicCache:
    """A DynamicCache whose plain full-attention layers preallocate ``capacity`` positions (sliding-window
    and other layer kinds stay transformers' own)."""
    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer:
                layers[i] = PreallocatedLayer(capacity)
    return cache


def _history(ids: torch.Tensor, mask: torch.Tensor, vocab: int, extra: int) -> torch.Tensor | None:
    """(rows, width + extra) seen-token ids for the repetition penalty: the prompt, with padding (and ids
    past the model's vocabulary, which transformers skips) replaced by the row's last prompt token; None
    when some row has no usable token there (then the caller uses a full mask)."""
    last = ids[:, -1:]
    if bool((last >= vocab).any()):
        return None
    hist = torch.where(mask.bool() & (ids < vocab), ids, last)
    return torch.cat([hist, last.expand(-1, extra)], dim=1)


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[int],
    seeds: Sequence[int],
    settings: DecodeSettings,
    eos_ids: Sequence[int],
    pad_id: int,
    all_done: Callable[[bool], bool] | None = None,
) -> list[tuple[list[int], bool]]:
    """Generate for ``rows`` (each an index into ``prompts``, token id lists), row i with the 64-bit seed
    ``seeds[i]``; returns per row the new tokens (without the stop token) and whether it stopped at an eos.

    ``all_done(local_done) -> global_done`` lets ranks keep stepping together (FSDP); it is called once
    per step after the first, identically on every rank. Call under ``torch.no_grad()`` in eval mode.
    """
    device = next(model.parameters()).device
    cache_kw, has_keep = _forward_names(model)
    keep = {"logits_to_keep": 1} if has_keep else {}
    n_new = settings.max_new_tokens
    ids, mask = pad_sequences(prompts, pad_id, "left", device)
    width = ids.shape[1]
    positions = padded_positions(mask)
    cache = _new_cache(model, width + n_new)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache}, **keep)

    # Expand the prefilled prompts to their rows (repeated indices copy the cache rows).
    sel = torch.tensor(list(rows), dtype=torch.long, device=device)
    cache.batch_select_indices(sel)
    n_rows, vocab = len(sel), out.logits.shape[-1]
    # fp32 logits go into one buffer for the whole decode: a fresh (rows, vocab) fp32 tensor each step is
    # over glibc's mmap threshold at 200 rows, so each step paid page faults (20 ms vs 2 ms per copy).
    logits_buf = torch.empty((n_rows, vocab), dtype=torch.float32, device=device)
    logits = logits_buf.copy_(out.logits[:, -1, :].index_select(0, sel))
    attn = torch.ones((n_rows, width + n_new), dtype=torch.long, device=device)  # generated columns: all 1
    attn[:, :width] = mask[sel]
    next_pos = mask[sel].sum(-1)
    penalty = settings.repetition_penalty
    hist = seen = None
    if penalty != 1.0:  # prompt tokens count, padding does not (as transformers 5)
        hist = _history(ids[sel], mask[sel], vocab, n_new)
        if hist is None:
            counts = torch.zeros((n_rows, vocab), dtype=torch.int32, device=device)
            real = (mask[sel].bool() & (ids[sel] < vocab)).int()
            seen = counts.scatter_add_(1, ids[sel].clamp(max=vocab - 1), real) > 0
    greedy = settings.temperature == 0
    uniforms = None if greedy else row_uniforms(seeds, n_new, device=device)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    tokens = torch.full((n_rows, n_new), pad_id, dtype=torch.long, device=device)
    live = torch.arange(n_rows, device=device)  # the original row of each batch row
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    for t in range(n_new):
        if hist is not None:
            logits = penalise_seen_(logits, hist[:, : width + t], penalty)
        elif seen is not None:
            logits = apply_repetition_penalty(logits, seen, penalty)
        nxt = logits.argmax(-1) if greedy else sample_tokens(logits, uniforms[:, t], settings)
        tokens[live, t] = nxt  # a row's tokens after its eos are cut below
        finished |= torch.isin(nxt, eos)
        if t == n_new - 1:
            break
        n_done = int(finished.sum())
        done = n_done == len(live)
        if all_done is not None:
            done = all_done(done)
        if done:
            break
        # Drop stopped rows once they are an eighth of the batch (one cache copy each time); with nothing
        # left (ranks stepping together) keep the batch as it is.
        if n_done and n_done < len(live) and 8 * n_done >= len(live):
            kept = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            live, attn, next_pos, nxt = live[kept], attn[kept], next_pos[kept], nxt[kept]
            finished = finished[kept]
            if uniforms is not None:
                uniforms = uniforms[kept]
            if hist is not None:
                hist = hist[kept]
            if seen is not None:
                seen = seen[kept]
        if hist is not None:
            hist[:, width + t] = nxt
        elif seen is not None:
            seen[torch.arange(len(live), device=device), nxt] = True
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attn[:, : width + t + 1],
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_kw: cache},
            **keep,
        )
        next_pos = next_pos + 1
        logits = logits_buf[: len(live)].copy_(out.logits[:, -1, :])

    eos_set = set(eos.tolist())
    results = []
    for row in tokens.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in eos_set), None)
        results.append((row, False) if stop is None else (row[:stop], True))
    return results
