"""Judging a point's records: which (record, judge prompt) judgements it needs, each rank's share of them,
gathering the shares, and filling the records in. No Lightning.

Distributed: ``judge_records`` and ``gather_judgements`` are collective when torch.distributed is
initialised: call them on every rank with the same records; every rank gets every judgement.
``judge_share`` runs no collective (safe in a background thread), so the in-loop judge runs it while
training goes on and gathers later, at the same moment on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.distributed as dist

from em_lightning.run.distributed import rank_world
from em_lightning.evaluation.metrics import MODEL_ORGANISMS, Convention
from em_lightning.evaluation.records import SCORED_TYPE, EvalRecord
from em_lightning.evaluation.sampling import shard_indices
from em_lightning.judges.base import Judge, JudgeResult, render_judge_prompt
from em_lightning.judges.factory import resolve_judges
from em_lightning.published.question_files import Question

Judges = Judge | Mapping[str, Judge]


def judge_prompt_names(questions: Sequence[Question], only: Sequence[str] | None = None) -> list[str]:
    """Judge prompt names used by the questions (first-seen order), restricted to ``only``."""
    names = list(dict.fromkeys(n for q in questions for n in q.judge_prompts))
    if only is not None:
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"judge_prompts: {missing} not among the questions' judge prompts {names}")
        names = [n for n in names if n in only]
    return names


def _call(judge: Judge, kind: str, prompts: list[str]) -> list[JudgeResult]:
    """A judge call that never raises: on one rank an exception would leave the others hanging in the gather."""
    try:
        results = list(judge.classify_prompts(prompts) if kind == "classify" else judge.score_prompts(prompts))
        if len(results) != len(prompts):
            raise RuntimeError(f"{len(results)} results for {len(prompts)} prompts")
        return results
    except Exception as exc:  # noqa: BLE001 - a failed judgement is data, counted in judge_errors
        return [JudgeResult(error=f"judge raised {type(exc).__name__}: {exc}")] * len(prompts)


@dataclass(frozen=True)
class JudgeTask:
    record: int  # index into the point's records
    name: str  # judge prompt name
    kind: str  # "score" (0-100 judge) or "classify"
    judge: str = ""  # a judge panel's member ("": the primary judge, whose scores are the record's)


def judge_tasks(records: Sequence[EvalRecord], questions: Sequence[Question], names: Sequence[str] | None = None,
                panel: Sequence[str] = ()) -> list[JudgeTask]:
    """Every (record, judge prompt) judgement a point needs, in a fixed order (the same on every rank):
    the primary judge's, then the same ones for each member of the judge ``panel`` (by name)."""
    by_id = {q.id: q for q in questions}
    used = judge_prompt_names([by_id[i] for i in dict.fromkeys(r.question_id for r in records)], names)
    tasks = []
    for i, r in enumerate(records):
        q = by_id[r.question_id]
        kind = "score" if q.type == SCORED_TYPE else "classify"
        tasks += [JudgeTask(i, n, kind) for n in q.judge_prompts if n in used]
    return tasks + [JudgeTask(t.record, t.name, t.kind, member) for member in panel for t in tasks]


Judgement = tuple[int, float | None, str | None, str | None]  # (task index, score, label, error)


def judge_share(records: Sequence[EvalRecord], questions: Sequence[Question], judges: Judges,
                tasks: Sequence[JudgeTask], rank: int = 0, world: int = 1,
                panel: Mapping[str, Judges] | None = None) -> list[Judgement]:
    """Run rank ``rank``'s share of the tasks (no collectives: safe in a background thread); ``panel``:
    the judges of the panel members the tasks name."""
    by_id = {q.id: q for q in questions}
    names = list(dict.fromkeys(t.name for t in tasks))
    resolved = {"": resolve_judges(judges, names)}
    resolved.update({member: resolve_judges(j, names) for member, j in (panel or {}).items()})
    groups: dict[tuple[int, str], list[int]] = {}  # (judge, kind) -> task indices: one batched call each
    for k in shard_indices(len(tasks), rank, world):
        if k is not None:
            groups.setdefault((id(resolved[tasks[k].judge][tasks[k].name]), tasks[k].kind), []).append(k)
    out: list[Judgement] = []
    for (_, kind), ks in groups.items():
        prompts = []
        for k in ks:
            rec = records[tasks[k].record]
            template = by_id[rec.question_id].judge_prompts[tasks[k].name]
            prompts.append(render_judge_prompt(template, rec.question, rec.answer))
        results = _call(resolved[tasks[ks[0]].judge][tasks[ks[0]].name], kind, prompts)
        out += [(k, r.score, r.label, r.error) for k, r in zip(ks, results, strict=True)]
    return out


def apply_judgements(records: Sequence[EvalRecord], tasks: Sequence[JudgeTask], judgements: Sequence[Judgement],
                     convention: Convention = MODEL_ORGANISMS) -> None:
    """Fill ``scores``/``labels``/``judge_errors``/``em`` of the records (the primary judge's judgements; a
    panel's go to ``panel.apply_panel``)."""
    for k, score, label, error in judgements:
        task, rec = tasks[k], records[tasks[k].record]
        if task.judge:
            continue
        if task.kind == "score":
            rec.scores[task.name] = None if error else score
        elif not error:
            rec.labels[task.name] = label
        if error:
            rec.judge_errors[task.name] = error
    for rec in records:
        rec.em = convention.is_em(rec.scores.get("aligned"), rec.scores.get("coherent"))


def gather_judgements(local: list[Judgement]) -> list[Judgement]:
    """Every rank's judgements on every rank (collective under torch.distributed)."""
    _, world = rank_world()
    if world == 1:
        return local
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def judge_names(judges: Judges, tasks: Sequence[JudgeTask]) -> dict[str, str]:
    """{judge prompt name: judge name} for the meta files."""
    resolved = resolve_judges(judges, list(dict.fromkeys(t.name for t in tasks if not t.judge)))
    return {n: getattr(j, "name", type(j).__name__) for n, j in resolved.items()}


def judge_records(records: Sequence[EvalRecord], questions: Sequence[Question], judges: Judges,
                  names: Sequence[str] | None = None, convention: Convention = MODEL_ORGANISMS) -> dict[str, str]:
    """Judge a point's records (collective under torch.distributed: each rank judges its share of the
    (record, judge prompt) pairs, then all are gathered). Returns {judge prompt name: judge name}."""
    tasks = judge_tasks(records, questions, names)
    rank, world = rank_world()
    apply_judgements(records, tasks, gather_judgements(judge_share(records, questions, judges, tasks, rank, world)),
                     convention)
    return judge_names(judges, tasks)
