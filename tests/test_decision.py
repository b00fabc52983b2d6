"""The hoisted decision against the float64 naive reference, and the selection rules."""

from __future__ import annotations

import copy

import pytest
import torch

from idql_runtime.config import Config
from idql_runtime.decision import (
    Decision,
    DecisionNoise,
    DecisionSpec,
    reference_decide,
    select_index,
)
from idql_runtime.diffusion import Schedule
from idql_runtime.networks import QEnsemble, ScoreNetwork, ValueNetwork


def _decision(mode: str, seed: int = 0, obs_dim: int = 11, act_dim: int = 3) -> Decision:
    torch.manual_seed(seed)
    c = Config()
    return Decision(
        ScoreNetwork(obs_dim, act_dim, c.network),
        QEnsemble(obs_dim, act_dim, c.critic),
        ValueNetwork(obs_dim, c.critic),
        Schedule.make("vp", 5),
        mode=mode,
    ).eval()


@pytest.mark.parametrize("mode", ["argmax", "implicit"])
def test_hoisted_decision_equals_naive_reference_in_float64(mode: str) -> None:
    d = _decision(mode).double()
    spec = DecisionSpec(batch=3, samples=32, steps=5, act_dim=3, obs_dim=11)
    noise = DecisionNoise.draw(
        spec, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    obs = torch.randn(3, 11, dtype=torch.float64)
    with torch.no_grad():
        fast = d(obs, *noise)
    ref = reference_decide(d, obs, noise, Schedule.make("vp", 5))
    torch.testing.assert_close(fast.action, ref.action, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.chosen_q, ref.chosen_q, atol=1e-10, rtol=0)
    assert fast.index.tolist() == ref.index.tolist()


def test_float32_decision_close_to_float64_reference() -> None:
    d = _decision("argmax")
    d64 = copy.deepcopy(d).double()
    spec = DecisionSpec(batch=4, samples=64, steps=5, act_dim=3, obs_dim=11)
    noise = DecisionNoise.draw(spec, generator=torch.Generator().manual_seed(2))
    obs = torch.randn(4, 11)
    with torch.no_grad():
        out = d(obs, *noise)
    ref = reference_decide(
        d64, obs.double(), DecisionNoise(*(x.double() for x in noise)), Schedule.make("vp", 5)
    )
    assert (out.action.double() - ref.action).abs().max() < 1e-4
    assert out.action.abs().max() <= 1.0


def test_argmax_picks_highest_q() -> None:
    q = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.9]])
    idx = select_index(q, torch.zeros(2), torch.zeros(2), "argmax", "expectile", 0.7, 1.0)
    assert idx.tolist() == [1, 0]


@pytest.mark.parametrize("kind", ["expectile", "quantile", "exponential"])
def test_implicit_selection_follows_theorem_weights(kind: str) -> None:
    """Inverse-CDF draws on a uniform grid reproduce pi_imp ∝ w(Q - V) to 1/M."""
    from idql_runtime.critic import implicit_weights

    q = torch.tensor([[-1.0, 0.2, 0.5, 2.0]], dtype=torch.float64)
    v = torch.tensor([0.3], dtype=torch.float64)
    p = implicit_weights(q - v, kind, 0.7, 1.0)[0]
    p = p / p.sum()
    m = 20000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    idx = select_index(q.expand(m, 4), v.expand(m), u, "implicit", kind, 0.7, 1.0)
    freq = torch.bincount(idx, minlength=4).double() / m
    assert (freq - p).abs().max() < 2.0 / m


def test_decision_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode must be"):
        _decision("greedy")
