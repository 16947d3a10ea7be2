"""The step that writes a worker's shared-memory segment as it goes (server.store._blockwise,
ServerCore._push/_answer), in one process with real segments: under every policy that
answers or holds a push_pull, each worker's segment holds exactly the weights of the version
its reply names, whether the step wrote them or the reply copied them."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import server.store as store_module
from asgd.config import from_dict
from asgd.core import protocol
from asgd.core.shm import Segment
from server.core import ServerCore
from server.local import LocalPeers
from server.store import ParameterStore

_ids = itertools.count(1)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5))     # 103 values


def request(op: str, worker: str, **fields) -> list:
    return protocol.encode({"v": 1, "op": op, "id": next(_ids), "worker": worker, **fields}, ())


@pytest.fixture
def core_with_segments(monkeypatch):
    monkeypatch.setattr(store_module, "FUSE_BLOCK", 16)      # several blocks, a short last one
    monkeypatch.setattr(store_module, "FUSE_MIN", 40)
    made = []

    def make(server: dict, optimizer: dict):
        cfg = from_dict({"optimizer": optimizer, "server": server,
                         "schedule": {"kind": "constant", "warmup": 0}})
        store = ParameterStore.from_model(model(), cfg)
        core = ServerCore(store, cfg, local=LocalPeers(store.layout.numel, False))
        segs = {}
        for w in ("a", "b"):
            segs[w] = seg = Segment.create(store.numel)
            made.append(seg)
            head, _ = protocol.decode(core.handle(w.encode(), request(
                "hello", w, rank=len(segs) - 1, shm=str(seg.path)))[0][1])
            assert head["ok"] and head["shm"]["ok"], head
        return core, segs

    yield make
    for seg in made:
        seg.close()


def push_pull(core, segs, worker: str, version: int, seed: int) -> list:
    g = np.random.default_rng(seed).standard_normal(core.store.numel).astype(np.float32)
    segs[worker].grad(0)[:] = 0.1 * g
    segs[worker].weights[:] = np.nan            # whatever it held: the reply must fill it
    return core.handle(worker.encode(), request("push_pull", worker, version=version, shm=0))


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "lr": 0.1},
                                       {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}])
@pytest.mark.parametrize("server", [{"policy": "none", "max_staleness": None},
                                    {"policy": "sync", "max_staleness": None},
                                    {"policy": "ssp", "ssp_slack": 0, "max_staleness": None}])
def test_every_reply_s_segment_holds_the_weights_of_its_version(
        core_with_segments, server, optimizer):
    core, segs = core_with_segments(server, optimizer)
    answered = 0
    for k in range(6):
        version = core.store.version
        for i, worker in enumerate("ab"):   # both from one version: sync and ssp hold "a"
            for identity, frames in push_pull(core, segs, worker, version, 2 * k + i):
                head, _ = protocol.decode(frames)
                assert head["ok"] and head["shm"], head
                # checked as each reply goes out: the store is at the version it names
                assert head["version"] == core.store.version
                np.testing.assert_array_equal(segs[identity.decode()].weights,
                                              core.store.weights.numpy())
                answered += 1
    assert answered == 12 and core.store.version == (6 if server["policy"] == "sync" else 12)
