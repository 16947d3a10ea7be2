"""The checkpoint file: the server's weights, optimizer state, version and config in one file.

    write_checkpoint(directory, version, layout, flat, config, optimizer)  # atomic
    ckpt = load_checkpoint("runs/x/checkpoint")     # verified: checksums, shapes, finite values
    ckpt.weights()                                   # name -> tensor
    ckpt = load_checkpoint("runs/x/checkpoint")     # a sharded server's: shard-0/, shard-1/, ...
                                                     # assembled into the whole model's weights

The server writes it from its parameter store (``server.checkpoint``); anything may read it
(``asgd eval``, the launcher's final evaluation, ``asgd server --resume``).

Each checkpoint is a file ``state-<version>.asgd``; ``state.asgd`` is a hard link to the
newest, and the last ``keep`` are kept. Loading takes the newest that passes every check: a
damaged newest one is reported (``Checkpoint.skipped``, and the log) and the one before it
used. A file is the wire format on disk, never a pickle: the magic ``ASGDCKP2``,
a little-endian u32 frame count, then each frame as a u64 length, a u32 CRC-32 of its bytes and
the bytes. Frame 0 is a msgpack header; the rest are raw tensors, as in asgd.core.protocol.
Loading checks every checksum and refuses weights or optimizer state that are not finite, so a
damaged file is an error that says what is wrong, never a model that silently is. A server
shard's checkpoint holds its range of the weights (the header's ``span``); a folder of
``shard-I`` folders loads as the whole model, each shard's range in place. Files of the
first format (``ASGDCKP1``, no checksums) still load, with the other checks.
"""
from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asgd.core import protocol
from asgd.core.layout import ParameterLayout

MAGIC = b"ASGDCKP2"
MAGIC_V1 = b"ASGDCKP1"     # no checksums; still read
FILENAME = "state.asgd"    # the newest checkpoint (a hard link to its state-<version>.asgd)
KEEP = 3                   # checkpoints kept by default

log = logging.getLogger("asgd.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or not one of ours."""


class NonFiniteCheckpoint(CheckpointError):
    """A checkpoint whose weights or optimizer state hold NaN or Inf: what a diverged run
    leaves."""


@dataclass
class Checkpoint:
    version: int
    flat: torch.Tensor            # all weights, in layout order
    layout: ParameterLayout
    config: dict
    optimizer_scalars: dict
    optimizer_tensors: dict       # name -> flat tensor
    span: tuple | None = None     # a server shard's [start, stop) of the flat weights; None: all
    skipped: list = field(default_factory=list)   # newer checkpoints found damaged, and why
    settings: dict | None = None  # a model adopted from its first worker: the settings that
                                  # worker gave (server.adopt); None for a configured model

    @property
    def specs(self) -> list[dict]:
        return self.layout.to_specs()

    def weights(self) -> dict[str, torch.Tensor]:
        """name -> tensor, for ``model.load_state_dict``-style use."""
        return self.layout.split(self.flat)


# ----------------------------------------------------------------------------------------------
# frames on disk

def write_frames(path: Path, frames) -> None:
    """Write frames to ``path`` atomically (temp file in the same folder, fsync, rename,
    fsync of the folder), each with its CRC-32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(frames)))
            for frame in frames:
                mv = memoryview(frame).cast("B")
                f.write(struct.pack("<QI", mv.nbytes, zlib.crc32(mv)))
                f.write(mv)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_frames(path: Path) -> list[memoryview]:
    """The frames of a checkpoint file, every checksum verified (CheckpointError if not)."""
    try:
        data = memoryview(Path(path).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    magic = data[:8].tobytes()
    if len(data) < 12 or magic not in (MAGIC, MAGIC_V1):
        raise CheckpointError(f"{path} is not an asgd checkpoint")
    checked = magic == MAGIC
    (count,) = struct.unpack_from("<I", data, 8)
    pos, frames = 12, []
    prefix = 12 if checked else 8
    for i in range(count):
        if pos + prefix > len(data):
            raise CheckpointError(f"{path} is truncated")
        (n,) = struct.unpack_from("<Q", data, pos)
        crc = struct.unpack_from("<I", data, pos + 8)[0] if checked else None
        pos += prefix
        if pos + n > len(data):
            raise CheckpointError(f"{path} is truncated")
        frame = data[pos:pos + n]
        if checked and zlib.crc32(frame) != crc:
            raise CheckpointError(f"{path} is damaged: frame {i} fails its checksum")
        frames.append(frame)
        pos += n
    if pos != len(data):
        raise CheckpointError(f"{path} has {len(data) - pos} bytes after its last frame")
    return frames


# ----------------------------------------------------------------------------------------------

def versioned(directory) -> list[Path]:
    """The ``state-<version>.asgd`` files of a folder, newest first."""
    return sorted(Path(directory).glob("state-*.asgd"), reverse=True)


def write_checkpoint(directory, version: int, layout: ParameterLayout, flat: torch.Tensor,
                     config: dict, optimizer: str, scalars: dict | None = None,
                     optimizer_tensors=(), span: tuple | None = None,
                     keep: int = KEEP, settings: dict | None = None) -> Path:
    """Write ``<directory>/state-<version>.asgd`` atomically, point ``state.asgd`` at it, and
    remove all but the newest ``keep``; returns the path of ``state.asgd``. ``span``: the
    range of the model's flat weights ``flat`` holds (a server shard's). ``settings``: those
    a model adopted from its first worker took from it (a resumed server keeps them)."""
    header = {"kind": "asgd-checkpoint", "format": 2, "version": version,
              "layout": layout.to_specs(), "config": config,
              "optimizer": {"name": optimizer, "scalars": scalars or {}}}
    if settings is not None:
        header["settings"] = settings
    if span is not None and tuple(span) != (0, layout.numel):
        header["span"] = [int(span[0]), int(span[1])]
    directory = Path(directory)
    path = directory / f"state-{version:012d}.asgd"
    frames = protocol.encode(header, [("weights", flat), *optimizer_tensors])
    write_frames(path, frames)
    latest = directory / FILENAME
    link = directory / f".{FILENAME}.{os.getpid()}.link"
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, latest)              # atomic: the old newest or the new, never none
    except OSError:                           # a file system without hard links
        link.unlink(missing_ok=True)
        write_frames(latest, frames)
    _fsync_dir(directory)
    for old in versioned(directory)[max(keep, 1):]:
        old.unlink(missing_ok=True)
    return latest


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(directory) -> Checkpoint:
    """Read and verify a checkpoint: the newest good one of a folder (a damaged newer one is
    skipped, reported in the log and in ``skipped``), or a file, or a folder of a sharded
    server's ``shard-I`` folders. CheckpointError when there is none, or none is good."""
    path = Path(directory)
    if path.is_dir() and not (path / FILENAME).exists() and not versioned(path) \
            and (path / "shard-0").is_dir():
        return load_sharded(path)
    if not path.is_dir():
        return load_file(path)
    candidates = [p for p in [path / FILENAME, *versioned(path)] if p.exists()]
    if not candidates:
        raise CheckpointError(f"no checkpoint at {path / FILENAME}")
    skipped, tried = [], []
    for p in candidates:
        if any(os.path.samefile(p, t) for t in tried):
            continue            # state.asgd and the file it links to: one checkpoint
        tried.append(p)
        try:
            ckpt = load_file(p)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        ckpt.skipped = skipped
        for reason in skipped:
            log.warning("%s: using the one before it, %s (version %d)", reason, p.name,
                        ckpt.version)
        return ckpt
    if len(skipped) == 1:
        raise CheckpointError(skipped[0])
    raise CheckpointError(f"no good checkpoint in {path}: " + "; ".join(skipped))


def load_file(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file."""
    try:
        header, tensors = protocol.decode(read_frames(path))
    except protocol.ProtocolError as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if header.get("kind") != "asgd-checkpoint":
        raise CheckpointError(f"{path} is not an asgd checkpoint")
    try:
        version = header["version"]
        layout = ParameterLayout.from_specs(header["layout"])
        config, scalars = header["config"], header["optimizer"]["scalars"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: bad header ({e!r})") from None
    if not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{path} is damaged: version {version!r}")
    for k, v in (scalars.items() if isinstance(scalars, dict) else ()):
        x = v.get("tensor") if isinstance(v, dict) else v
        if isinstance(x, float) and not math.isfinite(x):
            raise NonFiniteCheckpoint(f"{path}: optimizer state {k} is {x}; refusing to use "
                                      "it")
    by_name = {}
    for t in tensors:
        x = t.to_torch().clone()
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteCheckpoint(f"{path}: {t.name} holds {bad} non-finite value(s) "
                                      "(NaN or Inf); refusing to use it")
        by_name[t.name] = x
    span = header.get("span")
    if span is not None and not (isinstance(span, list) and len(span) == 2 and
                                 all(isinstance(x, int) for x in span) and
                                 0 <= span[0] < span[1] <= layout.numel):
        raise CheckpointError(f"{path} is damaged: span {span!r}")
    settings = header.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise CheckpointError(f"{path} is damaged: settings {settings!r}")
    numel = layout.numel if span is None else span[1] - span[0]
    flat = by_name.pop("weights", None)
    if flat is None or flat.dim() != 1 or flat.numel() != numel:
        raise CheckpointError(f"{path} is damaged: its weights do not fit its layout")
    for name, t in by_name.items():
        if t.numel() != numel:
            raise CheckpointError(f"{path} is damaged: {name} does not fit the layout")
    return Checkpoint(version, flat, layout, config, scalars, by_name,
                      None if span is None else tuple(span), settings=settings)


def load_sharded(folder: Path) -> Checkpoint:
    """The whole model from a sharded server's checkpoints (``shard-0``, ``shard-1``, ...):
    each shard's range in place, every range present exactly once. Its version is the
    lowest of the shards' (each shard counts its own); the optimizer state stays per shard
    (a shard resumes from its own folder)."""
    parts, i = [], 0
    while (folder / f"shard-{i}").is_dir():
        parts.append(load_checkpoint(folder / f"shard-{i}"))
        i += 1
    first = parts[0]
    flat = torch.empty(first.layout.numel, dtype=torch.float32)
    pos = 0
    for i, c in enumerate(parts):
        if c.layout != first.layout:
            raise CheckpointError(f"{folder}/shard-{i} holds a different model than shard-0")
        lo, hi = c.span or (0, c.layout.numel)
        if lo != pos:
            raise CheckpointError(f"{folder}/shard-{i} starts at value {lo}, expected {pos}: "
                                  "the shards do not fit together")
        flat[lo:hi] = c.flat
        pos = hi
    if pos != first.layout.numel:
        raise CheckpointError(f"{folder}: the shards hold values 0-{pos} of "
                              f"{first.layout.numel}: a shard is missing")
    return Checkpoint(min(c.version for c in parts), flat, first.layout, first.config, {}, {},
                      settings=first.settings)
