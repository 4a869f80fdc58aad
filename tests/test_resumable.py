import torch

from em_lightning.resumable import ResumableDataLoader, ShardedEpochSampler


def loader(n=10, batch=3, rank=0, world=1):
    return ResumableDataLoader(list(range(n)), ShardedEpochSampler(n, seed=1, rank=rank, world_size=world), batch_size=batch)


def test_resume_mid_epoch_continues_exactly():
    full = loader()
    expected = [b.tolist() for b in full] + [b.tolist() for b in full]  # two epochs
    first = loader()
    it = iter(first)
    seen = [next(it).tolist(), next(it).tolist()]
    state = first.state_dict()
    second = loader()
    second.load_state_dict(state)
    seen += [b.tolist() for b in second]
    seen += [b.tolist() for b in second]
    assert seen == expected
    assert expected[:4] != expected[4:]  # epochs are reshuffled


def test_shards_cover_everything_with_equal_lengths():
    shards = [list(ShardedEpochSampler(11, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(shards[0]) | set(shards[1]) == set(range(11))
    assert set(shards[0]) & set(shards[1]) == {torch.randperm(11, generator=torch.Generator().manual_seed(0))[0].item()}
