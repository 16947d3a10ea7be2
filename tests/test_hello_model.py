"""A server that learns its model from its first worker's hello, with real server processes on
loopback: started without ``model.name`` it serves nothing until a hello brings a parameter
list, weights and settings; it adopts them (a shard its range), trains with them, refuses a
later worker whose model or settings differ (one error naming the first difference, nothing
changed), writes checkpoints of the adopted model and, resumed, checks each hello against them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from asgd.client import ServerError, connect_client
from asgd.core.checkpoint import load_checkpoint

from conftest import flat

SETTINGS = {"optimizer": {"name": "sgd", "lr": 0.5},
            "schedule": {"kind": "constant", "warmup": 0}}


def user_model(hidden: int = 3, seed: int = 0) -> nn.Module:
    """A user's own model: nothing the server's config could build."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    m[0].bias.requires_grad_(False)           # frozen: stays off the wire
    return m


def params(model: nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def as_flat(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().reshape(-1) for p in params(model).values()])


def weights_bytes(client) -> bytes:
    return flat(client.pull()[1])


def refused(call, code: str) -> str:
    with pytest.raises(ServerError) as e:
        call()
    assert e.value.code == code, e.value
    return e.value.message


@pytest.fixture
def modelless(make_config):
    return make_config(model={"name": ""}, server={"policy": "none", "max_staleness": None})


@pytest.mark.slow
def test_the_first_hello_brings_the_model_and_later_ones_must_match(start_server, modelless,
                                                                    clients):
    server = start_server(modelless)
    c0 = clients(server.endpoint, "w0")
    assert "without a model" in server.log()
    # before any model: pull and push say so, a hello without parameters says what to send
    assert "no model yet" in refused(c0.pull, "bad_request")
    assert "no model yet" in refused(
        lambda: c0.push(0, [("x", np.zeros(3, np.float32))]), "bad_request")
    assert "must carry its parameters" in refused(c0.hello, "bad_request")
    assert "non-finite" in refused(
        lambda: c0.hello(tensors={"w": torch.tensor([1.0, float("nan")])}), "bad_tensor")
    model = user_model()
    # an optimizer the server does not know: refused, nothing adopted
    msg = refused(lambda: c0.hello(tensors=params(model), settings={"optimizer": {
        "name": "lion"}}), "bad_request")
    assert "optimizer.name" in msg and "'lion' is not one of" in msg
    assert "no model yet" in refused(c0.pull, "bad_request")
    assert c0.stats()["version"] == 0 and c0.stats()["workers"] == {}

    info, weights = c0.hello(rank=0, tensors=params(model), settings=SETTINGS)
    assert info["version"] == 0
    assert [t["name"] for t in info["tensors"]] == ["0.weight", "2.weight", "2.bias"]
    assert flat(weights) == as_flat(model).tobytes()
    cfg = info["config"]
    assert cfg["optimizer"]["name"] == "sgd" and cfg["optimizer"]["lr"] == 0.5
    assert cfg["schedule"]["kind"] == "constant" and cfg["local_steps"] == 1
    assert set(cfg["outer"]) == {"optimizer", "lr", "momentum", "nesterov"}

    # it trains with the adopted settings: plain SGD at 0.5
    g = [(n, np.full(tuple(p.shape), 0.1, np.float32)) for n, p in params(model).items()]
    assert c0.push(0, g)["version"] == 1
    expected = as_flat(model) - np.float32(0.5) * np.float32(0.1)
    np.testing.assert_allclose(np.frombuffer(weights_bytes(c0), np.float32), expected,
                               rtol=0, atol=1e-7)

    # a worker with another model, or other settings: one error naming the difference
    before = weights_bytes(c0)
    c1 = clients(server.endpoint, "w1")
    msg = refused(lambda: c1.hello(tensors=params(user_model(hidden=5)), settings=SETTINGS),
                  "bad_tensor")
    assert "0.weight" in msg and "[5, 4]" in msg and "[3, 4]" in msg
    msg = refused(lambda: c1.hello(tensors=params(model),
                                   settings={"optimizer": {"name": "sgd", "lr": 0.1}}),
                  "bad_request")
    assert "optimizer.lr" in msg and "0.1" in msg and "0.5" in msg
    msg = refused(lambda: c1.hello(tensors=params(model), settings={"local_steps": 4}),
                  "bad_request")
    assert "local_steps" in msg and "worker.exchange.local_steps=4" in msg
    assert "unknown setting 'lr'" in refused(lambda: c1.hello(settings={"lr": 0.5}),
                                             "bad_request")
    s = c0.stats()
    assert s["version"] == 1 and "w1" not in s["workers"] and weights_bytes(c0) == before

    # the same model and settings (or none, or a subset): welcome, with the server's weights
    info, weights = c1.hello(tensors=params(user_model(seed=1)), settings=SETTINGS)
    assert info["version"] == 1 and flat(weights) == before
    c1.hello(settings={"local_steps": 1, "optimizer": {"lr": 0.5}})

    # stopped: the adopted model's checkpoint, with the settings it took from its worker
    assert server.stop() == 0
    ckpt = load_checkpoint(server.run_dir / "checkpoint")
    assert ckpt.version == 1 and ckpt.settings == SETTINGS
    assert ckpt.layout.names == ["0.weight", "2.weight", "2.bias"]
    assert ckpt.flat.numpy().tobytes() == before

    # resumed without a model: the checkpoint's model and settings; each hello checked
    # against them
    again = start_server(modelless, run_dir=server.run_dir, resume=True)
    c2 = clients(again.endpoint, "w2")
    info, weights = c2.hello()
    assert info["version"] == 1 and flat(weights) == before
    assert info["config"]["optimizer"]["lr"] == 0.5
    assert "optimizer.lr" in refused(
        lambda: c2.hello(settings={"optimizer": {"lr": 0.01}}), "bad_request")
    assert "2.bias" in refused(lambda: c2.hello(tensors={
        "0.weight": torch.zeros(3, 4), "2.weight": torch.zeros(2, 3)}), "bad_tensor")
    assert c2.push(1, g)["version"] == 2             # still SGD at 0.5
    np.testing.assert_allclose(np.frombuffer(weights_bytes(c2), np.float32),
                               expected - np.float32(0.05), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_server_with_a_configured_model_checks_a_hello_that_carries_one(start_server,
                                                                           make_config,
                                                                           clients):
    server = start_server(make_config(optimizer={"name": "adam", "lr": 0.01}))
    c = clients(server.endpoint, "w0")
    info, weights = c.hello()
    mine = {t["name"]: torch.zeros(t["shape"]) for t in info["tensors"]}
    c.hello(tensors=mine, settings={"optimizer": {"name": "adam", "lr": 0.01}})
    first = next(iter(mine))
    wrong = dict(mine, **{first: torch.zeros(1)})
    assert first in refused(lambda: c.hello(tensors=wrong), "bad_tensor")
    msg = refused(lambda: c.hello(settings={"optimizer": {"name": "sgd"}}), "bad_request")
    assert "optimizer.name" in msg and "'adam'" in msg and "'sgd'" in msg
    assert c.stats()["version"] == 0


@pytest.mark.slow
def test_each_shard_adopts_its_range_of_the_first_workers_model(start_server, make_config,
                                                                tmp_path):
    cfg = make_config(model={"name": ""}, server={"shards": 2, "policy": "none",
                                                  "max_staleness": None})
    run_dir = tmp_path / "run"
    handles = [start_server(cfg, "--shard", str(i), run_dir=run_dir) for i in range(2)]
    model = user_model(hidden=16)
    numel = as_flat(model).size
    with connect_client([h.endpoint for h in handles], "w0", timeout_s=10) as c:
        info, chunks = c.hello(tensors=params(model), settings=SETTINGS)
        assert [s["count"] for s in info["shards"]] == [2, 2]
        assert info["shards"][0]["stop"] == info["shards"][1]["start"]
        assert info["shards"][1]["stop"] == numel
        assert b"".join(t.array.tobytes() for t in chunks) == as_flat(model).tobytes()
        out = np.empty(numel, np.float32)
        g = np.full(numel, 0.1, np.float32)
        head = c.push_pull_flat(info["versions"], g, out)
        assert head["versions"] == [1, 1]
        np.testing.assert_allclose(out, as_flat(model) - np.float32(0.05), rtol=0, atol=1e-7)
    with connect_client([h.endpoint for h in handles], "w1", timeout_s=10) as c:
        with pytest.raises(ServerError) as e:
            c.hello(tensors=params(user_model(hidden=5)))
        assert e.value.code == "bad_tensor" and "0.weight" in e.value.message
    for h in handles:
        assert h.stop() == 0
    whole = load_checkpoint(run_dir / "checkpoint")
    assert whole.version == 1 and whole.settings == SETTINGS
    np.testing.assert_allclose(whole.flat.numpy(), out, rtol=0, atol=0)


def test_a_launch_of_the_built_in_workers_without_a_model_is_refused(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from asgd.cli import cli

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["launch", "--set", "model.name=", "--set",
                                   f"run.out_dir={tmp_path / 'runs'}"])
    assert res.exit_code != 0 and "model.name is empty" in res.output
    assert not (tmp_path / "runs").exists()             # nothing started, nothing left
