"""Look-ahead (server.lookahead, server/lookahead.py): workers get the weights predicted for
when their gradient lands; the server steps and checkpoints the true ones. Against numbers
worked out by hand, in process and over a real server process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asgd.core.checkpoint import load_checkpoint
from server.lookahead import LookAhead, next_step
from tests.conftest import gradients

LR, B1, B2, WD, EPS = 0.01, 0.9, 0.99, 0.5, 1e-8


def test_the_distance_is_the_running_mean_of_the_staleness():
    ahead = LookAhead()
    assert ahead.distance == 0.0
    ahead.observe(0)
    assert ahead.distance == 0.0
    ahead.observe(1)                   # (0.9 * 0 + 1) / (0.9 * 1 + 1)
    assert abs(ahead.distance - 1 / 1.9) < 1e-12
    ahead.observe(1)                   # (0.9 * 1 + 1) / (0.9 * 1.9 + 1)
    assert abs(ahead.distance - 1.9 / 2.71) < 1e-12


def test_adamw_next_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.AdamW([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    assert next_step(opt, w, w.detach(), 0.2) is None        # no state yet: nothing to predict
    w.grad = torch.tensor([0.5, -1.0])
    opt.step()
    # m_hat = g, v_hat = g^2: the first step is lr * sign(g), after the decay w * (1 - 0.05)
    torch.testing.assert_close(w.detach(), torch.tensor([0.85, -1.8]))
    # the next step at rate 0.2: 0.2 * sign(g) + 0.2 * 0.5 * w
    torch.testing.assert_close(next_step(opt, w, w.detach(), 0.2),
                               torch.tensor([0.2 + 0.085, -0.2 - 0.18]))
    sgd_w = torch.nn.Parameter(torch.tensor([1.0]))
    sgd = torch.optim.SGD([sgd_w], lr=0.1, momentum=0.9)
    sgd_w.grad = torch.tensor([2.0])
    sgd.step()                          # the buffer is the first gradient
    torch.testing.assert_close(next_step(sgd, sgd_w, sgd_w.detach(), 0.5), torch.tensor([1.0]))
    plain = torch.optim.SGD([sgd_w], lr=0.1)
    plain.step()
    assert next_step(plain, sgd_w, sgd_w.detach(), 0.5) is None   # no momentum


def adamw_by_hand(w, grads):
    """AdamW's weights and moments after each gradient, in float64."""
    m, v, out = np.zeros_like(w), np.zeros_like(w), []
    for k, g in enumerate(grads, 1):
        w = w * (1 - LR * WD)
        m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
        w = w - LR * (m / (1 - B1 ** k)) / (np.sqrt(v / (1 - B2 ** k)) + EPS)
        out.append((w, m / (1 - B1 ** k), v / (1 - B2 ** k)))
    return out


def test_a_stale_push_gets_the_looked_ahead_weights_and_the_checkpoint_the_true_ones(
        start_server, make_config, clients):
    server = start_server(make_config(
        optimizer={"name": "adamw", "lr": LR, "betas": [B1, B2], "weight_decay": WD},
        schedule={"kind": "constant", "warmup": 0},
        server={"lookahead": True, "checkpoint_every_s": 0}))
    a, b = clients(server.endpoint, "a"), clients(server.endpoint, "b")
    info, weights = a.hello(rank=0)
    b.hello(rank=1)
    specs = info["tensors"]
    w0 = np.concatenate([t.array.reshape(-1) for t in weights]).astype(np.float64)
    g1, g2 = gradients(specs, 1), gradients(specs, 2)
    flat_g = [np.concatenate([g.reshape(-1) for _, g in gs]).astype(np.float64)
              for gs in (g1, g2)]
    (w1, _, _), (w2, m2, v2) = adamw_by_hand(w0, flat_g)

    reply, got = a.push_pull(0, g1)              # staleness 0: the weights themselves
    assert (reply["version"], reply["staleness"]) == (1, 0)
    np.testing.assert_allclose(np.concatenate([t.array.reshape(-1) for t in got]), w1,
                               rtol=1e-5, atol=1e-7)
    reply, got = b.push_pull(0, g2)              # computed at 0, applied at 1: staleness 1
    assert (reply["version"], reply["staleness"]) == (2, 1)
    tau = 1 / 1.9                                # the running mean of 0 and 1
    served = w2 - tau * LR * (m2 / (np.sqrt(v2) + EPS) + WD * w2)
    np.testing.assert_allclose(np.concatenate([t.array.reshape(-1) for t in got]), served,
                               rtol=1e-5, atol=1e-7)
    assert np.abs(served - w2).max() > 1e-3      # the two differ by far more than rounding

    assert server.stop() == 0                    # SIGTERM: the checkpoint holds the true ones
    ckpt = load_checkpoint(server.run_dir / "checkpoint")
    assert ckpt.version == 2
    np.testing.assert_allclose(ckpt.flat.double().numpy(), w2, rtol=1e-5, atol=1e-7)


def test_the_keyword_travels_in_hello_settings_and_the_server_adopts_it():
    from asgd.config import Config
    from asgd.optimizer_config import resolve
    from server.adopt import SettingsError, apply_settings, check_settings

    settings = resolve({"optimizer": "adamw", "lookahead": True}).settings
    assert settings["lookahead"] is True
    assert "lookahead" not in resolve({"optimizer": "adamw"}).settings   # the server's own
    cfg = apply_settings(Config(), settings)
    assert cfg.server.lookahead is True
    check_settings(cfg, settings)                                  # the same: accepted
    with pytest.raises(SettingsError, match="lookahead"):
        check_settings(apply_settings(Config(), {**settings, "lookahead": False}),
                       settings)                                   # a server without it
