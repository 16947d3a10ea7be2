"""The local launcher: one server and N workers as processes on this machine, a live display,
a final evaluation, and the run directory.

    summary = launch(load_config("configs/default.yaml"))      # what `asgd launch` does

The server and the workers run as subprocesses (``python -m server``, ``python -m worker``),
never imported here, so CUDA is never initialised in this process. The run directory
(``runs/<name>/``) gets config.yaml, metrics.jsonl, summary.json, checkpoint/ and logs/.
A process that dies is reported with the tail of its log; Ctrl-C stops everything, and the
weights reached so far are still evaluated.
"""
from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path

from asgd.config import Config, save_config
from asgd.launch.display import Display, Monitor
from asgd.launch.processes import Proc, ProcessError, child_env, spawn, stop, wait_for_address
from asgd.metrics import MetricsWriter, read_metrics

STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0
POLL_S = 0.5


class LaunchError(RuntimeError):
    pass


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.out_dir) / name
    run_dir, k = base, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        run_dir = base.with_name(f"{name}-{k}")
        k += 1
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return run_dir


# ----------------------------------------------------------------------------------------------

def launch(cfg: Config, quiet: bool = False) -> dict:
    """Run a whole cluster on this machine; returns the summary (also in summary.json)."""
    from asgd.client import Client, ServerError, ServerTimeout

    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    t0 = time.time()
    env = child_env(ASGD_T0=repr(t0))
    metrics_path = run_dir / "metrics.jsonl"
    metrics = MetricsWriter(metrics_path, t0)
    display = Display(cfg, quiet)
    addr_file = run_dir / "server.addr"
    config_file = str(run_dir / "config.yaml")

    server = spawn("server", ["-m", "server", "--config", config_file,
                              "--bind", "tcp://127.0.0.1:0", "--run-dir", str(run_dir),
                              "--address-file", str(addr_file)],
                   run_dir / "logs" / "server.log", env)
    workers: list[Proc] = []
    interrupted = False
    failures: list[str] = []
    evals: list[dict] = []
    mon = Monitor(cfg, t0)
    client = None
    final_stats = None

    def sigterm(*_):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, sigterm)
    try:
        try:
            endpoint = wait_for_address(addr_file, server, STARTUP_TIMEOUT_S)
        except ProcessError as e:
            raise LaunchError(str(e)) from None
        for r in range(cfg.run.workers):
            workers.append(spawn(f"worker {r}", ["-m", "worker", "--config", config_file,
                                                 "--server", endpoint, "--rank", str(r),
                                                 "--run-dir", str(run_dir)],
                                 run_dir / "logs" / f"worker-{r}.log", env))
        client = Client(endpoint, "launcher", timeout_s=10.0)
        eval_model = _EvalModel(cfg) if cfg.run.eval_every_s else None
        next_eval = time.monotonic() + (cfg.run.eval_every_s or 0)
        hard_deadline = time.monotonic() + (cfg.run.max_seconds or 24 * 3600) + STARTUP_TIMEOUT_S
        while True:
            if server.popen.poll() is not None:
                failures.append(f"server died (exit {server.popen.returncode})")
                display.message(f"[red]server died[/red] (exit {server.popen.returncode}):\n"
                                f"{server.tail()}")
                break
            for p in workers:
                rc = p.popen.poll()
                if rc not in (None, 0) and not p.reported:
                    p.reported = True
                    failures.append(f"{p.name} died (exit {rc})")
                    display.message(f"[red]{p.name} died[/red] (exit {rc}):\n{p.tail()}")
            try:
                final_stats = client.stats()
                mon.update_stats(final_stats)
            except (ServerTimeout, ServerError):
                pass
            mon.update_losses(metrics_path)
            if eval_model and time.monotonic() >= next_eval:
                next_eval = time.monotonic() + cfg.run.eval_every_s
                evals.append(eval_model.evaluate_live(client, metrics, mon))
            display.update(mon)
            if all(p.popen.poll() is not None for p in workers):
                break
            if time.monotonic() > hard_deadline:
                failures.append("workers outlived run.max_seconds; stopped")
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        interrupted = True
        display.message("[yellow]interrupted: stopping the cluster[/yellow]")
    finally:
        signal.signal(signal.SIGTERM, old_term)
        stop(workers, STOP_GRACE_S)
        if client is not None and server.popen.poll() is None:
            try:
                final_stats = client.stats()
                mon.update_stats(final_stats)
            except (ServerTimeout, ServerError):
                pass
            client.close()
        stop([server], grace_s=60.0)
        display.close(mon)
    train_end = time.time()
    summary = _summarize(cfg, run_dir, t0, train_end, final_stats, failures, interrupted,
                         metrics, evals)
    metrics.close()
    return summary


class _EvalModel:
    """The model and test split in this process (CPU, one thread) for evaluations mid-run."""

    def __init__(self, cfg: Config):
        import torch

        from asgd.tasks.task import build_task

        torch.set_num_threads(1)
        self.cfg = cfg
        self.task = build_task(cfg)

    def evaluate_live(self, client, metrics: MetricsWriter, mon: Monitor) -> dict:
        from asgd.tasks.evaluate import evaluate_flat

        version, tensors = client.pull()
        flat = self.task.layout.flatten(t.to_torch() for t in tensors)
        acc, loss = evaluate_flat(self.task, flat, self.cfg.run.eval_batch_size)
        mon.accuracy = acc
        return metrics.write("eval", version=version, accuracy=acc, loss=loss)


def _summarize(cfg, run_dir: Path, t0, train_end, stats, failures, interrupted, metrics,
               evals) -> dict:
    from asgd.tasks.evaluate import evaluate_checkpoint

    summary: dict = {"run_dir": str(run_dir), "workers": cfg.run.workers}
    try:
        result = evaluate_checkpoint(run_dir)
        summary.update(test_accuracy=result["test_accuracy"], test_loss=result["test_loss"])
        metrics.write("eval", version=result["version"], accuracy=result["test_accuracy"],
                      loss=result["test_loss"], final=True)
    except (OSError, ValueError) as e:
        failures.append(f"final evaluation failed: {e}")
        summary.update(test_accuracy=None, test_loss=None)
    records = read_metrics(run_dir / "metrics.jsonl")
    done = [r for r in records if r.get("kind") == "worker_done"]
    samples = sum(r["samples"] for r in done)
    starts = [r["t"] - r["elapsed_s"] for r in done]
    train_s = (max(r["t"] for r in done) - min(starts)) if done else 0.0
    stats = stats or {}
    summary.update(
        wall_s=round(time.time() - t0, 3),
        train_s=round(train_s, 3),
        updates_applied=stats.get("updates_applied", 0),
        updates_dropped=stats.get("updates_dropped", 0),
        version=stats.get("version", 0),
        staleness_mean=stats.get("staleness_mean", 0.0),
        staleness_max=stats.get("staleness_max", 0),
        staleness_histogram=stats.get("staleness_histogram", {}),
        samples=samples,
        samples_per_s=samples / train_s if train_s > 0 else 0.0,
        policy=cfg.server.policy,
        failures=failures,
        interrupted=interrupted,
        status="ok" if not failures and not interrupted else
        ("interrupted" if interrupted else "failed"),
    )
    if evals:
        summary["evals"] = len(evals)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
