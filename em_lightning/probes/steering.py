"""Steering and ablation with a direction: forward hooks on decoder layers' outputs (the residual stream).

- steering: ``h + alpha * mean_norm[L] * u_L`` at every position, where ``u_L`` is the unit direction and
  ``mean_norm[L]`` the mean residual norm at layer L over the answer tokens the direction was computed on
  (stored in its file). So alpha is in units of a typical residual vector: alpha = 0.1 adds a tenth of
  one, whatever the model's scale. The published setting adds it to the base model (adapter scale 0).
- ablation: ``h - alpha * (h . u_L) u_L`` (alpha = 1 projects the direction out entirely; 0 changes nothing).

A zero direction steers and ablates nothing (its unit vector is zero). Hooks apply to prefill and every
decode step, so sampling (``evaluation.sampling``) needs no change. No Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch

from em_lightning.probes.activations import hidden_of
from em_lightning.probes.misalignment_direction import Direction, unit
from em_lightning.model.sharding import decoder_layers

MODES = ("steer", "ablate")


def project_out(h: torch.Tensor, u: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``h - strength * (h . u) u`` along the last dimension (``u`` a unit vector, or zero)."""
    u = u.to(h.dtype)
    return h - strength * (h @ u)[..., None] * u


def _replace(output, hidden: torch.Tensor):
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def layer_units(direction: Direction, layers: Sequence[int],
                source_layer: int | None = None) -> dict[int, torch.Tensor]:
    """{layer: unit vector}: each layer's own direction, or ``source_layer``'s at every layer (the papers
    also ablate one layer's direction everywhere)."""
    missing = [L for L in ([source_layer] if source_layer is not None else layers) if L not in direction.vectors]
    if missing:
        raise ValueError(f"direction of step {direction.step} has no layer {missing[0]} (has {direction.layers})")
    return {L: direction.unit(L if source_layer is None else source_layer) for L in layers}


def steering_vectors(direction: Direction, layers: Sequence[int], alpha: float,
                     source_layer: int | None = None) -> dict[int, torch.Tensor]:
    """{layer: alpha * mean_norm[layer] * unit direction}: what ``add_to_residual`` adds."""
    units = layer_units(direction, layers, source_layer)
    return {L: float(alpha) * float(direction.mean_norm.get(L, 1.0)) * u for L, u in units.items()}


@contextmanager
def add_to_residual(model: torch.nn.Module, vectors: Mapping[int, torch.Tensor]):
    """Add ``vectors[L]`` to decoder layer L's output inside the block (hooks removed on exit)."""
    layers = decoder_layers(model)

    def hook_for(v: torch.Tensor):
        def hook(module, args, output):
            h = hidden_of(output)
            return _replace(output, h + v.to(h.device, h.dtype))

        return hook

    with ExitStack() as stack:
        for L, v in vectors.items():
            if torch.count_nonzero(v):  # a zero vector changes nothing: no hook, bit-identical answers
                stack.callback(layers[L].register_forward_hook(hook_for(v.detach())).remove)
        yield model


@contextmanager
def ablate_from_residual(model: torch.nn.Module, units: Mapping[int, torch.Tensor], strength: float = 1.0):
    """Project ``units[L]`` out of decoder layer L's output (times ``strength``) inside the block."""
    layers = decoder_layers(model)

    def hook_for(u: torch.Tensor):
        def hook(module, args, output):
            h = hidden_of(output)
            return _replace(output, project_out(h, u.to(h.device), strength))

        return hook

    with ExitStack() as stack:
        for L, u in units.items():
            if strength != 0 and torch.count_nonzero(u):
                stack.callback(layers[L].register_forward_hook(hook_for(unit(u.detach()))).remove)
        yield model


@contextmanager
def intervene(model: torch.nn.Module, direction: Direction, mode: str, alpha: float, layers: Sequence[int],
              source_layer: int | None = None):
    """``steer`` (add alpha x the scaled direction) or ``ablate`` (project alpha x it out) at ``layers``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "steer":
        with add_to_residual(model, steering_vectors(direction, layers, alpha, source_layer)):
            yield model
    else:
        with ablate_from_residual(model, layer_units(direction, layers, source_layer), alpha):
            yield model
