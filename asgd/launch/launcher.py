"""The local launcher: one server and N workers as processes on this machine, a live display,
a final evaluation, and the run directory.

    summary = launch(load_config("configs/default.yaml"))      # what `asgd launch` does

Before anything starts, the model and data set named by the config are imported and checked
(a bad import path or argument fails here, and no run directory is left behind). The server
and the workers then run as subprocesses (``python -m server``, ``python -m worker``), never
imported here, so CUDA is never initialised in this process. The run directory
(``runs/<name>/``) gets config.yaml, metrics.jsonl, summary.json, checkpoint/ and logs/.

A process that dies is reported with the tail of its log. A run that diverges (see
``asgd.launch.guard``) is stopped, reported at once and ends ``diverged``. Ctrl-C stops
everything, and the weights reached so far are still evaluated, whatever became of stdout.
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

from asgd.config import Config, save_config
from asgd.launch.display import Display, Monitor
from asgd.launch.guard import DivergenceGuard
from asgd.launch.processes import Proc, ProcessError, child_env, spawn, stop, wait_for_address
from asgd.metrics import MetricsWriter, read_metrics

STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0
POLL_S = 0.5
WORKER_DIVERGED_EXIT = 4     # worker/train.py: its loss stayed non-finite


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


def check_imports(cfg: Config) -> None:
    """A user's model or data set given by import path must import: checked before any
    process starts (the built-ins always do; their arguments are checked with the task)."""
    from asgd.tasks.imports import import_object

    for what, name in (("model", cfg.model.name), ("data set", cfg.data.name)):
        if ":" in name:
            try:
                import_object(name, what)
            except (ValueError, TypeError) as e:
                raise LaunchError(str(e)) from None


def prepare_task(cfg: Config):
    """The run's task in this process (CPU, one thread) for evaluations: a model or data set
    that cannot be built fails here, and the launch with it."""
    import torch

    from asgd.tasks.task import build_task

    torch.set_num_threads(1)
    try:
        return build_task(cfg)
    except (ValueError, TypeError) as e:
        raise LaunchError(str(e)) from None


def launch(cfg: Config, quiet: bool = False) -> dict:
    """Run a whole cluster on this machine; returns the summary (also in summary.json)."""
    check_imports(cfg)
    run_dir = make_run_dir(cfg)
    try:
        return Launch(cfg, run_dir, quiet).run()
    except LaunchError:
        shutil.rmtree(run_dir, ignore_errors=True)    # nothing ran: leave nothing behind
        raise


class Launch:
    """The server and the workers start together (each worker builds its model and data
    while the server starts, and reads the server's address from a file once it is there);
    meanwhile this process builds the task it evaluates with."""

    def __init__(self, cfg: Config, run_dir: Path, quiet: bool):
        self.cfg, self.run_dir = cfg, run_dir
        self.task = None
        self.guard = None
        self.start_failed = False
        save_config(cfg, run_dir / "config.yaml")
        self.t0 = time.time()
        self.env = child_env(ASGD_T0=repr(self.t0))
        self.metrics_path = run_dir / "metrics.jsonl"
        self.metrics = MetricsWriter(self.metrics_path, self.t0)
        self.display = Display(cfg, quiet)
        self.mon = Monitor(cfg, self.t0)
        self.failures: list[str] = []
        self.diverged: list[str] = []
        self.interrupted = False
        self.evals = 0
        self.final_stats: dict | None = None
        self.servers: list[Proc] = []    # one, or one per shard (server.shards)
        self.workers: list[Proc] = []
        self.client = None

    # ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, run_dir = self.cfg, self.run_dir
        config_file = str(run_dir / "config.yaml")
        shards = cfg.server.shards
        addr_files = [run_dir / "server.addr"] if shards == 1 else \
            [run_dir / f"server-{i}.addr" for i in range(shards)]
        for i, addr_file in enumerate(addr_files):
            name, log = ("server", "server.log") if shards == 1 else \
                (f"server shard {i}", f"server-{i}.log")
            self.servers.append(spawn(
                name, ["-m", "server", "--config", config_file, "--bind", "tcp://127.0.0.1:0",
                       "--run-dir", str(run_dir), "--address-file", str(addr_file),
                       "--shard", str(i)],
                run_dir / "logs" / log, self.env))
        files = [a for f in addr_files for a in ("--server-file", str(f))]
        for r in range(cfg.run.workers):
            self.workers.append(spawn(
                f"worker {r}", ["-m", "worker", "--config", config_file, *files,
                                "--rank", str(r), "--run-dir", str(run_dir)],
                run_dir / "logs" / f"worker-{r}.log", self.env))

        def sigterm(*_):
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, sigterm)
        try:
            try:
                self.task = prepare_task(cfg)
                self.guard = DivergenceGuard(self.task.num_classes, cfg.schedule.warmup,
                                             cfg.run.max_updates)
                endpoints = [wait_for_address(f, p, STARTUP_TIMEOUT_S)
                             for f, p in zip(addr_files, self.servers)]
            except (LaunchError, ProcessError) as e:
                stop(self.workers + self.servers, grace_s=5.0)
                self.start_failed = True
                raise LaunchError(str(e)) from None
            from asgd.client import connect_client

            self.client = connect_client(endpoints, "launcher", timeout_s=10.0)
            self._watch()
        except KeyboardInterrupt:
            self.interrupted = True
            self.display.message("[yellow]interrupted: stopping the cluster[/yellow]",
                                 always=True)
        finally:
            signal.signal(signal.SIGTERM, old_term)
            if not self.start_failed:
                self._stop_all()
        if self.task is None:              # interrupted while it was being built
            self.task = prepare_task(cfg)
            self.guard = DivergenceGuard(self.task.num_classes, cfg.schedule.warmup,
                                         cfg.run.max_updates)
        return self._summarize()

    def _watch(self) -> None:
        cfg, mon = self.cfg, self.mon
        every = cfg.run.eval_every_s
        next_eval = time.monotonic() + every if every else float("inf")
        hard_deadline = time.monotonic() + (cfg.run.max_seconds or 24 * 3600) + STARTUP_TIMEOUT_S
        while True:
            dead = [p for p in self.servers if p.poll() is not None]
            if dead:
                for p in dead:
                    self._died(p)
                return
            for p in self.workers:
                if p.poll() not in (None, 0) and not p.reported:
                    self._died(p)
            self._poll_stats()
            mon.update_losses(self.metrics_path)
            for rec in mon.new_steps:
                self._judge(self.guard.loss(rec.get("version", 0), rec.get("loss")))
            mon.new_steps.clear()
            if time.monotonic() >= next_eval:
                next_eval = time.monotonic() + every
                self._evaluate_live()
            self.display.update(mon)
            if self.diverged:
                return
            if all(p.poll() is not None for p in self.workers):
                return
            if time.monotonic() > hard_deadline:
                self.failures.append("workers outlived run.max_seconds; stopped")
                return
            time.sleep(POLL_S)

    def _poll_stats(self) -> None:
        from asgd.client import ServerError, ServerTimeout

        try:
            self.final_stats = self.client.stats()
            self.mon.update_stats(self.final_stats)
        except (ServerTimeout, ServerError):
            pass

    def _died(self, p: Proc) -> None:
        p.reported = True
        rc = p.returncode
        if p not in self.servers and rc == WORKER_DIVERGED_EXIT:
            self._judge(f"{p.name}: its training loss stayed non-finite")
            return
        self.failures.append(f"{p.name} died (exit {rc})")
        self.display.message(f"[red]{p.name} died[/red] (exit {rc}):\n{p.tail()}", always=True)

    def _judge(self, reason: str) -> None:
        """A divergence found: say it at once, in the display and the log, and stop."""
        if not reason or reason in self.diverged:
            return
        self.diverged.append(reason)
        self.mon.note = "diverged"
        self.metrics.write("diverged", reason=reason, version=self.mon.updates)
        self.display.message(f"[red]diverged:[/red] {reason}; stopping the run", always=True)

    def _evaluate_live(self) -> None:
        from asgd.client import ServerError, ServerTimeout
        from asgd.tasks.evaluate import evaluate_flat

        import torch

        flat = torch.empty(self.task.layout.numel)
        try:
            version = self.client.pull_flat(flat.numpy())
        except (ServerTimeout, ServerError):
            return
        acc, loss = evaluate_flat(self.task, flat, self.cfg.run.eval_batch_size)
        self.mon.accuracy = acc
        self.evals += 1
        self.metrics.write("eval", version=version, accuracy=acc, loss=loss)
        self._judge(self.guard.accuracy(version, acc))

    def _stop_all(self) -> None:
        stop(self.workers, STOP_GRACE_S)
        for p in self.workers:
            if p.poll() not in (None, 0) and not p.reported:
                self._died(p)
        if self.client is not None and all(p.poll() is None for p in self.servers):
            self._poll_stats()
            self.client.close()
        self.mon.finish_training()
        self.mon.note = self.mon.note or "evaluating"
        self.display.update(self.mon)
        stop(self.servers, grace_s=60.0)

    # ------------------------------------------------------------------------------------------

    def _summarize(self) -> dict:
        from asgd.core.checkpoint import load_checkpoint
        from asgd.tasks.evaluate import evaluate_flat

        cfg, run_dir, failures = self.cfg, self.run_dir, self.failures
        summary: dict = {"run_dir": str(run_dir), "workers": cfg.run.workers}
        if cfg.server.shards > 1:
            summary["shards"] = cfg.server.shards
        try:
            ckpt = load_checkpoint(run_dir / "checkpoint")
            ckpt.layout.check_same(self.task.layout, "checkpoint's", "configured model's")
            acc, loss = evaluate_flat(self.task, ckpt.flat, cfg.run.eval_batch_size)
            loss = loss if loss == loss and abs(loss) != float("inf") else None
            summary.update(test_accuracy=acc, test_loss=loss)
            self.metrics.write("eval", version=ckpt.version, accuracy=acc, loss=loss, final=True)
            self.mon.accuracy = acc
            if not self.interrupted:
                self._judge(self.guard.final(acc))
        except (OSError, ValueError) as e:
            failures.append(f"final evaluation failed: {e}")
            summary.update(test_accuracy=None, test_loss=None)
        self.mon.note = "diverged" if self.diverged else ""
        self.display.close(self.mon)
        records = read_metrics(run_dir / "metrics.jsonl")
        done = [r for r in records if r.get("kind") == "worker_done"]
        samples = sum(r["samples"] for r in done)
        starts = [r["t"] - r["elapsed_s"] for r in done]
        train_s = (max(r["t"] for r in done) - min(starts)) if done else 0.0
        stats = self.final_stats or {}
        if failures:
            status = "failed"
        elif self.diverged:
            status = "diverged"
        elif self.interrupted:
            status = "interrupted"
        else:
            status = "ok"
        summary.update(
            wall_s=round(time.time() - self.t0, 3),
            train_s=round(train_s, 3),
            updates_applied=stats.get("updates_applied", 0),
            updates_dropped=stats.get("updates_dropped", 0),
            version=stats.get("version", 0),
            staleness_mean=stats.get("staleness_mean", 0.0),
            staleness_max=stats.get("staleness_max", 0),
            staleness_histogram=stats.get("staleness_histogram", {}),
            bytes_in=stats.get("bytes_in", 0), bytes_out=stats.get("bytes_out", 0),
            shm_bytes_in=stats.get("shm_bytes_in", 0),
            shm_bytes_out=stats.get("shm_bytes_out", 0),
            samples=samples,
            samples_per_s=samples / train_s if train_s > 0 else 0.0,
            policy=cfg.server.policy,
            failures=failures,
            diverged=self.diverged,
            interrupted=self.interrupted,
            status=status,
        )
        if self.evals:
            summary["evals"] = self.evals
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.metrics.close()
        return summary
