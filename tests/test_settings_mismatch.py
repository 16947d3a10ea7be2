"""Settings that say who owns them, with real processes: a worker whose update rule is not the
server's (local steps on one side and not on the other) stops before its first push with one
clear error and exit code 2, and the server's version and weights are as they were."""
from __future__ import annotations

import pytest

from conftest import flat

WORKER_TIMEOUT_S = 120


@pytest.mark.slow
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


def test_the_worker_checks_the_rule_a_server_reports_and_skips_it_where_none_is():
    """A server that reports local_steps without comparing them (or a reply that got past the
    server's check) is refused by the worker; an older server's reply, without the key, is
    not checked."""
    from types import SimpleNamespace

    from asgd.core.layout import ParameterLayout
    from worker.train import Worker, WorkerError

    layout = ParameterLayout.from_specs([{"name": "w", "dtype": "float32", "shape": [2]}])
    me = SimpleNamespace(layout=layout, id="w0", local_steps=1)
    info = {"tensors": layout.to_specs(), "config": {"local_steps": 4}}
    with pytest.raises(WorkerError, match="worker.exchange.local_steps is 1, the server's local_steps 4"):
        Worker._check_layout(me, info)
    Worker._check_layout(me, dict(info, config={"local_steps": 1}))
    Worker._check_layout(me, dict(info, config={"max_updates": 10}))     # an older server
