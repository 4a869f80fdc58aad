"""The LoRA-scalar probe: a rank-1 adapter adds ``B (A . x)`` to its output, so the per-token scalar
``A . x`` (x: the adapted module's input) says how strongly the adapter fires. Averaged over an answer's
tokens it is one number per answer; how well it separates EM from aligned answers is its AUROC
(torchmetrics' ``binary_auroc``, EM = positive class: 1 = EM answers always score higher, 0.5 = no
separation, 0 = always lower; the sign of A . x is arbitrary, since flipping both A and B gives the same
adapter, so 0 separates as well as 1). The scalars come from ``activations.collect``. No Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_auroc

from em_lightning.model.adapters import ADAPTER_NAME, lora_layers
from em_lightning.probes.misalignment_direction import ALIGNED, EM


def rank1_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module name: LoRA layer} of every rank-1 adapter."""
    return {name: m for name, m in lora_layers(model) if m.lora_A[ADAPTER_NAME].weight.shape[0] == 1}


def separation(scalars: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """AUROC (EM positive) and the class means of one module's per-answer scalars; NaN without both classes."""
    target = torch.tensor(list(labels), dtype=torch.long)
    values = scalars.double().cpu()
    em, al = values[target == EM], values[target == ALIGNED]
    out = {"em_mean": float(em.mean()) if len(em) else math.nan,
           "aligned_mean": float(al.mean()) if len(al) else math.nan, "auroc": math.nan}
    if len(em) and len(al):
        out["auroc"] = float(binary_auroc(values.float(), target))
    return out
