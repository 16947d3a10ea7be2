"""The compose topology across network namespaces: each service of docker-compose.yml (its
command and environment, read from the file) runs in a host of its own, the hosts joined by a
bridge, the workers reaching the server by its service name over real TCP; the default run
trains to the accuracy bar. Then the same over a shaped network (50 ms each way, 2% loss,
100 Mbit/s; asgd.bench.netns), whose shaping is itself measured first, with the delay on
the byte stream (the relay) and on packets (TCP's own round trip); and what a killed test
left behind is swept. Skipped, with the reason, where namespaces (or tc and iptables) are
not to be had."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest

from asgd.bench import netns, relay
from asgd.bench.compose import run_compose

WHY_NOT = netns.available()
WHY_NOT_SHAPED = netns.shaping_available()
needs_namespaces = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "")
needs_shaping = pytest.mark.skipif(bool(WHY_NOT_SHAPED), reason=WHY_NOT_SHAPED or "")

# the slow link
SHAPED = netns.Shaping(rate_mbit=100, loss=0.02, delay_ms=50)
# the fastest over it (docs/performance.md, "Across hosts: a shaped network"): 32 local steps
# a push (the same 300,000 samples in 94 pushes), pushed while the next 32 compute, as fp16,
# the weights back as bf16
BEST = ["worker.exchange.local_steps=32", "run.max_updates=94", "worker.exchange.overlap=true",
        "worker.exchange.encoding=fp16", "worker.exchange.weights_encoding=bf16"]
PROBE = [sys.executable, str(Path(relay.__file__).resolve())]


def within_binomial(k: int, n: int, p: float, sigmas: float = 6.0) -> bool:
    """k successes in n trials of probability p, within ``sigmas`` standard deviations."""
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def start_echo(topo, port: int, env: dict, cwd: Path, log: Path) -> None:
    """The probe's echo on the server's host, listening within 20 s."""
    echo = topo.spawn("server", [*PROBE, "echo", "--port", str(port), "--max-seconds", "100"],
                      env, cwd, log)
    deadline = time.monotonic() + 20
    while "listening" not in (log.read_text() if log.exists() else ""):
        assert echo.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.mark.slow
@needs_namespaces
@pytest.mark.timeout(600)
def test_the_compose_topology_trains_across_hosts(tmp_path, child_env, mnist1d_cached):
    # the containers' /app; the update budget ends the run (a busy machine is slower)
    run = run_compose(tmp_path / "app", child_env, overrides=["run.max_seconds=0"],
                      timeout_s=500)
    assert "tcp://server:5555" in run.logs["worker-0"]              # by service name
    print(f"compose topology across hosts: {run.test_accuracy:.3f} in {run.train_s:.1f} s")
    assert run.test_accuracy >= 0.93, (run.result, run.train_s)


@pytest.mark.slow
@needs_shaping
@pytest.mark.timeout(120)
def test_the_shaped_network_does_what_it_says(tmp_path):
    """An echo in the server's host, a probe in a worker's: through the relay a round trip
    takes the two delays, a bulk transfer stays under the rate, and every host drops about
    its share of the packets it receives; the direct path has the rate and the loss but no
    delay. Then the same probe on an unshaped topology, the reference."""
    port = 5555
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def measure(topo, to: str, nbytes: int) -> dict:
        r = topo.run("worker-0", [*PROBE, "probe", "--to", to, "--port", str(port),
                                  "--pings", "10", "--bytes", str(nbytes)], 60, env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.splitlines()[-1])

    nbytes = 8 << 20
    with netns.Topology(["server", "worker-0"], shaping=SHAPED,
                            relay=("server", [port])) as topo:
        start_echo(topo, port, env, tmp_path, tmp_path / "echo.log")
        relayed = measure(topo, "server", nbytes)     # the name resolves to the relay
        direct = measure(topo, topo.address("server"), nbytes)
        loss = {h: topo.loss_counters(h) for h in ("server", "worker-0")}
        tbf = topo.tbf_counters("worker-0")
        relay_log = topo.relay_stats()
    with netns.Topology(["server", "worker-0"], subnet=1) as plain:
        start_echo(plain, port, env, tmp_path, tmp_path / "echo-plain.log")
        reference = measure(plain, "server", nbytes)
    print(f"\nshaped ({SHAPED.describe()}): through the relay {relayed['rtt_median_ms']:.1f} ms "
          f"a round trip, {relayed['bulk_mbit_s']:.1f} Mbit/s; direct "
          f"{direct['rtt_median_ms']:.2f} ms, {direct['bulk_mbit_s']:.1f} Mbit/s; unshaped "
          f"{reference['rtt_median_ms']:.2f} ms, {reference['bulk_mbit_s']:.0f} Mbit/s; "
          f"(arrived, dropped): {loss}; worker-0's tbf: {tbf}")

    # delay: the relay holds every chunk 50 ms each way, so no round trip is shorter than
    # 100 ms; the direct path has no relay, so no such hold
    assert min(relayed["rtt_ms"]) >= 2 * SHAPED.delay_ms - 1, relayed
    # held once each way, not twice (a busy machine adds its own wait: the margin is wide)
    assert relayed["rtt_median_ms"] < 4 * SHAPED.delay_ms + 100, relayed
    assert direct["rtt_median_ms"] < min(relayed["rtt_ms"]), (direct, relayed)
    # ... and the relay ends each TCP connection: the handshake does not wait for the delay
    assert relayed["connect_ms"] < 2 * SHAPED.delay_ms, relayed
    assert "connection 1 from" in relay_log and f"up {nbytes + 9 + 10 * 13}" in relay_log, \
        relay_log
    # rate: tbf lets through at most rate_mbit of packets (headers included), so the bytes
    # of a transfer come slower; its bucket (64 KB) is a few milliseconds' worth
    burst_s = SHAPED.burst_kb * 1024 * 8 / (SHAPED.rate_mbit * 1e6)
    for m in (relayed, direct):
        assert m["bulk_s"] >= 8 * nbytes / (SHAPED.rate_mbit * 1e6) - burst_s, m
    assert tbf["overlimits"] > 0 and tbf["bytes"] > 2 * nbytes, tbf
    # unshaped: not limited to the rate, no hold (the transfers above finished within the
    # probe's bounded receives: limited, not broken)
    assert reference["bulk_mbit_s"] > SHAPED.rate_mbit, reference
    assert reference["rtt_median_ms"] < min(relayed["rtt_ms"]), (reference, relayed)
    # loss: each host's share of what arrived (the server gets both transfers' ~11,600
    # segments, the worker their acknowledgements)
    for host, (seen, dropped) in loss.items():
        assert seen > 1000 and dropped > 0, (host, seen, dropped)
        assert within_binomial(dropped, seen, SHAPED.loss), (host, seen, dropped)


@pytest.mark.slow
@needs_shaping
@pytest.mark.timeout(600)
def test_the_compose_topology_trains_over_a_slow_lossy_link(tmp_path, child_env,
                                                            mnist1d_cached):
    """50 ms each way, 2% loss, 100 Mbit/s: with local steps, overlap and 16-bit encodings
    the compose topology still trains to 0.90, the workers' traffic going through the relay
    and losing packets on the way."""
    run = run_compose(tmp_path / "app", child_env, shaping=SHAPED,
                      overrides=[*BEST, "run.max_seconds=0"], timeout_s=500)
    print(f"compose topology, {SHAPED.describe()}, {' '.join(BEST)}: "
          f"{run.test_accuracy:.3f} in {run.train_s:.1f} s; (arrived, dropped): {run.loss}")
    assert "tcp://server:5555" in run.logs["worker-0"]
    # everything the server received and sent went through the relay (which also carries
    # ZeroMQ's own framing)
    totals = re.search(r"connections; up (\d+) bytes .* down (\d+) bytes", run.relay)
    assert totals, run.relay
    up, down = map(int, totals.groups())
    assert up >= run.server["bytes_in"] > 0 and down >= 0.99 * run.server["bytes_out"] > 0, \
        (up, down, run.server)
    for host in ("server", "worker-0", "worker-1"):
        seen, dropped = run.loss[host]
        assert dropped > 0 and within_binomial(dropped, seen, SHAPED.loss), (host, run.loss)
    assert run.test_accuracy >= 0.90, (run.result, run.train_s)


def running(pid: str) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@needs_namespaces
@pytest.mark.timeout(60)
def test_what_a_killed_process_left_is_swept_by_the_next_topology(tmp_path):
    """A process killed (SIGKILL) inside its topology cannot close it; the next topology made
    on this machine deletes its namespaces and /etc/netns folders, and no one else's."""
    import signal
    import subprocess

    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from asgd.bench import netns\n"
            "t = netns.Topology(['server', 'worker-0']).__enter__()\n"
            "p = t.spawn('server', ['sleep', '60'], {}, '/', '/dev/null')\n"
            "print(' '.join([t.hub, *t.ns.values(), str(p.pid)]), flush=True)\n"
            "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1])],
                             stdout=subprocess.PIPE, text=True)
    try:
        *left, orphan = child.stdout.readline().split()
        assert len(left) == 3, left
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert running(orphan)                           # a process in a host, still running
    listed = lambda: subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                    timeout=20).stdout.split()
    assert set(left) <= set(listed())
    assert (netns.ETC_NETNS / left[1] / "hosts").exists()
    with netns.Topology(["server"]) as topo:
        mine = [topo.hub, *topo.ns.values()]
        assert set(mine) <= set(listed())
        assert not set(left) & set(listed())
        assert not any((netns.ETC_NETNS / ns).exists() for ns in left)
    deadline = time.monotonic() + 10                 # killed (a zombie until reaped)
    while running(orphan):
        assert time.monotonic() < deadline, f"{orphan} still runs"
        time.sleep(0.05)
    assert not set(mine) & set(listed())


PACKETS = netns.Shaping(rate_mbit=100, loss=0.02, delay_ms=50, delay_in="packets")
WHY_NOT_PACKETS = netns.shaping_available(packets=True)


@pytest.mark.slow
@pytest.mark.skipif(bool(WHY_NOT_PACKETS), reason=WHY_NOT_PACKETS or "")
@pytest.mark.timeout(120)
def test_the_packet_delay_holds_tcps_own_round_trip(tmp_path):
    """With the delay on packets (every packet between two hosts routed through the relay
    host and held there), TCP's handshake itself takes the two delays, every round trip
    does, by name or address, and the hosts still lose their share of the packets."""
    port, nbytes = 5555, 1 << 20
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = tmp_path / "echo.log"
    with netns.Topology(["server", "worker-0"], shaping=PACKETS,
                            relay_log=tmp_path / "delay.log") as topo:
        start_echo(topo, port, env, tmp_path, log)
        probes = []
        for to in ("server", topo.address("server")):
            r = topo.run("worker-0", [*PROBE, "probe", "--to", to, "--port", str(port),
                                      "--pings", "5", "--bytes", str(nbytes)], 60, env)
            assert r.returncode == 0, r.stderr
            probes.append(json.loads(r.stdout.splitlines()[-1]))
        loss = {h: topo.loss_counters(h) for h in ("server", "worker-0")}
    held = (tmp_path / "delay.log").read_text()
    print(f"\npackets ({PACKETS.describe()}): " + "; ".join(
        f"connect {m['connect_ms']:.1f} ms, round trip {m['rtt_median_ms']:.1f} ms, "
        f"{m['bulk_mbit_s']:.1f} Mbit/s" for m in probes) + f"; {loss}; {held.splitlines()[-1]}")
    for m in probes:
        assert m["connect_ms"] >= 2 * PACKETS.delay_ms - 1, m
        assert min(m["rtt_ms"]) >= 2 * PACKETS.delay_ms - 1, m
        assert m["rtt_median_ms"] < 4 * PACKETS.delay_ms + 100, m      # held once each way
        assert m["bulk_s"] >= 8 * nbytes / (PACKETS.rate_mbit * 1e6), m
    packets = re.search(r"delay: (\d+) packets", held)
    assert packets and int(packets.group(1)) > 2 * nbytes // 1500, held
    for host, (seen, dropped) in loss.items():
        assert dropped > 0 and within_binomial(dropped, seen, PACKETS.loss), (host, loss)
