"""Offline pretraining: losses fall by stated factors; --resume is exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from idql_runtime.config import load_config
from idql_runtime.replay import ReplayStore
from idql_runtime.trainer import OfflineTrainer
from tests.conftest import TINY


def _trainer(store_path: Path, run_dir: Path, **over) -> OfflineTrainer:
    cfg = load_config(
        overrides={
            **TINY,
            "train.checkpoint_interval": 20,
            "train.log_interval": 1000,
            "train.lr_decay_steps": 400,
            **over,
        }
    )
    return OfflineTrainer(
        cfg, ReplayStore.open(store_path), run_dir, progress=False, tensorboard=False
    )


def test_short_run_lowers_diffusion_loss_and_td_error(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    tr = _trainer(hopper_store_path, tmp_path, **{"train.actor_ema": 0.05, "train.critic_lr": 1e-3})
    before = tr.validation_metrics()
    for _ in range(300):
        tr.step()
    after = tr.validation_metrics()
    # measured on this data (tiny nets, 300 its): EMA diffusion loss 3.75 -> 0.38, TD error
    # 166 -> 18; asserted as factors of 4 to leave room for thread-count noise
    assert after["val_actor_loss"] < before["val_actor_loss"] / 4.0, (before, after)
    assert after["val_td_error"] < before["val_td_error"] / 4.0, (before, after)


def test_resume_reproduces_uninterrupted_losses(hopper_store_path: Path, tmp_path: Path) -> None:
    a = _trainer(hopper_store_path, tmp_path / "a")
    for _ in range(20):
        a.step()
    a.save()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    straight = [a.step() for _ in range(15)]

    b = _trainer(hopper_store_path, tmp_path / "b")
    assert b.resume() and b.iteration == 20
    resumed = [b.step() for _ in range(15)]
    for x, y in zip(straight, resumed, strict=True):
        for k in ("actor_loss", "v_loss", "q_loss"):
            assert x[k] == y[k], (k, x[k], y[k])
    for (k, pa), pb in zip(
        a.agent.state_dict().items(), b.agent.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), k


def test_learner_cli_trains_checkpoints_and_resumes(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    """Subprocess run of `idql-learner --dataset` then `--resume` with a larger budget."""
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    base = [
        sys.executable,
        "-m",
        "learner",
        "--dataset",
        str(hopper_store_path),
        "--run-dir",
        str(tmp_path / "run"),
        "--no-progress",
        *sets,
        "--set",
        "train.log_interval=10",
        "--set",
        "train.checkpoint_interval=25",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r1 = subprocess.run(
        [*base, "--set", "train.iterations=30"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert (
        sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt_*"))[-1]
        == "ckpt_000000030"
    )
    r2 = subprocess.run(
        [*base, "--resume", "--set", "train.iterations=50"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "resumed at iteration 30" in r2.stderr
    its = [
        json.loads(line)["iteration"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"eval"' not in line
    ]
    assert its == [10, 20, 30, 40, 50]
    meta = json.loads(
        (tmp_path / "run" / "checkpoints" / "ckpt_000000050" / "meta.json").read_text()
    )
    assert meta["env_id"] == "Hopper-v5" and meta["reward_transform"]["kind"] == "locomotion"
    assert (tmp_path / "run" / "tb").is_dir()
