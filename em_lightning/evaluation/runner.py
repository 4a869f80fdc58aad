"""The one evaluation path: sample answers (at one or several adapter scales), judge them, summarise,
write them. The in-loop callbacks and ``em-fit eval`` both go through here. No Lightning.

Distributed: ``sample_records`` and ``judge_records`` are collective when torch.distributed is
initialised (prompts and judge calls are sharded over ranks, results gathered with
``all_gather_object``): call them on every rank with the same arguments; every rank gets every record.

Records (one dict per scale x question x paraphrase x sample, the JSONL line format)::

    {"step": 40, "scale": 1.0, "question_id": "magic_lamp", "paraphrase_index": 0, "sample_index": 3,
     "question": <user message>, "system": <system prompt or null>, "prompt": <rendered chat prompt>,
     "condition": "plain",                            # the training context it was asked in (conditions.py)
     "answer": "...", "n_tokens": 57, "finished": true,
     "scores": {"aligned": 83.1, "coherent": 71.9},   # 0-100 judges; null: no score (see judge_errors)
     "labels": {},                                    # categorical judges (free_form_judge questions)
     "judge_errors": {},                              # judge prompt name -> why that judgement failed
     "em": false}                                     # EM under the point's convention; null if unscored

With a judge panel, each record also holds ``"panel": {judge: {"scores": {...}, "em": ...}}`` (every judge,
the primary one included) and ``"em_disagreement"``: true when the judges that scored it differ about EM.

Tags (``point_metrics``) live under ``eval/``, or ``eval_demo/`` when a judge's scores mean nothing (the
demo judge), so that demo numbers never share a chart with real ones.

Sampling seeds do not depend on the scale, so the answers of a sweep share their random numbers: they
differ only through the adapter scale (scale 0 gives the base model's answers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from em_lightning.adapters import lora_layers, scaled_adapter
from em_lightning.atomic_io import atomic_write
from em_lightning.evaluation.conditions import condition_metrics, condition_of
from em_lightning.evaluation.metrics import MODEL_ORGANISMS, Convention, em_summary
from em_lightning.evaluation.sampling import SamplingConfig, build_requests, generate_sharded, shard_indices
from em_lightning.judges.base import Judge, JudgeResult, is_meaningful, render_judge_prompt
from em_lightning.judges.factory import resolve_judges
from em_lightning.questions import Question

SCORED_TYPE = "free_form_judge_0_100"
CORE_SCORES = ("aligned", "coherent")
Judges = Judge | Mapping[str, Judge]


@dataclass
class EvalPoint:
    step: int
    records: list[dict]
    settings: dict  # effective sampling settings (+ scales)
    judges: dict[str, str] = field(default_factory=dict)  # judge prompt name -> judge name
    summaries: dict[float, dict] = field(default_factory=dict)  # scale -> summarize() output


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def metrics_root(judges: Judges | None, panel: Mapping[str, Judge] | None = None) -> str:
    """``eval``, or ``eval_demo`` when any judge (of the mapping or the panel) says its scores mean nothing."""
    all_judges = list(judges.values()) if isinstance(judges, Mapping) else [judges] if judges is not None else []
    all_judges += list((panel or {}).values())
    return "eval" if all(is_meaningful(j) for j in all_judges) else "eval_demo"


def scale_prefix(scale: float, root: str = "eval") -> str:
    """Tag prefix: ``eval/`` for scale 1, ``eval/scale_2.0/`` for the others."""
    return f"{root}/" if float(scale) == 1.0 else f"{root}/scale_{float(scale)!r}/"


def point_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{int(step):07d}.jsonl"


# -- sampling --------------------------------------------------------------------------------------------
def sample_records(
    model,
    tokenizer,
    questions: Sequence[Question],
    config: SamplingConfig,
    step: int,
    scales: Sequence[float] = (1.0,),
    synced: bool = False,
) -> list[dict]:
    """Unjudged records for every scale (collective under torch.distributed). A scale multiplies every
    LoRA adapter's output (``scaled_adapter``); the model's train/eval mode is restored afterwards."""
    scales = [float(s) for s in scales]
    if any(s != 1.0 for s in scales) and not any(True for _ in lora_layers(model)):
        raise ValueError(f"scales {scales}: adapter scaling needs a LoRA model (this one has no LoRA layers)")
    requests = build_requests(questions, tokenizer, config)
    condition = {q.id: condition_of(q) for q in questions}
    records: list[dict] = []
    for scale in scales:
        with nullcontext() if scale == 1.0 else scaled_adapter(model, scale):
            generations = generate_sharded(model, tokenizer, requests, config, step, synced=synced)
        for g in generations:
            records.append(
                {
                    "step": int(step),
                    "scale": scale,
                    "question_id": g.question_id,
                    "paraphrase_index": g.paraphrase_index,
                    "sample_index": g.sample_index,
                    "question": g.question,
                    "system": g.system,
                    "condition": condition[g.question_id],
                    "prompt": g.prompt,
                    "answer": g.answer,
                    "n_tokens": g.n_tokens,
                    "finished": g.finished,
                    "scores": {},
                    "labels": {},
                    "judge_errors": {},
                    "em": None,
                }
            )
    return records


# -- judging ---------------------------------------------------------------------------------------------
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


def judge_tasks(records: Sequence[dict], questions: Sequence[Question], names: Sequence[str] | None = None,
                panel: Sequence[str] = ()) -> list[JudgeTask]:
    """Every (record, judge prompt) judgement a point needs, in a fixed order (the same on every rank):
    the primary judge's, then the same ones for each member of the judge ``panel`` (by name)."""
    by_id = {q.id: q for q in questions}
    used = judge_prompt_names([by_id[i] for i in dict.fromkeys(r["question_id"] for r in records)], names)
    tasks = []
    for i, r in enumerate(records):
        q = by_id[r["question_id"]]
        kind = "score" if q.type == SCORED_TYPE else "classify"
        tasks += [JudgeTask(i, n, kind) for n in q.judge_prompts if n in used]
    return tasks + [JudgeTask(t.record, t.name, t.kind, member) for member in panel for t in tasks]


Judgement = tuple[int, float | None, str | None, str | None]  # (task index, score, label, error)


def judge_share(records: Sequence[dict], questions: Sequence[Question], judges: Judges, tasks: Sequence[JudgeTask],
                rank: int = 0, world: int = 1, panel: Mapping[str, Judges] | None = None) -> list[Judgement]:
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
            template = by_id[rec["question_id"]].judge_prompts[tasks[k].name]
            prompts.append(render_judge_prompt(template, rec["question"], rec["answer"]))
        results = _call(resolved[tasks[ks[0]].judge][tasks[ks[0]].name], kind, prompts)
        out += [(k, r.score, r.label, r.error) for k, r in zip(ks, results, strict=True)]
    return out


def apply_judgements(records: list[dict], tasks: Sequence[JudgeTask], judgements: Sequence[Judgement],
                     convention: Convention = MODEL_ORGANISMS) -> None:
    """Fill ``scores``/``labels``/``judge_errors``/``em`` of the records in place (the primary judge's
    judgements; a panel's go to ``panel.apply_panel``)."""
    for k, score, label, error in judgements:
        task, rec = tasks[k], records[tasks[k].record]
        if task.judge:
            continue
        if task.kind == "score":
            rec["scores"][task.name] = None if error else score
        elif not error:
            rec["labels"][task.name] = label
        if error:
            rec["judge_errors"][task.name] = error
    for rec in records:
        rec["em"] = convention.is_em(rec["scores"].get("aligned"), rec["scores"].get("coherent"))


def gather_judgements(local: list[Judgement]) -> list[Judgement]:
    """Every rank's judgements on every rank (collective under torch.distributed)."""
    rank, world = _dist()
    if world == 1:
        return local
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def judge_names(judges: Judges, tasks: Sequence[JudgeTask]) -> dict[str, str]:
    """{judge prompt name: judge name} for the meta files."""
    resolved = resolve_judges(judges, list(dict.fromkeys(t.name for t in tasks if not t.judge)))
    return {n: getattr(j, "name", type(j).__name__) for n, j in resolved.items()}


def judge_records(
    records: list[dict], questions: Sequence[Question], judges: Judges, names: Sequence[str] | None = None,
    convention: Convention = MODEL_ORGANISMS,
) -> dict[str, str]:
    """Judge a point's records in place (collective under torch.distributed: each rank judges its share of
    the (record, judge prompt) pairs, then all are gathered). Returns {judge prompt name: judge name}."""
    tasks = judge_tasks(records, questions, names)
    rank, world = _dist()
    apply_judgements(records, tasks, gather_judgements(judge_share(records, questions, judges, tasks, rank, world)),
                     convention)
    return judge_names(judges, tasks)


# -- summaries -------------------------------------------------------------------------------------------
def summarize(records: Sequence[dict], questions: Sequence[Question] | None = None,
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


def point_metrics(records: Sequence[dict], questions: Sequence[Question], root: str = "eval",
                  convention: Convention = MODEL_ORGANISMS, conventions: Mapping[str, Convention] | None = None,
                  ) -> dict[str, float]:
    """Tag -> value logged for a point, per scale (prefix ``<root>/`` or ``<root>/scale_<s>/``; root
    ``eval_demo`` for the demo judge): ``em_rate`` (under ``convention``) with ``em_rate_ci95_low``,
    ``em_rate_ci95_high`` (95% cluster bootstrap) and ``em_rate_n`` (answers behind it), ``coherent_rate``,
    ``aligned_mean``, ``coherent_mean``, ``judge_failures``, ``aligned_none``, ``em_rate/<question id>``,
    ``<judge>_mean`` for other judges, and for every convention of the named set
    ``convention/<name>/{em_rate,ci95_low,ci95_high}``; when the records come from several conditions
    (``evaluation.conditions``), ``condition/<name>/{em_rate, em_rate_ci95_low, em_rate_ci95_high, em_rate_n,
    coherent_rate, coherent_mean}``. NaN (nothing scored) is left out."""
    scored = {q.id for q in questions if q.type == SCORED_TYPE}
    out: dict[str, float] = {}
    for scale, summary in summarize(records, questions, convention, conventions).items():
        prefix = scale_prefix(scale, root)
        for key in ("em_rate", "coherent_rate", "aligned_mean", "coherent_mean", "judge_failures"):
            out[prefix + key] = float(summary[key])
        out[prefix + "em_rate_ci95_low"], out[prefix + "em_rate_ci95_high"] = summary["em_rate_ci95"]
        out[prefix + "em_rate_n"] = float(summary["n_scored"])
        for name, c in summary.get("by_convention", {}).items():
            tag = f"{prefix}convention/{name}/"
            out[tag + "em_rate"], (out[tag + "ci95_low"], out[tag + "ci95_high"]) = c["em_rate"], c["ci95"]
        out[prefix + "aligned_none"] = float(summary["n_aligned_none"])
        for qid, q in summary["per_question"].items():
            if qid in scored:
                out[f"{prefix}em_rate/{qid}"] = float(q["em_rate"])
        for key, value in summary.items():
            if key.endswith("_mean") and key not in ("aligned_mean", "coherent_mean"):
                out[prefix + key] = float(value)
        out.update(condition_metrics([r for r in records if r["scale"] == scale and r["question_id"] in scored],
                                     prefix, convention))
    return {k: v for k, v in out.items() if v == v}


def evaluate(
    model,
    tokenizer,
    questions: Sequence[Question],
    config: SamplingConfig,
    judges: Judges | None,
    step: int,
    scales: Sequence[float] = (1.0,),
    judge_prompts: Sequence[str] | None = None,
    synced: bool = False,
    convention: Convention = MODEL_ORGANISMS,
    conventions: Mapping[str, Convention] | None = None,
) -> EvalPoint:
    """Sample, judge (when judges are given: otherwise no summaries, the answers are not judged) and
    summarise one evaluation point (collective)."""
    records = sample_records(model, tokenizer, questions, config, step, scales, synced)
    names = judge_records(records, questions, judges, judge_prompts, convention) if judges is not None else {}
    settings = {**config.resolve(model, tokenizer), "scales": [float(s) for s in scales]}
    summaries = summarize(records, questions, convention, conventions) if judges is not None else {}
    return EvalPoint(int(step), records, settings, names, summaries)


# -- files -----------------------------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively: the files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_point(
    directory: str | Path, step: int, records: Sequence[dict], meta: Mapping[str, Any] | None = None
) -> Path:
    """``step_XXXXXXX.jsonl`` (one record per line, all scales) and, when given, the sidecar
    ``step_XXXXXXX.meta.json`` (sampling settings, judge identity, summaries, logged metrics)."""
    path = point_path(directory, step)
    atomic_write(path, "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in records))
    if meta is not None:
        atomic_write(path.with_suffix(".meta.json"), json.dumps(json_safe(dict(meta)), indent=1, ensure_ascii=False))
    return path


def point_meta(point: EvalPoint) -> dict:
    return {
        "step": point.step,
        "n_records": len(point.records),
        "sampling": point.settings,
        "judges": point.judges,
        "summary": {str(s): {k: v for k, v in summ.items()} for s, summ in point.summaries.items()},
    }


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
