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
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from asgd.config import Config, save_config
from asgd.metrics import MetricsWriter, read_metrics

STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0
POLL_S = 0.5


class LaunchError(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    reported: bool = False

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.out_dir) / name
    run_dir, k = base, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        run_dir = base.with_name(f"{name}-{k}")
        k += 1
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return run_dir


def _spawn(name: str, args: list[str], log_path: Path, env: dict) -> Proc:
    log = open(log_path, "ab")
    popen = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    log.close()
    return Proc(name, popen, log_path)


def _stop(procs: list[Proc], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(timeout=5)


@dataclass
class Monitor:
    """What the display shows, from the server's stats and the workers' metrics records."""
    cfg: Config
    t0: float
    updates: int = 0
    samples_per_s: float = 0.0
    staleness_mean: float = 0.0
    loss: float | None = None
    accuracy: float | None = None
    _last: tuple = (0.0, 0)
    _first: tuple | None = None     # (time, pushes) when pushes were first seen
    _losses: dict = field(default_factory=dict)
    _metrics_pos: int = 0

    def update_stats(self, stats: dict) -> None:
        now = time.time()
        self.updates = stats["version"]
        self.staleness_mean = stats["staleness_mean"]
        pushes = sum(w["pushes"] for w in stats["workers"].values())
        if pushes and self._first is None:
            self._first = (now, pushes)
        t_prev, p_prev = self._last
        if t_prev and now > t_prev:
            rate = (pushes - p_prev) * self.cfg.worker.batch_size / (now - t_prev)
            self.samples_per_s = rate if not self.samples_per_s else \
                0.5 * self.samples_per_s + 0.5 * rate
        self._last = (now, pushes)

    def update_losses(self, metrics_path: Path) -> None:
        try:
            with open(metrics_path, "rb") as f:
                f.seek(self._metrics_pos)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        self._metrics_pos += end
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "worker_step" and rec.get("loss") is not None:
                self._losses[rec["worker"]] = rec["loss"]
        if self._losses:
            self.loss = sum(self._losses.values()) / len(self._losses)

    def finish(self) -> None:
        """Show the whole run's average rate instead of the last moment's."""
        if self._first is not None and self._last[0] > self._first[0]:
            self.samples_per_s = ((self._last[1] - self._first[1]) * self.cfg.worker.batch_size
                                  / (self._last[0] - self._first[0]))

    def line(self) -> str:
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        acc = f"  acc {self.accuracy:.4f}" if self.accuracy is not None else ""
        return (f"updates {self.updates:>7d}  samples/s {self.samples_per_s:>9.0f}  "
                f"staleness {self.staleness_mean:5.2f}  loss {loss}{acc}  "
                f"elapsed {time.time() - self.t0:6.1f}s")


class Display:
    """A rich progress bar on a terminal; a plain line every few seconds elsewhere."""

    def __init__(self, cfg: Config, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.total = cfg.run.max_updates or None
        self._last_plain = 0.0
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("[bold]asgd"), BarColumn(),
                                     TextColumn("{task.description}"), console=self.console,
                                     transient=False)
            self.task = self.progress.add_task("", total=self.total)
            self.progress.start()

    def update(self, mon: Monitor) -> None:
        if self.live:
            self.progress.update(self.task, completed=mon.updates, description=mon.line())
        elif not self.quiet and time.monotonic() - self._last_plain >= 5.0:
            self._last_plain = time.monotonic()
            print(mon.line(), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet or "died" in text:
            self.console.print(text, soft_wrap=True, highlight=False)

    def close(self, mon: Monitor) -> None:
        mon.finish()
        if self.live:
            self.update(mon)
            self.progress.stop()
        elif not self.quiet:
            print(mon.line(), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------

def launch(cfg: Config, quiet: bool = False) -> dict:
    """Run a whole cluster on this machine; returns the summary (also in summary.json)."""
    from worker.client import Client, ServerError, ServerTimeout  # a client only, no training

    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    t0 = time.time()
    env = dict(os.environ, ASGD_T0=repr(t0), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    metrics_path = run_dir / "metrics.jsonl"
    metrics = MetricsWriter(metrics_path, t0)
    display = Display(cfg, quiet)
    addr_file = run_dir / "server.addr"
    config_file = str(run_dir / "config.yaml")

    server = _spawn("server", ["-m", "server", "--config", config_file,
                               "--bind", "tcp://127.0.0.1:*", "--run-dir", str(run_dir),
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
        endpoint = _wait_for_address(addr_file, server)
        for r in range(cfg.run.workers):
            workers.append(_spawn(f"worker {r}", ["-m", "worker", "--config", config_file,
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
        _stop(workers)
        if client is not None and server.popen.poll() is None:
            try:
                final_stats = client.stats()
                mon.update_stats(final_stats)
            except (ServerTimeout, ServerError):
                pass
            client.close()
        _stop([server], grace=60.0)
        display.close(mon)
    train_end = time.time()
    summary = _summarize(cfg, run_dir, t0, train_end, final_stats, failures, interrupted,
                         metrics, evals)
    metrics.close()
    return summary


def _wait_for_address(addr_file: Path, server: Proc) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if addr_file.exists():
            text = addr_file.read_text().strip()
            if text:
                return text
        if server.popen.poll() is not None:
            raise LaunchError(f"the server exited at start-up (exit {server.popen.returncode}):\n"
                              f"{server.tail()}")
        time.sleep(0.05)
    raise LaunchError(f"the server did not start listening within {STARTUP_TIMEOUT_S:g} s")


class _EvalModel:
    """The model and test split in this process (CPU, one thread) for evaluations mid-run."""

    def __init__(self, cfg: Config):
        import torch

        from asgd.data import load_dataset
        from asgd.models import build_model

        torch.set_num_threads(1)
        self.cfg = cfg
        self.ds = load_dataset(cfg.data, seed=cfg.run.seed)
        self.model = build_model(cfg.model, self.ds.input_shape, self.ds.num_classes,
                                 seed=cfg.run.seed)

    def evaluate_live(self, client, metrics: MetricsWriter, mon: Monitor) -> dict:
        from asgd.evaluate import evaluate, load_weights

        version, tensors = client.pull()
        load_weights(self.model, {t.name: t.to_torch() for t in tensors})
        acc, loss = evaluate(self.model, self.ds.x_test, self.ds.y_test,
                             self.cfg.run.eval_batch_size)
        mon.accuracy = acc
        return metrics.write("eval", version=version, accuracy=acc, loss=loss)


def _summarize(cfg, run_dir: Path, t0, train_end, stats, failures, interrupted, metrics,
               evals) -> dict:
    from asgd.evaluate import evaluate_checkpoint

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
