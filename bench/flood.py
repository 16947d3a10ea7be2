"""Strangers at the door: one client sends requests under tens of thousands of distinct worker
names (invalid pushes, stats, hellos, pulls) to a real server; the server must stay responsive,
bounded in memory and in the size of its stats.

    python bench/flood.py [--names 60000] [--params 28298]

Prints a line per 10,000 names (requests/s, the server's resident memory, the stats reply's
size) and a final JSON line: the time a pull took at the end, the memory growth, the largest
stats reply, the records the server kept.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(tmp: Path, params: int):
    """A real server of ``params`` float32 values (SGD, no staleness policy) on a loopback
    port: (process, endpoint)."""
    from asgd.bench.transport import server_config
    from asgd.launch.processes import spawn, wait_for_address

    (tmp / "c.yaml").write_text(yaml.safe_dump(server_config(params)))
    server = spawn("server", ["-m", "server", "--config", str(tmp / "c.yaml"), "--quiet",
                              "--bind", "tcp://127.0.0.1:0", "--address-file",
                              str(tmp / "addr"), "--checkpoint-dir", str(tmp / "ck")],
                   tmp / "server.log")
    try:
        return server, wait_for_address(tmp / "addr", server, 120)
    except BaseException:
        from asgd.launch.processes import stop

        stop([server], grace_s=10)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", type=int, default=60_000)
    ap.add_argument("--params", type=int, default=28_298)
    args = ap.parse_args()

    import zmq

    from asgd.client import Client
    from asgd.core import protocol
    from asgd.launch.processes import stop

    with tempfile.TemporaryDirectory() as d:
        server, endpoint = start_server(Path(d), args.params)
        try:
            pid = server.popen.pid
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.linger = 0
            sock.rcvtimeo = 10_000
            sock.connect(endpoint)
            rss0 = rss_mb(pid)
            stats_max = 0
            bad_grad = np.zeros(7, np.float32)           # the wrong size: refused
            started = t = time.perf_counter()
            sent = 0
            for i in range(args.names):
                name = f"stranger-{i}"
                kind = i % 4
                if kind == 0:
                    frames = protocol.encode(protocol.request_header(
                        "push", i, name, version=0, flat=True), [("grad", bad_grad)])
                elif kind == 1:
                    frames = [protocol.pack_header(protocol.request_header("hello", i, name))]
                elif kind == 2:
                    frames = [protocol.pack_header(protocol.request_header("stats", i, name))]
                else:
                    frames = [protocol.pack_header(protocol.request_header(
                        "pull", i, name, flat=True))]
                sock.send_multipart(frames)
                reply = sock.recv_multipart()
                head = protocol.decode_header(reply[0])
                if kind == 2:
                    stats_max = max(stats_max, len(reply[0]))
                sent += 1
                if (i + 1) % 10_000 == 0:
                    now = time.perf_counter()
                    print(f"{i + 1} names: {10_000 / (now - t):.0f} requests/s, server "
                          f"{rss_mb(pid):.1f} MB, stats reply {stats_max} bytes",
                          file=sys.stderr)
                    t = now
                assert "ok" in head
            elapsed = time.perf_counter() - started
            with Client(endpoint, "w0", timeout_s=10) as c:
                t0 = time.perf_counter()
                c.pull_flat(np.empty(args.params, np.float32))
                pull_s = time.perf_counter() - t0
                s = c.stats()
            out = {"benchmark": "flood", "names": args.names, "requests": sent,
                   "requests_per_s": round(sent / elapsed, 1),
                   "final_pull_s": round(pull_s, 4),
                   "server_rss_mb_start": round(rss0, 1),
                   "server_rss_mb_end": round(rss_mb(pid), 1),
                   "server_rss_growth_mb": round(rss_mb(pid) - rss0, 1),
                   "stats_bytes_max": stats_max,
                   "workers_known": s["workers_known"], "workers_evicted": s["workers_evicted"],
                   "version": s["version"]}
            sock.close(0)
        finally:
            stop([server], grace_s=30)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
