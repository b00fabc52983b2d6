"""Offline pretraining: losses fall by stated factors; --resume is exact."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
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


@pytest.mark.parametrize(
    ("over", "named"),
    [
        ({"env_id": "HalfCheetah-v5"}, "env_id 'HalfCheetah-v5'): HalfCheetah-v5 has observations"),
        ({"env_id": "hopper-medium-v2"}, "cannot make environment 'hopper-medium-v2'"),
    ],
)
def test_an_evaluation_env_that_cannot_evaluate_is_refused_before_training(
    hopper_store_path: Path, tmp_path: Path, over: dict[str, Any], named: str
) -> None:
    """Another task's env, or a D4RL file's env name gymnasium does not know, used to
    fail at the first evaluation round: 250k iterations (hours) into a default run.
    Without evaluation rounds the same env id trains as before."""
    with pytest.raises(ValueError, match=re.escape(named)) as info:
        _trainer(hopper_store_path, tmp_path / "a", **over, **{"train.eval_interval": 5})
    assert "train.eval_interval=0" in str(info.value)
    assert not (tmp_path / "a").exists()
    tr = _trainer(hopper_store_path, tmp_path / "b", **over)  # TINY: eval_interval 0
    tr.step()
    assert tr.iteration == 1


@pytest.mark.parametrize("backend", ["reference", "eager"])
def test_resume_reproduces_uninterrupted_losses(
    hopper_store_path: Path, tmp_path: Path, backend: str
) -> None:
    """Bit for bit, with Agent.update and with the fast LearnerStep (its moments, step
    counts and LR position go through the checkpoint, its loss noise through the trainer's
    checkpointed generator)."""
    a = _trainer(hopper_store_path, tmp_path / "a", **{"train.learner_backend": backend})
    assert (a.learner_step is None) == (backend == "reference")
    for _ in range(20):
        a.step()
    a.save()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    straight = [a.step() for _ in range(15)]

    b = _trainer(hopper_store_path, tmp_path / "b", **{"train.learner_backend": backend})
    assert b.resume() and b.iteration == 20
    resumed = [b.step() for _ in range(15)]
    for x, y in zip(straight, resumed, strict=True):
        for k in ("actor_loss", "v_loss", "q_loss"):
            assert x[k] == y[k], (k, x[k], y[k])
    for (k, pa), pb in zip(
        a.agent.state_dict().items(), b.agent.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), k


def test_resume_runs_on_this_runs_config_and_refuses_what_the_weights_fix(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    """A resumed run trains with its own learning rates and losses (the restored
    optimisers used to keep the saved rates, the agent the saved losses) and records them;
    a changed network width, diffusion schedule or split is refused before anything is
    restored."""
    from idql_runtime.config import ConfigError

    a = _trainer(hopper_store_path, tmp_path)
    for _ in range(3):
        a.step()
    a.save()
    for field, value, shown in [
        ("network.hidden_dim", 64, "network.hidden_dim 32 -> 64"),
        ("diffusion.steps", 3, "diffusion.steps 5 -> 3"),
        ("train.val_fraction", 0.2, "train.val_fraction 0.05 -> 0.2"),
    ]:
        bad = _trainer(hopper_store_path, tmp_path, **{field: value})
        with pytest.raises(ConfigError, match=re.escape(shown)):
            bad.resume()
        assert bad.iteration == 0  # nothing restored
    b = _trainer(hopper_store_path, tmp_path, **{"train.critic_lr": 0.02, "critic.tau": 0.9})
    assert b.resume() and b.iteration == 3
    assert b.agent.cfg.critic.tau == 0.9
    assert [g["lr"] for g in (*b.agent.q_opt.param_groups, *b.agent.v_opt.param_groups)] == [
        0.02,
        0.02,
    ]
    b.step()
    saved = json.loads((b.save() / "meta.json").read_text())["config"]
    assert (saved["train"]["critic_lr"], saved["critic"]["tau"]) == (0.02, 0.9)


def test_fast_step_trains_like_agent_update(hopper_store_path: Path, tmp_path: Path) -> None:
    """train.learner_backend=eager against the reference on the same data, seeds and
    dropout masks: 25 iterations agree to float32 rounding of the optimiser arithmetic
    (tests/test_learner_step.py), and the logged metrics come from the device tensor."""
    ref = _trainer(hopper_store_path, tmp_path / "ref", **{"train.log_interval": 5})
    h_ref = ref.run(25)["history"]
    fast = _trainer(  # seeds torch's global RNG (the dropout masks) again
        hopper_store_path,
        tmp_path / "fast",
        **{"train.log_interval": 5, "train.learner_backend": "eager"},
    )
    h_fast = fast.run(25)["history"]
    assert [m["iteration"] for m in h_fast] == [5, 10, 15, 20, 25]
    for a, b in zip(h_ref, h_fast, strict=True):
        for k in ("actor_loss", "actor_lr", "v_loss", "v_mean", "q_loss", "q_mean"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
    for (k, pa), pb in zip(
        ref.agent.state_dict().items(), fast.agent.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("nice", ["-3", "20"])
def test_learner_cli_refuses_a_priority_outside_0_to_19(
    nice: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Raising the learner above the actors (or past 19) is refused, naming the value,
    before anything is read or written."""
    from learner.cli import main

    run_dir = tmp_path / "run"
    assert main(["--nice", nice, "--pretrained", str(tmp_path), "--run-dir", str(run_dir)]) == 2
    assert f"--nice must be in 0..19, got {nice}" in capsys.readouterr().err
    assert not run_dir.exists()


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
        # resumed onto the fast update step: a reference checkpoint carries on in LearnerStep
        [*base, "--resume", "--set", "train.iterations=50", "--set", "train.learner_backend=eager"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "resumed at iteration 30" in r2.stderr
    assert "update step: LearnerStep backend=eager" in r2.stderr
    assert "update step: Agent.update (reference)" in r1.stderr
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
    # the checkpoint records the config that ran (it used to keep the first run's)
    assert meta["config"]["train"]["iterations"] == 50
    assert meta["config"]["train"]["learner_backend"] == "eager"
    assert (tmp_path / "run" / "tb").is_dir()


@pytest.mark.parametrize("finetune_actor", [False, True])
def test_online_learner_fast_step_matches_reference_and_checkpoints(
    hopper_store_path: Path, tmp_path: Path, finetune_actor: bool
) -> None:
    """The online learner's updates (V + Q, or actor + V + Q with online.finetune_actor)
    through train.learner_backend=eager agree with the agent's reference updates on the
    same store and seeds; its checkpoint carries LearnerStep's optimiser state, so a
    restart resumes both optimisers where they were."""
    from idql_runtime.agent import Agent
    from idql_runtime.checkpoint import load_checkpoint, restore_agent
    from idql_runtime.envs import RewardTransform
    from idql_runtime.online import OnlineLearner

    def learner(backend: str, run_dir: Path) -> OnlineLearner:
        cfg = load_config(
            overrides={
                **TINY,
                "online.warmup_transitions": 10,
                "online.batch_size": 32,
                "online.finetune_actor": finetune_actor,
                "train.learner_backend": backend,
                "online.max_update_burst_s": 60.0,  # count-bound, not time-bound, here
            }
        )
        torch.manual_seed(0)  # same weights and dropout masks for both learners
        store = ReplayStore.open(hopper_store_path)
        agent = Agent(cfg, store.obs_dim, store.act_dim)
        meta = {"obs_dim": store.obs_dim, "act_dim": store.act_dim}
        tr = RewardTransform.from_dict({"kind": "none", "scale": 1.0, "shift": 0.0})
        return OnlineLearner(cfg, agent, store, None, None, run_dir, tr, meta=meta, seed=3)

    runs = {}
    for backend in ("reference", "eager"):
        ln = learner(backend, tmp_path / backend)
        ln.owed_updates = 6.0
        assert ln.train() == 6 and ln.updates == 6
        assert (ln.learner_step is None) == (backend == "reference")
        runs[backend] = ln
    ref, fast = runs["reference"], runs["eager"]
    assert set(fast.last_metrics) == set(ref.last_metrics)
    for k, v in ref.last_metrics.items():
        assert fast.last_metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for (k, pa), pb in zip(
        ref.agent.state_dict().items(), fast.agent.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=k)

    assert fast.checkpoint() is not None
    back = restore_agent(load_checkpoint(tmp_path / "eager" / "checkpoints"), optimisers=True)
    names = ("v_opt", "q_opt", "actor_opt") if finetune_actor else ("v_opt", "q_opt")
    for name in names:
        o_ref, o_back = getattr(ref.agent, name), getattr(back, name)
        for p_ref, p_back in zip(
            o_ref.param_groups[0]["params"], o_back.param_groups[0]["params"], strict=True
        ):
            s_ref, s_back = o_ref.state[p_ref], o_back.state[p_back]
            assert float(s_back["step"]) == float(s_ref["step"]) == 6, name
            torch.testing.assert_close(s_back["exp_avg"], s_ref["exp_avg"], rtol=1e-4, atol=1e-6)
    assert back.actor_sched.last_epoch == (6 if finetune_actor else 0)


def _online_learner(
    cfg: Any, store: ReplayStore, run_dir: Path, link: Any = None, **kw: Any
) -> Any:
    """An OnlineLearner on a fresh agent, no offline data, identity reward transform."""
    from idql_runtime.agent import Agent
    from idql_runtime.envs import RewardTransform
    from idql_runtime.online import OnlineLearner

    return OnlineLearner(
        cfg,
        Agent(cfg, store.obs_dim, store.act_dim),
        store,
        None,
        link,
        run_dir,
        RewardTransform.from_dict({"kind": "none", "scale": 1.0, "shift": 0.0}),
        meta={"obs_dim": store.obs_dim, "act_dim": store.act_dim},
        **kw,
    )


@pytest.mark.parametrize(("update_s", "per_burst"), [(0.03, 4), (0.5, 1)])
def test_online_learner_bounds_each_update_burst_in_time(
    hopper_store_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    update_s: float,
    per_burst: int,
) -> None:
    """Acks go out only between update bursts, so a burst stops once
    online.max_update_burst_s (0.1 s) has passed: ceil(0.1 / 0.03) = 4 updates of 30 ms,
    and always at least one (a 0.5 s update still makes progress). Updates not run stay
    owed, none is lost. A fake clock advanced by each update makes the count exact."""
    import types

    from idql_runtime import online

    cfg = load_config(overrides={**TINY, "online.warmup_transitions": 10, "online.batch_size": 32})
    ln = _online_learner(cfg, ReplayStore.open(hopper_store_path), tmp_path)
    now = [0.0]
    monkeypatch.setattr(online, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    real_update = ln.updater.update

    def slow_update(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        now[0] += update_s
        return real_update(batch)

    monkeypatch.setattr(ln.updater, "update", slow_update)
    ln.owed_updates = 10.0
    assert cfg.online.max_update_burst_s == 0.1 and cfg.online.max_updates_per_poll == 32
    assert ln.train() == per_burst and ln.updates == per_burst
    assert ln.owed_updates == 10.0 - per_burst
    assert ln.train() == per_burst and ln.updates == 2 * per_burst


@pytest.mark.gpu
def test_gpu_trainer_auto_uses_the_cuda_graph_step(hopper_store_path: Path, tmp_path: Path) -> None:
    """On a GPU, learner_backend=auto trains through the captured LearnerStep; 20
    iterations agree with Agent.update on the same GPU (dropout off: the graph draws its
    own masks), and a save + resume carries on where the uninterrupted run goes. Both runs
    draw their batches on the GPU (batch_source auto = device there) from the same seed:
    the reference gets fresh tensors, the captured step has them gathered straight into
    its graph inputs. Written without a GPU (2026-11-26, fourth and fifth sessions); not
    yet run on one."""

    def trainer(run_dir: Path, backend: str) -> OfflineTrainer:
        cfg = load_config(
            overrides={
                **TINY,
                "network.dropout": 0.0,
                "train.learner_backend": backend,
                "train.log_interval": 10,
                "train.lr_decay_steps": 400,
                "train.checkpoint_interval": 1000,
            }
        )
        return OfflineTrainer(
            cfg, ReplayStore.open(hopper_store_path), run_dir, device="cuda",
            progress=False, tensorboard=False,
        )  # fmt: skip

    ref = trainer(tmp_path / "ref", "reference")
    assert ref.batch_source == "device"
    h_ref = ref.run(20)["history"]
    assert ref.updater.batch_buffers() is None
    fast = trainer(tmp_path / "fast", "auto")
    assert fast.learner_step is not None and fast.learner_step.backend == "cuda_graph"
    h_fast = fast.run(20)["history"]
    buffers = fast.updater.batch_buffers()
    assert buffers is not None and buffers["obs"].device.type == "cuda"
    for a, b in zip(h_ref, h_fast, strict=True):
        for k in ("actor_loss", "v_loss", "q_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4), (k, a[k], b[k])
    fast.save()
    shutil.copytree(tmp_path / "fast", tmp_path / "again")
    straight = [fast.step() for _ in range(5)]
    again = trainer(tmp_path / "again", "auto")
    assert again.resume() and again.iteration == 20
    resumed = [again.step() for _ in range(5)]
    for a, b in zip(straight, resumed, strict=True):
        for k in ("actor_loss", "v_loss", "q_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])


def _poison(agent, net: str = "q") -> None:
    with torch.no_grad():
        next(getattr(agent, net).parameters()).view(-1)[0] = float("nan")


def test_offline_run_stops_on_nonfinite_and_keeps_the_good_checkpoint(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    """A NaN weight (injected) makes the next logged loss NaN: run() raises naming it and
    writes no checkpoint of it; save() refuses too, naming the tensor."""
    from idql_runtime.trainer import TrainingDiverged

    tr = _trainer(hopper_store_path, tmp_path, **{"train.log_interval": 5})
    tr.run(20)  # checkpoint at 20 (train.checkpoint_interval)
    _poison(tr.agent)
    with pytest.raises(TrainingDiverged, match=r"(q|v)_loss = nan at iteration 25"):
        tr.run(40)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt_*")) == ["ckpt_000000020"]
    with pytest.raises(TrainingDiverged, match=r"non-finite weights at iteration 25 \(q\."):
        tr.save()


class _RecordingLink:
    """The learner link's publish side, recorded (the rest of the link is not used)."""

    def __init__(self) -> None:
        self.published: list[tuple[int, dict]] = []

    def publish_weights(self, version: int, tensors: dict) -> None:
        self.published.append((version, tensors))


def test_online_learner_never_ships_or_checkpoints_nonfinite_weights(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    """Non-finite weights at a publish or a checkpoint: nothing is sent or saved, the
    learner rolls back to its newest checkpoint (weights and optimiser state) and goes on;
    after 3 roll-backs with no good publish between them it stops updating."""
    from idql_runtime.online import OnlineLearner

    cfg = load_config(
        overrides={
            **TINY,
            "online.warmup_transitions": 10,
            "online.batch_size": 32,
            "online.max_update_burst_s": 60.0,  # every owed update in one train(), even slow
        }
    )
    store = ReplayStore.open(hopper_store_path)
    link = _RecordingLink()

    def learner(run_dir: Path, rollback_from: Path | None = None) -> OnlineLearner:
        return _online_learner(cfg, store, run_dir, link=link, rollback_from=rollback_from)

    # nothing to roll back to (no checkpoint in the run, no --pretrained): updates stop
    lone = learner(tmp_path / "lone")
    _poison(lone.agent, "q_target")
    lone.publish()
    assert lone.training_paused and link.published == []

    ln = learner(tmp_path / "run")
    ln.owed_updates = 5.0
    ln.train()
    assert ln.checkpoint() is not None
    good = {k: v.clone() for k, v in ln.agent.state_dict().items()}
    ln.publish()
    assert [v for v, _ in link.published] == [1]

    _poison(ln.agent, "q_target")
    ln.publish()
    assert [v for v, _ in link.published] == [1]  # nothing sent
    assert ln.counters["rollbacks"] == 1 and not ln.training_paused
    for k, v in ln.agent.state_dict().items():
        assert torch.equal(v, good[k]), k  # back on the checkpoint's weights
    assert float(ln.agent.v_opt.state[next(ln.agent.v.parameters())]["step"]) == 5
    ln.owed_updates = 3.0
    assert ln.train() == 3 and not ln.agent.nonfinite_tensors()
    ln.publish()
    assert [v for v, _ in link.published] == [1, 2]

    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("ckpt_*"))
    _poison(ln.agent, "q_target")
    assert ln.checkpoint() is None  # refused, and rolled back
    assert sorted((tmp_path / "run" / "checkpoints").glob("ckpt_*")) == ckpts
    assert ln.counters["rollbacks"] == 2 and not ln.agent.nonfinite_tensors()

    for _ in range(3):  # 3 more in a row (no good publish between): updates stop
        _poison(ln.agent, "q_target")
        ln.publish()
    assert ln.training_paused and ln.status()["training_paused"]
    ln.owed_updates = 4.0
    assert ln.train() == 0
    assert [v for v, _ in link.published] == [1, 2]

    # a fresh run with no checkpoint of its own rolls back to --pretrained
    fresh = learner(tmp_path / "fresh", rollback_from=tmp_path / "run" / "checkpoints")
    _poison(fresh.agent, "q_target")
    fresh.publish()
    assert fresh.counters["rollbacks"] == 1 and not fresh.training_paused
    for k, v in fresh.agent.state_dict().items():
        assert torch.equal(v, good[k]), k


def _offline_cmd(store: Path, run: Path, *sets: str) -> list[str]:
    """`idql-learner --dataset` on the TINY config with ``sets`` (k=v) on top."""
    tiny = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    return [
        sys.executable, "-m", "learner", "--dataset", str(store), "--run-dir", str(run),
        "--no-progress", *tiny, *(f"--set={kv}" for kv in sets),
    ]  # fmt: skip


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_offline_pretraining_with_a_checkpoint_of_the_last_iteration(
    hopper_store_path: Path, tmp_path: Path, sig: str
) -> None:
    """A real `idql-learner --dataset` process, signalled mid-run (a cluster's preemption
    SIGTERM, or Ctrl-C): it finishes the iteration, checkpoints it and exits 128 + signal
    number; `--resume` goes on from exactly there. Before, everything since the last
    `checkpoint_interval` was lost (50k iterations by default: half an hour on a CPU)."""
    import signal
    import time

    from idql_runtime.checkpoint import list_checkpoints, load_checkpoint

    run = tmp_path / "run"
    cmd = _offline_cmd(
        hopper_store_path, run, "train.iterations=1000000", "train.checkpoint_interval=5",
        "train.keep_checkpoints=0", "train.log_interval=1000000",
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run / "checkpoints") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # mid-interval, most likely: the last checkpoint is not the stop
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    signum = int(getattr(signal, sig))
    assert proc.returncode == 128 + signum, err[-2000:]
    newest = load_checkpoint(run / "checkpoints")
    assert f"stopped by {sig} at iteration {newest.iteration} of 1000000" in err
    assert "Traceback" not in err
    # a checkpoint of the iteration it stopped at, not only of the last interval
    assert newest.iteration >= 5
    r = subprocess.run(
        [*cmd, "--resume", "--set", f"train.iterations={newest.iteration + 2}"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed at iteration {newest.iteration}" in r.stderr
    assert load_checkpoint(run / "checkpoints").iteration == newest.iteration + 2


def test_a_signal_during_an_evaluation_round_ends_the_round_and_checkpoints_the_iteration(
    hopper_store_path: Path, tmp_path: Path
) -> None:
    """A SIGINT in an evaluation round (here 1000 Hopper episodes: minutes) ends the round
    at the next step: the completed episodes are logged as an interrupted round, the
    iteration is checkpointed, the process exits 130 in seconds. Before, the first Ctrl-C
    waited for the whole round, and only a second one stopped it, without a checkpoint."""
    import signal
    import time

    from idql_runtime.checkpoint import load_checkpoint

    run = tmp_path / "run"
    cmd = _offline_cmd(
        hopper_store_path, run, "train.iterations=1000", "train.log_interval=5",
        "train.eval_interval=5", "train.eval_episodes=1000", "train.eval_samples=[8,4]",
        "train.checkpoint_interval=1000",
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(cmd, stderr=err_file, stdout=subprocess.DEVNULL, env=env)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 120
        # the metrics line of iteration 5 is written just before its evaluation round
        while time.monotonic() < deadline and not (
            metrics.exists() and '"iteration": 5' in metrics.read_text()
        ):
            time.sleep(0.05)
        time.sleep(1.0)  # inside the round
        assert proc.poll() is None, err_path.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        t_signal = time.monotonic()
        proc.wait(timeout=60)
        waited = time.monotonic() - t_signal
    finally:
        proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGINT at iteration 5 of 1000" in err and "Traceback" not in err
    # a 1000-episode round takes minutes here; ended at the next step, it takes a
    # checkpoint save and an exit (generous for a loaded CI machine)
    assert waited < 30, waited
    assert load_checkpoint(run / "checkpoints").iteration == 5
    rounds = [r for r in map(json.loads, metrics.read_text().splitlines()) if "eval" in r]
    assert len(rounds) == 1 and rounds[0]["iteration"] == 5
    # the round stopped inside its first setting (N=8) and did not start the next
    ((key, part),) = rounds[0]["eval"].items()
    assert key == "N8" and part["interrupted"] is True
    assert part["episodes"] < 1000 and len(part["returns"]) == part["episodes"]
