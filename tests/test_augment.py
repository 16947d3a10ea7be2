"""Training-time augmentation (asgd.tasks.augment): what each transform does to a batch, its
seeding, the data sets' defaults, and that a worker's loader applies it to training batches."""
from __future__ import annotations

import pytest
import torch

from asgd.config import ConfigError, from_dict, load_config
from asgd.tasks.augment import Augment
from asgd.tasks.data import Dataset, ShardLoader


def test_shift_rolls_each_signal_by_at_most_k():
    x = torch.arange(40, dtype=torch.float32).repeat(64, 1)        # (64, 40)
    y = Augment(shift=3, seed=1)(x)
    offsets = set()
    for row in y:
        k = int((row[0] - 0) % 40)                                 # row = roll(arange, k)
        k = k - 40 if k > 20 else k
        assert torch.equal(row, torch.roll(x[0], -k)) or torch.equal(row, torch.roll(x[0], k))
        offsets.add(abs(k))
    assert offsets <= {0, 1, 2, 3} and len(offsets) > 1            # random, bounded
    assert torch.equal(x[0], torch.arange(40, dtype=torch.float32))   # input untouched


def test_images_shift_on_both_axes_and_values_are_kept():
    x = torch.randn(16, 8, 8)
    y = Augment(shift=2, spatial_dims=2, seed=0)(x)
    for a, b in zip(x, y):
        assert torch.allclose(torch.sort(a.reshape(-1)).values, torch.sort(b.reshape(-1)).values)
    assert not torch.equal(x, y)


def test_scale_and_noise_and_seeding():
    x = torch.ones(256, 40)
    a = Augment(scale=0.1, noise=0.05, seed=7)(x)
    b = Augment(scale=0.1, noise=0.05, seed=7)(x)
    c = Augment(scale=0.1, noise=0.05, seed=8)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    per_sample = a.mean(1)
    assert 0.05 < per_sample.std().item() < 0.2            # scale ~ 0.1 per sample
    assert 0.03 < (a - per_sample[:, None]).std().item() < 0.08   # noise ~ 0.05 per value
    assert Augment()(x) is x                               # nothing asked: no work, no copy


def test_defaults_follow_the_data_set_and_bad_values_name_the_key():
    cfg = load_config(None)
    assert Augment.from_config(cfg.data, (40,)).shift == 3            # mnist1d
    digits = from_dict({"data": {"name": "digits"}})
    assert not Augment.from_config(digits.data, (8, 8)).active
    off = from_dict({"data": {"augment": {"shift": 0}}})
    assert not Augment.from_config(off.data, (40,)).active
    with pytest.raises(ConfigError, match="data.augment.noise"):
        from_dict({"data": {"augment": {"noise": -1.0}}})
    with pytest.raises(ConfigError, match="data.augment.shift"):
        from_dict({"data": {"augment": {"shift": -2}}})


def test_a_workers_loader_augments_training_batches_only():
    x = torch.arange(40, dtype=torch.float32).repeat(100, 1)
    ds = Dataset("mnist1d", x, torch.zeros(100, dtype=torch.int64), x[:10].clone(),
                 torch.zeros(10, dtype=torch.int64), 10)
    cfg = load_config(None)
    loader = ShardLoader.for_config(cfg, ds, rank=0, world=2)
    xb, _ = loader.next()
    assert not all(torch.equal(r, x[0]) for r in xb)        # rolled
    assert torch.equal(ds.x_train, x) and torch.equal(ds.x_test, x[:10])
    plain = ShardLoader.for_config(cfg.replace(**{"data.augment.shift": 0}), ds, 0, 2)
    assert all(torch.equal(r, x[0]) for r in plain.next()[0])
