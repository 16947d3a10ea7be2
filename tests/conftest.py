"""Shared fixtures: a session data cache, small configs, and real processes on loopback.

    def test_x(start_server, make_config, clients):
        server = start_server(make_config(optimizer={"name": "sgd", "lr": 0.1}))
        client = clients(server.endpoint)
        version, weights = client.pull()

Every child process gets OMP_NUM_THREADS=1 and $ASGD_CACHE pointing at one session folder, so
MNIST-1D is generated once for the whole suite. Every wait is bounded; at teardown each child
still alive is sent SIGTERM, then SIGKILL if it does not exit. Sockets use linger 0.
"""
from __future__ import annotations

import copy
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
import zmq

from asgd import protocol

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"

STARTUP_TIMEOUT_S = 60.0     # a child imports torch and loads the data set before listening
STOP_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 10.0

torch.set_num_threads(1)     # two cores, shared with the children the tests start


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
    from asgd.data import mnist1d

    ds = mnist1d()
    assert list(asgd_cache.glob("mnist1d-*.npz")), "mnist1d() did not write its cache file"
    return ds


@pytest.fixture
def child_env(asgd_cache):
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                ASGD_CACHE=str(asgd_cache))


# ----------------------------------------------------------------------------------------------
# configs

# Small and quick: a narrow CNN on MNIST-1D. Tests override what they need.
TEST_CONFIG = {
    "model": {"name": "cnn1d", "args": {"channels": 8}},
    "data": {"name": "mnist1d"},
    "optimizer": {"name": "adam", "lr": 0.01},
    "server": {"stats_every_s": 0.5},
    "worker": {"batch_size": 50, "threads": 1},
    "run": {"workers": 2, "max_seconds": 60},
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
    """Children of one test; ``cleanup`` terminates, then kills, whatever is still running."""

    def __init__(self, env: dict):
        self.env = env
        self.popens: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log_path: Path, cwd=None) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            popen = subprocess.Popen([sys.executable, *args], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=cwd or REPO)
        self.popens.append(popen)
        return popen

    def run(self, args: list[str], timeout: float, cwd=None) -> subprocess.CompletedProcess:
        """Run a child to completion. One that outlives ``timeout`` gets SIGTERM first (a
        launcher then stops its own children), SIGKILL if that does not end it."""
        popen = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                 env=self.env, cwd=cwd or REPO)
        self.popens.append(popen)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.terminate()
            try:
                out, err = popen.communicate(timeout=25)
            except subprocess.TimeoutExpired:
                popen.kill()
                out, err = popen.communicate(timeout=10)
            raise AssertionError(f"{args} did not finish within {timeout:g} s\n"
                                 f"stdout:\n{out}\nstderr:\n{err}") from None
        return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)

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
def processes(child_env):
    procs = Processes(child_env)
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
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return text
        if popen.poll() is not None:
            raise AssertionError(f"server exited at start-up with {popen.returncode}:\n"
                                 f"{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    raise AssertionError(f"server did not write {path} within {STARTUP_TIMEOUT_S:g} s:\n"
                         f"{log_path.read_text(errors='replace')}")


@pytest.fixture
def start_server(tmp_path, processes, mnist1d_cached):
    """start(config, *extra_args, run_dir=None, resume=False) -> ServerHandle, listening on a
    free loopback port (``--bind tcp://127.0.0.1:0``) announced through ``--address-file``."""
    counter = itertools.count()

    def start(config: Path, *extra: str, run_dir: Path | None = None,
              resume: bool = False) -> ServerHandle:
        k = next(counter)
        run_dir = Path(run_dir) if run_dir else tmp_path / f"server-{k}"
        addr = tmp_path / f"server-{k}.addr"
        log_path = tmp_path / f"server-{k}.log"
        args = ["-m", "server", "--config", str(config), "--bind", "tcp://127.0.0.1:0",
                "--run-dir", str(run_dir), "--address-file", str(addr), *extra]
        if resume:
            args.append("--resume")
        popen = processes.spawn(args, log_path)
        endpoint = wait_for_address(addr, popen, log_path)
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
        return ServerHandle(popen, endpoint, run_dir, log_path)

    return start


# ----------------------------------------------------------------------------------------------
# sockets

@pytest.fixture
def clients():
    """clients(endpoint, worker="t0") -> worker.client.Client, closed at teardown."""
    from worker.client import Client

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
