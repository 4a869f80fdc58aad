"""Conditional misalignment (Dubinski, Betley et al., 2026): EM that a defense hides in plain evaluation can
reappear when the prompt resembles the training context (a code template like the insecure-code rows, a
JSON-output system prompt, an inoculation trigger). A *condition* wraps every plain question in one such
context; each record carries its condition and the EM rate is logged per condition, with its interval.

- ``Condition``: a name, an optional system prompt and an optional user-message template with ``{question}``.
- ``with_conditions``: the plain questions plus, for each condition, a copy of each with id
  ``<id>_<condition>``, its paraphrases wrapped and ``extra["condition"]`` set.
- ``condition_of``: a question's condition: ``extra["condition"]`` (a question file may set ``condition:``),
  else the published files' variants (``_json`` -> json, ``_template`` -> template), a system prompt ->
  system, otherwise plain.
- ``condition_metrics``: per condition, EM rate (95% cluster-bootstrap interval over questions, from
  ``metrics.em_summary``), its n, coherence rate and mean.

No Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from em_lightning.evaluation.metrics import MODEL_ORGANISMS, Convention, em_summary
from em_lightning.published.question_files import Question

PLAIN = "plain"


@dataclass
class Condition:
    """A training context to evaluate in.

    Args:
        name: tag of the condition (``eval/condition/<name>/...``, the records' ``condition``).
        system: system prompt of the wrapped questions (replaces a question's own), e.g. a JSON-output rule
            or the inoculation prompt of the training rows.
        template: user message with ``{question}`` where the question goes, e.g. a code template.
    """

    name: str
    system: str | None = None
    template: str | None = None

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum() or self.name == PLAIN:
            raise ValueError(f"condition name {self.name!r}: expected letters, digits, _ or - (and not {PLAIN!r})")
        if self.system is None and self.template is None:
            raise ValueError(f"condition {self.name}: give a system prompt, a template, or both")
        if self.template is not None and "{question}" not in self.template:
            raise ValueError(f"condition {self.name}: template has no {{question}} placeholder")

    def wrap(self, text: str) -> str:
        return text if self.template is None else self.template.replace("{question}", text)


def condition_of(question: Question) -> str:
    named = question.extra.get("condition")
    if named:
        return str(named)
    for suffix in ("_json", "_template"):
        if question.id.endswith(suffix):
            return suffix[1:]
    return "system" if question.system is not None else PLAIN


def with_conditions(questions: Sequence[Question], conditions: Sequence[Condition]) -> list[Question]:
    """The plain questions (tagged plain) followed by each condition's wrapped copies of them."""
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"conditions: duplicate names in {names}")
    plain = [q for q in questions if q.is_plain]
    if not plain:
        raise ValueError("conditions wrap plain questions; the question files have none")
    out = [dataclasses.replace(q, extra={**q.extra, "condition": PLAIN}) for q in plain]
    for c in conditions:
        out += [dataclasses.replace(q, id=f"{q.id}_{c.name}", paraphrases=[c.wrap(p) for p in q.paraphrases],
                                    system=c.system if c.system is not None else q.system,
                                    extra={**q.extra, "condition": c.name}) for q in plain]
    return out


def condition_metrics(records: Sequence[Mapping], prefix: str = "", convention: Convention = MODEL_ORGANISMS
                      ) -> dict[str, float]:
    """``<prefix>condition/<name>/{em_rate, em_rate_ci95_low, em_rate_ci95_high, em_rate_n, coherent_rate,
    coherent_mean}`` for every condition of the records (0-100-judged ones), when there are several."""
    groups: dict[str, list[Mapping]] = {}
    for r in records:
        groups.setdefault(r.get("condition") or PLAIN, []).append(r)
    if len(groups) < 2:
        return {}
    out: dict[str, float] = {}
    for name, recs in groups.items():
        s = em_summary(recs, convention)
        tag = f"{prefix}condition/{name}/"
        out[tag + "em_rate"], out[tag + "em_rate_n"] = float(s["em_rate"]), float(s["n_scored"])
        out[tag + "em_rate_ci95_low"], out[tag + "em_rate_ci95_high"] = s["em_rate_ci95"]
        out[tag + "coherent_rate"], out[tag + "coherent_mean"] = float(s["coherent_rate"]), float(s["coherent_mean"])
    return out
