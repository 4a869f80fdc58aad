"""Interleaving aligned data (Kaczér et al., "In-training defenses against emergent misalignment"): every
training batch holds a fixed number of rows from an aligned dataset beside the task rows.

``InterleavedEpochSampler`` is ``resumable.ShardedEpochSampler`` with each batch of ``batch_size`` rows made of
``batch_size - k`` task rows (the task order and sharding of the plain sampler) and ``k = fraction x
batch_size`` aligned rows (an integer: the ratio is exact in every full batch; an epoch's last batch has
its k aligned rows and the task rows left). The aligned rows are a stream over passes of seeded
permutations; which ones batch b of epoch e on rank r takes is a pure function of (seed, e, b, r), so the
resumable loader's (epoch, batches) state restores them exactly. Indices of aligned rows are offset by
the number of task rows (the loader's dataset is task rows + aligned rows). No Lightning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from em_lightning.training.resumable import ShardedEpochSampler


@dataclass
class Interleave:
    """Aligned rows in every training batch.

    Args:
        files: JSONL chat rows (the data-rows contract) to interleave, e.g. benign assistant conversations.
        fraction: share of each batch from them; ``fraction x data.batch_size`` must be a whole number in
            [1, batch_size - 1] (exact ratio, no rounding).
        seed: seed of the aligned rows' order.
    """

    files: list[str] = field(default_factory=list)
    fraction: float = 0.25
    seed: int = 0

    def per_batch(self, batch_size: int) -> int:
        k = self.fraction * batch_size
        if not self.files:
            raise ValueError("data.interleave.files: expected at least one JSONL file of aligned rows")
        if abs(k - round(k)) > 1e-9 or not 1 <= round(k) <= batch_size - 1:
            raise ValueError(f"data.interleave.fraction: {self.fraction} x data.batch_size {batch_size} = {k:g}; "
                             f"expected a whole number of rows from 1 to {batch_size - 1}")
        return int(round(k))


@functools.lru_cache(maxsize=4)
def _order(n: int, seed: int, rep: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed + rep)).tolist())


class InterleavedEpochSampler(ShardedEpochSampler):
    def __init__(self, n: int, n_aligned: int, batch_size: int, per_batch: int, seed: int, aligned_seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__(n, seed, shuffle, rank, world_size)
        if n_aligned < 1 or not 1 <= per_batch < batch_size:
            raise ValueError(f"interleave: need aligned rows and 1 <= per_batch < batch_size ({per_batch}, {batch_size})")
        self.n_aligned, self.batch_size, self.k, self.aligned_seed = n_aligned, batch_size, per_batch, aligned_seed
        self.task_per_batch = batch_size - per_batch

    def batches(self) -> int:
        """Batches per epoch on each rank."""
        return -(-super().__len__() // self.task_per_batch)

    def __len__(self) -> int:
        return super().__len__() + self.batches() * self.k

    def _aligned(self, batch: int, rank: int) -> list[int]:
        start = ((self.epoch * self.batches() + batch) * self.world_size + rank) * self.k
        n = self.n_aligned
        return [self.n + _order(n, self.aligned_seed, p // n)[p % n] for p in range(start, start + self.k)]

    def shard(self, rank: int) -> list[int]:
        task, m = super().shard(rank), self.task_per_batch
        out: list[int] = []
        for b in range(self.batches()):
            out += task[b * m : (b + 1) * m] + self._aligned(b, rank)
        return out
