"""Data sets and sharding.

    ds = load_dataset(cfg.data, seed=cfg.run.seed)        # a Dataset of CPU tensors
    for x, y in ShardLoader(ds.x_train, ds.y_train, rank=0, world=2, batch_size=100, seed=0):
        ...

Data sets: ``mnist1d`` (generated offline by the mnist1d package with its default arguments:
4,000 training and 1,000 test samples; cached as .npz), ``digits`` (scikit-learn's 8x8 digits,
a fixed 80/20 split), ``synthetic`` (a learnable random teacher of configurable size, for
throughput work) and any ``package.module:factory`` returning a Dataset or a dict with
x_train, y_train, x_test, y_test (and optionally num_classes, loss). What the built-in loop
trains is a classifier: inputs of one shape, labels whole numbers in [0, K); anything else
(regression targets, negative labels, another loss) is refused with one line that points to
a training script of one's own (docs/data.md has the contract).

Sharding: worker ``rank`` of ``world`` owns a disjoint slice of one seeded permutation of the
training split; together the shards cover it. Each epoch reshuffles the shard with the seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asgd.tasks.contract import check_arrays, returned_splits
from asgd.tasks.imports import check_arguments, import_object


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor   # (N, *input_shape) float32
    y_train: torch.Tensor   # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


def _cache_dir(cache_dir: str) -> Path:
    root = Path(cache_dir or os.environ.get("ASGD_CACHE") or Path.home() / ".cache" / "asgd")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _from_arrays(name, x, y, xt, yt, num_classes=None, loss=None) -> Dataset:
    """A Dataset from array-likes, checked against the contract (asgd.tasks.contract)."""
    return Dataset(name, *check_arrays(name, x, y, xt, yt, num_classes, loss))


MNIST1D_LENGTH = 40     # mnist1d's default final_seq_length: the signals' length


def _mnist1d_args(overrides: dict) -> dict:
    """The generator's arguments with ``overrides``; ValueError naming any it does not take.
    Imports the mnist1d package (with matplotlib and scipy: most of a second)."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    unknown = sorted(set(overrides) - set(args) | ({"url"} & set(overrides)))
    if unknown:
        raise ValueError(f"data set 'mnist1d' does not take {', '.join(unknown)} "
                         f"(data.args); it takes {', '.join(sorted(set(args) - {'url'}))}")
    args.update(overrides)
    args.pop("url", None)
    return args


def _mnist1d_cache_key(overrides: dict) -> str:
    """The cache file's key: the overrides and the generator's version, so that a cached
    data set is found without importing the generator (a new mnist1d version generates
    anew)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("mnist1d")
    except PackageNotFoundError:
        v = "?"
    text = json.dumps({"overrides": overrides, "mnist1d": v}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mnist1d(cache_dir: str = "", **overrides) -> Dataset:
    """MNIST-1D from the mnist1d package's generator (never its download), cached as .npz.
    A cached data set loads without importing the generator."""
    path = _cache_dir(cache_dir) / f"mnist1d-{_mnist1d_cache_key(overrides)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return _from_arrays("mnist1d", z["x"], z["y"], z["x_test"], z["y_test"], 10)
        except (OSError, ValueError, KeyError):
            pass  # a torn cache file: generate again
    args = _mnist1d_args(overrides)
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    d = make_dataset(ObjectView(dict(args, url="")))
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
    os.replace(tmp, path)
    return _from_arrays("mnist1d", d["x"], d["y"], d["x_test"], d["y_test"], 10)


def digits(test_fraction: float = 0.2, seed: int = 0, cache_dir: str = "") -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)    # (N, 8, 8)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return _from_arrays("digits", x[train], d.target[train], x[test], d.target[test], 10)


def synthetic(n_train: int = 10000, n_test: int = 2000, shape=(64,), num_classes: int = 10,
              noise: float = 0.5, seed: int = 0, cache_dir: str = "") -> Dataset:
    """Gaussian inputs labelled by a random linear teacher plus noise: learnable, any size."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else (int(shape),)
    dim = int(np.prod(shape))
    teacher = torch.randn(dim, num_classes, generator=g)
    x = torch.randn(n_train + n_test, dim, generator=g)
    logits = x @ teacher + noise * torch.randn(n_train + n_test, num_classes, generator=g)
    y = logits.argmax(1)
    x = x.reshape(-1, *shape)
    return Dataset("synthetic", x[:n_train].contiguous(), y[:n_train], x[n_train:].contiguous(),
                   y[n_train:], num_classes)


DATASETS = {"mnist1d": mnist1d, "digits": digits, "synthetic": synthetic}


def dataset_factory(name: str):
    return DATASETS.get(name) or import_object(name, "data set")


def _builtin_kwargs(data_cfg, seed: int) -> dict:
    kwargs = dict(data_cfg.args)
    if data_cfg.name in ("digits", "synthetic"):
        kwargs.setdefault("seed", seed)
    return kwargs


def load_dataset(data_cfg, seed: int = 0) -> Dataset:
    factory = dataset_factory(data_cfg.name)
    builtin = data_cfg.name in DATASETS
    kwargs = _builtin_kwargs(data_cfg, seed) if builtin else dict(data_cfg.args)
    check_arguments(factory, kwargs, f"data set {data_cfg.name!r}", "data.args")
    ds = factory(cache_dir=data_cfg.cache_dir, **kwargs) if builtin else factory(**kwargs)
    if builtin:
        return ds
    if isinstance(ds, Dataset):
        ds = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test,
              "y_test": ds.y_test, "num_classes": ds.num_classes}
    return _from_arrays(data_cfg.name, *returned_splits(data_cfg.name, ds))


def dataset_shape(data_cfg, seed: int = 0) -> tuple[tuple, int]:
    """(input shape, number of classes) of a data set; the built-ins answer without loading
    their data (the server needs only this to build the model)."""
    args = data_cfg.args
    if data_cfg.name == "mnist1d":
        if not args:      # the defaults: no need to import the generator to know
            return (MNIST1D_LENGTH,), 10
        full = _mnist1d_args(dict(args))
        return (int(full["final_seq_length"]),), 10
    if data_cfg.name == "digits":
        check_arguments(digits, args, "data set 'digits'", "data.args")
        return (8, 8), 10
    if data_cfg.name == "synthetic":
        check_arguments(synthetic, args, "data set 'synthetic'", "data.args")
        shape = args.get("shape", (64,))
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else (int(shape),)
        return shape, int(args.get("num_classes", 10))
    ds = load_dataset(data_cfg, seed)
    return ds.input_shape, ds.num_classes


# ----------------------------------------------------------------------------------------------
# sharding

def shard_indices(n: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Worker ``rank``'s disjoint share of range(n); the shares of all ranks cover it."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[rank::world].clone()


class ShardLoader:
    """Endless batches from one worker's shard, reshuffled each epoch with (seed, rank, epoch).

    Where the data live: on the worker's device in one tensor (a batch is an index_select
    there), or with ``pin_memory`` on CUDA in pinned host memory, each batch gathered on the
    host and copied with ``non_blocking=True`` (for data sets too big for the device).
    ``prefetch``: prepare batches ahead of the step in a thread, at most this many waiting
    (0: each batch is made when it is asked for). The batches and their order are the same
    either way: the thread is the only one drawing from the shuffle and the augmentation's
    generator. On the CPU with the small in-memory data sets here a batch takes tens of
    microseconds, less than handing it across threads costs, so the default is 0
    (docs/models.md has the measurement)."""

    GET_TIMEOUT_S = 60.0     # a prefetch thread that produces nothing for this long is an error

    def __init__(self, x, y, rank: int, world: int, batch_size: int, seed: int = 0,
                 device="cpu", augment=None, prefetch: int = 0, pin_memory: bool = False):
        device = torch.device(device)
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.pinned = bool(pin_memory) and device.type == "cuda"
        home = torch.device("cpu") if self.pinned else device   # where the data set lives
        self.device = device
        self.indices = shard_indices(len(x), rank, world, seed).to(home)
        if len(self.indices) == 0:
            raise ValueError(f"shard {rank} of {world} is empty ({len(x)} samples)")
        if self.pinned:
            self.x, self.y = x.contiguous().pin_memory(), y.contiguous().pin_memory()
        else:
            self.x, self.y = x.to(device), y.to(device)
        self.batch_size = min(batch_size, len(self.indices))
        self.seed, self.rank = seed, rank
        self.augment = augment      # an asgd.tasks.augment.Augment for training batches, or None
        self.prefetch = int(prefetch)
        self.epoch, self._order, self._pos = 0, None, 0
        self._queue = self._thread = None
        self._stop = threading.Event()
        self._stream = None
        self._reshuffle()

    def _reshuffle(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.epoch)
        perm = torch.randperm(len(self.indices), generator=g).to(self.indices.device)
        self._order, self._pos = self.indices[perm], 0

    def _make(self):
        """The next batch (x, y) on the device, augmented."""
        if self._pos + self.batch_size > len(self._order):
            self.epoch += 1
            self._reshuffle()
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        if self.pinned:     # gathered on the host into pinned memory, copied asynchronously
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        return (self.augment(x) if self.augment is not None else x), y

    def next(self):
        if not self.prefetch:
            return self._make()
        if self._thread is None:
            self._start()
        deadline = time.monotonic() + self.GET_TIMEOUT_S
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the prefetch thread stopped producing batches")
        if isinstance(item, BaseException):
            raise item
        x, y, event = item
        if event is not None:   # the copy ran on the thread's stream: wait for it on ours
            torch.cuda.current_stream(self.device).wait_event(event)
            x.record_stream(torch.cuda.current_stream(self.device))
            y.record_stream(torch.cuda.current_stream(self.device))
        return x, y

    # ------------------------------------------------------------------------------------------
    # prefetch

    def _start(self):
        self._queue = queue.Queue(maxsize=self.prefetch)
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
        self._thread = threading.Thread(target=self._produce, name=f"prefetch-{self.rank}",
                                        daemon=True)
        self._thread.start()

    def _produce(self):
        try:
            while not self._stop.is_set():
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        x, y = self._make()
                        event = torch.cuda.Event()
                        event.record(self._stream)
                else:
                    (x, y), event = self._make(), None
                while not self._stop.is_set():
                    try:
                        self._queue.put((x, y, event), timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:     # handed to the consumer, which raises it
            while not self._stop.is_set():
                try:
                    self._queue.put(e, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def close(self) -> None:
        """Stop the prefetch thread (if any); waits at most a second for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @classmethod
    def for_config(cls, cfg, ds, rank: int, world: int, device="cpu") -> "ShardLoader":
        """Worker ``rank``'s loader as the run's config asks: its batch size, seed and
        augmentation (data.augment)."""
        from asgd.tasks.augment import Augment

        aug = Augment.from_config(cfg.data, ds.input_shape, cfg.run.seed, rank, device)
        return cls(ds.x_train, ds.y_train, rank, world, cfg.worker.batch_size,
                   seed=cfg.run.seed, device=device, augment=aug if aug.active else None,
                   prefetch=getattr(cfg.data, "prefetch", 0),
                   pin_memory=getattr(cfg.data, "pin_memory", False))

    def __iter__(self):
        while True:
            yield self.next()
