"""``asgd bench step``: where a worker's step goes, with and without overlap.

    asgd bench step --config configs/default.yaml [--workers 1] [--steps 600]

Runs the configuration twice through ``asgd launch`` (its real server and workers, no live
evaluation), with ``worker.exchange.overlap`` off and then on, and reads the workers' records:
per step, the time computing (forward, backward, gradient to the host, finiteness check) and the
time in the exchange (sending, and waiting for the weights). Without overlap the exchange is the
communication; with overlap it is what remains visible of it, the rest being hidden behind the
next step's compute. Reports medians over the steady state (the first records are warm-up).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

WARMUP_RECORDS = 3


def measure(cfg, overlap: bool, tmp: Path) -> dict:
    from asgd.launch.launcher import launch
    from asgd.metrics import read_metrics

    run = cfg.replace(**{"worker.exchange.overlap": overlap, "run.eval_every_s": 0.0,
                         "run.out_dir": str(tmp), "run.name": f"overlap-{overlap}"})
    summary = launch(run, quiet=True)
    records = [r for r in read_metrics(tmp / f"overlap-{overlap}" / "metrics.jsonl")
               if r.get("kind") == "worker_step" and "compute_ms" in r]
    by_worker: dict = {}
    for r in records:
        by_worker.setdefault(r["worker"], []).append(r)
    steady = [r for rs in by_worker.values() for r in rs[WARMUP_RECORDS:]] or records
    if not steady:
        raise RuntimeError(f"the run left no step records (status {summary.get('status')})")
    compute = statistics.median(r["compute_ms"] for r in steady)
    exchange = statistics.median(r["exchange_ms"] for r in steady)
    return {"compute_ms": round(compute, 4), "exchange_ms": round(exchange, 4),
            "step_ms": round(compute + exchange, 4),
            "staleness_mean": summary.get("staleness_mean"),
            "samples_per_s": summary.get("samples_per_s"), "status": summary.get("status")}


def run(cfg) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        plain = measure(cfg, False, tmp)
        over = measure(cfg, True, tmp)
    comm = plain["exchange_ms"]
    hidden = 1 - over["exchange_ms"] / comm if comm > 0 else 0.0
    return {"benchmark": "step", "workers": cfg.run.workers,
            "no_overlap": plain, "overlap": over,
            "communication_ms": comm,
            "waiting_ms": over["exchange_ms"],
            "hidden_fraction": round(max(0.0, hidden), 3),
            "exchange_shorter_than_compute": comm < plain["compute_ms"],
            "overlap_step_over_compute": round(over["step_ms"] / over["compute_ms"], 3),
            "speedup_from_overlap": round(plain["step_ms"] / over["step_ms"], 3)}
