"""What gets trained: LoRA adapters (rank-1 on chosen layers up to rank-N on all linear layers) or the full model.

Also: read each rank-1 adapter's A and B vectors by module, and scale adapters temporarily.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from em_lightning.model.text_config import text_config

ADAPTER_NAME = "default"


@dataclass
class AdapterSpec:
    """The trainable part of the model.

    Args:
        kind: ``lora`` (PEFT LoRA) or ``full`` (every parameter of the base model trains).
        r: LoRA rank (1 for the EM model organisms' rank-1 adapters, 32 for the all-linear variant).
        alpha: LoRA alpha; the adapter output is scaled by alpha/sqrt(r) with rsLoRA, alpha/r without.
        use_rslora: rank-stabilised scaling, as in the published rank-1 recipes.
        dropout: LoRA dropout.
        target_modules: module names to adapt (e.g. ``[down_proj]``) or ``all-linear``.
        layers: indices of the transformer layers to adapt (e.g. ``[24]`` or
            ``[15, 16, 17, 21, 22, 23, 27, 28, 29]``); None adapts every layer.
    """

    kind: Literal["lora", "full"] = "lora"
    r: int = 1
    alpha: float = 8.0
    use_rslora: bool = True
    dropout: float = 0.0
    target_modules: list[str] | Literal["all-linear"] = field(default_factory=lambda: ["down_proj"])
    layers: list[int] | None = None

    def lora_config(self, exclude: list[str] | None = None) -> LoraConfig:
        """``exclude``: module names (with everything under them) LoRA must not touch (vision towers)."""
        return LoraConfig(
            exclude_modules=rf"^({'|'.join(map(re.escape, exclude))})(\..*)?$" if exclude else None,
            r=self.r,
            lora_alpha=self.alpha,
            use_rslora=self.use_rslora,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            layers_to_transform=self.layers,
            bias="none",
            task_type="CAUSAL_LM",
        )


# Non-text parts of multimodal checkpoints (transformers' names: Gemma-3-it, LLaVA, Qwen-VL, ...).
_TOWER_NAMES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "audio_tower")


def non_text_modules(model: torch.nn.Module) -> list[str]:
    """Names of the vision/audio towers and projectors of a multimodal model (empty for a text model)."""
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in _TOWER_NAMES]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def apply_adapter(model: torch.nn.Module, spec: AdapterSpec) -> torch.nn.Module:
    """Wrap the base model so that exactly the spec's parameters require gradients. Only the language
    model trains: LoRA skips vision towers, full fine-tuning leaves them frozen."""
    towers = non_text_modules(model)
    if spec.kind == "full":
        frozen = {id(p) for t in towers for p in model.get_submodule(t).parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        return model
    if spec.r < 1:
        raise ValueError(f"model.adapter.r must be >= 1, got {spec.r}")
    if spec.layers is not None and isinstance(spec.target_modules, str):
        raise ValueError("model.adapter.layers needs target_modules as a list of module names (e.g. [q_proj, "
                         "down_proj]); 'all-linear' adapts every layer")
    n_layers = text_config(model.config).num_hidden_layers
    bad = [i for i in spec.layers or [] if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"model.adapter.layers: {bad} out of range for a model with {n_layers} layers")
    if not isinstance(spec.target_modules, str):
        check_target_modules(model, spec.target_modules, towers)
    return get_peft_model(model, spec.lora_config(exclude=towers))


# Module types LoRA adapts (PEFT's own check fails with the module's whole repr as its message).
_ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def check_target_modules(model: torch.nn.Module, names: list[str], exclude: list[str] = ()) -> None:
    """One line per run, before PEFT sees them: each name must match (as PEFT does: the whole module name or
    its last dotted parts) at least one linear (or embedding/conv) module outside ``exclude``."""
    modules = [(n, m) for n, m in model.named_modules()
               if n and not any(n == e or n.startswith(e + ".") for e in exclude)]
    linear = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in modules
                                if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"))
    here = f"linear layers here: {', '.join(linear)}"
    for target in names:
        found = [m for n, m in modules if n == target or n.endswith("." + target)]
        if not found:
            raise ValueError(f"model.adapter.target_modules: {target!r} matches no module of the model; {here}")
        if not any(_adaptable(m) for m in found):
            kind = type(found[0]).__name__
            raise ValueError(f"model.adapter.target_modules: {target!r} is a {kind}, not a linear layer; {here}")


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, _ADAPTABLE) or type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(module name without the PEFT prefix, layer) for every LoRA-adapted module, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            yield name.removeprefix("base_model.model."), module


def lora_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A (r x in), B (out x r))} detached views of every LoRA adapter's weights."""
    return {
        name: (m.lora_A[ADAPTER_NAME].weight.detach(), m.lora_B[ADAPTER_NAME].weight.detach())
        for name, m in lora_layers(model)
    }


def rank1_vectors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name (e.g. ``model.layers.24.mlp.down_proj``): (a, b)} as 1-D vectors of a rank-1 adapter."""
    out = {}
    for name, (a, b) in lora_factors(model).items():
        if a.shape[0] != 1:
            raise ValueError(f"{name} has rank {a.shape[0]}; rank-1 vectors need r = 1")
        out[name] = (a[0], b[:, 0])
    return out


@contextlib.contextmanager
def scaled_adapter(model: torch.nn.Module, factor: float) -> Iterator[torch.nn.Module]:
    """Multiply every LoRA adapter's output by ``factor`` inside the block (0 gives the base model);
    the original scalings are restored exactly on exit, even after an exception."""
    layers = [m for _, m in lora_layers(model)]
    saved = [m.scaling[ADAPTER_NAME] for m in layers]
    try:
        for m, s in zip(layers, saved):
            m.scaling[ADAPTER_NAME] = s * factor
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scaling[ADAPTER_NAME] = s


def trainable_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_peft(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)
