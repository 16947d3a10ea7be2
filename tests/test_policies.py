"""Staleness policies (asgd.policies.decide): pure functions of integers."""
from __future__ import annotations

import pytest

from asgd.core.policies import POLICIES, decide


@pytest.mark.parametrize("staleness", [0, 1, 7, 10_000])
def test_none_applies_every_push(staleness):
    d = decide("none", staleness)
    assert d.apply is True and d.lr_scale == 1.0


@pytest.mark.parametrize("k", [0, 1, 3, 50])
def test_max_staleness_bound_is_inclusive(k):
    for s in range(k + 1):
        d = decide("max_staleness", s, max_staleness=k)
        assert d.apply is True and d.lr_scale == 1.0, (s, k)
    dropped = decide("max_staleness", k + 1, max_staleness=k)
    assert dropped.apply is False
    assert dropped.lr_scale == 0.0
    assert str(k + 1) in dropped.reason and str(k) in dropped.reason
    assert decide("max_staleness", k + 100, max_staleness=k).apply is False


def test_bound_combines_with_every_asynchronous_policy():
    # sync ignores the bound: tests/test_staleness_control.py, sync_takes_every_gradient
    for policy in set(POLICIES) - {"sync"}:
        assert decide(policy, 4, max_staleness=4).apply is True
        assert decide(policy, 5, max_staleness=4).apply is False


def test_no_bound_never_drops():
    assert decide("max_staleness", 10**9, max_staleness=None).apply is True


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("staleness", [-1, -5])
def test_negative_staleness_raises(policy, staleness):
    with pytest.raises(ValueError):
        decide(policy, staleness, max_staleness=3)
    with pytest.raises(ValueError):
        decide(policy, staleness)


def test_unknown_policy_raises():
    with pytest.raises(ValueError) as e:
        decide("bogus", 0)
    assert "bogus" in str(e.value)
