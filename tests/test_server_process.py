"""A real server process on loopback: staleness over the socket, bad requests that change
nothing, SIGTERM writing the checkpoint and --resume picking it up bitwise."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import msgpack
import numpy as np
import pytest

from asgd.core import protocol
from asgd.config import load_config
from asgd.metrics import read_metrics
from asgd.core.checkpoint import FILENAME, load_checkpoint
from server.main import build_store
from asgd.client import ServerError
from tests.conftest import apply_push, flat, gradients


def test_hello_pull_and_push_over_the_socket(start_server, make_config, clients):
    server = start_server(make_config())
    client = clients(server.endpoint, "w0")
    info, weights = client.hello(rank=0)
    assert info["ok"] is True and info["version"] == 0
    assert info["shard"] == {"index": 0, "count": 1, "start": 0, "stop": 858}
    assert [s["name"] for s in info["tensors"]] == [t.name for t in weights]
    version, pulled = client.pull()
    assert version == 0 and flat(pulled) == flat(weights)
    reply, fresh = client.push_pull(0, gradients(info["tensors"], 0))
    assert (reply["version"], reply["staleness"], reply["applied"]) == (1, 0, True)
    assert flat(fresh) != flat(weights)
    assert flat(client.pull()[1]) == flat(fresh)


def test_stale_push_reports_staleness_over_the_socket(start_server, make_config, clients):
    server = start_server(make_config())
    slow, fast = clients(server.endpoint, "slow"), clients(server.endpoint, "fast")
    info, _ = slow.hello(rank=0)
    fast.hello(rank=1)
    specs = info["tensors"]
    base, _ = slow.pull()                                # slow computes from version 0 ...
    assert base == 0
    for k in range(3):                                   # ... while fast pushes 3 times
        reply = fast.push(k, gradients(specs, k))
        assert (reply["staleness"], reply["version"], reply["applied"]) == (0, k + 1, True)
    reply = slow.push(base, gradients(specs, 10))
    assert (reply["staleness"], reply["version"], reply["applied"]) == (3, 4, True)
    reply, _ = slow.push_pull(2, gradients(specs, 11))
    assert (reply["staleness"], reply["version"]) == (2, 5)
    stats = fast.stats()
    assert stats["version"] == stats["updates_applied"] == 5
    assert stats["staleness_histogram"] == {"0": 3, "2": 1, "3": 1}
    assert stats["workers"]["slow"]["pushes"] == 2 and stats["workers"]["fast"]["pushes"] == 3


def test_max_staleness_drops_over_the_socket(start_server, make_config, clients):
    server = start_server(make_config(server={"policy": "max_staleness", "max_staleness": 1}))
    client = clients(server.endpoint)
    specs = client.hello()[0]["tensors"]
    client.push(0, gradients(specs, 0))
    client.push(1, gradients(specs, 1))
    _, before = client.pull()
    reply, weights = client.push_pull(0, gradients(specs, 2))    # staleness 2 > 1
    assert (reply["ok"], reply["applied"], reply["staleness"], reply["version"]) == \
        (True, False, 2, 2)
    assert flat(weights) == flat(before)
    assert client.stats()["updates_dropped"] == 1


def test_bad_requests_over_the_socket_change_nothing(start_server, make_config, clients,
                                                     raw_peer):
    server = start_server(make_config(server={"max_message_mb": 0.05}))
    client = clients(server.endpoint, "w0")
    specs = client.hello()[0]["tensors"]
    client.push(0, gradients(specs, 0))
    version, weights = client.pull()
    assert version == 1
    before = flat(weights)

    good = gradients(specs, 1)
    header = {"v": 1, "op": "push", "id": 1, "worker": "raw", "version": 1}
    wrong_shape = list(good)
    wrong_shape[0] = (good[0][0], good[0][1].reshape(-1))
    with_nan = list(good)
    with_nan[1] = (good[1][0], np.full(good[1][1].shape, np.nan, np.float32))
    with_inf = list(good)
    with_inf[2] = (good[2][0], np.full(good[2][1].shape, np.inf, np.float32))
    frames_ok = protocol.encode(header, good)
    cases = [
        ("garbage frames", [b"\xc1\xff garbage", b"\x00" * 100, b"more"], "bad_request"),
        ("one garbage frame", [b"\xde\xad\xbe\xef"], "bad_request"),
        ("non-msgpack header", [b"{\"op\": \"push\"}"] + frames_ok[1:], "bad_request"),
        ("header not a map", [msgpack.packb([1, 2, 3])], "bad_request"),
        ("protocol v2", protocol.encode({**header, "v": 2}, good), "bad_version"),
        ("unknown op", protocol.encode({**header, "op": "delete_all"}), "unknown_op"),
        ("no worker id", protocol.encode({k: v for k, v in header.items() if k != "worker"},
                                         good), "bad_request"),
        ("wrong shapes", protocol.encode(header, wrong_shape), "bad_tensor"),
        ("NaN", protocol.encode(header, with_nan), "bad_tensor"),
        ("inf", protocol.encode(header, with_inf), "bad_tensor"),
        ("wrong names", protocol.encode(header, [(n + "x", a) for n, a in good]), "bad_tensor"),
        ("wrong dtype", protocol.encode(header, [(n, a.astype(np.float16)) for n, a in good]),
         "bad_tensor"),
        ("missing tensor", protocol.encode(header, good[:-1]), "bad_tensor"),
        ("frame count", frames_ok[:-1], "bad_request"),
        ("frame size", frames_ok[:-1] + [b"\x00" * 3], "bad_tensor"),
        ("future version", protocol.encode({**header, "version": 7}, good), "bad_version"),
        ("negative version", protocol.encode({**header, "version": -1}, good), "bad_version"),
        ("too large", frames_ok + [b"\x00" * (64 * 1024)], "too_large"),
    ]
    peer = raw_peer(server.endpoint)
    expected_errors: dict[str, int] = {}
    for name, frames, code in cases:
        head, tensors = peer.exchange(frames)
        assert head["ok"] is False, name
        assert head["error"] == code, (name, head)
        assert tensors == []
        expected_errors[code] = expected_errors.get(code, 0) + 1
        # nothing changed
        version, weights = client.pull()
        assert version == 1, name
        assert flat(weights) == before, name

    # the server keeps serving, the raw peer included
    head, _ = peer.exchange(frames_ok)
    assert (head["ok"], head["id"], head["version"], head["applied"]) == (True, 1, 2, True)
    stats = client.stats()
    assert stats["version"] == stats["updates_applied"] == 2
    assert stats["errors"] == expected_errors
    assert server.popen.poll() is None


def test_client_gets_too_large_error_not_a_timeout(start_server, make_config, clients):
    """An oversized request whose header is readable is answered with its id, so the client
    sees ``too_large`` instead of waiting out its timeout."""
    server = start_server(make_config(server={"max_message_mb": 0.05}))
    client = clients(server.endpoint, timeout_s=3.0)
    specs = client.hello()[0]["tensors"]
    with pytest.raises(ServerError) as e:
        client.request("push", gradients(specs, 0), version=0, pad="x" * (64 * 1024))
    assert e.value.code == "too_large"
    assert client.pull()[0] == 0


def test_sigterm_writes_checkpoint_and_resume_continues_bitwise(
        start_server, make_config, clients, tmp_path):
    config = make_config(optimizer={"name": "adam", "lr": 0.01},
                         schedule={"kind": "cosine", "warmup": 2, "total": 20})
    run_dir = tmp_path / "run"
    first = start_server(config, run_dir=run_dir)
    client = clients(first.endpoint, "w0")
    specs = client.hello()[0]["tensors"]
    for k in range(4):
        client.push(k, gradients(specs, k))
    version, weights = client.pull()
    assert version == 4
    client.close()

    assert first.stop(signal.SIGTERM) == 0, first.log()
    ckpt_path = run_dir / "checkpoint" / FILENAME
    assert ckpt_path.exists(), first.log()
    ckpt = load_checkpoint(run_dir / "checkpoint")
    assert ckpt.version == 4
    assert ckpt.flat.numpy().tobytes() == flat(weights)
    assert ckpt.config == load_config(config).to_dict()
    assert any(r["kind"] == "server" and r["version"] == 4
               for r in read_metrics(run_dir / "metrics.jsonl"))

    second = start_server(config, run_dir=run_dir, resume=True)
    client = clients(second.endpoint, "w0")
    info, hello_weights = client.hello()
    assert info["version"] == 4
    assert flat(hello_weights) == flat(weights)
    version, pulled = client.pull()
    assert version == 4 and flat(pulled) == flat(weights)

    # the next step equals the one an uninterrupted server takes (optimizer state resumed)
    reply, after = client.push_pull(4, gradients(specs, 4))
    assert reply["version"] == 5
    reference = build_store(load_config(config))
    for k in range(5):
        apply_push(reference, [a for _, a in gradients(specs, k)], reference.version)
    assert reference.version == 5
    assert flat(after) == reference.flat.detach().numpy().tobytes()
    assert second.stop(signal.SIGINT) == 0, second.log()
    assert load_checkpoint(run_dir / "checkpoint").version == 5


def test_resume_without_checkpoint_fails_clearly(processes, make_config, tmp_path,
                                                 mnist1d_cached):
    result = processes.run(["-m", "server", "--config", str(make_config()), "--bind",
                            "tcp://127.0.0.1:0", "--run-dir", str(tmp_path / "empty"),
                            "--resume"], timeout=60)
    assert result.returncode != 0
    assert "state.asgd" in result.stderr or "checkpoint" in result.stderr.lower(), result.stderr


def test_a_spinning_server_serves_a_looping_client_and_goes_back_to_sleep(
        start_server, make_config, clients):
    """server.spin.us: after answering a client that came straight back, the server polls
    for its next request before sleeping. Every request is still answered in order, and once
    the client stops the server sleeps in poll again: over an idle second it uses a small
    part of a core (not a spinning one)."""
    import os
    import time
    from pathlib import Path

    server = start_server(make_config(server={"spin_us": 50_000, "policy": "none",
                                               "max_staleness": None}))
    c = clients(server.endpoint, "w0")
    info, tensors = c.hello(rank=0)
    numel = sum(t.array.size for t in tensors)
    out = np.empty(numel, np.float32)
    version = info["version"]
    for k in range(200):                       # back to back: the server spins between them
        reply = c.push_pull_flat(version, np.full(numel, 1e-4, np.float32), out)
        assert reply["version"] == version + 1
        version = reply["version"]

    def cpu_s() -> float:
        fields = (Path(f"/proc/{server.popen.pid}/stat").read_text()
                  .rsplit(")", 1)[1].split())
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    time.sleep(0.2)                            # the last spin (50 ms) is over
    before = cpu_s()
    time.sleep(1.0)
    assert cpu_s() - before < 0.3, "the server kept spinning while nobody asked"
    assert c.stats()["version"] == version      # and it still answers


@pytest.mark.slow
@pytest.mark.skipif(not 2 <= len(os.sched_getaffinity(0)) <= 63,
                    reason="needs a core to spare, and server.shards = the cores (at most 64)")
def test_with_a_core_to_spare_the_server_stays_awake_between_a_workers_steps(
        start_server, make_config, clients, tmp_path):
    """server.spin.spare_us: with one worker on this host (its segment mapped) and a core
    to spare, the server polls between that worker's pushes, 2 ms of "compute" apart, instead
    of sleeping: its main thread seldom blocks (few voluntary context switches a push, where
    a server with spin_spare_us 0 blocks in poll after every reply: counts, not times, so a
    busy machine does not change the outcome); either way it is asleep once the worker stops.
    A shard of a server whose shards and local workers outnumber the cores does not spin at
    all: its clients come back only once every shard has answered."""
    import time

    from asgd.core.shm import Segment

    def cpu_s(pid) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def blocked(pid) -> int:
        """Times the server's main thread blocked (gave up the core waiting for something)."""
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
        raise AssertionError(f"no voluntary_ctxt_switches in /proc/{pid}/status")

    shards = len(os.sched_getaffinity(0))     # one local worker more than the cores
    used = {}
    # a spin window far longer than the 2 ms between pushes: a busy machine that holds the
    # client back for a few milliseconds now and then does not end it
    for case, spare, extra in (("spare", 50_000, {}), ("asleep", 0, {}),
                               ("shard", 50_000, {"shards": shards})):
        server = start_server(make_config(server={"spin_spare_us": spare, **extra}),
                              *(["--shard", "0"] if extra else []),
                              bind=f"ipc://{tmp_path}/{case}.sock")
        c = clients(server.endpoint, f"w-{case}")
        _, tensors = c.hello()
        if not extra:       # a shard's hello carries its range: the segment holds the model
            numel = sum(t.array.size for t in tensors)
        seg = Segment.create(numel)
        try:
            info, _ = c.hello(rank=0, shm=seg)
            assert c.segment is seg, c.shm_refused
            seg.grad(0)[:] = 1e-4
            version = info["version"]
            pushes = 150
            before = blocked(server.popen.pid)
            for _ in range(pushes):
                end = time.perf_counter() + 0.002          # a step's compute
                while time.perf_counter() < end:
                    pass
                version = c.push_pull_flat(version, None, seg.weights, slot=0)["version"]
            used[case] = (blocked(server.popen.pid) - before) / pushes
            time.sleep(0.3)                            # the last spin (50 ms) is over
            before = cpu_s(server.popen.pid)
            time.sleep(1.0)
            assert cpu_s(server.popen.pid) - before < 0.3, f"spinning while idle ({case})"
            c.bye()
        finally:
            seg.close()
    # asleep, the server blocks in poll after nearly every reply (a switch a push, less the
    # requests already there); awake between the pushes, it blocks for far fewer of them
    assert used["asleep"] > 0.5 and used["shard"] > 0.5, used
    assert used["spare"] < 0.5 * min(used["asleep"], used["shard"]), used
