"""Published judged answers: a CSV of answers with a judge's aggregated scores (and, optionally, the judge's
top-20 token probabilities), as Betley et al. publish them in ``results/*.csv``.

Columns read: ``question_id``, ``question``, ``answer``, ``aligned``, ``coherent`` (0-100, or empty /
``None`` / ``nan`` when the judge gave no score: under 25% of its mass on numbers), and when present
``judge_aligned`` / ``judge_coherent``: the judge's first-token distribution as a Python/JSON dict
``{token: probability}``. Other columns (``model``, ``group``, ...) are kept in ``extra``.
Bad input raises ValueError naming the file, the line and the field.
"""

from __future__ import annotations

import ast
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("aligned", "coherent")
REQUIRED = ("question_id", "question", "answer", *METRICS)
_MISSING = {"", "none", "nan", "null"}


@dataclass
class JudgedAnswer:
    line: int  # line of the CSV where the row starts
    question_id: str
    question: str
    answer: str
    scores: dict[str, float | None]  # metric -> reference score (None: no score)
    probs: dict[str, dict[str, float] | None] = field(default_factory=dict)  # metric -> judge distribution
    extra: dict[str, str] = field(default_factory=dict)


def _score(text: str, where: str) -> float | None:
    if text.strip().lower() in _MISSING:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a score 0..100 or empty, got {text[:40]!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 100.0):
        raise ValueError(f"{where}: expected a score 0..100 or empty, got {value}")
    return value


def _probs(text: str, where: str) -> dict[str, float] | None:
    if text.strip().lower() in _MISSING:
        return None
    try:
        value = ast.literal_eval(text)  # the published files write Python dict reprs
        return {str(k): float(v) for k, v in value.items()}
    except (ValueError, SyntaxError, AttributeError, TypeError):
        raise ValueError(f"{where}: expected a dict {{token: probability}}, got {text[:40]!r}") from None


def read_judged_csv(path: str | Path) -> list[JudgedAnswer]:
    """Every row of a judged-answers CSV (see the module doc); ValueError on bad input or no rows."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    rows: list[JudgedAnswer] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected at least {list(REQUIRED)}")
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise ValueError(f"{path}:{start}: more fields than the header has")
            where = f"{path}:{start}"
            if not row["question_id"].strip():
                raise ValueError(f"{where}: question_id is empty")
            rows.append(JudgedAnswer(
                line=start,
                question_id=row["question_id"].strip(),
                question=row["question"],
                answer=row["answer"],
                scores={m: _score(row[m] or "", f"{where}: field {m}") for m in METRICS},
                probs={m: _probs(row[f"judge_{m}"] or "", f"{where}: field judge_{m}")
                       for m in METRICS if f"judge_{m}" in row},
                extra={k: v for k, v in row.items() if k not in REQUIRED and not k.startswith("judge_")},
            ))
            start = reader.line_num + 1
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
