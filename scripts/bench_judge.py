"""Judge throughput: OpenAICompatibleJudge (concurrent) against sequential calls, on loopback.

A local chat-completions server (em_lightning.testing.loopback_judge.LoopbackServer in a child process:
ThreadingHTTPServer on 127.0.0.1, one thread per connection, HTTP/1.1 keep-alive, TCP_NODELAY) sleeps a
fixed latency per request (default 50 ms) and answers each prompt "n=<k>" (k in 0..99) with first-token
top_logprobs {"<k>": 0.7, "<k+1>": 0.2, "no": 0.1}, so every score is known in advance:
(0.7 k + 0.2 (k+1)) / 0.9. All scores of every run are checked, in order.

(a) em-lightning: ``OpenAICompatibleJudge(model="bench", base_url=..., api_key_env=None,
    max_concurrency=32).score_prompts(prompts)`` -- one call for all prompts.
(b) reference approach (the published evaluation calls the judge one row at a time):
    "httpx": a plain ``httpx2.Client`` loop (the HTTP library under the openai SDK), one POST after the
    other, same request body;
    "judge": the same judge with max_concurrency=1 (only concurrency differs).
--compare FILE also runs (a) with the OpenAICompatibleJudge of another implementation of
em_lightning/judges/openai_compat.py, e.g. the previous one from ``git show HEAD~1:...  > /tmp/old.py``.
../shared/ENVIRONMENT.md lists ~18.8 calls/s for reference-style judging at 50 ms latency.

    python scripts/bench_judge.py [--calls 800] [--latency-ms 50] [--concurrency 32]
        [--reference httpx|judge|both] [--compare FILE]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import shlex
import sys
import time

import httpx2

from em_lightning.judges import OpenAICompatibleJudge
from em_lightning.testing.loopback_judge import LoopbackServer, Reply, completion

DIST = (0.7, 0.2, 0.1)  # k, k+1, a non-number


def expected_score(k: int) -> float:
    return (DIST[0] * k + DIST[1] * (k + 1)) / (DIST[0] + DIST[1])


def number_reply(latency_s: float, request) -> Reply:
    """Sleep ``latency_s`` (the injected latency), then answer the prompt "n=<k>" (see module doc)."""
    k = int(request.prompt.split("n=", 1)[1])
    return Reply(body=completion(dict(zip((str(k), str(k + 1), "no"), DIST)), str(k)), delay_s=latency_s)


def load_judge_class(path: str) -> type:
    """OpenAICompatibleJudge from another copy of openai_compat.py (its relative imports resolve in
    em_lightning.judges)."""
    spec = importlib.util.spec_from_file_location("em_lightning.judges._bench_compare", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.OpenAICompatibleJudge


def check(scores: list, n: int, label: str) -> None:
    bad = [(k, s) for k, s in zip(range(n), scores) if s is None or abs(s - expected_score(k % 100)) > 1e-9]
    if len(scores) != n or bad:
        raise SystemExit(f"{label}: {len(scores)} scores, {len(bad)} wrong, first: {bad[:3]}")
    print(f"    {label}: all {n} scores correct")


def run_judge(url: str, prompts: list[str], concurrency: int, cls: type = OpenAICompatibleJudge):
    judge = cls(model="bench", base_url=url, api_key_env=None, max_concurrency=concurrency)
    c0, t0 = time.process_time(), time.perf_counter()
    results = judge.score_prompts(prompts)
    elapsed = time.perf_counter() - t0
    judge.client_cpu_s = time.process_time() - c0  # benchmark-only attribute
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"judge (max_concurrency={concurrency}): {len(errors)} errors, first: {errors[0]}")
    return elapsed, [r.score for r in results], judge


def run_httpx_loop(url: str, prompts: list[str]) -> tuple[float, list]:
    """One POST at a time with the judge's request body; score with the same aggregate rule."""
    from em_lightning.judges import aggregate_score

    judge = OpenAICompatibleJudge(model="bench", base_url=url, api_key_env=None)  # only for the body
    scores = []
    t0 = time.perf_counter()
    with httpx2.Client(timeout=30.0) as client:
        for p in prompts:
            r = client.post(f"{url}/chat/completions", json=judge.request_kwargs(p))  # the judge's own body
            r.raise_for_status()
            top = r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            scores.append(aggregate_score({e["token"].strip(): math.exp(e["logprob"]) for e in top}))
    return time.perf_counter() - t0, scores


def report_a(label: str, n: int, ta: float, judge, server, args) -> None:
    print(f"{label}, max_concurrency={args.concurrency}: {n} calls in {ta:.2f} s = {n / ta:,.1f} calls/s "
          f"(server: {server.stats()}; judge stats {judge.last_stats.as_dict()})")
    print(f"    client CPU: {judge.client_cpu_s:.2f} s ({judge.client_cpu_s / n * 1000:.1f} ms/call; "
          f"above ~{args.latency_ms / args.concurrency:.2f} ms/call the client, not the latency, bounds it)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=800)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=32, help="max_concurrency of the em-lightning judge")
    p.add_argument("--reference", choices=("httpx", "judge", "both"), default="httpx",
                   help="sequential baseline: plain httpx2 loop, the judge at max_concurrency=1, or both")
    p.add_argument("--compare", metavar="FILE", help="another openai_compat.py whose judge also runs (a)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs of (a) (alternating with --compare); median")
    args = p.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    n = args.calls
    prompts = [f"Rate this answer. n={k % 100}" for k in range(n)]
    server = LoopbackServer(functools.partial(number_reply, args.latency_ms / 1000), process=True)
    print(f"server: {server.url}, LoopbackServer in a child process (thread per connection, keep-alive), "
          f"{args.latency_ms:g} ms injected latency per request; {n} prompts")
    judges = {"(a) em-lightning judge": OpenAICompatibleJudge}
    if args.compare:
        judges[f"(a') judge of {args.compare}"] = load_judge_class(args.compare)
    try:
        # Warm-up (imports, first connection), not timed.
        for cls in judges.values():
            run_judge(server.url, prompts[:4], 4, cls)
        run_httpx_loop(server.url, prompts[:2])

        times: dict[str, list[float]] = {label: [] for label in judges}
        for _ in range(args.repeat):
            for label, cls in judges.items():
                server.reset()
                ta, scores, judge = run_judge(server.url, prompts, args.concurrency, cls)
                times[label].append(ta)
                report_a(label, n, ta, judge, server, args)
                check(scores, n, label.split()[0])
        median = {label: sorted(t)[len(t) // 2] for label, t in times.items()}
        ta = median["(a) em-lightning judge"]
        ideal = n / args.concurrency * args.latency_ms / 1000
        print(f"    latency bound for (a): {n} x {args.latency_ms:g} ms / {args.concurrency} = {ideal:.2f} s "
              f"({n / ideal:,.0f} calls/s)")
        if args.repeat > 1 or args.compare:
            for label, t in median.items():
                print(f"    {label.split()[0]} median of {len(times[label])}: {t:.2f} s = {n / t:,.1f} calls/s")

        refs = ["httpx", "judge"] if args.reference == "both" else [args.reference]
        for ref in refs:
            server.reset()
            if ref == "httpx":
                tb, scores = run_httpx_loop(server.url, prompts)
                label = "(b) reference, plain httpx2.Client loop (one call at a time)"
            else:
                tb, scores, _ = run_judge(server.url, prompts, 1)
                label = "(b) reference, same judge with max_concurrency=1"
            print(f"{label}: {n} calls in {tb:.2f} s = {n / tb:,.1f} calls/s "
                  f"(server: {server.stats()})")
            check(scores, n, "(b)")
            for name, t in reversed(median.items()):  # (a) last
                print(f"    {name.split()[0]}/(b) [{ref}]: {tb / t:.1f}x calls/s")
            last = (tb, ta)
    finally:
        server.close()
    print(f"ratio: {last[0] / last[1]:.2f}x")  # (a) concurrent judge calls/s over the one-at-a-time reference


if __name__ == "__main__":
    main()
