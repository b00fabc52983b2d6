"""idql-collect (ARS behaviour policies, D4RL-recipe datasets) and idql-data info."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from idql_runtime.cli import data as data_cli
from idql_runtime.collect import (
    ALL_DATASETS,
    CollectConfig,
    LinearPolicy,
    ObsNormalizer,
    Snapshot,
    pick_policies,
    run_collect,
)
from idql_runtime.replay import FIELDS, ReplayStore


def test_obs_normalizer_merges_batches_exactly():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 5))
    norm = ObsNormalizer(5)
    for part in np.array_split(data, 7):
        norm.update(part)
    np.testing.assert_allclose(norm.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.std, data.std(axis=0, ddof=1), rtol=1e-12)
    assert np.all(ObsNormalizer(3).std == 1.0)  # identity before any data (ARS V2 start)


def test_linear_policy_saves_without_pickle(tmp_path):
    p = LinearPolicy(np.arange(6.0).reshape(2, 3), np.ones(3), np.full(3, 2.0), {"iteration": 4})
    p.save(tmp_path / "p.npz")
    q = LinearPolicy.load(tmp_path / "p.npz")
    obs = np.array([3.0, 1.0, -1.0])
    # W (s - 1) / 2 = [0*1 + 1*0 + 2*-1, 3*1 + 4*0 + 5*-1] = [-2, -2] -> clipped to -1
    np.testing.assert_array_equal(q(obs), [-1.0, -1.0])
    assert q.meta == {"iteration": 4}


def test_pick_policies_best_expert_and_medium_nearest_a_third():
    def snap(it, ret):
        return Snapshot(it, ret, LinearPolicy(np.zeros((1, 1)), np.zeros(1), np.ones(1)))

    snaps = [snap(0, 5.0), snap(5, 400.0), snap(10, 1100.0), snap(15, 3000.0), snap(20, 40.0)]
    medium, expert = pick_policies(snaps, 1 / 3)
    assert expert.iteration == 15  # best, not the collapsed final one
    assert medium.iteration == 10  # |1100 - 1000| is the smallest gap to 3000 / 3


def tiny_config(out: Path, **kw) -> CollectConfig:
    base = dict(
        env="Hopper-v5",
        out=str(out),
        size=300,
        seed=3,
        ars_iters=2,
        ars_directions=2,
        ars_top=1,
        eval_every=1,
        eval_episodes=1,
        ref_episodes=2,
        max_episode_steps=60,
        chunk_rows=128,
    )
    base.update(kw)
    return CollectConfig(**base)


def test_collect_is_deterministic_resumable_and_records_settings(tmp_path):
    a = run_collect(tiny_config(tmp_path / "a"), progress=False)
    b = run_collect(tiny_config(tmp_path / "b"), progress=False)
    assert set(a["datasets"]) == set(ALL_DATASETS)
    for name in ALL_DATASETS:
        sa, sb = ReplayStore.open(a["datasets"][name]), ReplayStore.open(b["datasets"][name])
        assert len(sa) == len(sb) > 0
        ra, rb = sa.read(0, len(sa)), sb.read(0, len(sb))
        for k in FIELDS:
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=f"{name}/{k}")
        attrs = sa.attrs
        assert attrs["dataset"] == name and attrs["env_id"] == "Hopper-v5" and attrs["seed"] == 3
        assert (
            attrs["settings"]["size"] == 300
            and attrs["settings"]["ars_resolved"]["directions"] == 2
        )
        assert attrs["ref_min_score"] == a["refs"]["ref_min_score"]
        assert attrs["num_episodes_average_score"] == 2
        if name in ("random", "medium", "expert"):
            assert len(sa) == 300  # exactly --size rows, the last episode cut (truncated)
            assert sa.episode_ends()[-1] == 300
        sa.close()
        sb.close()
    me = ReplayStore.open(a["datasets"]["medium-expert"])
    assert len(me) == 600
    assert (me.read(0, 300)["policy_version"] == a["ars"]["medium_iteration"]).all()
    assert (me.read(300, 600)["policy_version"] == a["ars"]["expert_iteration"]).all()
    me.close()
    rnd = ReplayStore.open(a["datasets"]["random"])
    assert (np.abs(rnd.read(0, 300)["action"]) <= 1).all()
    rnd.close()
    # a second run finds every output and skips all the work
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*")}
    again = run_collect(tiny_config(tmp_path / "a"), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*")} == stamps
    assert again["ars"] == a["ars"]


def test_idql_data_info_json_reports_returns_and_schema(tmp_path, capsys):
    store = ReplayStore.create(
        tmp_path / "s.zarr", 2, 1, attrs={"ref_min_score": 0.0, "ref_max_score": 10.0}
    )
    rewards = np.array([1, 2, 3, 4, 5, 6], np.float32)
    store.append(
        {
            "obs": np.zeros((6, 2), np.float32),
            "action": np.zeros((6, 1), np.float32),
            "reward": rewards,
            "next_obs": np.zeros((6, 2), np.float32),
            "terminated": np.array([0, 1, 0, 0, 0, 1], bool),  # episodes: [1, 2], [3, 4, 5, 6]
            "truncated": np.zeros(6, bool),
        }
    )
    store.close()
    assert data_cli.main(["info", str(tmp_path / "s.zarr"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 6 and info["episodes"] == 2
    assert info["returns"] == {"mean": 10.5, "std": 7.5, "min": 3.0, "max": 18.0}
    assert info["normalized_return_mean"] == pytest.approx(105.0)  # 100 (10.5 - 0) / 10
    assert info["schema"]["data/obs"]["shape"] == [6, 2]
    assert info["provenance"]["actor_ids"] == [-1]
    assert data_cli.main(["info", str(tmp_path / "s.zarr")]) == 0
    assert "episode return mean 10.50" in capsys.readouterr().out
    assert data_cli.main(["info", str(tmp_path / "missing.zarr")]) == 2


@pytest.mark.slow
def test_idql_collect_small_budget_medium_beats_random(tmp_path):
    """End to end through the console scripts: Hopper-v5, 20 ARS iterations, 20k rows."""
    out = tmp_path / "data"
    cmd = [
        sys.executable, "-m", "idql_runtime.cli.collect",
        "--env", "Hopper-v5", "--out", str(out), "--size", "20000", "--seed", "0",
        "--datasets", "random,medium", "--ars-iters", "20", "--eval-every", "2",
        "--ref-episodes", "10", "--quiet",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=600)
    infos = {}
    for name in ("random", "medium"):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "idql_runtime.cli.data",
                "info",
                str(out / f"Hopper-v5-{name}.zarr"),
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        infos[name] = json.loads(r.stdout)
    rand, med = infos["random"]["returns"]["mean"], infos["medium"]["returns"]["mean"]
    # uniform random actions topple the hopper within ~20 steps (return ~20); any policy
    # ARS keeps hops or balances for far longer
    assert infos["random"]["rows"] == infos["medium"]["rows"] == 20000
    assert med > 2.0 * rand and med > rand + 30.0, (rand, med)
    assert infos["medium"]["attrs"]["ref_max_score"] > infos["medium"]["attrs"]["ref_min_score"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ("NoSuchEnv-v0", "cannot make environment 'NoSuchEnv-v0'"),
        ("CartPole-v1", "expected a Box(-1, 1) action space, got Discrete(2)"),
    ],
)
def test_idql_collect_refuses_an_env_it_cannot_use_before_any_work(tmp_path, capsys, env, named):
    """Both were tracebacks (gymnasium's NameNotFound; AttributeError on Discrete.low),
    the first after the output directory had been made."""
    from idql_runtime.cli.collect import main

    out = tmp_path / "out"
    assert main(["--env", env, "--out", str(out), "--size", "10", "--quiet"]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()
