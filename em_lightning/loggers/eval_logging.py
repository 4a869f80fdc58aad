"""What InLoopJudge writes for the user: the evaluation plan announced at the start of fit, and each judged
point's metrics and answer table in the run's loggers, through RunLogger (TensorBoard's TEXT tab for the
table; ``texts.jsonl`` for loggers without one)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from em_lightning.run.atomic_io import atomic_write
from em_lightning.evaluation.plan import EvaluationSource, answers_per_point, judge_calls_per_point, planned_points
from em_lightning.loggers.eval_tags import scale_prefix
from em_lightning.evaluation.records import CORE_SCORES
from em_lightning.loggers.run_logger import RunLogger


def announce_plan(trainer: pl.Trainer, run_dir: Path, source: EvaluationSource, names: list[str], step: int,
                  max_judge_calls: int | None, calls_used: int, judges: int = 1, note: str = "") -> None:
    """Print the points, answers and judge calls from ``step`` to the planned end, and (rank 0) write them
    to ``<run_dir>/evaluation_plan.json``. ``source``: what SampleGenerations samples and when; ``judges``:
    how many judges score each answer (a panel); ``note``: the convention / demo-judge line (point_note)."""
    end = int(trainer.estimated_stepping_batches)
    ckpt = trainer.checkpoint_callback  # StepCheckpoint (its every_n_steps), or another Checkpoint
    every_ckpt = getattr(ckpt, "every_n_steps", None) if source.at_checkpoints else None
    points = set(planned_points(step, end, source.every_n_steps, every_ckpt, source.at_fit_end))
    answers = len(points) * answers_per_point(source.questions, source.sampling, source.scales)
    calls = len(points) * judge_calls_per_point(source.questions, source.sampling, source.scales, names) * judges
    plan = {"from_step": step, "to_step": end, "points": sorted(points), "answers": answers,
            "judge_calls": calls, "judge_prompts": names, "max_judge_calls": max_judge_calls,
            "judge_calls_used_before": calls_used,
            "note": "each phase-transition window adds points; cached judgements cost no API call"}
    budget = "" if max_judge_calls is None else f" (run budget {max_judge_calls}, {calls_used} used)"
    rank_zero_info(f"evaluation plan: {len(points)} points from step {step} to {end}, {answers} answers, "
                   f"{calls} judge calls{budget}; written to {run_dir / 'evaluation_plan.json'}"
                   + (f"\n{note.replace('**', '')}" if note else ""))  # markdown bold is for the TEXT tab
    if trainer.is_global_zero:
        atomic_write(run_dir / "evaluation_plan.json", json.dumps(plan, indent=1))


DEMO_LABEL = "DEMO JUDGE: these scores mean nothing (offline plumbing, not a measurement)"


def point_note(convention: str, judges: dict[str, str], meaningful: bool) -> str:
    """What every answers table of a point states first: the EM convention, the judge(s), a demo label."""
    names = ", ".join(dict.fromkeys(judges.values())) or "none"
    note = f"EM convention {convention}; judge(s): {names}."
    return note if meaningful else f"**{DEMO_LABEL}.** {note}"


def log_point(log: RunLogger, step: int, records: list[dict], metrics: dict[str, float],
              answers_per_question: int, max_answer_chars: int, root: str = "eval", note: str = "") -> None:
    """The point's metrics at its own step, and per adapter scale a table of a few answers under
    ``<root>/`` (``eval_demo/`` for the demo judge), headed by ``note`` (``point_note``); then saved, so that
    a judged point survives a crash right after it."""
    log.scalars(metrics, step)
    for scale in dict.fromkeys(r["scale"] for r in records):
        table = answers_table([r for r in records if r["scale"] == scale], answers_per_question, max_answer_chars)
        log.text(scale_prefix(scale, root) + "answers", f"{note}\n\n{table}" if note else table, step)
    log.save()


def answers_table(records: list[dict], answers_per_question: int, max_answer_chars: int) -> str:
    """Markdown for TensorBoard's TEXT tab: the first ``answers_per_question`` answers of each question, one
    block each -- question id, sample, scores, then the question and the answer on lines of their own. (A
    table squeezed its short columns to a few letters beside long answers: "coh eren t".) With a judge
    panel, answers the judges label differently come first, flagged."""
    blocks: list[str] = []
    shown: dict[str, int] = {}
    for r in sorted(records, key=lambda r: not r.get("em_disagreement", False)):  # stable: flagged first
        if shown.get(r["question_id"], 0) >= answers_per_question:
            continue
        shown[r["question_id"]] = shown.get(r["question_id"], 0) + 1
        scores = " · ".join(f"{n} **{'-' if r['scores'].get(n) is None else format(r['scores'][n], '.0f')}**"
                            for n in CORE_SCORES)
        head = f"**{r['question_id']}** (paraphrase {r['paraphrase_index']}, sample {r['sample_index']}) · {scores}"
        if "panel" in r:
            votes = ", ".join(f"{n}: {'EM' if v['em'] else '-' if v['em'] is None else 'not EM'}"
                              for n, v in r.get("panel", {}).items())
            head += f" · judges disagree on EM: **yes** ({votes})" if r.get("em_disagreement") else " · judges agree"
        question = _one_line(r.get("question", ""), max_answer_chars)
        answer = _one_line(r["answer"], max_answer_chars)
        blocks.append(f"{head}  \nQ: {question}  \nA: {answer}")
    return "\n\n---\n\n".join(blocks)


def _one_line(text: str, limit: int) -> str:
    """A markdown-safe single line (no headings, lists or tables started by the model's own text)."""
    flat = " ".join(text[:limit].split())
    return flat.replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_").replace("#", "\\#").replace("|", "\\|")
