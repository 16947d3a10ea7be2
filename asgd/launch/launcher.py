"""The local launcher: one server and N workers as processes on this machine, a live display,
a final evaluation, and the run directory.

    summary = launch(load_config("configs/default.yaml"))      # what `asgd launch` does

Before anything starts, the model and data set named by the config are imported and checked,
and so are the devices: a bad import path or argument, CUDA asked for where there is none, or
a data set and model the built-in loop cannot train (asgd.tasks.contract: labels that are not
integers in [0, K), another loss, outputs that are not one per class) fail here with one line,
and no run directory is left behind (CUDA is only asked whether it is there, never
initialised here; asgd.launch.checks). The server and the workers then run as subprocesses
(``python -m server``, ``python -m worker``), never imported here. The run directory
(``runs/<name>/``) gets config.yaml, metrics.jsonl, summary.json, checkpoint/ and logs/.

A process that dies is reported with the tail of its log and started again, up to
``run.max_restarts`` restarts in all per run (workers and servers together;
asgd.launch.restarts): a worker with its rank (so its data shard) and without ``$ASGD_FAULT``
(an injected crash fires once per run); a server, or one shard of several, with ``--resume``
from its checkpoint (none yet: from the start) on its old port if it can, else a new one,
announced in its address file, where the workers find it again. Every death and restart is
said in the display and recorded in metrics.jsonl (``worker_died``, ``worker_restarted``,
``server_died``, ``server_restarted``) and summary.json (``deaths``, ``restarts``); the run
still ends ``ok`` when the server reaches its budget, and ``failed`` when the restarts run out
or a server cannot be started again. A worker that exits 2 ("the configuration cannot train")
is not restarted: the run stops and ends ``failed`` with its message. A run that diverges (see
``asgd.launch.guard``) is stopped, reported at once and ends ``diverged``. Ctrl-C stops
everything, and the weights reached so far are still evaluated, whatever became of stdout.

    summary = resume_launch("runs/x")          # `asgd launch --resume runs/x`: go on with a run

The summary's figures and summary.json: asgd.launch.summary.
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from asgd.config import Config, ConfigError, save_config, split_batch
from asgd.launch.checks import (LaunchError, check_before_start, check_imports,  # noqa: F401
                                checkpoint_state, make_run_dir, prepare_task, resume_config)
from asgd.launch.display import Display, Monitor
from asgd.launch.guard import DivergenceGuard
from asgd.launch.processes import (STARTUP_TIMEOUT_S, Proc, ProcessError, child_env, spawn,
                                   stop, wait_for_address)
from asgd.launch.restarts import Restarts
from asgd.launch.summary import run_status, training_figures, write_summary
from asgd.metrics import MetricsWriter, read_metrics
from asgd.rundir import checkpoint_dirs

STOP_GRACE_S = 20.0
POLL_S = 0.5
EXIT_POLL_S = 0.02       # within a turn: how often to look for a process that exited
WORKER_DIVERGED_EXIT = 4     # worker/train.py: its loss stayed non-finite
FAULT_ENV = "ASGD_FAULT"     # worker/train.py's crash switch: not passed to a restarted worker


def launch(cfg: Config, quiet: bool = False) -> dict:
    """Run a whole cluster on this machine; returns the summary (also in summary.json).
    The run directory's config.yaml, which every process reads, is ``cfg`` with the batch
    split among the workers (asgd.config.split_batch)."""
    try:
        cfg = split_batch(cfg)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    check_imports(cfg)
    task = check_before_start(cfg)
    run_dir = make_run_dir(cfg)
    try:
        run = Launch(cfg, run_dir, quiet)
        run.task = task if task is not None and task.dataset is not None else None  # once
        return run.run()
    except LaunchError:
        shutil.rmtree(run_dir, ignore_errors=True)    # nothing ran: leave nothing behind
        raise


def resume_launch(run_dir, overrides=(), quiet: bool = False) -> dict:
    """Go on with an existing run: its own config.yaml (with ``overrides``, e.g. a larger
    run.max_updates, saved back to it), the server(s) started with ``--resume`` from its
    checkpoint, workers as usual, in the same run directory: metrics.jsonl is appended to,
    logs too, and a new summary.json is written (the previous one kept as summary-K.json)."""
    cfg, run_dir = resume_config(run_dir, overrides)
    check_before_start(cfg)
    return Launch(cfg, run_dir, quiet, resume=True).run()


class Launch(Restarts):
    """The server and the workers start together (each worker builds its model and data
    while the server starts, and reads the server's address from a file once it is there);
    meanwhile this process builds the task it evaluates with. ``resume``: the server(s)
    start from the run's checkpoint, and the run directory is reused. Subclasses:
    asgd.launch.onray (the processes as Ray actors), asgd.launch.scripts (a user's script as
    each worker: started once the server listens; no exit code of its means divergence).
    Deaths and restarts: asgd.launch.restarts."""

    workers_need_address = False      # start the workers only once the servers listen
    diverged_exit: int | None = WORKER_DIVERGED_EXIT   # a worker's exit code for divergence

    def __init__(self, cfg: Config, run_dir: Path, quiet: bool, resume: bool = False):
        self.cfg, self.run_dir, self.resume = cfg, run_dir, resume
        self.task = None
        self.guard = None
        self.start_failed = False
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        self.config_file = str(run_dir / "config.yaml")
        self.t0 = time.time()
        self.env = child_env(ASGD_T0=repr(self.t0))
        from asgd.config.env import CLUSTER_VARIABLES

        for name in CLUSTER_VARIABLES:   # a shell's (or a Slurm job's) must not move ranks
            self.env.pop(name, None)
        # a restarted worker runs without the crash switch: an injected fault fires once a run
        self.restart_env = {k: v for k, v in self.env.items() if k != FAULT_ENV}
        self.metrics_path = run_dir / "metrics.jsonl"
        try:        # this launch's records start here (a resumed run appends to the file)
            self.metrics_start = self.metrics_path.stat().st_size
        except OSError:
            self.metrics_start = 0
        self.metrics = MetricsWriter(self.metrics_path, self.t0)
        self.display = Display(cfg, quiet)
        self.mon = Monitor(cfg, self.t0)
        self.mon.skip_metrics(self.metrics_start)
        self.tb = None          # run.tensorboard: metrics.jsonl's scalars as TensorBoard events
        if cfg.run.tensorboard:
            from asgd.tensorboard import MetricsToTensorBoard

            self.tb = MetricsToTensorBoard(cfg, run_dir, self.t0, self.metrics_start)
        self.failures: list[str] = []
        self.diverged: list[str] = []
        self.deaths: list[dict] = []
        self.restarts: list[dict] = []
        self.interrupted = False
        self.stop_now = False       # a worker cannot train: the run ends failed
        self.evals = 0
        self.final_stats: dict | None = None
        shards = cfg.server.shards
        self.addr_files = [run_dir / "server.addr"] if shards == 1 else \
            [run_dir / f"server-{i}.addr" for i in range(shards)]
        self.endpoints: list[str] = []
        self.servers: list[Proc] = []    # one, or one per shard (server.shards)
        self.workers: list[Proc] = []    # by rank; a restarted worker takes its place
        self.client = None
        self.resumed_from: list[int | None] = []

    # ------------------------------------------------------------------------------------------
    # processes

    def _server_name(self, shard: int) -> tuple[str, str]:
        """Server (shard) ``shard``'s name in messages, and its log's."""
        return ("server", "server.log") if self.cfg.server.shards == 1 else \
            (f"server shard {shard}", f"server-{shard}.log")

    def _server_args(self, shard: int) -> list[str]:
        """``python``'s arguments for server (shard) ``shard``, but --bind and --resume."""
        return ["-m", "server", "--config", self.config_file, "--run-dir", str(self.run_dir),
                "--address-file", str(self.addr_files[shard]), "--shard", str(shard)]

    def _worker_args(self, rank: int) -> list[str]:
        """``python``'s arguments for worker ``rank``: it reads every address file."""
        files = [a for f in self.addr_files for a in ("--server-file", str(f))]
        return ["-m", "worker", "--config", self.config_file, *files, "--rank", str(rank),
                "--run-dir", str(self.run_dir)]

    def _spawn_server(self, shard: int, resume: bool, bind: str = "tcp://127.0.0.1:0") -> Proc:
        """Server (shard) ``shard`` on ``bind`` (a free loopback port); its address file is
        removed first, so that nobody reads a dead server's endpoint from it."""
        self.addr_files[shard].unlink(missing_ok=True)
        name, log = self._server_name(shard)
        return spawn(name, [*self._server_args(shard), "--bind", bind,
                            *(["--resume"] if resume else [])],
                     self.run_dir / "logs" / log, self.env)

    def _spawn_worker(self, rank: int, env: dict) -> Proc:
        return spawn(f"worker {rank}", self._worker_args(rank),
                     self.run_dir / "logs" / f"worker-{rank}.log", env)

    def _connect(self) -> None:
        from asgd.client import connect_client

        if self.client is not None:
            self.client.close()
        self.client = connect_client(self.endpoints, "launcher", timeout_s=10.0)

    # ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        if self.resume:
            self.resumed_from = [checkpoint_state(d)[0]
                                 for d in checkpoint_dirs(cfg, self.run_dir)]
            self.metrics.write("launch_resumed", versions=self.resumed_from)
        for i in range(cfg.server.shards):
            self.servers.append(self._spawn_server(i, self.resume))
        if not self.workers_need_address:
            self._spawn_workers()

        def sigterm(*_):
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, sigterm)
        try:
            try:
                self._prepare()
                self.endpoints = [wait_for_address(f, p, STARTUP_TIMEOUT_S)
                                  for f, p in zip(self.addr_files, self.servers)]
                if self.workers_need_address:
                    self._spawn_workers()
            except (LaunchError, ProcessError) as e:
                stop(self.workers + self.servers, grace_s=5.0)
                self.start_failed = True
                raise LaunchError(str(e)) from None
            self._connect()
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
            self._prepare()
        return self._summarize()

    def _spawn_workers(self) -> None:
        for r in range(self.cfg.run.workers):
            self.workers.append(self._spawn_worker(r, self.env))

    def _prepare(self) -> None:
        """What this process evaluates with: the task and the divergence guard."""
        if self.task is None:       # else checked and kept before the start
            self.task = prepare_task(self.cfg)
        self.guard = DivergenceGuard(self.task.num_classes, self.cfg.schedule.warmup,
                                     self.cfg.run.max_updates)

    def _watch(self) -> None:
        cfg, mon = self.cfg, self.mon
        every = cfg.run.eval_every_s
        next_eval = time.monotonic() + every if every else float("inf")
        hard_deadline = time.monotonic() + (cfg.run.max_seconds or 24 * 3600) + STARTUP_TIMEOUT_S
        while True:
            for i, p in enumerate(self.servers):
                if p.poll() is not None and not p.reported and not self._server_died(i):
                    return                 # it could not be brought back: the run is over
            for r, p in enumerate(self.workers):
                if p.poll() not in (None, 0) and not p.reported:
                    self._worker_died(r)
            self._tick()
            self._poll_stats()
            mon.update_losses(self.metrics_path)
            if self.tb is not None:
                self.tb.update()
            for rec in mon.new_steps:
                self._judge(self.guard.loss(rec.get("version", 0), rec.get("loss")))
            mon.new_steps.clear()
            if time.monotonic() >= next_eval:
                next_eval = time.monotonic() + every
                self._evaluate_live()
            self.display.update(mon)
            if self.diverged or self.stop_now:
                return
            if all(p.poll() == 0 or (p.poll() is not None and p.reported)
                   for p in self.workers):   # a death since the check above: next turn
                return
            if time.monotonic() > hard_deadline:
                self.failures.append("workers outlived run.max_seconds; stopped")
                return
            self._rest()

    def _rest(self) -> None:
        """POLL_S, or until a process running now exits: the end of a run is seen at once."""
        running = [p for p in (*self.workers, *self.servers) if p.poll() is None]
        end = time.monotonic() + POLL_S
        while time.monotonic() < end and all(p.poll() is None for p in running):
            time.sleep(EXIT_POLL_S)

    def _tick(self) -> None:
        """Once a turn of the watch loop, before the stats (asgd.launch.onray's restarts)."""

    def _poll_stats(self) -> bool:
        from asgd.client import ServerError, ServerTimeout

        try:
            self.final_stats = self.client.stats()
            self.mon.update_stats(self.final_stats)
            return True
        except (ServerTimeout, ServerError):
            return False

    # ------------------------------------------------------------------------------------------

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
        for p in self.workers:   # our SIGTERM may reach a restarted worker before its handler
            if p.poll() not in (None, 0, -signal.SIGTERM) and not p.reported:
                self._worker_died_at_stop(p)
        if self.client is not None and all(p.poll() is None for p in self.servers):
            if not self._poll_stats():   # a Ctrl-C in mid-request: the summary's counts from
                self._connect()          # a fresh connection, not the last turn's
                self._poll_stats()
            self.client.close()
        self.mon.finish_training()
        self.mon.note = self.mon.note or "evaluating"
        self.display.update(self.mon)
        stop(self.servers, grace_s=60.0)

    # ------------------------------------------------------------------------------------------

    def _records(self) -> list[dict]:
        """This launch's records of metrics.jsonl (a resumed run's file holds earlier ones)."""
        return read_metrics(self.metrics_path, self.metrics_start)

    def _final_evaluation(self, summary: dict) -> None:
        """The checkpoint's weights on the held-out split: test_accuracy, test_loss."""
        from asgd.core.checkpoint import NonFiniteCheckpoint, load_checkpoint
        from asgd.tasks.evaluate import evaluate_flat

        try:
            ckpt = load_checkpoint(self.run_dir / "checkpoint")
            ckpt.layout.check_same(self.task.layout, "checkpoint's", "configured model's")
            acc, loss = evaluate_flat(self.task, ckpt.flat, self.cfg.run.eval_batch_size)
            loss = loss if loss == loss and abs(loss) != float("inf") else None
            summary.update(test_accuracy=acc, test_loss=loss)
            self.metrics.write("eval", version=ckpt.version, accuracy=acc, loss=loss, final=True)
            self.mon.accuracy = acc
            if not self.interrupted and not self.stop_now:   # untrained: not a divergence
                self._judge(self.guard.final(acc, ckpt.version))
        except (OSError, ValueError) as e:
            summary.update(test_accuracy=None, test_loss=None)
            if isinstance(e, NonFiniteCheckpoint) and self.diverged:
                return      # the divergence is the run's verdict: its weights are not numbers
            self.failures.append(f"final evaluation failed: {e}")

    def _summary_fields(self) -> dict:
        """More of the summary, from a subclass."""
        return {}

    def _summarize(self) -> dict:
        cfg, run_dir, failures = self.cfg, self.run_dir, self.failures
        summary: dict = {"run_dir": str(run_dir), "workers": cfg.run.workers}
        if cfg.server.shards > 1:
            summary["shards"] = cfg.server.shards
        if self.resume:
            summary["resumed_from"] = self.resumed_from
        self._final_evaluation(summary)
        self.mon.note = "diverged" if self.diverged else ""
        self.display.close(self.mon)
        figures = training_figures(self._records(), self.final_stats, self.t0)
        summary.update(
            **figures,
            policy=cfg.server.policy,
            deaths=self.deaths,
            restarts=self.restarts,
            max_restarts=cfg.run.max_restarts,
            failures=failures,
            diverged=self.diverged,
            interrupted=self.interrupted,
            status=run_status(failures, self.diverged, self.interrupted),
        )
        if self.evals:
            summary["evals"] = self.evals
        summary.update(self._summary_fields())
        write_summary(run_dir, summary, keep_earlier=self.resume)
        self.metrics.close()
        if self.tb is not None:      # the final evaluation's record too
            self.tb.close()
        return summary
