"""Schedules and the reverse sampler against idql-reference.md s2 numbers and a
hand-computed trajectory."""

from __future__ import annotations

import math

import torch

from idql_runtime.diffusion import Schedule, cosine_betas, ddpm_loss, linear_betas, sample, vp_betas


def test_vp_schedule_matches_reference_numbers() -> None:
    s = Schedule.make("vp", 5)
    ref_beta = [0.195875, 0.458818, 0.635781, 0.754878, 0.835031]
    ref_abar = [0.804125, 0.435178, 0.158500, 0.038852, 0.006409]
    assert torch.allclose(s.betas, torch.tensor(ref_beta, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(s.alpha_bars, torch.tensor(ref_abar, dtype=torch.float64), atol=1e-5)
    assert math.isclose(float(s.alpha_bars[-1]), math.exp(-5.05), rel_tol=1e-12)


def test_reverse_coefficients_match_reference_numbers() -> None:
    inv_sqrt_alpha, eps_coef, sigma = Schedule.make("vp", 5).reverse_coefficients()
    # reference s2.3 gives 4 decimals
    assert torch.allclose(
        inv_sqrt_alpha,
        torch.tensor([1.1152, 1.3593, 1.6570, 2.0198, 2.4621], dtype=torch.float64),
        atol=6e-5,
    )
    assert torch.allclose(
        eps_coef,
        torch.tensor([0.4426, 0.6105, 0.6931, 0.7700, 0.8377], dtype=torch.float64),
        atol=6e-5,
    )
    assert torch.allclose(
        sigma,
        torch.tensor([0.4426, 0.6774, 0.7974, 0.8688, 0.9138], dtype=torch.float64),
        atol=6e-5,
    )


def test_cosine_and_linear_schedules() -> None:
    # independent scalar implementation of Nichol & Dhariwal with s = 0.008
    def abar(u: float) -> float:
        return (
            math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
        )

    expected = [min(1 - abar((k + 1) / 5) / abar(k / 5), 0.999) for k in range(5)]
    assert torch.allclose(cosine_betas(5), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        cosine_betas(5),
        torch.tensor([0.1013, 0.2795, 0.4736, 0.7241, 0.999], dtype=torch.float64),
        atol=6e-5,
    )
    assert torch.allclose(
        linear_betas(5),
        torch.tensor([1e-4, 0.005075, 0.01005, 0.015025, 0.02], dtype=torch.float64),
        atol=1e-12,
    )
    assert torch.allclose(vp_betas(5), Schedule.make("vp", 5).betas)


def test_sampler_reproduces_hand_computed_trajectory() -> None:
    """eps(s, x, t) = 0.5 x + 0.1 t + s with fixed noise, worked step by step in floats."""
    s = Schedule.make("vp", 5)
    betas = [float(b) for b in s.betas]
    abars = [float(a) for a in s.alpha_bars]

    def eps_model(obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.1 * t + obs[:, :1]

    x0 = [0.9, -2.0]
    z = [[0.3 * (k + 1), -0.2 * (k + 1)] for k in range(5)]
    obs_val = 0.05
    # by hand: x <- (x - beta/sqrt(1-abar) eps)/sqrt(alpha); + sqrt(beta) z if t > 0; clip
    x = list(x0)
    for t in range(4, -1, -1):
        for i in range(2):
            e = 0.5 * x[i] + 0.1 * t + obs_val
            xi = (x[i] - betas[t] / math.sqrt(1 - abars[t]) * e) / math.sqrt(1 - betas[t])
            if t > 0:
                xi += math.sqrt(betas[t]) * z[t][i]
            x[i] = min(1.0, max(-1.0, xi))
    out = sample(
        eps_model,
        torch.full((2, 1), obs_val, dtype=torch.float64),
        torch.tensor(x0, dtype=torch.float64).reshape(2, 1),
        torch.tensor(z, dtype=torch.float64).reshape(5, 2, 1),
        s,
    )
    assert torch.allclose(out.reshape(-1), torch.tensor(x, dtype=torch.float64), atol=1e-12)


def test_sampler_without_clip_and_no_noise_at_t0() -> None:
    s = Schedule.make("vp", 5)
    zero_eps = lambda o, x, t: torch.zeros_like(x)  # noqa: E731
    x_init = torch.full((1, 1), 0.01, dtype=torch.float64)
    noise = torch.zeros(5, 1, 1, dtype=torch.float64)
    noise[0] = 1e6  # z at t = 0 must be ignored
    out = sample(zero_eps, torch.zeros(1, 1, dtype=torch.float64), x_init, noise, s, clip=False)
    expected = 0.01 / math.sqrt(float(s.alpha_bars[-1]))  # prod of 1/sqrt(alpha_t)
    assert math.isclose(float(out), min(1.0, expected), rel_tol=1e-9)


def test_ddpm_loss_sums_over_action_dims() -> None:
    s = Schedule.make("vp", 5)
    gen = torch.Generator().manual_seed(0)
    obs, act = torch.zeros(4096, 1), torch.zeros(4096, 3)
    # a predictor that outputs 0: the loss is E[|eps|^2] = act_dim (sum), not 1 (mean)
    loss = ddpm_loss(lambda o, x, t: torch.zeros_like(x), obs, act, s, gen)
    assert abs(loss.item() - 3.0) < 0.15
