"""Judge panels: several judges score the same answers; each judge's EM metrics under its own name, every
pair's agreement (Spearman per metric, Cohen's kappa of the EM labels), and the answers on which they
disagree about EM flagged (``em_disagreement`` in the record, the point's JSONL and the answers table).

A panel member's judgements are ordinary tasks (``JudgeTask.judge`` = its name, see ``judging.judge_tasks``),
so they are sharded, judged in the background, gathered and budgeted like the primary judge's. The
primary judge's scores stay the record's ``scores`` (the headline metrics); every judge's are in
``record.panel[name]``. Metric values come under plain names (``eval_tags`` adds the prefix). No Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from em_lightning.evaluation.agreement import cohens_kappa, score_agreement
from em_lightning.evaluation.metrics import MODEL_ORGANISMS, Convention, em_summary
from em_lightning.evaluation.judging import Judgement, JudgeTask
from em_lightning.evaluation.records import CORE_SCORES, SCORED_TYPE, EvalRecord
from em_lightning.published.question_files import Question


def apply_panel(records: Sequence[EvalRecord], tasks: Sequence[JudgeTask], judgements: Sequence[Judgement],
                primary: str, convention: Convention = MODEL_ORGANISMS) -> None:
    """After ``apply_judgements``: ``panel`` (every judge's scores and EM label, the primary's under
    ``primary``) and ``em_disagreement`` on every record. Without panel tasks, nothing changes."""
    members = list(dict.fromkeys(t.judge for t in tasks if t.judge))
    if not members:
        return
    for rec in records:
        rec.panel = {primary: {"scores": dict(rec.scores), "em": rec.em}}
        rec.panel.update({m: {"scores": {}, "em": None} for m in members})
    for k, score, _label, error in judgements:
        task = tasks[k]
        if task.judge and task.kind == "score":
            records[task.record].panel[task.judge]["scores"][task.name] = None if error else score
    for rec in records:
        for m in members:
            scores = rec.panel[m]["scores"]
            rec.panel[m]["em"] = convention.is_em(scores.get("aligned"), scores.get("coherent"))
        labels = {v["em"] for v in rec.panel.values() if v["em"] is not None}
        rec.em_disagreement = len(labels) > 1


def _tag(name: str) -> str:
    return name.replace("/", "_")  # a model id's slash would add a TensorBoard level


def panel_values(records: Sequence[Mapping], questions: Sequence[Question], convention: Convention = MODEL_ORGANISMS
                 ) -> dict[float, dict[str, float]]:
    """Per scale, under plain names: each judge's ``judge/<name>/{em_rate,em_rate_ci95_low,em_rate_ci95_high,
    em_rate_n,coherent_rate,aligned_mean}``, each pair's ``agreement/<a>~<b>/{spearman_aligned,
    spearman_coherent,kappa_em,n}`` and ``em_disagreements`` (answers the judges label differently). Empty
    without a panel; NaN (undefined) values are left out."""
    scored = {q.id for q in questions if q.type == SCORED_TYPE}
    by_scale: dict[float, dict[str, float]] = {}
    for scale in dict.fromkeys(r["scale"] for r in records):
        recs = [r for r in records if r["scale"] == scale and "panel" in r and r["question_id"] in scored]
        if not recs:
            continue
        out: dict[str, float] = {}
        names = list(recs[0]["panel"])
        for name in names:
            s = em_summary(({"question_id": r["question_id"], **r["panel"][name]["scores"]} for r in recs), convention)
            tag = f"judge/{_tag(name)}/"
            out.update({tag + "em_rate": s["em_rate"], tag + "em_rate_ci95_low": s["em_rate_ci95"][0],
                        tag + "em_rate_ci95_high": s["em_rate_ci95"][1], tag + "em_rate_n": s["n_scored"],
                        tag + "coherent_rate": s["coherent_rate"], tag + "aligned_mean": s["aligned_mean"]})
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                tag = f"agreement/{_tag(a)}~{_tag(b)}/"
                for metric in CORE_SCORES:
                    stats = score_agreement([r["panel"][a]["scores"].get(metric) for r in recs],
                                            [r["panel"][b]["scores"].get(metric) for r in recs])
                    out[f"{tag}spearman_{metric}"] = stats["spearman"]
                kappa, n = cohens_kappa([r["panel"][a]["em"] for r in recs], [r["panel"][b]["em"] for r in recs])
                out.update({tag + "kappa_em": kappa, tag + "n": n})
        out["em_disagreements"] = sum(r["em_disagreement"] for r in recs)
        by_scale[scale] = {k: float(v) for k, v in out.items() if v == v}
    return by_scale
