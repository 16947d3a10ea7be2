"""Settings that say who owns them, with real processes: a worker whose update rule is not the
server's (local steps on one side and not on the other) stops before its first push with one
clear error and exit code 2, and the server's version and weights are as they were."""
from __future__ import annotations

import pytest

from conftest import flat

WORKER_TIMEOUT_S = 120


@pytest.mark.parametrize("server_steps, worker_steps", [(4, 1), (1, 4)])
def test_a_worker_with_another_update_rule_is_refused_and_changes_nothing(
        start_server, make_config, clients, processes, server_steps, worker_steps):
    server = start_server(make_config(worker={"local_steps": server_steps}))
    observer = clients(server.endpoint, "observer")
    version, weights = observer.pull()
    before = flat(weights)

    worker_cfg = make_config(worker={"local_steps": worker_steps},
                             run={"max_updates": 20, "max_seconds": 60})
    res = processes.run(["-m", "worker", "--config", str(worker_cfg), "--server",
                         server.endpoint, "--rank", "0"], timeout=WORKER_TIMEOUT_S)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "refused this worker" in out and "local_steps differs" in out
    assert f"this worker has {worker_steps}, the server {server_steps}" in out
    assert "Traceback" not in out

    stats = observer.stats()
    assert stats["version"] == version == 0 and stats["updates_applied"] == 0
    assert "w0" not in stats["workers"]          # refused before any record was made
    assert flat(observer.pull()[1]) == before


def test_the_hello_reply_says_the_servers_update_rule(start_server, make_config, clients):
    server = start_server(make_config(worker={"local_steps": 8},
                                      server={"outer_optimizer": "sgd", "outer_lr": 0.3}))
    info, _ = clients(server.endpoint).hello()
    assert info["config"]["local_steps"] == 8
    assert info["config"]["outer"] == {"optimizer": "sgd", "lr": 0.3, "momentum": 0.9,
                                       "nesterov": True}
