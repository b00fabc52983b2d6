"""idql-eval as a subprocess: JSON summary, returns PNG and a rollout video."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from idql_runtime.envs import D4RL_REFERENCE_SCORES
from tests.procs import ENV, ROOT, pretrained_checkpoint


def test_eval_cli_reports_returns_scores_png_and_video(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    ckpt = pretrained_checkpoint(hopper_store_path, tmp_path / "pre", iterations=5)
    out = tmp_path / "eval"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "idql_runtime.cli.eval",
            "--checkpoint",
            str(ckpt),
            "--episodes",
            "2",
            "--samples",
            "4",
            "--out",
            str(out),
            "--video",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "MUJOCO_GL": "egl"},
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["episodes"] == 2 and len(s["returns"]) == 2 and s["samples"] == 4
    assert abs(s["return_mean"] - float(np.mean(s["returns"]))) < 1e-9
    lo, hi = D4RL_REFERENCE_SCORES["hopper"]  # the store carries no reference returns
    assert abs(s["normalized_mean"] - 100 * (s["return_mean"] - lo) / (hi - lo)) < 1e-9
    assert (out / "returns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"ftyp" in (out / "video.mp4").read_bytes()[:32]


def test_eval_cli_takes_the_run_dir_and_refuses_bad_arguments_naming_them(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    """The help says "checkpoint dir or run dir": the run dir (the learner's --run-dir)
    was refused with "no checkpoint found". --episodes 0 printed NaN means (not JSON),
    --samples 0 silently ran the config's N, another task's env or an unknown id was a
    traceback from deep inside the first decision or gym.make."""
    ckpt = pretrained_checkpoint(hopper_store_path, tmp_path / "pre", iterations=2)
    run_dir = ckpt.parent.parent
    assert run_dir == tmp_path / "pre"

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "idql_runtime.cli.eval", "--checkpoint", str(run_dir),
             "--out", str(tmp_path / "eval"), *extra],
            capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT,
        )  # fmt: skip

    r = run("--episodes", "1", "--samples", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["checkpoint"] == str(ckpt)
    for extra, named in [
        (["--episodes", "0"], "--episodes must be >= 1, got 0"),
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--env", "HalfCheetah-v5"], "shape (17,)"),
        (["--env", "NoSuchEnv-v0"], "'NoSuchEnv-v0'"),
    ]:
        r = run(*extra)
        assert r.returncode == 2 and named in r.stderr, (extra, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
