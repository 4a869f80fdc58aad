"""Pure math on adapter trajectories: rotation metrics, local cosine similarity, PCA, per-layer LoRA
directions and an online phase-transition detector. Torch only; nothing here imports Lightning."""

from em_lightning.phase.detector import TransitionDetector, TransitionEvent, detect_transitions, detection_trace
from em_lightning.phase.lora_direction import LoRADirection, canonical_sign, lora_direction
from em_lightning.phase.pca import PCAResult, pca_2d
from em_lightning.phase.rotation import (
    consecutive_cosine,
    cosine_to_lag,
    cumulative_rotation_degrees,
    local_cosine_similarity,
    norms,
    rotation_degrees,
)

__all__ = [
    "LoRADirection",
    "PCAResult",
    "TransitionDetector",
    "TransitionEvent",
    "canonical_sign",
    "consecutive_cosine",
    "cosine_to_lag",
    "cumulative_rotation_degrees",
    "detect_transitions",
    "detection_trace",
    "local_cosine_similarity",
    "lora_direction",
    "norms",
    "pca_2d",
    "rotation_degrees",
]
