"""Wire encodings of a flat float32 vector: the gradient a worker pushes, the weights it pulls.

A vector (all parameters concatenated in layout order) becomes a small ``meta`` map for the
message header and a few numpy arrays, one frame each; ``decode`` writes it back into a
preallocated float32 buffer. No sockets here, and nothing is pickled.

    meta, arrays = encode("int8", flat, block=256)   # meta: {"encoding", "numel", "block"}
    decode(meta, arrays, out)                        # out: (numel,) float32; EncodingError
    encoded_nbytes("topk", numel, topk_ratio=0.01)   # the payload size, without encoding

    ef = ErrorFeedback(numel)                        # the worker's residual for lossy encodings
    meta, arrays = encode("topk", grad, feedback=ef, topk_ratio=0.01)

    e = get("fp16")                                  # the registry (REGISTRY): name -> Encoding
    e.wire_dtype, e.bytes_per_value, e.lossy         # "float16", 2, True
    e.encode(grad, feedback=ef); e.decode(meta, arrays, out)   # the gradient form
    e.narrow(weights_f32, out_f16); e.widen(chunk_f16, out_f32) # the weights form, and chunks
    get("fp16", weights=True); WEIGHT_ENCODINGS      # what flat weights may come back in

The encodings (``ENCODINGS``):

| name   | arrays                                                   | bytes per value  |
| ------ | -------------------------------------------------------- | ---------------- |
| `none` | float32 values (a view of the input)                     | 4                |
| `fp16` | float16 values, saturating at +-65504                    | 2                |
| `bf16` | bfloat16 as uint16 words, rounded to nearest even        | 2                |
| `int8` | float32 scales (absmax / 127 per block), int8 codes      | 1 + 4 / block    |
| `topk` | the k largest magnitudes: ascending int32 indices (int64 | 8 k / numel      |
|        | from 2**31 values) and their float32 values              | (12 with int64)  |

``decode`` trusts nothing: the meta and the arrays come from the network, so every name,
count, dtype, length, index and value is checked, and anything wrong raises ``EncodingError``
naming the encoding. ``decode`` writes finite values only: a non-finite input encodes, but its
encoding does not decode, so a diverged gradient is refused by the receiver (and by
``ErrorFeedback`` before it is sent). The lossy codecs (int8, top-k) and ``ErrorFeedback`` live
in asgd/core/lossy.py; this module is their registry and the face to use.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from asgd.core.lossy import (  # noqa: F401  (the registry's API: also asgd.core.encoding's names)
    I8, I32, I64, INT8_MAX_CODE, INT32_INDEX_LIMIT, MAX_INT8_SCALE, ErrorFeedback, decode_int8,
    decode_topk, encode_int8, encode_topk, index_dtype, topk_k)

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
BF16_WORDS = np.dtype("<u2")     # bfloat16 has no numpy dtype: its 16-bit patterns travel as-is


class EncodingError(ValueError):
    """An encoded vector that cannot be accepted: the message names the encoding and the fault."""


# ----------------------------------------------------------------------------------------------
# sizes

def encoded_nbytes(name: str, numel: int, *, topk_ratio: float = 0.01, block: int = 256) -> int:
    """The payload bytes (all arrays together) that ``encode`` produces for ``numel`` values."""
    _check_args(name, topk_ratio, block)
    if name == "none":
        return 4 * numel
    if name in ("fp16", "bf16"):
        return 2 * numel
    if name == "int8":
        return 4 * _ceil_div(numel, block) + numel
    k = topk_k(numel, topk_ratio)
    return k * (index_dtype(numel).itemsize + 4)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_args(name: str, topk_ratio: float, block: int) -> None:
    """The sender's arguments: a mistake here is a bug, so a plain ValueError."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r} (known: {', '.join(ENCODINGS)})")
    if name == "topk" and not (isinstance(topk_ratio, (int, float)) and not isinstance(
            topk_ratio, bool) and 0 < topk_ratio <= 1):
        raise ValueError(f"topk_ratio must be in (0, 1], got {topk_ratio!r}")
    if name == "int8" and not (_is_int(block) and block >= 1):
        raise ValueError(f"block must be an integer >= 1, got {block!r}")


# ----------------------------------------------------------------------------------------------
# encoding

def encode(name: str, flat: torch.Tensor, *, feedback: "ErrorFeedback | None" = None,
           topk_ratio: float = 0.01, block: int = 256) -> tuple[dict, list[np.ndarray]]:
    """``meta`` (msgpack-able: the encoding, numel and what decoding needs) and the arrays,
    contiguous, one frame each. ``none`` returns a view of ``flat``; the others new arrays.
    With ``feedback`` (the sender's ``ErrorFeedback``) ``flat`` plus its residual is encoded,
    and what the encoding lost becomes the new residual."""
    if feedback is not None:
        return feedback.encode(name, flat, topk_ratio=topk_ratio, block=block)
    return _encode(name, flat, topk_ratio=topk_ratio, block=block)


def _encode(name: str, flat: torch.Tensor, *, topk_ratio: float = 0.01,
            block: int = 256) -> tuple[dict, list[np.ndarray]]:
    import torch
    _check_args(name, topk_ratio, block)
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.float32 or flat.dim() != 1 \
            or flat.device.type != "cpu" or not flat.is_contiguous():
        raise ValueError("encode needs a 1-D contiguous float32 CPU tensor, got "
                         f"{_describe_tensor(flat)}")
    flat = flat.detach()
    numel = flat.numel()
    meta = {"encoding": name, "numel": numel}
    if name == "none":
        return meta, [flat.numpy()]
    if name == "fp16":
        return meta, [_half_words(flat, torch.float16).numpy()]
    if name == "bf16":
        words = _half_words(flat, torch.bfloat16).view(torch.int16)
        return meta, [words.numpy().view(BF16_WORDS)]
    if name == "int8":
        meta["block"] = int(block)
        return meta, encode_int8(flat, int(block))
    k = topk_k(numel, topk_ratio)
    meta["k"] = k
    return meta, encode_topk(flat, k)


def _describe_tensor(t) -> str:
    import torch
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    layout = "contiguous" if t.is_contiguous() else "strided"
    return f"a {layout} {str(t.dtype).replace('torch.', '')} tensor of shape " \
           f"{list(t.shape)} on {t.device}"


def _half_words(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``flat`` in a new tensor of a 16-bit float type (``_narrow_into``)."""
    import torch

    half = torch.empty(flat.shape, dtype=dtype)
    _narrow_into(flat, half)
    return half


def _narrow_into(flat: torch.Tensor, half: torch.Tensor) -> None:
    """``flat`` into ``half`` (a 16-bit float type, round to nearest even), finite values
    saturating at the type's largest instead of overflowing to inf; inf and NaN stay what
    they are."""
    import torch

    half.copy_(flat)
    if half.numel():
        lo, hi = torch.aminmax(half)          # one pass, no mask: overflow is rare
        if torch.isinf(lo) or torch.isinf(hi):
            overflow = torch.isinf(half) & torch.isfinite(flat)
            half[overflow] = torch.finfo(half.dtype).max * \
                torch.sign(flat[overflow]).to(half.dtype)


# ----------------------------------------------------------------------------------------------
# decoding: everything in ``meta`` and ``arrays`` is untrusted

def decode(meta: dict, arrays: Sequence[np.ndarray], out: np.ndarray) -> None:
    """Write the vector that ``meta`` and ``arrays`` encode into ``out`` (1-D float32 of
    ``numel`` values, C-contiguous, writable). Raises EncodingError on any fault; ``out`` may
    then hold anything, but nothing else changes."""
    if not (isinstance(out, np.ndarray) and out.dtype == F32 and out.ndim == 1
            and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("decode needs a writable 1-D contiguous float32 array to write into")
    if not isinstance(meta, dict):
        raise EncodingError(f"the encoding's meta must be a map, got {type(meta).__name__}")
    name = meta.get("encoding")
    if name not in ENCODINGS:
        raise EncodingError(f"unknown encoding {name!r} (known: {', '.join(ENCODINGS)})")
    numel = meta.get("numel")
    if not _is_int(numel) or numel < 0:
        raise EncodingError(f"{name}: 'numel' must be an integer >= 0, got {numel!r}")
    if numel != out.size:
        raise EncodingError(f"{name}: encodes {numel} values, the receiver expects {out.size}")
    if not isinstance(arrays, (list, tuple)):
        raise EncodingError(f"{name}: arrays must be a list, got {type(arrays).__name__}")
    _DECODERS[name](meta, arrays, out)


def _fail(name: str, message: str):
    raise EncodingError(f"{name}: {message}")


def _arrays(name: str, arrays: Sequence, specs: Sequence[tuple[str, np.dtype, int]]) -> list:
    """Check the count, type, dtype and length of each array against (label, dtype, length)."""
    if len(arrays) != len(specs):
        labels = " and ".join(label for label, _, _ in specs)
        count = f"{len(arrays)} array" + ("" if len(arrays) == 1 else "s")
        _fail(name, f"{count}, expected {len(specs)} ({labels})")
    for a, (label, dtype, length) in zip(arrays, specs):
        if not isinstance(a, np.ndarray):
            _fail(name, f"{label} must be a numpy array, got {type(a).__name__}")
        if a.dtype != dtype:
            _fail(name, f"{label} must be {dtype.name}, got {a.dtype.name}")
        if a.ndim != 1 or a.size != length:
            _fail(name, f"{label} must be 1-D of {length} values, got shape {list(a.shape)}")
    return list(arrays)


def _check_finite(name: str, label: str, values: np.ndarray) -> None:
    # min and max are NaN if any value is and +-inf if any is: two passes, no temporary mask.
    if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        _fail(name, f"{label} are not all finite ({values[bad]} at {bad})")


def _as_torch(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only) array that is only read from."""
    import torch
    with warnings.catch_warnings():           # received frames are read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _decode_none(meta: dict, arrays: Sequence, out: np.ndarray) -> None:
    (values,) = _arrays("none", arrays, [("values", F32, out.size)])
    np.copyto(out, values)
    _check_finite("none", "values", out)


def _decode_fp16(meta: dict, arrays: Sequence, out: np.ndarray) -> None:
    (values,) = _arrays("fp16", arrays, [("values", F16, out.size)])
    _widen_fp16(values, out)
    _check_finite("fp16", "values", out)


def _decode_bf16(meta: dict, arrays: Sequence, out: np.ndarray) -> None:
    (words,) = _arrays("bf16", arrays, [("words", BF16_WORDS, out.size)])
    _widen_bf16(words, out)
    _check_finite("bf16", "values", out)


def _widen_none(values: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, values.reshape(-1))


def _widen_fp16(values: np.ndarray, out: np.ndarray) -> None:
    # torch widens float16 several times faster than numpy, and also without a temporary.
    import torch

    torch.from_numpy(out).copy_(_as_torch(values.reshape(-1)))


def _widen_bf16(words: np.ndarray, out: np.ndarray) -> None:
    # A bfloat16 is the top half of a float32, which torch widens in one pass.
    import torch

    torch.from_numpy(out).copy_(_as_torch(words.reshape(-1).view(np.int16)).view(torch.bfloat16))


def _narrow_none(src: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, src)


def _narrow_fp16(src: np.ndarray, out: np.ndarray) -> None:
    import torch

    _narrow_into(torch.from_numpy(src), torch.from_numpy(out))


def _narrow_bf16(src: np.ndarray, out: np.ndarray) -> None:
    import torch

    _narrow_into(torch.from_numpy(src), torch.from_numpy(out.view(np.int16)).view(torch.bfloat16))


_DECODERS = {
    "none": _decode_none,
    "fp16": _decode_fp16,
    "bf16": _decode_bf16,
    "int8": decode_int8,
    "topk": decode_topk,
}


def decode_into_tensor(meta: dict, arrays: Sequence[np.ndarray], out: torch.Tensor) -> None:
    """``decode`` into a contiguous float32 CPU tensor (the flat weights), any shape."""
    import torch
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.float32
            and out.device.type == "cpu" and out.is_contiguous()):
        raise ValueError("decode_into_tensor needs a contiguous float32 CPU tensor, got "
                         f"{_describe_tensor(out)}")
    decode(meta, arrays, out.detach().view(-1).numpy())


# ----------------------------------------------------------------------------------------------
# the registry: every name, what it puts on the wire, how to make it and read it back

@dataclass(frozen=True)
class Encoding:
    """One wire encoding. ``wire_dtype``: the dtype of its one array when it is a plain
    conversion of each value (none, fp16, bf16; also the form of flat weights in a reply),
    else None (int8, topk: several arrays, ``encode`` and ``decode`` only). ``bytes_per_value``:
    its payload per value, at the default block (int8) and ratio (topk); ``nbytes`` is exact.
    ``lossy``: a sender keeps an error-feedback residual for it. ``weights``: flat weights may
    come back in it."""
    name: str
    wire_dtype: str | None
    bytes_per_value: float
    lossy: bool
    weights: bool
    narrow: Callable[[np.ndarray, np.ndarray], None] | None = None
    widen: Callable[[np.ndarray, np.ndarray], None] | None = None

    def nbytes(self, numel: int, **settings) -> int:
        """The payload bytes of ``numel`` values (settings: topk_ratio, block)."""
        return encoded_nbytes(self.name, numel, **settings)

    def encode(self, flat, *, feedback: "ErrorFeedback | None" = None,
               **settings) -> tuple[dict, list[np.ndarray]]:
        """The gradient form: ``encode`` (with ``feedback``'s residual where given)."""
        return encode(self.name, flat, feedback=feedback, **settings)

    def decode(self, meta: dict, arrays: Sequence[np.ndarray], out: np.ndarray) -> None:
        """The gradient form, back: ``decode`` (``meta`` without its name is enough)."""
        decode({**meta, "encoding": self.name}, arrays, out)


REGISTRY: dict[str, Encoding] = {e.name: e for e in (
    Encoding("none", "float32", 4, lossy=False, weights=True, narrow=_narrow_none,
             widen=_widen_none),
    Encoding("fp16", "float16", 2, lossy=True, weights=True, narrow=_narrow_fp16,
             widen=_widen_fp16),
    Encoding("bf16", "bfloat16", 2, lossy=True, weights=True, narrow=_narrow_bf16,
             widen=_widen_bf16),
    Encoding("int8", None, 1 + 4 / 256, lossy=True, weights=False),
    Encoding("topk", None, 0.01 * 8, lossy=True, weights=False),
)}
ENCODINGS = tuple(REGISTRY)                     # every name: gradients travel in any
assert tuple(_DECODERS) == ENCODINGS
WEIGHT_ENCODINGS = tuple(n for n, e in REGISTRY.items() if e.weights)


def get(name: str, weights: bool = False) -> Encoding:
    """The encoding called ``name`` (with ``weights``: one that flat weights may come back
    in); ValueError naming the known ones otherwise."""
    known = WEIGHT_ENCODINGS if weights else ENCODINGS
    if name not in known:
        what = "weights encoding" if weights else "encoding"
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(known)})")
    return REGISTRY[name]


def by_wire_dtype(dtype: str) -> Encoding:
    """The plain conversion whose array is of wire dtype ``dtype`` (float32, float16,
    bfloat16)."""
    for e in REGISTRY.values():
        if e.wire_dtype == dtype:
            return e
    raise ValueError(f"no encoding travels as {dtype!r}")


# the 16-bit conversions under the names the flat form has always used
bf16_to_f32 = _widen_bf16
f32_to_bf16 = _narrow_bf16
