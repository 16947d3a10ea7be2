"""A worker's training step on flat buffers: one batch's gradient, or local steps and their
pseudo-gradient. The built-in worker (worker/train.py) runs it on its ``Exchange``; the
simulator (simulator/) runs it for every virtual worker on one model's ``FlatBuffers``.

    buffers = FlatBuffers(model, layout)      # the parameters become views of buffers.weights
    buffers.load(flat_weights)
    loss, n = compute_gradient(model, loader, buffers)        # the gradient in buffers.grad
    local = LocalSteps(cfg, layout.parameters(model))          # worker.exchange.local_steps > 1
    loss, n, delta = local.run(version, lambda: compute_gradient(model, loader, buffers),
                               buffers)

``buffers`` is anything with ``zero_grad()`` (every parameter's ``.grad`` a zeroed view of one
flat buffer), ``start_local()`` (remember the weights local steps start from) and ``delta()``
(those weights minus the weights now: the pseudo-gradient the server's outer optimizer
applies), as ``asgd.client.exchange.Exchange`` has.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from asgd.config import Config


def compute_gradient(model, loader, buffers, pipeline=None, scale: float = 1.0):
    """Loss and batch size of one step on the next batch of ``loader``; the gradient is in
    ``buffers`` (times ``scale``, the fp16 loss scale, through a ``pipeline``)."""
    x, y = loader.next()
    if pipeline is not None:
        buffers.zero_grad()
        return pipeline.forward_backward(x, y, scale), len(x)
    loss = F.cross_entropy(model(x), y)
    buffers.zero_grad()
    loss.backward()
    return loss, len(x)


def follows_dylu(cfg: Config) -> bool:
    """Whether a worker of ``cfg`` runs the local steps the server's replies give (dylu)."""
    from asgd.core.policies import parse_policy

    return cfg.worker.exchange.local_steps > 1 and "dylu" in parse_policy(cfg.server.policy)


class LocalSteps:
    """Asynchronous Local SGD (DiLoCo) on the worker: ``worker.exchange.local_steps`` steps of
    the worker's own optimizer (its state kept from push to push) from the weights last
    pulled, on the same schedule shape over the run's inner steps. With dylu the server's
    reply to each push gives the next round's steps (``follow``), at most H."""

    def __init__(self, cfg: Config, params):
        from asgd.core.optim import inner_config, make_optimizer

        self.full = self.steps = cfg.worker.exchange.local_steps
        self.cfg = inner_config(cfg)
        self.optimizer = make_optimizer(cfg, list(params), fused=True)   # 3x faster on a CPU

    def run(self, version: int, gradient, buffers):
        """``gradient()`` (loss, samples) computes one batch's gradient into the parameters'
        ``.grad``; returns the last loss, the samples of every step and the pseudo-gradient
        (``buffers.delta()``). ``version``: the server version the weights were pulled at,
        which places these steps on the inner schedule."""
        from asgd.core.optim import scheduled_lr

        buffers.start_local()
        first = version * self.full
        total, loss = 0, None
        for i in range(self.steps):
            for group in self.optimizer.param_groups:
                group["lr"] = scheduled_lr(self.cfg, first + i)
            loss, n = gradient()
            self.optimizer.step()
            total += n
        return loss, total, buffers.delta()

    def follow(self, reply) -> None:
        """dylu: the steps of the next round, from a push's reply (1 <= steps <= H); a
        reply without them (another policy, a dropped push's) leaves them as they are."""
        h = reply.get("local_steps") if isinstance(reply, dict) else None
        if isinstance(h, int) and not isinstance(h, bool) and h >= 1:
            self.steps = min(h, self.full)


class FlatBuffers:
    """One model's parameters as views of one flat weights buffer, their gradients as views of
    one flat gradient buffer: ``Exchange``'s buffers without an exchange (on the CPU)."""

    def __init__(self, model, layout):
        self.layout = layout
        self.params = layout.parameters(model)
        self.weights = torch.zeros(layout.numel)
        self.grad = torch.zeros(layout.numel)
        self.anchor = None
        self._views_g = layout.views(self.grad)
        with torch.no_grad():
            for p, v in zip(self.params, layout.views(self.weights)):
                v.copy_(p.detach().reshape(-1).view_as(v))
                p.data = v

    def load(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            self.weights.copy_(flat)

    def zero_grad(self) -> None:
        self.grad.zero_()
        for p, v in zip(self.params, self._views_g):
            p.grad = v

    def gradient(self) -> torch.Tensor:
        """The flat gradient (a parameter autograd gave a fresh ``.grad`` is copied in)."""
        for p, v in zip(self.params, self._views_g):
            if p.grad is None:
                v.zero_()
            elif p.grad.data_ptr() != v.data_ptr():
                v.copy_(p.grad)
        return self.grad

    def start_local(self) -> None:
        if self.anchor is None:
            self.anchor = self.weights.clone()
        else:
            self.anchor.copy_(self.weights)

    def delta(self) -> torch.Tensor:
        torch.sub(self.anchor, self.weights, out=self.grad)
        return self.grad
