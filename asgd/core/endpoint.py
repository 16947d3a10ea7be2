"""ZeroMQ endpoints as users type them, checked before any socket sees them.

    parse_endpoint("tcp://10.0.0.5:5555")          # as is
    parse_endpoint("server:5555")                  # host:port means tcp: "tcp://server:5555"
    parse_endpoint("tcp://0.0.0.0:0", bind=True)   # port 0 (or *): any free port
    parse_endpoint("localhost")                    # ValueError showing a correct example

Accepted: ``tcp://HOST:PORT`` (HOST a name, an IPv4 address, ``[IPv6]``, or ``*`` / an
interface when binding), ``ipc://PATH`` and ``inproc://NAME``; a bare ``HOST:PORT`` is taken
as tcp.
"""
from __future__ import annotations

import re

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
