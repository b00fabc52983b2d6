"""Generalised IQL critic: value losses (paper Eq. 1, Sec. 4.1) and the implicit-policy
importance weights of Theorem 4.1.

For a convex value loss f with f'(0) = 0, the V minimising E_mu[f(Q - V)] satisfies
E_mu[f'(Q - V)] = 0; so the implicit policy pi_imp(a|s) proportional to
mu(a|s) * w(Q - V) with w(u) = f'(u) / u has E_{pi_imp}[Q - V] = 0 (Theorem 4.1). Up to
constant factors (which cancel after normalisation):
    expectile   f = |tau - 1(u<0)| u^2        w = |tau - 1(u<0)|                  (Eq. 9)
    quantile    f = |tau - 1(u<0)| |u|        w = |tau - 1(u<0)| / |u|            (Eq. 10)
    exponential f = exp(alpha u) - alpha u    w = alpha (exp(alpha u) - 1) / u    (Eq. 12)
The reference code's quantile weight divides by the signed u and its exponential weight
is a constant: both are wrong (idql-reference.md s4); these follow the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

# |u| below this is treated as 0 in the weights (their limits are finite except quantile).
_U_EPS = 1e-6


def _asym(u: Tensor, tau: float) -> Tensor:
    """|tau - 1(u < 0)|: tau where u > 0, 1 - tau elsewhere (reference: strict >)."""
    return torch.where(u > 0, torch.full_like(u, tau), torch.full_like(u, 1.0 - tau))


def expectile_loss(u: Tensor, tau: float) -> Tensor:
    """Elementwise |tau - 1(u<0)| u^2 (paper Eq. 1 with the expectile loss)."""
    return _asym(u, tau) * u**2


def quantile_loss(u: Tensor, tau: float) -> Tensor:
    """Elementwise |tau - 1(u<0)| |u|."""
    return _asym(u, tau) * u.abs()


def exponential_loss(u: Tensor, alpha: float, exp_clip: float | None = None) -> Tensor:
    """Elementwise (exp(alpha u) - alpha u - 1) / alpha^2, minimised at V = LSE (Eq. 11).

    With ``exp_clip`` set, the value is replaced by a surrogate whose gradient in u is
    (min(exp(alpha u), exp_clip) - 1) / alpha, as the reference clips exp at 6.
    """
    if exp_clip is None:
        return (torch.expm1(alpha * u) - alpha * u) / alpha**2
    g = torch.clamp(torch.exp(alpha * u), max=exp_clip).detach()
    return (g - 1.0) * u / alpha


def value_loss(
    u: Tensor, kind: str, tau: float, alpha: float = 1.0, exp_clip: float | None = None
) -> Tensor:
    """Mean value loss of residuals u = Q - V over the batch."""
    if kind == "expectile":
        return expectile_loss(u, tau).mean()
    if kind == "quantile":
        return quantile_loss(u, tau).mean()
    if kind == "exponential":
        return exponential_loss(u, alpha, exp_clip).mean()
    raise ValueError(f"unknown value loss {kind!r}; choose expectile, quantile or exponential")


def implicit_weights(u: Tensor, kind: str, tau: float, alpha: float = 1.0) -> Tensor:
    """Theorem 4.1 weights w(u) = f'(u)/u (non-negative), elementwise on u = Q - V.

    The quantile weight diverges at u = 0 (pi_imp puts an atom there); it is capped at
    |tau - 1(u<0)| / 1e-6. The exponential weight's limit at u = 0 is alpha^2.
    """
    if kind == "expectile":
        return _asym(u, tau)
    if kind == "quantile":
        return _asym(u, tau) / u.abs().clamp_min(_U_EPS)
    if kind == "exponential":
        small = u.abs() < _U_EPS
        safe_u = torch.where(small, torch.ones_like(u), u)
        w = alpha * torch.expm1(alpha * safe_u) / safe_u
        return torch.where(small, torch.full_like(u, alpha * alpha), w)
    raise ValueError(f"unknown value loss {kind!r}; choose expectile, quantile or exponential")


def q_loss(q_pred: Tensor, target: Tensor) -> Tensor:
    """Mean over heads and batch of (Q_i - y)^2: the average of the heads' MSE (reference s3).

    q_pred (E, B), target (B,).
    """
    return ((q_pred - target.unsqueeze(0)) ** 2).mean()
