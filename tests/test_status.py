"""`asgd status` against a real server: the table shows the version and the workers, --json is
the server's stats, --watch --count K prints K snapshots, a dead address is exit 1 in time."""
from __future__ import annotations

import json
import socket

from conftest import gradients

from asgd.launch.status import histogram_mean_max, render, updates_per_s

PUSHES = 3


def _server_with_pushes(start_server, make_config, clients):
    server = start_server(make_config(optimizer={"name": "sgd", "lr": 0.01}))
    client = clients(server.endpoint, worker="w0")
    info, _ = client.hello(rank=0)
    specs = info["tensors"]
    version = info["version"]
    for i in range(PUSHES):
        version = client.push(version, gradients(specs, i))["version"]
    return server, version


def test_status_table_json_and_watch(start_server, make_config, clients, processes):
    server, version = _server_with_pushes(start_server, make_config, clients)
    assert version == PUSHES

    table = processes.run(["-m", "asgd.cli", "status", "--server", server.endpoint], timeout=30)
    assert table.returncode == 0, table.stdout + table.stderr
    out = table.stdout
    assert "version" in out and str(PUSHES) in out, out
    row = next(line for line in out.splitlines() if line.strip().startswith("w0"))
    # worker, rank, pushes, applied, dropped, repeats, last seen ("x.x s ago"), alive, staleness
    cells = row.split()
    assert cells[:6] == ["w0", "0", str(PUSHES), str(PUSHES), "0", "0"], row
    assert "yes" in cells and "ago" in cells, row

    raw = processes.run(["-m", "asgd.cli", "status", "--server", server.endpoint, "--json"],
                        timeout=30)
    assert raw.returncode == 0, raw.stderr
    stats = json.loads(raw.stdout)
    assert stats["version"] == PUSHES and stats["updates_applied"] == PUSHES
    w0 = stats["workers"]["w0"]
    assert (w0["rank"], w0["pushes"], w0["applied"], w0["alive"]) == (0, PUSHES, PUSHES, True)
    assert "status" not in stats["workers"]        # asking leaves no record behind
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0

    watch = processes.run(["-m", "asgd.cli", "status", "--server", server.endpoint,
                           "--watch", "0.2", "--count", "2", "--json"], timeout=30)
    assert watch.returncode == 0, watch.stderr
    snaps = [json.loads(line) for line in watch.stdout.splitlines() if line.strip()]
    assert len(snaps) == 2 and all(s["version"] == PUSHES for s in snaps)

    watch = processes.run(["-m", "asgd.cli", "status", "--server", server.endpoint,
                           "--watch", "--count", "2"], timeout=30)   # default period
    assert watch.returncode == 0, watch.stderr
    assert watch.stdout.count("updates/s") == 2, watch.stdout
    assert watch.stdout.count("\nw0 ") + watch.stdout.count(" w0 ") >= 2, watch.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_of_a_dead_address_is_exit_1_in_time(processes):
    res = processes.run(["-m", "asgd.cli", "status", "--server", f"127.0.0.1:{_free_port()}",
                         "--timeout", "1"], timeout=30)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error:") and "no reply" in err[0], res.stderr
    assert "within 1 s" in err[0], err        # its --timeout, not the default 5 s
    bad = processes.run(["-m", "asgd.cli", "status", "--server", "nowhere"], timeout=30)
    assert bad.returncode == 2 and "no port" in bad.stderr


def test_figures_without_a_server():
    assert histogram_mean_max({"0": 2, "2": 2}) == (1.0, 2)
    assert histogram_mean_max({}) == (None, None)
    stats = {"version": 10, "updates_applied": 10, "uptime_s": 5.0}
    assert updates_per_s(stats) == 2.0
    assert updates_per_s(stats, (0.0, {"version": 4}), now=2.0) == 3.0
    assert updates_per_s(stats, (0.0, {"version": 40}), now=2.0) is None   # a restarted server
    sharded = dict(stats, workers={}, shards=[
        {"shard": {"index": i, "start": 10 * i, "stop": 10 * i + 10}, "version": 10}
        for i in range(2)])
    text = render(sharded)
    assert "shards" in text and "[10, 20)" in text and "no worker has said hello" in text
