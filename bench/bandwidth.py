"""How much more memory traffic two processes move than one, on this machine.

    python bench/bandwidth.py [--kb 40960] [--seconds 3] [--repeats 5]

A push_pull through shared memory at 10M parameters is a few passes over 40 MB buffers on each
side (the gradient written and read, the weights updated in place and copied out), so a shard
that is not waiting on its clients is bound by how fast its core moves memory. Splitting the
vector over two shards helps only as far as two cores together move more bytes than one.

Each repeat runs, back to back: one process alone, then two processes at once, each copying a
``kb`` KiB float32 buffer into another (``numpy.copyto``, the shard's own copy) and adding one
into the other in place (``torch.add_``, the update), for ``seconds``. The figure is bytes
read plus written per second; the ratio is the two processes' sum over the one process's, in
the same repeat (2.0 would mean the cores do not share the bottleneck). The same is measured
with 256 KiB buffers, which stay in each core's own cache: that ratio shows how far the two
cores compute side by side at all, so that the first one can be read as memory's share.
Medians over repeats.

Prints a line per repeat, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time


def _work(kb: int, seconds: float, start, out) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    n = kb * 1024 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty(n, dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.copyto(b, a)  # fault both buffers in before the clock starts
    start.wait(timeout=60)
    moved = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        np.copyto(b, a)  # read a, write b
        tb.add_(ta)  # read a and b, write b
        moved += 5 * a.nbytes
    out.put(moved / (time.perf_counter() - t0))


def measure(procs: int, kb: int, seconds: float) -> float:
    """Bytes/s moved by ``procs`` processes copying at once, summed."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(procs)
    out = ctx.Queue()
    ps = [ctx.Process(target=_work, args=(kb, seconds, start, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    try:
        rates = [out.get(timeout=seconds + 120) for _ in ps]
    finally:
        for p in ps:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return sum(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kb", type=int, default=40 * 1024, help="buffer size (default 40 MiB)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.kb < 1 or not 0 < args.seconds <= 600 or args.repeats < 1:
        ap.error("--kb must be >= 1, --seconds in (0, 600], --repeats >= 1")
    sizes = {"memory": args.kb, "cache": 256}
    figures = {k: {"one": [], "two": [], "ratio": []} for k in sizes}
    for r in range(args.repeats):
        for kind, kb in sizes.items():
            a = measure(1, kb, args.seconds)
            b = measure(2, kb, args.seconds)
            f = figures[kind]
            f["one"].append(a / 1e9)
            f["two"].append(b / 1e9)
            f["ratio"].append(b / a)
            print(f"repeat {r + 1} {kind} ({kb} KiB): one process {a / 1e9:.2f} GB/s, "
                  f"two {b / 1e9:.2f} GB/s, {b / a:.2f}x", flush=True)
    out = {"benchmark": "bandwidth", "kb": args.kb, "seconds": args.seconds,
           "repeats": args.repeats}
    for kind, f in figures.items():
        out[kind] = {
            "kb": sizes[kind],
            "one_process_gb_per_s": round(statistics.median(f["one"]), 2),
            "two_processes_gb_per_s": round(statistics.median(f["two"]), 2),
            "ratio_two_vs_one": round(statistics.median(f["ratio"]), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
