"""A user's own training script as each worker: ``asgd launch [options] SCRIPT [ARGS...]``.

    asgd launch --workers 2 train.py --steps 1000        # python train.py --steps 1000, twice
    summary = launch_script(script_config(None, []), "train.py", ["--steps", "1000"])

Each worker is ``python SCRIPT ARGS`` with its place in the cluster in its environment (the
same variables a worker started by hand next to ``asgd server`` reads, docs/deploy.md):

| variable | value |
| --- | --- |
| ``ASGD_SERVER`` | the server's endpoint (a sharded server's, comma-separated) |
| ``ASGD_SERVER_FILE`` | the files the launcher announces the endpoints in (one per shard) |
| ``ASGD_RANK`` | the worker's rank, 0 .. N-1 |
| ``ASGD_WORKERS`` | N, the number of workers (run.workers) |
| ``ASGD_LOCAL_RANK`` | its rank among the workers of its machine (here: its rank) |
| ``ASGD_RUN_DIR`` | the run directory: ``opt.log()`` appends to its metrics.jsonl |
| ``ASGD_CONFIG`` | the run's config.yaml (asgd.Optimizer's defaults: its worker.* keys) |
| ``OMP_NUM_THREADS`` | the cores over the workers, at least 1, unless it is already set |

Everything else is a launch's (``asgd.launch.launcher.Launch``): the server from the config's
server settings (with no ``model.name`` it learns the model from the first script's hello),
a dead worker started again with its rank (run.max_restarts), the live display, the run
directory, Ctrl-C, and ``--on ray``. The scripts start once the server listens, so
``ASGD_SERVER`` is its real address. What a script prints goes to ``logs/worker-<rank>.log``
and, line by line, to the launcher's output prefixed ``[rank R]`` above the live line (a
failing script's traceback too). The run ends when every script has exited; the server then
writes its checkpoint, and summary.json says how each worker ended (``worker_exits``: exit
code, signal, restarts, the exit code of each death) and what each logged last (``logged``:
its last ``opt.log()`` record). There is no model in the launcher, so no held-out
evaluation: test_accuracy and test_loss are null and ``evaluation`` says why. Without
``--config`` a script run takes the built-in defaults with no model, no data set and no
budget, and a constant learning rate without warm-up unless the script gives a schedule
(``SCRIPT_DEFAULTS``, configs/script.yaml): it ends when the scripts do. A ``--config``
file's values stand over these defaults.
``asgd launch --resume RUN SCRIPT`` goes on with a script run, its server resumed from its
checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

from asgd.api import LOCAL_RANK, RUN_DIR, SERVER_FILE
from asgd.config import Config, ConfigError, from_dict, load_config
from asgd.launch.display import Monitor
from asgd.config.env import RANK, SERVER, WORKERS
from asgd.launch.launcher import Launch, LaunchError, checkpoint_dirs, checkpoint_state

CONFIG = "ASGD_CONFIG"       # asgd.optimizer_config.LAUNCH_CONFIG: its data-path keys
SCRIPT_VARIABLES = (SERVER, RANK, WORKERS, LOCAL_RANK, RUN_DIR, CONFIG, SERVER_FILE)
# a script run's defaults (configs/script.yaml says the same; a --config file's values stand
# over them): the server learns its model from the first script, trains at a constant rate
# without warm-up unless the script gives a schedule (asgd.Optimizer(schedule=...), as
# torch.optim would), has no budget of its own (the scripts end the run) and the launcher
# evaluates nothing
SCRIPT_DEFAULTS = {"model": {"name": ""}, "data": {"name": ""},
                   "schedule": {"kind": "constant", "warmup": 0},
                   "run": {"max_updates": 0, "max_seconds": 0, "eval_every_s": 0}}
NO_SAMPLES = ("n/a: the scripts counted no samples; opt.log(samples=len(x)) each step gives "
              "samples and samples_per_s (updates_per_s is the server's rate)")
PARTIAL_MAX = 1 << 16        # a line longer than this without a newline is shown in pieces
NO_EVALUATION = ("none: a script run has no model in the launcher; the scripts report their "
                 "own metrics (opt.log, in metrics.jsonl)")


def check_script(script) -> Path:
    """The script as an absolute path; LaunchError (nothing started) when it is not there."""
    path = Path(script)
    if path.is_dir() and (path / "__main__.py").is_file():
        return path.resolve()            # python runs a folder's __main__.py, as here
    if not path.is_file():
        where = "" if path.is_absolute() else f" (in {Path.cwd()})"
        what = "is a folder without __main__.py" if path.is_dir() else "does not exist"
        raise LaunchError(f"cannot run the script {script}: it {what}{where}")
    return path.resolve()


def script_config(config_path, overrides) -> Config:
    """A script run's configuration: ``SCRIPT_DEFAULTS`` with ``config_path``'s values over
    them (a file that names no schedule: a constant rate, as without one); then the
    overrides (ConfigError naming a bad key)."""
    import yaml

    from asgd.config import apply_overrides

    data = SCRIPT_DEFAULTS
    if config_path is not None:
        load_config(config_path)        # its errors, as any config's
        data = _merged(SCRIPT_DEFAULTS, yaml.safe_load(Path(config_path).read_text()) or {})
    cfg = from_dict(data)
    return apply_overrides(cfg, overrides) if overrides else cfg


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def threads_per_worker(workers: int, environ=None) -> str:
    """OMP_NUM_THREADS for each script: the user's, else this machine's cores over the
    workers, at least 1 (torch's default of every core would make N workers fight)."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip():
        return environ["OMP_NUM_THREADS"].strip()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return str(max(1, cores // max(1, workers)))


def script_env(rank: int, workers: int, endpoints: list[str], run_dir: Path,
               config_file: str, threads: str, addr_files=()) -> dict:
    """The variables a script worker gets (see the module's table)."""
    return {SERVER: ",".join(endpoints), SERVER_FILE: ",".join(map(str, addr_files)),
            RANK: str(rank), WORKERS: str(workers),
            LOCAL_RANK: str(rank), RUN_DIR: str(run_dir), CONFIG: str(config_file),
            "OMP_NUM_THREADS": threads}


class OutputPump:
    """The new complete lines of each worker's log, for the launcher's output: read from
    where the last call stopped (a restarted worker appends to the same file). A carriage
    return keeps only what follows it, as a terminal would show a progress bar."""

    def __init__(self):
        self.pos: dict[int, int] = {}
        self.partial: dict[int, bytes] = {}

    def lines(self, rank: int, path: Path, final: bool = False) -> list[str]:
        """The complete lines since the last call (``final``: the rest too)."""
        try:
            with open(path, "rb") as f:
                f.seek(self.pos.get(rank, 0))
                chunk = f.read()
        except OSError:
            return []
        self.pos[rank] = self.pos.get(rank, 0) + len(chunk)
        data = self.partial.pop(rank, b"") + chunk
        *done, rest = data.split(b"\n")
        if final or len(rest) > PARTIAL_MAX:
            if rest:
                done.append(rest)
        elif rest:
            self.partial[rank] = rest
        return [line.decode("utf-8", "replace").rstrip("\r").rsplit("\r", 1)[-1]
                for line in done]


class ScriptMonitor(Monitor):
    """The display's figures for scripts: steps/s instead of samples/s (a script's batch is
    its own), and how many scripts still run."""
    running: int = 0

    def fields(self) -> list[str]:
        out = super().fields()
        rate = self.samples_per_s / max(1, self.cfg.worker.batch_size)
        out = [f"{rate:,.1f} steps/s" if f.endswith(" samples/s") else f for f in out]
        out.insert(1, f"scripts {self.running}/{self.cfg.run.workers}")
        return out


class NoJudge:
    """A script's loss is its own: the launcher does not judge divergence from it."""

    def loss(self, version, loss) -> str:
        return ""

    def accuracy(self, version, accuracy) -> str:
        return ""

    def final(self, accuracy) -> str:
        return ""


class ScriptWorkers:
    """What makes a launch's workers scripts; mixed into ``Launch`` and ``RayLaunch``."""

    workers_need_address = True       # ASGD_SERVER is the address the server listens at
    diverged_exit = None              # every exit code of a script is its own

    def _init_script(self, script: Path, args: list[str]) -> None:
        self.script, self.script_args = Path(script), list(args)
        self.threads = threads_per_worker(self.cfg.run.workers)
        self.pump = OutputPump()
        for rank in range(self.cfg.run.workers):     # a resumed run's earlier output is shown
            try:
                self.pump.pos[rank] = self._log_path(rank).stat().st_size
            except OSError:
                pass
        mon = ScriptMonitor(self.cfg, self.t0)
        mon.skip_metrics(self.metrics_start)
        self.mon = mon
        self.metrics.write("script", script=str(self.script), args=self.script_args,
                           threads=self.threads)
        for name in SCRIPT_VARIABLES[3:]:   # a shell's must not reach the scripts
            self.env.pop(name, None)
            self.restart_env.pop(name, None)

    def _script_env(self, rank: int) -> dict:
        return script_env(rank, self.cfg.run.workers, self.endpoints, self.run_dir,
                          self.config_file, self.threads, self.addr_files)

    def _log_path(self, rank: int) -> Path:
        return self.run_dir / "logs" / f"worker-{rank}.log"

    def _note_instead_of_tail(self, p, rank: int) -> None:
        """A death's message points at the output already shown rather than repeating it."""
        log = self._log_path(rank).relative_to(self.run_dir)
        p.tail = lambda lines=15: (f"(its output is above, each line prefixed \\[rank {rank}]; "
                                   f"all of it in {log})")

    # ------------------------------------------------------------------------------------------
    # the launch's hooks

    def _prepare(self) -> None:
        self.guard = NoJudge()            # no task: there is no model in this process

    def _evaluate_live(self) -> None:
        return

    def _final_evaluation(self, summary: dict) -> None:
        summary.update(test_accuracy=None, test_loss=None, evaluation=NO_EVALUATION)

    def _tick(self) -> None:
        super()._tick()
        self._show_output()
        self.mon.running = sum(p.poll() is None for p in self.workers)

    def _worker_died(self, rank: int) -> None:
        self._show_output(final=True)     # its traceback first, then what becomes of it
        super()._worker_died(rank)

    def _stop_all(self) -> None:
        super()._stop_all()
        self._show_output(final=True)

    def _show_output(self, final: bool = False) -> None:
        for rank in range(len(self.workers)):
            for line in self.pump.lines(rank, self._log_path(rank), final):
                self.display.message(f"[dim]\\[rank {rank}][/dim] {_escape(line)}",
                                     always=True)

    def _summary_fields(self) -> dict:
        exits = []
        for rank, p in enumerate(self.workers):
            rc = p.poll()
            died = [d for d in self.deaths if d.get("rank") == rank]
            exits.append({"rank": rank, "exit_code": rc,
                          "signal": _signal_name(rc),
                          "restarts": sum(r.get("rank") == rank for r in self.restarts
                                          if r["process"].startswith("worker")),
                          "deaths": [d.get("exit_code") for d in died],
                          "log": str(self._log_path(rank).relative_to(self.run_dir))})
        versions = [checkpoint_state(d)[0] for d in checkpoint_dirs(self.cfg, self.run_dir)]
        logged: dict = {}      # each worker's last opt.log() record: its own final figures
        for rec in self._records():
            if rec.get("kind") == "worker_step" and "worker" in rec:
                logged[rec["worker"]] = {k: v for k, v in rec.items() if k not in ("kind",
                                                                                  "worker")}
        return {"script": [str(self.script), *self.script_args], "worker_exits": exits,
                "checkpoint_version": versions[0] if len(versions) == 1 else versions,
                "logged": logged, **self._throughput()}

    def _throughput(self) -> dict:
        """The rates a script run can state honestly. A script's batch is its own, so the
        samples are the ones the scripts counted (``opt.log(samples=len(x))``): without
        them ``samples`` and ``samples_per_s`` are null ("n/a"), not 0. ``updates_per_s``
        is the server's applied updates over the training time (from the first script's
        start to the last one's close), always known."""
        done = [r for r in self._records() if r.get("kind") == "worker_done"]
        starts = [r["t"] - r["elapsed_s"] for r in done if "elapsed_s" in r]
        train_s = max(r["t"] for r in done) - min(starts) if starts else 0.0
        applied = (self.final_stats or {}).get("updates_applied", 0)
        out = {"updates_per_s": round(applied / train_s, 3) if train_s > 0 else None}
        if not any(r.get("samples") for r in done):
            out.update(samples=None, samples_per_s=None, samples_note=NO_SAMPLES)
        return out


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _signal_name(rc) -> str | None:
    import signal

    if rc is None or rc >= 0 or -rc not in signal.valid_signals():
        return None
    return signal.Signals(-rc).name


class ScriptLaunch(ScriptWorkers, Launch):
    """Scripts as local processes."""

    def __init__(self, cfg: Config, run_dir: Path, script: Path, args: list[str],
                 quiet: bool = False, resume: bool = False):
        super().__init__(cfg, run_dir, quiet, resume)
        self._init_script(script, args)

    def _spawn_worker(self, rank: int, env: dict):
        from asgd.launch.processes import spawn

        p = spawn(f"worker {rank}", [str(self.script), *self.script_args],
                  self._log_path(rank), dict(env, **self._script_env(rank)))
        self._note_instead_of_tail(p, rank)
        return p


def ray_script_launch(cfg: Config, run_dir: Path, script: Path, args: list[str],
                      quiet: bool, resume: bool, address, num_cpus):
    """Scripts as Ray actors (asgd.launch.onray): the script must be at the same path on
    every node (a shared file system, as for the run directory)."""
    from asgd.launch.onray import RayLaunch

    class RayScriptLaunch(ScriptWorkers, RayLaunch):
        def _worker_spec(self, rank: int) -> dict:
            spec = super()._worker_spec(rank)
            env = self._script_env(rank)
            cpus = self.bundle.get("CPU", 0)
            if cpus >= 1 and not os.environ.get("OMP_NUM_THREADS", "").strip():
                env["OMP_NUM_THREADS"] = str(int(cpus))     # its bundle's, not this machine's
            return dict(spec, args=[str(self.script), *self.script_args], extra_env=env)

        def _spawn_worker(self, rank: int, env: dict):
            p = super()._spawn_worker(rank, env)
            self._note_instead_of_tail(p, rank)
            return p

    launch = RayScriptLaunch(cfg, run_dir, quiet, resume, address=address, num_cpus=num_cpus)
    launch._init_script(script, args)
    return launch


def resume_script_config(run_dir, overrides=()) -> tuple[Config, Path]:
    """The config of a script run to go on with (its config.yaml with ``overrides``), checked:
    it has a checkpoint to resume from. (The launcher's resume_config, less the check that
    the built-in workers have a model.)"""
    from asgd.launch.checks import resume_config

    return resume_config(run_dir, overrides, builtin_workers=False)


def launch_script(cfg: Config | None, script, args=(), quiet: bool = False,
                  on: str = "local", address: str | None = None, num_cpus: int | None = None,
                  resume_dir=None, overrides=()) -> dict:
    """Run ``python SCRIPT ARGS`` as each of run.workers workers next to the server; the
    summary (also in summary.json). LaunchError, with nothing started and no run directory
    left, for a script that is not there or a server that cannot start. ``resume_dir``: go
    on with that run (its config.yaml with ``overrides``; ``cfg`` is not used), the server
    resumed from its checkpoint."""
    import shutil

    from asgd.launch.launcher import check_imports, make_run_dir

    script = check_script(script)
    if on == "ray":
        from asgd.launch.onray import import_ray

        import_ray()

    def make(cfg, run_dir, resume):
        if on == "ray":
            return ray_script_launch(cfg, run_dir, script, list(args), quiet, resume,
                                     address, num_cpus)
        return ScriptLaunch(cfg, run_dir, script, list(args), quiet, resume)

    if resume_dir is not None:
        cfg, run_dir = resume_script_config(resume_dir, overrides)
        return make(cfg, run_dir.resolve(), True).run()
    check_imports(cfg, builtin_workers=False)    # the scripts bring their own model
    run_dir = make_run_dir(cfg).resolve()
    try:
        return make(cfg, run_dir, False).run()
    except LaunchError:
        shutil.rmtree(run_dir, ignore_errors=True)    # nothing ran: leave nothing behind
        raise


def launch_script_command(config_path, workers, overrides, quiet, resume_dir, on, address,
                          num_cpus, script, script_args) -> None:
    """``asgd launch [options] SCRIPT [ARGS...]`` (asgd.cli's launch, given a SCRIPT)."""
    import click

    from asgd.cli import report_launch, workers_overrides

    overrides = list(overrides)
    try:
        check_script(script)            # before anything else: one clear message
        if resume_dir is None:
            cfg = script_config(config_path, overrides)
            if workers is not None:
                overrides += workers_overrides(workers, cfg)
                cfg = script_config(config_path, overrides)
        else:
            cfg = None
            if workers is not None:
                overrides += workers_overrides(
                    workers, load_config(Path(resume_dir) / "config.yaml", overrides))
        summary = launch_script(cfg, script, script_args, quiet, on, address, num_cpus,
                                resume_dir, overrides)
    except (LaunchError, ConfigError) as e:
        raise click.ClickException(str(e))
    report_launch(summary, ("updates_per_s", "worker_exits"))


