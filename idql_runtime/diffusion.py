"""DDPM pieces of IDQL: beta schedules, the training loss and the reverse sampler.

Everything here follows idql-reference.md s2 exactly; step indices run 0..T-1 with index
0 the least noisy, and the network sees the integer index as a float.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def vp_betas(steps: int, b_min: float = 0.1, b_max: float = 10.0) -> Tensor:
    """Discretised VP-SDE: alpha_i = exp(-b_min/T - (b_max - b_min)(2i - 1)/(2 T^2)), i = 1..T."""
    i = torch.arange(1, steps + 1, dtype=torch.float64)
    alphas = torch.exp(-b_min / steps - 0.5 * (b_max - b_min) * (2 * i - 1) / steps**2)
    return 1.0 - alphas


def cosine_betas(steps: int, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal cosine schedule, betas clipped to [0, 0.999]."""
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    abar = abar / abar[0]
    return (1 - abar[1:] / abar[:-1]).clamp(0.0, 0.999)


def linear_betas(steps: int) -> Tensor:
    return torch.linspace(1e-4, 2e-2, steps, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int], Tensor]] = {
    "vp": vp_betas,
    "cosine": cosine_betas,
    "linear": linear_betas,
}


@dataclass(frozen=True)
class Schedule:
    """Per-step constants, float64, index 0..T-1 (0 = least noise)."""

    betas: Tensor
    alphas: Tensor
    alpha_bars: Tensor

    @classmethod
    def make(cls, name: str, steps: int) -> Schedule:
        if name not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {name!r}; choose from {sorted(SCHEDULES)}")
        betas = SCHEDULES[name](steps)
        alphas = 1.0 - betas
        return cls(betas, alphas, torch.cumprod(alphas, 0))

    @property
    def steps(self) -> int:
        return int(self.betas.shape[0])

    def reverse_coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """(1/sqrt(alpha_t), beta_t/sqrt(1 - alpha_bar_t), sqrt(beta_t)), each (T,)."""
        return (
            1.0 / torch.sqrt(self.alphas),
            self.betas / torch.sqrt(1.0 - self.alpha_bars),
            torch.sqrt(self.betas),
        )


def ddpm_loss(
    eps_model: Callable[[Tensor, Tensor, Tensor], Tensor],
    obs: Tensor,
    action: Tensor,
    schedule: Schedule,
    generator: torch.Generator | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Noise-prediction loss: batch mean of the per-sample squared L2 error, summed over
    action dims (reference s2.2, not F.mse_loss). Shapes: obs (B, obs_dim), action (B, A).
    """
    b = action.shape[0]
    t = torch.randint(0, schedule.steps, (b,), device=action.device, generator=generator)
    eps = torch.randn(action.shape, device=action.device, dtype=action.dtype, generator=generator)
    abar = schedule.alpha_bars.to(action.device, action.dtype)[t].unsqueeze(-1)
    x_t = torch.sqrt(abar) * action + torch.sqrt(1.0 - abar) * eps
    pred = eps_model(obs, x_t, t.to(action.dtype).unsqueeze(-1))
    per_sample = ((pred - eps) ** 2).sum(-1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def reverse_step(
    x: Tensor,
    eps_hat: Tensor,
    t: int,
    coeffs: tuple[Tensor, Tensor, Tensor],
    z: Tensor | None,
    temperature: float,
    clip: bool,
) -> Tensor:
    """One reverse update x_t -> x_{t-1} (reference s2.3): variance beta_t, none at t = 0."""
    inv_sqrt_alpha, eps_coef, sigma = coeffs
    x = inv_sqrt_alpha[t] * (x - eps_coef[t] * eps_hat)
    if t > 0 and z is not None:
        x = x + sigma[t] * temperature * z
    if clip:
        x = x.clamp(-1.0, 1.0)
    return x


def sample(
    eps_model: Callable[[Tensor, Tensor, Tensor], Tensor],
    obs: Tensor,
    x_init: Tensor,
    step_noise: Tensor,
    schedule: Schedule,
    temperature: float = 1.0,
    clip: bool = True,
    extra_final_steps: int = 0,
) -> Tensor:
    """The reference DDPM sampler with all randomness passed in.

    obs (M, obs_dim) and x_init (M, A) pair row by row (callers repeat observations N
    times); step_noise (T, M, A) holds z for each step index t (z[0] is unused since no
    noise is added at t = 0). Returns x_0 (M, A), clipped to [-1, 1].
    """
    dtype = x_init.dtype
    c0, c1, c2 = (c.to(x_init.device, dtype) for c in schedule.reverse_coefficients())
    coeffs = (c0, c1, c2)
    x = x_init
    ones = torch.ones(x.shape[0], 1, device=x.device, dtype=dtype)
    for t in range(schedule.steps - 1, -1, -1):
        x = reverse_step(
            x, eps_model(obs, x, ones * t), t, coeffs, step_noise[t], temperature, clip
        )  # type: ignore[arg-type]
    for _ in range(extra_final_steps):
        x = reverse_step(x, eps_model(obs, x, ones * 0), 0, coeffs, None, temperature, clip)
    return x.clamp(-1.0, 1.0)
