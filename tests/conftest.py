"""Shared fixtures: a session data cache, small configs, and real processes on loopback.

    def test_x(start_server, make_config, clients):
        server = start_server(make_config(optimizer={"name": "sgd", "lr": 0.1}))
        client = clients(server.endpoint)
        version, weights = client.pull()

Every child process runs in the test's temporary folder, with OMP_NUM_THREADS=1 and $ASGD_CACHE
pointing at one session folder, so MNIST-1D is generated once for the whole suite. Every wait is bounded; at teardown each child
still alive is sent SIGTERM, then SIGKILL if it does not exit. Sockets use linger 0.
"""
from __future__ import annotations

import copy
import itertools
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
import zmq

from asgd.core import protocol
from asgd.launch import processes as proclib

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"

# Bounds, not budgets: generous, because on a busy two-core machine a child's start alone
# (python, torch, the data set) can take a minute; a test that passes never waits them out.
STARTUP_TIMEOUT_S = 180.0    # a child imports torch and loads the data set before listening
STOP_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0
RUN_TIMEOUT_MIN_S = 180.0    # the least a child run to its end is given (Processes.run)

torch.set_num_threads(1)     # two cores, shared with the children the tests start


# Ctrl-C's default action for this run and the processes it starts, even where the run was
# started with SIGINT ignored (a background job of a shell without job control passes that on
# through exec): the tests that send SIGINT to a launcher need its handler installed.
signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------------------------
# environment

@pytest.fixture(scope="session", autouse=True)
def asgd_cache(tmp_path_factory):
    """$ASGD_CACHE for this process and every child: data sets are generated once."""
    cache = tmp_path_factory.mktemp("asgd-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ASGD_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def mnist1d_cached(asgd_cache):
    """Generate MNIST-1D into the session cache before any child needs it."""
    from asgd.tasks.data import mnist1d

    ds = mnist1d()
    assert list(asgd_cache.glob("mnist1d-*.npz")), "mnist1d() did not write its cache file"
    return ds


@pytest.fixture
def child_env(asgd_cache):
    # the project's root on the children's path, so that a config may name the test plugins
    # (tests.plugins.custom:tiny_linear) whatever folder the child runs in
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                ASGD_CACHE=str(asgd_cache), PYTHONPATH=path)


# ----------------------------------------------------------------------------------------------
# configs

# Small and quick: a narrow CNN on MNIST-1D. Tests override what they need.
TEST_CONFIG = {
    "model": {"name": "cnn1d", "args": {"channels": 8}},
    "data": {"name": "mnist1d"},
    "optimizer": {"name": "adam", "lr": 0.01},
    "server": {"stats_every_s": 0.5, "policy": "none", "max_staleness": None},
    "worker": {"batch_size": 50, "batch_split": False, "threads": 1},   # whole batches
    "run": {"workers": 2, "max_seconds": 600},     # a bound only: runs end on their budgets
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture
def make_config(tmp_path):
    """Write TEST_CONFIG merged with the given sections to a YAML file; returns its path."""
    from asgd.config import load_config

    counter = itertools.count()

    def make(**sections) -> Path:
        path = tmp_path / f"config-{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(_merge(TEST_CONFIG, sections)))
        load_config(path)  # a mistake in a test's config fails here, not in a child
        return path

    return make


# ----------------------------------------------------------------------------------------------
# processes

class Processes:
    """Children of one test, started through asgd.launch.processes in the test's temporary
    folder; ``cleanup`` terminates, then kills, whatever is still running."""

    def __init__(self, env: dict, cwd: Path):
        self.env, self.cwd = env, cwd
        self.procs: list[proclib.Proc] = []
        self.popens: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log_path: Path, cwd=None) -> subprocess.Popen:
        proc = proclib.spawn(Path(log_path).stem, args, log_path, self.env,
                               cwd=cwd or self.cwd, new_session=False)
        self.procs.append(proc)
        self.popens.append(proc.popen)
        return proc.popen

    def run(self, args: list[str], timeout: float, cwd=None) -> subprocess.CompletedProcess:
        """Run a child to completion, bounded by ``timeout`` but never less than
        RUN_TIMEOUT_MIN_S; AssertionError with its output if it hangs."""
        try:
            return proclib.run_to_end(args, max(timeout, RUN_TIMEOUT_MIN_S), self.env,
                                      cwd or self.cwd,
                                        on_start=self.popens.append)
        except proclib.ProcessError as e:
            raise AssertionError(str(e)) from None

    def cleanup(self) -> None:
        for p in self.popens:
            if p.poll() is None:
                p.terminate()
        for p in self.popens:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


@pytest.fixture
def processes(child_env, tmp_path):
    procs = Processes(child_env, tmp_path)
    yield procs
    procs.cleanup()


@dataclass
class ServerHandle:
    popen: subprocess.Popen
    endpoint: str
    run_dir: Path
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait (bounded) for the exit code."""
        self.popen.send_signal(sig)
        return self.popen.wait(timeout=timeout)


def wait_for_address(path: Path, popen: subprocess.Popen, log_path: Path) -> str:
    try:
        return proclib.wait_for_address(path, proclib.Proc("server", popen, log_path),
                                          STARTUP_TIMEOUT_S)
    except proclib.ProcessError as e:
        raise AssertionError(str(e)) from None


@pytest.fixture
def start_server(tmp_path, processes, mnist1d_cached):
    """start(config, *extra_args, run_dir=None, resume=False) -> ServerHandle, listening on a
    free loopback port (``--bind tcp://127.0.0.1:0``) announced through ``--address-file``."""
    counter = itertools.count()

    def start(config: Path, *extra: str, run_dir: Path | None = None,
              resume: bool = False, bind: str = "tcp://127.0.0.1:0") -> ServerHandle:
        k = next(counter)
        run_dir = Path(run_dir) if run_dir else tmp_path / f"server-{k}"
        addr = tmp_path / f"server-{k}.addr"
        log_path = tmp_path / f"server-{k}.log"
        args = ["-m", "server", "--config", str(config), "--bind", bind,
                "--run-dir", str(run_dir), "--address-file", str(addr), *extra]
        if resume:
            args.append("--resume")
        popen = processes.spawn(args, log_path)
        endpoint = wait_for_address(addr, popen, log_path)
        if bind.startswith("tcp://127.0.0.1:"):
            assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
        return ServerHandle(popen, endpoint, run_dir, log_path)

    return start


# ----------------------------------------------------------------------------------------------
# sockets

@pytest.fixture
def clients():
    """clients(endpoint, worker="t0") -> worker.client.Client, closed at teardown."""
    from asgd.client import Client

    made = []

    def make(endpoint: str, worker: str = "t0", timeout_s: float = REPLY_TIMEOUT_S) -> Client:
        c = Client(endpoint, worker, timeout_s=timeout_s)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class RawPeer:
    """A bare DEALER socket: sends any frames, receives one reply under a poll timeout."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def exchange(self, frames: list, timeout_s: float = REPLY_TIMEOUT_S):
        """Send ``frames``; the reply as (header, tensors)."""
        self.sock.send_multipart(frames)
        assert self.sock.poll(int(timeout_s * 1000), zmq.POLLIN), \
            f"no reply within {timeout_s:g} s"
        return protocol.decode(self.sock.recv_multipart())

    def close(self):
        self.sock.close(0)


@pytest.fixture
def raw_peer():
    made = []

    def make(endpoint: str) -> RawPeer:
        p = RawPeer(endpoint)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# ----------------------------------------------------------------------------------------------
# the server's update path without a socket

_controls: dict = {}


def apply_push(store, grads, base_version: int):
    """Apply one gradient to ``store`` as the server's asynchronous path does (its policy,
    then an optimizer step); one StalenessControl per store. ``grads``: the flat gradient,
    or arrays in layout order (concatenated here, as a per-parameter push is by the core)."""
    import numpy as np
    import torch

    from server.staleness import StalenessControl

    if not isinstance(grads, torch.Tensor):
        grads = torch.from_numpy(np.concatenate([np.asarray(g, np.float32).reshape(-1)
                                                 for g in grads]))

    control = _controls.get(id(store))
    if control is None or control.store is not store:
        control = _controls[id(store)] = StalenessControl(store)
    return control.apply(grads, base_version)


# ----------------------------------------------------------------------------------------------
# made-up gradients and weights as bytes

def gradients(specs, seed: int, scale: float = 0.1) -> list[tuple[str, "np.ndarray"]]:
    """A seeded gradient for each tensor of a parameter list (wire specs)."""
    import numpy as np

    g = np.random.default_rng(seed)
    return [(s["name"], (scale * g.standard_normal(s["shape"])).astype(np.float32))
            for s in specs]


def flat(tensors) -> bytes:
    """Decoded tensors' bytes, concatenated (for bitwise comparisons)."""
    return b"".join(t.array.tobytes() for t in tensors)


# ----------------------------------------------------------------------------------------------
# a run trained in this process

def train_run(run_dir: Path, cfg, steps: int) -> Path:
    """Train ``cfg``'s task in this process for ``steps`` steps (its optimizer and schedule,
    rank 0's shard) and leave what a launch leaves for evaluation and export: config.yaml and
    a checkpoint of the trainable parameters."""
    import torch.nn.functional as F

    from asgd.config import save_config
    from asgd.core.checkpoint import write_checkpoint
    from asgd.core.layout import trainable_parameters
    from asgd.core.optim import make_optimizer, scheduled_lr
    from asgd.tasks.data import ShardLoader
    from asgd.tasks.task import build_task

    task = build_task(cfg)
    loader = ShardLoader.for_config(cfg, task.dataset, 0, 1)
    opt = make_optimizer(cfg, trainable_parameters(task.model))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = scheduled_lr(cfg, step)
        x, y = loader.next()
        loss = F.cross_entropy(task.model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    write_checkpoint(run_dir / "checkpoint", steps, task.layout,
                     task.layout.flatten(trainable_parameters(task.model)), cfg.to_dict(),
                     cfg.optimizer.name)
    return run_dir
