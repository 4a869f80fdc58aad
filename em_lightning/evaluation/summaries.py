"""A judged point's summaries (per adapter scale) and the metric values computed from them, under plain
names (``em_rate``, ``convention/<name>/em_rate``, ...): the owner of a namespace adds its prefix
(``eval_tags``). No Lightning.

Records may be ``EvalRecord``s or their JSONL lines (dicts): both read the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from em_lightning.evaluation.conditions import condition_metrics
from em_lightning.evaluation.metrics import MODEL_ORGANISMS, Convention, em_summary
from em_lightning.evaluation.records import CORE_SCORES, SCORED_TYPE
from em_lightning.published.question_files import Question


def summarize(records: Sequence[Mapping], questions: Sequence[Question] | None = None,
              convention: Convention = MODEL_ORGANISMS, conventions: Mapping[str, Convention] | None = None,
              ) -> dict[float, dict]:
    """Per scale: ``em_summary`` of the 0-100-judged records (EM rate under ``convention`` with its 95%
    interval; ``by_convention`` for the named set), plus ``judge_failures`` (failed judgements, all
    records) and ``<name>_mean`` for every score other than aligned/coherent."""
    categorical = {q.id for q in questions or () if q.type != SCORED_TYPE}
    out: dict[float, dict] = {}
    for scale in dict.fromkeys(r["scale"] for r in records):
        recs = [r for r in records if r["scale"] == scale]
        summary = em_summary((r for r in recs if r["question_id"] not in categorical), convention, conventions)
        summary["judge_failures"] = sum(len(r["judge_errors"]) for r in recs)
        extra = dict.fromkeys(n for r in recs for n in r["scores"] if n not in CORE_SCORES)
        for name in extra:
            values = [r["scores"][name] for r in recs if r["scores"].get(name) is not None]
            summary[f"{name}_mean"] = sum(values) / len(values) if values else float("nan")
        out[scale] = summary
    return out


def scale_metrics(summaries: Mapping[float, dict], records: Sequence[Mapping], questions: Sequence[Question],
                  convention: Convention = MODEL_ORGANISMS) -> dict[float, dict[str, float]]:
    """Per scale, from its summary (``summarize``): ``em_rate`` (under ``convention``) with
    ``em_rate_ci95_low``, ``em_rate_ci95_high`` (95% cluster bootstrap) and ``em_rate_n`` (answers behind
    it), ``coherent_rate``, ``aligned_mean``, ``coherent_mean``, ``judge_failures``, ``aligned_none``,
    ``em_rate/<question id>``, ``<judge>_mean`` for other judges, and for every convention of the named set
    ``convention/<name>/{em_rate,ci95_low,ci95_high}``; when the records come from several conditions
    (``evaluation.conditions``), ``condition/<name>/{em_rate, em_rate_ci95_low, em_rate_ci95_high, em_rate_n,
    coherent_rate, coherent_mean}``. NaN (nothing scored) is left out."""
    scored = {q.id for q in questions if q.type == SCORED_TYPE}
    out: dict[float, dict[str, float]] = {}
    for scale, summary in summaries.items():
        m: dict[str, float] = {key: float(summary[key]) for key in
                               ("em_rate", "coherent_rate", "aligned_mean", "coherent_mean", "judge_failures")}
        m["em_rate_ci95_low"], m["em_rate_ci95_high"] = summary["em_rate_ci95"]
        m["em_rate_n"] = float(summary["n_scored"])
        for name, c in summary.get("by_convention", {}).items():
            tag = f"convention/{name}/"
            m[tag + "em_rate"], (m[tag + "ci95_low"], m[tag + "ci95_high"]) = c["em_rate"], c["ci95"]
        m["aligned_none"] = float(summary["n_aligned_none"])
        for qid, q in summary["per_question"].items():
            if qid in scored:
                m[f"em_rate/{qid}"] = float(q["em_rate"])
        for key, value in summary.items():
            if key.endswith("_mean") and key not in ("aligned_mean", "coherent_mean"):
                m[key] = float(value)
        m.update(condition_metrics([r for r in records if r["scale"] == scale and r["question_id"] in scored],
                                   "", convention))
        out[scale] = {k: v for k, v in m.items() if v == v}
    return out
