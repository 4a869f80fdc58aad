import pytest
import torch

from em_lightning.training.resumable import STEP_TOKENS, ResumableDataLoader, ShardedEpochSampler, epoch_order


def loader(n=10, batch=3, rank=0, world=1, counts=None, accumulate=1):
    rows = [{"x": torch.tensor(i)} for i in range(n)]
    return ResumableDataLoader(rows, ShardedEpochSampler(n, seed=1, rank=rank, world_size=world), label_counts=counts,
                               accumulate=accumulate, batch_size=batch)


def ids(batch):
    return batch["x"].tolist()


def test_plain_loops_reshuffle_every_epoch():
    dl = loader()
    epochs = [[ids(b) for b in dl] for _ in range(3)]
    assert all(len(e) == len(dl) == 4 for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_epoch_comes_from_set_epoch_after_partial_iteration():
    """Lightning stops after len() batches without exhausting the iterator, then calls set_epoch."""
    dl = loader()
    it = iter(dl)
    first = [ids(next(it)) for _ in range(len(dl))]
    dl.sampler.set_epoch(1)
    second = [ids(b) for b in dl]
    assert len(second) == len(dl)
    reference = loader()
    reference.sampler.set_epoch(1)
    assert second == [ids(b) for b in reference] and second != first


@pytest.mark.parametrize("stop", [1, 2, 4])  # 4 = the epoch's last batch
def test_resume_at_any_batch_continues_exactly(stop):
    full = loader()
    expected = [ids(b) for b in full] + [ids(b) for b in full]  # two epochs
    first = loader()
    it = iter(first)
    seen = [ids(next(it)) for _ in range(stop)]
    state = first.state_dict()
    second = loader()
    second.load_state_dict(state)
    if stop == len(first):  # Lightning moves to the next epoch when the checkpoint is at an epoch end
        second.sampler.set_epoch(1)
    seen += [ids(b) for b in second]
    if stop != len(first):
        seen += [ids(b) for b in second]
    assert seen == expected


def test_shards_cover_everything_with_equal_lengths():
    shards = [list(ShardedEpochSampler(11, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(shards[0]) | set(shards[1]) == set(range(11))
    assert set(shards[0]) & set(shards[1]) == {torch.randperm(11, generator=torch.Generator().manual_seed(0))[0].item()}
    assert epoch_order(11, 0, 0, True, 2)[11] == epoch_order(11, 0, 0, True, 2)[0]


def test_step_tokens_sum_the_whole_accumulation_group_over_ranks():
    counts = [i + 1 for i in range(10)]  # row i has i + 1 labelled tokens
    world, batch, accumulate = 2, 2, 2
    per_rank = [list(loader(10, batch, r, world, counts, accumulate)) for r in range(world)]
    order = epoch_order(10, 1, 0, True, world)
    shards = [order[r::world] for r in range(world)]
    n_batches = len(per_rank[0])
    for b in range(n_batches):
        group = range(b // accumulate * accumulate, min(n_batches, (b // accumulate + 1) * accumulate))
        expected = sum(counts[i] for shard in shards for g in group for i in shard[g * batch : (g + 1) * batch])
        for r in range(world):
            assert int(per_rank[r][b][STEP_TOKENS]) == expected
    assert n_batches == 3  # so the epoch's last group (one batch per rank) is shorter: checked above
