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
