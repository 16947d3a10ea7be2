"""Running the processes of a run: spawn with ``python -m``, address files, bounded waits,
terminate then kill.

    proc = spawn("server", ["-m", "server", "--config", c, "--bind", "tcp://127.0.0.1:0",
                            "--address-file", addr], log_path, env=child_env())
    endpoint = wait_for_address(addr, proc, timeout_s=60)
    stop([proc], grace_s=20)                 # SIGTERM, wait, then SIGKILL what is left

Every process that listens binds port 0 (ZeroMQ's ``*``, or a file store for
torch.distributed) and announces what it got through an address file written atomically, so
no port is ever picked by binding, closing and hoping (which races). The launcher, the
reference trainers, the benchmarks and the test fixtures all start their children here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from asgd.core.endpoint import read_address, write_address  # noqa: F401  (their home)


STARTUP_TIMEOUT_S = 60.0     # a process's time to announce its address (and a launch's slack)


class ProcessError(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path | None
    reported: bool = False

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def tail(self, lines: int = 15) -> str:
        """The last lines of its log, each whole."""
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def child_env(**extra: str) -> dict:
    """The environment of a child: this one, unbuffered, one OpenMP thread unless set, and
    the current folder on PYTHONPATH so user code by import path resolves in every process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    cwd = os.getcwd()
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        env["PYTHONPATH"] = os.pathsep.join([cwd, *paths])
    return env


def spawn(name: str, args: list[str], log_path: Path | None, env: dict | None = None,
          cwd=None, new_session: bool = True) -> Proc:
    """Start ``python args...`` with its output appended to ``log_path`` (or discarded).
    ``new_session`` keeps a terminal's Ctrl-C from reaching it: its parent stops it."""
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        popen = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env or child_env(), cwd=cwd,
                                 start_new_session=new_session)
    finally:
        if log_path is not None:
            out.close()
    return Proc(name, popen, Path(log_path) if log_path is not None else None)


def wait_for_address(path: Path, proc: Proc, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
    """The endpoint ``proc`` announced in ``path``; ProcessError if it exits or stays silent
    for ``timeout_s``."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return text
        if proc.poll() is not None:
            raise ProcessError(f"the {proc.name} exited at start-up (exit {proc.returncode})"
                               f":\n{proc.tail()}")
        time.sleep(0.02)
    raise ProcessError(f"the {proc.name} did not start listening within {timeout_s:g} s:\n"
                       f"{proc.tail()}")


def stop(procs: list[Proc], grace_s: float = 20.0, sig=signal.SIGTERM) -> None:
    """Send ``sig`` to each live process, wait up to ``grace_s`` in all, then SIGKILL what is
    left (and wait for it, bounded)."""
    for p in procs:
        if p.poll() is None:
            try:
                p.popen.send_signal(sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def wait_all(procs: list[Proc], timeout_s: float) -> list[int | str]:
    """Wait for every process to exit within ``timeout_s`` in all; one still running then is
    killed and reported as ``"timeout"``. Returns the exit codes in order."""
    deadline = time.monotonic() + timeout_s
    codes: list[int | str] = []
    for p in procs:
        try:
            codes.append(p.popen.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            stop([p], grace_s=5.0, sig=signal.SIGKILL)
            codes.append("timeout")
    return codes


def run_to_end(args: list[str], timeout_s: float, env: dict | None = None, cwd=None,
               on_start=None) -> subprocess.CompletedProcess:
    """Run ``python args...`` to completion, capturing its output as text. One that outlives
    ``timeout_s`` gets SIGTERM (a launcher then stops its own children), SIGKILL if that does
    not end it, and ProcessError carrying what it printed."""
    popen = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             env=env or child_env(), cwd=cwd)
    if on_start is not None:
        on_start(popen)
    try:
        out, err = popen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        popen.terminate()
        try:
            out, err = popen.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            popen.kill()
            out, err = popen.communicate(timeout=10)
        raise ProcessError(f"{args} did not finish within {timeout_s:g} s\nstdout:\n{out}\n"
                           f"stderr:\n{err}") from None
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
