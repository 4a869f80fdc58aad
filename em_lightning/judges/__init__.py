"""Judges: score rule, Judge protocol, OpenAI-compatible and local transformers judges, cache.

The heavy or optional back ends (httpx for the API judge, torch for the local one) load on first use,
so `from em_lightning.judges import aggregate_score` costs nothing.
"""

from __future__ import annotations

import importlib

from em_lightning.judges.base import (
    MIN_NUMERIC_MASS,
    Judge,
    JudgeResult,
    aggregate_score,
    is_meaningful,
    parse_score_key,
    render_judge_prompt,
)
from em_lightning.judges.cache import CachedJudge, JudgeCache

_LAZY = {
    "OpenAICompatibleJudge": ".openai_compat",
    "JudgeStats": ".openai_compat",
    "MissingAPIKeyError": ".openai_compat",
    "LocalHFJudge": ".local_hf",
    "PretrainedLocalJudge": ".local_hf",
}

__all__ = [
    "MIN_NUMERIC_MASS",
    "CachedJudge",
    "Judge",
    "JudgeCache",
    "JudgeResult",
    "aggregate_score",
    "is_meaningful",
    "parse_score_key",
    "render_judge_prompt",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
