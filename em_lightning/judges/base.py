"""Judge contract: the score rule, the result record, the Judge protocol, and prompt rendering.

No Lightning and no torch here: callbacks and offline tools share these pieces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "MIN_NUMERIC_MASS",
    "Judge",
    "JudgeResult",
    "aggregate_score",
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
    """A judge model. `name` identifies the model (it is part of cache keys)."""

    name: str

    def score_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        """0-100 judging of fully rendered judge prompts; one result per prompt, in order."""
        ...

    def classify_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        """Categorical judging: label = the judge's most likely answer; probs = its first-token distribution."""
        ...


# "{{" / "}}" are str.format escapes: templates written for the published code (which calls .format)
# keep their meaning. Any other brace is left alone instead of raising as str.format would.
PLACEHOLDERS = ("question", "answer")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(question|answer)\}")
# What str.format would read as a replacement field: {name}, {0}, {}, {name.attr}, {name!r}, {name:spec},
# { name }. JSON-like text such as {"score": 1} is not one and stays literal.
_FIELD = re.compile(r"\{\{|\}\}|\{(\s*\w*\s*(?:[.\[!:][^{}]*)?)\}")


def template_fields(template: str) -> list[str]:
    """The replacement fields of a judge template, as written (``question``, ``answer``, ``answr``,
    ``answer:>5``, ...), in order; ``{{``/``}}`` escapes are skipped. render_judge_prompt fills only
    ``{question}`` and ``{answer}`` exactly: every other field would stay literal text in the prompt."""
    return [m.group(1) for m in _FIELD.finditer(template) if m.group(1) is not None]


def render_judge_prompt(template: str, question: str, answer: str) -> str:
    """Fill `{question}` and `{answer}` in a judge template in one pass.

    The inserted texts are never scanned again, so braces or placeholders inside the answer stay as
    they are; `{{`/`}}` in the template become `{`/`}` (as with str.format); other braces are kept.
    """
    values = {"question": question, "answer": answer}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is not None:
            return values[name]
        return match.group(0)[0]

    return _PLACEHOLDER.sub(replace, template)
