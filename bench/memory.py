"""Peak memory and step time of one worker's step, inside the node: the whole model against
the model split into stages, a pipeline over micro-batches, recompute and offloaded
activations, on the CPU.

    python bench/memory.py [--depth 32] [--width 256] [--batch 1024] [--steps 4] [--repeats 3]

The model is a deep MLP (``depth`` Linear+ReLU layers of ``width``): its activations
(``batch`` x ``width`` floats for each layer, kept for backward) outweigh its weights.

Peak memory: each configuration runs alone in a fresh process, so nothing another leaves
behind counts against it. It builds the model and the worker's pipeline (``worker.stages``)
from worker keys, takes a warm-up step (the gradients are allocated then, and kept), then for
each measured step resets the process's peak resident memory (``echo 5 >
/proc/self/clear_refs``), runs the step (forward, backward, gradients accumulated) and reads the peak (``VmHWM``) against the resident
memory at the start of the step (``VmRSS``). glibc's malloc is pinned to serve every
allocation of 64 KiB or more by mmap and to give it back on free (``MALLOC_MMAP_THRESHOLD_``;
its default threshold adapts and keeps freed memory), so the resident memory follows the live
tensors: the peak above the start of the step is the most the step held at one time,
activations, recomputed activations, host copies and temporaries alike, measured by the kernel
rather than estimated.

Step time: one more fresh process, with malloc as a worker has it (the pinned malloc faults in
every fresh page, which would inflate times), builds every configuration on one model and
times them interleaved: three rounds of a warm-up and ``steps`` timed steps of each in turn.

Every figure is the median over ``repeats`` (the peak's median over steps, the time's over all
its steps in a repeat, first), and each ratio is against the whole model in the same run.

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> worker keys (none: the worker's plain path, the whole model on one device)
CONFIGS = {
    "whole": {},
    "2 stages": {"devices": ["cpu", "cpu"]},
    "3 stages": {"devices": ["cpu", "cpu", "cpu"]},
    "2 stages, 4 micro-batches": {"devices": ["cpu", "cpu"], "microbatches": 4},
    "recompute": {"recompute": True},
    "2 stages, 4 micro-batches, recompute": {"devices": ["cpu", "cpu"], "microbatches": 4,
                                             "recompute": True},
    "offload": {"offload_activations": True},
}


# ----------------------------------------------------------------------------------------------
# measurements, each in a fresh process

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _setup(depth: int, width: int, batch: int):
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [nn.Flatten(1)]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    return model, torch.randn(batch, width), torch.randint(0, 10, (batch,))


def _step_fn(model, x, y, keys: dict):
    """One worker step of the configuration: the plain path without keys, else the
    pipeline (worker.stages) built from them."""
    import torch.nn.functional as F

    from asgd.config import load_config
    from worker.stages import build_pipeline

    wcfg = load_config(None, [f"worker.batch_size={len(x)}"] +
                       [f"worker.{k}={json.dumps(v)}" for k, v in keys.items()]).worker
    pipe = build_pipeline(wcfg, model, 0, example=x)
    if pipe is None:
        return lambda: F.cross_entropy(model(x), y).backward()
    return lambda: pipe.forward_backward(x, y)


def measure_memory(name: str, depth: int, width: int, batch: int, steps: int) -> dict:
    """Peak resident memory above the start of a step (median of ``steps``), for one
    configuration alone in this process."""
    model, x, y = _setup(depth, width, batch)
    step = _step_fn(model, x, y, CONFIGS[name])
    step()                                    # warm-up: the gradients are allocated here
    peaks = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad.zero_()
        Path("/proc/self/clear_refs").write_text("5")
        start = _status_kb("VmRSS")
        step()
        peaks.append(_status_kb("VmHWM") - start)
    return {"peak_mb": statistics.median(peaks) / 1024,
            "weights_mb": sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20,
            "activations_mb": (depth + 1) * batch * width * 4 / 2 ** 20}


def measure_times(depth: int, width: int, batch: int, steps: int) -> dict:
    """Step time of every configuration on one model in this process, interleaved: rounds of
    one warm-up and ``steps`` timed steps of each in turn; the median of each's steps."""
    model, x, y = _setup(depth, width, batch)
    steps_of = {name: _step_fn(model, x, y, keys) for name, keys in CONFIGS.items()}
    times = {name: [] for name in CONFIGS}
    for _ in range(3):
        for name, step in steps_of.items():
            step()
            for _ in range(steps):
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def run_child(args, extra: list[str], memory: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if memory:     # every allocation of 64 KiB or more by mmap, given back on free
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--depth", str(args.depth), "--width", str(args.width),
           "--batch", str(args.batch), "--steps", str(args.steps), *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{extra}: exit {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4, help="measured steps per round")
    ap.add_argument("--repeats", type=int, default=3, help="processes per measurement")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)
    ap.add_argument("--times", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.depth, args.width, args.batch,
                                        args.steps)))
        return
    if args.times:
        print(json.dumps(measure_times(args.depth, args.width, args.batch, args.steps)))
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench/memory.py needs Linux's /proc/self/clear_refs to reset the peak")
    peaks = {name: [] for name in CONFIGS}
    times = {name: [] for name in CONFIGS}
    for r in range(args.repeats):
        for name in CONFIGS:
            m = run_child(args, ["--memory-of", name], memory=True)
            peaks[name].append(m["peak_mb"])
        for name, ms in run_child(args, ["--times"], memory=False).items():
            times[name].append(ms)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n}: {peaks[n][-1]:.1f} MB {times[n][-1]:.0f} ms" for n in CONFIGS),
            file=sys.stderr, flush=True)
    rows = {name: {"peak_mb": statistics.median(peaks[name]),
                   "step_ms": statistics.median(times[name]),
                   "peak_mb_all": [round(v, 2) for v in peaks[name]],
                   "step_ms_all": [round(v, 1) for v in times[name]]} for name in CONFIGS}
    base = rows["whole"]
    for row in rows.values():
        row["peak_ratio"] = row["peak_mb"] / base["peak_mb"]
        row["time_ratio"] = row["step_ms"] / base["step_ms"]
    print(f"deep MLP: {args.depth} x Linear({args.width}, {args.width}) + ReLU, batch "
          f"{args.batch}: weights {m['weights_mb']:.1f} MB, activations of one pass "
          f"~{m['activations_mb']:.1f} MB; medians of {args.repeats} repeats, 1 thread")
    print(f"{'configuration':<40} {'peak MB':>9} {'x whole':>8} {'step ms':>9} {'x whole':>8}")
    for name, row in rows.items():
        print(f"{name:<40} {row['peak_mb']:>9.1f} {row['peak_ratio']:>8.2f} "
              f"{row['step_ms']:>9.0f} {row['time_ratio']:>8.2f}")
    print(json.dumps({"benchmark": "memory", "depth": args.depth, "width": args.width,
                      "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                      "weights_mb": m["weights_mb"], "activations_mb": m["activations_mb"],
                      "configs": {n: {k: (round(v, 3) if isinstance(v, float) else v)
                                      for k, v in row.items()} for n, row in rows.items()}}))


if __name__ == "__main__":
    main()
