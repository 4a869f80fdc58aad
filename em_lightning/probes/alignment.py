"""How well an adapter's output direction lines up with the misalignment direction at its layer.

Adapters on ``mlp.down_proj`` and ``self_attn.o_proj`` write straight into the residual stream of their
layer, so their B vector (rank 1; the top left singular vector of B A for rank > 1, scaled by its singular
value) lives in the space of that layer's direction. The cosine's sign is only meaningful together with
A's (flipping both gives the same adapter). No Lightning.
"""

from __future__ import annotations

import re

import torch

from em_lightning.model.adapters import ADAPTER_NAME, lora_layers
from em_lightning.phase import lora_direction
from em_lightning.model.sharding import full

RESIDUAL_WRITERS = ("down_proj", "o_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(module_name: str) -> int | None:
    """``model.layers.24.mlp.down_proj`` -> 24 (None for a name without a layer index)."""
    m = _LAYER.search(module_name)
    return int(m.group(1)) if m else None


def writes_residual(module_name: str) -> bool:
    return module_name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS and layer_of(module_name) is not None


def output_vectors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module: B vector (rank 1) or s * u (rank > 1)} for adapters that write into the residual stream.
    Sharded (FSDP2) factors are gathered: collective, call on every rank."""
    out = {}
    for name, m in lora_layers(model):
        if not writes_residual(name):
            continue
        a = full(m.lora_A[ADAPTER_NAME].weight.detach()).float().cpu()
        b = full(m.lora_B[ADAPTER_NAME].weight.detach()).float().cpu()
        if a.shape[0] == 1:
            out[name] = b[:, 0]
        else:
            d = lora_direction(a, b)
            out[name] = d.s * d.u
    return out


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """cos(x, y); 0 when either is zero (B starts at zero)."""
    nx, ny = x.double().norm(), y.double().norm()
    if nx == 0 or ny == 0:
        return 0.0
    return float((x.double() @ y.double()) / nx / ny)
