"""D4RL-recipe datasets on gymnasium MuJoCo v5 tasks, with behaviour policies from ARS.

Recipe (Fu et al. 2020, D4RL, with SAC replaced by augmented random search):
  1. train a linear policy with ARS V2-t (Mania et al. 2018, Algorithm 2: observation
     normalisation, the top-b of N directions); evaluate it every ``eval_every`` steps
     and keep each evaluated snapshot; every training rollout goes to a replay store;
  2. expert = the best-evaluated snapshot (the final one unless ARS fell back); medium =
     the earlier snapshot whose evaluation return is nearest ``medium_fraction`` (1/3) of
     the expert's;
  3. datasets, each a replay store ``<out>/<env>-<name>.zarr``: random (uniform actions),
     medium and expert (policy + Gaussian action noise), medium-replay (the training
     rollouts before the medium snapshot, the last ``medium_replay_cap`` rows of them),
     medium-expert (medium then expert);
  4. reference returns as Minari defines them: ref_min_score = mean return of the random
     policy, ref_max_score = mean return of the (noise-free) expert, over ``ref_episodes``.

Every stage writes its output under a temporary name and renames it, and is skipped when
its output exists, so an interrupted run resumes. All randomness comes from one seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from idql_runtime import __version__
from idql_runtime.datasets import building_path
from idql_runtime.replay import ReplayStore

ALL_DATASETS = ("random", "medium", "medium-replay", "expert", "medium-expert")

# ARS V2-t hyperparameters from Mania et al. 2018, table 9 (directions N, top b, step size
# alpha, exploration noise nu), the survival bonus subtracted from training rewards
# (their "shift"; the v5 envs' healthy_reward) and a default iteration budget.
ARS_DEFAULTS: dict[str, dict[str, float]] = {
    "HalfCheetah": {
        "directions": 32,
        "top": 4,
        "step_size": 0.02,
        "noise": 0.03,
        "shift": 0.0,
        "iters": 100,
    },
    "Hopper": {
        "directions": 8,
        "top": 4,
        "step_size": 0.01,
        "noise": 0.025,
        "shift": 1.0,
        "iters": 300,
    },
    "Walker2d": {
        "directions": 40,
        "top": 30,
        "step_size": 0.03,
        "noise": 0.025,
        "shift": 1.0,
        "iters": 200,
    },
    "Ant": {
        "directions": 60,
        "top": 20,
        "step_size": 0.015,
        "noise": 0.025,
        "shift": 1.0,
        "iters": 200,
    },
    "Swimmer": {
        "directions": 1,
        "top": 1,
        "step_size": 0.02,
        "noise": 0.01,
        "shift": 0.0,
        "iters": 100,
    },
}


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class CollectConfig:
    """Settings of one ``idql-collect`` run (all of them are stored in every dataset)."""

    env: str = _f("Hopper-v5", "gymnasium MuJoCo v5 task id")
    out: str = _f("data", "output directory")
    size: int = _f(1_000_000, "transitions per dataset (medium-expert has twice as many)")
    seed: int = _f(0, "seed for every RNG and env reset")
    datasets: str = _f(",".join(ALL_DATASETS), "comma-separated datasets to write")
    ars_iters: int | None = _f(None, "ARS iterations (default: per task, ARS_DEFAULTS)")
    ars_directions: int | None = _f(None, "ARS directions N per iteration")
    ars_top: int | None = _f(None, "ARS top-b directions used in the update")
    ars_step_size: float | None = _f(None, "ARS step size alpha")
    ars_noise: float | None = _f(None, "ARS exploration noise nu")
    ars_shift: float | None = _f(
        None, "survival bonus subtracted per step from ARS training rewards"
    )
    eval_every: int = _f(5, "evaluate (and snapshot) the policy every this many ARS iterations")
    eval_episodes: int = _f(3, "episodes per evaluation")
    medium_fraction: float = _f(
        1 / 3, "medium policy: eval return nearest this fraction of the expert's"
    )
    action_noise: float = _f(
        0.1, "std of Gaussian noise added to behaviour-policy actions (then clipped)"
    )
    medium_replay_cap: int | None = _f(None, "max rows of medium-replay (default: size)")
    ref_episodes: int = _f(100, "episodes for ref_min_score / ref_max_score (Minari uses 100)")
    max_episode_steps: int | None = _f(None, "episode limit (default: the env's, 1000)")
    chunk_rows: int = _f(16384, "rows per zarr chunk of the written stores")

    def validate(self) -> None:
        for name in ("size", "eval_every", "eval_episodes", "ref_episodes", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.medium_fraction < 1.0:
            raise ValueError(f"medium_fraction must be in (0, 1), got {self.medium_fraction}")
        if self.action_noise < 0:
            raise ValueError(f"action_noise must be >= 0, got {self.action_noise}")
        bad = [d for d in self.dataset_list() if d not in ALL_DATASETS]
        if bad:
            raise ValueError(f"unknown dataset {bad[0]!r}; choose from {', '.join(ALL_DATASETS)}")

    def dataset_list(self) -> list[str]:
        return [d.strip() for d in self.datasets.split(",") if d.strip()]

    def ars(self) -> dict[str, float]:
        """ARS hyperparameters: the task's defaults overridden by the explicit flags."""
        base = dict(ARS_DEFAULTS.get(self.env.split("-")[0], ARS_DEFAULTS["HalfCheetah"]))
        for key in ("iters", "directions", "top", "step_size", "noise", "shift"):
            v = getattr(self, f"ars_{key}")
            if v is not None:
                base[key] = v
        base["top"] = min(base["top"], base["directions"])
        return base


# --------------------------------------------------------------------------- policy
class ObsNormalizer:
    """Running mean/variance of observations (Welford, merged per batch), ARS V2."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    def update(self, states: np.ndarray) -> None:
        n = len(states)
        if n == 0:
            return
        b_mean = states.mean(axis=0)
        b_m2 = ((states - b_mean) ** 2).sum(axis=0)
        delta = b_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + b_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        if self.count < 2:
            return np.ones_like(self.mean)
        std = np.sqrt(self.m2 / (self.count - 1))
        return np.where(std < 1e-8, 1.0, std)  # constant dims pass through unscaled


@dataclass
class LinearPolicy:
    """a = clip(W (s - mean) / std, -1, 1); W is (act_dim, obs_dim)."""

    weights: np.ndarray
    obs_mean: np.ndarray
    obs_std: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return np.clip(self.weights @ ((obs - self.obs_mean) / self.obs_std), -1.0, 1.0)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial.npz")
        np.savez(
            tmp,
            weights=self.weights,
            obs_mean=self.obs_mean,
            obs_std=self.obs_std,
            meta=np.array(json.dumps(self.meta)),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearPolicy:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["weights"], z["obs_mean"], z["obs_std"], json.loads(str(z["meta"])))


# --------------------------------------------------------------------------- rollouts
def make_env(env_id: str, max_episode_steps: int | None = None) -> Any:
    import gymnasium as gym

    from idql_runtime.envs import gym_make

    kwargs: dict[str, Any] = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    env = gym_make(env_id, **kwargs)
    space: Any = env.action_space
    if not (
        isinstance(space, gym.spaces.Box)
        and np.all(space.low == -1.0)
        and np.all(space.high == 1.0)
    ):
        env.close()
        raise ValueError(f"{env_id}: expected a Box(-1, 1) action space, got {space}")
    return env


@dataclass
class Episode:
    obs: np.ndarray  # (T+1, obs_dim)
    action: np.ndarray  # (T, act_dim)
    reward: np.ndarray  # (T,)
    terminated: bool
    truncated: bool

    @property
    def ret(self) -> float:
        return float(self.reward.sum())

    def __len__(self) -> int:
        return len(self.reward)


def run_episode(
    env: Any,
    act: Callable[[np.ndarray], np.ndarray],
    seed: int,
    max_steps: int | None = None,
) -> Episode:
    """One episode from ``env.reset(seed=seed)``; stops early after ``max_steps``."""
    obs, _ = env.reset(seed=int(seed))
    observations, actions, rewards = [obs], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        a = np.asarray(act(obs), dtype=np.float32)
        obs, r, terminated, truncated, _ = env.step(a)
        observations.append(obs)
        actions.append(a)
        rewards.append(r)
        if max_steps is not None and len(rewards) >= max_steps:
            truncated = truncated or not terminated
            break
    return Episode(
        np.asarray(observations, np.float32),
        np.asarray(actions, np.float32),
        np.asarray(rewards, np.float32),
        bool(terminated),
        bool(truncated),
    )


def episode_rows(
    ep: Episode, actor_id: int = -1, policy_version: int = -1
) -> dict[str, np.ndarray]:
    t = len(ep)
    terminated = np.zeros(t, bool)
    truncated = np.zeros(t, bool)
    terminated[-1] = ep.terminated
    truncated[-1] = ep.truncated or not ep.terminated
    return {
        "obs": ep.obs[:-1],
        "action": ep.action,
        "reward": ep.reward,
        "next_obs": ep.obs[1:],
        "terminated": terminated,
        "truncated": truncated,
        "actor_id": np.full(t, actor_id, np.int32),
        "policy_version": np.full(t, policy_version, np.int64),
    }


class RowBuffer:
    """Collects episode rows and appends them in blocks of at least ``block_rows``:
    an append costs ~5 ms whatever its size, and random-policy episodes are ~20 rows."""

    def __init__(self, store: ReplayStore, block_rows: int = 16384):
        self.store, self.block_rows = store, block_rows
        self.parts: list[dict[str, np.ndarray]] = []
        self.rows = 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.parts.append(rows)
        self.rows += len(rows["reward"])
        if self.rows >= self.block_rows:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.store.append(
                {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
            )
        self.parts, self.rows = [], 0


def noisy(
    policy: Callable[[np.ndarray], np.ndarray], std: float, rng: np.random.Generator
) -> Callable:
    def act(obs: np.ndarray) -> np.ndarray:
        a = policy(obs)
        return np.clip(a + std * rng.standard_normal(a.shape), -1.0, 1.0) if std > 0 else a

    return act


def uniform_random(act_dim: int, rng: np.random.Generator) -> Callable:
    return lambda _obs: rng.uniform(-1.0, 1.0, act_dim)


def mean_return(env: Any, act: Callable, seeds: np.ndarray) -> tuple[float, float]:
    returns = [run_episode(env, act, int(s)).ret for s in seeds]
    return float(np.mean(returns)), float(np.std(returns))


# --------------------------------------------------------------------------- ARS
@dataclass
class Snapshot:
    iteration: int
    eval_return: float
    policy: LinearPolicy


def train_ars(
    cfg: CollectConfig,
    streams: dict[str, np.random.Generator],
    recorder: ReplayStore | None = None,
    progress: bool = True,
) -> list[Snapshot]:
    """ARS V2-t (Mania et al. 2018, Algorithm 2). Returns the evaluated snapshots, the
    last one being the final policy. Training rollouts are appended to ``recorder`` with
    policy_version = iteration and actor_id = 2k (+delta_k) or 2k+1 (-delta_k)."""
    hp = cfg.ars()
    env = make_env(cfg.env, cfg.max_episode_steps)
    obs_dim = env.observation_space.shape[0]
    act_dim = env.action_space.shape[0]
    n_dir, top, alpha, nu, shift = (
        int(hp["directions"]),
        int(hp["top"]),
        hp["step_size"],
        hp["noise"],
        hp["shift"],
    )
    weights = np.zeros((act_dim, obs_dim))
    norm = ObsNormalizer(obs_dim)
    delta_rng, seed_rng = streams["ars_deltas"], streams["ars_resets"]
    eval_seeds = streams["ars_eval"].integers(0, 2**31, size=cfg.eval_episodes)
    snapshots: list[Snapshot] = []
    buf = RowBuffer(recorder) if recorder is not None else None

    def snapshot(it: int) -> None:
        policy = LinearPolicy(weights.copy(), norm.mean.copy(), norm.std.copy(), {"iteration": it})
        ret, _ = mean_return(env, policy, eval_seeds)
        policy.meta["eval_return"] = ret
        snapshots.append(Snapshot(it, ret, policy))

    snapshot(0)
    iters = int(hp["iters"])
    bar = tqdm(range(iters), desc=f"ARS {cfg.env}", disable=not progress, unit="it")
    for it in bar:
        mean, std = norm.mean.copy(), norm.std.copy()
        deltas = delta_rng.standard_normal((n_dir, act_dim, obs_dim))
        returns = np.zeros((n_dir, 2))
        states = []
        for k in range(n_dir):
            for j, sign in enumerate((1.0, -1.0)):
                w = weights + sign * nu * deltas[k]
                ep = run_episode(
                    env,
                    LinearPolicy(w, mean, std),
                    int(seed_rng.integers(2**31)),
                )
                returns[k, j] = ep.ret - shift * len(ep)
                states.append(ep.obs[:-1])
                if buf is not None:
                    buf.add(episode_rows(ep, actor_id=2 * k + j, policy_version=it))
        order = np.argsort(-returns.max(axis=1))[:top]
        sigma = returns[order].std()
        if sigma > 0:
            weights = weights + alpha / (top * sigma) * np.einsum(
                "k,kij->ij", returns[order, 0] - returns[order, 1], deltas[order]
            )
        norm.update(np.concatenate(states).astype(np.float64))
        if (it + 1) % cfg.eval_every == 0 or it + 1 == iters:
            snapshot(it + 1)
            bar.set_postfix(eval_return=f"{snapshots[-1].eval_return:.0f}")
    if buf is not None:
        buf.flush()
    env.close()
    return snapshots


def pick_policies(snapshots: list[Snapshot], fraction: float) -> tuple[Snapshot, Snapshot]:
    """(medium, expert). Expert: the best-evaluated snapshot (ARS returns are not
    monotonic: a HalfCheetah run here fell from 2842 to 52 between two evaluations, so
    "the final policy" can be a poor expert). Medium: of the snapshots before the expert,
    the one whose eval return is nearest ``fraction`` of the expert's."""
    expert = max(snapshots, key=lambda s: (s.eval_return, s.iteration))
    target = fraction * expert.eval_return
    earlier = [s for s in snapshots if s.iteration < expert.iteration] or [expert]
    medium = min(earlier, key=lambda s: (abs(s.eval_return - target), s.iteration))
    return medium, expert


# --------------------------------------------------------------------------- datasets
def collect_dataset(
    env: Any,
    act: Callable[[np.ndarray], np.ndarray],
    size: int,
    seed_rng: np.random.Generator,
    store: ReplayStore,
    policy_version: int,
    progress: bool,
    desc: str,
) -> None:
    """Whole episodes until ``size`` rows; the last one is cut there (``truncated``)."""
    bar = tqdm(total=size, desc=desc, disable=not progress, unit="rows")
    buf = RowBuffer(store)
    done = len(store)
    while done < size:
        ep = run_episode(env, act, int(seed_rng.integers(2**31)), max_steps=size - done)
        buf.add(episode_rows(ep, actor_id=0, policy_version=policy_version))
        done += len(ep)
        bar.update(len(ep))
    buf.flush()
    bar.close()


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ["ars_deltas", "ars_resets", "ars_eval", "ref_random", "ref_expert", *ALL_DATASETS]
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: np.random.default_rng(c) for n, c in zip(names, children, strict=True)}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _log(msg: str, progress: bool) -> None:
    if progress:
        tqdm.write(msg)


def run_collect(cfg: CollectConfig, progress: bool = True) -> dict[str, Any]:
    """All stages; returns a summary (paths, returns, timings)."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / cfg.env
    streams = _streams(cfg.seed)
    settings = {**dataclasses.asdict(cfg), "ars_resolved": cfg.ars()}
    summary: dict[str, Any] = {"env_id": cfg.env, "datasets": {}, "timings_s": {}}

    # 1. behaviour policies
    train_json = Path(f"{prefix}-ars.json")
    training_store = Path(f"{prefix}-ars-rollouts.zarr")
    t0 = time.perf_counter()
    if train_json.is_file() and Path(f"{prefix}-expert-policy.npz").is_file():
        _log(f"[skip] ARS: {train_json} exists", progress)
        info = json.loads(train_json.read_text())
    else:
        with building_path(training_store, overwrite=True) as tmp:
            env = make_env(cfg.env)
            dims = env.observation_space.shape[0], env.action_space.shape[0]
            env.close()
            with ReplayStore.create(
                tmp,
                *dims,
                chunk_rows=cfg.chunk_rows,
                attrs={"env_id": cfg.env, "dataset": "ars-rollouts"},
                durable=False,
            ) as rec:
                snaps = train_ars(cfg, streams, rec, progress)
        medium, expert = pick_policies(snaps, cfg.medium_fraction)
        medium.policy.save(f"{prefix}-medium-policy.npz")
        expert.policy.save(f"{prefix}-expert-policy.npz")
        info = {
            "history": [[s.iteration, s.eval_return] for s in snaps],
            "medium_iteration": medium.iteration,
            "medium_eval_return": medium.eval_return,
            "expert_iteration": expert.iteration,
            "expert_eval_return": expert.eval_return,
            "settings": settings,
        }
        _write_json(train_json, info)  # last: marks the stage done
    summary["timings_s"]["ars"] = time.perf_counter() - t0
    summary["ars"] = {k: v for k, v in info.items() if k != "settings"}
    medium_policy = LinearPolicy.load(f"{prefix}-medium-policy.npz")
    expert_policy = LinearPolicy.load(f"{prefix}-expert-policy.npz")

    # 2. reference returns
    refs_json = Path(f"{prefix}-refs-{cfg.ref_episodes}.json")
    t0 = time.perf_counter()
    if refs_json.is_file():
        refs = json.loads(refs_json.read_text())
    else:
        env = make_env(cfg.env, cfg.max_episode_steps)
        act_dim = env.action_space.shape[0]
        rnd = streams["ref_random"]
        rmin, rmin_std = mean_return(
            env, uniform_random(act_dim, rnd), rnd.integers(0, 2**31, cfg.ref_episodes)
        )
        ex_seeds = streams["ref_expert"].integers(0, 2**31, cfg.ref_episodes)
        rmax, rmax_std = mean_return(env, expert_policy, ex_seeds)
        env.close()
        refs = {
            "ref_min_score": rmin,
            "ref_min_std": rmin_std,
            "ref_max_score": rmax,
            "ref_max_std": rmax_std,
            "num_episodes_average_score": cfg.ref_episodes,
        }
        _write_json(refs_json, refs)
    summary["timings_s"]["refs"] = time.perf_counter() - t0
    summary["refs"] = refs

    # 3. datasets
    base_attrs = {
        "env_id": cfg.env,
        "ref_min_score": refs["ref_min_score"],
        "ref_max_score": refs["ref_max_score"],
        "num_episodes_average_score": refs["num_episodes_average_score"],
        "seed": cfg.seed,
        "settings": settings,
        "idql_runtime_version": __version__,
        "algorithm": "ARS V2-t linear policy (D4RL recipe)",
        "medium_iteration": info["medium_iteration"],
        "expert_iteration": info["expert_iteration"],
    }
    wanted = cfg.dataset_list()
    order = [
        d
        for d in ALL_DATASETS
        if d in wanted or (d in ("medium", "expert") and "medium-expert" in wanted)
    ]
    for name in order:
        path = Path(f"{prefix}-{name}.zarr")
        t0 = time.perf_counter()
        if path.exists():
            _log(f"[skip] {path} exists", progress)
        else:
            attrs = {**base_attrs, "dataset": name}
            with building_path(path, overwrite=False) as tmp:
                _build_dataset(
                    cfg, name, tmp, attrs, streams, medium_policy, expert_policy, info, progress
                )
        summary["timings_s"][name] = time.perf_counter() - t0
        if name in wanted:
            summary["datasets"][name] = str(path)
    return summary


def _build_dataset(
    cfg: CollectConfig,
    name: str,
    tmp: Path,
    attrs: dict[str, Any],
    streams: dict[str, np.random.Generator],
    medium_policy: LinearPolicy,
    expert_policy: LinearPolicy,
    info: dict[str, Any],
    progress: bool,
) -> None:
    prefix = Path(cfg.out) / cfg.env
    env = make_env(cfg.env, cfg.max_episode_steps)
    dims = env.observation_space.shape[0], env.action_space.shape[0]
    rng = streams[name]
    with ReplayStore.create(
        tmp, *dims, chunk_rows=cfg.chunk_rows, attrs=attrs, durable=False
    ) as store:
        if name == "random":
            collect_dataset(
                env, uniform_random(dims[1], rng), cfg.size, rng, store, -1, progress, name
            )
        elif name in ("medium", "expert"):
            policy = medium_policy if name == "medium" else expert_policy
            version = info[f"{name}_iteration"]
            act = noisy(policy, cfg.action_noise, rng)
            collect_dataset(env, act, cfg.size, rng, store, version, progress, name)
        elif name == "medium-replay":
            src, start, stop = _replay_rows(
                Path(f"{prefix}-ars-rollouts.zarr"), info["medium_iteration"], cfg
            )
            _copy_rows(store, src, start, stop)
            src.close()
        elif name == "medium-expert":
            for part in ("medium", "expert"):
                src = ReplayStore.open(f"{prefix}-{part}.zarr")
                _copy_rows(store, src, 0, len(src))
                src.close()
    env.close()


def _replay_rows(
    path: Path, medium_iteration: int, cfg: CollectConfig
) -> tuple[ReplayStore, int, int]:
    """Rows of the ARS rollouts made before the medium snapshot; only the last
    ``medium_replay_cap`` of them (whole episodes), like a FIFO replay buffer."""
    src = ReplayStore.open(path)
    ends = src.episode_ends()
    versions = src.read(0, len(src), ["policy_version"])["policy_version"]
    stop = int(np.searchsorted(versions, medium_iteration, side="left"))  # versions ascend
    if stop == 0:  # medium is the initial policy: use the rollouts of the first iteration
        stop = int(np.searchsorted(versions, medium_iteration, side="right"))
    cap = cfg.medium_replay_cap or cfg.size
    start = 0
    if stop > cap:
        starts = np.concatenate([[0], ends])
        start = int(starts[np.searchsorted(starts, stop - cap, side="left")])
    return src, start, stop


def _copy_rows(dst: ReplayStore, src: ReplayStore, start: int, stop: int) -> None:
    keys = [
        "obs",
        "action",
        "reward",
        "next_obs",
        "terminated",
        "truncated",
        "actor_id",
        "policy_version",
    ]
    for _first, cols in src.iter_blocks(start, stop, keys):
        dst.append(cols)


def iter_returns(store: ReplayStore) -> Iterator[float]:
    """Undiscounted return of every committed episode."""
    ends = store.episode_ends()
    if not len(ends):
        return
    reward = np.concatenate(
        [c["reward"].astype(np.float64) for _, c in store.iter_blocks(0, int(ends[-1]), ["reward"])]
    )
    starts = np.concatenate([[0], ends[:-1]])
    yield from np.add.reduceat(reward, starts).tolist() if len(reward) else []
