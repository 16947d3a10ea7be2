"""The model registry and the data sets: every model builds for its data and learns, user
models and data sets load by import path, and mistakes are clear errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from asgd.config import DataConfig, ModelConfig
from asgd.tasks.data import load_dataset
from asgd.core.layout import ParameterLayout
from asgd.tasks.models import build_model

CASES = [("mlp", "digits", {}), ("cnn1d", "mnist1d", {"channels": 8}),
         ("cnn2d", "digits", {"channels": 8}), ("lstm", "mnist1d", {"hidden": 16}),
         ("mlp", "synthetic", {"hidden": [32]})]


@pytest.mark.parametrize("model,data,args", CASES)
def test_model_learns_on_its_data(model, data, args, mnist1d_cached):
    ds = load_dataset(DataConfig(name=data), seed=0)
    net = build_model(ModelConfig(name=model, args=args), ds.input_shape, ds.num_classes)
    x, y = ds.x_train[:256], ds.y_train[:256]
    assert net(x).shape == (256, ds.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    first = F.cross_entropy(net(x), y).item()
    for _ in range(100):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first, (model, data, first, loss.item())


def test_same_seed_same_weights_and_specs():
    ds = load_dataset(DataConfig(name="digits"))
    a = build_model(ModelConfig(name="cnn2d"), ds.input_shape, 10, seed=3)
    b = build_model(ModelConfig(name="cnn2d"), ds.input_shape, 10, seed=3)
    assert ParameterLayout.from_model(a).to_specs() == ParameterLayout.from_model(b).to_specs()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ParameterLayout.from_model(a).to_specs()[0] == {
        "name": "features.0.weight", "dtype": "float32",
                                     "shape": [32, 1, 3, 3]}


def test_data_sets_have_their_documented_sizes(mnist1d_cached):
    m = load_dataset(DataConfig(name="mnist1d"))
    assert (len(m.x_train), len(m.x_test), m.input_shape, m.num_classes) == (4000, 1000, (40,), 10)
    d = load_dataset(DataConfig(name="digits"))
    assert len(d.x_train) + len(d.x_test) == 1797 and d.input_shape == (8, 8)
    s = load_dataset(DataConfig(name="synthetic", args={"n_train": 300, "n_test": 50,
                                                        "shape": [4, 4]}))
    assert s.x_train.shape == (300, 4, 4) and s.x_test.shape == (50, 4, 4)


def test_user_model_and_data_set_by_import_path():
    ds = load_dataset(DataConfig(name="tests.plugins.custom:blobs", args={"n": 100}))
    assert ds.input_shape == (2,) and ds.num_classes == 2 and len(ds.x_train) == 50
    net = build_model(ModelConfig(name="tests.plugins.custom:tiny_linear"), ds.input_shape, 2)
    assert net(ds.x_test).shape == (50, 2)


@pytest.mark.parametrize("name,message", [
    ("nosuchmodel", "not a registered name"),
    ("tests.plugins.nothere:f", "cannot import"),
    ("tests.plugins.custom:missing", "has no missing"),
    ("tests.plugins.custom:not_a_model", "not nn.Module"),
])
def test_bad_model_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(name=name), (2,), 2)


def test_bad_model_arguments_name_the_model():
    with pytest.raises(ValueError, match="model 'cnn1d' does not take widht .*it takes channels"):
        build_model(ModelConfig(name="cnn1d", args={"widht": 3}), (40,), 10)


def test_bad_mnist1d_arguments_are_named(mnist1d_cached):
    with pytest.raises(ValueError, match="num_sampels"):
        load_dataset(DataConfig(name="mnist1d", args={"num_sampels": 10}))


@pytest.mark.slow
def test_launch_trains_the_2d_cnn_on_digits(processes, tmp_path):
    result = processes.run(
        ["-m", "asgd.cli", "launch", "--quiet", "--set", f"run.out_dir={tmp_path}",
         "--set", "run.name=digits", "--set", "data.name=digits", "--set", "model.name=cnn2d",
         "--set", "model.args={channels: 8}", "--set", "run.max_updates=400",
         "--set", "schedule.total=400", "--set", "run.max_seconds=0"], timeout=150)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "digits" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["test_accuracy"] >= 0.8, summary     # 10 classes: chance is 0.1
