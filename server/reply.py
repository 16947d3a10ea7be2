"""What the server sends for one request, without sockets: a header and the buffers after it.

    reply = weights_reply(store, {"ok": True, "id": 7, "version": 3}, form)   # pull's reply
    reply[0], reply[1:]          # the header (packed) and the payload buffers: its frames
    reply.lent, reply.copy       # buffers the store lent (live weights, a snapshot), copied?
    # the loop (server.main) sends it: copy=True buffers copied once into ZeroMQ messages,
    # the others as tracked frames whose trackers it adds to reply.trackers; then reply.sent

A reply that carries the weights reads them where the store keeps them: the live weights
(``ParameterStore.lend``) or, in a 16-bit form, a snapshot-pool buffer. The reply itself goes
into the store's list of what still reads that buffer, so a step that comes before ZeroMQ let
go of it (another request's, or a held round released in the same turn) moves the weights to
another buffer first (copy on write) instead of changing the bytes under the reply. Small
replies are copied as they are sent (a copy costs less than a tracked frame); large ones go
without a copy and stay lent until their frames' trackers are done.
"""
from __future__ import annotations

import torch

from asgd.core import protocol
from asgd.core.flat import chunk_ranges

ZERO_COPY_BYTES = 1 << 20    # float32 replies at least this large are sent from the live
                             # weights without a copy (ParameterStore.lend)


class ReplyForm:
    """How one reply carries the weights: per parameter, flat in a wire dtype, or written
    into the worker's shared-memory segment."""
    __slots__ = ("flat", "dtype", "segment", "filled")

    def __init__(self, flat: bool = False, dtype: str = "float32", segment=None):
        self.flat, self.dtype, self.segment = flat, dtype, segment
        self.filled = None       # the version whose weights a push's step wrote in the segment


PER_TENSOR = ReplyForm()


class Reply(list):
    """A reply's frames: the packed header, then the payload buffers. With ``lent`` (the
    store's list of what still reads a buffer) the reply joins that list until ``done``."""
    __slots__ = ("lent", "copy", "trackers", "sent")

    def __init__(self, header: dict, parts=(), lent: list | None = None, copy: bool = True):
        super().__init__([protocol.pack_header(header), *parts])
        self.lent, self.copy = lent is not None, copy
        self.trackers: list = []     # ZeroMQ's trackers of the frames sent without a copy
        self.sent = lent is None
        if lent is not None:
            lent.append(self)

    @property
    def done(self) -> bool:
        """Sent (or given up on), and ZeroMQ let go of every buffer it did not copy."""
        return self.sent and all(t.done for t in self.trackers)

    @property
    def nbytes(self) -> int:
        return sum(protocol.frame_nbytes(f) for f in self)


def weights_reply(store, header: dict, form: ReplyForm) -> Reply:
    """``header`` and the store's current weights in ``form`` (the segment already holds
    them: a header alone)."""
    if form.segment is not None:
        return Reply(header)
    nbytes = store.numel * protocol.DTYPES[form.dtype].itemsize
    if form.flat:
        if form.dtype != "float32":
            (buf, lent), copy = store.pool.take(store.version, form.dtype), False
        else:
            (buf, lent), copy = store.lend(), nbytes < ZERO_COPY_BYTES
        specs, parts = [], []
        for a, b in chunk_ranges(store.numel, buf.itemsize):
            specs.append({"name": "weights", "dtype": form.dtype, "shape": [b - a]})
            parts.append(buf[a:b])
        return Reply({**header, "flat": True, "tensors": specs}, parts, lent, copy)
    # per parameter: a frame each, from the lent live weights
    buf, lent = store.lend()
    views = store.layout.named_views(torch.from_numpy(buf))
    header = {**header, "tensors": [{"name": n, "dtype": "float32", "shape": list(t.shape)}
                                    for n, t in views]}
    return Reply(header, [t.numpy().reshape(-1) for _, t in views], lent,
                 nbytes < ZERO_COPY_BYTES)
