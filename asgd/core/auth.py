"""Authentication and encryption (ZeroMQ CURVE), and the liveness options of every socket.

    asgd keys server --out keys/server          # keys/server/server.key, server.key_secret
    asgd keys w0 --out keys/w0                  # one pair per worker, made where it runs
    cp keys/w0/w0.key keys/allowed/             # the allow-list: public keys, named by worker
    asgd server --config c.yaml --bind tcp://0.0.0.0:5555 --set server.auth.mode=curve \\
        --set server.auth.secret_key_file=keys/server/server.key_secret \\
        --set server.auth.allowed_keys=keys/allowed
    asgd worker --config c.yaml --server tcp://HOST:5555 --rank 0 \\
        --set worker.auth.secret_key_file=keys/w0/w0.key_secret \\
        --set worker.auth.server_key=keys/server/server.key

With ``server.auth.mode: curve`` every connection is encrypted and authenticated by ZeroMQ's CURVE
handshake; a ZAP handler (pyzmq's ``ThreadAuthenticator``) lets in only the public keys of the
allow-list. The allow-list is a ``.key`` file or a folder of them (pyzmq's certificate format,
as ``asgd keys`` and ``zmq.auth.create_certificates`` write them), and a file's name is the
worker id its key may use: ``w0.key`` lets its holder in as worker ``w0`` and nothing else (the
same key saved under several names may use each of them). The ZAP handler gives each
connection the names of its key as its User-Id (``"w0"``, or ``"w0,w1"``), which the server
reads from every request (``names_of``) and compares with the header's ``worker``
(``server/main.py``: ``unauthorized`` when they differ). A client whose key is not on the list
fails the handshake: it gets no reply at all and reaches nothing.

Both sides also set ZeroMQ heartbeats (``set_heartbeats``): a peer that stops answering pings
for ``HEARTBEAT_TIMEOUT_MS`` has its connection dropped, with whatever ZeroMQ queued for it.
No sockets are made here: the functions configure the ones the server and the client make.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

log = logging.getLogger("asgd.auth")

MODES = ("none", "curve")
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,255}")   # a worker id that is a file name
Z85_KEY_LEN = 40                 # a 32-byte CURVE key in Z85 text

# ZeroMQ heartbeats (ZMTP PING/PONG), on the server's ROUTER and every client's DEALER: a ping
# every 2 s; no traffic for 30 s after a ping drops the connection (the peer's PONG queues
# behind what it is sending, so the timeout leaves a 40 MB message 30 s even on a slow link);
# TTL tells the other side to drop us after the same 30 s of silence.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 30_000
HEARTBEAT_TTL_MS = 30_000
MAX_LOGGED_REFUSALS = 20         # unknown keys logged once each, up to this many


class AuthError(ValueError):
    """A key, key file or allow-list that cannot be used; the message says which and why."""


def set_heartbeats(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)


def is_loopback(endpoint: str) -> bool:
    """True for an endpoint only this machine can reach: ipc://, inproc://, tcp on 127.x.x.x,
    ::1 or localhost."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


# ----------------------------------------------------------------------------------------------
# key files

def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise AuthError(f"{name!r} is not a key name: use 1 to 256 letters, digits, '.', '_' "
                        "or '-', not starting with '.' or '-' (it is the worker id the key "
                        "may use)")
    return name


def generate(name: str, out_dir: str | Path = ".", force: bool = False) -> tuple[Path, Path]:
    """A new key pair ``out_dir/NAME.key`` (public, mode 0644) and ``NAME.key_secret``
    (public and secret, mode 0600), in pyzmq's certificate format. The secret file never
    exists with a wider mode: both are written in a private folder, then moved into place.
    An existing file is an error unless ``force``."""
    import zmq.auth

    check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not force:
        raise AuthError(f"{' and '.join(existing)} already exist: not overwritten "
                        "(--force replaces them)")
    with tempfile.TemporaryDirectory(dir=out, prefix=".asgd-keys-") as tmp:   # mode 0700
        pub_tmp, sec_tmp = zmq.auth.create_certificates(tmp, name)
        os.chmod(sec_tmp, 0o600)
        os.chmod(pub_tmp, 0o644)
        os.replace(sec_tmp, secret)
        os.replace(pub_tmp, public)
    return public, secret


def load_secret(path: str | Path, what: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret key file (``NAME.key_secret``)."""
    import zmq.auth

    p = Path(path)
    if not p.is_file():
        raise AuthError(f"{what}: no such file: {p}")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as e:
        raise AuthError(f"{what}: {p} is not a key file: {e}") from None
    if secret is None:
        raise AuthError(f"{what}: {p} holds no secret key (give the NAME{SECRET_SUFFIX} file, "
                        f"not NAME{PUBLIC_SUFFIX})")
    return _z85(public, what, p), _z85(secret, what, p)


def load_public(value: str | Path, what: str) -> bytes:
    """A Z85 public key from a key file, or the 40 characters of Z85 text themselves."""
    import zmq.auth

    text = str(value).strip()
    p = Path(text).expanduser()
    if p.is_file():
        try:
            public, _ = zmq.auth.load_certificate(p)
        except (OSError, ValueError) as e:
            raise AuthError(f"{what}: {p} is not a key file: {e}") from None
        return _z85(public, what, p)
    if len(text) == Z85_KEY_LEN:
        try:
            return _z85(text.encode("ascii"), what, None)
        except (AuthError, UnicodeEncodeError):
            pass
    raise AuthError(f"{what}: {text!r} is neither an existing key file nor a "
                    f"{Z85_KEY_LEN}-character Z85 public key")


def _z85(key: bytes, what: str, path) -> bytes:
    try:
        if len(z85.decode(key)) == 32:
            return key
    except Exception:
        pass
    where = f" in {path}" if path else ""
    raise AuthError(f"{what}: the key{where} is not 40 characters of Z85")


# ----------------------------------------------------------------------------------------------
# the server's side

class AllowList:
    """The public keys that may connect, each with the worker ids it may use (from the file
    names: ``w0.key`` -> ``w0``). ``callback`` is the ZAP credentials provider."""

    def __init__(self, names: dict[bytes, frozenset[str]], source: str = ""):
        self.names, self.source = names, source
        self._refused: set[bytes] = set()

    @classmethod
    def load(cls, path: str | Path) -> "AllowList":
        """From one ``NAME.key`` file or a folder of them (other files are ignored). A missing
        or empty allow-list is an error: it would let no worker in."""
        import zmq.auth

        if not str(path).strip():
            raise AuthError("server.auth.mode is curve but server.auth.allowed_keys is not set: "
                            "give a folder of the workers' public keys (asgd keys NAME)")
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.iterdir()
                           if f.name.endswith(PUBLIC_SUFFIX) and f.is_file())
        elif p.is_file():
            files = [p]
        else:
            raise AuthError(f"server.auth.allowed_keys: no such file or folder: {p}")
        names: dict[bytes, set[str]] = {}
        for f in files:
            name = f.name[:-len(PUBLIC_SUFFIX)] if f.name.endswith(PUBLIC_SUFFIX) else f.stem
            try:
                check_name(name)
                public, _ = zmq.auth.load_certificate(f)
            except (AuthError, OSError, ValueError) as e:
                raise AuthError(f"server.auth.allowed_keys: {f}: {e}") from None
            names.setdefault(_z85(public, "server.auth.allowed_keys", f), set()).add(name)
        if not names:
            raise AuthError(f"server.auth.allowed_keys: no public keys (*{PUBLIC_SUFFIX}) in {p}: "
                            "the server would let no worker in (make one with "
                            f"`asgd keys w0 --out DIR` and copy DIR/w0{PUBLIC_SUFFIX} there)")
        return cls({k: frozenset(v) for k, v in names.items()}, str(p))

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is this Z85 client key allowed in?"""
        if key in self.names:
            return True
        if key not in self._refused and len(self._refused) < MAX_LOGGED_REFUSALS:
            self._refused.add(key)
            log.warning("refused a connection: key %s is not in %s", key.decode("ascii"),
                        self.source)
        return False

    def user_id(self, key: bytes) -> str:
        """The User-Id a connection with this (binary) key gets: its names, comma-joined."""
        return ",".join(sorted(self.names.get(z85.encode(key), ())))

    def __len__(self) -> int:
        return len(self.names)


def names_of(user_id: str | None) -> frozenset[str]:
    """The worker ids a request's User-Id allows (empty: none)."""
    return frozenset(user_id.split(",")) if user_id else frozenset()


def _authenticator_class():
    from zmq.auth.thread import ThreadAuthenticator

    class KeyNamesAuthenticator(ThreadAuthenticator):
        """pyzmq's ZAP handler in a thread, whose User-Id is the key's names, not the key."""

        allow: AllowList

        def curve_user_id(self, client_public_key: bytes) -> str:
            return self.allow.user_id(client_public_key)

    return KeyNamesAuthenticator


def secure_server(ctx: zmq.Context, sock: zmq.Socket, server_cfg):
    """Make ``sock`` (not yet bound) a CURVE server that lets in the allow-list's keys only;
    the running authenticator (stop it before terminating ``ctx``), or None when
    ``server.auth.mode`` is ``none``. AuthError for anything missing or unreadable."""
    if server_cfg.auth.mode == "none":
        return None
    if server_cfg.auth.mode != "curve":
        raise AuthError(f"server.auth.mode: {server_cfg.auth.mode!r} is not one of "
                        f"{', '.join(MODES)}")
    if not zmq.has("curve"):
        raise AuthError("server.auth.mode is curve but this pyzmq/libzmq has no CURVE support "
                        "(build libzmq with libsodium)")
    if not server_cfg.auth.secret_key_file:
        raise AuthError("server.auth.mode is curve but server.auth.secret_key_file is not set "
                        "(asgd keys server --out DIR makes DIR/server.key_secret)")
    public, secret = load_secret(server_cfg.auth.secret_key_file, "server.auth.secret_key_file")
    allow = AllowList.load(server_cfg.auth.allowed_keys)
    auth = _authenticator_class()(ctx, log=logging.getLogger("asgd.auth.zap"))
    auth.allow = allow
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    log.info("CURVE on: %d key(s) allowed from %s", len(allow), allow.source)
    return auth


# ----------------------------------------------------------------------------------------------
# the client's side

@dataclass(frozen=True)
class ClientKeys:
    """A client's CURVE key pair and the server's public key, all Z85."""
    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_key_file: str | Path, server_key: str | Path) -> "ClientKeys":
        public, secret = load_secret(secret_key_file, "worker.auth.secret_key_file")
        return cls(public, secret, load_public(server_key, "worker.auth.server_key"))

    def apply(self, sock: zmq.Socket) -> None:
        """Before ``connect``: talk CURVE to the server with this key."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server


def client_keys(worker_cfg, worker_id: str = "") -> ClientKeys | None:
    """The keys ``worker.auth.secret_key_file`` and ``worker.auth.server_key`` name (``{id}`` in the
    file name becomes the worker id), or None when neither is set."""
    secret_file, server_key = worker_cfg.auth.secret_key_file, worker_cfg.auth.server_key
    if not secret_file and not server_key:
        return None
    if not secret_file or not server_key:
        missing = "worker.auth.secret_key_file" if not secret_file else "worker.auth.server_key"
        raise AuthError(f"CURVE needs both worker.auth.secret_key_file and worker.auth.server_key; "
                        f"{missing} is not set")
    return ClientKeys.load(secret_file.replace("{id}", worker_id), server_key)


_default_keys: ClientKeys | None = None


def use_client_keys(keys: ClientKeys | None) -> None:
    """The keys every ``Client`` of this process uses unless given its own (``asgd worker``
    sets them from its configuration)."""
    global _default_keys
    _default_keys = keys


def default_client_keys() -> ClientKeys | None:
    return _default_keys
