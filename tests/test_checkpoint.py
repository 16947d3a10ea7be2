"""Checkpoints (server.checkpoint): the wire format on disk, a bitwise resume, no pickle."""
from __future__ import annotations

import json
import pickle
import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch
from torch import nn

from asgd.config import from_dict
from asgd.core.checkpoint import (FILENAME, MAGIC, CheckpointError, load_checkpoint, read_frames,
                                  write_checkpoint)
from server.checkpoint import save_store as save_checkpoint
from server.checkpoint import resume_store
from server.store import ParameterStore
from tests.conftest import apply_push


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def grads(store: ParameterStore, seed: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [g.standard_normal(s["shape"]).astype(np.float32) for s in store.specs]


def trained_store(optimizer: dict, steps: int = 4) -> ParameterStore:
    cfg = from_dict({"optimizer": optimizer, "run": {"name": "ckpt-test", "seed": 3}})
    store = ParameterStore.from_model(small_model(), cfg)
    for k in range(steps):
        apply_push(store, grads(store, k), store.version)
    return store


def flat_bytes(store: ParameterStore) -> bytes:
    return store.flat.detach().numpy().tobytes()


OPTIMIZERS = {
    "sgd-momentum": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "adam": {"name": "adam", "lr": 0.01},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "adagrad": {"name": "adagrad", "lr": 0.1},
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_round_trip(tmp_path, name):
    store = trained_store(OPTIMIZERS[name])
    path = save_checkpoint(store, tmp_path / "checkpoint")
    assert path == tmp_path / "checkpoint" / FILENAME and path.exists()
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    assert load_checkpoint(path).version == ckpt.version        # the file itself works too
    assert ckpt.version == store.version == 4
    assert ckpt.flat.dtype == torch.float32
    assert ckpt.flat.numpy().tobytes() == flat_bytes(store)
    assert ckpt.specs == store.specs
    assert ckpt.config == store.cfg.to_dict()
    assert from_dict(ckpt.config) == store.cfg
    for (pname, view), (cname, t) in zip(zip(store.names, store.views), ckpt.weights().items()):
        assert pname == cname and torch.equal(view, t)
    state = store.optimizer.state[store.flat]
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and v.numel() > 1}
    assert set(ckpt.optimizer_tensors) == {f"optim.{k}" for k in tensors}
    for k, v in tensors.items():
        assert ckpt.optimizer_tensors[f"optim.{k}"].numpy().tobytes() == v.numpy().tobytes(), k
    if "step" in state:
        assert ckpt.optimizer_scalars["step"]["tensor"] == 4.0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resumed_store_takes_bitwise_the_same_next_steps(tmp_path, name):
    original = trained_store(OPTIMIZERS[name])
    save_checkpoint(original, tmp_path)
    # a fresh store with other initial weights, as a restarted server builds it
    resumed = ParameterStore.from_model(small_model(seed=42), original.cfg)
    assert flat_bytes(resumed) != flat_bytes(original)
    resume_store(resumed, tmp_path)
    assert resumed.version == original.version
    assert flat_bytes(resumed) == flat_bytes(original)
    for k in range(4, 8):
        g = grads(original, k)
        a = apply_push(original, g, original.version)
        b = apply_push(resumed, g, resumed.version)
        assert (a.version, a.lr) == (b.version, b.lr)
        assert flat_bytes(resumed) == flat_bytes(original), f"step {k}"


def test_saves_keep_the_newest_few_and_leave_no_temp_files(tmp_path):
    store = trained_store(OPTIMIZERS["adam"], steps=1)
    save_checkpoint(store, tmp_path)
    apply_push(store, grads(store, 7), store.version)
    save_checkpoint(store, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["state-000000000001.asgd", "state-000000000002.asgd", FILENAME]
    assert (tmp_path / FILENAME).samefile(tmp_path / "state-000000000002.asgd")
    assert load_checkpoint(tmp_path).version == 2
    for k in range(8, 12):
        apply_push(store, grads(store, k), store.version)
        save_checkpoint(store, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["state-000000000004.asgd", "state-000000000005.asgd", "state-000000000006.asgd",
         FILENAME]


def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_used(tmp_path, caplog):
    store = trained_store(OPTIMIZERS["adam"], steps=1)
    save_checkpoint(store, tmp_path)
    before = flat_bytes(store)
    apply_push(store, grads(store, 7), store.version)
    save_checkpoint(store, tmp_path)
    newest = tmp_path / "state-000000000002.asgd"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF                          # one flipped byte in the weights' last frame
    newest.write_bytes(data)                  # (a new inode: state.asgd keeps the good copy)
    (tmp_path / FILENAME).unlink()
    (tmp_path / FILENAME).hardlink_to(newest)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.version == 1 and len(ckpt.skipped) == 1
    assert "fails its checksum" in ckpt.skipped[0]
    assert ckpt.flat.numpy().tobytes() == before
    assert any("using the one before it" in r.message for r in caplog.records)
    # every one damaged: an error naming each
    one = tmp_path / "state-000000000001.asgd"
    data = bytearray(one.read_bytes())
    data[20] ^= 0xFF
    one.write_bytes(data)
    with pytest.raises(CheckpointError, match="no good checkpoint"):
        load_checkpoint(tmp_path)


def test_file_is_the_wire_format_not_a_pickle(tmp_path):
    """MAGIC, u32 frame count, then (u64 length, u32 CRC-32, bytes) frames; frame 0 msgpack."""
    store = trained_store(OPTIMIZERS["adam"])
    data = save_checkpoint(store, tmp_path).read_bytes()
    assert data[:8] == MAGIC == b"ASGDCKP2"
    (count,) = struct.unpack_from("<I", data, 8)
    pos, frames = 12, []
    for _ in range(count):
        n, crc = struct.unpack_from("<QI", data, pos)
        frames.append(data[pos + 12:pos + 12 + n])
        assert zlib.crc32(frames[-1]) == crc
        pos += 12 + n
    assert pos == len(data)
    header = msgpack.unpackb(frames[0], raw=False)
    assert header["kind"] == "asgd-checkpoint" and header["version"] == 4
    assert [t["name"] for t in header["tensors"]][0] == "weights"
    assert frames[1] == flat_bytes(store)
    assert len(frames) == 1 + len(header["tensors"])


def test_load_does_not_unpickle(tmp_path, monkeypatch):
    store = trained_store(OPTIMIZERS["sgd-momentum"])
    save_checkpoint(store, tmp_path)

    def refuse(*a, **k):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_checkpoint(tmp_path).flat.numpy().tobytes() == flat_bytes(store)


def test_truncated_file_raises_value_error(tmp_path):
    store = trained_store(OPTIMIZERS["adam"])
    path = save_checkpoint(store, tmp_path)
    data = path.read_bytes()
    # every cut inside the 12-byte preamble, a few in the frame table and the tensors
    cuts = sorted(set(range(0, 13)) | {16, 20, 24, len(data) // 3, len(data) // 2,
                                       len(data) - 9, len(data) - 1})
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            load_checkpoint(tmp_path)


@pytest.mark.parametrize("kind", ["random", "json", "pickle", "other-wire-kind", "bad-header"])
def test_foreign_file_raises_value_error(tmp_path, kind):
    path = tmp_path / FILENAME
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "json":
        path.write_text(json.dumps({"version": 3, "weights": [1, 2, 3]}))
    elif kind == "pickle":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "other-wire-kind":
        header = msgpack.packb({"kind": "something-else", "version": 1})
        path.write_bytes(MAGIC + struct.pack("<I", 1) + struct.pack("<Q", len(header)) + header)
    elif kind == "bad-header":
        header = b"\xc1\xc1"
        path.write_bytes(MAGIC + struct.pack("<I", 1) + struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path)


def test_a_flipped_byte_anywhere_is_caught(tmp_path):
    store = trained_store(OPTIMIZERS["adam"])
    path = save_checkpoint(store, tmp_path)
    data = bytearray(path.read_bytes())
    for where in (30, len(data) // 2, len(data) - 3):   # the header, a tensor, the last tensor
        damaged = bytearray(data)
        damaged[where] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match="damaged"):
            load_checkpoint(tmp_path)


@pytest.mark.parametrize("what", ["weights", "optim.exp_avg"])
def test_non_finite_contents_are_refused(tmp_path, what):
    store = trained_store(OPTIMIZERS["adam"])
    scalars, optim = store.optimizer_state()
    flat = store.weights.clone()
    optim = [(n, t.clone()) for n, t in optim]
    if what == "weights":
        flat[3] = float("nan")
    else:
        dict(optim)[what][0] = float("inf")
    write_checkpoint(tmp_path, store.version, store.layout, flat, store.cfg.to_dict(), "adam",
                     scalars, optim)   # checksummed: only the finiteness check can refuse it
    with pytest.raises(CheckpointError, match=f"{what} holds 1 non-finite"):
        load_checkpoint(tmp_path)


def test_a_first_format_file_still_loads(tmp_path):
    """ASGDCKP1: the same frames without checksums."""
    store = trained_store(OPTIMIZERS["sgd-momentum"])
    frames = read_frames(save_checkpoint(store, tmp_path))
    old = b"ASGDCKP1" + struct.pack("<I", len(frames)) + b"".join(
        struct.pack("<Q", len(f)) + bytes(f) for f in frames)
    (tmp_path / FILENAME).write_bytes(old)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.version == store.version
    assert ckpt.flat.numpy().tobytes() == flat_bytes(store)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")
