"""Judge throughput: OpenAICompatibleJudge (concurrent) against sequential calls, on loopback.

A local chat-completions server (ThreadingHTTPServer on 127.0.0.1 in a child process, one thread per
connection, HTTP/1.1 keep-alive, TCP_NODELAY) sleeps a fixed latency per request (default 50 ms) and
answers each prompt "n=<k>" (k in 0..99) with first-token top_logprobs {"<k>": 0.7, "<k+1>": 0.2,
"no": 0.1}, so every score is known in advance: (0.7 k + 0.2 (k+1)) / 0.9. All scores of every run are
checked, in order.

(a) em-lightning: ``OpenAICompatibleJudge(model="bench", base_url=..., api_key_env=None,
    max_concurrency=32).score_prompts(prompts)`` -- one call for all prompts.
(b) reference approach (the published evaluation calls the judge one row at a time):
    "httpx": a plain ``httpx.Client`` loop, one POST after the other, same request body;
    "judge": the same judge with max_concurrency=1 (only concurrency differs).
../shared/ENVIRONMENT.md lists ~18.8 calls/s for reference-style judging at 50 ms latency.

    python scripts/bench_judge.py [--calls 800] [--latency-ms 50] [--concurrency 32] [--reference httpx|judge|both]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shlex
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from em_lightning.judges import OpenAICompatibleJudge

DIST = (0.7, 0.2, 0.1)  # k, k+1, a non-number


def expected_score(k: int) -> float:
    return (DIST[0] * k + DIST[1] * (k + 1)) / (DIST[0] + DIST[1])


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog (5) would drop concurrent connects
    daemon_threads = True


class LatencyServer:
    """POST */chat/completions: sleep ``latency_s``, then answer the prompt "n=<k>" (see module doc).

    Runs in a child process, so its threads do not compete with the client for this process's GIL.
    GET /stats returns the counters; POST /reset zeroes them."""

    def __init__(self, latency_s: float):
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(latency_s, child), daemon=True)
        self.process.start()
        port = parent.recv()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.client = httpx.Client(timeout=10.0)

    def stats(self) -> dict:
        return self.client.get(f"{self.url}/stats").json()

    def reset(self) -> None:
        self.client.post(f"{self.url}/reset")

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.join(5)


def _serve(latency_s: float, conn) -> None:
    lock = threading.Lock()
    counters = {"requests": 0, "in_flight": 0, "max_in_flight": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client connection stays on one server thread
        # TCP_NODELAY: headers and body go out as two writes; with Nagle on, the body waits for the
        # client's delayed ACK (~40 ms on Linux), which would add ~40 ms to every call.
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def _send(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # /stats
            with lock:
                self._send(json.dumps(counters).encode())

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"] or 0))
            if self.path.endswith("/reset"):
                with lock:
                    counters.update(requests=0, max_in_flight=0)
                self._send(b"{}")
                return
            body = json.loads(body)
            with lock:
                counters["requests"] += 1
                counters["in_flight"] += 1
                counters["max_in_flight"] = max(counters["max_in_flight"], counters["in_flight"])
            try:
                time.sleep(latency_s)  # injected latency
                k = int(body["messages"][0]["content"].split("n=", 1)[1])
                top = [{"token": t, "logprob": math.log(p)} for t, p in zip((str(k), str(k + 1), "no"), DIST)]
                reply = {
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": str(k)},
                        "logprobs": {"content": [{"token": str(k), "logprob": top[0]["logprob"], "top_logprobs": top}]},
                        "finish_reason": "length",
                    }],
                }
                self._send(json.dumps(reply).encode())
            finally:
                with lock:
                    counters["in_flight"] -= 1

    httpd = _Server(("127.0.0.1", 0), Handler)
    conn.send(httpd.server_address[1])
    httpd.serve_forever(0.01)


def check(scores: list, n: int, label: str) -> None:
    bad = [(k, s) for k, s in zip(range(n), scores) if s is None or abs(s - expected_score(k % 100)) > 1e-9]
    if len(scores) != n or bad:
        raise SystemExit(f"{label}: {len(scores)} scores, {len(bad)} wrong, first: {bad[:3]}")
    print(f"    {label}: all {n} scores correct")


def run_judge(url: str, prompts: list[str], concurrency: int) -> tuple[float, list, OpenAICompatibleJudge]:
    judge = OpenAICompatibleJudge(model="bench", base_url=url, api_key_env=None, max_concurrency=concurrency)
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

    judge = OpenAICompatibleJudge(model="bench", base_url=url, api_key_env=None)  # only for _body()
    scores = []
    t0 = time.perf_counter()
    with httpx.Client(timeout=30.0) as client:
        for p in prompts:
            r = client.post(f"{url}/chat/completions", json=judge._body(p, classify=False))
            r.raise_for_status()
            top = r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            scores.append(aggregate_score({e["token"].strip(): math.exp(e["logprob"]) for e in top}))
    return time.perf_counter() - t0, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=800)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=32, help="max_concurrency of the em-lightning judge")
    p.add_argument("--reference", choices=("httpx", "judge", "both"), default="httpx",
                   help="sequential baseline: plain httpx loop, the judge at max_concurrency=1, or both")
    args = p.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    n = args.calls
    prompts = [f"Rate this answer. n={k % 100}" for k in range(n)]
    server = LatencyServer(args.latency_ms / 1000)
    print(f"server: {server.url}, ThreadingHTTPServer in a child process (thread per connection, keep-alive), "
          f"{args.latency_ms:g} ms injected latency per request; {n} prompts")
    try:
        # Warm-up (imports, first connection), not timed.
        run_judge(server.url, prompts[:4], 4)
        run_httpx_loop(server.url, prompts[:2])

        server.reset()
        ta, scores, judge = run_judge(server.url, prompts, args.concurrency)
        print(f"(a) em-lightning judge, max_concurrency={args.concurrency}: {n} calls in {ta:.2f} s = "
              f"{n / ta:,.1f} calls/s (server: {server.stats()}; judge "
              f"stats {judge.last_stats.as_dict()})")
        check(scores, n, "(a)")
        ideal = n / args.concurrency * args.latency_ms / 1000
        print(f"    client CPU for (a): {judge.client_cpu_s:.2f} s ({judge.client_cpu_s / n * 1000:.1f} ms/call; "
              f"above ~{args.latency_ms / args.concurrency:.2f} ms/call the client, not the latency, bounds it)")
        print(f"    latency bound for (a): {n} x {args.latency_ms:g} ms / {args.concurrency} = {ideal:.2f} s "
              f"({n / ideal:,.0f} calls/s)")

        refs = ["httpx", "judge"] if args.reference == "both" else [args.reference]
        for ref in refs:
            server.reset()
            if ref == "httpx":
                tb, scores = run_httpx_loop(server.url, prompts)
                label = "(b) reference, plain httpx.Client loop (one call at a time)"
            else:
                tb, scores, _ = run_judge(server.url, prompts, 1)
                label = "(b) reference, same judge with max_concurrency=1"
            print(f"{label}: {n} calls in {tb:.2f} s = {n / tb:,.1f} calls/s "
                  f"(server: {server.stats()})")
            check(scores, n, "(b)")
            print(f"    ratio (a)/(b) [{ref}]: {tb / ta:.1f}x calls/s")
    finally:
        server.close()


if __name__ == "__main__":
    main()
