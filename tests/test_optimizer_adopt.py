"""asgd.Optimizer against a server without a model: the server learns the model, its
initial weights and the optimizer's settings from the first hello (docs/protocol.md, hello),
trains it as torch.optim would, refuses a later worker that differs, and checkpoints it so
that asgd.load reads it back, by name or, for parameters given unnamed, by position."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import asgd
from asgd.client import Client
from tests.test_optimizer import assert_same, batches, model, server_weights, train

pytestmark = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[1] / "server" / "adopt.py").exists(),
    reason="the server learns its model from a hello only with server/adopt.py")


@pytest.fixture
def empty_server(start_server, tmp_path):
    """A server with no model and no budget of its own (configs/script.yaml's), its own
    optimizer deliberately not the one the script asks for."""
    path = tmp_path / "script.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": ""}, "data": {"name": ""},
        "optimizer": {"name": "sgd", "lr": 0.5},
        "server": {"policy": "none", "max_staleness": None, "checkpoint_every_s": 0},
        "run": {"workers": 2, "max_updates": 0, "max_seconds": 600, "eval_every_s": 0}}))
    return start_server(path)


def test_the_server_learns_the_model_and_the_optimizer_from_the_first_hello(empty_server):
    net, data = model(), batches(20)
    ref = copy.deepcopy(net)              # the server adopts these initial weights
    with asgd.Optimizer(net.parameters(), optimizer="adamw", lr=0.01, schedule="constant",
                        warmup=0, server=empty_server.endpoint) as opt:
        assert [t["name"] for t in opt.link.info["tensors"]] == ["param.0", "param.1"]
        assert opt.link.info["config"]["optimizer"]["name"] == "adamw"
        train(net, opt, data)
        assert opt.version == 20 and opt.lr == pytest.approx(0.01)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=0.01), data)
    assert_same(net, ref, "adopted adamw")

    # a second script with another model, or another rate, is refused; nothing changes
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"param\.0"):
        asgd.Optimizer(other.parameters(), optimizer="adamw", lr=0.01, schedule="constant",
                       warmup=0, server=empty_server.endpoint)
    with pytest.raises(ValueError, match=r"optimizer\.lr"):
        asgd.Optimizer(model().parameters(), optimizer="adamw", lr=0.02,
                       server=empty_server.endpoint)
    with Client(empty_server.endpoint, "observer", timeout_s=10) as c:
        assert c.stats()["version"] == 20
    assert all(torch.equal(a, b.detach())
               for a, b in zip(server_weights(empty_server.endpoint), net.parameters()))

    assert empty_server.stop() == 0
    fresh = model()
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    assert asgd.load(empty_server.run_dir, fresh) == ["param.0", "param.1"]
    assert all(torch.equal(a, b.detach()) for a, b in zip(fresh.parameters(), net.parameters()))


def test_local_steps_are_adopted_with_their_outer_rule(empty_server):
    """The first hello's local_steps and outer rule become the server's: with an outer SGD of
    rate 1 one worker's weights are its inner optimizer's alone."""
    net, data = model(), batches(12)
    ref = copy.deepcopy(net)
    inner = torch.optim.Adam(net.parameters(), lr=0.02)
    with asgd.Optimizer(net.parameters(), inner=inner, local_steps=3, outer="sgd",
                        outer_lr=1.0, outer_momentum=0.0, outer_nesterov=False,
                        server=empty_server.endpoint) as opt:
        train(net, opt, data)
        assert opt.version == 4 and opt.lr == pytest.approx(1.0)
    train(ref, torch.optim.Adam(ref.parameters(), lr=0.02), data)
    assert_same(net, ref, "adopted local steps")
