"""A worker rides out a server restart: it reconnects with back-off and trains on."""
from __future__ import annotations

import time

import pytest


def wait_for_line(path, text: str, popen, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until ``text`` shows up in the log at ``path``."""
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        assert popen.poll() is None, path.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in {timeout_s:g} s:\n" \
                                            f"{path.read_text()}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("resume", [True, False])
def test_worker_survives_a_server_restart(resume, start_server, make_config, processes,
                                          clients, tmp_path):
    config = make_config(worker={"reconnect_timeout_s": 60, "request_timeout_s": 2,
                                 "max_steps": 100000},
                         run={"workers": 1, "max_updates": 0, "max_seconds": 0})
    run_dir = tmp_path / "run"
    server = start_server(config, run_dir=run_dir)
    worker = processes.spawn(["-m", "worker", "--config", str(config), "--server",
                              server.endpoint, "--run-dir", str(run_dir)],
                             tmp_path / "worker.log")
    monitor = clients(server.endpoint, worker="monitor")
    deadline = time.monotonic() + 60
    while monitor.stats()["version"] < 30:
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.1)
    assert server.stop() == 0
    monitor.close()
    # the worker's request times out, and it says it is waiting for the server
    wait_for_line(tmp_path / "worker.log", f"waiting for the server at {server.endpoint}",
                  worker)
    assert worker.poll() is None, "the worker gave up while the server was away"
    # the new server comes back on the same port (the first one was given it by the system)
    server2 = start_server(config, "--bind", server.endpoint, run_dir=run_dir, resume=resume)
    monitor2 = clients(server2.endpoint, worker="monitor2")
    start = monitor2.stats()["version"]
    if resume:
        assert start >= 30                          # the checkpoint's version
    deadline = time.monotonic() + 60
    while monitor2.stats()["version"] < start + 30:
        assert time.monotonic() < deadline, (
            f"the worker did not resume training:\n{(tmp_path / 'worker.log').read_text()}")
        time.sleep(0.1)
    assert monitor2.stats()["workers"]["w0"]["pushes"] >= 30
    assert worker.poll() is None
    worker.terminate()
    assert worker.wait(timeout=30) == 0
