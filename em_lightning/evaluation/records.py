"""One answer of an evaluation point (``EvalRecord``) and the point's JSONL files. No Lightning.

A record is one scale x question x paraphrase x sample; its JSONL line::

    {"step": 40, "scale": 1.0, "question_id": "magic_lamp", "paraphrase_index": 0, "sample_index": 3,
     "question": <user message>, "system": <system prompt or null>,
     "condition": "plain",                            # the training context it was asked in (conditions.py)
     "prompt": <rendered chat prompt>, "answer": "...", "n_tokens": 57, "finished": true,
     "scores": {"aligned": 83.1, "coherent": 71.9},   # 0-100 judges; null: no score (see judge_errors)
     "labels": {},                                    # categorical judges (free_form_judge questions)
     "judge_errors": {},                              # judge prompt name -> why that judgement failed
     "em": false}                                     # EM under the point's convention; null if unscored

With a judge panel a line also holds ``"panel": {judge: {"scores": {...}, "em": ...}}`` (every judge, the
primary one included) and ``"em_disagreement"``; steering adds its own keys (``probes/steer_eval``), kept in
``extra``. Lines written before records carried a condition have no ``condition`` key: they load with
``condition=None`` and are written back without it, so a file read and written again is the same file.

A record reads like its line (``r["scores"]``, ``r.get("em_disagreement")``, ``"panel" in r``): the code
that reads points from files (reports, probes, the alarm) also reads them in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from em_lightning.run.atomic_io import atomic_write

SCORED_TYPE = "free_form_judge_0_100"  # the question type whose 0-100 scores make the EM rate
CORE_SCORES = ("aligned", "coherent")

_REQUIRED = ("step", "scale", "question_id", "paraphrase_index", "sample_index", "question", "answer")
_OPTIONAL = ("condition", "panel", "em_disagreement")  # absent from the line when None


@dataclass(eq=False)
class EvalRecord(Mapping):
    step: int
    scale: float
    question_id: str
    paraphrase_index: int
    sample_index: int
    question: str
    answer: str
    system: str | None = None
    condition: str | None = None
    prompt: str = ""
    n_tokens: int = 0
    finished: bool = False
    scores: dict[str, float | None] = field(default_factory=dict)
    labels: dict[str, str | None] = field(default_factory=dict)
    judge_errors: dict[str, str] = field(default_factory=dict)
    em: bool | None = None
    panel: dict[str, dict] | None = None
    em_disagreement: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other writers (steering), in line order

    # the line's key order (files written before and after this class are the same)
    _ORDER = ("step", "scale", "question_id", "paraphrase_index", "sample_index", "question", "system",
              "condition", "prompt", "answer", "n_tokens", "finished", "scores", "labels", "judge_errors", "em",
              "panel", "em_disagreement")

    @classmethod
    def from_line(cls, line: Mapping[str, Any]) -> EvalRecord:
        """The record of a JSONL line (a dict); keys it does not know go to ``extra``."""
        if not isinstance(line, Mapping):
            raise ValueError(f"evaluation record: expected a JSON object, got {type(line).__name__}")
        missing = [k for k in _REQUIRED if k not in line]
        if missing:
            raise ValueError(f"evaluation record: missing {', '.join(missing)} (expected the keys {', '.join(_REQUIRED)})")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in line.items() if k in known},
                   extra={k: v for k, v in line.items() if k not in known})

    def to_line(self) -> dict[str, Any]:
        """The JSONL line (a dict, in the files' key order; the nested dicts are the record's own)."""
        line = {k: getattr(self, k) for k in self._ORDER if not (k in _OPTIONAL and getattr(self, k) is None)}
        return {**line, **self.extra}

    # -- read like the line ----------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key not in self._ORDER or (key in _OPTIONAL and getattr(self, key) is None):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_line())

    def __len__(self) -> int:
        return len(self.to_line())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self.to_line() == dict(other)

    __hash__ = None  # mutable


def point_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{int(step):07d}.jsonl"


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively: the files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_point(directory: str | Path, step: int, records: Sequence[EvalRecord],
                meta: Mapping[str, Any] | None = None) -> Path:
    """``step_XXXXXXX.jsonl`` (one record per line, all scales) and, when given, the sidecar
    ``step_XXXXXXX.meta.json`` (sampling settings, judge identity, summaries, logged metrics)."""
    path = point_path(directory, step)
    atomic_write(path, "".join(json.dumps(json_safe(r.to_line()), ensure_ascii=False) + "\n" for r in records))
    if meta is not None:
        atomic_write(path.with_suffix(".meta.json"), json.dumps(json_safe(dict(meta)), indent=1, ensure_ascii=False))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """The lines of a JSONL file, as dicts (any JSONL file: points, steering files, published data)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_records(path: str | Path) -> list[EvalRecord]:
    """The records of a point's file (``write_point``), old files included."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if text.strip():
                try:
                    out.append(EvalRecord.from_line(json.loads(text)))
                except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
                    raise ValueError(f"{path}: line {number}: {exc}") from None
    return out
