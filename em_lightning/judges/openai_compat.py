"""Judge over any OpenAI-compatible chat-completions endpoint (OpenAI, Azure OpenAI, vLLM, ...).

The published protocol: one user message, max_tokens 1, temperature 0, top 20 logprobs, seed 0; the
score is aggregate_score over the first token's top logprobs. Requests run concurrently (bounded),
transient failures are retried with backoff, and a failure becomes JudgeResult(error=...) instead of
an exception, so a flaky endpoint never stops a training run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from .base import JudgeResult, aggregate_score

__all__ = ["JudgeStats", "MissingAPIKeyError", "OpenAICompatibleJudge"]

BUDGET_EXHAUSTED = "budget exhausted"
_RETRY_STATUS = {408, 409, 429}  # plus every 5xx
_STATS_LOCK = threading.Lock()  # module level: a lock on the judge would not pickle


class MissingAPIKeyError(RuntimeError):
    """The environment variable that should hold the API key is not set (a setup error, not transient)."""


class _Malformed(ValueError):
    """A 200 reply without the fields we need."""


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


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


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
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


class OpenAICompatibleJudge:
    """Judge through POST {base_url}/chat/completions with logprobs.

    The API key is read from the environment variable `api_key_env` at each call and kept only inside
    that call (never on the object, so never in repr, vars or a pickle); api_key_env=None sends no key
    (a local vLLM server). `request_budget` caps the HTTP requests (retries included) of one call of
    score_prompts/classify_prompts; prompts left over get error "budget exhausted" without a request.
    Azure OpenAI: base_url=".../openai/deployments/<name>", api_version="2024-06-01", auth_style="api-key".
    Put secrets in the environment, not in extra_headers (those are plain attributes).
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
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        request_budget: int | None = None,
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
        if auth_style not in ("bearer", "api-key"):
            raise ValueError(f"auth_style must be 'bearer' or 'api-key', got {auth_style!r}")
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
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.request_budget = request_budget
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

    def _headers(self, key: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.extra_headers}
        if key is not None:
            if self.auth_style == "api-key":
                headers["api-key"] = key
            else:
                headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, prompt: str, classify: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.classify_max_tokens if classify else self.max_tokens,
            "temperature": self.temperature,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        body.update(self.extra_body)
        return body

    async def _judge_async(
        self, prompts: list[str], classify: bool, key: str | None, stats: JudgeStats
    ) -> list[JudgeResult]:
        # One client and semaphore per call: both belong to this call's event loop.
        budget = [self.request_budget]  # shared, mutated only between awaits (single thread)
        semaphore = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(
            headers=self._headers(key), timeout=httpx.Timeout(self.timeout_s), limits=limits
        ) as client:
            tasks = [self._one(client, semaphore, budget, p, classify, key, stats) for p in prompts]
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        results = []
        for outcome in outcomes:  # safety net: whatever went wrong stays a result, never a raise
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancellation / interrupt: let it through
            if isinstance(outcome, Exception):
                stats.failures += 1
                stats.errors["unexpected"] += 1
                text = f"unexpected error: {type(outcome).__name__}: {outcome}"
                outcome = JudgeResult(error=self._redact(text, key))
            results.append(outcome)
        return results

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server said how long to wait
            return min(retry_after, self.backoff_max_s)
        delay = self.backoff_base_s * (2**attempt) * random.uniform(0.5, 1.5)  # jitter spreads retries
        return min(delay, self.backoff_max_s)

    async def _one(self, client, semaphore, budget, prompt, classify, key, stats) -> JudgeResult:
        url = f"{self.base_url}/chat/completions"
        params = {"api-version": self.api_version} if self.api_version else None
        body = self._body(prompt, classify)
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if budget[0] is not None:
                if budget[0] <= 0:
                    stats.failures += 1
                    stats.budget_exhausted += 1
                    detail = "" if attempt == 0 else f" after {attempt} attempt(s); last error: {last_error}"
                    return JudgeResult(error=BUDGET_EXHAUSTED + detail)
                budget[0] -= 1
            retry_after = None
            async with semaphore:
                stats.requests += 1
                if attempt:
                    stats.retries += 1
                try:
                    response = await client.post(url, json=body, params=params)
                except httpx.TimeoutException:
                    cause, last_error = "timeout", f"timeout after {self.timeout_s} s"
                except httpx.HTTPError as exc:  # connection refused/reset, protocol errors
                    cause, last_error = "connection", f"connection error: {type(exc).__name__}"
                else:
                    status = response.status_code
                    if status == 200:
                        try:
                            return self._result(response, classify)
                        except (_Malformed, ValueError) as exc:  # ValueError: body is not JSON
                            cause, last_error = "malformed", f"malformed reply: {exc}"
                    else:
                        cause = str(status)
                        last_error = f"HTTP {status}: {self._redact(response.text[:300], key)}"
                        if status not in _RETRY_STATUS and status < 500:  # 400/401/404: retrying won't help
                            stats.errors[cause] += 1
                            stats.failures += 1
                            return JudgeResult(error=last_error)
                        retry_after = _parse_retry_after(response.headers.get("retry-after"))
            stats.errors[cause] += 1
            if attempt < self.max_retries:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        stats.failures += 1
        return JudgeResult(error=f"failed after {self.max_retries + 1} attempt(s): {last_error}")

    @staticmethod
    def _redact(text: str, key: str | None) -> str:
        return text.replace(key, "***") if key else text

    @staticmethod
    def _result(response: httpx.Response, classify: bool) -> JudgeResult:
        data = response.json()
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
