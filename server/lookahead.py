"""Look-ahead (``server.lookahead``): the weights a worker gets are those predicted for when
its gradient will land, not the current ones.

    ahead = LookAhead()
    ahead.observe(staleness)                   # each applied push's staleness
    ahead.distance                             # their running mean: the updates a gradient lags
    served = ahead.served(weights, optimizer, param, lr)   # w - distance x the next step

In A-SGD a gradient computed from version v is applied at version v + staleness: with
momentum (AdamW's beta1, SGD's momentum) the weights move by about one optimizer step per
update in between, along the momentum, and a delayed gradient then acts against a momentum
that has already moved on. With 2 workers (staleness 1) this costs a byte-level GPT a tenth
of its loss at the same tokens (docs/performance.md). DANA (Hakimi et al. 2019) sends each
worker the weights the momentum predicts for when its gradient lands, w - tau x (the next
step the optimizer would make from its state alone); this module computes that step for
Adam, AdamW and SGD with momentum from the torch optimizer's own state, and tau as the
running mean of the staleness the server measures (so one worker, staleness 0, gets the
weights themselves, exactly).

The step is the optimizer's: Adam(W) ``lr * m_hat / (sqrt(v_hat) + eps)`` (AdamW adds
``lr * weight_decay * w``), SGD ``lr * momentum_buffer``. The server keeps the true weights
(what it steps, checkpoints and gives at the end) apart from the served ones.
"""
from __future__ import annotations

import torch

SMOOTHING = 0.9        # the running mean's weight on the past (bias-corrected, as Adam's)


class LookAhead:
    def __init__(self, smoothing: float = SMOOTHING):
        self.smoothing = smoothing
        self._num = self._den = 0.0

    def observe(self, staleness: int) -> None:
        """One applied push's staleness."""
        self._num = self.smoothing * self._num + staleness
        self._den = self.smoothing * self._den + 1.0

    @property
    def distance(self) -> float:
        """How many updates a gradient lags, on average lately (0 before any push)."""
        return self._num / self._den if self._den else 0.0

    def served(self, weights: torch.Tensor, opt: torch.optim.Optimizer, param, lr: float,
               out: torch.Tensor) -> torch.Tensor:
        """``out`` = ``weights`` - distance x the next step of ``opt`` (whose one parameter
        is ``param``) at rate ``lr``; the weights themselves when there is nothing to predict
        (no momentum, no state yet, distance 0)."""
        step = next_step(opt, param, weights, lr)
        tau = self.distance
        if step is None or tau == 0:
            return out.copy_(weights)
        return torch.add(weights, step, alpha=-tau, out=out)


def next_step(opt: torch.optim.Optimizer, param, weights: torch.Tensor, lr: float):
    """The step ``opt`` would subtract from ``weights`` at the next update if the gradient
    added nothing new: a new tensor, or None where it has no momentum (or no state yet)."""
    group = opt.param_groups[0]
    st = opt.state.get(param) or {}
    name = type(opt).__name__
    if name in ("Adam", "AdamW") and "exp_avg" in st:
        b1, b2 = group["betas"]
        k = float(st["step"])
        m_hat = st["exp_avg"] / (1 - b1 ** k)
        denom = (st["exp_avg_sq"] / (1 - b2 ** k)).sqrt_().add_(group["eps"])
        step = m_hat.div_(denom).mul_(lr)
        if name == "AdamW" and group["weight_decay"]:
            step.add_(weights, alpha=lr * group["weight_decay"])
        return step
    if name == "SGD" and st.get("momentum_buffer") is not None:
        return st["momentum_buffer"] * lr
    return None
