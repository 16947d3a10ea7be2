"""Sharding (asgd.data): disjoint covering shards, per-epoch reshuffles inside the shard."""
from __future__ import annotations

import pytest
import torch

from asgd.tasks.data import ShardLoader, shard_indices


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 4), (100, 7), (4000, 2),
                                      (1000, 16), (3, 3)])
@pytest.mark.parametrize("seed", [0, 5])
def test_shards_are_disjoint_and_cover(n, world, seed):
    shards = [shard_indices(n, r, world, seed) for r in range(world)]
    everything = torch.cat(shards)
    assert len(everything) == n
    assert torch.equal(everything.sort().values, torch.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1           # balanced


def test_shards_are_deterministic_per_seed():
    assert torch.equal(shard_indices(100, 1, 3, seed=4), shard_indices(100, 1, 3, seed=4))
    assert not torch.equal(shard_indices(100, 1, 3, seed=4), shard_indices(100, 1, 3, seed=5))


@pytest.mark.parametrize("rank, world", [(-1, 2), (2, 2), (0, 0)])
def test_rank_outside_world_raises(rank, world):
    with pytest.raises(ValueError):
        shard_indices(10, rank, world, 0)


def make_data(n):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)   # row i is all i
    y = torch.arange(n)
    return x, y


def epochs(loader, count):
    """Lists of sample ids seen in each of ``count`` epochs (shard size divisible by batch)."""
    per_epoch = len(loader.indices) // loader.batch_size
    out = []
    for _ in range(count):
        ids = []
        for _ in range(per_epoch):
            xb, yb = loader.next()
            assert xb.shape == (loader.batch_size, 3) and yb.shape == (loader.batch_size,)
            assert torch.equal(xb[:, 0].long(), yb)              # x and y stay paired
            ids += yb.tolist()
        out.append(ids)
    return out


def test_loader_stays_in_its_shard_and_reshuffles_each_epoch():
    n, world, rank, batch = 60, 3, 1, 5           # a shard of 20 samples, 4 batches an epoch
    x, y = make_data(n)
    loader = ShardLoader(x, y, rank=rank, world=world, batch_size=batch, seed=3)
    shard = sorted(shard_indices(n, rank, world, 3).tolist())
    seen = epochs(loader, 4)
    for ids in seen:
        assert sorted(ids) == shard                # each epoch is the whole shard, once
    assert len({tuple(ids) for ids in seen}) == 4  # and in a new order every epoch
    assert loader.epoch >= 3


def test_loader_shards_of_all_ranks_partition_the_data():
    n, world = 40, 4
    x, y = make_data(n)
    seen = set()
    for rank in range(world):
        loader = ShardLoader(x, y, rank=rank, world=world, batch_size=10, seed=0)
        (ids,) = epochs(loader, 1)
        assert not seen & set(ids)
        seen |= set(ids)
    assert seen == set(range(n))


def test_loader_is_deterministic_for_a_seed():
    x, y = make_data(50)
    a = ShardLoader(x, y, rank=0, world=2, batch_size=5, seed=11)
    b = ShardLoader(x, y, rank=0, world=2, batch_size=5, seed=11)
    c = ShardLoader(x, y, rank=0, world=2, batch_size=5, seed=12)
    batches_a = [a.next()[1].tolist() for _ in range(12)]
    batches_b = [b.next()[1].tolist() for _ in range(12)]
    batches_c = [c.next()[1].tolist() for _ in range(12)]
    assert batches_a == batches_b
    assert batches_a != batches_c


def test_loader_ranks_shuffle_differently():
    x, y = make_data(40)
    a = ShardLoader(x, y, rank=0, world=2, batch_size=4, seed=0)
    b = ShardLoader(x, y, rank=1, world=2, batch_size=4, seed=0)
    assert not set(a.next()[1].tolist()) & set(b.next()[1].tolist())


def test_loader_batch_larger_than_shard_is_clipped():
    x, y = make_data(10)
    loader = ShardLoader(x, y, rank=0, world=2, batch_size=100, seed=0)
    assert loader.batch_size == 5
    for _ in range(3):
        xb, yb = loader.next()
        assert sorted(yb.tolist()) == sorted(shard_indices(10, 0, 2, 0).tolist())


def test_loader_empty_shard_raises():
    x, y = make_data(2)
    with pytest.raises(ValueError):
        ShardLoader(x, y, rank=2, world=3, batch_size=1)


def test_mnist1d_defaults_are_known_without_importing_the_generator(processes, asgd_cache,
                                                                    mnist1d_cached):
    """The generator pulls in matplotlib and scipy (most of a second in every process): the
    default shape and a cached data set need neither."""
    from mnist1d.data import get_dataset_args

    from asgd.tasks.data import MNIST1D_LENGTH

    assert get_dataset_args(as_dict=True)["final_seq_length"] == MNIST1D_LENGTH
    code = ("import sys; from asgd.config import load_config; "
            "from asgd.tasks.data import dataset_shape, load_dataset; "
            "cfg = load_config(None); print(dataset_shape(cfg.data)); "
            "ds = load_dataset(cfg.data); print(len(ds.x_train)); "
            "print('mnist1d' in sys.modules)")
    result = processes.run(["-c", code], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["((40,),", "10)", "4000", "False"], result.stdout
