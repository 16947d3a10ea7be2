"""Checkpoints of a live server and what reads them: ``server.checkpoint_every`` writes one every
N updates while the server keeps serving (each loads and holds exactly the weights served at
its version), and ``asgd eval RUN_DIR`` evaluates a run's checkpoint, refusing a damaged one
with a one-line error."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from asgd.core.checkpoint import FILENAME, CheckpointError, load_checkpoint
from asgd.tasks.evaluate import evaluate_checkpoint
from tests.conftest import flat, gradients

CHECKPOINT_WAIT_S = 30.0


def push_n(client, specs, n: int, seed0: int = 0) -> int:
    """Push ``n`` gradients one after another, each from the current version; the version."""
    version, _ = client.pull()
    for k in range(n):
        reply = client.push(version, gradients(specs, seed0 + k))
        assert reply["applied"] is True and reply["version"] == version + 1, reply
        version = reply["version"]
    return version


def wait_for_checkpoint(directory: Path, version: int, server,
                        timeout_s: float = CHECKPOINT_WAIT_S):
    """Poll (bounded) until the checkpoint in ``directory`` loads at ``version``; it must never
    be seen past it."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while True:
        try:
            ckpt = load_checkpoint(directory)
        except CheckpointError:      # not written yet (written atomically: never half-seen)
            ckpt = None
        if ckpt is not None:
            seen = ckpt.version
            assert seen <= version, f"checkpoint at version {seen}, expected {version}"
            if seen == version:
                return ckpt
        assert server.popen.poll() is None, f"the server exited:\n{server.log()}"
        assert time.monotonic() < deadline, \
            (f"no checkpoint at version {version} within {timeout_s:g} s (last seen: {seen})\n"
             f"{server.log()}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# server.checkpoint_every

@pytest.mark.slow
def test_checkpoint_every_n_updates_while_serving(start_server, make_config, clients, tmp_path):
    config = make_config(server={"checkpoint_every": 5, "stats_every_s": 0.5})
    run_dir = tmp_path / "run"
    server = start_server(config, run_dir=run_dir)
    ckpt_dir = run_dir / "checkpoint"
    client = clients(server.endpoint, "w0")
    specs = client.hello(rank=0)[0]["tensors"]

    # 4 updates: below the period, no checkpoint. The server checks after each request it
    # handles, so once a later request is answered the check for version 4 has been made.
    assert push_n(client, specs, 4) == 4
    client.stats()
    assert not (ckpt_dir / FILENAME).exists()

    # Pushes are sent one at a time and the next waits for the checkpoint, so each periodic
    # checkpoint is taken at exactly a multiple of 5 (never one push later).
    seed = 4
    for target in (5, 10):
        assert push_n(client, specs, target - client.pull()[0], seed) == target
        seed += 5
        ckpt = wait_for_checkpoint(ckpt_dir, target, server)
        assert server.popen.poll() is None              # written by a server still serving
        version, weights = client.pull()
        assert version == target
        assert ckpt.flat.numpy().tobytes() == flat(weights), f"at version {target}"
        assert [s["name"] for s in ckpt.specs] == [s["name"] for s in specs]
        assert ckpt.config["server"]["checkpoint_every"] == 5
        assert ckpt.optimizer_tensors, "adam's state is in the checkpoint"

    # 2 more (12 in all): fewer than 5 since the last checkpoint, so it stays at version 10
    assert push_n(client, specs, 2, seed) == 12
    client.stats()
    assert load_checkpoint(ckpt_dir).version == 10
    _, weights_12 = client.pull()
    client.close()

    # shutting down still writes the final state
    assert server.stop(signal.SIGTERM) == 0, server.log()
    final = load_checkpoint(ckpt_dir)
    assert final.version == 12
    assert final.flat.numpy().tobytes() == flat(weights_12)
    assert not list(ckpt_dir.glob(".*.tmp")), "a temporary checkpoint file was left behind"


# ----------------------------------------------------------------------------------------------
# asgd eval

PUSHES = 3


@pytest.fixture
def finished_run(start_server, make_config, clients, tmp_path):
    """A run directory left by a real server: PUSHES updates, then SIGTERM (checkpoint)."""
    run_dir = tmp_path / "run"
    server = start_server(make_config(), run_dir=run_dir)
    client = clients(server.endpoint, "w0")
    specs = client.hello(rank=0)[0]["tensors"]
    assert push_n(client, specs, PUSHES) == PUSHES
    client.close()
    assert server.stop(signal.SIGTERM) == 0, server.log()
    assert (run_dir / "checkpoint" / FILENAME).exists(), server.log()
    return run_dir


@pytest.mark.slow
def test_asgd_eval_prints_the_checkpoints_evaluation(processes, finished_run):
    result = processes.run(["-m", "asgd.cli", "eval", str(finished_run)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)                          # the whole of stdout is JSON
    assert set(out) >= {"test_accuracy", "test_loss", "version", "test_samples"}, out
    assert isinstance(out["test_accuracy"], float) and 0.0 <= out["test_accuracy"] <= 1.0
    assert out["version"] == PUSHES
    assert out["test_samples"] > 0
    assert out["test_loss"] is not None and out["test_loss"] > 0
    # the same evaluation as in this process, with the config stored in the checkpoint
    here = evaluate_checkpoint(finished_run)
    assert out["test_accuracy"] == here["test_accuracy"]
    assert out["test_samples"] == here["test_samples"]
    assert out["test_loss"] == pytest.approx(here["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_asgd_eval_refuses_a_damaged_checkpoint_in_one_line(processes, finished_run):
    path = finished_run / "checkpoint" / FILENAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                             # one byte, in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path.parent)

    result = processes.run(["-m", "asgd.cli", "eval", str(finished_run)], timeout=60)
    assert result.returncode != 0
    assert result.stdout == "", result.stdout                # no JSON for a damaged file
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "damaged" in lines[0] and FILENAME in lines[0], lines[0]
    assert "Traceback" not in result.stderr
