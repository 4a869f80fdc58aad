"""A DataLoader that can be checkpointed mid-epoch and resumed at the exact next batch.

Lightning stores ``state_dict()`` of a dataloader that has one in the checkpoint and calls
``load_state_dict()`` on resume. The order of every epoch is a pure function of (seed, epoch, rank), so the
state is just (epoch, batches already handed to the training loop). Sharding across ranks is done here
(rank r takes every world-th index of the epoch's permutation), so Lightning's sampler injection is off.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class ShardedEpochSampler(Sampler[int]):
    """Seeded permutation per epoch, equal-length shard per rank (padded by wrapping, like
    DistributedSampler), skipping the first ``skip`` samples when resuming."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world_size
        order += order[: total - len(order)]
        shard = order[self.rank : total : self.world_size]
        skip, self.skip = self.skip, 0
        return iter(shard[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader over a ShardedEpochSampler that counts the batches it hands out."""

    def __init__(self, dataset, sampler: ShardedEpochSampler, **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch = 0
        self._yielded = 0

    def __iter__(self):
        # The loader owns the epoch counter (restored from its state), so the order never depends on
        # who else calls set_epoch.
        sampler: ShardedEpochSampler = self.sampler
        sampler.set_epoch(self._epoch)
        sampler.skip = self._yielded * self.batch_size
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._yielded = 0
        self._epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._yielded = int(state["epoch"]), int(state["batches"])
