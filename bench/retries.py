"""Exactly once under retries: light clients push to a real server as fast as they can, and a
share of their pushes are sent a second time with the same sequence number, as a worker does
when a reply is late; every acknowledged push must count exactly once in the version.

    python bench/retries.py [--clients 32] [--seconds 60] [--resend 0.05] [--params 1000]
    python bench/retries.py --clients 6 --pushes 40 --seconds 120     # a bound on work


With ``--pushes N`` each client stops after N acknowledged pushes (``--seconds`` is then only
the bound on the run): the counts no longer depend on how fast the machine is. Each client is
a thread with its own socket (the protocol's client library). The server runs
SGD with no staleness policy, so every push is applied: at the end its version must equal the
number of distinct pushes acknowledged, and its count of repeats the number resent. Prints a
final JSON line with both, and the server's memory at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flood import rss_mb, start_server  # noqa: E402


def run(clients: int, seconds: float, resend: float, params: int, seed: int = 0,
        pushes: int = 0) -> dict:
    from asgd.client import Client
    from asgd.launch.processes import stop

    with tempfile.TemporaryDirectory() as d:
        server, endpoint = start_server(Path(d), params)
        try:
            rss0 = rss_mb(server.popen.pid)
            acked = [0] * clients
            resent = [0] * clients
            repeats_seen = [0] * clients
            errors: list[str] = []
            end = time.monotonic() + seconds

            def client(k: int) -> None:
                rng = random.Random(seed * 1000 + k)
                grad = np.full(params, 1e-9, np.float32)
                out = np.empty(params, np.float32)
                try:
                    with Client(endpoint, f"c{k}", timeout_s=30) as c:
                        c.hello(rank=k)
                        seq = rng.getrandbits(40) << 20
                        version = 0
                        while time.monotonic() < end and not (pushes and acked[k] >= pushes):
                            seq += 1
                            head = c.push_pull_flat(version, grad, out, seq=seq)
                            acked[k] += 1
                            version = head["version"]
                            if rng.random() < resend:      # as if the reply had been lost
                                again = c.push_pull_flat(version, grad, out, seq=seq)
                                resent[k] += 1
                                repeats_seen[k] += bool(again.get("repeat"))
                except Exception as e:  # reported, not hidden
                    errors.append(f"c{k}: {e!r}")

            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(seconds + 120)
            with Client(endpoint, "observer", timeout_s=30) as c:
                s = c.stats()
            out = {"benchmark": "retries", "clients": clients, "seconds": seconds,
                   "resend": resend, "acknowledged": sum(acked), "resent": sum(resent),
                   "repeats_answered": sum(repeats_seen), "version": s["version"],
                   "server_repeats": s["repeats"],
                   "exactly_once": s["version"] == sum(acked) and
                   s["repeats"] == sum(resent) == sum(repeats_seen),
                   "server_rss_mb_start": round(rss0, 1),
                   "server_rss_mb_end": round(rss_mb(server.popen.pid), 1),
                   "errors": errors}
        finally:
            stop([server], grace_s=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32, help="client threads, a socket each")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long they push")
    ap.add_argument("--resend", type=float, default=0.05,
                    help="the share of pushes sent a second time, with the same sequence number")
    ap.add_argument("--params", type=int, default=1000, help="the model's parameters")
    ap.add_argument("--seed", type=int, default=0, help="which pushes are resent")
    ap.add_argument("--pushes", type=int, default=0,
                    help="stop each client after this many acknowledged pushes (0: no limit)")
    a = ap.parse_args()
    print(json.dumps(run(a.clients, a.seconds, a.resend, a.params, a.seed, a.pushes)))


if __name__ == "__main__":
    main()
