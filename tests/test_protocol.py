"""The frame codec (asgd.protocol): round trips of every wire dtype and malformed input."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
import zmq

from asgd.core import protocol
from asgd.core.protocol import MAX_HEADER_BYTES, ProtocolError, decode, encode

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,
}


def sample(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    high = 120 if dtype == torch.int8 else 250
    return torch.randint(0, high, shape, generator=g).to(dtype)


def spec_header(*specs) -> bytes:
    return msgpack.packb({"tensors": list(specs)}, use_bin_type=True)


def test_wire_dtypes_are_the_designed_set():
    assert set(protocol.DTYPES) == set(TORCH_DTYPES)


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("shape", [(3, 5), (7,), (), (2, 3, 4)])
def test_round_trip_every_dtype_via_torch(name, shape):
    t = sample(TORCH_DTYPES[name], shape)
    header, tensors = decode(encode({"op": "push", "id": 3}, [("w", t)]))
    assert header["op"] == "push" and header["id"] == 3
    assert header["tensors"] == [{"name": "w", "dtype": name, "shape": list(shape)}]
    (out,) = tensors
    assert (out.name, out.dtype, out.array.shape) == ("w", name, tuple(shape))
    back = out.to_torch()
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)
    # bitwise: the frame holds exactly the tensor's little-endian bytes
    assert out.array.tobytes() == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", ["float32", "float16", "int64", "int32", "uint8", "int8"])
def test_round_trip_numpy_arrays(name):
    a = sample(TORCH_DTYPES[name], (4, 3), seed=1).numpy()
    _, (out,) = decode(encode({}, [("a", a)]))
    assert out.dtype == name
    np.testing.assert_array_equal(out.array, a)


def test_bfloat16_travels_as_two_byte_words():
    t = torch.tensor([1.0, -2.5, 3.140625, 0.0], dtype=torch.bfloat16)
    frames = encode({}, [("b", t)])
    assert memoryview(frames[1]).nbytes == 2 * t.numel()
    _, (out,) = decode(frames)
    assert out.array.dtype == np.dtype("<u2")
    assert torch.equal(out.to_torch(), t)


def test_several_tensors_keep_their_order_and_names():
    items = [("a", sample(torch.float32, (2, 2))), ("b", sample(torch.int64, (3,))),
             ("c", sample(torch.bfloat16, (1, 4))), ("d", sample(torch.uint8, (5,)))]
    header, tensors = decode(encode({"op": "pull"}, items))
    assert [t.name for t in tensors] == ["a", "b", "c", "d"]
    assert [s["name"] for s in header["tensors"]] == ["a", "b", "c", "d"]
    for (_, t), out in zip(items, tensors):
        assert torch.equal(out.to_torch(), t)


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4)])
def test_zero_size_tensors(name, shape):
    t = torch.zeros(shape, dtype=TORCH_DTYPES[name])
    frames = encode({}, [("empty", t), ("one", torch.ones(2, dtype=TORCH_DTYPES[name]))])
    assert memoryview(frames[1]).nbytes == 0
    _, (empty, one) = decode(frames)
    assert empty.array.shape == shape and empty.dtype == name
    assert empty.to_torch().shape == t.shape and empty.to_torch().dtype == t.dtype
    assert torch.equal(one.to_torch(), torch.ones(2, dtype=TORCH_DTYPES[name]))


def test_non_contiguous_tensor_is_sent_contiguous():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # (4, 3), not contiguous
    assert not t.is_contiguous()
    _, (out,) = decode(encode({}, [("t", t)]))
    assert out.array.shape == (4, 3)
    assert torch.equal(out.to_torch(), t)


def test_big_endian_array_goes_little_endian():
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    frames = encode({}, [("a", a)])
    assert bytes(frames[1]) == np.arange(6, dtype="<f4").tobytes()
    _, (out,) = decode(frames)
    np.testing.assert_array_equal(out.array, a)


def test_decode_accepts_zmq_frames():
    t = sample(torch.float32, (3, 2))
    frames = [zmq.Frame(bytes(f)) for f in encode({"op": "x"}, [("t", t)])]
    _, (out,) = decode(frames)
    assert torch.equal(out.to_torch(), t)


def test_header_without_tensors_is_one_frame():
    frames = encode({"op": "stats", "id": 1})
    assert len(frames) == 1
    header, tensors = decode(frames)
    assert header == {"op": "stats", "id": 1} and tensors == []


def test_encode_refuses_a_dtype_that_has_no_wire_name():
    with pytest.raises(ProtocolError) as e:
        encode({}, [("x", torch.zeros(2, dtype=torch.float64))])
    assert e.value.code == "bad_tensor"


# ----------------------------------------------------------------------------------------------
# malformed input: ProtocolError with the right code

MALFORMED = {
    "no frames": ([], "bad_request"),
    "not msgpack": ([b"\xc1\xc1\xc1"], "bad_request"),
    "empty header frame": ([b""], "bad_request"),
    "truncated msgpack": ([msgpack.packb({"op": "pull", "id": 1})[:-2]], "bad_request"),
    "header is a list": ([msgpack.packb([1, 2, 3])], "bad_request"),
    "header is an int": ([msgpack.packb(7)], "bad_request"),
    "header is a string": ([msgpack.packb("pull")], "bad_request"),
    "tensors not a list": ([msgpack.packb({"tensors": {"name": "a"}})], "bad_request"),
    "tensor entry not a map": ([spec_header("a"), b""], "bad_request"),
    "tensor name not a string": (
        [spec_header({"name": 3, "dtype": "float32", "shape": [1]}), b"\0" * 4], "bad_request"),
    "more frames than tensors": (
        [spec_header({"name": "a", "dtype": "float32", "shape": [1]}), b"\0" * 4, b"\0" * 4],
        "bad_request"),
    "fewer frames than tensors": (
        [spec_header({"name": "a", "dtype": "float32", "shape": [1]},
                     {"name": "b", "dtype": "float32", "shape": [1]}), b"\0" * 4],
        "bad_request"),
    "frame but no tensors listed": ([msgpack.packb({"op": "pull"}), b"\0" * 4], "bad_request"),
    "frame too short": (
        [spec_header({"name": "a", "dtype": "float32", "shape": [3]}), b"\0" * 8], "bad_tensor"),
    "frame too long": (
        [spec_header({"name": "a", "dtype": "int64", "shape": [2, 2]}), b"\0" * 33],
        "bad_tensor"),
    "scalar with empty frame": (
        [spec_header({"name": "a", "dtype": "float32", "shape": []}), b""], "bad_tensor"),
    "unknown dtype float64": (
        [spec_header({"name": "a", "dtype": "float64", "shape": [1]}), b"\0" * 8], "bad_tensor"),
    "unknown dtype complex64": (
        [spec_header({"name": "a", "dtype": "complex64", "shape": [1]}), b"\0" * 8],
        "bad_tensor"),
    "dtype not a string": (
        [spec_header({"name": "a", "dtype": 4, "shape": [1]}), b"\0" * 4], "bad_tensor"),
    "shape not a list": (
        [spec_header({"name": "a", "dtype": "float32", "shape": 3}), b"\0" * 12], "bad_request"),
    "shape missing": ([spec_header({"name": "a", "dtype": "float32"}), b"\0" * 4], "bad_request"),
    "negative dimension": (
        [spec_header({"name": "a", "dtype": "float32", "shape": [-1]}), b""], "bad_request"),
    "float dimension": (
        [spec_header({"name": "a", "dtype": "float32", "shape": [1.5]}), b"\0" * 4],
        "bad_request"),
    "bool dimension": (
        [spec_header({"name": "a", "dtype": "float32", "shape": [True]}), b"\0" * 4],
        "bad_request"),
    "string dimension": (
        [spec_header({"name": "a", "dtype": "float32", "shape": ["2"]}), b"\0" * 8],
        "bad_request"),
    "header too large": ([msgpack.packb({"pad": "x" * (MAX_HEADER_BYTES + 1)})], "too_large"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_raises_protocol_error(case):
    frames, code = MALFORMED[case]
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code == code, str(e.value)
    assert e.value.message


@pytest.mark.parametrize("shape", [[2**62, 2**62], [2**40, 2**40, 2**40], [0, 2**63]],
                         ids=["2^62x2^62", "2^40x2^40x2^40", "0x2^63"])
def test_shape_whose_size_overflows_is_a_protocol_error(shape):
    """An element count past int64 must not wrap around to match an empty frame: the codec
    answers a ProtocolError (byte size mismatch), never a bare ValueError from numpy."""
    frames = [spec_header({"name": "a", "dtype": "float32", "shape": shape}), b""]
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code in ("bad_tensor", "bad_request")


def test_max_bytes_limits_the_tensor_frames():
    frames = encode({}, [("a", torch.zeros(100)), ("b", torch.zeros(100))])
    decode(frames, max_bytes=800)
    with pytest.raises(ProtocolError) as e:
        decode(frames, max_bytes=799)
    assert e.value.code == "too_large"


def test_error_reply_shape():
    assert protocol.error_reply(5, "bad_tensor", "why") == {
        "ok": False, "id": 5, "error": "bad_tensor", "message": "why"}
