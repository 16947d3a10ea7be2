"""A script's asgd.Optimizer through a server that is killed and resumed mid-script: the
server comes back from its checkpoint on a new port, announced in the address file of
$ASGD_SERVER_FILE (as a launcher restarting it would); the optimizer follows it, says hello
again and the script trains on to its end."""
from __future__ import annotations

import signal

import pytest
import torch

import asgd
from asgd.client import Client
from tests.test_optimizer import batches, model, server_config, server_weights, train


@pytest.mark.parametrize("env", ["launch", "file"])
def test_a_server_killed_and_resumed_mid_script(env, start_server, tmp_path, monkeypatch):
    """``launch``: $ASGD_SERVER and $ASGD_SERVER_FILE both set, as asgd launch sets them;
    ``file``: the address file alone."""
    config = server_config(tmp_path, {"name": "sgd", "lr": 0.1},
                           server={"checkpoint_every": 1})
    first = start_server(config)
    announced = tmp_path / "server.addr"
    announced.write_text(first.endpoint)
    if env == "launch":
        monkeypatch.setenv("ASGD_SERVER", first.endpoint)
    else:
        monkeypatch.delenv("ASGD_SERVER", raising=False)
    monkeypatch.setenv("ASGD_SERVER_FILE", str(announced))
    net, data = model(), batches(12)
    opt = asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1,
                         request_timeout_s=2.0, push_retries=0, reconnect_timeout_s=120.0)
    assert opt.server == first.endpoint
    train(net, opt, data[:5])
    assert opt.version == 5

    first.stop(signal.SIGKILL)
    second = start_server(config, run_dir=first.run_dir, resume=True)
    assert second.endpoint != first.endpoint
    announced.write_text(second.endpoint)
    with Client(second.endpoint, "observer", timeout_s=10) as c:
        start = c.stats()["version"]      # the last checkpoint's: at most the 5 pushed
    assert 0 < start <= 5
    resumed = server_weights(second.endpoint)

    train(net, opt, data[5:6])    # the push to the dead server is dropped; hello again there
    assert opt.link.endpoint == second.endpoint
    assert opt.version == start       # the resumed server's weights, in the parameters
    assert all(torch.equal(a, b.detach()) for a, b in zip(resumed, net.parameters()))
    train(net, opt, data[6:])
    assert opt.version == start + 6 and opt.staleness == 0
    opt.close()
    assert all(torch.equal(a, b.detach())
               for a, b in zip(server_weights(second.endpoint), net.parameters()))
