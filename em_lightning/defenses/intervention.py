"""Steering or ablating a direction in training forward passes only: preventative steering (Chen et al.,
persona vectors: add the trait direction while fine-tuning so the gradient need not move the model along
it) and CAFT (concept ablation fine-tuning: project the direction out while fine-tuning).

The hooks are ``probes.steering``'s arithmetic (same units: steering adds ``alpha x mean_norm[L] x u_L``,
ablation removes ``alpha x (h . u_L) u_L``), registered for the whole run but acting only in a training
forward: the module in training mode with gradients enabled, or inside ``training_reference()`` (the KL
defense's no-grad forward of the base: the reference gets the same intervention, so the KL measures the
adapter's change alone and does not pull the adapter against the steering). Evaluation (sampling, judging,
val/loss) runs in eval mode or under ``no_grad`` and sees the model as trained.

Direction files: the project's ``directions/step_*.safetensors`` (``probes.directions``), or a persona
vector as Chen et al. save it: a ``.pt`` tensor (n_layers + 1, hidden) indexed by hidden-state number, so
decoder layer L's output is row L + 1 (no mean norm: alpha is then in the vector's own units of length 1).
No Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from em_lightning.probes.activations import hidden_of
from em_lightning.probes.misalignment_direction import Direction, load_direction, unit
from em_lightning.probes.steering import layer_units, project_out, steering_vectors
from em_lightning.model.sharding import decoder_layers


def load_any_direction(path: str | Path) -> Direction:
    """A project direction file (.safetensors) or a persona vector (.pt, (n_layers + 1, hidden))."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_direction(path)
    if not path.is_file():
        raise FileNotFoundError(f"no direction file {path}")
    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or t.ndim != 2:
        raise ValueError(f"{path}: expected a (n_layers + 1, hidden) tensor (a persona vector), got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    return Direction(-1, {L: t[L + 1].float() for L in range(t.shape[0] - 1)}, {}, 0, 0, {"source": str(path)})


_REFERENCE = ContextVar("training_reference", default=False)


@contextmanager
def training_reference() -> Iterator[None]:
    """A no-grad forward that is still part of training (the KL defense's base): interventions act in it."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def _training_forward(module: torch.nn.Module) -> bool:
    return module.training and (torch.is_grad_enabled() or _REFERENCE.get())


@dataclass
class TrainingIntervention:
    """Add (``steer``) or project out (``ablate``) a direction at ``layers`` in training forward passes.

    Args:
        direction: a direction file (see the module docstring).
        mode: ``steer`` or ``ablate``.
        alpha: steering strength in units of the layer's mean residual norm, or the ablated fraction (1 = all).
        layers: decoder layers whose outputs are changed.
        source_layer: use this layer's direction at every layer (default: each layer's own).
    """

    direction: str
    mode: Literal["steer", "ablate"] = "steer"
    alpha: float = 1.0
    layers: Sequence[int] = (0,)
    source_layer: int | None = None

    def __post_init__(self):
        if self.mode not in ("steer", "ablate"):
            raise ValueError(f"mode: expected steer or ablate, got {self.mode!r}")
        if not self.layers:
            raise ValueError("layers: expected at least one decoder layer")
        try:  # a bad file fails at construction, before training
            d = load_any_direction(self.direction)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (direction: a run's directions/step_XXXXXXX.safetensors or a persona "
                                    "vector .pt; the defense presets ship a placeholder path)") from None
        if self.mode == "steer":
            self.vectors = steering_vectors(d, list(self.layers), self.alpha, self.source_layer)
        else:
            self.vectors = {L: unit(u) for L, u in layer_units(d, list(self.layers), self.source_layer).items()}
        self.handles: list = []
        self.applied = 0  # training forwards changed (counted per layer): tests and logs read it

    def attach(self, model: torch.nn.Module) -> None:
        """Register the hooks (removed by ``detach``)."""
        layers = decoder_layers(model)
        bad = [L for L in self.vectors if not 0 <= L < len(layers)]
        if bad:
            raise ValueError(f"layers: {bad} out of range for a model with {len(layers)} decoder layers")
        for L, v in self.vectors.items():
            if torch.count_nonzero(v) and (self.mode == "steer" or self.alpha != 0):
                self.handles.append(layers[L].register_forward_hook(self._hook(v.detach())))

    def _hook(self, v: torch.Tensor):
        def hook(module, args, output):
            if not _training_forward(module):
                return None
            self.applied += 1
            h = hidden_of(output)
            if self.mode == "steer":
                h = h + v.to(h.device, h.dtype)
            else:
                h = project_out(h, v.to(h.device), self.alpha)
            return h if isinstance(output, torch.Tensor) else (h, *output[1:])

        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
