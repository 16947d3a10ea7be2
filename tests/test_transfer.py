"""Transfer learning: ``model.init_from`` loads another run's tensors by name, ``model.freeze``
keeps parameters fixed and off the wire. A launched run with a frozen first layer keeps it
bit-identical to the run it started from, its server serves only the trainable tensors, its
checkpoint holds only those, and it trains and evaluates."""
from __future__ import annotations

import json

import pytest
import torch

from asgd.config import ConfigError, from_dict, load_config
from asgd.core.checkpoint import load_checkpoint
from asgd.core.layout import ParameterLayout, trainable_parameters
from asgd.tasks.evaluate import evaluate_checkpoint
from asgd.tasks.models import build_model
from asgd.tasks.task import build_task
from tests.conftest import train_run

SMALL = {"name": "cnn1d", "args": {"channels": 8}}


def cfg_of(**model):
    return from_dict({"model": dict(SMALL, **model), "optimizer": {"name": "adam", "lr": 0.01},
                      "run": {"workers": 1, "max_updates": 300}})


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, mnist1d_cached):
    torch.set_num_threads(1)
    return train_run(tmp_path_factory.mktemp("source") / "run", cfg_of(), 300)


# ----------------------------------------------------------------------------------------------
# the layout of a model with frozen parameters

def test_frozen_parameters_are_off_the_layout():
    model = build_model(cfg_of(freeze=["conv1."]).model, (40,), 10)
    names = [n for n, _ in model.named_parameters()]
    layout = ParameterLayout.from_model(model)
    assert layout.names == [n for n in names if not n.startswith("conv1.")]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("conv1."))
    assert layout.numel == sum(p.numel() for p in trainable_parameters(model))
    # model.parameters() (as the server's store passes it) gives the same flat buffer
    assert torch.equal(layout.flatten(model.parameters()),
                       layout.flatten(trainable_parameters(model)))
    assert layout.parameters(model) == trainable_parameters(model)
    frozen = model.conv1.weight.detach().clone()
    layout.load_into(model, torch.zeros(layout.numel))
    assert torch.equal(model.conv1.weight, frozen)               # untouched
    assert all((p == 0).all() for p in trainable_parameters(model))
    whole = ParameterLayout.from_model(build_model(cfg_of().model, (40,), 10))
    with pytest.raises(ValueError, match="differ|tensors"):
        whole.parameters(model)


def test_freeze_errors_name_the_prefix():
    with pytest.raises(ConfigError, match="'conv9' is not the start of any parameter"):
        build_model(cfg_of(freeze=["conv9"]).model, (40,), 10)
    with pytest.raises(ConfigError, match="freezes every parameter"):
        build_model(cfg_of(freeze=["conv", "linear"]).model, (40,), 10)
    with pytest.raises(ConfigError, match="model.freeze"):
        cfg_of(freeze=[3])


# ----------------------------------------------------------------------------------------------
# init_from

def test_init_from_loads_every_tensor_by_name(source_run):
    src = load_checkpoint(source_run / "checkpoint").weights()
    for path in (source_run, source_run / "checkpoint"):   # a run directory or its checkpoint
        model = build_model(cfg_of(init_from=str(path)).model, (40,), 10)
        for n, p in model.named_parameters():
            assert torch.equal(p, src[n]), n
    fresh = build_model(cfg_of().model, (40,), 10)
    assert not torch.equal(fresh.conv1.weight, src["conv1.weight"])


def test_init_from_mismatch_is_a_config_error_unless_not_strict(source_run):
    wider = {"args": {"channels": 16}}
    with pytest.raises(ConfigError, match=r"shapes differ: conv1.weight \[8, 1, 5\] "
                                          r"\(model \[16, 1, 5\]\).*init_strict: false"):
        build_model(cfg_of(init_from=str(source_run), **wider).model, (40,), 10)
    # 5 classes: the head's shapes differ; without strictness the convolutions still load
    model = build_model(cfg_of(init_from=str(source_run), init_strict=False).model, (40,), 5)
    src = load_checkpoint(source_run / "checkpoint").weights()
    assert torch.equal(model.conv2.weight, src["conv2.weight"])
    assert model.linear.weight.shape[0] == 5
    with pytest.raises(ConfigError, match="model.init_from: no checkpoint"):
        build_model(cfg_of(init_from=str(source_run / "nowhere")).model, (40,), 10)


def test_init_from_a_run_that_froze_layers(source_run, tmp_path):
    """A checkpoint of a frozen run holds only its trainable tensors: starting from it
    rebuilds its model (its own init_from and freeze) for the frozen ones."""
    mid_cfg = cfg_of(init_from=str(source_run), freeze=["conv1."])
    mid = train_run(tmp_path / "mid", mid_cfg, 20)
    assert "conv1.weight" not in load_checkpoint(mid / "checkpoint").layout.names
    model = build_model(cfg_of(init_from=str(mid)).model, (40,), 10)
    src = load_checkpoint(source_run / "checkpoint").weights()
    mid_w = load_checkpoint(mid / "checkpoint").weights()
    assert torch.equal(model.conv1.weight, src["conv1.weight"])
    assert torch.equal(model.conv2.weight, mid_w["conv2.weight"])
    assert not torch.equal(model.conv2.weight, src["conv2.weight"])


# ----------------------------------------------------------------------------------------------
# a whole run

def test_launched_run_keeps_frozen_layer_and_serves_fewer_tensors(source_run, processes,
                                                                   start_server, clients,
                                                                   tmp_path):
    out = tmp_path / "runs"
    sets = [f"model.name={SMALL['name']}", "model.args.channels=8",
            f"model.init_from={source_run}", "model.freeze=[conv1.]",
            "run.max_updates=300", "run.workers=2", "run.eval_every_s=0",
            "worker.batch_size=50", f"run.out_dir={out}"]
    args = ["-m", "asgd.cli", "launch", "--quiet"]
    for s in sets:
        args += ["--set", s]
    r = processes.run(args, timeout=90, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["status"] == "ok" and summary["updates_applied"] >= 300
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]

    # the checkpoint holds only the trainable tensors, and they trained
    ckpt = load_checkpoint(run_dir / "checkpoint")
    src = load_checkpoint(source_run / "checkpoint").weights()
    assert ckpt.layout.names == ["conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias",
                                 "linear.weight", "linear.bias"]
    assert not torch.equal(ckpt.weights()["conv2.weight"], src["conv2.weight"])
    # evaluation rebuilds the model (init_from, freeze) and loads them: the frozen layer is
    # the source's, bit for bit, and the model is as good as the launch reported
    task = build_task(load_config(run_dir / "config.yaml"))
    task.layout.load_into(task.model, ckpt.flat)
    assert torch.equal(task.model.conv1.weight, src["conv1.weight"])
    assert torch.equal(task.model.conv1.bias, src["conv1.bias"])
    result = evaluate_checkpoint(run_dir)
    assert result["test_accuracy"] == summary["test_accuracy"]
    # it trained on from the source (about 0.52 after its 300 steps; chance is 0.1)
    before = evaluate_checkpoint(source_run)["test_accuracy"]
    assert summary["test_accuracy"] >= max(before - 0.03, 0.4), (before, summary)

    # the server of that config serves the trainable tensors only
    server = start_server(run_dir / "config.yaml")
    head, weights = clients(server.endpoint).hello()
    served = [t["name"] for t in head.get("tensors") or head.get("params")]
    assert served == ckpt.layout.names
    whole = ParameterLayout.from_model(build_model(cfg_of().model, (40,), 10))
    assert sum(t.array.size for t in weights) == ckpt.layout.numel < whole.numel
