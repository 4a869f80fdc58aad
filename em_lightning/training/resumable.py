"""A DataLoader that can be checkpointed at any batch of any epoch and resumed at the exact next batch,
and that tells each micro-batch how many labelled tokens its whole optimizer step has.

The order of every epoch is a pure function of (seed, epoch): a seeded permutation, padded by wrapping to
a multiple of the world size, rank r taking every world-th index (so Lightning's sampler injection is
off). The epoch comes from the trainer (Lightning calls ``sampler.set_epoch`` before every epoch, also
after a resume); a loader iterated to exhaustion outside Lightning moves to the next epoch by itself.
The checkpointed state is (epoch, batches handed out in it); a restored position is used only when the
loader is next iterated for that same epoch, so a checkpoint taken at an epoch's last batch resumes at
the next epoch's first batch.

Token-weighted loss (transformers' Trainer convention): the loss of an optimizer step is the sum of the
token losses of all its micro-batches on all ranks divided by their labelled-token count. The count
needs batches not yet seen (later micro-batches, other ranks), but the order is known in advance, so
every batch carries ``step_tokens``: the labelled tokens of its accumulation group over all ranks.
Groups are the ones Lightning steps on: ``accumulate`` consecutive batches, the epoch's last group
possibly shorter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

STEP_TOKENS = "step_tokens"


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, world_size: int) -> list[int]:
    """The epoch's permutation of range(n), padded by wrapping to a multiple of world_size."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    total = -(-n // world_size) * world_size
    return order + order[: total - n]


class ShardedEpochSampler(Sampler[int]):
    """This rank's equal-length shard of the epoch's order (padded by wrapping, like DistributedSampler)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch = 0
        self.skip = 0  # samples to skip at the next iteration (a resumed position), then 0

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int) -> list[int]:
        return epoch_order(self.n, self.seed, self.epoch, self.shuffle, self.world_size)[rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.shard(self.rank)[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader over a ShardedEpochSampler that counts the batches it hands out and adds
    ``step_tokens`` to every (dict) batch.

    Args:
        dataset: rows; ``label_counts[i]`` is the number of labelled (trained) tokens of row i.
        accumulate: micro-batches per optimizer step (the trainer's ``accumulate_grad_batches``).
    """

    def __init__(self, dataset, sampler: ShardedEpochSampler, label_counts: Sequence[int] | None = None,
                 accumulate: int = 1, **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.label_counts = None if label_counts is None else list(label_counts)
        self.accumulate = accumulate
        self._epoch = 0
        self._yielded = 0
        self._restored: tuple[int, int] | None = None

    def _group_tokens(self) -> list[int]:
        """Labelled tokens of each accumulation group of this epoch, summed over every rank's batches."""
        sampler: ShardedEpochSampler = self.sampler
        per_batch = [0] * len(self)
        for rank in range(sampler.world_size):
            shard = sampler.shard(rank)
            for b in range(len(per_batch)):
                per_batch[b] += sum(self.label_counts[i] for i in shard[b * self.batch_size : (b + 1) * self.batch_size])
        a = self.accumulate
        return [sum(per_batch[g : g + a]) for g in range(0, len(per_batch), a)]

    def __iter__(self):
        sampler: ShardedEpochSampler = self.sampler
        self._epoch = sampler.epoch
        start = 0
        if self._restored is not None and self._restored[0] == self._epoch:
            start = self._restored[1]
        self._restored = None
        sampler.skip = start * self.batch_size
        groups = self._group_tokens() if self.label_counts is not None else None
        self._yielded = start
        for batch in super().__iter__():
            if groups is not None:
                batch[STEP_TOKENS] = torch.tensor(groups[self._yielded // self.accumulate], dtype=torch.long)
            self._yielded += 1
            yield batch
        # Exhausted (a plain loop; Lightning stops after len() batches and sets the epoch itself).
        sampler.set_epoch(self._epoch + 1)
        self._epoch, self._yielded = self._epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._yielded = int(state["epoch"]), int(state["batches"])
        self._restored = (self._epoch, self._yielded)
        self.sampler.set_epoch(self._epoch)
