"""OpenAICompatibleJudge against a loopback chat-completions server with injected faults."""

import asyncio
import concurrent.futures
import json
import math
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from em_lightning.judges import JudgeResult, MissingAPIKeyError, OpenAICompatibleJudge

KEY_ENV = "EM_TEST_JUDGE_KEY"
SECRET = "sk-test-secret-4242"
GOOD = {"85": 0.6, " 85": 0.1, "90": 0.2, "foo": 0.1}  # " 85" merges into "85"
GOOD_SCORE = (85 * 0.7 + 90 * 0.2) / 0.9


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog (5) drops concurrent connects
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that timed out: nothing to report
        pass


class FakeServer:
    """Chat-completions server. A prompt "case=NAME" follows plans[NAME]: one action per attempt
    (the last one repeats). Actions: "ok", "words", "500", "429", "401", "sleep", "badjson",
    "missing", "slow"."""

    def __init__(self, plans):
        self.plans = plans
        self.lock = threading.Lock()
        self.requests = 0
        self.attempts = {}  # case -> list of arrival times
        self.in_flight = 0
        self.max_in_flight = 0
        self.headers = []
        self.bodies = []
        self.paths = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                case = body["messages"][0]["content"].split("case=", 1)[1]
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    times = server.attempts.setdefault(case, [])
                    times.append(time.monotonic())
                    plan = server.plans[case.split("#")[0]]
                    action = plan[min(len(times) - 1, len(plan) - 1)]
                    server.headers.append(dict(self.headers))
                    server.bodies.append(body)
                    server.paths.append(self.path)
                try:
                    self.act(action)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def act(self, action):
                if action == "sleep":
                    time.sleep(0.6)  # longer than the client's timeout
                    action = "ok"
                if action == "slow":
                    time.sleep(0.03)
                    action = "ok"
                if action in ("ok", "words"):
                    dist = GOOD if action == "ok" else {"I": 0.7, "cannot": 0.2, "sorry": 0.1}
                    self.send(200, json.dumps(completion(dist)))
                elif action == "badjson":
                    self.send(200, '{"choices": [')
                elif action == "missing":
                    self.send(200, json.dumps({"choices": [{"message": {"content": "85"}}]}))
                elif action == "429":
                    self.send(429, '{"error": "rate limited"}', {"Retry-After": "0.15"})
                elif action == "401":
                    self.send(401, json.dumps({"error": f"Incorrect API key provided: {SECRET}"}))
                else:
                    self.send(int(action), '{"error": "boom"}')

            def send(self, status, text, headers=None):
                data = text.encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(dist, content="85"):
    top = [{"token": t, "logprob": math.log(p)} for t, p in dist.items()]
    return {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": {
                    "content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]
                },
                "finish_reason": "length",
            }
        ],
    }


PLANS = {
    "good": ["ok"],
    "e500": ["500", "ok"],
    "e503x2": ["503", "503", "ok"],
    "e429": ["429", "ok"],
    "timeout": ["sleep", "ok"],
    "badjson": ["badjson", "ok"],
    "missing": ["missing", "ok"],
    "words": ["words"],
    "dead": ["500"],
    "e401": ["401"],
    "slow": ["slow"],
}


@pytest.fixture
def server():
    srv = FakeServer(PLANS)
    yield srv
    srv.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_judge(server, **kw):
    opts = dict(api_key_env=KEY_ENV, max_retries=3, timeout_s=0.25, backoff_base_s=0.01, max_concurrency=8)
    opts.update(kw)
    return OpenAICompatibleJudge("judge-model", base_url=server.url, **opts)


def test_scores_retries_and_failures(server, key):
    cases = ["good", "e500", "e503x2", "e429", "timeout", "badjson", "missing", "words", "dead"]
    judge = make_judge(server)
    results = judge.score_prompts([f"case={c}" for c in cases])
    by = dict(zip(cases, results))

    for c in ["good", "e500", "e503x2", "e429", "timeout", "badjson", "missing"]:
        assert by[c].error is None, (c, by[c].error)
        assert by[c].score == pytest.approx(GOOD_SCORE), c
        assert by[c].probs == pytest.approx({"85": 0.7, "90": 0.2, "foo": 0.1})
    # A judge that answers in words: no score, but not a failure, and its distribution is kept.
    assert by["words"].score is None and by["words"].error is None
    assert by["words"].probs == pytest.approx({"I": 0.7, "cannot": 0.2, "sorry": 0.1})
    # Always 500: given up after 1 + max_retries attempts, as a result, not an exception.
    assert by["dead"].score is None and "500" in by["dead"].error
    assert len(server.attempts["dead"]) == 4

    attempts = {c: len(server.attempts[c]) for c in cases}
    assert attempts == {"good": 1, "e500": 2, "e503x2": 3, "e429": 2, "timeout": 2, "badjson": 2,
                        "missing": 2, "words": 1, "dead": 4}
    stats = judge.last_stats
    assert stats.requests == server.requests == sum(attempts.values())
    assert stats.retries == stats.requests - len(cases)
    assert stats.failures == 1 and stats.budget_exhausted == 0
    assert dict(stats.errors) == {"500": 5, "503": 2, "429": 1, "timeout": 1, "malformed": 2}
    assert judge.stats.requests == stats.requests  # lifetime counters include this call

    # Retry-After (0.15 s) was honoured although the exponential backoff alone would wait ~0.01 s.
    t = server.attempts["e429"]
    assert t[1] - t[0] >= 0.14

    body = server.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["max_tokens"] == 1 and body["temperature"] == 0.0 and body["seed"] == 0
    assert body["model"] == "judge-model" and body["messages"][0]["role"] == "user"


def test_request_budget_counts_every_request(server, key):
    judge = make_judge(server, request_budget=4)
    results = judge.score_prompts([f"case=good#{i}" for i in range(10)])
    assert server.requests == 4
    assert sum(r.score is not None for r in results) == 4
    assert [r.error for r in results].count("budget exhausted") == 6
    assert judge.last_stats.budget_exhausted == 6 and judge.last_stats.failures == 6

    # Retries spend the same budget: 2 failing prompts, budget 3 -> 3 requests in all.
    server.requests = 0
    results = make_judge(server, request_budget=3).score_prompts(["case=dead#a", "case=dead#b"])
    assert server.requests == 3
    assert all(r.score is None and r.error.startswith("budget exhausted") for r in results)

    # The budget is per call: a new call may spend it again.
    server.requests = 0
    again = judge.score_prompts(["case=good#x", "case=good#y"])
    assert server.requests == 2 and all(r.score is not None for r in again)


def test_concurrency_is_bounded(server, key):
    judge = make_judge(server, max_concurrency=3)
    results = judge.score_prompts([f"case=slow#{i}" for i in range(24)])
    assert all(r.score == pytest.approx(GOOD_SCORE) for r in results)
    assert server.max_in_flight <= 3
    assert server.max_in_flight >= 2  # and requests really overlap


def test_api_key_from_env_never_stored(server, key):
    judge = make_judge(server)
    judge.score_prompts(["case=good"])
    assert server.headers[0]["Authorization"] == f"Bearer {SECRET}"
    for text in [repr(judge), str(judge), repr(vars(judge))]:
        assert SECRET not in text
    assert SECRET.encode() not in pickle.dumps(judge)
    clone = pickle.loads(pickle.dumps(judge))
    assert clone.score_prompts(["case=good#2"])[0].score == pytest.approx(GOOD_SCORE)


def test_unauthorised_is_not_retried_and_key_is_redacted(server, key):
    judge = make_judge(server)
    [result] = judge.score_prompts(["case=e401"])
    assert server.requests == 1
    assert result.score is None and "401" in result.error
    assert SECRET not in result.error


def test_missing_key_names_the_variable(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = make_judge(server)
    with pytest.raises(MissingAPIKeyError, match=KEY_ENV):
        judge.score_prompts(["case=good"])
    assert server.requests == 0
    # A local server without auth: no key needed, no Authorization header sent.
    result = make_judge(server, api_key_env=None).score_prompts(["case=good"])
    assert result[0].score == pytest.approx(GOOD_SCORE)
    assert "Authorization" not in server.headers[0]


def test_azure_style(server, key):
    judge = make_judge(server, api_version="2024-06-01", auth_style="api-key")
    assert judge.score_prompts(["case=good"])[0].score == pytest.approx(GOOD_SCORE)
    assert server.headers[0]["api-key"] == SECRET and "Authorization" not in server.headers[0]
    assert server.paths[0] == "/v1/chat/completions?api-version=2024-06-01"


def test_connection_refused_is_a_result():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    judge = OpenAICompatibleJudge(
        "m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None, max_retries=2, backoff_base_s=0.01
    )
    [result] = judge.score_prompts(["case=good"])
    assert result.score is None and "connection" in result.error
    assert judge.last_stats.requests == 3 and judge.last_stats.errors["connection"] == 3


def test_works_from_thread_and_inside_running_loop(server, key):
    judge = make_judge(server)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(judge.score_prompts, [f"case=good#t{i}"]) for i in range(2)]
        assert all(f.result()[0].score == pytest.approx(GOOD_SCORE) for f in futures)

    async def inside_loop():
        return judge.score_prompts(["case=good#loop"])

    assert asyncio.run(inside_loop())[0].score == pytest.approx(GOOD_SCORE)
    assert judge.stats.requests == 3


def test_classify_label_and_distribution(server, key):
    judge = make_judge(server)
    [result] = judge.classify_prompts(["case=good"])
    assert isinstance(result, JudgeResult)
    assert result.label == "85" and result.error is None
    assert result.probs["85"] == pytest.approx(0.7)
    assert server.bodies[0]["max_tokens"] == judge.classify_max_tokens


def test_unexpected_errors_become_results():
    judge = OpenAICompatibleJudge("m", base_url="http://127.0.0.1:99999/v1", api_key_env=None, max_retries=1)
    [result] = judge.score_prompts(["case=good"])  # invalid port: not even a connection attempt
    assert result.score is None and result.error
    stats = judge.last_stats.as_dict()
    assert stats["failures"] == 1 and stats["prompts"] == 1
    assert all(isinstance(v, int) for v in stats.values())


def test_retry_after_header_forms():
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    from em_lightning.judges.openai_compat import _parse_retry_after

    assert _parse_retry_after("2") == 2.0 and _parse_retry_after("0.5") == 0.5
    assert _parse_retry_after(None) is None and _parse_retry_after("soon") is None
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < _parse_retry_after(when) <= 30
