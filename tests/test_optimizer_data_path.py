"""asgd.Optimizer over the built-in worker's whole data path, against real server processes:
a sharded server (every shard's endpoint in ``server=``), flat frames instead of shared
memory, a lossy encoding with its error feedback in the optimizer's state, overlap, and
CURVE keys."""
from __future__ import annotations

import copy

import pytest
import torch
import zmq

import asgd
from asgd.client import connect_client
from tests.test_optimizer import assert_same, batches, server_config, train
from tests.plugins.custom import tiny_linear
from tests.test_auth import curve_server, make_keys

WIDE = 32           # inputs: 99 values, enough for two shards of at least 16


def wide_batches(n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, WIDE, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


@pytest.mark.slow
def test_a_sharded_server_steps_as_one_torch_optimizer(start_server, tmp_path):
    cfg = server_config(tmp_path, {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                        server={"shards": 2})
    shards = [start_server(cfg, "--shard", str(i), run_dir=tmp_path / "run") for i in (1, 0)]
    net, data = tiny_linear((WIDE,), 3), wide_batches(20)
    with asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.05, momentum=0.9,
                        server=",".join(s.endpoint for s in shards)) as opt:
        ref = copy.deepcopy(net)
        train(net, opt, data)
        assert opt.version == 20 and opt.staleness == 0
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data)
    assert_same(net, ref, "two shards")
    out = torch.zeros(sum(p.numel() for p in net.parameters()))
    with connect_client([s.endpoint for s in shards], "observer", timeout_s=10) as c:
        assert c.pull_flat(out.numpy()) == 20
    assert torch.equal(out, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))


def test_frames_with_an_encoding_and_overlap(start_server, tmp_path):
    """Frames (no shared memory) with fp16 gradients and overlap: every push is applied, each
    one step staler than without overlap; the error feedback is the optimizer's state; after
    close() the parameters hold the server's weights."""
    server = start_server(server_config(tmp_path, {"name": "sgd", "lr": 0.1}))
    net = tiny_linear((8,), 3)
    opt = asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1,
                         server=server.endpoint, shared_memory="off", encoding="fp16",
                         overlap=True)
    assert opt.transport == "frames"
    train(net, opt, batches(10))
    assert opt.steps == 10 and opt.version == 9 and opt.staleness == 1
    state = opt.state_dict()
    assert [f.numel() for f in state["feedback"]] == [27]
    assert state["feedback"][0].abs().sum() > 0          # what fp16 left out, owed
    opt.close()
    assert opt.version == 10
    with connect_client(server.endpoint, "observer", timeout_s=10) as c:
        out = torch.zeros(27)
        assert c.pull_flat(out.numpy()) == 10
    assert torch.equal(out, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_keys_from_the_keywords(start_server, tmp_path):
    """A CURVE server lets in the script whose keys the keywords name ({id}: the worker id),
    as asgd worker's worker.secret_key_file and worker.server_key; half a pair is refused
    before anything is sent."""
    root = make_keys(tmp_path / "keys")
    server = start_server(server_config(tmp_path, {"name": "sgd", "lr": 0.1},
                                        server=curve_server(root)))
    keys = dict(secret_key_file=str(root / "workers" / "{id}.key_secret"),
                server_key=str(root / "server" / "server.key"))
    net = tiny_linear((8,), 3)
    with pytest.raises(ValueError, match="CURVE needs both"):
        asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1,
                       server=server.endpoint, server_key=keys["server_key"])
    with asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1,
                        server=server.endpoint, **keys) as opt:
        train(net, opt, batches(3))
        assert opt.version == 3
