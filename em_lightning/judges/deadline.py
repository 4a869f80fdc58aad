"""A deadline for the judge calls made inside a block, so whoever waits for them waits a bounded time.

    with judge_deadline(600):              # InLoopJudge: one evaluation point's judging
        judge.score_prompts(prompts)       # a judge that honours it stops sending when time is up

It lives in a context variable (per thread, copied into asyncio tasks), not in the Judge protocol: judges
that never wait on a network (demo, local) need not know it. A judge that honours it gives every prompt left
unanswered ``JudgeResult(error="deadline passed: ...")`` (``DEADLINE_PASSED``).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

DEADLINE_PASSED = "deadline passed"
CIRCUIT_OPEN = "circuit open"  # a judge that stopped calling a dead endpoint (OpenAICompatibleJudge)

_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("em_lightning_judge_deadline",
                                                                                       default=None)


@contextmanager
def judge_deadline(seconds: float | None) -> Iterator[None]:
    """Judge calls inside the block should end within ``seconds`` from now (None: no deadline)."""
    token = _DEADLINE.set(None if seconds is None else (time.monotonic() + float(seconds), float(seconds)))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds left before the current deadline (0 once passed); None without a deadline."""
    deadline = _DEADLINE.get()
    return None if deadline is None else max(0.0, deadline[0] - time.monotonic())


def deadline_error() -> str:
    deadline = _DEADLINE.get()
    seconds = f"{deadline[1]:g} s" if deadline else "?"
    return f"{DEADLINE_PASSED}: not judged within the point's {seconds} (InLoopJudge point_deadline_s)"


def is_lost_to_judge_outage(error: str | None) -> bool:
    """A judgement that failed because the judge stopped answering (deadline or open circuit), not on its own."""
    return bool(error) and error.startswith((DEADLINE_PASSED, CIRCUIT_OPEN))
