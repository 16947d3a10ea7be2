"""Does preparing batches ahead of the step pay on the CPU? A worker's training step (the
shard loader's batch with the data set's augmentation, forward, backward) with
``data.prefetch`` 0 (each batch made when asked for) against 1 and 2 (a thread ahead).

    python bench/prefetch.py [--model cnn1d] [--data mnist1d] [--steps 400] [--repeats 5]

One torch thread, as a worker runs; the configurations alternate within each repeat and the
figures are medians over repeats of the mean step time, and of the time ``next()`` takes.
Prints one JSON object; docs/models.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from asgd.config import from_dict
from asgd.tasks.data import ShardLoader
from asgd.tasks.task import build_task


def run(cfg, task, prefetch: int, steps: int) -> tuple[float, float]:
    """(mean seconds a step, mean seconds in loader.next()) over ``steps`` steps."""
    cfg = cfg.replace(**{"data.prefetch": prefetch})
    loader = ShardLoader.for_config(cfg, task.dataset, 0, 2)
    model = task.model
    wait = 0.0
    try:
        for _ in range(10):
            loader.next()
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            x, y = loader.next()
            wait += time.perf_counter() - t
            loss = F.cross_entropy(model(x), y)
            model.zero_grad(set_to_none=True)
            loss.backward()
        return (time.perf_counter() - t0) / steps, wait / steps
    finally:
        loader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn1d")
    ap.add_argument("--data", default="mnist1d")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefetch", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = from_dict({"model": {"name": args.model}, "data": {"name": args.data}})
    task = build_task(cfg)
    depths = [int(d) for d in args.prefetch.split(",")]
    step, wait = {d: [] for d in depths}, {d: [] for d in depths}
    for _ in range(args.repeats):
        for d in depths:
            s, w = run(cfg, task, d, args.steps)
            step[d].append(s)
            wait[d].append(w)
    out = {"model": args.model, "data": args.data, "batch_size": cfg.worker.batch_size,
           "steps": args.steps, "repeats": args.repeats}
    for d in depths:
        out[f"prefetch={d}"] = {"step_ms": statistics.median(step[d]) * 1e3,
                                "next_ms": statistics.median(wait[d]) * 1e3}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
