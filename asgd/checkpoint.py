"""The checkpoint file: the server's weights, optimizer state, version and config in one file.

    ckpt = load_checkpoint("runs/x/checkpoint")     # Checkpoint(version, flat, config, ...)
    write_frames(path, frames)                       # atomic: temp file, fsync, rename, fsync dir

server.checkpoint writes it from a parameter store; anything may read it (asgd eval).

The file (``state.asgd``) is the wire format on disk, never a pickle: the magic ``ASGDCKP1``,
a little-endian u32 frame count, then each frame as a u64 length and its bytes. Frame 0 is a
msgpack header; the rest are raw tensors, as in asgd.protocol.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from asgd import protocol

MAGIC = b"ASGDCKP1"
FILENAME = "state.asgd"


@dataclass
class Checkpoint:
    version: int
    flat: torch.Tensor            # all weights, in layout order
    specs: list                   # the parameter list
    config: dict
    optimizer_scalars: dict
    optimizer_tensors: dict       # name -> flat tensor

    def weights(self) -> dict[str, torch.Tensor]:
        """name -> tensor, for ``model.load_state_dict``-style use."""
        out, offset = {}, 0
        for s in self.specs:
            n = 1
            for d in s["shape"]:
                n *= d
            out[s["name"]] = self.flat[offset:offset + n].view(s["shape"])
            offset += n
        return out


def write_frames(path: Path, frames) -> None:
    """Write frames to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(frames)))
        for frame in frames:
            mv = memoryview(frame).cast("B")
            f.write(struct.pack("<Q", mv.nbytes))
            f.write(mv)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_frames(path: Path) -> list[memoryview]:
    data = memoryview(Path(path).read_bytes())
    if len(data) < 12 or data[:8].tobytes() != MAGIC:
        raise ValueError(f"{path} is not an asgd checkpoint")
    (count,) = struct.unpack_from("<I", data, 8)
    pos, frames = 12, []
    for _ in range(count):
        if pos + 8 > len(data):
            raise ValueError(f"{path} is truncated")
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if pos + n > len(data):
            raise ValueError(f"{path} is truncated")
        frames.append(data[pos:pos + n])
        pos += n
    return frames


def load_checkpoint(directory) -> Checkpoint:
    path = Path(directory)
    if path.is_dir():
        path = path / FILENAME
    try:
        header, tensors = protocol.decode(read_frames(path))
    except protocol.ProtocolError as e:
        raise ValueError(f"{path}: {e}") from None
    if header.get("kind") != "asgd-checkpoint":
        raise ValueError(f"{path} is not an asgd checkpoint")
    by_name = {t.name: t.to_torch().clone() for t in tensors}
    return Checkpoint(
        version=int(header["version"]), flat=by_name.pop("weights"), specs=header["layout"],
        config=header["config"], optimizer_scalars=header["optimizer"]["scalars"],
        optimizer_tensors=by_name,
    )
