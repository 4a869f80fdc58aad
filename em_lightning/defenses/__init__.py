"""In-training defenses against emergent misalignment, without Lightning: the KL term to the frozen base
(kl.py), the training-only inoculation prompt (inoculation.py), steering or ablating a direction in
training forward passes only (intervention.py), and interleaving aligned rows into every batch
(interleave.py). The thin callbacks and data options that use them are in the Lightning layer;
their presets in the top-level ``configs/callbacks/defenses/``."""

from em_lightning.defenses.inoculation import Inoculation, inoculate
from em_lightning.defenses.interleave import Interleave, InterleavedEpochSampler
from em_lightning.defenses.intervention import TrainingIntervention, load_any_direction
from em_lightning.defenses.kl import OffDomainStream, kl_to_base

__all__ = ["Inoculation", "Interleave", "InterleavedEpochSampler", "OffDomainStream", "TrainingIntervention",
           "inoculate", "kl_to_base", "load_any_direction"]
