"""TensorBoard event files: the TFRecord framing and the Event encoding read back, and a short
real `asgd launch` with run.tensorboard: true writing the run's scalars beside metrics.jsonl."""
from __future__ import annotations

import json
import math
import struct

import pytest

from asgd.metrics import read_metrics
from asgd.tensorboard import (EventWriter, crc32c, decode_event, encode_event, masked_crc,
                              read_events, read_scalars)


def test_crc32c_reference_values():
    # the check value of CRC-32C (RFC 3720, B.4) and iSCSI's 32 zero bytes
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert masked_crc(b"") == (((0 >> 15) | (0 << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_events_round_trip_and_framing(tmp_path):
    w = EventWriter(tmp_path)
    w.scalars({"train/loss/w0": 0.5, "eval/accuracy": 0.25}, step=7, wall_time=1000.5)
    w.scalar("skipped", float("nan"), step=8)          # not finite: not written
    w.scalar("neg", -1.0, step=2**40)
    w.close()
    assert w.path.name.startswith("events.out.tfevents.")
    events = read_events(w.path)
    assert events[0]["file_version"] == "brain.Event:2" and not events[0]["scalars"]
    assert events[1] == {"wall_time": 1000.5, "step": 7, "file_version": None,
                         "scalars": {"train/loss/w0": 0.5, "eval/accuracy": 0.25}}
    assert events[2]["step"] == 2**40 and events[2]["scalars"] == {"neg": -1.0}
    assert len(events) == 3

    blob = w.path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert struct.unpack("<I", blob[8:12])[0] == masked_crc(blob[:8])
    assert struct.unpack("<I", blob[12 + n:16 + n])[0] == masked_crc(blob[12:12 + n])
    # a torn last record (a writer still running) is left out; a damaged one is refused
    w.path.write_bytes(blob[:-3])
    assert len(read_events(w.path)) == 2
    bad = bytearray(blob)
    bad[20] ^= 0xFF
    w.path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="CRC"):
        read_events(w.path)


def test_event_encoding_is_protobuf():
    # Event{wall_time: 1.0, step: 3, summary{value{tag: "a", simple_value: 2.0}}}, by hand
    expected = (b"\x09" + struct.pack("<d", 1.0) + b"\x10\x03" +
                b"\x2a\x0a" + b"\x0a\x08" + b"\x0a\x01a" + b"\x15" + struct.pack("<f", 2.0))
    assert encode_event(1.0, 3, {"a": 2.0}) == expected
    assert decode_event(expected)["scalars"] == {"a": 2.0}


def test_launch_writes_readable_scalars(processes, tmp_path, make_config, mnist1d_cached):
    out = tmp_path / "runs"
    config = make_config(run={"tensorboard": True, "max_updates": 200, "eval_every_s": 0.5,
                              "out_dir": str(out)},
                         worker={"log_every": 10})
    res = processes.run(["-m", "asgd.cli", "launch", "--config", str(config), "--quiet"],
                        timeout=100, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files

    scalars = read_scalars(run_dir / "tensorboard")
    tags = set(scalars)
    assert {"train/loss/w0", "train/loss/w1", "train/samples_per_s/w0", "server/staleness_mean",
            "server/lr", "eval/accuracy", "eval/final_accuracy"} <= tags, tags
    for tag, points in scalars.items():
        assert points and all(math.isfinite(v) for _, v in points), tag
    # the same figures as metrics.jsonl (float32 in the event file)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "worker_step" and r["worker"] == "w0"]
    assert [s for s, _ in scalars["train/loss/w0"]] == [r["step"] for r in steps]
    assert scalars["train/loss/w0"][-1][1] == pytest.approx(steps[-1]["loss"], rel=1e-6)
    (final,) = scalars["eval/final_accuracy"]
    assert final[1] == pytest.approx(summary["test_accuracy"], rel=1e-6)
    assert all(v > 0 for _, v in scalars["server/lr"])


def test_tensorboard_is_off_by_default(tmp_path):
    from asgd.config import load_config

    assert load_config(None).run.tensorboard is False
