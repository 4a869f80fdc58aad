"""The one evaluation path: sample answers (at one or several adapter scales), judge them, summarise. The
in-loop callbacks and ``em-fit eval`` both go through here. No Lightning.

The pieces: ``records`` (``EvalRecord``, the JSONL files), ``judging`` (each rank's share of the judge
calls, gathered), ``summaries`` (per-scale summaries and their metric values, plain names); the tags are
the caller's (``eval_tags``).

Distributed: ``sample_records`` and ``evaluate`` are collective when torch.distributed is initialised
(prompts and judge calls are sharded over ranks, results gathered with ``all_gather_object``): call them on
every rank with the same arguments; every rank gets every record.

Sampling seeds do not depend on the scale, so the answers of a sweep share their random numbers: they
differ only through the adapter scale (scale 0 gives the base model's answers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

from em_lightning.model.adapters import lora_layers, scaled_adapter
from em_lightning.evaluation.conditions import condition_of
from em_lightning.evaluation.judging import Judges, judge_records
from em_lightning.evaluation.metrics import MODEL_ORGANISMS, Convention
from em_lightning.evaluation.records import EvalRecord
from em_lightning.evaluation.sampling import SamplingConfig, build_requests, generate_sharded
from em_lightning.evaluation.summaries import summarize
from em_lightning.published.question_files import Question


@dataclass
class EvalPoint:
    step: int
    records: list[EvalRecord]
    settings: dict  # effective sampling settings (+ scales)
    judges: dict[str, str] = field(default_factory=dict)  # judge prompt name -> judge name
    summaries: dict[float, dict] = field(default_factory=dict)  # scale -> summarize() output


# -- sampling --------------------------------------------------------------------------------------------
def sample_records(
    model,
    tokenizer,
    questions: Sequence[Question],
    config: SamplingConfig,
    step: int,
    scales: Sequence[float] = (1.0,),
    synced: bool = False,
) -> list[EvalRecord]:
    """Unjudged records for every scale (collective under torch.distributed). A scale multiplies every
    LoRA adapter's output (``scaled_adapter``); the model's train/eval mode is restored afterwards."""
    scales = [float(s) for s in scales]
    if any(s != 1.0 for s in scales) and not any(True for _ in lora_layers(model)):
        raise ValueError(f"scales {scales}: adapter scaling needs a LoRA model (this one has no LoRA layers)")
    requests = build_requests(questions, tokenizer, config)
    condition = {q.id: condition_of(q) for q in questions}
    records: list[EvalRecord] = []
    for scale in scales:
        with nullcontext() if scale == 1.0 else scaled_adapter(model, scale):
            generations = generate_sharded(model, tokenizer, requests, config, step, synced=synced)
        for g in generations:
            records.append(EvalRecord(
                step=int(step), scale=scale, question_id=g.question_id, paraphrase_index=g.paraphrase_index,
                sample_index=g.sample_index, question=g.question, system=g.system,
                condition=condition[g.question_id], prompt=g.prompt, answer=g.answer, n_tokens=g.n_tokens,
                finished=g.finished))
    return records


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


def point_meta(point: EvalPoint) -> dict:
    return {
        "step": point.step,
        "n_records": len(point.records),
        "sampling": point.settings,
        "judges": point.judges,
        "summary": {str(s): {k: v for k, v in summ.items()} for s, summ in point.summaries.items()},
    }
