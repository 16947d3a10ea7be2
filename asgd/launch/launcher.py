"""The local launcher: one server and N workers as processes on this machine, a live display,
a final evaluation, and the run directory.

    summary = launch(load_config("configs/default.yaml"))      # what `asgd launch` does

Before anything starts, the model and data set named by the config are imported and checked
(a bad import path or argument fails here, and no run directory is left behind). The server
and the workers then run as subprocesses (``python -m server``, ``python -m worker``), never
imported here, so CUDA is never initialised in this process. The run directory
(``runs/<name>/``) gets config.yaml, metrics.jsonl, summary.json, checkpoint/ and logs/.

A process that dies is reported with the tail of its log and started again, up to
``run.max_restarts`` restarts in all per run (workers and servers together): a worker with its
rank (so its data shard) and without ``$ASGD_FAULT`` (an injected crash fires once per run); a
server, or one shard of several, with ``--resume`` from its checkpoint (none yet: from the
start) on a new port, announced in its address file, where the workers find it again. Every
death and restart is said in the display and recorded in metrics.jsonl (``worker_died``,
``worker_restarted``, ``server_died``, ``server_restarted``) and summary.json (``deaths``,
``restarts``); the run still ends ``ok`` when the server reaches its budget, and ``failed`` when
the restarts run out or a server cannot be started again. A run that diverges (see
``asgd.launch.guard``) is stopped, reported at once and ends ``diverged``. Ctrl-C stops
everything, and the weights reached so far are still evaluated, whatever became of stdout.

    summary = resume_launch("runs/x")          # `asgd launch --resume runs/x`: go on with a run
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

from asgd.config import Config, ConfigError, load_config, save_config
from asgd.launch.display import Display, Monitor
from asgd.launch.guard import DivergenceGuard
from asgd.launch.processes import Proc, ProcessError, child_env, spawn, stop, wait_for_address
from asgd.metrics import MetricsWriter

STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0
POLL_S = 0.5
WORKER_DIVERGED_EXIT = 4     # worker/train.py: its loss stayed non-finite
FAULT_ENV = "ASGD_FAULT"     # worker/train.py's crash switch: not passed to a restarted worker


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


def checkpoint_dirs(cfg: Config, run_dir: Path) -> list[Path]:
    """Where each server (each shard) of the run keeps its checkpoint (as server/main.py)."""
    base = Path(cfg.server.checkpoint_dir or run_dir / "checkpoint")
    if cfg.server.shards == 1:
        return [base]
    return [base / f"shard-{i}" for i in range(cfg.server.shards)]


def checkpoint_state(directory: Path) -> tuple[int | None, str]:
    """(version, "") of the checkpoint a server would resume from in ``directory``; (None, "")
    when there is none yet; (None, why) when it cannot be read."""
    from asgd.core.checkpoint import CheckpointError, load_checkpoint

    if not any(Path(directory).glob("*.asgd")):
        return None, ""
    try:
        return load_checkpoint(directory).version, ""
    except CheckpointError as e:
        return None, str(e)


def check_imports(cfg: Config, builtin_workers: bool = True) -> None:
    """A user's model or data set given by import path must import, and a model split into
    stages (worker.devices) must be one that can be cut so: checked before any process starts
    (the built-ins always import; their arguments are checked with the task). The built-in
    workers need a model: without ``model.name`` only workers that bring their own (scripts
    with asgd.Optimizer: ``builtin_workers`` False) can run."""
    from asgd.tasks.imports import import_object

    if builtin_workers and not cfg.model.name:
        raise LaunchError("model.name is empty: the built-in workers build their model from "
                          "it (a server without a model learns it from the first script "
                          "worker's asgd.Optimizer)")

    for what, name in (("model", cfg.model.name), ("data set", cfg.data.name)):
        if ":" in name:
            try:
                import_object(name, what)
            except (ValueError, TypeError) as e:
                raise LaunchError(str(e)) from None
    if cfg.worker.devices and len(cfg.worker.devices) > 1:   # a split the model cannot take
        from worker.stages import check_split

        try:
            check_split(cfg)
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


def resume_launch(run_dir, overrides=(), quiet: bool = False) -> dict:
    """Go on with an existing run: its own config.yaml (with ``overrides``, e.g. a larger
    run.max_updates, saved back to it), the server(s) started with ``--resume`` from its
    checkpoint, workers as usual, in the same run directory: metrics.jsonl is appended to,
    logs too, and a new summary.json is written (the previous one kept as summary-K.json)."""
    cfg, run_dir = resume_config(run_dir, overrides)
    return Launch(cfg, run_dir, quiet, resume=True).run()


def resume_config(run_dir, overrides=()) -> tuple[Config, Path]:
    """The config of a run to go on with, checked: it has a checkpoint to resume from."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise LaunchError(f"{run_dir} is not a run directory: it has no config.yaml")
    try:
        cfg = load_config(run_dir / "config.yaml", list(overrides))
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    check_imports(cfg)
    for d in checkpoint_dirs(cfg, run_dir):
        if not any(d.glob("*.asgd")):
            raise LaunchError(f"nothing to resume in {run_dir}: no checkpoint in {d}")
    return cfg, run_dir


class Launch:
    """The server and the workers start together (each worker builds its model and data
    while the server starts, and reads the server's address from a file once it is there);
    meanwhile this process builds the task it evaluates with. ``resume``: the server(s)
    start from the run's checkpoint, and the run directory is reused. Subclasses:
    asgd.launch.onray (the processes as Ray actors), asgd.launch.scripts (a user's script as
    each worker: started once the server listens; no exit code of its means divergence)."""

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
        from asgd.launch.env import CLUSTER_VARIABLES

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

    def _spawn_server(self, shard: int, resume: bool, bind: str = "tcp://127.0.0.1:0") -> Proc:
        """Server (shard) ``shard`` on ``bind`` (a free loopback port); its address file is
        removed first, so that nobody reads a dead server's endpoint from it."""
        addr_file = self.addr_files[shard]
        addr_file.unlink(missing_ok=True)
        name, log = ("server", "server.log") if self.cfg.server.shards == 1 else \
            (f"server shard {shard}", f"server-{shard}.log")
        return spawn(name, ["-m", "server", "--config", self.config_file,
                            "--bind", bind, "--run-dir", str(self.run_dir),
                            "--address-file", str(addr_file), "--shard", str(shard),
                            *(["--resume"] if resume else [])],
                     self.run_dir / "logs" / log, self.env)

    def _spawn_worker(self, rank: int, env: dict) -> Proc:
        files = [a for f in self.addr_files for a in ("--server-file", str(f))]
        return spawn(f"worker {rank}", ["-m", "worker", "--config", self.config_file, *files,
                                        "--rank", str(rank), "--run-dir", str(self.run_dir)],
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
            if self.diverged:
                return
            if all(p.poll() == 0 or (p.poll() is not None and p.reported)
                   for p in self.workers):   # a death since the check above: next turn
                return
            if time.monotonic() > hard_deadline:
                self.failures.append("workers outlived run.max_seconds; stopped")
                return
            time.sleep(POLL_S)

    def _tick(self) -> None:
        """Once a turn of the watch loop, before the stats (asgd.launch.onray's restarts)."""

    def _poll_stats(self) -> None:
        from asgd.client import ServerError, ServerTimeout

        try:
            self.final_stats = self.client.stats()
            self.mon.update_stats(self.final_stats)
        except (ServerTimeout, ServerError):
            pass

    # ------------------------------------------------------------------------------------------
    # deaths and restarts

    def _death(self, kind: str, index: int, p: Proc, rc: int | None = None) -> dict:
        """Record a death: the summary's ``deaths``, a ``<kind>_died`` record (``rc``: its
        exit code, when ``p`` no longer tells it)."""
        rc = p.returncode if rc is None else rc
        sig = signal.Signals(-rc).name if rc is not None and rc < 0 and \
            -rc in signal.valid_signals() else None
        key = "rank" if kind == "worker" else "shard"
        extra = {"worker": f"w{index}"} if kind == "worker" else \
            {"version": self.mon.updates}      # the last version seen before it died
        rec = self.metrics.write(f"{kind}_died", **{key: index}, exit_code=rc, signal=sig,
                                 **extra)
        self.deaths.append({"process": p.name, **{k: v for k, v in rec.items() if k != "kind"}})
        return rec

    def _restart_left(self) -> bool:
        return len(self.restarts) < self.cfg.run.max_restarts

    def _exit_text(self, p: Proc, rec: dict) -> str:
        return f"exit {rec.get('exit_code')}" + (f", {rec['signal']}" if rec.get("signal") else "")

    def _out_of_restarts(self, p: Proc, rec: dict) -> None:
        n = self.cfg.run.max_restarts
        failure = f"{p.name} died ({self._exit_text(p, rec)})"
        if n:
            failure += f" after all {n} restarts (run.max_restarts)"
        self.failures.append(failure)
        self.display.message(f"[red]{p.name} died[/red] ({self._exit_text(p, rec)}):\n"
                             f"{p.tail()}\nnot restarted: "
                             f"{'no restarts left' if n else 'run.max_restarts is 0'}",
                             always=True)

    def _worker_died(self, rank: int) -> None:
        """A worker exited non-zero or was killed: a divergence (exit 4) stops the run;
        otherwise it is started again with its rank while restarts are left."""
        p = self.workers[rank]
        p.reported = True
        if p.returncode == self.diverged_exit:
            self._judge(f"{p.name}: its training loss stayed non-finite")
            return
        rec = self._death("worker", rank, p)
        if not self._restart_left():
            self._out_of_restarts(p, rec)
            return
        self.workers[rank] = self._spawn_worker(rank, self.restart_env)
        self._restarted("worker", rank, p.name, worker=f"w{rank}")
        self.display.message(
            f"[red]{p.name} died[/red] ({self._exit_text(p, rec)}):\n{p.tail()}\n"
            f"[yellow]restarting {p.name}[/yellow] (restart {len(self.restarts)} of "
            f"{self.cfg.run.max_restarts} in this run)", always=True)

    def _server_died(self, shard: int) -> bool:
        """A server (shard) died: start it again with --resume from its checkpoint (from the
        start when it has none yet), and follow it. It binds its old port if it can (the
        workers' sockets find it there by themselves, and a push they resend reaches it),
        else a new one, announced in its address file, which the workers read again. False
        when the run cannot go on: no restarts left, or it does not come back."""
        p = self.servers[shard]
        p.reported = True
        rec = self._death("server", shard, p)
        if not self._restart_left():
            self._out_of_restarts(p, rec)
            return False
        directory = checkpoint_dirs(self.cfg, self.run_dir)[shard]
        version, unreadable = checkpoint_state(directory)
        resume = version is not None or bool(unreadable)   # a damaged one: the server decides
        self.display.message(
            f"[red]{p.name} died[/red] ({self._exit_text(p, rec)}):\n{p.tail()}\n"
            f"[yellow]restarting {p.name}[/yellow] "
            + (f"from its checkpoint at version {version}" if version is not None else
               f"with --resume (its newest checkpoint is unreadable: {unreadable})"
               if unreadable else "from the start (no checkpoint yet)"), always=True)
        endpoint = None
        for bind in (self.endpoints[shard], "tcp://127.0.0.1:0"):   # the old port, else any
            self.servers[shard] = self._spawn_server(shard, resume, bind)
            try:
                endpoint = wait_for_address(self.addr_files[shard], self.servers[shard],
                                            STARTUP_TIMEOUT_S)
                break
            except ProcessError as e:
                error = e
                stop([self.servers[shard]], grace_s=5.0)
        if endpoint is None:
            self.servers[shard].reported = True
            self.failures.append(f"{p.name} died ({self._exit_text(p, rec)}) and could not "
                                 "be restarted")
            self.display.message(f"[red]{p.name} could not be restarted:[/red] {error}",
                                 always=True)
            return False
        self.endpoints[shard] = endpoint
        self._connect()
        self._restarted("server", shard, p.name, endpoint=endpoint, resumed_version=version,
                        resume=resume, **({"checkpoint_error": unreadable} if unreadable
                                          else {}))
        return True

    def _restarted(self, kind: str, index: int, name: str, **fields) -> None:
        """Record a restart: the summary's ``restarts``, a ``<kind>_restarted`` record."""
        key = "rank" if kind == "worker" else "shard"
        rec = self.metrics.write(f"{kind}_restarted", **{key: index},
                                 restart=len(self.restarts) + 1, **fields)
        self.restarts.append({"process": name, **{k: v for k, v in rec.items() if k != "kind"}})
        self.mon.restarts = len(self.restarts)

    def _worker_died_at_stop(self, p: Proc) -> None:
        """A worker's death while the cluster is being stopped: reported, not restarted."""
        p.reported = True
        rank = self.workers.index(p)
        if p.returncode == self.diverged_exit:
            self._judge(f"{p.name}: its training loss stayed non-finite")
            return
        rec = self._death("worker", rank, p)
        self.failures.append(f"{p.name} died ({self._exit_text(p, rec)})")
        self.display.message(f"[red]{p.name} died[/red] ({self._exit_text(p, rec)}):\n"
                             f"{p.tail()}", always=True)

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
            self._poll_stats()
            self.client.close()
        self.mon.finish_training()
        self.mon.note = self.mon.note or "evaluating"
        self.display.update(self.mon)
        stop(self.servers, grace_s=60.0)

    # ------------------------------------------------------------------------------------------

    def _records(self) -> list[dict]:
        """This launch's records of metrics.jsonl (a resumed run's file holds earlier ones)."""
        out = []
        try:
            with open(self.metrics_path, "rb") as f:
                f.seek(self.metrics_start)
                lines = f.read().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _final_evaluation(self, summary: dict) -> None:
        """The checkpoint's weights on the held-out split: test_accuracy, test_loss."""
        from asgd.core.checkpoint import load_checkpoint
        from asgd.tasks.evaluate import evaluate_flat

        try:
            ckpt = load_checkpoint(self.run_dir / "checkpoint")
            ckpt.layout.check_same(self.task.layout, "checkpoint's", "configured model's")
            acc, loss = evaluate_flat(self.task, ckpt.flat, self.cfg.run.eval_batch_size)
            loss = loss if loss == loss and abs(loss) != float("inf") else None
            summary.update(test_accuracy=acc, test_loss=loss)
            self.metrics.write("eval", version=ckpt.version, accuracy=acc, loss=loss, final=True)
            self.mon.accuracy = acc
            if not self.interrupted:
                self._judge(self.guard.final(acc))
        except (OSError, ValueError) as e:
            self.failures.append(f"final evaluation failed: {e}")
            summary.update(test_accuracy=None, test_loss=None)

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
        records = self._records()
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
            # since the server (last) started: a restarted server counts afresh; version is whole
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
            deaths=self.deaths,
            restarts=self.restarts,
            max_restarts=cfg.run.max_restarts,
            failures=failures,
            diverged=self.diverged,
            interrupted=self.interrupted,
            status=status,
        )
        if self.evals:
            summary["evals"] = self.evals
        summary.update(self._summary_fields())
        path = run_dir / "summary.json"
        if self.resume and path.exists():      # the earlier launch's summary is kept
            k = 1
            while (run_dir / f"summary-{k}.json").exists():
                k += 1
            path.rename(run_dir / f"summary-{k}.json")
        path.write_text(json.dumps(summary, indent=2) + "\n")
        self.metrics.close()
        if self.tb is not None:      # the final evaluation's record too
            self.tb.close()
        return summary
