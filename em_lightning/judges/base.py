"""Judge contract: the score rule, the result record, the Judge protocol, and prompt rendering.

No Lightning and no torch here: callbacks and offline tools share these pieces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from em_lightning.published.judge_prompts import render_judge_prompt, template_fields

__all__ = [
    "MIN_NUMERIC_MASS",
    "Judge",
    "JudgeResult",
    "aggregate_score",
    "is_meaningful",
    "parse_score_key",
    "render_judge_prompt",
    "template_fields",
]

# The published rule: a judge reply whose numeric tokens carry less than this probability mass
# (e.g. a refusal) gives no score.
MIN_NUMERIC_MASS = 0.25

_ASCII_DIGITS = re.compile(r"[0-9]+")


def parse_score_key(key: str) -> int | None:
    """Return the integer 0..100 that a judge token stands for, or None.

    Surrounding whitespace is stripped (" 85" and "85\\n" are 85). Only ASCII digits count: no sign, no
    decimal point, no underscore, no other scripts' digits. Leading zeros are accepted ("085" is 85),
    as Python's int() in the published evaluation code accepts them.
    """
    text = key.strip()
    if not _ASCII_DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if value <= 100 else None


def aggregate_score(probs: Mapping[str, float]) -> float | None:
    """Probability-weighted mean of the numbers 0..100 in a token -> probability map (contract).

    Keys that do not parse (see parse_score_key) are ignored; several keys that parse to the same number
    (" 85", "85") simply add up. The mean is normalised by the numeric mass; when that mass is below
    MIN_NUMERIC_MASS the reply is not a score and the result is None. Non-finite or negative
    probabilities are ignored.
    """
    mass = 0.0
    weighted = 0.0
    for key, prob in probs.items():
        value = parse_score_key(key if isinstance(key, str) else str(key))
        p = float(prob)
        if value is None or not math.isfinite(p) or p <= 0.0:
            continue
        mass += p
        weighted += value * p
    if mass < MIN_NUMERIC_MASS:
        return None
    return weighted / mass


@dataclass
class JudgeResult:
    """One judged prompt.

    score: 0..100 expected score (score_prompts) or None (failure, or too little numeric mass).
    probs: the distribution the score/label came from (token or number -> probability).
    label: the judge's answer for categorical judging (classify_prompts).
    error: why the judgement failed; a failure always has score None. None means success, even when the
        score is None because the judge answered with non-numbers.
    """

    score: float | None = None
    probs: dict[str, float] | None = None
    label: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Judge(Protocol):
    """A judge model. `name` identifies the model (it is part of cache keys).

    A judge whose scores mean nothing (the offline demo judge) also sets ``meaningful = False``: every
    number it produces is then labelled as such (see ``is_meaningful``).
    """

    name: str

    def score_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        """0-100 judging of fully rendered judge prompts; one result per prompt, in order."""
        ...

    def classify_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        """Categorical judging: label = the judge's most likely answer; probs = its first-token distribution."""
        ...


def is_meaningful(judge: object) -> bool:
    """Whether a judge's scores mean something (``meaningful`` attribute; judges without one: True)."""
    return bool(getattr(judge, "meaningful", True))
