"""The server's ROUTER socket: its limits, ZeroMQ heartbeats and CURVE.

    sock, authenticator = open_socket(ctx, "tcp://127.0.0.1:5555", store, cfg)
    socket_limits(store, cfg)      # {"maxmsgsize", "rcvhwm", "sndhwm"}, from the model's size

Split from server.main (the loop around ServerCore), which opens it.
"""
from __future__ import annotations

import logging

import zmq

from asgd.config import Config
from asgd.core import auth, protocol
from server.store import ParameterStore

log = logging.getLogger("asgd.server")

QUEUE_BYTES = 64 << 20       # what a few queued messages per peer and direction may hold
MIN_HWM, MAX_HWM = 4, 1000   # messages queued per peer: at least a few, at most ZeroMQ's default
HEADER_SLACK = 2 * protocol.MAX_HEADER_BYTES   # frames up to 2 MiB are read: an oversized
                                               # header still gets its too_large answer


def socket_limits(store: ParameterStore, cfg: Config) -> dict:
    """ZMQ_MAXMSGSIZE and the high-water marks of the server's socket, from the store.

    ZeroMQ applies MAXMSGSIZE to each frame and disconnects a peer that sends a larger one.
    No frame of a legal request is larger than the whole largest request: the header (1 MiB
    at most) and the flat gradient of this store's ``numel`` values at 4 bytes each (8 for
    top-k's int64 indices from 2**31 values on), so that is the limit; ``server.max_message_mb``
    caps it when smaller, but never below 2 MiB, so that a header of more than 1 MiB is still
    read and answered ``too_large``. The high-water marks (messages queued per peer, each way)
    are QUEUE_BYTES over one gradient message, within [4, 1000]. A shard's frames are those
    of the whole model (a hello carries every parameter); a server without a model yet takes
    frames up to the cap, and queues as for a large model."""
    cap = int(cfg.server.max_message_mb * (1 << 20))
    numel = store.layout.numel if store.has_model else cap
    per_value = 8 if numel >= 2 ** 31 else 4
    largest = protocol.MAX_HEADER_BYTES + per_value * numel
    maxmsgsize = max(HEADER_SLACK, min(largest, cap))
    message = 4 * (store.numel if store.has_model else numel) + (64 << 10)   # gradient, header
    hwm = max(MIN_HWM, min(MAX_HWM, QUEUE_BYTES // message))
    return {"maxmsgsize": maxmsgsize, "rcvhwm": hwm, "sndhwm": hwm}


def open_socket(ctx: zmq.Context, bind: str, store: ParameterStore, cfg: Config):
    """The server's ROUTER, bound: its limits (``socket_limits``), ZeroMQ heartbeats, and with
    ``server.auth.mode: curve`` CURVE with a ZAP authenticator that lets in the allow-list only.
    (socket, authenticator or None). AuthError (a ValueError) for keys that cannot be used."""
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    limits = socket_limits(store, cfg)
    sock.setsockopt(zmq.MAXMSGSIZE, limits["maxmsgsize"])
    sock.rcvhwm, sock.sndhwm = limits["rcvhwm"], limits["sndhwm"]
    auth.set_heartbeats(sock)
    authenticator = None
    try:
        authenticator = auth.secure_server(ctx, sock, cfg.server)
        sock.bind(bind)
    except BaseException:
        sock.close(0)
        if authenticator is not None:
            authenticator.stop()
        raise
    if authenticator is None and not auth.is_loopback(bind):
        log.warning("serving %s without authentication: anyone who can reach this port can "
                    "read the weights and push gradients; set server.auth.mode=curve (README, "
                    "Across machines) or open the port only to your workers", bind)
    return sock, authenticator
