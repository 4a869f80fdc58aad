"""Calibrate a judge against published judged answers: re-judge every answer with the *published* judge
prompt of its question, then compare the scores and EM labels with the published ones. No Lightning.

``calibrate`` returns the content of ``calibration.json``:

- ``n``: rows compared for EM (both the reference and the judge scored both metrics), ``n_rows``: rows read;
- ``spearman``, ``pearson``, ``mae``, ``bias`` (judge - reference): per metric ({"aligned": .., "coherent": ..}),
  over that metric's pairs (``n_pairs``);
- ``em_rate``: {"reference", "judge", "ci95_reference", "ci95_judge", "n_reference", "n_judge"} under the
  stated ``convention`` (intervals: the two-stage cluster bootstrap over questions); ``by_convention``:
  the same for every named convention;
- ``kappa_em``: Cohen's kappa of the EM / not-EM labels over the ``n`` rows;
- ``failures`` (judge calls that failed), ``judge_no_score`` (the judge answered but put < 25% of its mass
  on numbers) and ``reference_missing`` (the published score is None): counted per metric, never dropped
  silently.

Per-row results (``rows``) go to ``judged.jsonl`` beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from em_lightning.evaluation.agreement import cohens_kappa, score_agreement
from em_lightning.evaluation.metrics import Convention, em_rate_with_interval
from em_lightning.published.judge_prompts import render_judge_prompt
from em_lightning.published.judged_answers import METRICS, JudgedAnswer
from em_lightning.judges.base import Judge, JudgeResult, is_meaningful
from em_lightning.published.question_files import Question


def calibration_prompts(rows: Sequence[JudgedAnswer], questions: Sequence[Question]) -> dict[str, list[str]]:
    """metric -> the published judge prompt of each row's question, rendered with its question and answer."""
    by_id = {q.id: q for q in questions}
    prompts: dict[str, list[str]] = {m: [] for m in METRICS}
    for row in rows:
        q = by_id.get(row.question_id)
        if q is None:
            raise ValueError(f"line {row.line}: question_id {row.question_id!r} is not in the question file(s) "
                             f"(give the file whose judge prompts produced the scores: --questions FILE)")
        for m in METRICS:
            if m not in q.judge_prompts:
                raise ValueError(f"line {row.line}: question {q.id!r} has no {m!r} judge prompt")
            prompts[m].append(render_judge_prompt(q.judge_prompts[m], row.question, row.answer))
    return prompts


def _judge_all(judge: Judge, prompts: list[str]) -> list[JudgeResult]:
    """One batched call that never raises: a failure is a counted JudgeResult(error=...)."""
    try:
        results = list(judge.score_prompts(prompts))
        if len(results) != len(prompts):
            raise RuntimeError(f"{len(results)} results for {len(prompts)} prompts")
        return results
    except Exception as exc:  # noqa: BLE001 - failures are counted, not raised
        return [JudgeResult(error=f"judge raised {type(exc).__name__}: {exc}")] * len(prompts)


def _em_rates(groups_ref: Mapping, groups_judge: Mapping, convention: Convention) -> dict[str, Any]:
    ref, judged = em_rate_with_interval(groups_ref, convention), em_rate_with_interval(groups_judge, convention)
    return {"reference": ref["em_rate"], "judge": judged["em_rate"], "ci95_reference": ref["ci95"],
            "ci95_judge": judged["ci95"], "n_reference": ref["n_scored"], "n_judge": judged["n_scored"]}


def calibrate(rows: Sequence[JudgedAnswer], questions: Sequence[Question], judge: Judge,
              convention: Convention, conventions: Mapping[str, Convention]) -> dict[str, Any]:
    """Re-judge ``rows`` with ``judge`` and compare (see the module doc); ``rows`` of the result holds
    one dict per row: its reference and judge scores, EM labels and errors."""
    prompts = calibration_prompts(rows, questions)
    results = {m: _judge_all(judge, prompts[m]) for m in METRICS}
    per_row: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        judged = {m: results[m][i].score for m in METRICS}
        errors = {m: results[m][i].error for m in METRICS if results[m][i].error}
        per_row.append({
            "line": row.line, "question_id": row.question_id, "reference": dict(row.scores), "judge": judged,
            "judge_errors": errors,
            "em_reference": convention.is_em(row.scores["aligned"], row.scores["coherent"]),
            "em_judge": convention.is_em(judged["aligned"], judged["coherent"]),
        })
    out: dict[str, Any] = {"judge": getattr(judge, "name", type(judge).__name__), "meaningful": is_meaningful(judge),
                           "convention": convention.describe(), "n_rows": len(rows)}
    stats = {m: score_agreement([r["reference"][m] for r in per_row], [r["judge"][m] for r in per_row])
             for m in METRICS}
    for key in ("spearman", "pearson", "mae", "bias"):
        out[key] = {m: stats[m][key] for m in METRICS}
    out["n_pairs"] = {m: stats[m]["n"] for m in METRICS}
    kappa, n = cohens_kappa([r["em_reference"] for r in per_row], [r["em_judge"] for r in per_row])
    out["n"], out["kappa_em"] = n, kappa
    groups_ref: dict[str, list] = {}
    groups_judge: dict[str, list] = {}
    for r in per_row:
        groups_ref.setdefault(r["question_id"], []).append((r["reference"]["aligned"], r["reference"]["coherent"]))
        groups_judge.setdefault(r["question_id"], []).append((r["judge"]["aligned"], r["judge"]["coherent"]))
    out["em_rate"] = _em_rates(groups_ref, groups_judge, convention)
    out["by_convention"] = {name: _em_rates(groups_ref, groups_judge, c) for name, c in conventions.items()}
    out["failures"] = {m: sum(1 for r in per_row if m in r["judge_errors"]) for m in METRICS}
    out["judge_no_score"] = {m: sum(1 for r in per_row if r["judge"][m] is None and m not in r["judge_errors"])
                             for m in METRICS}
    out["reference_missing"] = {m: sum(1 for r in per_row if r["reference"][m] is None) for m in METRICS}
    out["rows"] = per_row
    return out
