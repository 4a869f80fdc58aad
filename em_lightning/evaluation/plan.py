"""What a run's in-loop evaluation will cost, known before it starts: its evaluation points, answers and
judge calls. (Points added by a detected phase transition are not known in advance: each adds one.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from em_lightning.evaluation.sampling import DEFAULT_SAMPLES_PER_PARAPHRASE, SamplingConfig
from em_lightning.published.question_files import Question


def planned_points(start: int, end: int, every_n_steps: int | None, checkpoint_every: int | None,
                   at_fit_end: bool) -> list[int]:
    """Steps in (start, end] evaluated by the step cadence, at checkpoints (every ``checkpoint_every``
    steps; None: not at checkpoints) and at the end of fit."""
    steps = set()
    for every in (every_n_steps, checkpoint_every):
        if every:
            steps.update(range((start // every + 1) * every, end + 1, every))
    if at_fit_end or checkpoint_every:  # the final step is always checkpointed (last.ckpt)
        steps.add(end)
    return sorted(s for s in steps if start < s <= end)


def _samples(q: Question, sampling: SamplingConfig) -> int:
    return sampling.samples_per_paraphrase or q.samples_per_paraphrase or DEFAULT_SAMPLES_PER_PARAPHRASE


def answers_per_point(questions: Sequence[Question], sampling: SamplingConfig, scales: Sequence[float]) -> int:
    return len(scales) * sum(len(q.paraphrases) * _samples(q, sampling) for q in questions)


def judge_calls_per_point(questions: Sequence[Question], sampling: SamplingConfig, scales: Sequence[float],
                          names: Sequence[str]) -> int:
    """Judge calls (before the cache) for one point: every answer x every judge prompt of its question."""
    per_answer = {q.id: sum(1 for n in q.judge_prompts if n in names) for q in questions}
    return len(scales) * sum(len(q.paraphrases) * _samples(q, sampling) * per_answer[q.id] for q in questions)


@dataclass(frozen=True)
class EvaluationSource:
    """What SampleGenerations samples and when (``on_evaluation_source``)."""

    questions: list[Question]
    sampling: SamplingConfig
    scales: list[float]
    every_n_steps: int | None
    at_checkpoints: bool
    at_fit_end: bool
