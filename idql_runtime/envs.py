"""Gymnasium environments as IDQL sees them, reward transforms and normalised scores.

Actions live in [-1, 1] (``RescaleAction`` + ``ClipAction``, as jaxrl5's ``wrap_gym``);
observations are float32 and are never normalised (idql-reference.md s8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np

# D4RL's REF_MIN_SCORE / REF_MAX_SCORE (d4rl/infos.py), keyed by the env family.
D4RL_REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
}


def gym_make(env_id: str, **kwargs: Any) -> gym.Env:
    """gym.make; an unknown id or a missing dependency is a ValueError naming the id."""
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise ValueError(f"cannot make environment {env_id!r}: {e}") from e


def make_env(env_id: str, *, render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    """gym.make with actions rescaled to [-1, 1] and clipped, float32 observations."""
    env = gym_make(env_id, render_mode=render_mode, **kwargs)
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"{env_id}: IDQL needs a continuous Box action space, got {space}")
    if not (np.allclose(space.low, -1.0) and np.allclose(space.high, 1.0)):
        env = gym.wrappers.RescaleAction(env, np.float32(-1.0), np.float32(1.0))
    env = gym.wrappers.ClipAction(env)
    return env


def check_env_fits(
    env: gym.Env,
    env_id: str,
    obs_dim: int,
    act_dim: int,
    *,
    against: str = "the checkpoint's networks",
    hint: str = "it was trained on another task: pass the --env it was trained on",
) -> None:
    """ValueError naming both sizes unless ``env`` gives flat ``(obs_dim,)`` observations
    and takes ``(act_dim,)`` actions: a checkpoint run in another task's env used to fail
    deep inside the first matrix product (or the first decision, as a failed control loop)."""
    obs_shape = tuple(env.observation_space.shape or ())
    act_shape = tuple(env.action_space.shape or ())
    if obs_shape != (obs_dim,) or act_shape != (act_dim,):
        raise ValueError(
            f"{env_id} has observations of shape {obs_shape} and actions of shape "
            f"{act_shape}; {against} have observations ({obs_dim},) and actions "
            f"({act_dim},)" + (f": {hint}" if hint else "")
        )


def check_env_id_fits(env_id: str, obs_dim: int, act_dim: int, **message: str) -> None:
    """Make ``env_id``, ``check_env_fits`` it, close it: a start-up check for a process
    that makes its env later (evaluation). ValueError for an unknown id too."""
    env = make_env(env_id)
    try:
        check_env_fits(env, env_id, obs_dim, act_dim, **message)
    finally:
        env.close()


def spaces_of(env: gym.Env) -> dict[str, Any]:
    """JSON description of the spaces (stored in checkpoints)."""
    obs, act = env.observation_space, env.action_space
    return {
        "obs_shape": list(obs.shape or ()),
        "act_shape": list(act.shape or ()),
        "act_low": np.asarray(act.low, dtype=np.float64).tolist(),  # type: ignore[attr-defined]
        "act_high": np.asarray(act.high, dtype=np.float64).tolist(),  # type: ignore[attr-defined]
    }


def control_rate_hz(env: gym.Env) -> float:
    """The env's own control rate: 1 / (model timestep * frame_skip) for MuJoCo envs."""
    dt = getattr(env.unwrapped, "dt", None)
    if dt:
        return 1.0 / float(dt)
    fps = env.metadata.get("render_fps")
    return float(fps) if fps else 0.0


def reference_scores(
    env_id: str | None, attrs: dict[str, Any] | None = None
) -> tuple[float, float] | None:
    """(ref_min, ref_max) for normalised scores: the dataset's own (Minari-style) if it has
    them, else D4RL's constants for the env family, else None."""
    attrs = attrs or {}
    if "ref_min_score" in attrs and "ref_max_score" in attrs:
        return float(attrs["ref_min_score"]), float(attrs["ref_max_score"])
    if env_id:
        family = env_id.lower().split("-")[0].split("/")[-1]
        if family in D4RL_REFERENCE_SCORES:
            return D4RL_REFERENCE_SCORES[family]
    return None


def normalized_score(ret: float, ref: tuple[float, float] | None) -> float | None:
    """100 * (return - ref_min) / (ref_max - ref_min) (D4RL / Minari)."""
    if ref is None:
        return None
    lo, hi = ref
    return 100.0 * (ret - lo) / (hi - lo)


def episode_returns(reward: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
    """Undiscounted return of each episode given exclusive end indices; a trailing
    unfinished segment counts as an episode (as D4RL's last index = done)."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    if len(ends) == 0 or ends[-1] < len(reward):
        ends = np.append(ends, len(reward))
    ends = ends[ends > 0]
    starts = np.concatenate([[0], ends[:-1]])
    csum = np.concatenate([[0.0], np.cumsum(reward, dtype=np.float64)])
    return (csum[ends] - csum[starts])[ends > starts]


@dataclass(frozen=True)
class RewardTransform:
    """r' = scale * r + shift, fixed at pretraining and kept for online finetuning."""

    kind: str = "none"
    scale: float = 1.0
    shift: float = 0.0

    def __call__(self, reward: np.ndarray) -> np.ndarray:
        return (reward * self.scale + self.shift).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewardTransform:
        return cls(str(d["kind"]), float(d["scale"]), float(d["shift"]))

    @classmethod
    def fit(cls, kind: str, reward: np.ndarray, episode_ends: np.ndarray) -> RewardTransform:
        """locomotion: x 1000 / (max - min episode return) (IQL / IDQL); antmaze: r - 1."""
        if kind == "locomotion":
            rets = episode_returns(reward, episode_ends)
            span = float(rets.max() - rets.min()) if len(rets) > 1 else 0.0
            if span <= 0:
                raise ValueError(
                    "locomotion reward transform needs episodes with different returns; "
                    f"got {len(rets)} episode(s) spanning {span}"
                )
            return cls("locomotion", 1000.0 / span, 0.0)
        if kind == "antmaze":
            return cls("antmaze", 1.0, -1.0)
        if kind == "none":
            return cls("none", 1.0, 0.0)
        raise ValueError(f"unknown reward transform {kind!r}")
