"""What the client's modules share: what a request can end in besides its reply (an error
reply, ``ServerError`` with the protocol's code, or none in time, ``ServerTimeout``), a
push as it is sent (``Push``), and a model as hello carries it (``model_frames``)."""
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


def model_frames(tensors) -> list:
    """A model as hello carries it (docs/protocol.md, hello): (name, float32 array on the
    host) pairs in model order, from a mapping name -> tensor or such pairs. A list, so that
    every shard of a sharded server is given the whole of it."""
    pairs = tensors.items() if hasattr(tensors, "items") else tensors or ()
    return [(name, _float32(t)) for name, t in pairs]


def _float32(t):
    if hasattr(t, "detach"):          # a torch tensor (torch is loaded when one is given)
        import torch

        return t.detach().to(device="cpu", dtype=torch.float32)
    return np.asarray(t, dtype=np.float32)


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
