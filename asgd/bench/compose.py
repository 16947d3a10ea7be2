"""The compose topology (docker-compose.yml's services) on the multi-host harness: each service
in a host of its own, trained to the end, then ``asgd eval`` of the server's checkpoint.

    run = run_compose(work, env, shaping=Shaping(rate_mbit=100, loss=0.02, delay_ms=50),
                      overrides=["worker.exchange.local_steps=16"])
    run.test_accuracy, run.train_s, run.loss, run.workers

Used by tests/test_multihost.py and bench/shaped.py (see asgd.bench.netns).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from asgd.bench.netns import Shaping, Topology

REPO = Path(__file__).resolve().parents[2]
SERVER = "server"                  # the service that the workers reach


def compose_services(compose: Path | None = None) -> dict:
    """docker-compose.yml's services: name -> (argv to run here, environment, exposed ports).
    ``asgd`` becomes ``python -m asgd.cli``."""
    import shlex

    import yaml

    doc = yaml.safe_load((compose or REPO / "docker-compose.yml").read_text())
    out = {}
    for name, svc in doc["services"].items():
        argv = shlex.split(svc["command"])
        assert argv[0] == "asgd", argv
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        ports = [int(str(p).split("/")[0]) for p in svc.get("expose") or []]
        out[name] = ([sys.executable, "-m", "asgd.cli", *argv[1:]], env, ports)
    return out


@dataclass
class ComposeRun:
    test_accuracy: float
    train_s: float                 # from the server's start to the last worker's exit
    result: dict                   # asgd eval's answer
    logs: dict                     # service -> the tail of its log
    relay: str = ""                # the relay's log: its connections and totals
    loss: dict | None = None       # service -> (packets arrived, dropped), with shaping
    server: dict | None = None     # the server's last "server" record (updates, bytes, ...)
    workers: list | None = None    # the workers' "worker_done" records


def run_compose(work: Path, env: dict, shaping: Shaping | None = None,
                overrides: list[str] | tuple = (), services: dict | None = None,
                timeout_s: float = 240.0, subnet: int = 0) -> ComposeRun:
    """docker-compose.yml's services, each in a host of its own, in ``work`` (the containers'
    /app: configs copied in, runs/ and logs/ made); ``overrides`` (key=value) are appended to
    every service's command as ``--set``. With a delay in ``shaping`` the workers reach the
    server through the relay. Then ``asgd eval`` of the server's checkpoint."""
    import json
    import signal

    services = services or compose_services()
    if not (work / "configs").exists():
        shutil.copytree(REPO / "configs", work / "configs")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for f in logs.glob("*.log"):
        f.unlink()
    shutil.rmtree(work / "runs", ignore_errors=True)
    env = dict(env, PYTHONPATH=str(REPO))
    sets = [a for o in overrides for a in ("--set", o)]
    shaping = shaping or Shaping()
    relay = (SERVER, services[SERVER][2] or [5555]) \
        if shaping.delay_ms > 0 and shaping.delay_in == "stream" else None
    tails = {}
    with Topology(list(services), subnet=subnet, shaping=shaping, relay=relay,
                  relay_max_s=timeout_s + 60, relay_log=logs / "relay.log") as topo:
        started = time.monotonic()
        deadline = started + timeout_s
        procs = {}
        try:
            for name, (argv, senv, _) in services.items():
                procs[name] = topo.spawn(name, [*argv, *sets], dict(env, **senv), work,
                                         logs / f"{name}.log")
                if name == SERVER:
                    time.sleep(0.5)
            for n in (n for n in services if n != SERVER):
                rc = procs[n].wait(timeout=max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    raise RuntimeError(f"{n} exited with {rc}: "
                                       + (logs / f"{n}.log").read_text()[-3000:])
            train_s = time.monotonic() - started
            procs[SERVER].send_signal(signal.SIGTERM)      # it writes its checkpoint
            if procs[SERVER].wait(timeout=60) != 0:
                raise RuntimeError("the server failed: "
                                   + (logs / f"{SERVER}.log").read_text()[-3000:])
            loss = {n: topo.loss_counters(n) for n in services} if shaping.loss > 0 else None
        finally:
            for n in services:
                f = logs / f"{n}.log"
                tails[n] = f.read_text()[-20000:] if f.exists() else ""
    r = subprocess.run([sys.executable, "-m", "asgd.cli", "eval", "runs/compose"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"asgd eval failed: {r.stderr[-3000:]}")
    result = json.loads(r.stdout)
    relay_log = logs / "relay.log"
    records = [json.loads(line) for line in
               (work / "runs" / "compose" / "metrics.jsonl").read_text().splitlines() if line]
    server = [m for m in records if m.get("kind") == "server"]
    return ComposeRun(result["test_accuracy"], train_s, result, tails,
                      relay_log.read_text() if relay_log.exists() else "", loss,
                      server[-1] if server else None,
                      [m for m in records if m.get("kind") == "worker_done"])
