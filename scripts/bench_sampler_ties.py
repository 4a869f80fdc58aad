"""Drawing one token per row from bf16-rounded logits with top_k 50: the sampler against its former rule,
which sent every row whose k-th and (k+1)-th scores tie to the full-vocabulary path (bf16 logits tie
there in most rows). Logits only, no model: 64 rows x 49,152 (SmolLM2's vocabulary), one thread.

    python scripts/bench_sampler_ties.py [--rows 64] [--vocab 49152] [--calls 50]

Last line: ``ratio: X.XXx`` = former time per call / current time per call.
"""

from __future__ import annotations

import argparse
import time

import torch

from em_lightning import decoding
from em_lightning.decoding import DecodeSettings, candidate_groups, sample_tokens


def per_call(scores, uniforms, s, calls) -> float:
    for _ in range(3):
        sample_tokens(scores, uniforms, s)
    start = time.perf_counter()
    for _ in range(calls):
        sample_tokens(scores, uniforms, s)
    return (time.perf_counter() - start) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(args.rows, args.vocab, generator=g) * 3).to(torch.bfloat16).float()
    uniforms = torch.rand(args.rows, generator=g, dtype=torch.float64)
    s = DecodeSettings(top_k=50)
    now = per_call(scores, uniforms, s, args.calls)
    full = sum(len(r) for r, _, ids in candidate_groups(scores, s) if ids is None)
    slack, decoding.TIE_SLACK = decoding.TIE_SLACK, 1  # one candidate past k: the former rule
    try:
        former_full = sum(len(r) for r, _, ids in candidate_groups(scores, s) if ids is None)
        before = per_call(scores, uniforms, s, args.calls)
    finally:
        decoding.TIE_SLACK = slack
    print(f"{args.rows} rows x {args.vocab} bf16-rounded logits, top_k 50, one thread")
    print(f"current (slack {slack}): {now * 1e3:.1f} ms per call, {full} rows on the full vocabulary")
    print(f"former (k + 1 fetched): {before * 1e3:.1f} ms per call, {former_full} rows on the full vocabulary")
    print(f"ratio: {before / now:.2f}x")


if __name__ == "__main__":
    main()
