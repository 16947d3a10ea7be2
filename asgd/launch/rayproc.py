"""One process of a run in a Ray actor (``asgd launch --on ray``, asgd.launch.onray): the
actor that starts and watches it on its node, and how the launcher sees it.

    actor = ray.remote(ProcessActor).options(max_restarts=3).remote(spec)   # starts it
    proc = RayProc(ray, actor, "worker 0", log_path, exit_file)              # like a Proc
    proc.poll()          # None while it runs; a restart by Ray is queued in proc.restarts

``ProcessActor`` runs ``python -m server`` / ``python -m worker`` on the actor's node and exits
when its child dies unasked, so that Ray restarts the actor: a server's actor starts it again
with ``--resume`` from its checkpoint, on its old port if it can. ``RayProc`` answers as
``asgd.launch.processes.Proc`` does (``poll``, ``tail``, a ``popen`` that
``asgd.launch.processes.stop`` can signal), so the local launcher's loop drives actors
unchanged. Ray's calls carry only names, paths, numbers and exit codes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from asgd.core.endpoint import read_address
from asgd.launch.checks import checkpoint_state
from asgd.launch.processes import STARTUP_TIMEOUT_S, Proc

CALL_TIMEOUT_S = 10.0
# what Ray sets in an actor's environment for the accelerators it gave it; the actor's child
# gets them too (a worker of a GPU bundle sees that GPU alone, as its cuda:0)
ACCELERATOR_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                         "ONEAPI_DEVICE_SELECTOR", "NEURON_RT_VISIBLE_CORES",
                         "TPU_VISIBLE_CHIPS")


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the actor that started it is gone (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ProcessActor:
    """One process of a run, started and watched on the actor's node. ``spec``: ``kind``
    (server | worker), ``name``, ``args`` (after ``python``), ``env``, ``restart_env``,
    ``log``, ``cwd``, ``exit_file``; a server's also ``addr_file``, ``checkpoint_dir`` and
    ``resume``. Wrapped with ``ray.remote`` by the launcher (Ray stays an optional import)."""

    def __init__(self, spec: dict):
        import ray

        self.spec = spec
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.node = ray.util.get_node_ip_address()
        self.stopping = False
        self.endpoint: str | None = None          # a restarted server's, once it listens
        self.resumed_version: int | None = None   # the checkpoint a restarted server took
        self.resumed = False                      # ... with --resume (its checkpoint, or an
                                                  # unreadable one the server judges)
        env = dict(spec["restart_env"] if self.restarted else spec["env"])
        for name in ACCELERATOR_VARIABLES:     # this actor's, not the launcher's
            env.pop(name, None)
            if name in os.environ:
                env[name] = os.environ[name]
        if self.restarted:
            self._note(f"restarted by Ray on {self.node}")
        if spec["kind"] == "server":
            self.popen = self._start_server(env)
        else:
            self.popen = self._popen(spec["args"], env)
        threading.Thread(target=self._watch, daemon=True).start()

    def _note(self, text: str) -> None:
        with open(self.spec["log"], "a") as f:
            f.write(f"[asgd ray] {self.spec['name']}: {text}\n")

    def _popen(self, args: list[str], env: dict) -> subprocess.Popen:
        cwd = self.spec["cwd"] if os.path.isdir(self.spec["cwd"]) else None
        with open(self.spec["log"], "ab") as out:
            return subprocess.Popen([sys.executable, *args], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=cwd, preexec_fn=_die_with_parent)

    def _start_server(self, env: dict) -> subprocess.Popen:
        """The server on this node's address (loopback on a local Ray instance): the first
        time on a free port (with --resume
        when the launch resumes a run); after a restart on its old port if it can, from its
        newest checkpoint when it has one."""
        spec = self.spec
        addr_file = Path(spec["addr_file"])
        host = spec["host"] or self.node
        binds, resume = [f"tcp://{host}:0"], spec["resume"]
        if self.restarted:
            try:
                old = addr_file.read_text().strip()
            except OSError:
                old = ""
            if old.rsplit(":", 1)[0] == f"tcp://{host}":
                binds.insert(0, old)
            version, unreadable = checkpoint_state(Path(spec["checkpoint_dir"]))
            resume = version is not None or bool(unreadable)
            self.resumed_version, self.resumed = version, resume
            self._note("resuming from its checkpoint" + (f" at version {version}"
                                                         if version is not None else "")
                       if resume else "starting afresh (no checkpoint yet)")
        for bind in binds:
            addr_file.unlink(missing_ok=True)
            popen = self._popen([*spec["args"], "--bind", bind,
                                 *(["--resume"] if resume else [])], env)
            if not self.restarted:
                return popen              # the launcher waits for its address
            self.endpoint = read_address(addr_file, STARTUP_TIMEOUT_S,
                                         lambda: popen.poll() is not None)
            if self.endpoint:
                return popen
            popen.kill()
            popen.wait(10)
        raise RuntimeError(f"{spec['name']} could not be started again on {self.node}")

    def _watch(self) -> None:
        """A death the launcher did not ask for takes the actor down: Ray restarts it."""
        rc = self.popen.wait()
        if self._final(rc):
            return
        Path(self.spec["exit_file"]).write_text(json.dumps({"exit_code": rc}) + "\n")
        self._note(f"exited ({rc}): its actor exits for Ray to restart it")
        os._exit(1)

    def _final(self, rc: int) -> bool:
        return self.stopping or rc == 0 or \
            (self.spec["kind"] == "worker" and rc == self.spec.get("diverged_exit"))

    def state(self) -> dict:
        """This actor's process id (a new one after a restart), its child's exit code (None
        while it runs, and for a death the actor is about to follow); after a restart, a
        server's endpoint and the checkpoint version it resumed from."""
        rc = self.popen.poll()
        return {"pid": os.getpid(), "node": self.node, "child": self.popen.pid,
                "returncode": rc if rc is None or self._final(rc) else None,
                "restarted": self.restarted, "endpoint": self.endpoint,
                "resumed_version": self.resumed_version, "resume": self.resumed}

    def signal(self, sig: int) -> None:
        self.stopping = True
        if self.popen.poll() is None:
            self.popen.send_signal(sig)


class _ActorPopen:
    """The part of ``subprocess.Popen`` that ``asgd.launch.processes.stop`` uses."""

    def __init__(self, proc: "RayProc"):
        self.proc = proc

    @property
    def returncode(self):
        return self.proc.returncode

    def poll(self):
        return self.proc.poll()

    def send_signal(self, sig) -> None:
        ray = self.proc.ray
        try:
            ray.get(self.proc.actor.signal.remote(int(sig)), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass

    def wait(self, timeout: float | None = None):
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.05)
        raise subprocess.TimeoutExpired("ray actor " + self.proc.name, timeout)

    def kill(self) -> None:
        self.proc.kill()


class RayProc:
    """A process of the run in a Ray actor, seen as a local ``Proc``: ``poll()`` never
    blocks (one ``state`` call is kept in flight); a restart by Ray shows as a new actor
    process id and is queued in ``restarts`` as (the exit code of the death before it, the
    restarted actor's state)."""

    def __init__(self, ray, actor, name: str, log_path: Path, exit_file: Path):
        self.ray, self.actor, self.name = ray, actor, name
        self.log_path, self.exit_file = log_path, exit_file
        self.popen = _ActorPopen(self)
        self.reported = False
        self.returncode: int | None = None
        self.restarts: list[tuple[int | None, dict]] = []    # each restart by Ray
        self.node: str | None = None
        self._pid: int | None = None
        self._ref = None
        self._gone = False

    def _exit_code(self) -> int | None:
        try:
            return json.loads(self.exit_file.read_text())["exit_code"]
        except (OSError, ValueError, KeyError):
            return None

    def poll(self) -> int | None:
        if self._gone:
            return self.returncode
        if self._ref is None:
            self._ref = self.actor.state.remote()
        ready, _ = self.ray.wait([self._ref], timeout=0)
        if ready:
            ref, self._ref = self._ref, None
            try:
                st = self.ray.get(ref)
            except self.ray.exceptions.RayError:          # dead, and not to be restarted
                self._gone = True
                code = self._exit_code()
                self.returncode = code if code not in (None, 0) else 1
                return self.returncode
            if self._pid is not None and st["pid"] != self._pid:
                self.restarts.append((self._exit_code(), st))
            self._pid, self.node, self.returncode = st["pid"], st["node"], st["returncode"]
        return self.returncode

    def kill(self) -> None:
        try:
            self.ray.kill(self.actor, no_restart=True)
        except self.ray.exceptions.RayError:
            pass
        self._gone = True
        if self.returncode is None:
            self.returncode = -signal.SIGKILL

    tail = Proc.tail           # the last lines of its log (on the shared run directory)
