"""ZeroMQ endpoints as users type them, checked before any socket sees them.

    parse_endpoint("tcp://10.0.0.5:5555")          # as is
    parse_endpoint("server:5555")                  # host:port means tcp: "tcp://server:5555"
    parse_endpoint("tcp://0.0.0.0:0", bind=True)   # port 0 (or *): any free port
    parse_endpoint("localhost")                    # ValueError showing a correct example

Accepted: ``tcp://HOST:PORT`` (HOST a name, an IPv4 address, ``[IPv6]``, or ``*`` / an
interface when binding), ``ipc://PATH`` and ``inproc://NAME``; a bare ``HOST:PORT`` is taken
as tcp.

    is_local("ipc:///tmp/s.sock")                  # True: certainly on this machine
    own_address("10.0.0.5")                        # True when an interface here has it
    write_address(path, endpoint); read_address(path, timeout_s)   # a server's address file
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from pathlib import Path

EXAMPLE = "tcp://127.0.0.1:5555 (or host:port)"
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+)$")


def parse_endpoint(text: str, bind: bool = False) -> str:
    """The endpoint in ZeroMQ's spelling; ValueError with a one-line reason and an example."""
    text = (text or "").strip()
    if not text:
        raise ValueError(f"an endpoint is needed, e.g. {EXAMPLE}")
    if "://" not in text:
        if text.count(":") == 0:
            raise ValueError(f"{text!r} has no port: use e.g. tcp://{text}:5555")
        text = "tcp://" + text
    scheme, rest = text.split("://", 1)
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise ValueError(f"{text!r} names no {'path' if scheme == 'ipc' else 'name'}")
        return text
    if scheme != "tcp":
        raise ValueError(f"unknown transport {scheme!r} in {text!r}: use tcp://, ipc:// or "
                         f"inproc://, e.g. {EXAMPLE}")
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} needs a host and a port, e.g. {EXAMPLE}")
    if not _HOST.match(host) or ("*" in host and (not bind or host != "*")):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address, e.g. {EXAMPLE}")
    if port == "*" and bind:
        return text
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (int(port) == 0 and not bind):
        want = "0-65535 (0 or * for any free port)" if bind else "1-65535"
        raise ValueError(f"{text!r}: port {port!r} is not a number in {want}, e.g. {EXAMPLE}")
    return text


def is_local(endpoint: str) -> bool:
    """An endpoint on this machine for certain: a unix socket, a loopback address, or an
    address of one of this machine's interfaces (every one of a comma-separated list of
    shards' endpoints). Host names other than localhost are not looked up."""
    if "," in endpoint:
        return all(is_local(e.strip()) for e in endpoint.split(","))
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.") or own_address(host)


def own_address(host: str) -> bool:
    """True when ``host`` is a literal IP address of this machine's (in this network
    namespace): a socket can be bound to it only then."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def write_address(path: Path, endpoint: str) -> None:
    """Announce an endpoint: written to a temporary file and renamed, never seen half-written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(endpoint + "\n")
    os.replace(tmp, path)


def read_address(path: Path, timeout_s: float, stop=lambda: False) -> str | None:
    """The endpoint announced in ``path`` once it is there (a process started alongside the
    one that announces it), or None after ``timeout_s`` or once ``stop()`` is true."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop():
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        time.sleep(0.02)
    return None


def read_addresses(paths) -> list[str] | None:
    """The endpoints announced in address files, each read once (no waiting); None while one
    of them is missing or empty (a restarted server not listening yet)."""
    out = []
    for f in paths:
        try:
            text = Path(f).read_text().strip()
        except OSError:
            return None
        if not text:
            return None
        out.append(text)
    return out
