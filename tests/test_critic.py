"""Theorem 4.1 on discrete bandits, and the value losses' closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from idql_runtime.critic import (
    expectile_loss,
    exponential_loss,
    implicit_weights,
    q_loss,
    quantile_loss,
    value_loss,
)


def _bandit(seed: int, k: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = -torch.log(torch.rand(k, generator=g, dtype=torch.float64))  # Dirichlet(1) via Gamma(1)
    mu = w / w.sum()
    q = torch.randn(k, generator=g, dtype=torch.float64) * 2.0
    return mu, q


def _minimise(fn, lo: float, hi: float, iters: int = 300) -> float:
    """Golden-section search of a convex scalar function (float64)."""
    gr = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - gr * (b - a), a + gr * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - gr * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + gr * (b - a)
            fd = fn(d)
    return (a + b) / 2


def _loss_fn(kind: str, tau: float, alpha: float):
    if kind == "expectile":
        return lambda u: expectile_loss(u, tau)
    if kind == "quantile":
        return lambda u: quantile_loss(u, tau)
    return lambda u: exponential_loss(u, alpha)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "kind,tau,alpha",
    [
        ("expectile", 0.7, 1.0),
        ("expectile", 0.9, 1.0),
        ("exponential", 0.7, 0.5),
        ("exponential", 0.7, 2.0),
    ],
)
def test_theorem_4_1_implicit_policy_has_zero_advantage(
    seed: int, kind: str, tau: float, alpha: float
) -> None:
    """V* = argmin_V E_mu[f(Q - V)] found numerically from the implemented loss; then
    pi_imp ∝ mu * w(Q - V*) must satisfy E_pi_imp[Q - V*] = 0 (Theorem 4.1)."""
    mu, q = _bandit(seed)
    f = _loss_fn(kind, tau, alpha)
    v_star = _minimise(
        lambda v: float((mu * f(q - v)).sum()), float(q.min()) - 1, float(q.max()) + 1
    )
    u = q - v_star
    pi = mu * implicit_weights(u, kind, tau, alpha)
    pi = pi / pi.sum()
    assert abs(float((pi * u).sum())) < 1e-6
    assert (pi >= 0).all()
    if kind == "exponential":
        lse = math.log(float((mu * torch.exp(alpha * q)).sum())) / alpha  # Eq. 11
        assert abs(v_star - lse) < 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_theorem_4_1_quantile(seed: int) -> None:
    """Quantile: V* is the mu-weighted tau-quantile of Q, an atom of mu; w = asym/|u| puts
    an atom of pi_imp there (weight -> inf), and the off-atom imbalance sum mu w u lies in
    the atom's subgradient range, so a non-negative atom weight zeroes E_pi_imp[Q - V*]."""
    tau = 0.7
    mu, q = _bandit(seed)
    f = _loss_fn("quantile", tau, 1.0)
    v_star = _minimise(
        lambda v: float((mu * f(q - v)).sum()), float(q.min()) - 1, float(q.max()) + 1
    )
    order = torch.argsort(q)
    cdf = torch.cumsum(mu[order], 0)
    k = int(order[int(torch.searchsorted(cdf, torch.tensor(tau, dtype=torch.float64)))])
    assert abs(v_star - float(q[k])) < 1e-6
    u = q - float(q[k])
    off = torch.arange(len(q)) != k
    imbalance = float((mu[off] * implicit_weights(u[off], "quantile", tau) * u[off]).sum())
    # optimality: 0 is in the subgradient, i.e. the atom's share mu_k * [-(1 - tau), tau]
    # can cancel the rest's net push sum_{j != k} mu_j f'(u_j)
    assert -float(mu[k]) * (1 - tau) - 1e-12 <= -imbalance <= float(mu[k]) * tau + 1e-12
    # with the weight cap asym/1e-6 the atom holds almost all of pi_imp, and E_pi[u] -> 0
    w = implicit_weights(u, "quantile", tau)
    pi = mu * w / (mu * w).sum()
    assert float(pi[k]) > 0.999
    assert abs(float((pi * u).sum())) < 1e-5


def test_reference_code_quantile_and_exponential_weights_differ_from_paper() -> None:
    u = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=torch.float64)
    w_q = implicit_weights(u, "quantile", 0.7)
    assert (w_q > 0).all()  # the reference divides by signed u: negative weights for u < 0
    torch.testing.assert_close(
        w_q, torch.tensor([0.3 / 2, 0.3 / 0.5, 0.7 / 0.5, 0.7 / 2], dtype=torch.float64)
    )
    w_e = implicit_weights(u, "exponential", 0.7, alpha=1.5)
    expected = 1.5 * torch.expm1(1.5 * u) / u  # Eq. 12; the reference returns alpha^2 for all u
    torch.testing.assert_close(w_e, expected)
    assert (
        float(implicit_weights(torch.zeros(1, dtype=torch.float64), "exponential", 0.7, 1.5))
        == 1.5**2
    )


def test_value_loss_closed_forms() -> None:
    u = torch.tensor([-1.0, 2.0])
    assert math.isclose(
        float(value_loss(u, "expectile", 0.7)), (0.3 * 1 + 0.7 * 4) / 2, rel_tol=1e-6
    )
    assert math.isclose(
        float(value_loss(u, "quantile", 0.7)), (0.3 * 1 + 0.7 * 2) / 2, rel_tol=1e-6
    )
    e = (math.exp(-1) + 1 - 1 + math.exp(2) - 2 - 1) / 2
    assert math.isclose(float(value_loss(u, "exponential", 0.7, alpha=1.0)), e, rel_tol=1e-6)
    # clipped surrogate: gradient in u equals (min(exp(alpha u), clip) - 1) / alpha
    uu = torch.tensor([0.1, 3.0], requires_grad=True)
    exponential_loss(uu, 1.0, exp_clip=6.0).sum().backward()
    torch.testing.assert_close(uu.grad, torch.tensor([math.exp(0.1) - 1, 5.0]))


def test_q_loss_is_mean_of_heads_mse() -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([0.0, 1.0])
    assert math.isclose(float(q_loss(pred, y)), ((1 + 1) / 2 + (9 + 1) / 2) / 2)
