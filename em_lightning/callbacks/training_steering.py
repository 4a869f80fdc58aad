"""TrainingSteering: preventative steering (callbacks/defenses/preventative_steering.yaml) or concept ablation
(callbacks/defenses/caft.yaml) of a direction at chosen decoder layers, in training forward passes only
(``defenses/intervention.py``: training mode with gradients on). Sampling, judging and val/loss see the model
as trained."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.callbacks import Callback

from em_lightning.defenses.intervention import TrainingIntervention


class TrainingSteering(Callback):
    affects_training = True  # the resume fingerprint includes these init args

    def __init__(self, direction: str, mode: Literal["steer", "ablate"] = "steer", alpha: float = 1.0,
                 layers: list[int] | None = None, source_layer: int | None = None):
        """
        Args:
            direction: a direction file: a run's ``directions/step_XXXXXXX.safetensors`` or a persona vector
                (``.pt``, (n_layers + 1, hidden), Chen et al.'s format).
            mode: ``steer`` (add alpha x mean residual norm x unit direction) or ``ablate`` (project alpha x
                the direction out; 1 = all of it).
            alpha: strength (steer) or ablated fraction (ablate).
            layers: decoder layers whose outputs change (default [0]).
            source_layer: take this layer's direction for every layer (default: each layer's own).
        """
        self.intervention = TrainingIntervention(direction, mode, alpha, tuple(layers or [0]), source_layer)

    def on_fit_start(self, trainer, pl_module) -> None:  # the model exists (configure_model ran)
        if not self.intervention.handles:
            self.intervention.attach(pl_module.model)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.intervention.detach()
