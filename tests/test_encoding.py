"""Wire encodings of a flat float32 vector (asgd.core.encoding): round trips and their error
bounds, sizes, error feedback, and every kind of malformed input refused with EncodingError."""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch

from asgd.core import encoding
from asgd.core.encoding import (ENCODINGS, EncodingError, ErrorFeedback, decode,
                                decode_into_tensor, encode, encoded_nbytes)

LOSSY = ("fp16", "bf16", "int8", "topk")


def vector(numel: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g) * scale


def as_frames(arrays) -> list[np.ndarray]:
    """The arrays as a receiver sees them: read-only views of bytes off the wire."""
    return [np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape) for a in arrays]


def over_wire(meta: dict) -> dict:
    """``meta`` after a msgpack round trip, as it arrives in a header."""
    return msgpack.unpackb(msgpack.packb(meta, use_bin_type=True), raw=False)


def round_trip(name: str, flat: torch.Tensor, **kw) -> np.ndarray:
    meta, arrays = encode(name, flat, **kw)
    out = np.full(flat.numel(), 123.0, dtype=np.float32)   # garbage decode must overwrite
    decode(over_wire(meta), as_frames(arrays), out)
    return out


# ----------------------------------------------------------------------------------------------
# the encodings

def test_none_is_exact_and_a_view():
    x = vector(1000)
    meta, arrays = encode("none", x)
    assert meta == {"encoding": "none", "numel": 1000}
    (values,) = arrays
    assert values.dtype == np.float32 and np.shares_memory(values, x.numpy())
    np.testing.assert_array_equal(round_trip("none", x), x.numpy())


@pytest.mark.parametrize("name, bound", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_half_precision_relative_error(name, bound):
    # Within each type's normal range rounding to nearest is off by at most half an ulp.
    x = vector(10_000, scale=100.0)
    x = x[x.abs() > 1e-3].contiguous()
    out = round_trip(name, x)
    rel = np.abs(out - x.numpy()) / np.abs(x.numpy())
    assert rel.max() <= bound
    assert rel.max() > bound / 4          # and it is that type's rounding, not a wider one


def test_bf16_words_are_torch_bfloat16():
    x = vector(4096, scale=1e3)
    _, (words,) = encode("bf16", x)
    assert words.dtype == np.uint16
    np.testing.assert_array_equal(words, x.to(torch.bfloat16).view(torch.int16).numpy()
                                  .view(np.uint16))
    np.testing.assert_array_equal(round_trip("bf16", x), x.to(torch.bfloat16).float().numpy())


def test_fp16_saturates_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 65519.0, 70000.0, -3e38, 1.0, 0.0], dtype=torch.float32)
    _, (values,) = encode("fp16", x)
    assert values.dtype == np.float16 and np.isfinite(values).all()
    np.testing.assert_array_equal(round_trip("fp16", x),
                                  [65504, -65504, 65504, 65504, -65504, 1, 0])


def test_bf16_saturates_instead_of_overflowing():
    big = float(np.finfo(np.float32).max)
    out = round_trip("bf16", torch.tensor([big, -big, 2.0]))
    bf16_max = torch.finfo(torch.bfloat16).max
    np.testing.assert_array_equal(out, [bf16_max, -bf16_max, 2.0])


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_non_finite_input_encodes_but_does_not_decode(name, bad):
    x = vector(600)
    x[17] = bad
    meta, arrays = encode(name, x, topk_ratio=0.05)
    with pytest.raises(EncodingError, match=f"^{name}: .*finite"):
        decode(meta, as_frames(arrays), np.empty(600, np.float32))


def int8_error_bound(x: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Half a step of each value's block, with room for float32's own rounding."""
    per_value = np.repeat(scales, block)[: x.size]
    return per_value / 2 * (1 + 1e-4) + 1e-30


@pytest.mark.parametrize("numel, block", [(4096, 256), (1000, 256), (1000, 64), (5, 256),
                                          (257, 1), (300, 300)])
def test_int8_error_at_most_half_a_step(numel, block):
    x = vector(numel, seed=numel, scale=3.0)
    x[: min(block, numel) // 2] *= 1000             # blocks of very different magnitudes
    meta, (scales, codes) = encode("int8", x, block=block)
    assert meta == {"encoding": "int8", "numel": numel, "block": block}
    assert scales.dtype == np.float32 and scales.size == math.ceil(numel / block)
    assert codes.dtype == np.int8 and codes.size == numel
    assert np.abs(codes).max() == 127                # each block's absmax maps to +-127
    expected = [np.abs(x.numpy()[i:i + block]).max() / 127 for i in range(0, numel, block)]
    np.testing.assert_allclose(scales, expected, rtol=1e-6)
    err = np.abs(round_trip("int8", x, block=block) - x.numpy())
    assert (err <= int8_error_bound(x.numpy(), scales, block)).all()


def test_int8_zero_blocks_and_short_last_block():
    x = vector(1000, scale=5.0)
    x[256:512] = 0                                   # block 1 is all zeros
    x[768:] = 0                                      # and so is the short last one (232 values)
    meta, (scales, codes) = encode("int8", x, block=256)
    assert scales.size == 4 and scales[1] == 0 and scales[3] == 0
    assert (codes[256:512] == 0).all() and (codes[768:] == 0).all()
    out = round_trip("int8", x, block=256)
    assert (out[256:512] == 0).all() and (out[768:] == 0).all()
    assert np.abs(out[:256] - x.numpy()[:256]).max() <= scales[0] / 2 * (1 + 1e-4)


def test_topk_keeps_the_largest_magnitudes():
    x = vector(1000, seed=3)
    x[[5, 500, 999]] = torch.tensor([-50.0, 40.0, -30.0])
    meta, (indices, values) = encode("topk", x, topk_ratio=0.01)
    assert meta == {"encoding": "topk", "numel": 1000, "k": 10}
    assert indices.dtype == np.int32 and values.dtype == np.float32
    assert (np.diff(indices) > 0).all()
    expected = np.sort(np.argsort(-np.abs(x.numpy()))[:10])
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(values, x.numpy()[expected])
    out = round_trip("topk", x, topk_ratio=0.01)     # out was prefilled with garbage
    kept = np.zeros(1000, dtype=bool)
    kept[expected] = True
    np.testing.assert_array_equal(out[kept], x.numpy()[kept])
    assert (out[~kept] == 0).all()


@pytest.mark.parametrize("numel, ratio, k", [
    (1000, 0.01, 10), (150, 0.01, 2), (10, 0.001, 1), (1, 0.5, 1), (100, 0.07, 7),
    (100, 1.0, 100), (100_000, 0.01, 1000), (7, 0.999, 7), (3, 0.34, 2),
])
def test_topk_k_rounds_up(numel, ratio, k):
    assert encoding.topk_k(numel, ratio) == k
    meta, (indices, values) = encode("topk", vector(numel), topk_ratio=ratio)
    assert meta["k"] == k and indices.size == values.size == k


def test_topk_index_width():
    assert encoding.index_dtype(2 ** 31 - 1) == np.int32
    assert encoding.index_dtype(2 ** 31) == np.int64
    assert encoded_nbytes("topk", 2 ** 31, topk_ratio=0.01) == math.ceil(2 ** 31 / 100) * 12


@pytest.mark.parametrize("name", ENCODINGS)
def test_empty_vector(name):
    meta, arrays = encode(name, torch.empty(0))
    out = np.empty(0, np.float32)
    decode(over_wire(meta), as_frames(arrays), out)
    assert sum(a.nbytes for a in arrays) == encoded_nbytes(name, 0) == 0


@pytest.mark.parametrize("name", ENCODINGS)
def test_meta_is_plain_msgpack(name):
    meta, arrays = encode(name, vector(100))
    assert over_wire(meta) == meta
    assert all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in meta.values())
    assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)


# ----------------------------------------------------------------------------------------------
# sizes

@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("numel", [1, 255, 256, 1000, 100_000])
def test_encoded_nbytes_matches_the_arrays(name, numel):
    kw = {"topk_ratio": 0.003, "block": 128}
    _, arrays = encode(name, vector(numel), **kw)
    assert sum(a.nbytes for a in arrays) == encoded_nbytes(name, numel, **kw)


def test_encoded_sizes():
    n = 100_000
    raw = encoded_nbytes("none", n)
    assert raw == 4 * n
    assert encoded_nbytes("fp16", n) * 2 == raw == encoded_nbytes("bf16", n) * 2
    assert encoded_nbytes("topk", n, topk_ratio=0.01) * 20 <= raw     # 8 kB against 400 kB
    assert encoded_nbytes("int8", n, block=256) == 4 * math.ceil(n / 256) + n


def test_bad_arguments_to_encode():
    with pytest.raises(ValueError, match="unknown encoding"):
        encode("zip", vector(10))
    with pytest.raises(ValueError, match="unknown encoding"):
        encoded_nbytes("zip", 10)
    for ratio in (0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="topk_ratio"):
            encode("topk", vector(10), topk_ratio=ratio)
    for block in (0, -1, 2.5):
        with pytest.raises(ValueError, match="block"):
            encode("int8", vector(10), block=block)
    for flat in (vector(10).double(), vector(10)[::2], vector(12).view(3, 4), np.zeros(3)):
        with pytest.raises(ValueError, match="1-D contiguous float32"):
            encode("fp16", flat)


# ----------------------------------------------------------------------------------------------
# decode_into_tensor

@pytest.mark.parametrize("name", ENCODINGS)
def test_decode_into_tensor(name):
    x = vector(500)
    meta, arrays = encode(name, x, topk_ratio=0.1)
    flat = torch.full((500,), 7.0)
    decode_into_tensor(meta, as_frames(arrays), flat)
    expected = np.empty(500, np.float32)
    decode(meta, arrays, expected)
    np.testing.assert_array_equal(flat.numpy(), expected)
    weights = torch.zeros(20, 25, requires_grad=True)        # a parameter-like tensor
    decode_into_tensor(meta, arrays, weights)
    np.testing.assert_array_equal(weights.detach().numpy().reshape(-1), expected)
    with pytest.raises(ValueError, match="float32"):
        decode_into_tensor(meta, arrays, torch.zeros(500, dtype=torch.float64))
    with pytest.raises(EncodingError, match="expects 499"):
        decode_into_tensor(meta, arrays, torch.zeros(499))


# ----------------------------------------------------------------------------------------------
# error feedback

def drifting_gradients(numel: int, steps: int, seed: int = 0):
    """A fixed direction plus noise, as minibatch gradients are."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(numel, generator=g) * 0.1
    for _ in range(steps):
        yield mean + torch.randn(numel, generator=g)


@pytest.mark.parametrize("name", LOSSY)
def test_error_feedback_sums_to_the_true_gradients(name):
    numel, steps = 2000, 300
    kw = {"topk_ratio": 0.01, "block": 256}
    ef = ErrorFeedback(numel)
    true_sum = torch.zeros(numel, dtype=torch.float64)
    sent_sum = torch.zeros(numel, dtype=torch.float64)
    plain_sum = torch.zeros(numel, dtype=torch.float64)      # the same encoding without feedback
    out = np.empty(numel, np.float32)
    residual_norms = []
    for grad in drifting_gradients(numel, steps):
        before = grad.clone()
        meta, arrays = ef.encode(name, grad, **kw)
        assert torch.equal(grad, before)                     # the caller's gradient is untouched
        decode(over_wire(meta), as_frames(arrays), out)
        true_sum += grad
        sent_sum += torch.from_numpy(out)
        decode(*encode(name, grad, **kw), out)
        plain_sum += torch.from_numpy(out)
        residual_norms.append(float(ef.residual.norm()))
    # What was sent plus what is owed is what was computed, up to float32 rounding.
    torch.testing.assert_close(sent_sum + ef.residual.double(), true_sum, atol=1e-3, rtol=0)
    # The residual stays bounded while the sum grows with the number of steps.
    assert max(residual_norms[steps // 2:]) < 1.5 * max(residual_norms[: steps // 2])
    rel = float((sent_sum - true_sum).norm() / true_sum.norm())
    plain_rel = float((plain_sum - true_sum).norm() / true_sum.norm())
    if name == "topk":
        assert rel < 0.25 and plain_rel > 0.9      # without feedback most values never arrive
    else:
        assert rel < 1e-3 and rel < plain_rel / 5  # and rounding errors do not pile up


def test_error_feedback_none_is_a_pass_through():
    ef = ErrorFeedback(100)
    x = vector(100)
    meta, (values,) = ef.encode("none", x)
    assert meta == {"encoding": "none", "numel": 100}
    assert np.shares_memory(values, x.numpy())
    assert not ef.residual.any()


def test_error_feedback_switching_to_none_flushes_the_residual():
    ef = ErrorFeedback(100)
    a, b = vector(100, seed=1), vector(100, seed=2)
    out = np.empty(100, np.float32)
    decode(*ef.encode("topk", a, topk_ratio=0.05), out)
    sent = out.copy()
    assert ef.residual.any()
    decode(*ef.encode("none", b), out)
    np.testing.assert_allclose(sent + out, (a + b).numpy(), atol=1e-6)
    assert not ef.residual.any()
    meta, (values,) = ef.encode("none", b)                   # nothing owed: a view again
    assert np.shares_memory(values, b.numpy())


def test_error_feedback_reset_and_refusals():
    ef = ErrorFeedback(100)
    ef.encode("int8", vector(100), block=16)
    kept = ef.residual.clone()
    assert kept.any()
    bad = vector(100, seed=5)
    bad[3] = math.nan
    with pytest.raises(EncodingError, match="finite"):
        ef.encode("int8", bad, block=16)
    assert torch.equal(ef.residual, kept)                    # a refused gradient owes nothing
    with pytest.raises(ValueError, match="100 values"):
        ef.encode("fp16", vector(99))
    ef.reset()
    assert not ef.residual.any()


# ----------------------------------------------------------------------------------------------
# validation: whatever arrives, decode refuses it with EncodingError naming the fault

def encoded(name: str, numel: int = 1000, **kw):
    x = vector(numel, seed=7)
    meta, arrays = encode(name, x, topk_ratio=kw.pop("topk_ratio", 0.01),
                          block=kw.pop("block", 256))
    return over_wire(meta), as_frames(arrays)


def with_meta(meta: dict, **changes) -> dict:
    meta = dict(meta, **changes)
    return {k: v for k, v in meta.items() if v is not _DROP}


_DROP = object()


def replaced(arrays, i: int, new) -> list:
    arrays = list(arrays)
    arrays[i] = new
    return arrays


def topk_case(change):
    meta, (indices, values) = encoded("topk")
    indices, values = indices.copy(), values.copy()
    change(indices, values)
    return meta, [indices, values]


def _dup(i, v):
    i[4] = i[3]


def _unsorted(i, v):
    i[3], i[4] = i[4], i[3]


def _negative(i, v):
    i[0] = -1


def _too_big(i, v):
    i[-1] = 1000


def _nan_value(i, v):
    v[2] = np.nan


def _inf_value(i, v):
    v[2] = -np.inf


def int8_scales(value: float, at: int = 1):
    meta, (scales, codes) = encoded("int8")
    scales = scales.copy()
    scales[at] = value
    return meta, [scales, codes]


def _cases():
    m, a = encoded("none")
    yield "none wrong numel", with_meta(m, numel=999), a, "encodes 999 values"
    yield "none numel not int", with_meta(m, numel="1000"), a, "'numel' must be an integer"
    yield "none numel bool", with_meta(m, numel=True), a, "'numel' must be an integer"
    yield "none numel missing", with_meta(m, numel=_DROP), a, "'numel' must be an integer"
    yield "none numel negative", with_meta(m, numel=-1), a, "'numel' must be an integer"
    yield "none bad dtype", m, [a[0].astype(np.float64)], "must be float32, got float64"
    yield "none big-endian", m, [a[0].astype(">f4")], "must be float32"
    yield "none short", m, [a[0][:-1]], "1-D of 1000 values"
    yield "none 2-D", m, [a[0].reshape(10, 100)], "1-D of 1000 values"
    yield "none no arrays", m, [], "0 arrays, expected 1"
    yield "none two arrays", m, a * 2, "2 arrays, expected 1"
    yield "none not an array", m, [a[0].tobytes()], "must be a numpy array"
    yield "none NaN", m, replaced(a, 0, np.where(np.arange(1000) == 9, np.nan, a[0])
                                 .astype(np.float32)), "finite"
    yield "unknown name", with_meta(m, encoding="zip"), a, "unknown encoding 'zip'"
    yield "missing name", with_meta(m, encoding=_DROP), a, "unknown encoding None"
    yield "meta not a map", [("encoding", "none")], a, "meta must be a map"
    yield "arrays not a list", m, a[0], "arrays must be a list"

    m, a = encoded("fp16")
    yield "fp16 bad dtype", m, [a[0].view(np.uint16)], "must be float16, got uint16"
    yield "fp16 as float32", m, [a[0].astype(np.float32)], "must be float16"
    yield "fp16 inf", m, [np.where(np.arange(1000) == 5, np.float16(np.inf), a[0])], "finite"
    yield "fp16 NaN", m, [np.full(1000, np.nan, np.float16)], "finite"

    m, a = encoded("bf16")
    yield "bf16 bad dtype", m, [a[0].view(np.int16)], "must be uint16, got int16"
    yield "bf16 inf", m, [np.where(np.arange(1000) == 5, np.uint16(0x7F80), a[0])], "finite"
    yield "bf16 NaN", m, [np.where(np.arange(1000) == 5, np.uint16(0xFFC1), a[0])], "finite"
    yield "bf16 wrong numel", with_meta(m, numel=2000), a, "encodes 2000 values"

    m, a = encoded("int8")
    yield "int8 one array", m, a[:1], "1 array, expected 2 \\(scales and codes\\)"
    yield "int8 three arrays", m, a + a[:1], "3 arrays, expected 2"
    yield "int8 codes uint8", m, [a[0], a[1].view(np.uint8)], "codes must be int8, got uint8"
    yield "int8 scales float16", m, [a[0].astype(np.float16), a[1]], "scales must be float32"
    yield "int8 scales count", m, [a[0][:-1], a[1]], "scales must be 1-D of 4 values"
    yield "int8 codes length", m, [a[0], a[1][:-1]], "codes must be 1-D of 1000 values"
    yield "int8 block changed", with_meta(m, block=128), a, "scales must be 1-D of 8 values"
    yield "int8 block 0", with_meta(m, block=0), a, "'block' must be an integer >= 1"
    yield "int8 block missing", with_meta(m, block=_DROP), a, "'block' must be an integer"
    yield "int8 block float", with_meta(m, block=256.0), a, "'block' must be an integer"
    yield ("int8 NaN scale", *int8_scales(np.nan), "scales are not all finite")
    yield ("int8 inf scale", *int8_scales(np.inf), "scales are not all finite")
    yield ("int8 negative scale", *int8_scales(-0.5), "scales must be in")
    yield ("int8 scale overflowing", *int8_scales(1e37, at=0), "scales must be in")

    m, a = encoded("topk")
    yield "topk k=0", with_meta(m, k=0), a, "'k' must be an integer in \\[1, 1000\\]"
    yield "topk k>numel", with_meta(m, k=1001), a, "'k' must be an integer in"
    yield "topk k missing", with_meta(m, k=_DROP), a, "'k' must be an integer in"
    yield "topk k bool", with_meta(m, k=True), a, "'k' must be an integer in"
    yield "topk k mismatch", with_meta(m, k=9), a, "indices must be 1-D of 9 values"
    yield "topk values short", m, [a[0], a[1][:-1]], "values must be 1-D of 10 values"
    yield "topk indices int64", m, [a[0].astype(np.int64), a[1]], "must be int32, got int64"
    yield "topk indices float", m, [a[0].astype(np.float32), a[1]], "must be int32, got float32"
    yield "topk values float64", m, [a[0], a[1].astype(np.float64)], "must be float32"
    yield "topk one array", m, a[:1], "1 array, expected 2 \\(indices and values\\)"
    yield ("topk duplicate index", *topk_case(_dup), "strictly increasing: .* repeats")
    yield ("topk unsorted", *topk_case(_unsorted), "strictly increasing: .* out of order")
    yield ("topk negative index", *topk_case(_negative), "must be in \\[0, 1000\\), got -1")
    yield ("topk index too big", *topk_case(_too_big), "must be in \\[0, 1000\\), got .* 1000")
    yield ("topk NaN value", *topk_case(_nan_value), "values are not all finite")
    yield ("topk inf value", *topk_case(_inf_value), "values are not all finite")


CASES = list(_cases())


@pytest.mark.parametrize("label, meta, arrays, message", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_refused(label, meta, arrays, message):
    if isinstance(arrays, list):
        arrays = [a if not isinstance(a, np.ndarray) else as_frames([a])[0] for a in arrays]
    sent = [a.copy() for a in arrays if isinstance(a, np.ndarray)] \
        if isinstance(arrays, list) else None
    with pytest.raises(EncodingError, match=message):
        decode(meta, arrays, np.zeros(1000, np.float32))
    if sent is not None:                        # the received arrays are left as they were
        for a, b in zip([a for a in arrays if isinstance(a, np.ndarray)], sent):
            np.testing.assert_array_equal(a, b)


def test_every_refusal_names_its_encoding():
    for label, meta, arrays, _ in CASES:
        name = label.split()[0]
        if name not in ENCODINGS:
            continue
        with pytest.raises(EncodingError) as caught:
            decode(meta, arrays, np.zeros(1000, np.float32))
        assert str(caught.value).startswith(f"{name}: "), (label, str(caught.value))


def test_a_bad_output_buffer_is_the_callers_bug():
    meta, arrays = encoded("none")
    for out in (np.zeros(1000, np.float64), np.zeros((10, 100), np.float32),
                np.zeros(2000, np.float32)[::2], np.frombuffer(bytes(4000), np.float32)):
        with pytest.raises(ValueError, match="writable 1-D contiguous float32") as caught:
            decode(meta, arrays, out)
        assert not isinstance(caught.value, EncodingError)


def test_the_registry_names_every_encoding_once_for_protocol_config_and_cli():
    """asgd.core.encoding.REGISTRY is the one list: the protocol's names are its, each
    16-bit weights form narrows and widens as its gradient form decodes."""
    from asgd.core import encoding, protocol

    assert protocol.ENCODINGS == encoding.ENCODINGS == tuple(encoding.REGISTRY)
    assert protocol.WEIGHT_ENCODINGS == encoding.WEIGHT_ENCODINGS == ("none", "fp16", "bf16")
    x = torch.tensor([0.5, -1e6, 3.0, 7e4], dtype=torch.float32)
    for name in encoding.WEIGHT_ENCODINGS:
        e = encoding.get(name, weights=True)
        wire = np.empty(4, protocol.DTYPES[e.wire_dtype])
        e.narrow(x.numpy(), wire)
        meta, arrays = e.encode(x)
        assert np.array_equal(wire, arrays[0])             # one encoder: gradient and weights
        back = np.empty(4, np.float32)
        e.widen(wire, back)
        assert np.all(np.isfinite(back))                   # 16-bit forms saturate
        assert e.nbytes(4) == e.bytes_per_value * 4
    with pytest.raises(ValueError, match="int8"):
        encoding.get("int8", weights=True)
