"""Evaluation: question files, batched/sharded sampling, EM metrics, conventions and intervals, judge
agreement and calibration (no Lightning imports here)."""

from em_lightning.evaluation.metrics import (
    CONVENTIONS,
    Convention,
    cluster_bootstrap_ci,
    em_summary,
    is_em,
)
from em_lightning.evaluation.sampling import (
    DEFAULT_SAMPLES_PER_PARAPHRASE,
    Generation,
    SampleRequest,
    SamplingConfig,
    build_requests,
    eos_token_ids,
    generate,
    generate_sharded,
    row_seed,
    shard_indices,
)
from em_lightning.published.question_files import QUESTION_TYPES, Question, load_questions

__all__ = [
    "CONVENTIONS",
    "Convention",
    "DEFAULT_SAMPLES_PER_PARAPHRASE",
    "Generation",
    "QUESTION_TYPES",
    "Question",
    "SampleRequest",
    "SamplingConfig",
    "build_requests",
    "cluster_bootstrap_ci",
    "em_summary",
    "eos_token_ids",
    "generate",
    "generate_sharded",
    "is_em",
    "load_questions",
    "row_seed",
    "shard_indices",
]
