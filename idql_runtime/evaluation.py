"""Acting with a trained agent in a gymnasium env: the policy wrapper and evaluation."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from idql_runtime.agent import Agent
from idql_runtime.decision import DecisionNoise, DecisionSpec
from idql_runtime.envs import make_env, normalized_score


class Policy:
    """obs (obs_dim,) or (B, obs_dim) numpy -> action numpy, eager engine.

    IDQL agents decide with N diffusion candidates (``mode`` argmax or implicit); the
    Gaussian baselines act with the mean. Randomness comes from a private generator so
    evaluation never disturbs the training RNG streams.
    """

    def __init__(
        self, agent: Agent, *, samples: int | None = None, mode: str | None = None, seed: int = 0
    ) -> None:
        self.agent = agent
        self.samples = samples or agent.cfg.policy.samples
        # the Gaussian baselines act with their mean: no diffusion decision to build
        self.decision = agent.decision(mode) if agent.gaussian is None else None
        self.generator = torch.Generator(device=agent.device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        single = obs.ndim == 1
        o = torch.as_tensor(np.atleast_2d(obs), dtype=torch.float32, device=self.agent.device)
        if self.agent.gaussian is not None:
            action = self.agent.gaussian(o)[0]
        else:
            spec = DecisionSpec(
                o.shape[0],
                self.samples,
                self.agent.schedule.steps,
                self.agent.act_dim,
                self.agent.obs_dim,
            )
            noise = DecisionNoise.draw(spec, generator=self.generator, device=self.agent.device)
            assert self.decision is not None
            action = self.decision(o, *noise).action
        a = action.cpu().numpy()
        return a[0] if single else a


@dataclass
class EvalResult:
    """Completed episodes only. ``interrupted``: a stop request ended the round early; the
    episode it cut short is left out (its partial return is not comparable)."""

    returns: list[float]
    lengths: list[int]
    normalized: list[float] | None
    interrupted: bool = False

    def summary(self) -> dict[str, Any]:
        """JSON-ready statistics; with no completed episode the means are None (not NaN,
        which is not JSON)."""
        mean, std = _mean_std(self.returns)
        out: dict[str, Any] = {
            "episodes": len(self.returns),
            "return_mean": mean,
            "return_std": std,
            "returns": self.returns,
            "lengths": self.lengths,
            "interrupted": self.interrupted,
        }
        if self.normalized is not None:
            out["normalized_mean"], out["normalized_std"] = _mean_std(self.normalized)
        return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, std) of values; (None, None) for none."""
    if not values:
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def evaluate(
    policy: Any,
    env_id: str,
    episodes: int,
    *,
    seed: int = 0,
    ref: tuple[float, float] | None = None,
    video_path: str | os.PathLike[str] | None = None,
    video_episodes: int = 1,
    should_stop: Callable[[], bool] | None = None,
    on_episode: Callable[[int, float, int], None] | None = None,
) -> EvalResult:
    """Run ``episodes`` full episodes sequentially (env seeded once with ``seed``).

    ``should_stop`` is asked before every step: when it says True the round ends there
    (a Ctrl-C in a 1000-episode round of the offline learner used to wait minutes for
    it), with the completed episodes and ``interrupted`` set. ``on_episode(index, return,
    length)`` is called as each episode completes (progress lines)."""
    render = "rgb_array" if video_path else None
    env = make_env(env_id, render_mode=render)
    frames: list[np.ndarray] = []
    returns, lengths = [], []
    interrupted = False
    obs, _ = env.reset(seed=seed)
    for ep in range(episodes):
        if ep > 0:
            obs, _ = env.reset()
        total, steps, done = 0.0, 0, False
        while not done:
            if should_stop is not None and should_stop():
                interrupted = True
                break
            action = policy(np.asarray(obs, dtype=np.float32))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            done = bool(terminated or truncated)
            if video_path and ep < video_episodes:
                frames.append(env.render())  # type: ignore[arg-type]
        if interrupted:
            break
        returns.append(total)
        lengths.append(steps)
        if on_episode is not None:
            on_episode(ep, total, steps)
    env.close()
    if video_path and frames:
        import imageio.v2 as imageio

        fps = int(env.metadata.get("render_fps", 30))
        imageio.mimsave(str(video_path), frames, fps=min(fps, 60))  # type: ignore[arg-type]
    norm = [normalized_score(r, ref) for r in returns] if ref else None
    return EvalResult(returns, lengths, norm, interrupted)  # type: ignore[arg-type]


def plot_returns(returns: list[float], path: str | os.PathLike[str], title: str = "") -> None:
    """PNG of per-episode returns with the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(returns) + 1), returns, "o-", ms=3, lw=1, label="episode return")
    ax.axhline(float(np.mean(returns)), color="C1", ls="--", label=f"mean {np.mean(returns):.1f}")
    ax.set_xlabel("episode")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
