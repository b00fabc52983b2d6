"""idql-learner's start-up refusals: exit 2 with one line naming the bad value, no traceback.

In-process (``learner.cli.main``) on a tiny checkpoint of a fresh agent: every refusal
here happens before a socket is bound or a training step is taken.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from idql_runtime.agent import Agent
from idql_runtime.checkpoint import save_checkpoint
from idql_runtime.config import load_config
from idql_runtime.ports import free_port_pair
from idql_runtime.replay import ReplayStore
from tests.conftest import TINY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OBS_DIM, ACT_DIM = 5, 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pre") / "checkpoints"
    agent = Agent(load_config(overrides=TINY), OBS_DIM, ACT_DIM)
    save_checkpoint(
        root,
        0,
        agent,
        meta={"env_id": None, "reward_transform": {"kind": "none", "scale": 1.0, "shift": 0.0}},
    )
    return root


def _online(ckpt: Path, replay: Path, run_dir: Path, *extra: str) -> list[str]:
    # free ports and a time limit: should a refusal regress, the learner runs briefly
    # instead of holding the default ports until SIGINT
    port = free_port_pair()
    return [
        "--pretrained",
        str(ckpt),
        "--replay",
        str(replay),
        "--run-dir",
        str(run_dir),
        "--bind-ingest",
        f"tcp://127.0.0.1:{port}",
        "--bind-weights",
        f"tcp://127.0.0.1:{port + 1}",
        "--max-seconds",
        "1",
        *extra,
    ]


def test_pretrained_refuses_config_instead_of_ignoring_it(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config used to be dropped silently online: the config there is the checkpoint's
    plus --set, so a YAML given at this step (demo.yaml here) changed nothing."""
    from learner.cli import main

    replay, run_dir = tmp_path / "online.zarr", tmp_path / "run"
    cfg_path = CONFIGS / "demo.yaml"
    assert main(_online(ckpt, replay, run_dir, "--config", str(cfg_path))) == 2
    err = capsys.readouterr().err
    assert f"idql-learner: --config {cfg_path} applies to offline pretraining only" in err
    assert "--set section.field=value" in err
    assert not replay.exists() and not run_dir.exists()


def test_resume_help_says_it_is_offline_only(capsys: pytest.CaptureFixture[str]) -> None:
    from learner.cli import build_parser

    build_parser().print_help()
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--resume offline only: continue from the run's newest checkpoint" in help_text
    assert "--config CONFIG YAML config (configs/*.yaml); offline only" in help_text


def test_replay_store_of_other_dims_is_refused_naming_both(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from learner.cli import main

    replay = tmp_path / "online.zarr"
    ReplayStore.create(replay, OBS_DIM - 1, ACT_DIM).close()
    assert main(_online(ckpt, replay, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert (
        f"idql-learner: replay store {replay} has obs/act dims {(OBS_DIM - 1, ACT_DIM)}, "
        f"the checkpoint {(OBS_DIM, ACT_DIM)}"
    ) in err
    assert "Traceback" not in err
    with ReplayStore.open(replay) as store:  # refused, not rewritten
        assert (store.obs_dim, len(store)) == (OBS_DIM - 1, 0)


@pytest.mark.parametrize("kind", ["missing", "not_a_dataset"])
def test_an_unreadable_offline_dataset_is_refused_naming_it(
    kind: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, a missing or malformed --offline ended start-up with a traceback (exit 1)."""
    from learner.cli import main

    data = tmp_path / "medium.npz"
    if kind == "not_a_dataset":
        data.write_bytes(b"not an npz")
    argv = [*_online(ckpt, tmp_path / "online.zarr", tmp_path / "run"), "--offline", str(data)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"idql-learner: --offline {data}: " in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["empty_dir", "other_dir", "file"])
def test_replay_path_that_is_not_a_store_is_refused_naming_it(
    kind: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from learner.cli import main

    replay = tmp_path / "online.zarr"
    if kind == "file":
        replay.write_text("not a store")
    else:
        replay.mkdir()
        if kind == "other_dir":
            (replay / "notes.txt").write_text("keep me")
    assert main(_online(ckpt, replay, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"idql-learner: --replay {replay} exists but is not an idql replay store" in err
    assert "exist_ok" not in err  # the library's hint means nothing to a CLI user
    if kind == "other_dir":
        assert (replay / "notes.txt").read_text() == "keep me"


def test_bad_set_online_is_a_config_error(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ConfigError (a ValueError) keeps main()'s "config error:" wording online too."""
    from learner.cli import main

    argv = _online(ckpt, tmp_path / "online.zarr", tmp_path / "run", "--set", "online.batch_size=0")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "idql-learner: config error: online.batch_size must be a positive integer, got 0" in err


def test_a_value_error_from_the_running_loop_is_not_taken_for_a_start_up_one(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only start-up errors become exit 2 without a traceback; a ValueError out of the
    running loop (here its first publish, as a bug would raise it) propagates, after the
    learner's final status line, with the store closed (its writer lock free again)."""
    from idql_runtime.online import OnlineLearner
    from learner.cli import main

    def failing_publish(self: OnlineLearner) -> None:
        raise ValueError("a bug inside the loop")

    monkeypatch.setattr(OnlineLearner, "publish", failing_publish)
    replay = tmp_path / "online.zarr"
    with pytest.raises(ValueError, match="a bug inside the loop"):
        main(_online(ckpt, replay, tmp_path / "run"))
    ReplayStore.open(replay, mode="a").close()  # the lock was released


def test_offline_data_with_no_validation_split_trains_online(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train.val_fraction=0 is valid (no held-out rows) and offline pretraining accepts it;
    --offline used to split(1.0) regardless and refuse it at start-up."""
    from learner.cli import main

    rng = np.random.default_rng(0)
    n = 64
    data = tmp_path / "offline.zarr"
    with ReplayStore.create(data, OBS_DIM, ACT_DIM) as store:
        store.append(
            {
                "obs": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
                "next_obs": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
                "action": rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32),
                "reward": np.ones(n, np.float32),
                "terminated": np.zeros(n, bool),
                "truncated": np.arange(n) % 16 == 15,
            }
        )
    args = _online(ckpt, tmp_path / "online.zarr", tmp_path / "run", "--offline", str(data))
    assert main([*args, "--set", "train.val_fraction=0"]) == 0
    assert '"learner_final"' in capsys.readouterr().out


def _random_store(path: Path, n: int = 64) -> Path:
    rng = np.random.default_rng(1)
    with ReplayStore.create(path, OBS_DIM, ACT_DIM) as store:
        store.append(
            {
                "obs": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
                "next_obs": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
                "action": rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32),
                "reward": rng.normal(size=n).astype(np.float32),
                "terminated": np.zeros(n, bool),
                "truncated": np.arange(n) % 16 == 15,
            }
        )
    return path


def test_dataset_with_pretrained_is_refused_instead_of_ignored(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dataset was dropped silently online (the rows to mix in are --offline's)."""
    from learner.cli import main

    replay, run_dir = tmp_path / "online.zarr", tmp_path / "run"
    data = _random_store(tmp_path / "data.zarr")
    assert main(_online(ckpt, replay, run_dir, "--dataset", str(data))) == 2
    err = capsys.readouterr().err
    assert f"idql-learner: --dataset {data} is for offline pretraining" in err
    assert "as --offline" in err
    assert not replay.exists() and not run_dir.exists()


@pytest.mark.parametrize("flag", ["--replay", "--offline"])
def test_online_flags_in_offline_pretraining_are_refused_instead_of_ignored(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from learner.cli import main

    data, run_dir = _random_store(tmp_path / "data.zarr"), tmp_path / "run"
    argv = ["--dataset", str(data), "--run-dir", str(run_dir), flag, str(tmp_path / "x.zarr")]
    # a short budget: should the refusal regress, the flag is ignored for 1 iteration, not 3M
    assert main([*argv, "--set", "train.iterations=1"]) == 2
    err = capsys.readouterr().err
    assert f"idql-learner: {flag} is for online finetuning (--pretrained)" in err
    assert not run_dir.exists() and not (tmp_path / "x.zarr").exists()


def test_unreadable_dataset_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from learner.cli import main

    bad = tmp_path / "notes.txt"
    bad.write_text("not a dataset")
    argv = ["--dataset", str(bad), "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--set", "train.iterations=1"]) == 2
    err = capsys.readouterr().err
    assert f"idql-learner: --dataset {bad}: cannot tell the format of '{bad}'" in err
    assert "Traceback" not in err


def test_an_evaluation_env_of_another_task_is_refused_before_the_first_iteration(
    hopper_store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The message names the env and both shapes, not the (readable) dataset; nothing is
    trained or written (trainer-level test: test_trainer.py)."""
    from learner.cli import main

    run_dir = tmp_path / "run"
    rc = main(
        _offline(
            hopper_store_path, run_dir, "--set", "env_id=HalfCheetah-v5",
            "--set", "train.eval_interval=5",
        )
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "idql-learner: evaluation env (env_id 'HalfCheetah-v5'): HalfCheetah-v5 has " in err
    assert "(17,)" in err and "(11,)" in err and "Traceback" not in err
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("network.hidden_dim=64", "network.hidden_dim 32 -> 64"),
        ("diffusion.steps=3", "diffusion.steps 5 -> 3"),
        ("critic.hidden=[16,16]", "critic.hidden [32, 32] -> [16, 16]"),
        ("train.algo=bc", "train.algo 'idql' -> 'bc'"),
        ("train.reward_transform=none", "train.reward_transform"),
    ],
)
def test_set_of_what_the_weights_were_built_with_is_refused_online(
    override: str, shown: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--set network.hidden_dim=64 used to be written into every online checkpoint beside
    32-wide weights: none of them loaded again (not the learner's own restart, not an
    actor); diffusion.steps=3 loaded and denoised on a schedule the network never saw."""
    from learner.cli import main

    replay, run_dir = tmp_path / "online.zarr", tmp_path / "run"
    assert main(_online(ckpt, replay, run_dir, "--set", override)) == 2
    err = capsys.readouterr().err
    assert "idql-learner: config error: --set changes fields the checkpoint was trained" in err
    assert shown in err
    assert not replay.exists() and not run_dir.exists()


def test_set_of_training_fields_online_is_recorded_and_reloads(ckpt: Path, tmp_path: Path) -> None:
    """What --set may change online (losses, rates, the seed) ends up in a checkpoint that
    loads back with those values."""
    from idql_runtime.checkpoint import load_checkpoint, restore_agent
    from learner.cli import main

    run_dir = tmp_path / "run"
    sets = ["--set", "critic.tau=0.8", "--set", "train.seed=3", "--set", "train.critic_lr=1e-3"]
    assert main(_online(ckpt, tmp_path / "online.zarr", run_dir, *sets)) == 0
    agent = restore_agent(load_checkpoint(run_dir / "checkpoints"))
    assert (agent.cfg.critic.tau, agent.cfg.train.seed) == (0.8, 3)
    assert agent.q_opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("which", ["ingest", "weights"])
def test_an_endpoint_in_use_is_refused_naming_it_with_nothing_left_open(
    which: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second learner on the same ports (the first one still running) printed pyzmq's
    traceback and exited 1."""
    import zmq

    from learner.cli import main

    replay = tmp_path / "online.zarr"
    argv = _online(ckpt, replay, tmp_path / "run")
    ingest, weights = argv[argv.index("--bind-ingest") + 1], argv[argv.index("--bind-weights") + 1]
    taken = ingest if which == "ingest" else weights
    ctx = zmq.Context()
    holder = ctx.socket(zmq.ROUTER)
    holder.bind(taken)
    try:
        assert main(argv) == 2
    finally:
        holder.close(linger=0)
    err = capsys.readouterr().err
    assert f"idql-learner: cannot bind '{taken}': Address already in use" in err
    assert "Traceback" not in err
    ReplayStore.open(replay, mode="a").close()  # the store's writer lock was released
    for endpoint in (ingest, weights):  # and neither port is still held by the learner
        probe = ctx.socket(zmq.ROUTER)
        probe.bind(endpoint)
        probe.close(linger=0)
    ctx.term()


def test_a_checkpoint_error_from_the_running_loop_is_not_taken_for_a_start_up_one(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI caught CheckpointError, FileNotFoundError etc. around the whole run, so one
    raised by the loop (a checkpoint that could not be written) exited 2 as if refused at
    start-up, without a traceback."""
    from idql_runtime.checkpoint import CheckpointError
    from idql_runtime.online import OnlineLearner
    from learner.cli import main

    def failing_publish(self: OnlineLearner) -> None:
        raise CheckpointError("the disk went away mid-run")

    monkeypatch.setattr(OnlineLearner, "publish", failing_publish)
    with pytest.raises(CheckpointError, match="the disk went away mid-run"):
        main(_online(ckpt, tmp_path / "online.zarr", tmp_path / "run"))


def _offline(data: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    return [
        "--dataset",
        str(data),
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *sets,
        "--set",
        "train.checkpoint_interval=2",
        "--set",
        "train.val_fraction=0.1",
        *extra,
    ]


def test_offline_resume_continues_on_the_saved_config_with_set_on_top(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume --set train.iterations=6` (the way to extend a run) used to train on the
    defaults plus that one field while the checkpoints kept recording the first run's
    config, and the restored optimisers kept the first run's learning rates."""
    from idql_runtime.checkpoint import load_checkpoint, restore_agent
    from learner.cli import main

    data, run_dir = _random_store(tmp_path / "data.zarr"), tmp_path / "run"
    assert main(_offline(data, run_dir, "--set", "train.iterations=4")) == 0
    resume = ["--dataset", str(data), "--run-dir", str(run_dir), "--no-progress", "--resume"]
    assert main([*resume, "--set", "train.iterations=6", "--set", "train.critic_lr=0.01"]) == 0
    assert "resumed at iteration 4" in capsys.readouterr().err
    ckpt = load_checkpoint(run_dir / "checkpoints")
    train = ckpt.meta["config"]["train"]
    assert ckpt.iteration == 6
    assert (train["iterations"], train["critic_lr"], train["batch_size"]) == (6, 0.01, 64)
    assert ckpt.meta["config"]["network"]["hidden_dim"] == TINY["network.hidden_dim"]
    assert restore_agent(ckpt).q_opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize(
    ("extra", "shown"),
    [
        (["--set", "network.hidden_dim=64"], "network.hidden_dim 32 -> 64"),
        (["--set", "train.val_fraction=0.3"], "train.val_fraction 0.1 -> 0.3"),
        # the shipped demo config sets another network: given again on resume, refused
        (["--config", str(CONFIGS / "demo.yaml")], "network.hidden_dim 32 ->"),
    ],
)
def test_offline_resume_refuses_to_change_what_the_checkpoint_was_trained_with(
    extra: list[str], shown: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from idql_runtime.checkpoint import list_checkpoints
    from learner.cli import main

    data, run_dir = _random_store(tmp_path / "data.zarr"), tmp_path / "run"
    assert main(_offline(data, run_dir, "--set", "train.iterations=2")) == 0
    before = list_checkpoints(run_dir / "checkpoints")
    argv = ["--dataset", str(data), "--run-dir", str(run_dir), "--resume", *extra]
    assert main([*argv, "--set", "train.iterations=4"]) == 2
    err = capsys.readouterr().err
    assert "idql-learner: config error:" in err and "the checkpoint was trained with" in err
    assert shown in err
    assert list_checkpoints(run_dir / "checkpoints") == before  # nothing trained or written


def test_the_online_learner_gives_the_callers_signal_handlers_back(
    ckpt: Path, tmp_path: Path
) -> None:
    """Its SIGTERM/SIGINT handlers stayed installed after it returned: in an embedding
    process (here pytest) a later SIGTERM went to the finished learner and was dropped,
    so `timeout` could not stop the process."""
    import signal

    from learner.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert main(_online(ckpt, tmp_path / "online.zarr", tmp_path / "run")) == 0
    assert {s: signal.getsignal(s) for s in before} == before
