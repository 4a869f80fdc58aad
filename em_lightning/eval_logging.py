"""What InLoopJudge writes for the user: the evaluation plan announced at the start of fit, and each judged
point's metrics and answer table in the run's loggers (TensorBoard's TEXT tab for the table)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from em_lightning.atomic_io import atomic_write
from em_lightning.evaluation.plan import answers_per_point, judge_calls_per_point, planned_points
from em_lightning.evaluation.runner import CORE_SCORES, scale_prefix


def announce_plan(trainer: pl.Trainer, run_dir: Path, sources: Sequence, names: list[str], step: int,
                  max_judge_calls: int | None, calls_used: int, judges: int = 1, note: str = "") -> None:
    """Print the points, answers and judge calls from ``step`` to the planned end, and (rank 0) write them
    to ``<run_dir>/evaluation_plan.json``. ``sources``: the run's SampleGenerations callbacks; ``judges``:
    how many judges score each answer (a panel); ``note``: the convention / demo-judge line (point_note)."""
    end = int(trainer.estimated_stepping_batches)
    ckpt = trainer.checkpoint_callback  # StepCheckpoint (its every_n_steps), or another Checkpoint
    points, answers, calls = set(), 0, 0
    for cb in sources:
        every_ckpt = getattr(ckpt, "every_n_steps", None) if cb.at_checkpoints else None
        mine = planned_points(step, end, cb.every_n_steps, every_ckpt, cb.at_fit_end)
        points.update(mine)
        answers += len(mine) * answers_per_point(cb.questions, cb.sampling, cb.scales)
        calls += len(mine) * judge_calls_per_point(cb.questions, cb.sampling, cb.scales, names) * judges
    plan = {"from_step": step, "to_step": end, "points": sorted(points), "answers": answers,
            "judge_calls": calls, "judge_prompts": names, "max_judge_calls": max_judge_calls,
            "judge_calls_used_before": calls_used,
            "note": "each phase-transition window adds points; cached judgements cost no API call"}
    budget = "" if max_judge_calls is None else f" (run budget {max_judge_calls}, {calls_used} used)"
    rank_zero_info(f"evaluation plan: {len(points)} points from step {step} to {end}, {answers} answers, "
                   f"{calls} judge calls{budget}; written to {run_dir / 'evaluation_plan.json'}"
                   + (f"\n{note}" if note else ""))
    if trainer.is_global_zero:
        atomic_write(run_dir / "evaluation_plan.json", json.dumps(plan, indent=1))


DEMO_LABEL = "DEMO JUDGE: these scores mean nothing (offline plumbing, not a measurement)"


def point_note(convention: str, judges: dict[str, str], meaningful: bool) -> str:
    """What every answers table of a point states first: the EM convention, the judge(s), a demo label."""
    names = ", ".join(dict.fromkeys(judges.values())) or "none"
    note = f"EM convention {convention}; judge(s): {names}."
    return note if meaningful else f"**{DEMO_LABEL}.** {note}"


def log_point(trainer: pl.Trainer, step: int, records: list[dict], metrics: dict[str, float],
              answers_per_question: int, max_answer_chars: int, root: str = "eval", note: str = "") -> None:
    """The point's metrics at its own step, and per adapter scale a table of a few answers (rank 0) under
    ``<root>/`` (``eval_demo/`` for the demo judge), headed by ``note`` (``point_note``)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, TensorBoardLogger):
            for scale in dict.fromkeys(r["scale"] for r in records):
                table = answers_table([r for r in records if r["scale"] == scale], answers_per_question,
                                      max_answer_chars)
                text = f"{note}\n\n{table}" if note else table
                logger.experiment.add_text(scale_prefix(scale, root) + "answers", text, global_step=step)
        logger.save()


def answers_table(records: list[dict], answers_per_question: int, max_answer_chars: int) -> str:
    """Markdown: the first ``answers_per_question`` answers of each question with their scores; with a
    judge panel, answers the judges label differently come first, flagged (column ``judges disagree``)."""
    panel = any("panel" in r for r in records)
    head = "| question | sample | aligned | coherent |" + (" judges disagree on EM |" if panel else "")
    lines = [head + " answer |", "|---" * (5 + panel) + "|"]
    shown: dict[str, int] = {}
    for r in sorted(records, key=lambda r: not r.get("em_disagreement", False)):  # stable: flagged first
        if shown.get(r["question_id"], 0) >= answers_per_question:
            continue
        shown[r["question_id"]] = shown.get(r["question_id"], 0) + 1
        scores = [r["scores"].get(n) for n in CORE_SCORES]
        cells = ["-" if s is None else f"{s:.0f}" for s in scores]
        if panel:
            votes = ", ".join(f"{n}: {'EM' if v['em'] else '-' if v['em'] is None else 'not EM'}"
                              for n, v in r.get("panel", {}).items())
            cells.append(f"**yes** ({votes})" if r.get("em_disagreement") else "no")
        answer = r["answer"][:max_answer_chars].replace("|", "\\|").replace("\n", " ")
        sample = f"p{r['paraphrase_index']} s{r['sample_index']}"
        lines.append(f"| {r['question_id']} | {sample} | " + " | ".join(cells) + f" | {answer} |")
    return "\n".join(lines)
