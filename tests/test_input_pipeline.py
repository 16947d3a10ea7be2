"""The input pipeline: batches prefetched in a thread are the same batches, in the same order,
augmentation included, as those made on demand; the thread stops when asked and a failure in
it reaches the caller. On CUDA: pinned host data copied per batch give the same batches as
data held on the device."""
from __future__ import annotations

import threading

import pytest
import torch

from asgd.config import ConfigError, from_dict
from asgd.tasks.augment import Augment
from asgd.tasks.data import Dataset, ShardLoader

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="pinned memory and non-blocking copies need CUDA; "
                                       "this machine has no GPU")


def dataset(n=503, shape=(40,)) -> Dataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("t", x, y, x[:10], y[:10], 10)


def batches(loader: ShardLoader, count: int):
    try:
        return [loader.next() for _ in range(count)]
    finally:
        loader.close()


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("shape,augment", [
    ((40,), {"shift": 3, "scale": 0.1, "noise": 0.05}),      # 1D signals
    ((8, 8), {"shift": 1, "scale": 0.1, "noise": 0.05}),     # digits-like images
    ((40,), {"shift": 0}),                                   # no augmentation
])
def test_prefetch_gives_the_same_batches_in_the_same_order(depth, shape, augment):
    ds = dataset(shape=shape)
    cfg = from_dict({"data": {"name": "synthetic", "augment": augment},
                     "worker": {"batch_size": 32}, "run": {"seed": 5}})
    plain = ShardLoader.for_config(cfg, ds, rank=1, world=2)
    ahead = ShardLoader.for_config(cfg.replace(**{"data.prefetch": depth}), ds, rank=1,
                                   world=2)
    assert ahead.prefetch == depth and plain.prefetch == 0
    count = 3 * (len(plain.indices) // 32) + 2          # three epochs and more: reshuffles
    for (xa, ya), (xb, yb) in zip(batches(plain, count), batches(ahead, count), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_prefetch_thread_is_bounded_and_stops():
    ds = dataset()
    loader = ShardLoader(ds.x_train, ds.y_train, 0, 1, batch_size=10, prefetch=2)
    loader.next()
    t = loader._thread
    assert t is not None and t.is_alive()
    # a bounded queue: the thread runs at most ``prefetch`` batches ahead
    for _ in range(50):
        if loader._queue.full():
            break
        threading.Event().wait(0.01)
    assert loader._queue.qsize() <= 2
    loader.close()
    assert not t.is_alive()


def test_a_failure_in_the_prefetch_thread_reaches_the_caller():
    ds = dataset()

    def broken(x):
        raise RuntimeError("augmentation broke")

    loader = ShardLoader(ds.x_train, ds.y_train, 0, 1, batch_size=10, prefetch=1,
                         augment=broken)
    with pytest.raises(RuntimeError, match="augmentation broke"):
        loader.next()
    loader.close()


def test_bad_prefetch_is_refused():
    with pytest.raises(ConfigError, match="data.prefetch"):
        from_dict({"data": {"prefetch": -1}})
    ds = dataset()
    with pytest.raises(ValueError, match="prefetch"):
        ShardLoader(ds.x_train, ds.y_train, 0, 1, batch_size=10, prefetch=-1)


def test_pin_memory_is_a_no_op_on_the_cpu():
    ds = dataset()
    a = ShardLoader(ds.x_train, ds.y_train, 0, 1, batch_size=10, pin_memory=True)
    b = ShardLoader(ds.x_train, ds.y_train, 0, 1, batch_size=10)
    assert not a.pinned
    for (xa, ya), (xb, yb) in zip(batches(a, 5), batches(b, 5)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@needs_cuda
@pytest.mark.parametrize("depth", [0, 2])
def test_pinned_host_data_copied_per_batch_match_device_data(depth):
    ds = dataset(shape=(8, 8))
    aug = dict(shift=1, scale=0.1, noise=0.05, spatial_dims=2, seed=3, device="cuda")
    on_device = ShardLoader(ds.x_train, ds.y_train, 0, 2, 32, device="cuda",
                            augment=Augment(**aug))
    pinned = ShardLoader(ds.x_train, ds.y_train, 0, 2, 32, device="cuda",
                         augment=Augment(**aug), prefetch=depth, pin_memory=True)
    assert pinned.pinned and pinned.x.is_pinned() and pinned.x.device.type == "cpu"
    for (xa, ya), (xb, yb) in zip(batches(on_device, 40), batches(pinned, 40)):
        assert xb.device.type == "cuda"
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
