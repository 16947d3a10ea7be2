"""TensorBoard event files without TensorBoard: a run's scalars beside its metrics.jsonl.

    w = EventWriter("runs/x/tensorboard")            # events.out.tfevents.<time>.<host>.<pid>.asgd
    w.scalar("train/loss/w0", 0.41, step=10, wall_time=time.time()); w.close()
    for event in read_events(path): event["scalars"], event["step"]   # what was written

    tail = MetricsToTensorBoard(cfg, run_dir, t0)    # asgd launch, with run.tensorboard: true
    tail.update()                                    # the records added to metrics.jsonl since
    tail.close()

Why hand-written: the ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) brings
protobuf, grpcio, werkzeug and more; writing scalars takes a few dozen lines instead, so
``run.tensorboard`` works with the default install and ``pip install tensorboard`` is needed
only to look at the files. The format is TensorFlow's TFRecord: each record is

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian), and each ``data`` an ``Event`` protocol buffer. Only the fields a scalar needs
are encoded (field numbers from tensorflow/core/util/event.proto and summary.proto):

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The first event of a file carries ``file_version: "brain.Event:2"`` and nothing else, as
TensorFlow's writer does.
"""
from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path

from asgd.metrics import MetricsTail

# ----------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), masked as TFRecord wants it

def _crc_table() -> list[int]:
    poly, table = 0x82F63B78, []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
    crc, table = 0xFFFFFFFF, _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: the length, its masked CRC, the data, its masked CRC."""
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data))


# ----------------------------------------------------------------------------------------------
# the few protocol-buffer fields of an Event

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1            # int64: a negative step is ten bytes of two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def encode_event(wall_time: float, step: int = 0, scalars: dict | None = None,
                 file_version: str | None = None) -> bytes:
    """An ``Event`` message: a wall time, a step, and either a file version or scalars."""
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", v))
            for tag, v in scalars.items())
        out += _bytes_field(5, summary)
    return out


def _fields(data: bytes):
    """(field number, wire type, value) of a message: ints for varints, bytes for
    length-delimited fields, raw 4 or 8 bytes for fixed ones."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protocol-buffer wire type {wire}")
        yield field, wire, value


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def decode_event(data: bytes) -> dict:
    """An ``Event``'s wall time, step, file version and scalars (``{tag: value}``)."""
    event = {"wall_time": 0.0, "step": 0, "file_version": None, "scalars": {}}
    for field, wire, value in _fields(data):
        if field == 1 and wire == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2 and wire == 0:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3 and wire == 2:
            event["file_version"] = value.decode()
        elif field == 5 and wire == 2:
            for f, w, v in _fields(value):
                if f != 1 or w != 2:
                    continue
                tag, simple = None, None
                for vf, vw, vv in _fields(v):
                    if vf == 1 and vw == 2:
                        tag = vv.decode()
                    elif vf == 2 and vw == 5:
                        simple = struct.unpack("<f", vv)[0]
                if tag is not None and simple is not None:
                    event["scalars"][tag] = simple
    return event


def read_records(path: str | Path):
    """The data of each whole record of a TFRecord file; ValueError on a CRC mismatch (a
    torn last record, from a writer still running, ends the iteration quietly)."""
    with open(path, "rb") as f:
        blob = f.read()
    pos = 0
    while pos + 12 <= len(blob):
        head = blob[pos:pos + 8]
        (n,), (crc,) = struct.unpack("<Q", head), struct.unpack("<I", blob[pos + 8:pos + 12])
        if crc != masked_crc(head):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        if pos + 16 + n > len(blob):
            return
        data = blob[pos + 12:pos + 12 + n]
        if struct.unpack("<I", blob[pos + 12 + n:pos + 16 + n])[0] != masked_crc(data):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        yield data
        pos += 16 + n


def read_events(path: str | Path) -> list[dict]:
    return [decode_event(d) for d in read_records(path)]


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under ``logdir``: ``{tag: [(step, value), ...]}``."""
    out: dict[str, list] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for event in read_events(path):
            for tag, v in event["scalars"].items():
                out.setdefault(tag, []).append((event["step"], v))
    return out


# ----------------------------------------------------------------------------------------------
# the writer

class EventWriter:
    """Appends scalar events to a new event file in ``logdir`` (made if missing). Each
    ``scalar`` is written at once (one ``write`` of a whole record, no buffering), so a
    TensorBoard watching the folder sees the run live and a kill leaves whole records."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.asgd")
        self.path = self.logdir / name
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._write(encode_event(time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        record = frame_record(data)
        while record:
            record = record[os.write(self._fd, record):]

    def scalars(self, values: dict, step: int, wall_time: float | None = None) -> None:
        """Several scalars at one step, in one event; values that are not finite are left
        out (TensorBoard plots them badly, and JSON records hold them as null)."""
        values = {t: float(v) for t, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)}
        if values and self._fd is not None:
            self._write(encode_event(time.time() if wall_time is None else wall_time, step,
                                     values))

    def scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        self.scalars({tag: value}, step, wall_time)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------------------------
# metrics.jsonl -> scalars

# a worker_step record's own figures, as train/<key>/<worker>
TRAIN_KEYS = ("loss", "samples_per_s", "staleness", "compute_ms", "exchange_ms")
# its bookkeeping: not scalars (samples is the running total, shown as samples_per_s)
NOT_SCALARS = {"kind", "t", "worker", "rank", "step", "version", "samples"}


def worker_scalars(rec: dict) -> dict:
    """A ``worker_step`` record's scalars by tag: the worker's own figures under ``train/``,
    any other number (a script's ``opt.log(val_loss=...)``) under its own name; strings and
    booleans are not scalars."""
    w = rec.get("worker", "w?")
    out = {f"train/{k}/{w}": rec.get(k) for k in TRAIN_KEYS[:3]}
    for k, v in rec.items():
        if k in NOT_SCALARS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[f"train/{k}/{w}" if k in TRAIN_KEYS else f"{k}/{w}"] = v
    return out


class MetricsToTensorBoard:
    """Follows a run's metrics.jsonl from byte ``start`` on and writes its scalars to
    ``<run_dir>/tensorboard/``:

    - ``worker_step``: ``train/loss/<worker>``, ``train/samples_per_s/<worker>``,
      ``train/staleness/<worker>`` (and the built-in worker's ``compute_ms``, ``exchange_ms``),
      and every other number a script logs with ``opt.log(...)`` under its own name
      (``opt.log(val_loss=...)``: ``val_loss/<worker>``), at the worker's step;
    - ``server``: ``server/staleness_mean``, ``server/updates_dropped`` and ``server/lr`` (the
      schedule's rate at that version), at the server's version (``.../shard<i>`` per shard);
    - ``eval``: ``eval/accuracy`` and ``eval/loss`` at the version evaluated, the final one
      also as ``eval/final_accuracy`` and ``eval/final_loss``.

    Wall times are the records' own (``t0`` + ``t``)."""

    def __init__(self, cfg, run_dir: str | Path, t0: float, start: int = 0):
        self.cfg, self.t0 = cfg, t0
        self.writer = EventWriter(Path(run_dir) / "tensorboard")
        self.tail = MetricsTail(Path(run_dir) / "metrics.jsonl", start)

    def update(self) -> None:
        for rec in self.tail.read():
            self.record(rec)

    def record(self, rec: dict) -> None:
        kind, wall = rec.get("kind"), self.t0 + float(rec.get("t") or 0.0)
        if kind == "worker_step":
            self.writer.scalars(worker_scalars(rec), int(rec.get("step") or 0), wall)
        elif kind == "server":
            sfx = f"/shard{rec['shard']}" if rec.get("shard") is not None else ""
            version = int(rec.get("version") or 0)
            self.writer.scalars({f"server/staleness_mean{sfx}": rec.get("staleness_mean"),
                                 f"server/updates_dropped{sfx}": rec.get("updates_dropped"),
                                 f"server/lr{sfx}": self._lr(version)}, version, wall)
        elif kind == "eval":
            values = {"eval/accuracy": rec.get("accuracy"), "eval/loss": rec.get("loss")}
            if rec.get("final"):
                values.update({"eval/final_accuracy": rec.get("accuracy"),
                               "eval/final_loss": rec.get("loss")})
            self.writer.scalars(values, int(rec.get("version") or 0), wall)

    def _lr(self, version: int) -> float | None:
        try:
            from asgd.core.optim import server_lr

            return server_lr(self.cfg, version)
        except Exception:        # a schedule this cannot compute: the scalar is left out
            return None

    def close(self) -> None:
        self.update()
        self.writer.close()
