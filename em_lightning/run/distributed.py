"""This process's rank and the world size, whether or not torch.distributed is initialised."""

from __future__ import annotations

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
