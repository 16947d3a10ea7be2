"""A sharded parameter server (server.shards): each shard a real process holding a contiguous
range of the flat parameters with its own version; ShardedClient speaks to all at once over tcp
frames, encodings or one shared-memory segment, and gets the same weights as one server; a
shard refuses per-parameter requests; checkpoints per shard load as the whole model, and a
shard resumes from its own; asgd launch runs a sharded cluster end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from asgd.client import ServerError, ShardedClient, connect_client
from asgd.core.checkpoint import CheckpointError, load_checkpoint
from asgd.core.flat import SHARD_ALIGN, shard_range
from asgd.core.shm import Segment

ADAM = {"optimizer": {"name": "adam", "lr": 0.01}, "schedule": {"kind": "constant", "warmup": 0}}


@pytest.mark.parametrize("numel,count", [(28298, 2), (858, 3), (10**7, 7), (16 * 4, 4)])
def test_shard_ranges_are_balanced_aligned_and_cover_every_value(numel, count):
    ranges = [shard_range(numel, i, count) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c and a < b and b % SHARD_ALIGN == 0
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 2 * SHARD_ALIGN


@pytest.mark.parametrize("numel,index,count", [(100, 2, 2), (100, -1, 2), (40, 0, 3)])
def test_shard_range_refuses_what_cannot_be_split(numel, index, count):
    with pytest.raises(ValueError):
        shard_range(numel, index, count)


@pytest.fixture
def cluster(start_server, make_config, tmp_path):
    """cluster(shards, **sections) -> (endpoints, run_dir, handles): the shards of one server
    (all sharing one run directory), on tcp, or ipc with ``ipc=True``."""
    def start(shards: int = 2, ipc: bool = False, **sections):
        cfg = make_config(**ADAM, **{"server": {"shards": shards, "policy": "none",
                                                "max_staleness": None}}, **sections)
        run_dir = tmp_path / f"run-{shards}"
        handles = []
        for i in range(shards):
            bind = f"ipc://{tmp_path}/s{shards}-{i}.sock" if ipc else "tcp://127.0.0.1:0"
            handles.append(start_server(cfg, "--shard", str(i), run_dir=run_dir, bind=bind))
        return [h.endpoint for h in handles], run_dir, handles
    return start


def drive(client, numel: int, steps: int, version, seed: int = 0) -> list[np.ndarray]:
    """``steps`` push_pulls of seeded gradients from ``version`` (a list of the shards'
    versions for a ShardedClient); the weights after each."""
    rng = np.random.default_rng(seed)
    out, seen = np.empty(numel, np.float32), []
    for _ in range(steps):
        g = (0.1 * rng.normal(size=numel)).astype(np.float32)
        head = client.push_pull_flat(version, g, out)
        version = head.get("versions", head["version"])
        seen.append(out.copy())
    return seen


@pytest.mark.slow
def test_two_shards_give_the_same_weights_as_one_server(cluster, clients):
    (one,), _, _ = cluster(shards=1)
    endpoints, _, _ = cluster(shards=2)
    single = clients(one, "w0")
    info, tensors = single.hello(rank=0)
    numel = sum(t.array.size for t in tensors)
    sharded = connect_client(list(reversed(endpoints)), "w0")   # any order: sorted by index
    try:
        assert isinstance(sharded, ShardedClient)
        merged, chunks = sharded.hello(rank=0)
        assert merged["flat"] is True and merged["tensors"] == info["tensors"]
        assert [s["index"] for s in merged["shards"]] == [0, 1]
        assert sharded.ranges == [(s["start"], s["stop"]) for s in merged["shards"]]
        assert sharded.ranges[0] == (0, sharded.ranges[1][0]) and sharded.ranges[1][1] == numel
        w0 = np.concatenate([t.array for t in chunks])
        assert np.array_equal(w0, np.concatenate([t.array.reshape(-1) for t in tensors]))
        a = drive(single, numel, 5, 0)
        b = drive(sharded, numel, 5, [0, 0])
        for x, y in zip(a, b):          # Adam is elementwise: a range of it is the same maths
            assert np.allclose(x, y, rtol=1e-6, atol=1e-7)
        assert sharded.versions == [5, 5]
        s = sharded.stats()
        assert s["version"] == 5 and len(s["shards"]) == 2
        assert [x["shard"]["index"] for x in s["shards"]] == [0, 1]
        assert s["bytes_in"] == sum(x["bytes_in"] for x in s["shards"])
    finally:
        sharded.close()


def test_each_shard_keeps_its_own_version_and_staleness(cluster):
    endpoints, _, _ = cluster(shards=2)
    with connect_client(endpoints, "w0") as c:
        _, chunks = c.hello(rank=0)
        numel = sum(t.array.size for t in chunks)
        out = np.empty(numel, np.float32)
        g = np.full(numel, 1e-3, np.float32)
        # shard 1 gets two pushes of its own through a client of that shard alone
        lone = connect_client(c.clients[1].endpoint, "solo")
        try:
            for v in (0, 1):
                lone.push_flat(v, g[c.ranges[1][0]:])
        finally:
            lone.close()
        head = c.push_pull_flat([0, 0], g, out)
        assert head["versions"] == [1, 3]
        assert head["staleness_per_shard"] == [0, 2] and head["staleness"] == 2
        assert head["version"] == 1


@pytest.mark.slow
def test_one_shared_memory_segment_serves_every_shard(cluster, tmp_path):
    endpoints, _, _ = cluster(shards=2, ipc=True)
    with connect_client(endpoints, "w0") as c:
        _, chunks0 = ShardedClient(endpoints, "probe").hello()   # the initial weights
        numel = sum(t.array.size for t in chunks0)
        seg = Segment.create(numel)
        try:
            info, _ = c.hello(rank=0, shm=seg)
            assert c.segment is seg, c.shm_refused
            w0 = np.concatenate([t.array for t in chunks0])
            g = np.random.default_rng(1).normal(size=numel).astype(np.float32)
            seg.grad(1)[:] = g
            out = np.empty(numel, np.float32)
            head = c.push_pull_flat([0, 0], None, out, slot=1)
            assert head["versions"] == [1, 1] and head["applied"] is True
            # Adam's first step moves every value by about lr against its gradient's sign
            assert np.allclose(out, w0 - 0.01 * np.sign(g), atol=1e-4)
            assert np.array_equal(out, seg.weights)
            s = c.stats()
            assert s["shm_bytes_in"] == numel * 4 and s["bytes_in"] < 4096
        finally:
            seg.close()


@pytest.mark.slow
def test_a_shard_refuses_per_parameter_requests_and_keeps_its_state(cluster, clients):
    endpoints, _, _ = cluster(shards=2)
    c = clients(endpoints[1], "w0")
    info, chunks = c.hello(rank=0)
    assert info["shard"]["count"] == 2 and info["flat"] is True and "params" in info
    lo, hi = info["shard"]["start"], info["shard"]["stop"]
    assert sum(t.array.size for t in chunks) == hi - lo
    grads = [(p["name"], np.zeros(p["shape"], np.float32)) for p in info["params"]]
    for call in (lambda: c.push(0, grads), lambda: c.push_pull(0, grads), lambda: c.pull()):
        with pytest.raises(ServerError) as e:
            call()
        assert e.value.code == "bad_request" and "shard 1 of 2" in e.value.message
    assert c.stats()["version"] == 0
    # a wrong-size flat push is refused too
    with pytest.raises(ServerError) as e:
        c.push_flat(0, np.zeros(hi - lo + 1, np.float32))
    assert e.value.code == "bad_tensor"
    assert c.stats()["version"] == 0


@pytest.mark.slow
def test_endpoints_that_are_not_the_shards_of_one_server_are_refused(cluster):
    endpoints, _, _ = cluster(shards=2)
    (other,), _, _ = cluster(shards=1)
    with ShardedClient([endpoints[0], other], "w0") as c:
        with pytest.raises(ServerError, match="shards of"):
            c.hello()
    with pytest.raises(ValueError, match="same endpoint"):
        ShardedClient([endpoints[0], endpoints[0]], "w0")


@pytest.mark.slow
def test_shard_checkpoints_load_as_the_whole_model_and_resume_per_shard(
        cluster, start_server, make_config, tmp_path):
    endpoints, run_dir, handles = cluster(shards=2)
    with connect_client(endpoints, "w0") as c:
        _, chunks = c.hello()
        numel = sum(t.array.size for t in chunks)
        out = np.empty(numel, np.float32)
        versions = [0, 0]
        for _ in range(3):
            versions = c.push_pull_flat(versions, np.full(numel, 0.5, np.float32),
                                        out)["versions"]
    for h in handles:
        assert h.stop() == 0
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["shard-0", "shard-1"]
    whole = load_checkpoint(run_dir / "checkpoint")
    assert whole.version == 3 and whole.span is None
    assert np.array_equal(whole.flat.numpy(), out)
    part = load_checkpoint(run_dir / "checkpoint" / "shard-1")
    assert part.span is not None and part.span[1] == numel
    # shard 1 alone resumes from its own folder, at its version, with its weights
    cfg = make_config(**ADAM, server={"shards": 2, "policy": "none", "max_staleness": None})
    h = start_server(cfg, "--shard", "1", run_dir=run_dir, resume=True)
    with connect_client(h.endpoint, "w1") as c:
        info, chunks = c.hello()
        assert info["version"] == 3
        assert np.array_equal(np.concatenate([t.array for t in chunks]), out[part.span[0]:])
    h.stop()
    # a missing shard is named
    import shutil

    shutil.rmtree(run_dir / "checkpoint" / "shard-1")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(run_dir / "checkpoint")


@pytest.mark.slow
def test_a_shard_will_not_resume_another_layout_of_shards(cluster, start_server, make_config,
                                                           processes, tmp_path):
    endpoints, run_dir, handles = cluster(shards=2)
    for h in handles:
        h.stop()
    cfg = make_config(**ADAM, server={"shards": 3, "policy": "none", "max_staleness": None})
    r = processes.run(["-m", "server", "--config", str(cfg), "--shard", "1", "--run-dir",
                       str(run_dir), "--resume", "--bind", "tcp://127.0.0.1:0"], timeout=60)
    assert r.returncode == 1
    assert "missing" in r.stdout + r.stderr or "values" in r.stdout + r.stderr
    r = processes.run(["-m", "server", "--config", str(cfg), "--shard", "3",
                       "--bind", "tcp://127.0.0.1:0"], timeout=60)
    assert r.returncode == 2 and "--shard 3" in r.stdout + r.stderr


@pytest.mark.slow
def test_a_worker_given_one_shard_of_two_stops_with_a_clear_error(cluster, make_config,
                                                                  processes):
    endpoints, _, _ = cluster(shards=2)
    cfg = make_config(**ADAM, server={"shards": 2})
    r = processes.run(["-m", "worker", "--config", str(cfg), "--server", endpoints[0],
                       "--rank", "0"], timeout=90)
    assert r.returncode == 2
    assert "shard 0 of 2" in r.stdout + r.stderr


@pytest.mark.parametrize("extra", [[], ["--set", "worker.exchange.shared_memory=off",
                                        "--set", "worker.exchange.encoding=fp16"]],
                         ids=["shared-memory", "tcp-fp16"])
def test_launch_with_two_shards_trains(processes, make_config, tmp_path, extra):
    cfg = make_config(server={"shards": 2, "policy": "scale", "max_staleness": 3},
                      run={"max_updates": 600, "max_seconds": 600, "eval_every_s": 0,
                           "out_dir": str(tmp_path / "runs"), "name": "sharded"})
    r = processes.run(["-m", "asgd.cli", "launch", "--config", str(cfg), "--quiet", *extra],
                      timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "runs" / "sharded"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["shards"] == 2
    assert summary["test_accuracy"] > 0.4       # 10 classes; a small model, 600 updates
    assert summary["version"] >= 600
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == ["server-0.log", "server-1.log", "worker-0.log", "worker-1.log"]
    transport = "shm" if not extra else "frames"
    assert f"({transport}" in (run_dir / "logs" / "worker-0.log").read_text()
    if extra:
        assert summary["shm_bytes_in"] == 0 and summary["bytes_in"] > 0
    else:
        assert summary["shm_bytes_in"] > 0
