"""Drawing one token per row from bf16-rounded logits with top_k 50: the sampler against its former rule,
which sent every row whose k-th and (k+1)-th scores tie to the full-vocabulary path (bf16 logits tie
there in most rows). Logits only, no model: 64 rows x 49,152 (SmolLM2's vocabulary), one thread. The two rules alternate in
rounds of ``--calls`` calls (drifting load hits both alike); each side's time is its median round, in CPU
seconds of this process (what the work costs; a shared machine's other load inflates wall time, printed too).

    python scripts/bench_sampler_ties.py [--rows 64] [--vocab 49152] [--calls 10] [--rounds 10]

Last line: ``ratio: X.XXx`` = former CPU time per call / current CPU time per call (medians).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from em_lightning.model import decoding
from em_lightning.model.decoding import DecodeSettings, candidate_groups, sample_tokens


def per_call(scores, uniforms, s, calls) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        sample_tokens(scores, uniforms, s)
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


@contextlib.contextmanager
def former_rule():
    """One candidate past k, as before: a row whose k-th and (k+1)-th scores tie goes to the full vocabulary."""
    slack, decoding.TIE_SLACK = decoding.TIE_SLACK, 1
    try:
        yield
    finally:
        decoding.TIE_SLACK = slack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--calls", type=int, default=10, help="calls per round")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(args.rows, args.vocab, generator=g) * 3).to(torch.bfloat16).float()
    uniforms = torch.rand(args.rows, generator=g, dtype=torch.float64)
    s = DecodeSettings(top_k=50)
    full = sum(len(r) for r, _, ids in candidate_groups(scores, s) if ids is None)
    with former_rule():
        former_full = sum(len(r) for r, _, ids in candidate_groups(scores, s) if ids is None)
        former_tokens = sample_tokens(scores, uniforms, s)
    if not torch.equal(former_tokens, sample_tokens(scores, uniforms, s)):
        raise SystemExit("the two rules draw different tokens: nothing to compare")
    for _ in range(3):  # warm-up, both sides
        sample_tokens(scores, uniforms, s)
        with former_rule():
            sample_tokens(scores, uniforms, s)
    now, before = [], []
    for r in range(args.rounds):  # alternate which side goes first
        for side in ("current", "former") if r % 2 == 0 else ("former", "current"):
            if side == "current":
                now.append(per_call(scores, uniforms, s, args.calls))
            else:
                with former_rule():
                    before.append(per_call(scores, uniforms, s, args.calls))
    def ms(runs, i):
        return statistics.median(r[i] for r in runs) * 1e3

    print(f"{args.rows} rows x {args.vocab} bf16-rounded logits, top_k 50, one thread, "
          f"{args.rounds} alternating rounds of {args.calls} calls per side (medians)")
    print(f"current (slack {decoding.TIE_SLACK}): {ms(now, 0):.1f} ms CPU per call ({ms(now, 1):.1f} ms wall), "
          f"{full} rows on the full vocabulary")
    print(f"former (k + 1 fetched): {ms(before, 0):.1f} ms CPU per call ({ms(before, 1):.1f} ms wall), "
          f"{former_full} rows on the full vocabulary")
    print(f"wall-time ratio {ms(before, 1) / ms(now, 1):.2f}x")
    print(f"ratio: {ms(before, 0) / ms(now, 0):.2f}x")


if __name__ == "__main__":
    main()
