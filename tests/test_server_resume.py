"""A server killed with SIGKILL goes on from its newest good checkpoint: periodic checkpoints
(every N updates, every T seconds), the last few kept, a damaged newest one reported and the
one before it used, and the version never behind the checkpoint it resumed."""
from __future__ import annotations

import pytest

import signal
import time

import numpy as np

from asgd.core.checkpoint import FILENAME, load_checkpoint, versioned

SGD = {"optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
       "schedule": {"kind": "constant", "warmup": 0}}


def push(client, n: int, numel: int) -> int:
    out = np.empty(numel, np.float32)
    version = client.pull_flat(out)
    g = np.full(numel, 1e-3, np.float32)
    for _ in range(n):
        version = client.push_pull_flat(version, g, out)["version"]
    return version


@pytest.mark.slow
def test_sigkill_then_resume_from_the_newest_good_checkpoint(start_server, make_config,
                                                            clients, tmp_path):
    cfg = make_config(**SGD, server={"checkpoint_every": 20, "checkpoint_keep": 3,
                                     "policy": "none", "max_staleness": None})
    run_dir = tmp_path / "run"
    server = start_server(cfg, run_dir=run_dir)
    c = clients(server.endpoint, "w0")
    _, tensors = c.hello()
    numel = sum(t.array.size for t in tensors)
    pushes, every = 95, 20
    assert push(c, pushes, numel) == pushes
    # checked between batches of requests, so a checkpoint lands at 20 or more updates past
    # the one before (how many more depends on how the requests were batched): the newest
    # is less than 20 behind the last push once the server has looked after it
    deadline = time.monotonic() + 60
    while load_checkpoint(run_dir / "checkpoint").version <= pushes - every \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    server.popen.send_signal(signal.SIGKILL)
    server.popen.wait(10)
    ckpt_dir = run_dir / "checkpoint"
    names = [p.name for p in versioned(ckpt_dir)]
    kept = [int(n[len("state-"):-len(".asgd")]) for n in names]
    # the last three, newest first, at least 20 updates apart
    assert len(kept) == 3 and pushes - every < kept[0] <= pushes, kept
    assert all(a - b >= every for a, b in zip(kept, kept[1:])), kept
    assert (ckpt_dir / FILENAME).samefile(ckpt_dir / names[0])
    assert not list(ckpt_dir.glob(".*"))                                 # no temp files left
    good = load_checkpoint(ckpt_dir)
    assert good.version == kept[0]

    again = start_server(cfg, run_dir=run_dir, resume=True)
    c2 = clients(again.endpoint, "w0")
    info, _ = c2.hello()
    assert info["version"] == kept[0]               # never behind its newest checkpoint
    out = np.empty(numel, np.float32)
    c2.pull_flat(out)
    assert np.array_equal(out, good.flat.numpy())
    assert push(c2, 5, numel) == kept[0] + 5
    again.stop()

    # the newest damaged (a torn disk, say): reported, and the one before it used
    newest = versioned(ckpt_dir)[0]
    assert newest.name == f"state-{kept[0] + 5:012d}.asgd"      # written at the stop
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt_dir / FILENAME).unlink()
    newest.unlink()
    newest.write_bytes(data)
    (ckpt_dir / FILENAME).hardlink_to(newest)
    third = start_server(cfg, run_dir=run_dir, resume=True)
    c3 = clients(third.endpoint, "w0")
    assert c3.hello()[0]["version"] == kept[0]
    assert "checkpoint skipped" in third.log() and "fails its checksum" in third.log()


def test_checkpoints_every_few_seconds_when_the_version_moved(start_server, make_config,
                                                             clients, tmp_path):
    cfg = make_config(**SGD, server={"checkpoint_every_s": 0.3, "policy": "none",
                                     "max_staleness": None})
    run_dir = tmp_path / "run"
    server = start_server(cfg, run_dir=run_dir)
    c = clients(server.endpoint, "w0")
    _, tensors = c.hello()
    numel = sum(t.array.size for t in tensors)
    push(c, 3, numel)
    deadline = time.monotonic() + 60
    while not versioned(run_dir / "checkpoint") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert load_checkpoint(run_dir / "checkpoint").version == 3
    time.sleep(0.8)                        # idle: no new checkpoint for an unchanged version
    assert len(versioned(run_dir / "checkpoint")) == 1
