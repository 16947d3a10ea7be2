"""Wire protocol, version 1: the message schema and the frame codec both sides share.

A message is a list of frames. Frame 0 is a msgpack map (the header); frames 1..n are the raw
little-endian, C-contiguous bytes of the tensors that the header's ``tensors`` list describes,
one frame each, in order. Nothing is pickled. No sockets live here: ``encode`` and ``decode``
turn headers and arrays into frames and back, and raise ``ProtocolError`` on anything malformed.

    frames = encode({"op": "pull", ...}, [("fc.weight", array), ...])
    header, tensors = decode(frames)      # tensors: list of Tensor(name, dtype, array)

See docs/protocol.md for the full description.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

OPS = ("hello", "pull", "push", "push_pull", "stats", "bye")
ERROR_CODES = (
    "bad_request",   # the header is malformed: not a map, missing or mistyped keys, frame count
    "bad_version",   # unsupported protocol version, or a push from a version the shard never had
    "unknown_op",
    "bad_tensor",    # wrong name, dtype, shape, byte size or non-finite values
    "too_large",     # the message is bigger than the server accepts
    "unauthorized",
    "dropped",       # the staleness policy refused the push
    "internal",      # a bug on the server: reported, never fatal
)

# Wire dtypes. bfloat16 has no numpy dtype: it travels as 2-byte words and is held as uint16.
DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")

MAX_HEADER_BYTES = 1 << 20       # a header is metadata: a MiB is generous
MAX_TENSORS = 1 << 16            # tensors in one message
COPY_THRESHOLD = 64 * 1024       # frames at least this large are sent without a copy


class ProtocolError(Exception):
    """A message that cannot be accepted; ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Tensor:
    """One decoded tensor: its name, wire dtype and a (read-only) numpy view of its frame."""

    name: str
    dtype: str
    array: np.ndarray

    @property
    def spec(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.array.shape)}

    def to_torch(self):
        """A torch tensor sharing the frame's memory where it can (bfloat16 is reinterpreted)."""
        import torch
        import warnings

        with warnings.catch_warnings():  # frames are read-only; callers copy out of them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(self.array)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t


# ----------------------------------------------------------------------------------------------
# encoding

def wire_dtype(array) -> str:
    """The wire name of a numpy array's or torch tensor's dtype."""
    dt = array.dtype
    name = dt.name if isinstance(dt, np.dtype) else str(dt).replace("torch.", "")
    if name not in DTYPES:
        raise ProtocolError("bad_tensor", f"dtype {name} cannot go on the wire")
    return name


def as_wire_array(t) -> np.ndarray:
    """A C-contiguous little-endian numpy view of a numpy array or a CPU torch tensor."""
    if hasattr(t, "detach"):  # torch
        import torch

        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
            return t.numpy().view(np.uint16)
        return t.numpy()
    a = np.ascontiguousarray(t)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def encode(header: dict, tensors: Iterable[tuple[str, Any]] = ()) -> list:
    """Frames for one message: the msgpack header (with its ``tensors`` list filled in)
    followed by one buffer per tensor. Buffers are numpy views: nothing is copied here."""
    header = dict(header)
    specs, buffers = [], []
    for name, t in tensors:
        dtype = "bfloat16" if "bfloat16" in str(t.dtype) else wire_dtype(t)
        a = as_wire_array(t)
        specs.append({"name": name, "dtype": dtype, "shape": list(a.shape)})
        buffers.append(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
    if specs:
        header["tensors"] = specs
    elif header.get("tensors"):
        raise ValueError("header lists tensors but none were given to encode")
    return [msgpack.packb(header, use_bin_type=True)] + buffers


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


# ----------------------------------------------------------------------------------------------
# decoding

def _buffer(frame) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return frame.buffer
    return memoryview(frame)


def decode_header(frame) -> dict:
    buf = _buffer(frame)
    if buf.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {buf.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several types for garbage
        raise ProtocolError("bad_request", f"header is not valid msgpack: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_request", f"header must be a map, got {type(header).__name__}")
    return header


def parse_specs(header: dict) -> list[dict]:
    specs = header.get("tensors", [])
    if not isinstance(specs, list):
        raise ProtocolError("bad_request", "'tensors' must be a list")
    if len(specs) > MAX_TENSORS:
        raise ProtocolError("too_large", f"{len(specs)} tensors exceed {MAX_TENSORS}")
    for i, s in enumerate(specs):
        if not isinstance(s, dict):
            raise ProtocolError("bad_request", f"tensors[{i}] must be a map")
        name, dtype, shape = s.get("name"), s.get("dtype"), s.get("shape")
        if not isinstance(name, str):
            raise ProtocolError("bad_request", f"tensors[{i}].name must be a string")
        if dtype not in DTYPES:
            raise ProtocolError("bad_tensor", f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ProtocolError("bad_request", f"tensor {name!r}: shape must be a list of ints >= 0")
    return specs


def decode(frames: Sequence, max_bytes: int | None = None) -> tuple[dict, list[Tensor]]:
    """Header and tensors of one message. Raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("bad_request", "empty message")
    header = decode_header(frames[0])
    specs = parse_specs(header)
    if len(frames) - 1 != len(specs):
        raise ProtocolError(
            "bad_request", f"header lists {len(specs)} tensors but {len(frames) - 1} frames follow"
        )
    total = 0
    tensors = []
    for spec, frame in zip(specs, frames[1:]):
        buf = _buffer(frame)
        total += buf.nbytes
        if max_bytes is not None and total > max_bytes:
            raise ProtocolError("too_large", f"message exceeds {max_bytes} bytes")
        dt = DTYPES[spec["dtype"]]
        count = math.prod(spec["shape"])   # exact: no overflow on absurd shapes
        if buf.nbytes != count * dt.itemsize:
            raise ProtocolError(
                "bad_tensor",
                f"tensor {spec['name']!r}: frame has {buf.nbytes} bytes, "
                f"{spec['dtype']}{spec['shape']} needs {count * dt.itemsize}",
            )
        try:
            array = np.frombuffer(buf, dtype=dt, count=count).reshape(spec["shape"])
        except ValueError as e:   # a zero-size shape with a dimension numpy cannot hold
            raise ProtocolError("bad_tensor", f"tensor {spec['name']!r}: shape "
                                f"{spec['shape']} cannot be held: {e}") from None
        tensors.append(Tensor(spec["name"], spec["dtype"], array))
    return header, tensors


def error_reply(request_id, code: str, message: str) -> dict:
    return {"ok": False, "id": request_id, "error": code, "message": message}


assert sys.byteorder == "little", "asgd's zero-copy frames assume a little-endian host"
