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


def test_evaluate_stops_at_the_step_asked_and_keeps_only_completed_episodes() -> None:
    """``should_stop`` is asked before every step. Stopped three steps into the second
    episode, the result is exactly the first episode of an unstopped run with the same
    seed (a deterministic policy), marked interrupted; stopped before the first step,
    the summary is still strict JSON (no NaN means)."""
    from idql_runtime.evaluation import evaluate

    def policy(obs: np.ndarray) -> np.ndarray:
        return np.tanh(obs[:3]).astype(np.float32)  # deterministic, state-dependent

    full = evaluate(policy, "Hopper-v5", 2, seed=7)
    assert not full.interrupted and len(full.returns) == 2
    asked = 0

    def stop_in_second_episode() -> bool:
        nonlocal asked
        asked += 1
        return asked > full.lengths[0] + 3

    seen: list[tuple[int, float, int]] = []
    part = evaluate(
        policy,
        "Hopper-v5",
        2,
        seed=7,
        should_stop=stop_in_second_episode,
        on_episode=lambda i, r, n: seen.append((i, r, n)),
    )
    assert part.interrupted
    assert part.returns == full.returns[:1] and part.lengths == full.lengths[:1]
    assert seen == [(0, full.returns[0], full.lengths[0])]
    assert asked == full.lengths[0] + 4  # it stopped at the first True
    none = evaluate(policy, "Hopper-v5", 2, seed=7, ref=(0.0, 100.0), should_stop=lambda: True)
    s = none.summary()
    assert s["episodes"] == 0 and s["interrupted"] is True
    assert s["return_mean"] is None and s["normalized_mean"] is None
    json.dumps(s, allow_nan=False)


def test_eval_cli_sigint_reports_the_completed_episodes_and_exits_130(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    """Ctrl-C in a long `idql-eval` ends it at the next step with the JSON summary of the
    episodes completed so far ("interrupted": true) and exit 130; before, a traceback
    and nothing reported."""
    import signal
    import time

    ckpt = pretrained_checkpoint(hopper_store_path, tmp_path / "pre", iterations=2)
    out = tmp_path / "eval"
    err_path = tmp_path / "stderr.txt"
    cmd = [
        sys.executable, "-m", "idql_runtime.cli.eval", "--checkpoint", str(ckpt),
        "--episodes", "100000", "--samples", "4", "--out", str(out),
    ]  # fmt: skip
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=ENV, cwd=ROOT
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "episode 2/100000" not in err_path.read_text():
            assert proc.poll() is None, err_path.read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 130, err[-2000:]
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["interrupted"] is True and 2 <= s["episodes"] < 100000
    assert len(s["returns"]) == s["episodes"] == len(s["lengths"])
    assert abs(s["return_mean"] - float(np.mean(s["returns"]))) < 1e-9
    # the progress lines name the same returns the summary reports
    first = float(err.split("episode 1/100000: return ")[1].split(",")[0])
    assert abs(first - s["returns"][0]) < 0.05
    assert f"stopped by SIGINT after {s['episodes']} of 100000 episodes" in err
    assert "Traceback" not in err and (out / "returns.png").exists()
