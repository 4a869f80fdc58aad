"""OpenAICompatibleJudge against a loopback chat-completions server with injected faults."""

import asyncio
import concurrent.futures
import pickle
import socket
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from em_lightning.judges import JudgeResult, MissingAPIKeyError, OpenAICompatibleJudge
from em_lightning.testing.loopback_judge import LoopbackServer, Reply, completion

KEY_ENV = "EM_TEST_JUDGE_KEY"
SECRET = "sk-test-secret-4242"
GOOD = {"85": 0.6, " 85": 0.1, "90": 0.2, "foo": 0.1}  # " 85" merges into "85"
GOOD_SCORE = (85 * 0.7 + 90 * 0.2) / 0.9


WORDS = {"I": 0.7, "cannot": 0.2, "sorry": 0.1}
ACTIONS = {  # one reply per action; "<status>" (500, 503, ...) answers that status
    "ok": Reply(body=completion(GOOD, "85")),
    "words": Reply(body=completion(WORDS, "85")),
    "sleep": Reply(body=completion(GOOD, "85"), delay_s=0.6),  # longer than the client's timeout
    "slow": Reply(body=completion(GOOD, "85"), delay_s=0.03),
    "badjson": Reply(body='{"choices": ['),
    "missing": Reply(body={"choices": [{"message": {"content": "85"}}]}),
    # Longer than the SDK's first backoff (at most 0.5 s), so the gap shows which one was used.
    "429": Reply(429, {"error": "rate limited"}, {"Retry-After": "1.2"}),
    "429junk": Reply(429, {"error": "rate limited"}, {"Retry-After": "soon"}),
    "401": Reply(401, {"error": f"Incorrect API key provided: {SECRET}"}),
    # logprobs NaN and +Infinity (JSON extensions Python's json reads): probabilities NaN and inf
    "nonfinite": Reply(body=completion({"85": 0.6, "90": float("nan"), "70": float("inf"), "no": 0.1}, "85")),
    "nan_only": Reply(body=completion({"85": float("nan"), "no": 0.2}, "85")),
}


def plan_reply(request):
    """A prompt "case=NAME[#tag]" follows PLANS[NAME]: one action per attempt (the last one repeats)."""
    plan = PLANS[request.prompt.split("case=", 1)[1].split("#")[0]]
    action = plan[min(request.attempt, len(plan) - 1)]
    if action == "429date":  # an HTTP date 300 s after the request, not after this module's import
        when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=300), usegmt=True)
        return Reply(429, {"error": "rate limited"}, {"Retry-After": when})
    return ACTIONS.get(action) or Reply(int(action), {"error": "boom"})


def arrivals(server, case):
    return [r.time for r in server.log if r.prompt == f"case={case}"]


PLANS = {
    "good": ["ok"],
    "e500": ["500", "ok"],
    "e503x2": ["503", "503", "ok"],
    "e429": ["429", "ok"],
    "e429date": ["429date", "ok"],
    "e429junk": ["429junk", "ok"],
    "timeout": ["sleep", "ok"],
    "badjson": ["badjson", "ok"],
    "missing": ["missing", "ok"],
    "words": ["words"],
    "dead": ["500"],
    "e401": ["401"],
    "slow": ["slow"],
    "nonfinite": ["nonfinite"],
    "nan_only": ["nan_only"],
}


@pytest.fixture
def server():
    with LoopbackServer(plan_reply) as srv:
        yield srv


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_judge(server, **kw):
    opts = dict(base_url=server.url, api_key_env=KEY_ENV, max_retries=3, timeout_s=0.25, max_concurrency=8)
    opts.update(kw)
    return OpenAICompatibleJudge("judge-model", **opts)


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
    assert len(arrivals(server, "dead")) == 4

    attempts = {c: len(arrivals(server, c)) for c in cases}
    assert attempts == {"good": 1, "e500": 2, "e503x2": 3, "e429": 2, "timeout": 2, "badjson": 2,
                        "missing": 2, "words": 1, "dead": 4}
    stats = judge.last_stats
    assert stats.requests == len(server.log) == sum(attempts.values())
    assert stats.retries == stats.requests - len(cases)
    assert stats.failures == 1 and stats.budget_exhausted == 0
    assert dict(stats.errors) == {"500": 5, "503": 2, "429": 1, "timeout": 1, "malformed": 2}
    assert judge.stats.requests == stats.requests  # lifetime counters include this call

    # Retry-After (1.2 s) was honoured although the SDK's first backoff is at most 0.5 s.
    t = arrivals(server, "e429")
    assert t[1] - t[0] >= 1.15

    body = server.log[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["max_tokens"] == 1 and body["temperature"] == 0.0 and body["seed"] == 0
    assert body["model"] == "judge-model" and body["messages"][0]["role"] == "user"


def test_non_finite_logprobs_are_left_out_of_the_score(server, key):
    """A server sending NaN or +Infinity logprobs: those tokens are ignored by the score (aggregate_score's
    filter), kept in the distribution, and the reply is a success, not a retry."""
    results = make_judge(server).score_prompts(["case=nonfinite", "case=nan_only"])
    assert results[0].error is None and results[0].score == pytest.approx(85.0)
    assert results[0].probs["90"] != results[0].probs["90"] and results[0].probs["70"] == float("inf")
    assert results[1].error is None and results[1].score is None  # no finite numeric mass: no score
    assert len(server.log) == 2


def test_extra_body_is_merged_into_the_request(server, key):
    judge = make_judge(server, extra_body={"top_k": 1, "seed": 7})
    assert judge.score_prompts(["case=good"])[0].score == pytest.approx(GOOD_SCORE)
    body = server.log[0].body
    assert body["top_k"] == 1 and body["seed"] == 7 and body["top_logprobs"] == 20


def test_request_budget_counts_every_request(server, key):
    judge = make_judge(server, request_budget=4)
    results = judge.score_prompts([f"case=good#{i}" for i in range(10)])
    assert len(server.log) == 4
    assert sum(r.score is not None for r in results) == 4
    assert [r.error for r in results].count("budget exhausted") == 6
    assert judge.last_stats.budget_exhausted == 6 and judge.last_stats.failures == 6

    # Retries spend the same budget: 2 failing prompts, budget 3 -> 3 requests in all.
    server.reset()
    results = make_judge(server, request_budget=3).score_prompts(["case=dead#a", "case=dead#b"])
    assert len(server.log) == 3
    assert all(r.score is None and r.error.startswith("budget exhausted") for r in results)

    # The budget is per call: a new call may spend it again.
    server.reset()
    again = judge.score_prompts(["case=good#x", "case=good#y"])
    assert len(server.log) == 2 and all(r.score is not None for r in again)


def test_concurrency_is_bounded(server, key):
    judge = make_judge(server, max_concurrency=3)
    results = judge.score_prompts([f"case=slow#{i}" for i in range(24)])
    assert all(r.score == pytest.approx(GOOD_SCORE) for r in results)
    assert server.stats()["max_in_flight"] <= 3
    assert server.stats()["max_in_flight"] >= 2  # and requests really overlap


def test_api_key_from_env_never_stored(server, key):
    judge = make_judge(server)
    judge.score_prompts(["case=good"])
    assert server.log[0].headers["Authorization"] == f"Bearer {SECRET}"
    for text in [repr(judge), str(judge), repr(vars(judge))]:
        assert SECRET not in text
    assert SECRET.encode() not in pickle.dumps(judge)
    clone = pickle.loads(pickle.dumps(judge))
    assert clone.score_prompts(["case=good#2"])[0].score == pytest.approx(GOOD_SCORE)


def test_unauthorised_is_not_retried_and_key_is_redacted(server, key):
    judge = make_judge(server)
    [result] = judge.score_prompts(["case=e401"])
    assert len(server.log) == 1
    assert result.score is None and "401" in result.error
    assert SECRET not in result.error


def test_missing_key_names_the_variable(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = make_judge(server)
    with pytest.raises(MissingAPIKeyError, match=KEY_ENV):
        judge.score_prompts(["case=good"])
    assert len(server.log) == 0
    # A local server without auth: no key needed, no Authorization header sent.
    result = make_judge(server, api_key_env=None).score_prompts(["case=good"])
    assert result[0].score == pytest.approx(GOOD_SCORE)
    assert "Authorization" not in server.log[0].headers


def test_keyless_server_gets_no_ambient_key(server, monkeypatch):
    # api_key_env=None: the SDK must not fall back to OPENAI_API_KEY (a key for another server).
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for kw in ({}, {"api_version": "2024-06-01"}):
        server.reset()
        assert make_judge(server, api_key_env=None, **kw).score_prompts(["case=good"])[0].score is not None
        headers = server.log[0].headers
        assert "Authorization" not in headers and "api-key" not in headers, kw


def test_azure_style(server, key):
    # AsyncAzureOpenAI: api-version query, api-key header, deployment in the path.
    judge = make_judge(server, base_url=f"{server.url}/openai/deployments/judge-model", api_version="2024-06-01",
                       auth_style="api-key")
    assert judge.score_prompts(["case=good"])[0].score == pytest.approx(GOOD_SCORE)
    assert server.log[0].headers["api-key"] == SECRET and "Authorization" not in server.log[0].headers
    assert server.log[0].path == "/v1/openai/deployments/judge-model/chat/completions?api-version=2024-06-01"
    # base_url ".../openai": the SDK puts the deployment (= model) in the path; bearer = an Entra ID token.
    server.reset()
    judge = make_judge(server, base_url=f"{server.url}/openai", api_version="2024-06-01")
    assert judge.score_prompts(["case=good"])[0].score == pytest.approx(GOOD_SCORE)
    assert server.log[0].headers["Authorization"] == f"Bearer {SECRET}" and "api-key" not in server.log[0].headers
    assert server.log[0].path == "/v1/openai/deployments/judge-model/chat/completions?api-version=2024-06-01"
    # A non-Azure gateway that wants an api-key header.
    server.reset()
    assert make_judge(server, auth_style="api-key").score_prompts(["case=good"])[0].score is not None
    assert server.log[0].headers["api-key"] == SECRET and "Authorization" not in server.log[0].headers
    assert server.log[0].path == "/v1/chat/completions"


def test_connection_refused_is_a_result():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    judge = OpenAICompatibleJudge(
        "m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None, max_retries=2
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
    assert server.log[0].body["max_tokens"] == judge.classify_max_tokens


def test_unexpected_errors_become_results():
    judge = OpenAICompatibleJudge("m", base_url="http://127.0.0.1:99999/v1", api_key_env=None, max_retries=1)
    [result] = judge.score_prompts(["case=good"])  # invalid port: not even a connection attempt
    assert result.score is None and result.error
    stats = judge.last_stats.as_dict()
    assert stats["failures"] == 1 and stats["prompts"] == 1
    assert all(isinstance(v, int) for v in stats.values())


def test_retry_after_header_forms(server, key):
    # The SDK reads Retry-After; what matters here is the outcome. An HTTP date 300 s ahead is past the
    # SDK's 120 s limit: no retry, one counted failure at once (a training run does not stall for
    # minutes). An unreadable value falls back to the backoff.
    judge = make_judge(server)
    late, junk = judge.score_prompts(["case=e429date", "case=e429junk"])
    assert late.score is None and late.error.startswith("HTTP 429") and len(arrivals(server, "e429date")) == 1
    assert junk.score == pytest.approx(GOOD_SCORE) and len(arrivals(server, "e429junk")) == 2
    assert judge.last_stats.errors["429"] == 2 and judge.last_stats.failures == 1


def test_backoff_arguments_are_deprecated_loudly(server, key):
    with pytest.warns(FutureWarning, match="backoff_base_s is deprecated and ignored"):
        judge = make_judge(server, backoff_base_s=0.01)
    with pytest.warns(FutureWarning, match="backoff_max_s"):
        make_judge(server, backoff_max_s=5.0)
    assert judge.score_prompts(["case=good"])[0].score == pytest.approx(GOOD_SCORE)
