"""Shared fixtures. Tests run on CPU with few threads so the 2-core CI stays predictable."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


TINY = {
    "network.hidden_dim": 32,
    "network.num_blocks": 1,
    "network.time_dim": 8,
    "network.cond_hidden": [16, 16],
    "critic.hidden": [32, 32],
    "train.batch_size": 64,
    "train.eval_interval": 0,
    "policy.samples": 8,
}
"""A config small enough for subprocess and end-to-end tests on 2 cores."""


def make_hopper_store(path, rows: int = 1500, seed: int = 0):
    """A replay store of real Hopper-v5 rollouts with a noisy constant policy; episodes
    are cut at 200 steps (truncated) or end by falling (terminated)."""
    import numpy as np

    from idql_runtime.envs import make_env
    from idql_runtime.replay import ReplayStore

    env = make_env("Hopper-v5")
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {
        k: [] for k in ("obs", "action", "reward", "next_obs", "terminated", "truncated")
    }
    obs, _ = env.reset(seed=seed)
    t = 0
    while len(cols["obs"]) < rows:
        a = np.clip(0.3 * rng.standard_normal(3) + rng.uniform(-0.3, 0.3), -1, 1).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        t += 1
        trunc = bool(trunc or t == 200)
        for k, v in zip(cols, (obs, a, r, nxt, term, trunc), strict=True):
            cols[k].append(v)
        obs = nxt
        if term or trunc:
            obs, t = env.reset()[0], 0
    store = ReplayStore.create(path, 11, 3, attrs={"env_id": "Hopper-v5"})
    store.append({k: np.asarray(v) for k, v in cols.items()})
    store.close()
    return ReplayStore.open(path)


@pytest.fixture(scope="session")
def hopper_store_path(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("data") / "hopper-small.zarr"
    make_hopper_store(path).close()
    return path
