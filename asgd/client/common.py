"""What the client's modules share: what a request can end in besides its reply (an error
reply, ``ServerError`` with the protocol's code, or none in time, ``ServerTimeout``), and a
push as it is sent (``Push``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ServerError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"server answered {code}: {message}")
        self.code, self.message = code, message


class ServerTimeout(Exception):
    pass


def check_reply(head: dict, rid: int) -> bool:
    """True when ``head`` answers request ``rid``, False for a late reply to an earlier one;
    ServerError for an error reply to it, or one the server could not tie to an id (ours is
    the only request waiting)."""
    if head.get("id") is None and not head.get("ok"):
        raise ServerError(head.get("error", "internal"), head.get("message", ""))
    if head.get("id") != rid:
        return False
    if not head.get("ok"):
        raise ServerError(head.get("error", "internal"), head.get("message", ""))
    return True


@dataclass
class Push:
    """One push as it is sent, and sent again unchanged when its reply is late (the same
    ``seq``: the server applies it once and answers a repeat from memory). The gradient is in
    the shared-memory segment's ``slot``, or ``grad`` (flat float32, sent without a copy:
    left alone until the reply came), or ``encoded``: one (meta, arrays) per part of
    ``client.parts`` (asgd.core.encoding). ``version``: what it was computed on
    (``client.base()``)."""

    version: int | list
    seq: int | None = None
    slot: int | None = None
    grad: np.ndarray | None = None
    encoded: list | None = None
    weights: str = "none"         # the reply's weights encoding (frames)
    op: str = "push_pull"
