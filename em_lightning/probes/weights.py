"""The trainable weights of one step, kept and swapped back in for a moment.

Background judging finishes a point some steps after its answers were sampled; the probes of that point
must read the model that wrote them. A LoRA's trainable tensors are KBs to MBs, so a copy is taken when
the answers are sampled and swapped in (values only, in place: optimizer state and parameter identity are
untouched) for the probe pass, then the current values are put back bit for bit. Works on FSDP2 shards
(each rank copies its own local shard). No Lightning.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SNAPSHOT_LIMIT = 50_000_000  # trainable elements; above this (full fine-tuning) no copy is kept


def snapshot_trainable(model: torch.nn.Module, limit: int = SNAPSHOT_LIMIT) -> dict[str, torch.Tensor] | None:
    """{parameter name: detached copy} of every trainable parameter, or None above ``limit`` elements."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if sum(p.numel() for _, p in params) > limit:
        return None
    return {n: p.detach().clone() for n, p in params}


@contextmanager
def swapped_in(model: torch.nn.Module, snapshot: dict[str, torch.Tensor] | None):
    """Inside the block the trainable parameters hold ``snapshot``'s values (None: unchanged)."""
    if not snapshot:
        yield model
        return
    params = dict(model.named_parameters())
    current = {n: params[n].detach().clone() for n in snapshot}
    try:
        with torch.no_grad():
            for n, v in snapshot.items():
                params[n].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for n, v in current.items():
                params[n].copy_(v)
