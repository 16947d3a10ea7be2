"""The two references ``asgd bench transport`` measures push_pull against: what the wire allows,
and what a PyTorch user gets from torch.distributed.rpc.

    tmp = Path(tempfile.mkdtemp())
    r = raw_echo(1_000_000, workers=2, seconds=3.0, transport="ipc", tmp=tmp)
    r = torch_rpc(1_000_000, workers=2, seconds=3.0, tmp=tmp)
    r["round_trips_per_s"], r["gb_per_s"], r["latency_ms"]["p99"], r["peak_rss_mb"]["server"]

``raw_echo``: a bare ZeroMQ ROUTER process echoes what ``workers`` DEALER client processes send,
the bytes of a push_pull (numel float32 values in frames of at most chunk_bytes, after a small
header frame). Each client sends from one preallocated buffer with copy=False and receives the
echo frame by frame with recv_into into another, as a lean client would: the most a client on
this transport can get, with no codec and no update.

``torch_rpc``: the parameter server a user writes with torch.distributed.rpc (TensorPipe, its
defaults): rank ``ps`` holds a float32 weight tensor and a lock, each trainer rank calls
``rpc_sync("ps", push_pull, args=(grad,))`` and gets the updated weights back.

Both measure alike. Each client process connects, does WARMUP_ROUND_TRIPS round trips, reports
ready and waits for the parent's go, so the clients' timed windows overlap; it then runs round
trips for ``seconds`` and writes JSON to its run directory: round trips, elapsed seconds, the
latency of each, peak RSS. The result sums round trips a second over clients, counts payload
bytes both ways (8 * numel a round trip) and takes latency percentiles over every round trip:

    {"round_trips_per_s": 812.4, "gb_per_s": 6.499, "latency_ms": {"p50":, "p90":, "p99":},
     "peak_rss_mb": {"server": 61.2, "clients": 74.0}, "workers": 1, "numel": 1000000}

Every role runs in its own process, started with ``spawn`` (one run directory per call, under
``tmp``, holding address files, logs and results):

    python -c "$ENTRY" echo    --run-dir D --bind tcp://127.0.0.1:*
    python -c "$ENTRY" client  --run-dir D --name client-0 --endpoint E --numel N --seconds S
    python -c "$ENTRY" ps      --run-dir D --init file:///D/rendezvous --workers W --numel N
    python -c "$ENTRY" trainer --run-dir D --init file:///D/rendezvous --workers W --rank R ...

Every wait is bounded: a process that exits early or hangs is stopped, and RuntimeError
(ProcessError) names it with the tail of its log.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from asgd.launch.processes import (Proc, ProcessError, child_env, spawn, stop, wait_all,
                                   wait_for_address, write_address)

# The roles run as functions of this module under its own name (not ``-m``, which would make
# it ``__main__``): torch RPC sends push_pull by its qualified name, asgd.bench.reference.
ENTRY = "import sys; from asgd.bench.reference import main; sys.exit(main(sys.argv[1:]))"

WARMUP_ROUND_TRIPS = 3
STARTUP_TIMEOUT_S = 120.0   # a process imports numpy, zmq or torch on a shared machine
REPLY_TIMEOUT_S = 60.0      # one round trip of the largest payload, on a loaded machine
FINISH_TIMEOUT_S = 60.0     # past ``seconds``: the last round trip, results, shutdown
IDLE_TIMEOUT_S = 300.0      # an echo server nobody speaks to exits on its own
HEADER = struct.Struct("<QQ")   # round trip number, payload bytes
LR = 0.01


# ----------------------------------------------------------------------------------------------
# the references, from the parent

def raw_echo(numel: int, workers: int = 1, seconds: float = 3.0, transport: str = "tcp",
             chunk_bytes: int = 4 << 20, *, tmp: Path, spin_us: float = 0.0) -> dict:
    """A ZeroMQ ROUTER echo and ``workers`` DEALER clients moving numel float32 values each
    way a round trip. ``transport``: "tcp" (127.0.0.1), "ipc" or "shm" (an ipc:// socket in
    the run directory; ZeroMQ has no shared-memory transport)."""
    if transport not in ("tcp", "ipc", "shm"):
        raise ValueError(f"unknown transport {transport!r}: tcp, ipc or shm")
    run_dir = _run_dir(tmp, f"raw-echo-{transport}-")
    bind = "tcp://127.0.0.1:*" if transport == "tcp" else _ipc_endpoint(run_dir / "echo.sock")
    env = child_env(OMP_NUM_THREADS="1")
    server = _spawn_role("echo server", "echo", ["--bind", bind], run_dir, env)
    procs = [server]
    try:
        endpoint = wait_for_address(run_dir / "echo.addr", server, STARTUP_TIMEOUT_S)
        names = [f"client-{k}" for k in range(workers)]
        procs += [_spawn_role(f"echo {name}", "client",
                              ["--name", name, "--endpoint", endpoint, "--numel", str(numel),
                               "--chunk-bytes", str(chunk_bytes), "--seconds", str(seconds),
                               "--spin-us", str(spin_us)],
                              run_dir, env) for name in names]
        results = _measure_clients(procs, names, seconds, run_dir)
        _stop_echo(endpoint, server)
        server_rss = _read_result(run_dir, "echo", server)["peak_rss_mb"]
    finally:
        stop(procs, grace_s=5.0)
    return _summary(results, server_rss, workers, numel)


def torch_rpc(numel: int, workers: int = 1, seconds: float = 3.0, *, tmp: Path) -> dict:
    """torch.distributed.rpc (TensorPipe): rank 0 "ps" holds the weights, ``workers`` trainer
    ranks call rpc_sync(push_pull) with a gradient of numel float32 values."""
    run_dir = _run_dir(tmp, "torch-rpc-")
    init = (run_dir / "rendezvous").resolve().as_uri()   # a file store: no port to pick
    # TensorPipe listens on the address of TP_SOCKET_IFNAME (else the host name's): loopback
    env = child_env(OMP_NUM_THREADS="1", TP_SOCKET_IFNAME="lo")
    common = ["--init", init, "--workers", str(workers), "--numel", str(numel)]
    procs = [_spawn_role("rpc ps", "ps", common, run_dir, env)]
    try:
        names = [f"trainer{r}" for r in range(1, workers + 1)]
        procs += [_spawn_role(f"rpc {name}", "trainer",
                              [*common, "--rank", str(r), "--seconds", str(seconds)],
                              run_dir, env) for r, name in enumerate(names, start=1)]
        results = _measure_clients(procs, names, seconds, run_dir)
        _wait_exit(procs[:1], FINISH_TIMEOUT_S)   # its graceful rpc.shutdown, after theirs
        server_rss = _read_result(run_dir, "ps", procs[0])["peak_rss_mb"]
    finally:
        stop(procs, grace_s=5.0)
    return _summary(results, server_rss, workers, numel)


def _run_dir(tmp: Path, prefix: str) -> Path:
    """A fresh folder under ``tmp`` for one measurement, so calls never share files."""
    Path(tmp).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=tmp)).resolve()


def _ipc_endpoint(path: Path) -> str:
    if len(str(path)) > 100:   # sun_path holds 108 bytes with its terminator
        raise ValueError(f"ipc socket path too long for the kernel ({len(str(path))} > 100 "
                         f"characters): {path}; pass a shorter tmp")
    return f"ipc://{path}"


def _spawn_role(name: str, role: str, args: list[str], run_dir: Path, env: dict) -> Proc:
    log = run_dir / f"{name.replace(' ', '-')}.log"
    return spawn(name, ["-c", ENTRY, role, "--run-dir", str(run_dir), *args], log, env=env)


def _measure_clients(procs: list[Proc], names: list[str], seconds: float,
                     run_dir: Path) -> list[dict]:
    """Wait until every client is warm, say go, wait for them to finish; their results.
    ``procs`` is the server, then the clients in the order of ``names``."""
    clients = procs[1:]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    waiting = dict(zip(names, clients))
    while waiting:
        for name in [n for n in waiting if (run_dir / f"{n}.ready").exists()]:
            del waiting[name]
        for p in procs:
            if p.poll() is not None:
                raise ProcessError(f"the {p.name} exited before the measurement (exit "
                                   f"{p.returncode}):\n{p.tail()}")
        if waiting and time.monotonic() > deadline:
            p = next(iter(waiting.values()))
            raise ProcessError(f"the {p.name} was not ready within {STARTUP_TIMEOUT_S:g} s:"
                               f"\n{p.tail()}")
        time.sleep(0.02)
    write_address(run_dir / "go", "go")
    _wait_exit(clients, seconds + FINISH_TIMEOUT_S)
    return [_read_result(run_dir, name, p) for name, p in zip(names, clients)]


def _wait_exit(procs: list[Proc], timeout_s: float) -> None:
    """Every process exits 0 within ``timeout_s``; one that hangs is killed (wait_all)."""
    for p, code in zip(procs, wait_all(procs, timeout_s)):
        if code == "timeout":
            raise ProcessError(f"the {p.name} did not finish within {timeout_s:g} s and was "
                               f"killed:\n{p.tail()}")
        if code != 0:
            raise ProcessError(f"the {p.name} failed (exit {code}):\n{p.tail()}")


def _stop_echo(endpoint: str, server: Proc) -> None:
    """Tell the echo server to stop; it replies once its result is written, then exits."""
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send(b"stop")
        if not sock.poll(REPLY_TIMEOUT_S * 1000):
            raise ProcessError(f"the {server.name} did not answer stop within "
                               f"{REPLY_TIMEOUT_S:g} s:\n{server.tail()}")
        sock.recv()
    finally:
        sock.close(0)
    _wait_exit([server], FINISH_TIMEOUT_S)


def _read_result(run_dir: Path, name: str, proc: Proc) -> dict:
    path = run_dir / f"{name}.json"
    if not path.exists():
        raise ProcessError(f"the {proc.name} exited without writing {path.name}:\n"
                           f"{proc.tail()}")
    return json.loads(path.read_text())


def _summary(results: list[dict], server_rss_mb: float, workers: int, numel: int) -> dict:
    """One dict from the clients' results: round trips a second summed over clients (their
    windows overlap), payload GB/s both ways, latency percentiles over all round trips."""
    rate = sum(r["round_trips"] / r["elapsed_s"] for r in results)
    latencies_ms = np.concatenate([np.asarray(r["latencies_s"]) for r in results]) * 1e3
    p50, p90, p99 = np.percentile(latencies_ms, [50, 90, 99])
    return {"round_trips_per_s": round(rate, 2),
            "gb_per_s": round(rate * 8 * numel / 1e9, 4),
            "latency_ms": {"p50": round(float(p50), 4), "p90": round(float(p90), 4),
                           "p99": round(float(p99), 4)},
            "peak_rss_mb": {"server": round(server_rss_mb, 1),
                            "clients": round(max(r["peak_rss_mb"] for r in results), 1)},
            "workers": workers, "numel": numel}


# ----------------------------------------------------------------------------------------------
# in each process: the measurement loop and results

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def write_json(path: Path, obj: dict) -> None:
    """Written to a temporary file and renamed, never read half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def measure(round_trip, seconds: float, run_dir: Path, name: str) -> None:
    """Warm up, report ready, wait for go, run round trips for ``seconds``; write the result
    to ``{name}.json``."""
    for _ in range(WARMUP_ROUND_TRIPS):
        round_trip()
    write_address(run_dir / f"{name}.ready", "ready")
    go = run_dir / "go"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: no go within {STARTUP_TIMEOUT_S:g} s")
        time.sleep(0.002)
    latencies = []
    start = t = time.perf_counter()
    while True:
        round_trip()
        now = time.perf_counter()
        latencies.append(now - t)
        t = now
        if now - start >= seconds:
            break
    write_json(run_dir / f"{name}.json", {"round_trips": len(latencies), "elapsed_s": now - start,
                                          "latencies_s": latencies, "peak_rss_mb": peak_rss_mb()})


# ----------------------------------------------------------------------------------------------
# raw ZeroMQ: the echo server and a client

def run_echo(run_dir: Path, bind: str) -> None:
    """Echo every message back to its sender, zero-copy, until a client sends b"stop"."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(bind)
    write_address(run_dir / "echo.addr", sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while sock.poll(IDLE_TIMEOUT_S * 1000):
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            write_json(run_dir / "echo.json", {"peak_rss_mb": peak_rss_mb()})
            sock.send_multipart([frames[0], b"stopped"])
            break
        sock.send_multipart(frames, copy=False)
    sock.close(0)
    ctx.term()


def run_client(run_dir: Path, name: str, endpoint: str, numel: int, chunk_bytes: int,
               seconds: float, spin_us: float = 0.0) -> None:
    """Round trips of numel float32 values: sent with copy=False from one preallocated
    buffer, the echo received frame by frame with recv_into into another. ``spin_us``: poll
    for the echo this long before sleeping, as asgd's client does (worker.spin_us)."""
    import zmq

    payload = np.full(numel, 1e-4, dtype=np.float32)
    received = np.zeros(numel, dtype=np.float32)
    nbytes = payload.nbytes
    spans = [(i, min(i + chunk_bytes, nbytes)) for i in range(0, nbytes, chunk_bytes)]
    out = memoryview(payload).cast("B")
    into = memoryview(received).cast("B")
    send_views = [out[a:b] for a, b in spans]
    recv_views = [into[a:b] for a, b in spans]
    head = bytearray(HEADER.size)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = int(REPLY_TIMEOUT_S * 1000)   # a lost echo raises zmq.Again, no hang
    sock.connect(endpoint)
    count = 0
    spin_s = spin_us * 1e-6

    def wait():
        end = time.perf_counter() + spin_s
        while spin_s and not sock.poll(0) and time.perf_counter() < end:
            pass

    def round_trip():
        nonlocal count
        count += 1
        sock.send_multipart([HEADER.pack(count, nbytes), *send_views], copy=False)
        wait()
        if sock.recv_into(head) != HEADER.size or HEADER.unpack(head) != (count, nbytes):
            raise RuntimeError(f"echo header {bytes(head)!r} is not round trip {count}")
        for k, view in enumerate(recv_views):
            if not sock.rcvmore:
                raise RuntimeError(f"echo ended after {k} of {len(recv_views)} frames")
            if sock.recv_into(view) != len(view):
                raise RuntimeError(f"echo frame {k} is not {len(view)} bytes")
        if sock.rcvmore:
            raise RuntimeError(f"echo has more than {len(recv_views)} frames")

    measure(round_trip, seconds, run_dir, name)
    if not np.array_equal(received, payload):
        raise RuntimeError("the echo did not return the bytes sent")
    sock.close(0)
    ctx.term()


# ----------------------------------------------------------------------------------------------
# torch.distributed.rpc: the parameter server and a trainer

_weights = None                 # on the ps: the parameters, updated under _lock
_lock = threading.Lock()


def push_pull(grad):
    """On the ps (called by rpc_sync): one SGD step, and the weights as they are after it."""
    with _lock:
        _weights.add_(grad, alpha=-LR)
        return _weights.clone()   # under the lock: no other step lands while copying


def _rpc_options(init: str):
    from torch.distributed import rpc

    return rpc.TensorPipeRpcBackendOptions(init_method=init, rpc_timeout=REPLY_TIMEOUT_S)


def run_ps(run_dir: Path, init: str, workers: int, numel: int) -> None:
    import torch
    from torch.distributed import rpc

    global _weights
    torch.set_num_threads(1)
    _weights = torch.zeros(numel, dtype=torch.float32)
    rpc.init_rpc("ps", rank=0, world_size=workers + 1, rpc_backend_options=_rpc_options(init))
    rpc.shutdown()   # graceful: returns once every trainer has shut down
    write_json(run_dir / "ps.json", {"peak_rss_mb": peak_rss_mb()})


def run_trainer(run_dir: Path, init: str, workers: int, rank: int, numel: int,
                seconds: float) -> None:
    import torch
    from torch.distributed import rpc

    torch.set_num_threads(1)
    name = f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=workers + 1, rpc_backend_options=_rpc_options(init))
    grad = torch.full((numel,), 1e-4, dtype=torch.float32)
    reply = None

    def round_trip():
        nonlocal reply
        reply = rpc.rpc_sync("ps", push_pull, args=(grad,))

    measure(round_trip, seconds, run_dir, name)
    if reply is None or reply.numel() != numel:
        raise RuntimeError("the ps did not return the weights")
    rpc.shutdown()


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="asgd.bench.reference")
    ap.add_argument("role", choices=["echo", "client", "ps", "trainer"])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--bind")
    ap.add_argument("--name")
    ap.add_argument("--endpoint")
    ap.add_argument("--init")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--numel", type=int)
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--spin-us", type=float, default=0.0)
    a = ap.parse_args(argv)
    if a.role == "echo":
        run_echo(a.run_dir, a.bind)
    elif a.role == "client":
        run_client(a.run_dir, a.name, a.endpoint, a.numel, a.chunk_bytes, a.seconds,
                   a.spin_us)
    elif a.role == "ps":
        run_ps(a.run_dir, a.init, a.workers, a.numel)
    else:
        run_trainer(a.run_dir, a.init, a.workers, a.rank, a.numel, a.seconds)
    return 0
