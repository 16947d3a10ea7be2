"""A worker's shared-memory segment: the same-host path for tensors.

    seg = Segment.create(numel)                    # the worker: a file in /dev/shm, mode 0600
    client.hello(rank, shm=seg.path)               # the server maps it (same host only)
    seg.grad(0)[:] = g; push_pull(shm slot 0)      # the server reads the gradient there...
    w = seg.weights                                # ...and writes the weights it replies with
    seg.unlink()                                   # once the server mapped it: no name left
    seg.close()                                    # unmapped (and unlinked)

When a worker and a server shard share a machine, only the request's header goes over ZeroMQ;
the gradient and the weights stay in this segment: the worker writes the gradient once, the
server reads it in place and writes the new weights once, the worker reads them once. The
file starts with a 64-byte header (magic, numel, gradient slots); then ``slots`` gradient
areas (two, so a worker that overlaps computes the next gradient while the server reads the
last) and one weights area, each 64-byte aligned.

The server opens only a path it can trust: a regular file named ``asgd-*.shm`` directly in the
shared-memory folder, owned by the server's own user, of exactly the size its header claims
for the server's parameter count.
"""
from __future__ import annotations

import mmap
import os
import secrets
import stat
import struct
from pathlib import Path

import numpy as np

MAGIC = b"ASGDSHM1"
HEADER = struct.Struct("<8sQI")      # magic, numel, slots
HEADER_BYTES = 64
ALIGN = 64
SHM_DIR = Path(os.environ.get("ASGD_SHM_DIR", "/dev/shm"))


class SegmentError(ValueError):
    pass


def _area(numel: int) -> int:
    return (numel * 4 + ALIGN - 1) // ALIGN * ALIGN


def segment_size(numel: int, slots: int) -> int:
    return HEADER_BYTES + (slots + 1) * _area(numel)


class Segment:
    def __init__(self, path: Path, fd: int, numel: int, slots: int, owner: bool):
        self.path, self.numel, self.slots, self.owner = path, numel, slots, owner
        self.unlinked = False
        self._map = mmap.mmap(fd, segment_size(numel, slots))
        os.close(fd)
        buf = np.frombuffer(self._map, dtype=np.uint8)
        area = _area(numel)

        def f32(i):
            start = HEADER_BYTES + i * area
            return buf[start:start + numel * 4].view(np.float32)

        self._grads = [f32(i) for i in range(slots)]
        self.weights = f32(slots)

    @classmethod
    def create(cls, numel: int, slots: int = 2, folder: Path | None = None) -> "Segment":
        folder = Path(folder or SHM_DIR)
        path = folder / f"asgd-{os.getpid()}-{secrets.token_hex(6)}.shm"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, segment_size(numel, slots))
            os.pwrite(fd, HEADER.pack(MAGIC, numel, slots), 0)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, fd, numel, slots, owner=True)

    @classmethod
    def open(cls, path: str, numel: int, folder: Path | None = None) -> "Segment":
        """The server's side: map a worker's segment after checking that it may."""
        folder = Path(folder or SHM_DIR)
        p = Path(path)
        if p.parent != folder or not p.name.startswith("asgd-") or p.suffix != ".shm":
            raise SegmentError(f"{path!r} is not a segment in {folder}")
        try:
            fd = os.open(p, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise SegmentError(f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise SegmentError(f"{path} is not a regular file of this user")
            head = os.pread(fd, HEADER.size, 0)
            magic, n, slots = HEADER.unpack(head) if len(head) == HEADER.size else (b"", 0, 0)
            if magic != MAGIC:
                raise SegmentError(f"{path} is not an asgd segment")
            if n != numel or not 1 <= slots <= 4 or st.st_size != segment_size(n, slots):
                raise SegmentError(f"{path} holds {n} values in {slots} slots "
                                   f"({st.st_size} bytes); this server has {numel}")
        except BaseException:
            os.close(fd)
            raise
        return cls(p, fd, numel, slots, owner=False)

    def unlink(self) -> None:
        """Remove the segment's name (the creator, once its peer has it mapped): the memory
        lives on until both unmap it, and nothing is left behind if either dies."""
        if self.owner and not self.unlinked:
            self.path.unlink(missing_ok=True)
            self.unlinked = True

    def grad(self, slot: int) -> np.ndarray:
        return self._grads[slot]

    def close(self) -> None:
        if self._map is None:
            return
        self._grads = []
        self.weights = None
        try:
            self._map.close()
        except BufferError:   # a view is still alive somewhere: leave the mapping to the GC
            pass
        self._map = None
        self.unlink()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
