"""The compose topology across network namespaces: each service of docker-compose.yml (its
command and environment, read from the file) runs in a host of its own, the hosts joined by a
bridge, the workers reaching the server by its service name over real TCP; the default run
trains to the accuracy bar. Skipped, with the reason, where namespaces cannot be made."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import multihost

REPO = Path(__file__).resolve().parents[1]
WHY_NOT = multihost.available()

pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "")


def compose_services() -> dict[str, tuple[list[str], dict[str, str]]]:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    out = {}
    for name, svc in doc["services"].items():
        argv = shlex.split(svc["command"])
        assert argv[0] == "asgd"
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        out[name] = ([sys.executable, "-m", "asgd.cli", *argv[1:]], env)
    return out


@pytest.mark.timeout(300)
def test_the_compose_topology_trains_across_hosts(tmp_path, child_env, mnist1d_cached):
    services = compose_services()
    work = tmp_path / "app"                         # the containers' /app
    shutil.copytree(REPO / "configs", work / "configs")
    (work / "logs").mkdir()
    with multihost.Topology(list(services)) as topo:
        started = time.monotonic()
        procs = {}
        for name, (argv, env) in services.items():
            procs[name] = topo.spawn(name, argv, dict(child_env, **env,
                                                       PYTHONPATH=str(REPO)),
                                     work, work / "logs" / f"{name}.log")
            if name == "server":
                time.sleep(0.5)
        workers = [n for n in services if n != "server"]
        for n in workers:
            rc = procs[n].wait(timeout=240)
            assert rc == 0, (work / "logs" / f"{n}.log").read_text()[-3000:]
        train_s = time.monotonic() - started
        procs["server"].send_signal(signal.SIGTERM)      # it writes its checkpoint
        assert procs["server"].wait(timeout=60) == 0
    log = (work / "logs" / "worker-0.log").read_text()
    assert "tcp://server:5555" in log                   # by service name, across hosts
    r = subprocess.run([sys.executable, "-m", "asgd.cli", "eval", "runs/compose"], cwd=work,
                       env=dict(child_env, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    print(f"compose topology across hosts: {result['test_accuracy']:.3f} in {train_s:.1f} s")
    assert result["test_accuracy"] >= 0.93, (result, train_s)
