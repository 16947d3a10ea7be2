"""Memory over a long benchmark: a real server and clients doing push_pull for T seconds, the
resident memory of every process sampled as it goes.

    python bench/soak.py [--params 1000000] [--seconds 600] [--every 10] [--clients shm,fp16]
                         [--set server.KEY=V]

Runs ``asgd bench transport``'s server and two clients, one through shared memory and one
over tcp with an fp16 gradient (so the snapshot pool, the zero-copy sends, the encodings and
the segment all run), and samples each process's VmRSS from /proc every ``--every`` seconds.
Prints one JSON object: per process the RSS at the first sample, at the last, the peak, and the
growth from the first minute's median to the last minute's (MB), and every sample
(``series``: [seconds, MB]). ``--set`` changes the server's configuration (repeatable).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from asgd.bench.transport import server_config
from asgd.launch.processes import spawn, stop, wait_for_address


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--every", type=float, default=10.0)
    ap.add_argument("--clients", default="shm,fp16",
                    help="comma-separated: shm (shared memory), fp16 (an fp16 gradient over a "
                         "unix socket), ipc (float32 over a unix socket)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    config = server_config(args.params)
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = tmp / "bench.yaml"
        cfg.write_text(yaml.safe_dump(config))
        addr = tmp / "server.addr"
        server = spawn("server", ["-m", "server", "--config", str(cfg), "--quiet", "--bind",
                                  f"ipc://{tmp}/s.sock", "--address-file", str(addr),
                                  "--checkpoint-dir", str(tmp / "ckpt")], tmp / "server.log")
        procs = {"server": server}
        try:
            endpoint = wait_for_address(addr, server, 120)
            kinds = {"shm": ("client_shm", "shm", "none"), "fp16": ("client_fp16", "ipc", "fp16"),
                     "ipc": ("client_ipc", "ipc", "none")}
            clients = [kinds[k] for k in args.clients.split(",")]
            for rank, (name, transport, enc) in enumerate(clients):
                procs[name] = spawn(name, ["-m", "asgd.bench.transport", "client", endpoint,
                                           str(args.params), transport, enc, str(args.seconds),
                                           str(tmp / f"{name}.json"), str(rank)],
                                    tmp / f"{name}.log")
            samples = {k: [] for k in procs}
            started = time.monotonic()
            while time.monotonic() - started < args.seconds + 60:
                if all(p.poll() is not None for k, p in procs.items() if k != "server"):
                    break
                for k, p in procs.items():
                    r = rss_mb(p.popen.pid)
                    if r is not None and p.poll() is None:
                        samples[k].append((round(time.monotonic() - started, 1), round(r, 1)))
                time.sleep(args.every)
            results = {}
            for k in [c[0] for c in clients]:
                out = tmp / f"{k}.json"
                results[k] = json.loads(out.read_text())["round_trips"] if out.exists() else None
        finally:
            stop(list(procs.values()), grace_s=30)

    def growth(series):
        minute = max(1, int(60 / args.every))
        if len(series) < 2 * minute:
            return None
        first = statistics.median(r for _, r in series[:minute])
        last = statistics.median(r for _, r in series[-minute:])
        return round(last - first, 1)

    print(json.dumps({
        "benchmark": "soak", "params": args.params, "seconds": args.seconds,
        "round_trips": results,
        "rss_mb": {k: {"first": s[0][1] if s else None, "last": s[-1][1] if s else None,
                       "peak": max((r for _, r in s), default=None),
                       "growth_first_to_last_minute": growth(s), "samples": len(s),
                       "series": s}
                   for k, s in samples.items()}}))


if __name__ == "__main__":
    main()
