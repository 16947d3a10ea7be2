"""One simulated run as a run directory, and as a record of ``asgd experiment --simulate``.

    summary = simulate(cfg, parse_delay("exponential"))   # runs/<name>/: config.yaml,
                                                          # metrics.jsonl, summary.json
    record = run_one(exp, spec)                           # asgd.experiments.runner's record

The run directory is a launch's: ``config.yaml``, ``metrics.jsonl`` (the server's ``push``
records, the workers' ``worker_step`` and ``worker_done``, ``eval`` records) and
``summary.json``, with every ``t`` in simulated seconds (``summary.json`` says
``"simulated": true``; its ``wall_s`` is the simulation's own time). So the experiments'
measures, reports and plots read it as they read a real run's.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from asgd.config import Config, save_config
from asgd.metrics import MetricsWriter
from simulator.delays import DelayModel, parse_delay
from simulator.engine import Simulation


def simulate(cfg: Config, delay: DelayModel, eval_every: int | None = None) -> dict:
    """Simulate ``cfg`` (``cfg.run.workers`` virtual workers) under ``delay``; the summary,
    also written to the run directory's summary.json."""
    from asgd.launch.checks import make_run_dir

    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    metrics = MetricsWriter(run_dir / "metrics.jsonl", t0=time.time(), buffered=True)
    try:
        summary = Simulation(cfg, delay, metrics, eval_every).run()
    finally:
        metrics.close()
    summary = {"run_dir": str(run_dir), **summary}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_one(exp, spec) -> dict:
    """One spec of an experiment, simulated: the record ``asgd.experiments.runner.run_one``
    makes of a real run, with ``simulated`` and ``delay_model`` besides (``ddp`` is
    simulated as ``sync``: the same mean gradient and one optimizer step)."""
    from asgd.experiments.runner import base_record, finish_record

    record = {**base_record(exp, spec), "simulated": True, "delay_model": spec.delay_model}
    try:
        cfg = exp.config_for(spec)
        if spec.policy == "ddp":
            cfg = cfg.replace(**{"server.policy": "sync"})
        summary = simulate(cfg, parse_delay(spec.delay_model))
    except Exception as e:  # recorded, not dropped: the other runs go on
        record.update(status="failed", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc())
        return record
    record = finish_record(record, exp, summary)
    record["bytes_moved"] = None        # nothing moves: no wire, no segment
    return record
