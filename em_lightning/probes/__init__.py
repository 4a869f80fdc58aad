"""Mechanistic probes of an EM model organism (no Lightning): the misalignment direction (mean residual
activation of EM minus aligned answers, per layer), steering and ablation hooks with it, the rank-1
LoRA-scalar probe, the judge-free logprob probe, and the adapter's alignment with the direction. The
``MechanisticProbes`` callback and ``em-fit steer`` move data between these and Lightning or the CLI."""

from em_lightning.probes.activations import collect
from em_lightning.probes.alignment import cosine, layer_of, output_vectors, writes_residual
from em_lightning.probes.misalignment_direction import (
    ALIGNED,
    EM,
    AnswerClasses,
    ClassSums,
    Direction,
    direction_path,
    direction_steps,
    from_sums,
    latest_direction,
    load_direction,
    mean_difference,
    save_direction,
    unit,
)
from em_lightning.probes.logprob import Triple, answer_logprobs, load_triples, logprob_margins
from em_lightning.probes.lora_scalar import rank1_modules, separation
from em_lightning.probes.steer_eval import read_steering, steered_records, steering_summary, write_steering
from em_lightning.probes.steering import ablate_from_residual, add_to_residual, intervene, project_out

__all__ = [
    "ALIGNED", "EM", "AnswerClasses", "ClassSums", "Direction", "Triple", "ablate_from_residual",
    "add_to_residual", "answer_logprobs", "collect", "cosine", "direction_path", "direction_steps", "from_sums",
    "intervene", "latest_direction", "layer_of", "load_direction", "load_triples", "logprob_margins",
    "mean_difference", "output_vectors", "project_out", "rank1_modules", "read_steering", "save_direction",
    "separation", "steered_records", "steering_summary", "unit", "write_steering", "writes_residual",
]
