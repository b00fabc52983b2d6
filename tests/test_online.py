"""OnlineLearner's bookkeeping against a real zarr store and checkpoints on disk: what a
commit that landed despite an error, an actor that died while the learner was down, a run
whose checkpoints are all corrupt, and learning-rate overrides on a resume do."""

from __future__ import annotations

import errno
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from idql_runtime import replay
from idql_runtime.agent import Agent
from idql_runtime.checkpoint import load_checkpoint, restore_agent, save_checkpoint
from idql_runtime.config import load_config
from idql_runtime.envs import RewardTransform
from idql_runtime.online import OnlineLearner
from idql_runtime.replay import ReplayStore
from idql_runtime.transport.learner_link import ActorState
from tests.conftest import TINY

OBS_DIM, ACT_DIM = 3, 2


class _Link:
    """The learner link's surface OnlineLearner uses, recorded; ``live`` are the actors
    this learner's link has heard from."""

    def __init__(self, live: tuple[int, ...] = (), heartbeat_liveness_s: float = 0.05) -> None:
        self.acks: list[tuple[int, int, str]] = []
        self.published: list[int] = []
        self.live = {a: ActorState([], time.monotonic()) for a in live}
        self.heartbeat_liveness_s = heartbeat_liveness_s

    def ack(self, actor_id: int, seq: int, committed_rows: int, status: str = "committed") -> bool:
        self.acks.append((actor_id, seq, status))
        return True

    def reject(self, actor_id: int, seq: int, message: str) -> bool:
        return True

    def publish_weights(self, version: int, tensors: dict) -> None:
        self.published.append(version)

    def poll(self, timeout_ms: int = 0) -> list:
        time.sleep(timeout_ms / 1e3)
        return []

    def actors(self) -> dict:
        return dict(self.live)

    def dead_actors(self) -> list[int]:
        return []


def _learner(store: ReplayStore, run_dir: Path, link: _Link, **kw: Any) -> OnlineLearner:
    cfg = load_config(overrides={**TINY, **kw.pop("overrides", {})})
    return OnlineLearner(
        cfg,
        Agent(cfg, OBS_DIM, ACT_DIM),
        store,
        None,
        link,
        run_dir,
        RewardTransform.from_dict({"kind": "none", "scale": 1.0, "shift": 0.0}),
        meta={"obs_dim": OBS_DIM, "act_dim": ACT_DIM},
        **kw,
    )


def _batch(actor_id: int, seq: int, n: int = 4, episode: int = 7, done: bool = False) -> Any:
    rng = np.random.default_rng(seq)
    terminated = np.zeros(n, bool)
    terminated[-1] = done
    arrays = {
        "obs": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
        "next_obs": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32),
        "reward": np.ones(n, np.float32),
        "terminated": terminated,
        "truncated": np.zeros(n, bool),
    }
    msg = {"episode_ids": np.full(n, episode, np.int64), "policy_version": 0, "arrays": arrays}
    return SimpleNamespace(actor_id=actor_id, seq=seq, msg=msg)


@pytest.fixture
def store(tmp_path: Path):
    s = ReplayStore.create(tmp_path / "online.zarr", OBS_DIM, ACT_DIM)
    yield s
    s.close()


def test_a_commit_that_landed_before_its_fsync_failed_is_acked_and_never_stored_twice(
    store: ReplayStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit record's rename landed, the directory fsync after it failed: the rows and
    the seq table are in the store. Before, ingest kept its old seq table and left the batch
    un-acked, so the actor's resend was appended again (8 rows became 12)."""
    link = _Link()
    ln = _learner(store, tmp_path / "run", link)
    assert ln.ingest([_batch(1, 100)]) == 4
    commit_dir = replay.commit_record_path(store.path).parent
    real = replay._fsync_path

    def eio_on_commit_dir(path: Any, directory: bool = False) -> None:
        if directory and Path(path) == commit_dir:
            raise OSError(errno.EIO, "Input/output error")
        real(path, directory)

    monkeypatch.setattr(replay, "_fsync_path", eio_on_commit_dir)
    assert ln.ingest([_batch(1, 101)]) == 4
    monkeypatch.undo()
    assert len(store) == 8 and ln.counters["append_failures"] == 1
    assert link.acks == [(1, 100, "committed"), (1, 101, "committed")]
    assert ln.ingest([_batch(1, 101)]) == 0  # the actor's resend: a duplicate
    assert len(store) == 8 and link.acks[-1] == (1, 101, "duplicate")
    with ReplayStore.open(store.path) as reader:
        assert reader.commit_meta["seq_table"] == ln.seq.to_json()


def test_a_copy_in_the_same_poll_is_acked_only_after_its_original_commits(
    store: ReplayStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A duplicating link delivers a batch twice in one poll, then the disk is full. Before,
    the copy was acked "duplicate" at once, the actor dropped the batch, and when the commit
    failed its rows were lost for good."""
    link = _Link()
    ln = _learner(store, tmp_path / "run", link)

    def disk_full(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "append", disk_full)
    assert ln.ingest([_batch(1, 100), _batch(1, 100)]) == 0
    assert link.acks == [] and not ln.store_healthy  # nothing acked: the actor resends
    monkeypatch.undo()
    assert ln.ingest([_batch(1, 100), _batch(1, 100)]) == 4
    assert len(store) == 4
    assert link.acks == [(1, 100, "committed"), (1, 100, "duplicate")]  # after the commit
    assert ln.counters["duplicates"] == 2


def test_an_actor_that_died_while_the_learner_was_down_gets_its_episode_truncated(
    store: ReplayStore, tmp_path: Path
) -> None:
    """The committed record says actors 1 and 2 each had an episode open. After a restart
    the link hears only from actor 2; it never reports actor 1 dead (it never saw it), so
    one liveness period after start-up the learner records actor 1's episode truncated
    (reliability.md #2), commits that, and keeps actor 2's episode open."""
    first = _learner(store, tmp_path / "run", _Link())
    first.ingest([_batch(1, 5, episode=7), _batch(2, 9, episode=3)])
    assert sorted(first.last_batch) == ["1", "2"]

    link = _Link(live=(2,), heartbeat_liveness_s=0.05)
    restarted = _learner(store, tmp_path / "run", link)
    restarted.run(max_seconds=0.3, status_interval_s=60.0)
    assert restarted.truncated_episodes == [[1, 7]]
    assert list(restarted.last_batch) == ["2"] and restarted.counters["actors_dead"] == 1
    with ReplayStore.open(store.path) as reader:  # committed, not only in memory
        assert reader.commit_meta["truncated_episodes"] == [[1, 7]]
        assert list(reader.commit_meta["last_batch"]) == ["2"]


def test_roll_back_with_every_checkpoint_of_the_run_corrupt_uses_pretrained(
    store: ReplayStore, tmp_path: Path
) -> None:
    """roll_back found checkpoints in the run, all corrupt, and load_checkpoint's
    CheckpointError took the learner down; now it falls back to --pretrained, and with
    nothing valid anywhere it pauses updates instead."""
    pretrained = tmp_path / "pretrained"
    good = Agent(load_config(overrides=TINY), OBS_DIM, ACT_DIM)
    save_checkpoint(pretrained, 50, good, meta={})
    run_ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 7000, good, meta={})
    (run_ckpt / "weights.safetensors").write_bytes(b"not the weights the hash is of")

    ln = _learner(store, tmp_path / "run", _Link(), rollback_from=pretrained)
    with torch.no_grad():
        next(ln.agent.q_target.parameters()).fill_(float("nan"))
    ln.publish()
    assert ln.counters["rollbacks"] == 1 and not ln.training_paused
    assert not ln.agent.nonfinite_tensors()
    for k, v in good.state_dict().items():
        assert torch.equal(ln.agent.state_dict()[k], v), k

    lone = _learner(store, tmp_path / "run", _Link(), rollback_from=tmp_path / "nowhere")
    with torch.no_grad():
        next(lone.agent.q_target.parameters()).fill_(float("nan"))
    lone.publish()
    assert lone.training_paused and lone.counters["rollbacks"] == 1


def test_learning_rate_overrides_on_a_restored_agent_are_the_rates_it_trains_at(
    tmp_path: Path,
) -> None:
    """restore_agent gives the optimisers the checkpoint's rates; apply_optimiser_config
    makes them the config's: critic Adam at train.critic_lr, the actor's AdamW at
    actor_lr x the cosine factor at its step count k, 0.5 (1 + cos(pi k / D)), with
    D = the new lr_decay_steps, its moments kept."""
    cfg = load_config(overrides=TINY)
    agent = Agent(cfg, OBS_DIM, ACT_DIM)
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(16, OBS_DIM, generator=g), "action": torch.rand(16, ACT_DIM)}
    for _ in range(10):
        agent.actor_step(batch, g)  # k = 10, with AdamW moments to keep
    path = save_checkpoint(tmp_path, 10, agent, meta={"obs_dim": OBS_DIM, "act_dim": ACT_DIM})
    restored = restore_agent(load_checkpoint(path), optimisers=True)
    assert restored.q_opt.param_groups[0]["lr"] == pytest.approx(3e-4)
    restored.cfg = load_config(
        overrides={
            **TINY,
            "train.critic_lr": 1e-5,
            "train.actor_lr": 1e-4,
            "train.lr_decay_steps": 40,
            "train.actor_weight_decay": 0.0,
        }
    )
    moments = restored.actor_opt.state_dict()["state"][0]["exp_avg"].clone()
    restored.apply_optimiser_config()
    assert torch.equal(restored.actor_opt.state_dict()["state"][0]["exp_avg"], moments)
    assert restored.v_opt.param_groups[0]["lr"] == restored.q_opt.param_groups[0]["lr"] == 1e-5
    cos = 0.5 * (1.0 + np.cos(np.pi * 10 / 40))
    assert restored.actor_opt.param_groups[0]["lr"] == pytest.approx(1e-4 * cos)
    assert restored.actor_opt.param_groups[0]["weight_decay"] == 0.0
    restored.actor_sched.step()  # k = 11 on the new horizon
    cos11 = 0.5 * (1.0 + np.cos(np.pi * 11 / 40))
    assert restored.actor_sched.get_last_lr()[0] == pytest.approx(1e-4 * cos11)
