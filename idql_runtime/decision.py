"""The decision: N candidates, T reverse steps, critic scoring, one action per state.

``Decision`` is a pure module: ``forward(obs, x_init, step_noise, u)`` with every random
number passed in, B, N and T static, no data-dependent Python control flow and no
boolean indexing, so eager, CUDA graphs, torch.compile, torch.export/TensorRT and the
CPU path all trace the same graph. Work that does not depend on the candidate (the
observation's share of the first layer of the score network and of Q, the time
embedding of each step) is done once per decision, not N*T times.

``reference_decide`` is the naive float64 path (the reference sampler on N repeated
observations, full network forward each step) that every engine is checked against.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from idql_runtime import diffusion
from idql_runtime.critic import implicit_weights
from idql_runtime.diffusion import Schedule
from idql_runtime.networks import QEnsemble, ScoreNetwork, ValueNetwork


class DecisionOutput(NamedTuple):
    """action (B, A); chosen_q, value, adv_spread (B,); index (B,) of the chosen candidate."""

    action: Tensor
    chosen_q: Tensor
    value: Tensor
    adv_spread: Tensor
    index: Tensor  # type: ignore[assignment]  # shadows tuple.index on purpose


@dataclass(frozen=True)
class DecisionSpec:
    """Static shape and mode of a built decision."""

    batch: int
    samples: int
    steps: int
    act_dim: int
    obs_dim: int
    mode: str = "argmax"


class DecisionNoise(NamedTuple):
    """All randomness of one decision: x_init (B, N, A), step_noise (T, B, N, A), u (B,)."""

    x_init: Tensor
    step_noise: Tensor
    u: Tensor

    @classmethod
    def draw(
        cls,
        spec: DecisionSpec,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DecisionNoise:
        b, n, t, a = spec.batch, spec.samples, spec.steps, spec.act_dim
        return cls(
            torch.randn(b, n, a, generator=generator, device=device, dtype=dtype),
            torch.randn(t, b, n, a, generator=generator, device=device, dtype=dtype),
            torch.rand(b, generator=generator, device=device, dtype=dtype),
        )


def select_index(
    q: Tensor, v: Tensor, u: Tensor, mode: str, value_loss: str, tau: float, alpha: float
) -> Tensor:
    """Index (B,) of the chosen candidate from q (B, N), v (B,), uniform u (B,).

    argmax: paper Eq. 13. implicit: inverse-CDF draw from pi_imp over the candidates,
    weights w(Q - V) of Theorem 4.1 (Algorithm 2). Gather-friendly (no a[argmax] indexing).
    """
    if mode == "argmax":
        return torch.argmax(q, dim=-1)
    w = implicit_weights(q - v.unsqueeze(-1), value_loss, tau, alpha)
    cdf = torch.cumsum(w, dim=-1)
    threshold = (u * cdf[:, -1]).unsqueeze(-1)
    idx = (cdf < threshold).sum(dim=-1)
    return idx.clamp(max=q.shape[-1] - 1)


class Decision(nn.Module):
    """Hoisted, compilable decision over static (B, N, T)."""

    def __init__(
        self,
        score: ScoreNetwork,
        q: QEnsemble,
        v: ValueNetwork,
        schedule: Schedule,
        *,
        mode: str = "argmax",
        value_loss: str = "expectile",
        tau: float = 0.7,
        alpha: float = 1.0,
        temperature: float = 1.0,
        clip: bool = True,
        extra_final_steps: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("argmax", "implicit"):
            raise ValueError(f"mode must be 'argmax' or 'implicit', got {mode!r}")
        self.score, self.q, self.v = score, q, v
        self.mode, self.value_loss, self.tau, self.alpha = mode, value_loss, tau, alpha
        self.temperature, self.clip, self.extra_final_steps = temperature, clip, extra_final_steps
        self.steps = schedule.steps
        self.trunk_dtype: torch.dtype | None = None
        """Engines set bfloat16/float16 here to run the score network's products in it
        (``sample``); the critic and the selection stay in the input dtype."""
        c = schedule.reverse_coefficients()
        # Python floats: baked into any traced graph as constants, exact in float64 runs.
        self._inv_sqrt_alpha = [float(x) for x in c[0]]
        self._eps_coef = [float(x) for x in c[1]]
        self._sigma = [float(x) for x in c[2]]

    def time_shares(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The cond(t) share of the score network's first layer for t = 0..T-1: (T, H)."""
        t = torch.arange(self.steps, dtype=dtype, device=device).unsqueeze(-1)
        _, _, w_c = self.score.split_input_weight()
        return self.score.time_embedding(t) @ w_c.T

    def forward(self, obs: Tensor, x_init: Tensor, step_noise: Tensor, u: Tensor) -> DecisionOutput:
        b, n, a = x_init.shape
        x, q = self.candidates(obs, x_init, step_noise)
        v = self.v(obs)  # (B,)

        idx = select_index(q, v, u, self.mode, self.value_loss, self.tau, self.alpha)
        action = torch.gather(x, 1, idx.view(b, 1, 1).expand(b, 1, a)).squeeze(1)
        chosen_q = torch.gather(q, 1, idx.view(b, 1)).squeeze(1)
        spread = q.amax(dim=-1) - q.amin(dim=-1)
        return DecisionOutput(action, chosen_q, v, spread, idx)

    def candidates(self, obs: Tensor, x_init: Tensor, step_noise: Tensor) -> tuple[Tensor, Tensor]:
        """Every candidate and its critic score: x (B, N, A) after T reverse steps, and
        q (B, N), the min over target-Q heads. ``forward`` selects among them."""
        x = self.sample(obs, x_init, step_noise)
        return x, self.score_candidates(obs, x)

    def sample(self, obs: Tensor, x_init: Tensor, step_noise: Tensor) -> Tensor:
        """The N candidates (B, N, A) after T reverse steps (and any extra final steps).

        With ``trunk_dtype`` set (bfloat16/float16), the score network's products run under
        autocast in that dtype; the candidates come back in ``obs``'s dtype.
        """
        if self.trunk_dtype is None:
            return self._sample(obs, x_init, step_noise)
        with torch.autocast(obs.device.type, dtype=self.trunk_dtype, cache_enabled=False):
            x = self._sample(obs, x_init, step_noise)
        return x.to(obs.dtype)

    def _sample(self, obs: Tensor, x_init: Tensor, step_noise: Tensor) -> Tensor:
        w_a, obs_share, time_share = self._shares(obs)
        x = x_init
        for t, noisy in self.reverse_plan():
            x = self._step(x, obs_share, time_share[t], w_a, t, step_noise[t] if noisy else None)
        return x.clamp(-1.0, 1.0)

    def reverse_plan(self) -> list[tuple[int, bool]]:
        """The reverse steps in order: (t, whether the step adds its noise): T steps from
        t = T - 1 down to 0, then any extra final steps at t = 0 without noise."""
        noisy = [(t, True) for t in range(self.steps - 1, -1, -1)]
        return noisy + [(0, False)] * self.extra_final_steps

    def _shares(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The action's first-layer weight, the observation's share (B, 1, H) and the time
        shares (T, H): the work ``_step`` needs that does not depend on the candidate."""
        w_a, w_o, _ = self.score.split_input_weight()
        obs_share = (obs @ w_o.T + self.score.inp.bias).unsqueeze(1)
        return w_a, obs_share, self.time_shares(obs.dtype, obs.device)

    def sample_steps(
        self, obs: Tensor, x_init: Tensor, step_noise: Tensor
    ) -> Generator[None, None, Tensor]:
        """``sample`` one reverse step per ``next()`` (yields after each step), returning the
        candidates (``yield from``): the float64 re-check of an actor runs in the short idle
        time between control ticks. Full precision only (no ``trunk_dtype``)."""
        if self.trunk_dtype is not None:
            raise ValueError("sample_steps runs the full-precision decision (trunk_dtype None)")
        w_a, obs_share, time_share = self._shares(obs)
        x = x_init
        for t, noisy in self.reverse_plan():
            x = self._step(x, obs_share, time_share[t], w_a, t, step_noise[t] if noisy else None)
            yield None
        return x.clamp(-1.0, 1.0)

    def score_candidates(self, obs: Tensor, x: Tensor) -> Tensor:
        """q (B, N): the min over target-Q heads of every candidate, in ``obs``'s dtype
        (never reduced precision: Q gaps between candidates are often below bf16's
        resolution of Q, and rounding them scrambles the selection)."""
        b, n, _ = x.shape
        # Observation share of the first layer hoisted: once per state, not per candidate.
        q_obs = self.q.first_obs_share(obs).unsqueeze(2)  # (E, B, 1, H0)
        w_qa = self.q.layers[0].weight[:, self.q.obs_dim :]  # type: ignore[index]  # (E, A, H0)
        h = torch.relu(q_obs + torch.matmul(x.unsqueeze(0), w_qa.unsqueeze(1)))  # (E, B, N, H0)
        h = h.reshape(h.shape[0], b * n, h.shape[-1])
        for layer in self.q.layers[1:-1]:
            h = torch.relu(layer(h))
        return self.q.layers[-1](h).squeeze(-1).amin(dim=0).reshape(b, n)  # (B, N)

    def _step(
        self,
        x: Tensor,
        obs_share: Tensor,
        time_share: Tensor,
        w_a: Tensor,
        t: int,
        z: Tensor | None,
    ) -> Tensor:
        h = x @ w_a.T + obs_share + time_share  # (B, N, H)
        eps_hat = self.score.trunk(h)
        x = self._inv_sqrt_alpha[t] * (x - self._eps_coef[t] * eps_hat)
        if t > 0 and z is not None:
            x = x + (self._sigma[t] * self.temperature) * z
        if self.clip:
            x = x.clamp(-1.0, 1.0)
        return x


@torch.no_grad()
def reference_decide(
    decision: Decision, obs: Tensor, noise: DecisionNoise, schedule: Schedule
) -> DecisionOutput:
    """The naive path: reference sampler on N repeated observations, full forward passes.

    Used (usually in float64) as ground truth for every engine. Shapes as ``Decision``.
    """
    b, n, a = noise.x_init.shape
    obs_rep = obs.repeat_interleave(n, dim=0)  # (B*N, obs_dim)
    x = diffusion.sample(
        decision.score,
        obs_rep,
        noise.x_init.reshape(b * n, a),
        noise.step_noise.reshape(noise.step_noise.shape[0], b * n, a),
        schedule,
        temperature=decision.temperature,
        clip=decision.clip,
        extra_final_steps=decision.extra_final_steps,
    )
    q = decision.q(obs_rep, x).amin(dim=0).reshape(b, n)
    v = decision.v(obs)
    x = x.reshape(b, n, a)
    idx = select_index(
        q, v, noise.u, decision.mode, decision.value_loss, decision.tau, decision.alpha
    )
    action = x[torch.arange(b), idx]
    chosen_q = q[torch.arange(b), idx]
    return DecisionOutput(action, chosen_q, v, q.amax(-1) - q.amin(-1), idx)
