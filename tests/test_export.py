"""`asgd export` and `asgd predict`: the registry's MLP and LSTM, trained briefly with the
project's task, export to INT8 files at least 3x smaller than fp32 that lose at most one point
of test accuracy; the files are no pickle, load back to exactly the model exported, and
`asgd predict` gives the same classes from .npy and .csv inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asgd.config import from_dict, load_config
from asgd.tasks.export import (ExportError, compare, export_run, load_model, predict, quantize,
                               read_model, trained_model)
from asgd.tasks.task import build_task
from tests import conftest

MIN_SIZE_RATIO = 3.0
MAX_ACCURACY_DROP = 0.01

MODELS = {     # name -> (model config, training steps): about 2 s and 10 s on one thread
    "mlp": ({"name": "mlp", "args": {}}, 1000),
    "lstm": ({"name": "lstm", "args": {"hidden": 128}}, 500),
}


def train_run(run_dir: Path, model: dict, steps: int) -> Path:
    """Train ``model`` in this process and leave a run directory, as a launch does."""
    cfg = from_dict({"model": model, "optimizer": {"name": "adam", "lr": 0.003},
                     "run": {"max_updates": steps, "workers": 1}})
    return conftest.train_run(run_dir, cfg, steps)


class Runs(dict):
    """name -> run directory, each model trained once on first use (the LSTM's run is the
    longer: only the slow tests ask for it)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        torch.set_num_threads(1)
        model, steps = MODELS[name]
        self[name] = run = train_run(self.root / name, model, steps)
        return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist1d_cached):
    return Runs(tmp_path_factory.mktemp("export-runs"))


@pytest.mark.parametrize("name", ["mlp", pytest.param("lstm", marks=pytest.mark.slow)])
def test_int8_is_3x_smaller_and_loses_at_most_a_point(runs, name, tmp_path):
    run = runs[name]
    fp32 = export_run(run, tmp_path / "fp32.asgd")
    int8 = export_run(run, tmp_path / "int8.asgd", int8=True)
    ds = build_task(load_config(run / "config.yaml")).dataset
    r = compare(fp32, int8, ds.x_test, ds.y_test, batch_size=100, repeats=3)
    assert r["size_ratio"] >= MIN_SIZE_RATIO, r
    assert r["fp32"]["test_accuracy"] > 0.4, r          # it learned: chance is 0.1
    assert r["accuracy_drop"] <= MAX_ACCURACY_DROP, r
    assert r["fp32"]["latency_ms"] > 0 and r["int8"]["latency_ms"] > 0

    # the files load back to exactly what was exported: the trained model, and its
    # quantize_dynamic copy (the same int8 values, scales and zero points)
    model, *_ = trained_model(run)
    x = ds.x_test[:200]
    m32, h32 = load_model(fp32)
    m8, h8 = load_model(int8)
    assert (h32["precision"], h8["precision"]) == ("fp32", "int8")
    with torch.no_grad():
        assert torch.equal(m32(x), model(x))
        assert torch.equal(m8(x), quantize(model)(x))
    header, tensors = read_model(int8)
    int8_tensors = {k for k, t in tensors.items() if t.dtype == torch.int8}
    assert int8_tensors == set(header["quantized"]) and int8_tensors
    assert all(k.endswith("weight") or "weight_" in k for k in int8_tensors)


@pytest.mark.slow
def test_export_and_predict_commands(runs, processes, tmp_path):
    run = runs["mlp"]
    out = tmp_path / "mlp-int8.asgd"
    r = processes.run(["-m", "asgd.cli", "export", str(run), "--int8", "--out", str(out),
                       "--report", "--repeats", "3"], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["int8"]["file"] == str(out) and out.exists()
    assert report["fp32"]["bytes"] / report["int8"]["bytes"] >= MIN_SIZE_RATIO
    assert report["accuracy_drop"] <= MAX_ACCURACY_DROP
    assert out.read_bytes()[:8] == b"ASGDCKP2"          # the checkpoint container: no pickle

    r = processes.run(["-m", "asgd.cli", "export", str(run)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["precision"] == "fp32"
    assert (run / "model-fp32.asgd").exists()

    ds = build_task(from_dict({"model": MODELS["mlp"][0]})).dataset
    x = ds.x_test[:300].numpy()
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "x.csv", x.reshape(len(x), -1), delimiter=",", fmt="%.9g")
    model, _ = load_model(out)
    want = predict(model, torch.as_tensor(x)).tolist()

    r = processes.run(["-m", "asgd.cli", "predict", str(out), str(tmp_path / "x.npy")],
                      timeout=60)
    assert r.returncode == 0, r.stderr
    assert [int(c) for c in r.stdout.split()] == want
    r = processes.run(["-m", "asgd.cli", "predict", str(out), str(tmp_path / "x.csv"),
                       "--out", str(tmp_path / "y.npy")], timeout=60)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "y.npy").tolist() == want
    assert np.mean(np.array(want) == ds.y_test[:300].numpy()) > 0.4

    # a checkpoint is not a model file; inputs of the wrong width are named
    r = processes.run(["-m", "asgd.cli", "predict", str(run / "checkpoint" / "state.asgd"),
                       str(tmp_path / "x.npy")], timeout=60)
    assert r.returncode == 1 and "not an exported asgd model" in r.stderr, r.stderr
    np.save(tmp_path / "bad.npy", np.zeros((3, 7), np.float32))
    r = processes.run(["-m", "asgd.cli", "predict", str(out), str(tmp_path / "bad.npy")],
                      timeout=60)
    assert r.returncode == 1 and "does not hold samples of shape [40]" in r.stderr, r.stderr


def test_damaged_model_file_is_refused(runs, tmp_path):
    path = export_run(runs["mlp"], tmp_path / "m.asgd", int8=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="checksum"):
        load_model(path)
