"""Judge over any OpenAI-compatible chat-completions endpoint (OpenAI, Azure OpenAI, vLLM, ...).

The published protocol: one user message, max_tokens 1, temperature 0, top 20 logprobs, seed 0; the
score is aggregate_score over the first token's top logprobs. Requests go through the official SDK
(`openai.AsyncOpenAI`, or `AsyncAzureOpenAI` when `api_version` is set), which retries 408/409/429/5xx,
timeouts and connection errors with its exponential backoff and honours Retry-After. Added here, what
the SDK lacks: a bound on concurrent requests, a request budget per call, one retry policy for 200
replies without usable logprobs, per-cause counters, and the never-raise rule: a failure becomes
JudgeResult(error=...) instead of an exception, so a flaky endpoint never stops a training run.
A dead endpoint costs bounded time: a circuit breaker (``breaker_failures`` consecutive timeouts or
connection failures stop the call's requests) and the caller's deadline (``judges/deadline.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import functools
import json
import math
import os
import ssl
import threading
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2
import openai

from em_lightning.judges.base import JudgeResult, aggregate_score
from em_lightning.judges.deadline import CIRCUIT_OPEN, deadline_error, time_left

__all__ = ["JudgeStats", "MissingAPIKeyError", "OpenAICompatibleJudge"]

BUDGET_EXHAUSTED = "budget exhausted"
_STATS_LOCK = threading.Lock()  # module level: a lock on the judge would not pickle


@functools.lru_cache(maxsize=4)
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """httpx's default verifying context (SSL_CERT_FILE / SSL_CERT_DIR honoured: they key the cache), built
    once: building one loads the CA bundle, ~20 ms of CPU holding the GIL, which once per judged point
    stalled the training thread beside background judging. One context serves every loop and thread."""
    return httpx2.create_ssl_context(trust_env=True)


class MissingAPIKeyError(RuntimeError):
    """The environment variable that should hold the API key is not set (a setup error, not transient)."""


class _Malformed(ValueError):
    """A 200 reply without the fields we need."""


class _BudgetExhausted(openai.OpenAIError):
    """Raised by the transport instead of sending; an OpenAIError, so the SDK passes it on untouched."""


class _CircuitOpen(openai.OpenAIError):
    """Raised by the transport instead of sending once the breaker tripped (passed on like _BudgetExhausted)."""


@dataclass
class JudgeStats:
    """Counters of one call (judge.last_stats) or of the judge's lifetime (judge.stats)."""

    prompts: int = 0  # prompts judged
    requests: int = 0  # HTTP requests sent, retries included (what the request budget counts)
    retries: int = 0  # requests that repeated an earlier failed attempt
    failures: int = 0  # prompts whose result carries an error (budget-exhausted ones included)
    budget_exhausted: int = 0  # prompts left unfinished because the request budget ran out
    errors: Counter = field(default_factory=Counter)  # failed attempts by cause: "429", "500", "timeout", ...

    def merge(self, other: JudgeStats) -> None:
        for f in dataclasses.fields(self):
            if f.name == "errors":
                self.errors.update(other.errors)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers, e.g. for logging: errors become {"errors/429": n, ...}."""
        names = [f.name for f in dataclasses.fields(self) if f.name != "errors"]
        out: dict[str, Any] = {name: getattr(self, name) for name in names}
        out.update({f"errors/{cause}": n for cause, n in sorted(self.errors.items())})
        return out


def _first_token_probs(data: Any) -> dict[str, float]:
    """choices[0].logprobs.content[0].top_logprobs -> {stripped token: probability}, duplicates summed."""
    try:
        top = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        probs: dict[str, float] = {}
        for entry in top:
            token = entry["token"].strip()
            probs[token] = probs.get(token, 0.0) + math.exp(float(entry["logprob"]))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise _Malformed(f"missing or bad logprobs ({type(exc).__name__}: {exc})") from None
    if not probs:
        raise _Malformed("empty top_logprobs")
    return probs


def _message_text(data: Any) -> str | None:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content.strip() if isinstance(content, str) else None


def _run_sync(make_coro):
    """Run a coroutine from sync code: directly, or in a worker thread when a loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # this thread's deadline goes along
        return pool.submit(contextvars.copy_context().run, lambda: asyncio.run(make_coro())).result()


@dataclass
class _Call:
    """State of one score_prompts/classify_prompts call (one event loop, one thread: no locks)."""

    stats: JudgeStats
    semaphore: asyncio.Semaphore
    budget: int | None
    key: str | None
    timeout_s: float
    breaker_failures: int | None = None
    consecutive_outages: int = 0  # timeouts / connection failures in a row, any prompt (a reply resets it)
    circuit_open: str | None = None  # why requests stopped

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text


@dataclass
class _Prompt:
    attempts: int = 0
    last_error: str = "no attempt"


_PROMPT: contextvars.ContextVar[_Prompt] = contextvars.ContextVar("em_lightning_judge_prompt")


class _CallTransport(httpx2.AsyncBaseTransport):
    """Every HTTP attempt the SDK makes (retries included) passes here: the request budget, the
    concurrency bound (held only while a request is on the wire, not during the SDK's backoff) and the
    per-attempt counters. The reply is read here, so a slot is free only once its reply is in."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, call: _Call) -> None:
        self.inner, self.call = inner, call

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        call, prompt = self.call, _PROMPT.get()
        if call.budget is not None:
            if call.budget <= 0:
                raise _BudgetExhausted(BUDGET_EXHAUSTED)
            call.budget -= 1
        async with call.semaphore:
            if call.circuit_open:  # checked once a slot is free: requests queued behind the failures stop too
                raise _CircuitOpen(call.circuit_open)
            call.stats.requests += 1
            call.stats.retries += prompt.attempts > 0
            prompt.attempts += 1
            try:
                response = await self.inner.handle_async_request(request)
                await response.aread()
            except httpx2.TimeoutException:
                self._failed(prompt, "timeout", f"timeout after {call.timeout_s} s")
                self._outage(prompt)
                raise
            except Exception as exc:  # connection refused/reset, protocol and TLS errors: the SDK retries them
                self._failed(prompt, "connection", f"connection error: {type(exc).__name__}")
                self._outage(prompt)
                raise
        call.consecutive_outages = 0  # the endpoint answered (even an error status): it is alive
        if response.status_code >= 400:
            text = response.content[:300].decode("utf-8", "replace")
            self._failed(prompt, str(response.status_code), f"HTTP {response.status_code}: {call.redact(text)}")
        return response

    def _failed(self, prompt: _Prompt, cause: str, error: str) -> None:
        self.call.stats.errors[cause] += 1
        prompt.last_error = error

    def _outage(self, prompt: _Prompt) -> None:
        call = self.call
        call.consecutive_outages += 1
        if call.breaker_failures and call.consecutive_outages >= call.breaker_failures and not call.circuit_open:
            call.circuit_open = (f"{CIRCUIT_OPEN}: {call.consecutive_outages} consecutive timeouts/connection "
                                 f"failures (breaker_failures={call.breaker_failures}; last: {prompt.last_error}); "
                                 "no further requests in this call")

    async def aclose(self) -> None:
        await self.inner.aclose()


class OpenAICompatibleJudge:
    """Judge through POST {base_url}/chat/completions with logprobs, on the official `openai` SDK.

    The API key is read from the environment variable `api_key_env` at each call and kept only inside
    that call's client (never on the object, so never in repr, vars or a pickle); api_key_env=None sends
    no key (a local vLLM server). `max_retries` is the SDK's (attempts = 1 + max_retries; a 200 reply
    without usable logprobs is retried within the same allowance). `breaker_failures`: after that many
    consecutive timeouts or connection failures (any prompt; any reply resets the count) the call sends
    nothing more and its unfinished prompts get error "circuit open: ..." (None: never). A deadline set
    with ``judges.deadline.judge_deadline`` ends the call in time: prompts still open get "deadline passed".
    `request_budget` caps the HTTP
    requests (retries included) of one call of score_prompts/classify_prompts; prompts left over get
    error "budget exhausted" without a request. Azure OpenAI (AsyncAzureOpenAI): set `api_version`;
    base_url ".../openai/deployments/<name>" or ".../openai" (then `model` names the deployment);
    auth_style="api-key" sends the key as api-key, "bearer" as an Entra ID token. Put secrets in the
    environment, not in extra_headers (those are plain attributes).

    backoff_base_s / backoff_max_s are deprecated and ignored (a FutureWarning says so when set): the
    SDK's backoff applies (0.5 s doubling to 8 s, jittered; Retry-After honoured up to 120 s).
    """

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        *,
        max_tokens: int = 1,
        temperature: float = 0.0,
        top_logprobs: int = 20,
        seed: int | None = 0,
        max_concurrency: int = 16,
        max_retries: int = 5,
        timeout_s: float = 30.0,
        backoff_base_s: float | None = None,
        backoff_max_s: float | None = None,
        request_budget: int | None = None,
        breaker_failures: int | None = 8,
        classify_max_tokens: int = 16,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        api_version: str | None = None,
        auth_style: Literal["bearer", "api-key"] = "bearer",
        name: str | None = None,
    ) -> None:
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("need max_concurrency >= 1, max_retries >= 0, timeout_s > 0")
        if request_budget is not None and request_budget < 0:
            raise ValueError("request_budget must be >= 0 or None")
        if breaker_failures is not None and breaker_failures < 1:
            raise ValueError(f"breaker_failures must be >= 1 or None, got {breaker_failures}")
        if auth_style not in ("bearer", "api-key"):
            raise ValueError(f"auth_style must be 'bearer' or 'api-key', got {auth_style!r}")
        for arg, value in (("backoff_base_s", backoff_base_s), ("backoff_max_s", backoff_max_s)):
            if value is not None:
                warnings.warn(
                    f"OpenAICompatibleJudge: {arg} is deprecated and ignored; retries use the openai SDK's "
                    "backoff (0.5 s doubling to 8 s, Retry-After honoured up to 120 s). Remove it from the config.",
                    FutureWarning,
                    stacklevel=2,
                )
        self.model = model
        self.name = name or model  # cache key part: the judge model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_logprobs = top_logprobs
        self.seed = seed
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.request_budget = request_budget
        self.breaker_failures = breaker_failures
        self.classify_max_tokens = classify_max_tokens
        self.extra_headers = dict(extra_headers or {})
        self.extra_body = dict(extra_body or {})
        self.api_version = api_version
        self.auth_style = auth_style
        self.stats = JudgeStats()  # lifetime counters
        self.last_stats = JudgeStats()  # counters of the latest call

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    # ---- public API -------------------------------------------------------------------------------

    def check_api_key(self) -> None:
        """Raise MissingAPIKeyError now if the key's environment variable is unset (call at setup)."""
        self._api_key()

    def score_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        return self._judge(prompts, classify=False)

    def classify_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        return self._judge(prompts, classify=True)

    def request_kwargs(self, prompt: str, classify: bool = False) -> dict[str, Any]:
        """The JSON body of one prompt's chat-completions request: the published protocol (extra_body
        merged in)."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.classify_max_tokens if classify else self.max_tokens,
            "temperature": self.temperature,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        if self.seed is not None:
            kwargs["seed"] = self.seed
        return {**kwargs, **self.extra_body}

    # ---- internals --------------------------------------------------------------------------------

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise MissingAPIKeyError(
                f"environment variable {self.api_key_env} is not set: export it with the judge's API key "
                "(or set api_key_env: null for a server that needs no key)"
            )
        return key

    def _judge(self, prompts: Sequence[str], classify: bool) -> list[JudgeResult]:
        prompts = list(prompts)
        if not prompts:
            return []
        key = self._api_key()
        stats = JudgeStats(prompts=len(prompts))
        results = _run_sync(lambda: self._judge_async(prompts, classify, key, stats))
        with _STATS_LOCK:
            self.last_stats = stats
            self.stats.merge(stats)
        return results

    def _client(self, call: _Call) -> tuple[openai.AsyncOpenAI, dict[str, Any]]:
        """The SDK client of one call and the per-request headers (auth lives only in these two)."""
        limits = httpx2.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        verify = _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        transport = _CallTransport(httpx2.AsyncHTTPTransport(verify=verify, limits=limits), call)
        http_client = openai.DefaultAsyncHttpxClient(transport=transport)
        common = dict(base_url=self.base_url, timeout=self.timeout_s, max_retries=self.max_retries,
                      http_client=http_client)
        headers: dict[str, Any] = dict(self.extra_headers)
        key = call.key
        if self.api_version is not None:
            if key is None:  # explicitly keyless: no AZURE_OPENAI_* credential from the environment
                headers.update({"api-key": openai.Omit(), "Authorization": openai.Omit()})
                auth = {"api_key": "unused"}
            else:
                auth = {"api_key": key} if self.auth_style == "api-key" else {"azure_ad_token": key}
            return openai.AsyncAzureOpenAI(api_version=self.api_version, **auth, **common), headers
        if key is None or self.auth_style == "api-key":
            # The SDK wants some key (else it reads OPENAI_API_KEY); this one is never sent.
            headers["Authorization"] = openai.Omit()
            if key is not None:
                headers["api-key"] = key
        return openai.AsyncOpenAI(api_key=key if key and self.auth_style == "bearer" else "unused", **common), headers

    async def _judge_async(
        self, prompts: list[str], classify: bool, key: str | None, stats: JudgeStats
    ) -> list[JudgeResult]:
        # One client and semaphore per call: both belong to this call's event loop.
        call = _Call(stats, asyncio.Semaphore(self.max_concurrency), self.request_budget, key, self.timeout_s,
                     self.breaker_failures)
        try:
            client, headers = self._client(call)
        except Exception as exc:  # e.g. an unusable base_url: every prompt fails, nothing raises
            outcomes: list[Any] = [exc] * len(prompts)
        else:
            async with client:
                tasks = [asyncio.ensure_future(self._one(client, headers, call, p, classify)) for p in prompts]
                _, late = await asyncio.wait(tasks, timeout=time_left())  # the caller's deadline, if any
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
                    stats.failures += len(late)
                    stats.errors["deadline"] += len(late)
                outcomes = [JudgeResult(error=deadline_error()) if t in late else
                            (t.exception() or t.result()) for t in tasks]
        results = []
        for outcome in outcomes:  # safety net: whatever went wrong stays a result, never a raise
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancellation / interrupt: let it through
            if isinstance(outcome, Exception):
                stats.failures += 1
                stats.errors["unexpected"] += 1
                while getattr(outcome, "exceptions", None):  # an ExceptionGroup (anyio): name its first cause
                    outcome = outcome.exceptions[0]
                outcome = JudgeResult(error=call.redact(f"unexpected error: {type(outcome).__name__}: {outcome}"))
            results.append(outcome)
        return results

    async def _one(self, client, headers, call: _Call, prompt: str, classify: bool) -> JudgeResult:
        state = _Prompt()
        _PROMPT.set(state)  # each gathered task runs in its own copy of the context
        body = self.request_kwargs(prompt, classify)
        sdk = client
        while True:
            try:
                # The SDK's documented custom-request call: its retries, backoff and Azure deployment URLs,
                # without re-validating the body against its TypedDicts (a quarter of its CPU per request,
                # taken from the training thread while judging runs beside it).
                raw = await sdk.post("/chat/completions", cast_to=httpx2.Response, body=body,
                                     options={"headers": headers})
                return self._result(raw.content, classify)
            except _Malformed as exc:  # a 200 without usable logprobs: the SDK would not retry it
                call.stats.errors["malformed"] += 1
                state.last_error = f"malformed reply: {exc}"
                left = self.max_retries + 1 - state.attempts
                if left <= 0:
                    break
                sdk = client.with_options(max_retries=left - 1)
            except _CircuitOpen:
                call.stats.failures += 1
                call.stats.errors["circuit_open"] += 1
                return JudgeResult(error=call.circuit_open)
            except _BudgetExhausted:
                call.stats.failures += 1
                call.stats.budget_exhausted += 1
                detail = f" after {state.attempts} attempt(s); last error: {state.last_error}" if state.attempts else ""
                return JudgeResult(error=BUDGET_EXHAUSTED + detail)
            except openai.APIError as exc:  # status, timeout and connection errors, after the SDK's retries
                if not state.attempts:  # refused before sending (none recorded by the transport)
                    state.last_error = call.redact(f"{type(exc).__name__}: {exc}")
                break
        call.stats.failures += 1
        if state.attempts <= 1:
            return JudgeResult(error=state.last_error)
        return JudgeResult(error=f"failed after {state.attempts} attempt(s): {state.last_error}")

    @staticmethod
    def _result(content: bytes, classify: bool) -> JudgeResult:
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise _Malformed(f"body is not JSON ({exc})") from None
        if not classify:
            probs = _first_token_probs(data)
            return JudgeResult(score=aggregate_score(probs), probs=probs)
        # Categorical: the label is the judge's (greedy) answer text; the first-token distribution is
        # kept when the server sends it.
        try:
            probs = _first_token_probs(data)
        except _Malformed:
            probs = None
        label = _message_text(data) or (max(probs, key=probs.get) if probs else None)
        if not label:
            raise _Malformed("no answer text and no logprobs")
        return JudgeResult(probs=probs, label=label)
