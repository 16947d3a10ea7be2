"""asgd.Optimizer on bad input, against a real server: each mistake is one clear error and
the server's version, weights and worker records stay as they were; and what a script
leaves behind: its records in the run's metrics.jsonl, the final weights for asgd.load."""
from __future__ import annotations

import logging
import re
import socket

import pytest
import torch

import asgd
from asgd.client import Client
from asgd.metrics import read_metrics
from tests.test_optimizer import batches, model, server_config, server_weights, train


def unchanged(endpoint: str, weights) -> None:
    with Client(endpoint, "observer", timeout_s=10) as c:
        stats = c.stats()
    assert stats["version"] == 0 and stats["updates_applied"] == 0
    assert all(torch.equal(a, b) for a, b in zip(server_weights(endpoint), weights))


@pytest.fixture
def server(start_server, tmp_path):
    s = start_server(server_config(tmp_path, {"name": "sgd", "lr": 0.1}, adopt=False))
    s.weights = server_weights(s.endpoint)
    return s


def test_mistakes_are_clear_errors_and_change_nothing(server):
    net = model()
    from asgd.config.sections import OPTIMIZERS

    with pytest.raises(ValueError, match=r"optimizer='lion' is not one the server has "
                                         + re.escape(f"({', '.join(OPTIMIZERS)})")):
        asgd.Optimizer(net.named_parameters(), optimizer="lion", server=server.endpoint)
    with pytest.raises(ValueError, match=r"lr \(optimizer.lr\): must be > 0"):
        asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=-1.0,
                       server=server.endpoint)
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="parameters are on cpu, meta: put the model on one"):
        asgd.Optimizer([*net.parameters(), meta], optimizer="sgd", server=server.endpoint)
    with pytest.raises(ValueError, match="the server applies one optimizer"):
        asgd.Optimizer([{"params": [net[1].weight], "lr": 0.5},
                        {"params": [net[1].bias]}], optimizer="sgd", server=server.endpoint)
    # the server trains at 0.1: a script asking for 0.2 is refused, naming the setting
    with pytest.raises(ValueError, match=r"optimizer.lr.*0\.1.*0\.2|0\.2.*0\.1"):
        asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.2,
                       server=server.endpoint)
    # another model: the first parameter that differs is named
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"1\.weight"):
        asgd.Optimizer(other.named_parameters(), optimizer="sgd", lr=0.1,
                       server=server.endpoint)
    unchanged(server.endpoint, server.weights)
    # the server kept serving: a right one trains
    with asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1,
                        server=server.endpoint) as opt:
        train(net, opt, batches(2))
        assert opt.version == 2


def test_a_script_that_never_steps_is_told_and_pushes_nothing(server, caplog):
    net = model()
    with caplog.at_level(logging.WARNING, logger="asgd.optimizer"):
        with asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1,
                            server=server.endpoint) as opt:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(torch.randn(4, 8)),
                                              torch.tensor([0, 1, 2, 0])).backward()
    assert "step() was never called: nothing was pushed to the server at " \
        f"{server.endpoint}" in caplog.text
    unchanged(server.endpoint, server.weights)


def test_a_server_that_is_not_there(caplog):
    with socket.socket() as s:              # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    with caplog.at_level(logging.WARNING, logger="asgd.optimizer"):
        with pytest.raises(ConnectionError, match=f"gave up: no answer from the server at "
                                                  f"{endpoint} for 1 s"):
            asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1, server=endpoint,
                           reconnect_timeout_s=1.0)
    assert f"waiting for the server at {endpoint}" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_a_scheduler_is_refused_with_what_to_do_instead(server):
    net = model()
    with asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1,
                        server=server.endpoint) as opt:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        train(net, opt, [])
        with pytest.raises(RuntimeError, match="schedule='cosine'"):
            opt.step()
        del sched
    unchanged(server.endpoint, server.weights)


def test_log_goes_to_the_run_and_load_reads_the_final_weights(start_server, tmp_path,
                                                                monkeypatch):
    server = start_server(server_config(tmp_path, {"name": "adam", "lr": 0.01}, adopt=False,
                                        run={"max_updates": 6}))
    run_dir = tmp_path / "run"
    monkeypatch.setenv("ASGD_RUN_DIR", str(run_dir))
    net = model()
    with asgd.Optimizer(net.named_parameters(), optimizer="adam", lr=0.01, max_updates=6,
                        server=server.endpoint) as opt:
        for x, y in batches(10):
            if opt.done:
                break
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.log(loss=loss, samples=len(x))
        assert opt.done and opt.version == 6 and opt.steps == 6
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "worker_step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["worker"] == "w0" and r["staleness"] == 0 and r["loss"] > 0
               and r["samples_per_s"] > 0 for r in steps)
    assert [r["samples"] for r in steps] == [16, 32, 48, 64, 80, 96]
    (done,) = [r for r in records if r["kind"] == "worker_done"]
    assert (done["step"], done["samples"], done["version"], done["reason"]) == \
        (6, 96, 6, "max_updates")
    assert server.stop() == 0
    fresh = model()
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    assert asgd.load(server.run_dir, fresh) == ["1.weight", "1.bias"]
    for a, b in zip(fresh.parameters(), net.parameters()):
        assert torch.equal(a, b.detach())
