"""A loopback chat-completions server for tests and benchmarks (stdlib only; never a real judge).

    from em_lightning.testing.loopback_judge import LoopbackServer, Reply, completion

    def reply(request):  # called on a server thread for each POST; request.prompt is the user message
        return Reply(body=completion({"85": 0.7, "90": 0.3}))

    with LoopbackServer(reply) as server:
        judge = OpenAICompatibleJudge("m", base_url=server.url, api_key_env=None)

`reply` may return any status, body (dict -> JSON, str/bytes as they are), headers and a delay, so
tests inject faults (429 with Retry-After, 5xx, a reply slower than the client's timeout, malformed
JSON). ThreadingHTTPServer on 127.0.0.1: one thread per connection, HTTP/1.1 keep-alive, TCP_NODELAY
(with Nagle on, the body would wait for the client's delayed ACK, ~40 ms a call), a deep backlog (the
default 5 drops concurrent connects). process=True serves from a spawned child process, so server
threads do not compete with the client for the GIL (benchmarks); `reply` must then be picklable.

Counters (requests, in_flight, max_in_flight) come from stats() in both modes (GET /_loopback/stats);
in-thread servers also keep every request in `log` (with its arrival time and `attempt`: how many
earlier requests carried the same prompt).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LoopbackServer", "Reply", "Request", "completion"]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


@dataclass
class Request:
    path: str
    headers: HTTPMessage  # case-insensitive: request.headers["authorization"]
    body: Any  # the parsed JSON body
    prompt: str  # content of the first message ("" when absent)
    attempt: int  # earlier requests with the same prompt (0: the first)
    time: float  # time.monotonic() at arrival


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (latency, or longer than the client's timeout)


def completion(probs: Mapping[str, float], content: str | None = None) -> dict:
    """A chat.completion whose first token's top_logprobs are `probs` (token -> probability)."""
    top = [{"token": t, "logprob": math.log(p)} for t, p in probs.items()]
    first = top[0]["token"] if top else ""
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": 0,
        "model": "loopback",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": first if content is None else content},
            "logprobs": {"content": [{"token": first, "logprob": top[0]["logprob"] if top else 0.0,
                                      "top_logprobs": top}]},
            "finish_reason": "length",
        }],
    }


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that gave up (timeout tests)
        pass


def _make_server(reply: Callable[[Request], Reply], log: list | None) -> _HTTPServer:
    lock = threading.Lock()
    counters = {"requests": 0, "in_flight": 0, "max_in_flight": 0}
    seen: Counter = Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802  (any GET: the counters)
            with lock:
                snapshot = dict(counters)
            self._send(Reply(body=snapshot))

        def do_POST(self):  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/_loopback/reset":
                with lock:
                    counters.update(requests=0, max_in_flight=0)
                    seen.clear()
                    if log is not None:
                        log.clear()
                self._send(Reply(body={}))
                return
            body = json.loads(raw or b"null")
            try:
                prompt = str(body["messages"][0]["content"])
            except (KeyError, IndexError, TypeError):
                prompt = ""
            with lock:
                counters["requests"] += 1
                counters["in_flight"] += 1
                counters["max_in_flight"] = max(counters["max_in_flight"], counters["in_flight"])
                request = Request(self.path, self.headers, body, prompt, seen[prompt], time.monotonic())
                seen[prompt] += 1
                if log is not None:
                    log.append(request)
            try:
                try:
                    answer = reply(request)
                except Exception as exc:  # a bug in `reply`: visible as an HTTP 500, not a dropped connection
                    answer = Reply(500, {"error": f"loopback reply failed: {type(exc).__name__}: {exc}"})
                self._send(answer)
            finally:
                with lock:
                    counters["in_flight"] -= 1

        def _send(self, r: Reply) -> None:
            if r.delay_s:
                time.sleep(r.delay_s)
            data = r.body if isinstance(r.body, bytes) else (
                r.body.encode() if isinstance(r.body, str) else json.dumps(r.body).encode())
            try:
                self.send_response(r.status)
                for k, v in {"Content-Type": "application/json", **r.headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up
                pass

    return _HTTPServer(("127.0.0.1", 0), Handler)


def _serve_in_child(reply, conn) -> None:
    httpd = _make_server(reply, None)
    conn.send(httpd.server_address[1])
    httpd.serve_forever(0.01)


class LoopbackServer:
    """Serve POST {url}/... with `reply(request)`; see the module doc. Close it (or use `with`)."""

    def __init__(self, reply: Callable[[Request], Reply], *, process: bool = False) -> None:
        self.log: list[Request] = []
        self._process = self._httpd = None
        if process:
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            self._process = ctx.Process(target=_serve_in_child, args=(reply, child), daemon=True)
            self._process.start()
            while not parent.poll(0.1):  # a child that dies at start (e.g. `reply` not importable) says so
                if not self._process.is_alive():
                    raise RuntimeError(f"loopback server process exited with code {self._process.exitcode}")
            port = parent.recv()
        else:
            self._httpd = _make_server(reply, self.log)
            port = self._httpd.server_address[1]
            threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True).start()
        self.root = f"http://127.0.0.1:{port}"
        self.url = f"{self.root}/v1"

    def stats(self) -> dict[str, int]:
        """{"requests", "in_flight", "max_in_flight"} since the start or the last reset()."""
        with _OPENER.open(f"{self.root}/_loopback/stats", timeout=10) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        """Zero the counters (in_flight excepted) and forget the log and the prompts seen."""
        _OPENER.open(urllib.request.Request(f"{self.root}/_loopback/reset", data=b"{}"), timeout=10).close()

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._process is not None:
            self._process.terminate()
            self._process.join(5)

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
