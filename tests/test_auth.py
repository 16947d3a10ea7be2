"""CURVE authentication and the server socket's limits, with real processes on loopback: an
unknown key gets nothing and changes nothing, an allowed key trains, a worker id that is not
its key's is ``unauthorized``, a server without a usable allow-list does not start, a
non-loopback bind without auth warns, an oversized frame costs its sender the connection and
nobody else anything, and ``asgd keys`` writes its files with the right modes."""
from __future__ import annotations

import shlex
import stat
import time
from pathlib import Path

import pytest
import yaml
import zmq
from click.testing import CliRunner
from zmq.utils import z85

from asgd.cli import cli
from asgd.client import Client, ServerError, ServerTimeout
from asgd.config import load_config
from asgd.core import auth

from conftest import flat, gradients

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

REPO = Path(__file__).resolve().parents[1]
NO_REPLY_S = 2.0          # how long a refused client waits for the reply that never comes
WORKER_TIMEOUT_S = 90


def make_keys(root: Path, names=("w0", "w1"), allowed=("w0", "w1")) -> Path:
    """root/server/server.key[_secret], root/workers/NAME.key[_secret] for every name, and
    root/allowed/ holding the public keys of ``allowed``; also a stranger's pair."""
    auth.generate("server", root / "server")
    for n in (*names, "stranger"):
        auth.generate(n, root / "workers")
    (root / "allowed").mkdir()
    for n in allowed:
        (root / "allowed" / f"{n}.key").write_bytes((root / "workers" / f"{n}.key").read_bytes())
    return root


def curve_server(root: Path) -> dict:
    return {"auth": "curve", "secret_key_file": str(root / "server" / "server.key_secret"),
            "allowed_keys": str(root / "allowed")}


def keys_of(root: Path, name: str) -> auth.ClientKeys:
    return auth.ClientKeys.load(root / "workers" / f"{name}.key_secret",
                                root / "server" / "server.key")


@pytest.fixture
def curve(tmp_path, start_server, make_config):
    """A CURVE server (plain SGD) allowing w0 and w1; (server, key root, connect)."""
    root = make_keys(tmp_path / "keys")
    server = start_server(make_config(optimizer={"name": "sgd", "lr": 0.1},
                                      server=curve_server(root)))
    made = []

    def connect(worker: str, key: str | None = None, timeout_s: float = 10.0,
                keys: auth.ClientKeys | None = None) -> Client:
        c = Client(server.endpoint, worker, timeout_s=timeout_s,
                   curve=keys or (keys_of(root, key or worker) if key != "" else None))
        made.append(c)
        return c

    yield server, root, connect
    for c in made:
        c.close()


# ----------------------------------------------------------------------------------------------
# asgd keys

def test_keys_command_writes_a_pair_with_the_right_modes(tmp_path):
    runner = CliRunner()
    out = tmp_path / "keys"
    res = runner.invoke(cli, ["keys", "w0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    public, secret = out / "w0.key", out / "w0.key_secret"
    assert str(public) in res.output and str(secret) in res.output
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert set(out.iterdir()) == {public, secret}
    pub, sec = auth.load_secret(secret, "test")
    assert auth.load_public(public, "test") == pub and len(sec) == 40
    assert "secret-key" not in public.read_text()

    # no overwrite without --force: both files stay as they were
    before = secret.read_bytes()
    res = runner.invoke(cli, ["keys", "w0", "--out", str(out)])
    assert res.exit_code == 1 and "already exist" in res.output
    assert secret.read_bytes() == before
    res = runner.invoke(cli, ["keys", "w0", "--out", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert auth.load_secret(secret, "test")[0] != pub
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["w0.key", "w0.key_secret"]   # no temp

    res = runner.invoke(cli, ["keys", "../escape", "--out", str(out)])
    assert res.exit_code == 1 and "not a key name" in res.output


def test_allow_list_names_and_bad_keys(tmp_path):
    root = make_keys(tmp_path, allowed=("w0",))
    # the same key under a second name may use both
    (root / "allowed" / "launcher.key").write_bytes((root / "workers" / "w0.key").read_bytes())
    allow = auth.AllowList.load(root / "allowed")
    w0 = auth.load_public(root / "workers" / "w0.key", "t")
    assert allow.callback("*", w0) and not allow.callback(
        "*", auth.load_public(root / "workers" / "w1.key", "t"))
    assert auth.names_of(allow.user_id(z85.decode(w0))) == {"w0", "launcher"}
    assert auth.names_of("") == frozenset()
    assert len(auth.AllowList.load(root / "allowed" / "w0.key")) == 1     # one file
    with pytest.raises(auth.AuthError, match="no public keys"):
        (tmp_path / "empty").mkdir()
        auth.AllowList.load(tmp_path / "empty")
    with pytest.raises(auth.AuthError, match="no such file"):
        auth.AllowList.load(tmp_path / "missing")
    with pytest.raises(auth.AuthError, match="holds no secret key"):
        auth.load_secret(root / "workers" / "w0.key", "worker.auth.secret_key_file")
    assert auth.load_public(w0.decode(), "t") == w0           # Z85 text works as well
    with pytest.raises(auth.AuthError, match="neither an existing key file"):
        auth.load_public("nope", "worker.auth.server_key")
    assert auth.is_loopback("tcp://127.0.0.1:5555") and auth.is_loopback("ipc:///tmp/x")
    assert not auth.is_loopback("tcp://0.0.0.0:5555") and not auth.is_loopback("tcp://*:1")


# ----------------------------------------------------------------------------------------------
# CURVE against a real server

@pytest.mark.slow
def test_unknown_keys_get_nothing_and_change_nothing(curve, tmp_path):
    server, root, connect = curve
    w0 = connect("w0")
    specs = w0.hello()[0]["tensors"]
    version, weights = w0.pull()
    before = flat(weights)

    stranger = connect("stranger", timeout_s=NO_REPLY_S)          # a key not on the list
    plain = connect("w0", key="", timeout_s=NO_REPLY_S)           # no CURVE at all
    wrong_server = connect("w0", timeout_s=NO_REPLY_S, keys=auth.ClientKeys(
        keys_of(root, "w0").public, keys_of(root, "w0").secret,
        keys_of(root, "w1").public))                               # the right key, wrong server
    for c in (stranger, plain, wrong_server):
        for op in ("push", "hello"):
            t0 = time.monotonic()
            with pytest.raises(ServerTimeout):
                if op == "push":
                    c.push(0, gradients(specs, 1))
                else:
                    c.hello()
            assert time.monotonic() - t0 < NO_REPLY_S + 30      # gave up, did not hang

    assert w0.pull()[0] == version == 0
    assert flat(w0.pull()[1]) == before
    stats = w0.stats()
    assert stats["updates_applied"] == 0 and set(stats["workers"]) <= {"w0"}
    assert "refused a connection" in server.log()


@pytest.mark.slow
def test_an_allowed_key_trains_and_a_worker_id_not_its_own_is_unauthorized(curve):
    server, root, connect = curve
    w0, w1 = connect("w0"), connect("w1")
    specs = w0.hello()[0]["tensors"]
    w1.hello()
    version = 0
    for k in range(3):
        reply, _ = w0.push_pull(version, gradients(specs, k))
        assert reply["applied"] and reply["version"] == version + 1
        version = reply["version"]
    reply, _ = w1.push_pull(version, gradients(specs, 9))
    version = reply["version"]
    assert version == 4
    before = flat(w0.pull()[1])

    # w0's key speaking as w1 (and as a name nobody has): unauthorized, nothing changes
    for name in ("w1", "w00"):
        impostor = connect(name, key="w0")
        for call in (lambda: impostor.hello(), lambda: impostor.push(version, gradients(specs, 5)),
                     lambda: impostor.stats()):
            with pytest.raises(ServerError) as e:
                call()
            assert e.value.code == "unauthorized"
    v, weights = w0.pull()
    assert v == version and flat(weights) == before
    stats = w1.stats()
    assert stats["version"] == stats["updates_applied"] == 4
    assert stats["workers"]["w1"]["pushes"] == 1
    assert "unauthorized" in server.log()


@pytest.mark.slow
def test_missing_or_empty_allow_list_stops_the_server(tmp_path, make_config, processes):
    root = make_keys(tmp_path / "keys")
    (tmp_path / "empty").mkdir()
    cases = {
        "allowed_keys unset": ({"allowed_keys": ""}, "server.auth.allowed_keys is not set"),
        "allow-list missing": ({"allowed_keys": str(tmp_path / "nope")}, "no such file"),
        "allow-list empty": ({"allowed_keys": str(tmp_path / "empty")}, "no public keys"),
        "no server key": ({"secret_key_file": str(tmp_path / "nokey")},
                          "server.auth.secret_key_file: no such file"),
    }
    for name, (change, message) in cases.items():
        config = make_config(server={**curve_server(root), **change})
        res = processes.run(["-m", "server", "--config", str(config), "--bind",
                             "tcp://127.0.0.1:0", "--checkpoint-dir", str(tmp_path / "ck")],
                            timeout=90)
        assert res.returncode == 1, (name, res.stdout, res.stderr)
        assert message in res.stderr, (name, res.stderr)
        assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_non_loopback_bind_without_auth_warns(start_server, make_config, tmp_path, clients):
    config = make_config()
    open_ = start_server(config, bind="tcp://0.0.0.0:0")
    port = open_.endpoint.rsplit(":", 1)[1]
    assert clients(f"tcp://127.0.0.1:{port}").stats()["version"] == 0   # loopback traffic only
    assert "without authentication" in open_.log()
    closed = start_server(config)
    clients(closed.endpoint).stats()
    assert "without authentication" not in closed.log()


@pytest.mark.slow
def test_a_worker_with_curve_keys_trains_against_a_curve_server(tmp_path, start_server,
                                                                make_config, processes):
    root = make_keys(tmp_path / "keys")
    config = make_config(run={"workers": 1, "max_updates": 20, "max_seconds": 600},
                         server=curve_server(root))
    server = start_server(config)
    keyset = ["--set", f"worker.auth.secret_key_file={root}/workers/{{id}}.key_secret",
              "--set", f"worker.auth.server_key={root}/server/server.key"]
    worker = processes.spawn(["-m", "worker", "--config", str(config), "--server",
                              server.endpoint, "--rank", "0", *keyset], tmp_path / "w0.log")
    assert worker.wait(timeout=WORKER_TIMEOUT_S) == 0, (tmp_path / "w0.log").read_text()
    with Client(server.endpoint, "w1", timeout_s=10, curve=keys_of(root, "w1")) as c:
        stats = c.stats()
    assert stats["version"] == stats["updates_applied"] >= 20
    assert stats["workers"]["w0"]["pushes"] >= 20

    # a worker whose key is not on the list: no answer, so it gives up like on an absent server
    res = processes.run(["-m", "worker", "--config", str(config), "--server", server.endpoint,
                         "--id", "stranger", *keyset, "--set", "worker.request_timeout_s=1",
                         "--set", "worker.reconnect_timeout_s=3"], timeout=WORKER_TIMEOUT_S)
    assert res.returncode == 3, (res.stdout, res.stderr)
    with Client(server.endpoint, "w1", timeout_s=10, curve=keys_of(root, "w1")) as c:
        assert c.stats()["version"] == stats["version"]

    # half the keys is a configuration error (exit 2), before anything trains
    res = processes.run(["-m", "worker", "--config", str(config), "--server", server.endpoint,
                         "--set", f"worker.auth.server_key={root}/server/server.key"], timeout=60)
    assert res.returncode == 2 and "worker.auth.secret_key_file is not set" in res.stderr


# ----------------------------------------------------------------------------------------------
# socket limits and heartbeats

class _Store:
    def __init__(self, numel):
        self.numel = numel
        self.has_model = True
        self.layout = self            # one whole model: its numel is the store's


@pytest.mark.parametrize("numel", [18_000, 80_000, 1_000_000, 10_000_000])
def test_socket_limits_from_the_store(numel):
    from asgd.config import Config
    from server.main import open_socket, socket_limits

    cfg = Config()
    lim = socket_limits(_Store(numel), cfg)
    assert lim["maxmsgsize"] == max(2 << 20, (1 << 20) + 4 * numel)
    assert 4 <= lim["rcvhwm"] == lim["sndhwm"] <= 1000
    assert lim["rcvhwm"] * 4 * numel <= 64 << 20 or lim["rcvhwm"] == 4
    small = socket_limits(_Store(numel), cfg.replace(**{"server.max_message_mb": 1.5}))
    assert small["maxmsgsize"] == 2 << 20          # never below 2 MiB: headers are answered

    ctx = zmq.Context()
    sock, authenticator = open_socket(ctx, "tcp://127.0.0.1:*", _Store(numel), cfg)
    try:
        assert authenticator is None
        assert sock.getsockopt(zmq.MAXMSGSIZE) == lim["maxmsgsize"]
        assert (sock.rcvhwm, sock.sndhwm) == (lim["rcvhwm"], lim["sndhwm"])
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == auth.HEARTBEAT_IVL_MS
        assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == auth.HEARTBEAT_TIMEOUT_MS
        assert sock.getsockopt(zmq.HEARTBEAT_TTL) == auth.HEARTBEAT_TTL_MS
    finally:
        sock.close(0)
        ctx.term()
    c = Client("tcp://127.0.0.1:9", "t0", context=zmq.Context.instance())
    try:
        assert c.sock.getsockopt(zmq.HEARTBEAT_IVL) == auth.HEARTBEAT_IVL_MS
        assert c.sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == auth.HEARTBEAT_TIMEOUT_MS
    finally:
        c.close()


@pytest.mark.slow
def test_a_frame_above_maxmsgsize_is_dropped_and_the_server_serves_on(start_server, make_config,
                                                                      clients, raw_peer):
    from asgd.core import protocol

    server = start_server(make_config(optimizer={"name": "sgd", "lr": 0.1}))
    other = clients(server.endpoint, "w0")
    specs = other.hello()[0]["tensors"]
    other.push(0, gradients(specs, 0))
    version, weights = other.pull()
    before = flat(weights)

    peer = raw_peer(server.endpoint)
    header = {"v": 1, "op": "push", "id": 7, "worker": "big", "version": version}
    good = protocol.encode(header, gradients(specs, 1))
    huge = good + [b"\x00" * (3 << 20)]                 # one 3 MiB frame: above MAXMSGSIZE
    peer.sock.send_multipart(huge)
    assert not peer.sock.poll(int(NO_REPLY_S * 1000), zmq.POLLIN), "an oversized frame was answered"

    # nothing changed, the others are served, and the sender's next (normal) request too
    v, w = other.pull()
    assert v == version and flat(w) == before
    head, _ = peer.exchange(good, timeout_s=10)
    assert (head["ok"], head["id"], head["version"]) == (True, 7, version + 1)
    stats = other.stats()
    assert stats["version"] == stats["updates_applied"] == version + 1
    assert server.popen.poll() is None


def test_compose_curve_file_uses_mounted_keys():
    doc = yaml.safe_load((REPO / "docker-compose.curve.yml").read_text())
    kinds = {}
    for name, svc in doc["services"].items():
        argv = shlex.split(svc["command"])
        sub = cli.get_command(None, argv[1])
        params = sub.make_context(argv[1], argv[2:]).params
        kinds.setdefault(argv[1], []).append(params)
        sets = dict(o.split("=", 1) for o in params.get("overrides", ()))
        mounts = [v.split(":")[1] for v in svc.get("volumes", [])]
        for key in ("server.auth.secret_key_file", "server.auth.allowed_keys",
                    "worker.auth.secret_key_file", "worker.auth.server_key"):
            if key in sets:
                assert any(sets[key] == m or sets[key].startswith(m + "/") for m in mounts), \
                    (name, key, sets[key], mounts)
    (server,) = kinds["server"]
    assert "server.auth.mode=curve" in server["overrides"]
    for params in kinds["server"] + kinds["worker"]:
        load_config(REPO / params["config_path"], params["overrides"])   # keys of the config
    assert len(kinds["worker"]) == 2
    assert all(any(o.startswith("worker.auth.server_key=") for o in w["overrides"])
               for w in kinds["worker"])
