"""The flat form of parameters and gradients on the wire: chunks, shards, finiteness.

    ranges = chunk_ranges(numel, 4)                       # [start, end) of each 4 MiB frame
    start, stop = shard_range(numel, index, count)        # a server shard's contiguous range
    ok = FiniteCheck()(array)                             # no NaN or Inf, no allocation
    copy_checked(dst, src, check)                         # dst[:] = src, False if non-finite

A flat message carries one vector (every parameter, concatenated in layout order) as
consecutive frames of at most ``CHUNK_BYTES`` each, all with the same name: a receiver never
needs one huge allocation (a fresh 40 MB buffer per message page-faults; a few MiB come from
the allocator's reused memory), and a sender can hand each chunk to ZeroMQ without copying.
"""
from __future__ import annotations

import math

import numpy as np

CHUNK_BYTES = 4 << 20        # 4 MiB frames
CHECK_BLOCK = 1 << 16        # values checked at once: 256 KiB of float32, cache-resident


def chunk_ranges(numel: int, itemsize: int, chunk_bytes: int = CHUNK_BYTES
                 ) -> list[tuple[int, int]]:
    """[start, end) element ranges of at most ``chunk_bytes`` covering range(numel); one empty
    range for an empty vector (a message always has the frame)."""
    per = max(1, chunk_bytes // itemsize)
    if numel == 0:
        return [(0, 0)]
    return [(a, min(a + per, numel)) for a in range(0, numel, per)]


SHARD_ALIGN = 16             # shard boundaries fall on 64-byte (16-value) multiples


def shard_range(numel: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of shard ``index`` of ``count``: balanced contiguous ranges covering
    range(numel) in order, their boundaries on multiples of SHARD_ALIGN values. ValueError
    when the index is out of range or a shard would hold nothing."""
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int)
            and 0 <= index < count):
        raise ValueError(f"shard {index} of {count}: the index must be in [0, {count})")
    if numel < count * SHARD_ALIGN and count > 1:
        raise ValueError(f"{numel} parameters cannot be split into {count} shards "
                         f"(at least {SHARD_ALIGN} values each)")

    def edge(i: int) -> int:
        if i >= count:
            return numel
        return (numel * i // count) // SHARD_ALIGN * SHARD_ALIGN

    return edge(index), edge(index + 1)


class FiniteCheck:
    """Whether a float array holds only finite values, with no allocation per call.

    First one vectorised sum (torch's kernel: a read of the array, 4-5x faster than numpy's
    ``isfinite`` on one CPU thread): NaN and Inf propagate through every addition, so a finite
    sum means every value is finite. Only a non-finite sum (a bad value, or finite values
    whose sum overflows) takes the exact path: block by block into one reused boolean buffer,
    unlike ``np.isfinite(a).all()`` (a mask as large as the array)."""

    def __init__(self, block: int = CHECK_BLOCK):
        self.block = block
        self.mask = np.empty(block, dtype=bool)

    def __call__(self, a: np.ndarray) -> bool:
        a = a.reshape(-1)
        if a.dtype == np.float32 and a.size:
            import torch

            if math.isfinite(torch.from_numpy(a).sum().item()):
                return True
        return self.exact(a)

    def exact(self, a: np.ndarray) -> bool:
        """The block-by-block check, whatever the sum says."""
        a = a.reshape(-1)
        b = self.block
        for i in range(0, a.size, b):
            part = a[i:i + b]
            m = self.mask[:part.size]
            np.isfinite(part, out=m)
            if not m.all():
                return False
        return True


def copy_checked(dst: np.ndarray, src: np.ndarray, check: FiniteCheck) -> bool:
    """``dst[:] = src`` (converting to dst's dtype: float16 to float32, ...) block by block,
    each block checked while it is in cache. False (dst partly written) if any value of the
    result is NaN or Inf."""
    b = check.block
    for i in range(0, src.size, b):
        part = dst[i:i + b]
        np.copyto(part, src[i:i + b], casting="unsafe")
        m = check.mask[:part.size]
        np.isfinite(part, out=m)
        if not m.all():
            return False
    return True


# The 16-bit weight conversions are asgd.core.encoding's (REGISTRY["bf16"].widen / .narrow);
# these names stay for the code that still imports them from here.
from asgd.core.encoding import bf16_to_f32, f32_to_bf16  # noqa: E402,F401
