"""``asgd bench transport``: push_pull round trips through real server processes, against a
bare ZeroMQ echo of the same bytes and, optionally, torch.distributed.rpc's parameter server.

    asgd bench transport --params 1000000 --transport shm --workers 1 --seconds 3 --vs torch-rpc

One server process (SGD, no staleness policy) holds a model of exactly P float32 parameters
(with ``--shards S``: S server processes, each a contiguous range of them, as
``server.shards`` makes); W client processes each push a flat gradient and take the weights back as fast as they can for
T seconds (after a warm-up). ``--transport``: ``tcp`` (loopback), ``ipc`` (a unix socket) or
``shm`` (the header over ipc, the tensors in each client's shared-memory segment, as
``asgd launch`` does on one host; the weights are used where the server wrote them, as a
worker's parameters are). ``--curve``: the same server again with ZeroMQ CURVE
(``server.auth.mode: curve``, throwaway keys made in the run's temporary folder), measured
right after the plain one in each repeat; ``ratio_curve_vs_plain`` is its round trips/s over the
plain server's. In the same run, the reference: ``raw_echo`` of the same
bytes over the same socket kind (what the wire allows), and with ``--vs torch-rpc`` the
parameter server a PyTorch user writes with ``torch.distributed.rpc``. The last line printed is
one JSON object: round trips/s, GB/s (both directions), latency percentiles, peak RSS of every
process, the cores asgd's servers and clients kept busy while measured (``cpu_cores``: the
servers' CPU seconds over client 0's measured window, each client's over its own; Linux),
``ratio_vs_raw`` and ``ratio_vs_torch_rpc`` (asgd's round trips/s over the
reference's: above 1, asgd is faster).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WARMUP = 5
SPIN_ENV = "ASGD_BENCH_SPIN_US"     # how a benchmark client learns its spin
PIDS_ENV = "ASGD_BENCH_SERVER_PIDS"     # the server processes whose CPU client 0 reads


def cpu_seconds(pids: list[int]) -> float | None:
    """User plus system CPU seconds the processes ``pids`` have used (Linux's /proc), or None
    where that cannot be read."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])      # utime, stime
        return total / tick
    except (OSError, ValueError, IndexError):
        return None


def vector_model(input_shape, num_classes, params: int = 1000):
    """A model that is one float32 vector of exactly ``params`` values: the server serves it,
    the benchmark's clients never run it."""
    import torch
    from torch import nn

    class Vector(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(params))

        def forward(self, x):
            return x.flatten(1)[:, :num_classes] * self.w[:1]

    return Vector()


def server_config(numel: int, shards: int = 1) -> dict:
    return {"model": {"name": "asgd.bench.transport:vector_model", "args": {"params": numel}},
            "data": {"name": "synthetic", "args": {"n_train": 64, "n_test": 16,
                                                   "shape": [16]}},
            "optimizer": {"name": "sgd", "lr": 0.01},
            "schedule": {"kind": "constant", "warmup": 0},
            "server": {"policy": "none", "max_staleness": None, "max_message_mb": 4096,
                       "shards": shards},
            "run": {"max_updates": 0, "max_seconds": 0, "workers": 1},
            "worker": {"max_steps": 1}}


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50": None, "p90": None, "p99": None}
    a = np.sort(np.asarray(latencies)) * 1e3
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (50, 90, 99)}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----------------------------------------------------------------------------------------------
# one client process

def client_main(endpoint: str, numel: int, transport: str, encoding: str, seconds: float,
                out_path: str, rank: int, keys: str = "") -> None:
    import torch

    from asgd.client import connect_client
    from asgd.core.shm import Segment

    torch.set_num_threads(1)
    spin_us = float(os.environ.get(SPIN_ENV, "0"))      # run() passes worker.spin_us's value
    client = connect_client(endpoint, f"bench{rank}", timeout_s=120,    # shards: a,b,...
                            curve=client_keys(keys, f"bench{rank}"), spin_us=spin_us)
    seg = Segment.create(numel) if transport == "shm" else None
    info, _ = client.hello(rank=rank, shm=seg)
    if transport == "shm" and client.segment is None:
        raise SystemExit(f"the server refused the shared-memory segment: {client.shm_refused}")
    if seg is not None:
        seg.unlink()          # mapped by both: leave no name behind
    version = info.get("versions", info["version"])     # each shard's, when sharded
    grad = np.full(numel, 1e-6, np.float32)
    weights = np.empty(numel, np.float32)
    if seg is not None:
        seg.grad(0)[:] = grad
        # as a worker's parameters do: the weights stay where the server writes them
        weights = seg.weights

    def one() -> int:
        if seg is not None:
            head = client.push_pull_flat(version, None, weights, slot=0)
        else:
            head = client.push_pull_flat(version, grad, weights, encoding=encoding)
        return head.get("versions", head["version"])

    for _ in range(WARMUP):
        version = one()
    server_pids = [int(p) for p in os.environ.get(PIDS_ENV, "").split(",") if p] if rank == 0 \
        else []
    server_cpu = cpu_seconds(server_pids) if server_pids else None
    cpu = time.process_time()
    latencies = []
    started = time.perf_counter()
    end = started + seconds
    while True:
        t = time.perf_counter()
        version = one()
        latencies.append(time.perf_counter() - t)
        if t >= end:
            break
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    if server_cpu is not None:
        after = cpu_seconds(server_pids)
        server_cpu = after - server_cpu if after is not None else None
    client.close()
    if seg is not None:
        seg.close()
    Path(out_path).write_text(json.dumps({
        "round_trips": len(latencies), "elapsed_s": elapsed, "latencies": latencies,
        "peak_rss_mb": peak_rss_mb(), "bytes_sent": client.bytes_sent,
        "bytes_received": client.bytes_received, "cpu_s": cpu, "server_cpu_s": server_cpu}))


# ----------------------------------------------------------------------------------------------
# the run

def make_keys(keys: Path, workers: int) -> dict:
    """Throwaway CURVE keys for one run: the server's, and one per client (``bench<r>``, and
    ``bench-stats`` for the final stats); the server's ``server`` settings that use them."""
    from asgd.core.auth import generate

    generate("server", keys)
    for name in [f"bench{r}" for r in range(workers)] + ["bench-stats"]:
        generate(name, keys / "allowed")
    return {"auth": {"mode": "curve", "secret_key_file": str(keys / "server.key_secret"),
                     "allowed_keys": str(keys / "allowed")}}


def client_keys(keys: str, name: str):
    """The CURVE keys of client ``name`` in the folder ``make_keys`` wrote, or None."""
    if not keys:
        return None
    from asgd.core.auth import ClientKeys

    return ClientKeys.load(Path(keys) / "allowed" / f"{name}.key_secret",
                           Path(keys) / "server.key")


def _endpoint(transport: str, tmp: Path, k: int) -> str:
    return "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp}/server{k}.sock"


def run_asgd(numel: int, transport: str = "tcp", workers: int = 1, seconds: float = 3.0,
             encoding: str = "none", tmp: Path | None = None, shards: int = 1,
             curve: bool = False, spin_us: float = 0.0) -> dict:
    import yaml

    from asgd.launch.processes import child_env, spawn, stop, wait_all, wait_for_address

    with tempfile.TemporaryDirectory(dir=tmp) as d:
        tmp = Path(d)
        cfg = tmp / "bench.yaml"
        conf = server_config(numel, shards)
        keys = ""
        if curve:
            keys = str(tmp / "keys")
            conf["server"].update(make_keys(tmp / "keys", workers))
        cfg.write_text(yaml.safe_dump(conf))
        servers = []
        for k in range(shards):
            servers.append(spawn(f"server{k}", [
                "-m", "server", "--config", str(cfg), "--quiet", "--shard", str(k),
                "--bind", _endpoint(transport, tmp, k), "--address-file",
                str(tmp / f"server{k}.addr"), "--checkpoint-dir", str(tmp / "ckpt")],
                tmp / f"server{k}.log"))
        clients = []
        try:
            endpoint = ",".join(wait_for_address(tmp / f"server{k}.addr", p, 120)
                                for k, p in enumerate(servers))
            outs = [tmp / f"client{r}.json" for r in range(workers)]
            clients = [spawn(f"client{r}", ["-m", "asgd.bench.transport", "client", endpoint,
                                            str(numel), transport, encoding, str(seconds),
                                            str(outs[r]), str(r), keys],
                                  tmp / f"client{r}.log", child_env(**{
                                      SPIN_ENV: str(spin_us),
                                      PIDS_ENV: ",".join(str(p.popen.pid) for p in servers)}))
                       for r in range(workers)]
            codes = wait_all(clients, seconds * 4 + 120)
            bad = [(c, rc) for c, rc in zip(clients, codes) if rc != 0]
            if bad:
                c, rc = bad[0]
                raise RuntimeError(f"{c.name} ended with {rc}:\n{c.tail()}")
            results = [json.loads(o.read_text()) for o in outs]
            server_rss = server_peak_rss(endpoint, keys)
        finally:
            stop(clients, grace_s=5)
            stop(servers, grace_s=30)
    elapsed = max(r["elapsed_s"] for r in results)
    rts = sum(r["round_trips"] for r in results)
    lat = [x for r in results for x in r["latencies"]]
    wire = sum(r["bytes_sent"] + r["bytes_received"] for r in results)
    # cores kept busy while measured: the servers' over client 0's window, each client's own
    server_cpu = results[0].get("server_cpu_s")
    cores = {"server": round(server_cpu / results[0]["elapsed_s"], 3)
             if server_cpu is not None else None,
             "clients": round(sum(r["cpu_s"] / r["elapsed_s"] for r in results), 3)}
    return {"round_trips_per_s": round(rts / elapsed, 2),
            "gb_per_s": round(rts * 8 * numel / elapsed / 1e9, 3),
            "wire_bytes_per_round_trip": int(wire / max(rts + WARMUP * workers, 1)),
            "latency_ms": percentiles(lat),
            "peak_rss_mb": {"server": server_rss,
                            "clients": max(r["peak_rss_mb"] for r in results)},
            "cpu_cores": cores,
            "workers": workers, "shards": shards, "numel": numel, "transport": transport,
            "encoding": encoding, "curve": curve}


def server_peak_rss(endpoint: str, keys: str = "") -> float | None:
    """The server's peak resident memory (every shard's, summed)."""
    from asgd.client import connect_client

    try:
        with connect_client(endpoint, "bench-stats", timeout_s=10,
                            curve=client_keys(keys, "bench-stats")) as c:
            return c.stats().get("peak_rss_mb")
    except Exception:
        return None


def run(params: int, transport: str = "tcp", workers: int = 1, seconds: float = 3.0,
        encoding: str = "none", shards: int = 1, vs: tuple = (), curve: bool = False,
        spin_us: float | None = None) -> dict:
    """``spin_us``: how long asgd's clients and the raw echo's poll for a reply before
    sleeping (default: worker.spin_us's default, what a worker does)."""
    from asgd.bench import reference
    from asgd.config import WorkerConfig

    spin_us = WorkerConfig().spin_us if spin_us is None else spin_us
    out = {"benchmark": "transport", "params": params, "transport": transport,
           "workers": workers, "shards": shards, "encoding": encoding, "seconds": seconds,
           "spin_us": spin_us}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        asgd = run_asgd(params, transport, workers, seconds, encoding, tmp, shards,
                        spin_us=spin_us)
        if curve:        # right after the plain server, on the same machine state
            out["asgd_curve"] = run_asgd(params, transport, workers, seconds, encoding, tmp,
                                         shards, curve=True, spin_us=spin_us)
            out["ratio_curve_vs_plain"] = round(out["asgd_curve"]["round_trips_per_s"] /
                                                asgd["round_trips_per_s"], 3)
        raw = reference.raw_echo(params, workers=workers, seconds=seconds,
                                 transport="tcp" if transport == "tcp" else "ipc", tmp=tmp,
                                 spin_us=spin_us)
        out.update(asgd=asgd, raw_echo=raw)
        out["ratio_vs_raw"] = round(asgd["round_trips_per_s"] / raw["round_trips_per_s"], 3)
        if "torch-rpc" in vs:
            rpc = reference.torch_rpc(params, workers=workers, seconds=seconds, tmp=tmp)
            out["torch_rpc"] = rpc
            out["ratio_vs_torch_rpc"] = round(asgd["round_trips_per_s"] /
                                              rpc["round_trips_per_s"], 3)
    out["round_trips_per_s"] = asgd["round_trips_per_s"]
    out["gb_per_s"] = asgd["gb_per_s"]
    return out


if __name__ == "__main__":
    if len(sys.argv) in (9, 10) and sys.argv[1] == "client":
        a = sys.argv[2:]
        client_main(a[0], int(a[1]), a[2], a[3], float(a[4]), a[5], int(a[6]),
                    a[7] if len(a) > 7 else "")
    else:
        raise SystemExit("usage: python -m asgd.bench.transport client ENDPOINT NUMEL "
                         "TRANSPORT ENCODING SECONDS OUT RANK [KEYS_DIR]")
