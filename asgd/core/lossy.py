"""The lossy gradient codecs, int8 and top-k, and the error feedback that keeps them converging.
asgd.core.encoding holds the registry and calls these; use it, not this module, to encode:

    meta, arrays = encoding.encode("topk", grad, feedback=ef, topk_ratio=0.01)
    ef = ErrorFeedback(numel)            # the worker's residual: what one push left out
    k = topk_k(numel, 0.01)              # values top-k keeps

``int8``: a float32 scale (absmax / 127) per block of values and one int8 code per value.
``topk``: the k largest magnitudes, ascending indices (int32, int64 from 2**31 values) and
their float32 values. The decoders trust nothing (asgd.core.encoding's checks, EncodingError).
The helpers they share with the other codecs are asgd.core.encoding's, looked up when called:
that module imports this one.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

I8 = np.dtype("i1")
I32 = np.dtype("<i4")
I64 = np.dtype("<i8")

INT32_INDEX_LIMIT = 2 ** 31      # vectors this long or longer need int64 topk indices
INT8_MAX_CODE = 127              # symmetric: -127..127, so -x encodes as -code(x)
# The largest scale whose codes cannot overflow float32 when decoded (even a -128 code, which
# the encoder never writes but the wire can carry). A genuine scale is at most max / 127.
MAX_INT8_SCALE = float(np.finfo(np.float32).max) / 128


# ----------------------------------------------------------------------------------------------
# sizes

def topk_k(numel: int, ratio: float) -> int:
    """How many values ``topk`` keeps: ceil(ratio * numel), at least 1, at most numel."""
    # ratio * numel carries float noise (0.07 * 100 is 7.000000000000001): shave it off
    # before the ceiling, or k would grow by one for exactly representable products.
    k = math.ceil(ratio * numel * (1 - 1e-12))
    return min(numel, max(1, k))


def index_dtype(numel: int) -> np.dtype:
    return I32 if numel < INT32_INDEX_LIMIT else I64


# ----------------------------------------------------------------------------------------------
# int8 and top-k, both ways

def encode_int8(flat: torch.Tensor, block: int) -> list[np.ndarray]:
    import torch

    from asgd.core import encoding as enc
    numel = flat.numel()
    nblocks = enc._ceil_div(numel, block)
    scales = torch.empty(nblocks, dtype=torch.float32)
    codes = torch.empty(numel, dtype=torch.int8)
    full = numel // block
    # Full blocks as one (full, block) matrix; the short last block on its own.
    if full:
        _quantize(flat[:full * block].view(full, block), scales[:full],
                  codes[:full * block].view(full, block))
    if full < nblocks:
        _quantize(flat[full * block:].view(1, -1), scales[full:], codes[full * block:].view(1, -1))
    return [scales.numpy(), codes.numpy()]


def _quantize(x: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> None:
    """Rows of ``x`` to absmax-scaled int8 codes; ``scales`` gets absmax / 127 per row."""
    import torch
    lo, hi = torch.aminmax(x, dim=1)          # no |x| temporary; NaN propagates into the scale
    torch.div(torch.maximum(hi, -lo), INT8_MAX_CODE, out=scales)
    # A zero block (or one so small that absmax / 127 underflows) has scale 0 and codes 0:
    # divide it by 1 instead of 0.
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.div(x, divisor[:, None])
    q.round_().clamp_(-INT8_MAX_CODE, INT8_MAX_CODE)
    codes.copy_(q)


def encode_topk(flat: torch.Tensor, k: int) -> list[np.ndarray]:
    import torch
    # torch.topk's partial selection is much faster than a full sort; only the k winners are
    # then sorted, so the receiver can check the indices in one pass (strictly increasing).
    _, idx = torch.topk(flat.abs(), k, sorted=False)
    idx, _ = torch.sort(idx)
    values = flat[idx]
    indices = idx.numpy().astype(index_dtype(flat.numel()))
    return [indices, values.numpy()]


def decode_int8(meta: dict, arrays: Sequence, out: np.ndarray) -> None:
    from asgd.core import encoding as enc
    block = meta.get("block")
    if not enc._is_int(block) or block < 1:
        enc._fail("int8", f"'block' must be an integer >= 1, got {block!r}")
    block = int(block)
    numel = out.size
    nblocks = enc._ceil_div(numel, block)
    scales, codes = enc._arrays("int8", arrays,
                                [("scales", enc.F32, nblocks), ("codes", I8, numel)])
    if nblocks:
        enc._check_finite("int8", "scales", scales)
        lo, hi = scales.min(), scales.max()
        if lo < 0 or hi > MAX_INT8_SCALE:
            enc._fail("int8", f"scales must be in [0, {MAX_INT8_SCALE:.4g}], got {lo} to {hi}")
    full = numel // block
    # Block views of out and codes: one multiply broadcasting each block's scale.
    if full:
        np.multiply(codes[:full * block].reshape(full, block), scales[:full, None],
                    out=out[:full * block].reshape(full, block))
    if full < nblocks:
        np.multiply(codes[full * block:], scales[full], out=out[full * block:])


def decode_topk(meta: dict, arrays: Sequence, out: np.ndarray) -> None:
    from asgd.core import encoding as enc
    numel = out.size
    k = meta.get("k")
    # An empty vector keeps nothing (k = 0); any other keeps at least one value.
    if not enc._is_int(k) or not (1 <= k <= numel or numel == 0 == k):
        enc._fail("topk", f"'k' must be an integer in [1, {numel}], got {k!r}")
    k = int(k)
    idx_dtype = index_dtype(numel)
    indices, values = enc._arrays("topk", arrays,
                                  [("indices", idx_dtype, k), ("values", enc.F32, k)])
    if k:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= numel:
            enc._fail("topk", f"indices must be in [0, {numel}), got {lo} to {hi}")
        steps = np.diff(indices)              # k values: small next to numel
        if steps.size and steps.min() <= 0:
            at = int(np.argmax(steps <= 0))
            what = "repeats" if steps[at] == 0 else "is out of order"
            enc._fail("topk", f"indices must be strictly increasing: index {int(indices[at + 1])} "
                  f"at position {at + 1} {what}")
        enc._check_finite("topk", "values", values)
    out.fill(0)
    out[indices] = values



# ----------------------------------------------------------------------------------------------
# error feedback

class ErrorFeedback:
    """The worker's residual for lossy encodings (error feedback: Seide et al. 2014, 1-bit
    SGD; Karimireddy et al. 2019, EF-SGD). What one push leaves out is added to the next, so
    over many pushes the server receives the gradients' sum up to one bounded residual.

        ef = ErrorFeedback(layout.numel)
        meta, arrays = ef.encode("topk", grad, topk_ratio=0.01)   # send before the next call

    The arrays may view buffers of this object (for ``none`` with a pending residual), so they
    are valid until the next ``encode``.
    """

    def __init__(self, numel: int):
        import torch
        self.numel = int(numel)
        self.residual = torch.zeros(self.numel, dtype=torch.float32)
        self._corrected = torch.empty(self.numel, dtype=torch.float32)
        self._decoded = torch.empty(self.numel, dtype=torch.float32)
        self._pending = False        # residual is nonzero

    def reset(self) -> None:
        self.residual.zero_()
        self._pending = False

    def encode(self, name: str, grad: torch.Tensor, *, topk_ratio: float = 0.01,
               block: int = 256) -> tuple[dict, list[np.ndarray]]:
        """Encode ``grad`` + residual and keep what the encoding lost as the new residual.
        ``grad`` is not modified. An encoding that would not decode (a non-finite gradient)
        raises EncodingError and leaves the residual as it was."""
        import torch

        from asgd.core import encoding as enc
        if not (isinstance(grad, torch.Tensor) and grad.dtype == torch.float32
                and grad.device.type == "cpu" and grad.numel() == self.numel):
            raise ValueError(f"a float32 CPU gradient of {self.numel} values expected, got "
                             f"{enc._describe_tensor(grad)}")
        grad = grad.detach().reshape(-1)
        if name == "none":
            if not self._pending:
                return enc._encode(name, grad, topk_ratio=topk_ratio, block=block)
            # Lossless: hand over what is still owed, then nothing is.
            torch.add(grad, self.residual, out=self._corrected)
            self.reset()
            return enc._encode(name, self._corrected)
        torch.add(grad, self.residual, out=self._corrected)
        meta, arrays = enc._encode(name, self._corrected, topk_ratio=topk_ratio, block=block)
        enc.decode(meta, arrays, self._decoded.numpy())
        torch.sub(self._corrected, self._decoded, out=self.residual)
        self._pending = True
        return meta, arrays


