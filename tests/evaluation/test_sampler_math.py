"""The sampler's pieces without a model: counter-based uniforms, the top-k candidate path against
transformers' warpers, the blocked top-k, the repetition penalty, and the drawn distribution against
torch.multinomial (fixed seeds: every number here is deterministic)."""

import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from em_lightning.model.decoding import (
    DecodeSettings,
    PreallocatedLayer,
    apply_repetition_penalty,
    candidate_probs,
    penalise_seen_,
    row_uniforms,
    sample_inverse_cdf,
    sample_tokens,
    topk_blocked,
)
from em_lightning.evaluation.sampling import row_seed

M64 = (1 << 64) - 1


def splitmix64(seed: int, n: int) -> list[float]:
    """The textbook SplitMix64 stream in Python integers, as 53-bit uniforms."""
    out, state = [], seed & M64
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        out.append((z >> 11) * 2.0**-53)
    return out


def warped_like_transformers(scores: torch.Tensor, s: DecodeSettings) -> torch.Tensor:
    """transformers' sampling warpers, its order (``_get_logits_processor``), on the full vocabulary."""
    if s.temperature != 1.0:
        scores = TemperatureLogitsWarper(s.temperature)(None, scores)
    if s.top_k:
        scores = TopKLogitsWarper(s.top_k)(None, scores)
    if s.top_p < 1.0:
        scores = TopPLogitsWarper(s.top_p)(None, scores)
    if s.min_p:
        scores = MinPLogitsWarper(s.min_p)(None, scores)
    return scores


# ---- uniforms -------------------------------------------------------------------------------------------

def test_row_uniforms_are_splitmix64_streams_of_the_row_seed():
    seeds = [0, 1, 5, M64, 1 << 63, (1 << 63) - 1] + [random.Random(i).getrandbits(64) for i in range(20)]
    u = row_uniforms(seeds, 40)
    assert u.dtype == torch.float64 and u.shape == (len(seeds), 40)
    assert u.tolist() == [splitmix64(s, 40) for s in seeds]  # bit-exact: int64 wrap-around = mod 2**64
    assert torch.equal(row_uniforms(seeds, 15, start=25), u[:, 25:])  # a pure function of (seed, index)
    assert torch.equal(row_uniforms(seeds[7:8], 40), u[7:8])  # independent of the other rows
    assert torch.equal(row_uniforms(torch.tensor([5, -1]), 40), u[[2, 3]])  # int64 bits = the same seed
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0


def test_row_uniforms_are_uniform_and_uncorrelated():
    seeds = [row_seed(0, 3, "q", 0, i) for i in range(500)]
    u = row_uniforms(seeds, 400).flatten()  # 200k numbers: 500 rows x 400 steps
    counts = torch.histc(u.float(), bins=100, min=0.0, max=1.0)
    expected = u.numel() / 100
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 99 + 5 * (2 * 99) ** 0.5  # df 99: mean 99, sd 14; far in the tail would be ~170
    pairs = row_uniforms(seeds, 400)
    lag1 = torch.corrcoef(torch.stack([pairs[:, :-1].flatten(), pairs[:, 1:].flatten()]))[0, 1]
    rows = torch.corrcoef(torch.stack([pairs[:-1].flatten(), pairs[1:].flatten()]))[0, 1]
    assert abs(float(lag1)) < 0.01 and abs(float(rows)) < 0.01  # sd of r at n=200k: 0.0022


# ---- logits processing ----------------------------------------------------------------------------------

SETTINGS = [
    DecodeSettings(top_k=50),
    DecodeSettings(top_k=20, temperature=0.7),
    DecodeSettings(top_k=50, top_p=0.9),
    DecodeSettings(top_k=40, top_p=0.5, temperature=1.3),
    DecodeSettings(top_k=50, min_p=0.05),
    DecodeSettings(top_k=1),
    DecodeSettings(top_k=10_000),  # >= vocab: keeps all, as transformers' min(top_k, vocab)
    DecodeSettings(),  # top_k 0: the whole vocabulary
    DecodeSettings(top_p=0.8, temperature=0.5),
    DecodeSettings(min_p=0.1, temperature=1.5),
    DecodeSettings(top_k=30, top_p=0.95, min_p=0.02, temperature=0.9),
]


def _random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def assert_same_kept_sets_up_to_boundary_ties(scores: torch.Tensor, got: torch.Tensor, expected: torch.Tensor):
    """Row by row: the kept sets have the same size and the same boundary (lowest kept) score, and the tokens
    kept by one side only all score exactly that boundary (top-p on tied scores: which of the tied tokens
    fill the last places follows the sort, and transformers' sort is not stable); the kept probabilities
    agree as multisets (tied tokens have equal probabilities) and so do the kept masses of the input."""
    before = torch.softmax(scores.double(), dim=-1)
    for r in range(scores.shape[0]):
        ours, theirs = got[r] > 0, expected[r] > 0
        assert int(ours.sum()) == int(theirs.sum()), r
        boundary = scores[r][theirs].min()
        assert scores[r][ours].min() == boundary, r
        assert bool((scores[r][ours ^ theirs] == boundary).all()), r
        assert torch.allclose(got[r][ours].sort().values, expected[r][theirs].sort().values, rtol=1e-6, atol=1e-12)
        assert float(before[r][ours].sum()) == pytest.approx(float(before[r][theirs].sum()), rel=1e-12)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-rounded"])  # bf16: ties at the k-th value
@pytest.mark.parametrize("vocab", [1000, 8192])
@pytest.mark.parametrize("s", SETTINGS, ids=repr)
def test_candidates_are_transformers_warpers(s, vocab, bf16):
    scores = _random_logits(48, vocab, seed=vocab)
    if bf16:
        scores = scores.to(torch.bfloat16).float()
    expected = torch.softmax(warped_like_transformers(scores, s).double(), dim=-1)
    got = candidate_probs(scores, s)
    u = row_uniforms(range(48), 8)
    if bf16 and s.top_p < 1.0:  # top-p on tied scores: the same set up to which tied tokens fill the boundary
        assert_same_kept_sets_up_to_boundary_ties(scores, got, expected)
        for t in range(8):  # the drawn token follows the distribution candidate_probs reports
            assert torch.equal(sample_tokens(scores, u[:, t], s), sample_inverse_cdf(got.log(), u[:, t]))
        return
    assert torch.equal(got > 0, expected > 0)  # the same kept set
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-12)
    # The same token for the same uniform as an inverse CDF over the full masked vocabulary.
    for t in range(8):
        full = sample_inverse_cdf(warped_like_transformers(scores, s), u[:, t])
        assert torch.equal(sample_tokens(scores, u[:, t], s), full)


def test_top_p_on_tied_scores_keeps_transformers_count():
    """Hand-made ties at the top-p boundary: 8 equal scores of which transformers keeps some, not all and not
    none; ours keeps as many, all from the tied group."""
    s = DecodeSettings(top_p=0.5)
    scores = torch.full((1, 40), -5.0)
    scores[0, [2, 9, 13, 20, 21, 30, 33, 39]] = 1.0  # 8 tied tokens carry almost all the mass
    expected = torch.softmax(warped_like_transformers(scores, s).double(), dim=-1)
    got = candidate_probs(scores, s)
    kept = int((expected > 0).sum())
    assert 1 < kept < 8  # the boundary cuts through the tied group
    assert_same_kept_sets_up_to_boundary_ties(scores, got, expected)


def test_ties_at_the_top_k_boundary_keep_every_tied_token():
    s = DecodeSettings(top_k=5)
    scores = _random_logits(6, 300, seed=1)
    scores[0, [3, 50, 120, 200, 250, 299]] = 20.0  # six tokens tie for the top 5: all kept (transformers)
    scores[1, [7, 8]] = torch.tensor([30.0, 30.0])  # ties inside the top 5: nothing special
    top = scores[2].topk(5).values
    scores[2, scores[2].topk(6).indices[5]] = top[4]  # the 5th and 6th tie
    scores[3, 100:140] = scores[3].topk(5).values[4]  # 41 ties at the 5th place: more than the fetched slack
    expected = torch.softmax(warped_like_transformers(scores, s).double(), dim=-1)
    got = candidate_probs(scores, s)
    assert int((got[0] > 0).sum()) == 6 and int((got[2] > 0).sum()) >= 6 and int((got[3] > 0).sum()) >= 41
    assert torch.equal(got > 0, expected > 0) and torch.allclose(got, expected, rtol=1e-6, atol=1e-12)
    u = row_uniforms(range(6), 50)
    for t in range(50):  # tie rows and plain rows drawn in one call give the single-row answers
        both = sample_tokens(scores, u[:, t], s)
        assert all(int(both[r]) == int(sample_tokens(scores[r : r + 1], u[r : r + 1, t], s)) for r in range(6))


@pytest.mark.parametrize("vocab", [32000, 151936, 4064, 8208])  # blocks of 64, 64, 32 then 16, 16
def test_blocked_topk_has_torch_topk_values(vocab):
    x = _random_logits(16, vocab, seed=2)
    x[:, 100:164] = x[:, 5:6]  # a long run of ties inside one block
    x[3] = 0.0  # a row of nothing but ties
    x[4, ::7] = float("-inf")
    for k in (1, 21, 51):
        ref = torch.topk(x, k)
        vals, idx = topk_blocked(x, k)
        assert torch.equal(vals, ref.values) and torch.equal(x.gather(1, idx), vals)
        assert all(len(set(r)) == k for r in idx.tolist())  # k distinct tokens


def test_repetition_penalty_gather_scatter_matches_transformers():
    scores = _random_logits(8, 500, seed=3)
    history = torch.randint(0, 500, (8, 30), generator=torch.Generator().manual_seed(4))
    history[:, 10:15] = history[:, :5]  # repeats are applied once
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone())
    assert torch.equal(penalise_seen_(scores.clone(), history, 1.3), ref)
    seen = torch.zeros(8, 500, dtype=torch.bool).scatter_(1, history, True)
    assert torch.equal(apply_repetition_penalty(scores, seen, 1.3), ref)


# ---- the drawn distribution -----------------------------------------------------------------------------

def _chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic over the tokens with positive probability (pooled below 5 expected)."""
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize(
    "s,vocab",
    [
        (DecodeSettings(top_k=50), 2000),
        (DecodeSettings(top_k=20, top_p=0.9, temperature=0.8), 2000),
        (DecodeSettings(top_p=0.95), 300),  # the whole-vocabulary path (it sorts every row: kept small)
    ],
    ids=repr,
)
def test_draws_follow_the_distribution_like_torch_multinomial(s, vocab):
    n = 200_000
    scores = _random_logits(1, vocab, seed=5, scale=2.0)
    probs = torch.softmax(warped_like_transformers(scores, s).double(), dim=-1)[0]
    # ours: 2,000 rows (row seeds as the sampler makes them) x 100 steps, all on the same logits
    seeds = [row_seed(0, 1, "dist", 0, i) for i in range(2000)]
    u = row_uniforms(seeds, 100)
    rows = scores.expand(2000, -1).contiguous()
    ours = torch.cat([sample_tokens(rows, u[:, t], s) for t in range(100)])
    theirs = torch.multinomial(probs.float(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    c_ours = torch.bincount(ours, minlength=vocab).double()
    c_theirs = torch.bincount(theirs, minlength=vocab).double()
    assert c_ours[probs == 0].sum() == 0  # never a removed token
    for counts in (c_ours, c_theirs):
        chi2, df = _chi2(counts, probs, n)
        assert chi2 < df + 5 * (2 * df) ** 0.5, (chi2, df)  # ~ 5 sd of the chi-square; p ~ 1e-6
        tv = 0.5 * float((counts / n - probs).abs().sum())
        expected_tv = 0.5 * float((2 * probs * (1 - probs) / (torch.pi * n)).sqrt().sum())  # of an exact sampler
        print(f"chi2 {chi2:.1f} (df {df}), total variation {tv:.4f} (expected {expected_tv:.4f})")
        assert tv < 1.25 * expected_tv + 1e-3
    # and the two samplers against each other (two-sample chi-square on the pooled counts)
    both = c_ours + c_theirs
    keep = both >= 10
    two = float((((c_ours - c_theirs) ** 2) / both)[keep].sum())
    df = int(keep.sum()) - 1
    assert two < df + 5 * (2 * df) ** 0.5


# ---- the preallocated KV cache ----------------------------------------------------------------------------
def test_preallocated_cache_rows_select_repeat_drop_and_keep_growing():
    """The decode loop's cache layer: expanding prompts to sample rows (repeated indices), dropping stopped
    rows, then writing further steps gives exactly the keys/values of concatenating per row."""
    gen = torch.Generator().manual_seed(0)
    k0, v0 = (torch.randn(2, 3, 4, 8, generator=gen).bfloat16() for _ in range(2))  # 2 prompts, 4 positions
    layer = PreallocatedLayer(capacity=6)
    layer.update(k0, v0)
    rows = torch.tensor([1, 1, 0, 1])  # prompt of each sample row
    layer.batch_select_indices(rows)
    ref_k, ref_v = k0[rows], v0[rows]
    assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)
    for step, keep in enumerate((None, torch.tensor([0, 2, 3]), None, torch.tensor([2, 0]))):  # 4 steps > capacity
        if keep is not None:
            layer.batch_select_indices(keep)
            ref_k, ref_v = ref_k[keep], ref_v[keep]
        k, v = (torch.randn(len(ref_k), 3, 1, 8, generator=gen).bfloat16() for _ in range(2))
        keys, values = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        assert layer.get_seq_length() == 4 + step + 1
