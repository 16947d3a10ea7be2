"""What a launch does when one of its processes dies: record it, say it, and start it again
while ``run.max_restarts`` allows (``Launch`` in asgd.launch.launcher takes these methods).

    rec = self._death("worker", rank, p)            # worker_died, and the summary's deaths
    self._restarted("worker", rank, p.name, ...)    # worker_restarted, the summary's restarts
    "restarting server " + resume_how(version, resume, unreadable)   # ... from its checkpoint

A worker is started again with its rank (so its data shard) and without ``$ASGD_FAULT``; one
that exits 2 ("the configuration cannot train") is not: the run stops and fails with its
message. A server (shard) is started again with ``--resume`` from its checkpoint (from the
start when it has none yet), on its old port if it can, else on a new one announced in its
address file. asgd.launch.onray replaces the two deaths: there Ray restarts the actors, and the
launcher records what it sees.
"""
from __future__ import annotations

import signal

from rich.markup import escape

from asgd.launch.checks import checkpoint_state
from asgd.launch.processes import (STARTUP_TIMEOUT_S, Proc, ProcessError, stop,
                                   wait_for_address)
from asgd.rundir import checkpoint_dirs

WORKER_CANNOT_TRAIN_EXIT = 2  # worker/main.py: the configuration cannot train (no restart)


def resume_how(version: int | None, resume: bool, unreadable: str = "") -> str:
    """How a server (shard) starts again: from its checkpoint at ``version``, with --resume
    (its newest checkpoint is unreadable: the server decides), or from the start."""
    if version is not None:
        return f"from its checkpoint at version {version}"
    if resume:
        return "with --resume" + (f" (its newest checkpoint is unreadable: {unreadable})"
                                  if unreadable else "")
    return "from the start (no checkpoint yet)"


class Restarts:
    """Deaths and restarts, mixed into ``Launch``: it has the run's ``cfg``, ``run_dir``,
    ``servers`` and ``workers`` (Procs), ``endpoints``, ``addr_files``, ``metrics``,
    ``display``, ``mon``, ``failures``, ``deaths``, ``restarts`` and ``restart_env``, and
    starts processes with ``_spawn_server`` / ``_spawn_worker``."""

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
        if p.returncode == WORKER_CANNOT_TRAIN_EXIT:
            self._cannot_train(p)
            return
        if not self._restart_left():
            self._out_of_restarts(p, rec)
            return
        self.workers[rank] = self._spawn_worker(rank, self.restart_env)
        self._restarted("worker", rank, p.name, worker=f"w{rank}")
        self.display.message(
            f"[red]{p.name} died[/red] ({self._exit_text(p, rec)}):\n{p.tail()}\n"
            f"[yellow]restarting {p.name}[/yellow] (restart {len(self.restarts)} of "
            f"{self.cfg.run.max_restarts} in this run)", always=True)

    def _cannot_train(self, p: Proc) -> None:
        """A worker exited 2, "the configuration cannot train": a restart would meet the same
        (three restarts, then untrained weights reported as a divergence), so the run stops
        here and fails with the worker's own message (its last error line)."""
        errors = [line.split(" ERROR ", 1)[1] for line in p.tail(50).splitlines()
                  if " ERROR " in line]
        why = errors[-1] if errors else (p.tail(1) or "no message in its log")
        self.failures.append(f"{p.name} cannot train (exit 2, not restarted): {why}")
        self.stop_now = True
        self.display.message(f"[red]{p.name} cannot train[/red] (exit 2, not restarted):\n"
                             f"{escape(p.tail())}", always=True)

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
            f"[yellow]restarting {p.name}[/yellow] {resume_how(version, resume, unreadable)}",
            always=True)
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
