"""Wire protocol, version 1: the message schema and the frame codec both sides share.

A message is a list of frames. Frame 0 is a msgpack map (the header); frames 1..n are the raw
little-endian, C-contiguous bytes of the tensors that the header's ``tensors`` list describes,
one frame each, in order. Nothing is pickled. No sockets live here: ``encode`` and ``decode``
turn headers and arrays into frames and back, and raise ``ProtocolError`` on anything malformed.

    frames = encode(request_header("pull", 1, "w0"), [("fc.weight", array), ...])
    header, tensors = decode(frames)      # tensors: list of Tensor(name, dtype, array)
    request = check_request(frames)       # the server's side: the schema, or ProtocolError

The schema lives here too: the ops and their fields (``REQUEST_FIELDS``), the error codes,
the limits and the encodings; the server answers what ``check_request`` refuses with an error
reply and checks the rest against its own state.

See docs/protocol.md for the full description.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

from asgd.core import encoding

PROTOCOL_VERSION = 1

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
    "int8": np.dtype("i1"),
}

MAX_HEADER_BYTES = 1 << 20       # a header is metadata: a MiB is generous
MAX_TENSORS = 1 << 16            # tensors in one message
MAX_WORKER_ID = 256              # characters of a worker id
WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+/-]*\Z")   # letters, digits and _.:@+/-
MAX_SEQ = (1 << 63) - 1          # a push's sequence number: a non-negative int64

# The ops and the fields each request may carry besides v, op, id and worker:
# field -> (python type, required). Only push and push_pull carry tensors.
#   flat     the tensors are one vector (every parameter in layout order) in chunks, not one
#            frame per parameter; in a pull or push_pull, the weights come back that way too
#   encoding how a flat push's gradient is encoded (ENCODINGS); ``enc`` carries its settings
#   weights  how flat weights come back: float32 ("none"), or "fp16" / "bf16"
#   shm      hello: the path of the worker's shared-memory segment (asgd.core.shm); push,
#            push_pull: the gradient is in the segment's slot ``shm``; pull, push_pull: the
#            weights go into the segment, and no tensor frame travels either way
#   seq      push, push_pull: the worker's sequence number of this push; a push sent again
#            with the same (worker, seq) is answered from memory, never applied twice (only
#            for a worker that said hello: a push with seq before hello is refused)
#   settings hello: the settings the worker's behaviour depends on and the server owns
#            (optimizer, schedule, max_updates, local_steps, outer); a server without a model
#            adopts them with the model, one with a model compares them (server.adopt)
# hello may carry tensors: the worker's parameter list and its initial weights, float32
REQUEST_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "hello": {"rank": (int, False), "shm": (str, False), "settings": (dict, False)},
    "pull": {"flat": (bool, False), "weights": (str, False), "shm": (bool, False)},
    "push": {"version": (int, True), "encoding": (str, False), "enc": (dict, False),
             "flat": (bool, False), "shm": (int, False), "seq": (int, False)},
    "push_pull": {"version": (int, True), "encoding": (str, False), "enc": (dict, False),
                  "flat": (bool, False), "shm": (int, False), "weights": (str, False),
                  "seq": (int, False)},
    "stats": {},
    "bye": {},
}
OPS = tuple(REQUEST_FIELDS)
TENSOR_OPS = ("push", "push_pull")
MODEL_OPS = ("hello",)           # ops whose tensors are a parameter list and its weights
# gradient encodings of a flat push, and of flat weights in a reply: asgd.core.encoding's
ENCODINGS, WEIGHT_ENCODINGS = encoding.ENCODINGS, encoding.WEIGHT_ENCODINGS
MAX_SHM_PATH = 4096

# The local socket (server.local): a worker on the server's host that said hello with a mapped
# segment is offered, in the hello's "shm" reply, a unix SOCK_SEQPACKET socket and a token.
# The connection's first datagram is the greeting {"worker", "token"}, answered {"ok": true}
# (or an error reply, and the connection closes); after it every datagram is one request
# header, and one reply header comes back. No datagram is larger than MAX_LOCAL_DATAGRAM.
LOCAL_GREETING_FIELDS = {"worker": str, "token": str}
MAX_LOCAL_DATAGRAM = 1 << 16     # a shared-memory request or reply is ~100 bytes


class ProtocolError(Exception):
    """A message that cannot be accepted; ``code`` is one of ERROR_CODES. ``request_id`` is
    the request's id when it could be read (the error reply echoes it)."""

    def __init__(self, code: str, message: str, request_id: int | None = None):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


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
        # explicit limits: no bin or ext values at all (tensors travel as frames), no string,
        # list or map longer than a header can need
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True, max_bin_len=0,
                                 max_ext_len=0, max_str_len=MAX_HEADER_BYTES,
                                 max_array_len=MAX_TENSORS, max_map_len=MAX_TENSORS)
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


def decode(frames: Sequence, max_bytes: int | None = None, header: dict | None = None
           ) -> tuple[dict, list[Tensor]]:
    """Header and tensors of one message (``header``: the first frame already decoded).
    Raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("bad_request", "empty message")
    if header is None:
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


def local_greeting(worker: str, token: str) -> bytes:
    """The first datagram on a local connection: the worker and its hello's token."""
    return pack_header({"worker": worker, "token": token})


def check_local_greeting(data: bytes) -> tuple[str, str]:
    """(worker, token) of a local connection's greeting; ProtocolError if it is not one."""
    if len(data) > MAX_LOCAL_DATAGRAM:
        raise ProtocolError("too_large", f"greeting of {len(data)} bytes")
    h = decode_header(data)
    for name, tp in LOCAL_GREETING_FIELDS.items():
        if not isinstance(h.get(name), tp) or not h[name]:
            raise ProtocolError("bad_request", f"the greeting needs '{name}', a string")
    return h["worker"], h["token"]


def error_reply(request_id, code: str, message: str) -> dict:
    return {"ok": False, "id": request_id, "error": code, "message": message}


# ----------------------------------------------------------------------------------------------
# requests: the schema both sides follow

def request_header(op: str, request_id: int, worker: str, **fields) -> dict:
    """A request header (the client's side of the schema)."""
    return {"v": PROTOCOL_VERSION, "op": op, "id": request_id, "worker": worker, **fields}


@dataclass(frozen=True)
class Request:
    """One request that passed ``check_request``: every field has the schema's type."""

    id: int
    op: str
    worker: str
    header: dict
    tensors: list          # of Tensor, only for push and push_pull
    nbytes: int            # the whole message

    def get(self, field: str, default=None):
        return self.header.get(field, default)


_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false", dict: "a map"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def frame_nbytes(frame) -> int:
    return _buffer(frame).nbytes


def check_request(frames: Sequence, max_bytes: int | None = None) -> Request:
    """Validate one request against the schema: header, id, size, protocol version, op,
    worker id, the op's fields and types, and the tensors' frames. Raises ProtocolError
    (with ``request_id`` once the id is known); the server then checks what depends on its
    state (versions, the parameter list, finiteness)."""
    nbytes = sum(frame_nbytes(f) for f in frames)
    if not frames:
        raise ProtocolError("bad_request", "empty message")
    h = decode_header(frames[0])
    rid = h.get("id")
    if not _is_int(rid):
        raise ProtocolError("bad_request", "'id' must be an integer")

    def fail(code: str, message: str):
        raise ProtocolError(code, message, rid)

    if max_bytes is not None and nbytes > max_bytes:
        fail("too_large", f"message of {nbytes} bytes exceeds {max_bytes}")
    v = h.get("v")
    if not _is_int(v):
        fail("bad_request", "'v' (protocol version) must be an integer")
    if v != PROTOCOL_VERSION:
        fail("bad_version", f"protocol version {v} is not supported "
             f"(this server speaks {PROTOCOL_VERSION})")
    op = h.get("op")
    if not isinstance(op, str):
        fail("bad_request", "'op' must be a string")
    if op not in REQUEST_FIELDS:
        fail("unknown_op", f"unknown op {op!r} (known: {', '.join(OPS)})")
    w = h.get("worker")
    if not isinstance(w, str) or not w or len(w) > MAX_WORKER_ID or not WORKER_ID.match(w):
        fail("bad_request", f"'worker' must be a non-empty string of at most {MAX_WORKER_ID} "
             "characters: letters, digits and _.:@+/- (starting with a letter or digit)")
    for name, (tp, required) in REQUEST_FIELDS[op].items():
        value = h.get(name)
        if value is None:
            if required:
                fail("bad_request", f"{op} needs '{name}'")
            continue
        if tp is int and not _is_int(value) or tp is not int and not isinstance(value, tp):
            fail("bad_request", f"'{name}' must be {_TYPE_NAMES[tp]}")
    if h.get("seq") is not None and not 0 <= h["seq"] <= MAX_SEQ:
        fail("bad_request", "'seq' must be an integer in [0, 2^63)")
    if op == "hello" and h.get("rank") is not None and h["rank"] < 0:
        fail("bad_request", "'rank' must be a non-negative integer")
    if op == "hello" and h.get("shm") is not None and not 0 < len(h["shm"]) <= MAX_SHM_PATH:
        fail("bad_request", f"'shm' must be a path of at most {MAX_SHM_PATH} characters")
    encoding = h.get("encoding")
    if encoding not in (None, *ENCODINGS):
        fail("bad_request", f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    if encoding not in (None, "none") and not h.get("flat"):
        fail("bad_request", f"encoding {encoding!r} needs a flat push ('flat': true)")
    if h.get("weights") not in (None, *WEIGHT_ENCODINGS):
        fail("bad_request", f"unknown weights encoding {h['weights']!r} "
             f"(known: {', '.join(WEIGHT_ENCODINGS)})")
    if h.get("weights") not in (None, "none") and not h.get("flat"):
        fail("bad_request", f"weights {h['weights']!r} needs the flat form ('flat': true)")
    shm = h.get("shm")
    if op in TENSOR_OPS and shm is not None:
        if shm < 0:
            fail("bad_request", "'shm' (a gradient slot) must be >= 0")
        if len(frames) > 1 or h.get("flat") or encoding not in (None, "none"):
            fail("bad_request", "a push through shared memory carries no frames, flat or "
                 "encoding")
    try:
        _, tensors = decode(frames, max_bytes, h)
    except ProtocolError as e:
        fail(e.code, e.message)
    if tensors and op not in TENSOR_OPS + MODEL_OPS:
        fail("bad_request", f"{op} takes no tensors")
    return Request(rid, op, w, h, tensors, nbytes)


assert sys.byteorder == "little", "asgd's zero-copy frames assume a little-endian host"
