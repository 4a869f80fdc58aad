"""FSDP2 sharding of a (PEFT-wrapped) causal LM, and gathering its sharded tensors back. Torch only.

Each decoder layer is one FSDP unit (its parameters are all-gathered just before its forward and freed
after), every vision/audio tower is one, and the root holds the rest (embeddings, final norm, output
head: tied embeddings must share a unit). Frozen and trainable parameters may share a unit (FSDP2
allows it), so a rank-1 LoRA inside a layer is sharded with that layer. Sharded parameters are DTensors:
``full_tensor()`` gathers one (a collective: every rank calls it, in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from em_lightning.model.adapters import non_text_modules
from em_lightning.model.text_config import text_config


@dataclass
class ShardingSpec:
    """How FSDP2 shards the model (used only under ``configs/strategies/fsdp2.yaml``).

    Args:
        mixed_precision: ``bf16``: compute in bfloat16 with float32 parameters and gradient reduction
            (FSDP2's MixedPrecisionPolicy); None: the parameters' own dtype.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory (GPU runs that do
            not fit otherwise; slower).
        reshard_after_forward: free each layer's gathered parameters after its forward (less memory, one
            more all-gather in backward).
    """

    mixed_precision: str | None = None
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in (None, "bf16"):
            raise ValueError(f"model.sharding.mixed_precision: expected bf16 or null, got {self.mixed_precision!r}")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's ModuleList of decoder layers (``num_hidden_layers`` long, outside any tower)."""
    n = text_config(model.config).num_hidden_layers
    towers = non_text_modules(model)
    for name, module in model.named_modules():
        inside_tower = any(name == t or name.startswith(t + ".") for t in towers)
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and not inside_tower:
            return module
    raise ValueError(f"no ModuleList of {n} decoder layers found in {type(model).__name__}")


def shard_model(model: torch.nn.Module, mesh, spec: ShardingSpec | None = None) -> torch.nn.Module:
    """Apply ``fully_shard`` per decoder layer, per tower, then to the root ``model`` (in place)."""
    spec = spec or ShardingSpec()
    kwargs: dict = {"mesh": mesh, "reshard_after_forward": spec.reshard_after_forward}
    if spec.mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs["offload_policy"] = CPUOffloadPolicy() if spec.cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    for tower in non_text_modules(model):
        fully_shard(model.get_submodule(tower), **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered when it is a DTensor (collective), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of every trainable parameter (collective under FSDP2: call on every rank)."""
    return {n: full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on rank 0 (empty elsewhere); collective under FSDP2."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
