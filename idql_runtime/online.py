"""The online learner: ingest actors' transitions exactly once, finetune, publish weights.

One loop, single-threaded: poll the ingest socket -> append new batches to the replay
store (one atomic commit) -> ack them -> run the updates the update-to-data ratio owes ->
publish weights every K updates -> checkpoint periodically and on SIGTERM.

Exactly once: a batch is acked only after the store commit that holds it returns, and
the set of committed (actor_id, seq) pairs is written *inside that same commit* (the
store's commit record), so after a crash the table and the rows agree and a resent
batch is recognised as a duplicate (reliability.md #1, #4).

A dead actor (silent for ``--heartbeat-liveness-s``) is forgotten by the link; if its last
committed batch left an episode open, that ``(actor_id, episode_id)`` is recorded as
truncated in the commit record's ``truncated_episodes`` (reliability.md #2): rows are
never rewritten, and every committed row is a whole transition, so the half episode is
usable data whose end is marked there rather than on a row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from argparse import Namespace
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idql_runtime.agent import Agent
from idql_runtime.batches import prepare_batch
from idql_runtime.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    restore_agent,
    save_checkpoint,
)
from idql_runtime.config import (
    ONLINE_FIXED,
    Config,
    ConfigError,
    check_fixed_by_checkpoint,
    config_from_flat,
    parse_overrides,
)
from idql_runtime.engines.learner_step import AgentUpdate, LearnerStep
from idql_runtime.envs import RewardTransform
from idql_runtime.replay import MixedSampler, ReplaySampler, ReplayStore
from idql_runtime.signals import stop_on_signals

log = logging.getLogger(__name__)

STORE_KEYS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")
MAX_TRUNCATED_RECORDS = 1000
"""Newest dead-actor episode marks kept in the commit record (it is rewritten per commit)."""
MAX_HELD_VERSION = 2**62
"""Versions actors report above this are ignored (versions must stay below 2**63)."""


class SeqTable:
    """Committed sequence numbers per actor as sorted disjoint [lo, hi] intervals.

    Actors number batches consecutively (from a wall-clock start), so each actor run is
    one interval and the table stays a handful of integers however long the run.
    """

    def __init__(self, intervals: Mapping[Any, list[list[int]]] | None = None) -> None:
        self.intervals: dict[int, list[list[int]]] = {
            int(k): [list(map(int, iv)) for iv in v] for k, v in (intervals or {}).items()
        }

    def contains(self, actor_id: int, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in self.intervals.get(actor_id, ()))

    def add(self, actor_id: int, seq: int) -> None:
        ivs = self.intervals.setdefault(actor_id, [])
        ivs.append([seq, seq])
        ivs.sort()
        merged: list[list[int]] = []
        for lo, hi in ivs:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.intervals[actor_id] = merged

    def gaps(self, actor_id: int, since: int | None = None) -> int:
        """Missing seqs (lost or still in flight) from ``since`` to the last committed one;
        ``since`` None: from the first committed one.

        Pass the actor run's first seq: a restarted actor starts from the wall clock in
        microseconds, so the jump from its previous run is not a loss (counted from the
        first committed seq, a restart two hours later showed 7e9 "gaps")."""
        ivs = self.intervals.get(actor_id, [])
        if not ivs:
            return 0
        start = ivs[0][0] if since is None else int(since)
        last = ivs[-1][1]
        if last < start:
            return 0
        covered = sum(max(0, min(hi, last) - max(lo, start) + 1) for lo, hi in ivs)
        return (last - start + 1) - covered

    def to_json(self) -> dict[str, list[list[int]]]:
        return {str(k): v for k, v in self.intervals.items()}


def batch_rows(
    msg: dict[str, Any], actor_id: int, obs_dim: int | None = None, act_dim: int | None = None
) -> dict[str, np.ndarray]:
    """Rows for the store from one decoded ``transitions`` message.

    Checks everything the store would refuse (keys, row shapes against the store's
    ``obs_dim``/``act_dim``, values that become non-finite in float32), so that one bad
    batch is rejected alone and can never fail the commit it shares with good ones (and
    with them, the learner). ``obs_dim``/``act_dim`` None: take them from the batch.
    Raises KeyError/ValueError naming what is missing or malformed.
    """
    arrays = msg["arrays"]
    missing = [k for k in STORE_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"transitions from actor {actor_id} lack arrays {missing}")
    n = len(msg["episode_ids"])
    obs_dim = int(np.shape(arrays["obs"])[-1]) if obs_dim is None else obs_dim
    act_dim = int(np.shape(arrays["action"])[-1]) if act_dim is None else act_dim
    want = {"obs": (n, obs_dim), "next_obs": (n, obs_dim), "action": (n, act_dim)}
    rows: dict[str, np.ndarray] = {}
    for k, shape in want.items():
        a = np.asarray(arrays[k])
        if a.shape != shape:
            raise ValueError(
                f"transitions from actor {actor_id}: {k} has shape {a.shape}, need {shape}"
            )
        rows[k] = a
    for k in ("reward", "terminated", "truncated"):
        a = np.asarray(arrays[k])
        if a.size != n:
            raise ValueError(
                f"transitions from actor {actor_id}: {k} has shape {a.shape}, need ({n},)"
            )
        rows[k] = a.reshape(n)
    for k in ("obs", "next_obs", "action", "reward"):
        rows[k] = rows[k].astype(np.float32)
        if not np.isfinite(rows[k]).all():  # finite float64 can overflow float32
            raise ValueError(f"transitions from actor {actor_id}: {k} is not finite in float32")
    for k in ("terminated", "truncated"):
        if rows[k].dtype.kind != "b" and not np.isin(rows[k], (0, 1)).all():
            raise ValueError(f"transitions from actor {actor_id}: {k} is not 0/1")
        rows[k] = rows[k].astype(bool)
    rows["actor_id"] = np.full(n, actor_id, np.int32)
    rows["policy_version"] = np.full(n, msg["policy_version"], np.int64)
    rows["episode_id"] = np.asarray(msg["episode_ids"], np.int64)
    return rows


class OnlineLearner:
    """Owns the agent, stores, samplers, the ingest link and the bookkeeping."""

    def __init__(
        self,
        cfg: Config,
        agent: Agent,
        store: ReplayStore,
        offline: ReplaySampler | None,
        link: Any,
        run_dir: Path,
        transform: RewardTransform,
        *,
        meta: dict[str, Any],
        policy_version: int = 0,
        updates: int = 0,
        seed: int = 0,
        rollback_from: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cfg, self.agent, self.store, self.link = cfg, agent, store, link
        # where to roll back to when the weights turn non-finite and run_dir has no
        # checkpoint yet (idql-learner passes --pretrained)
        self.rollback_from = rollback_from
        self.training_paused = False
        self._rollbacks_in_a_row = 0
        self.run_dir, self.transform, self.meta = run_dir, transform, meta
        self.policy_version, self.updates = policy_version, updates
        committed = store.commit_meta if hasattr(store, "commit_meta") else {}
        self.seq = SeqTable(committed.get("seq_table"))
        # versions only grow, also across a crash that lost the newest checkpoint
        self.policy_version = max(policy_version, int(committed.get("policy_version", 0)))
        # per actor: [seq, episode_id, open] of its newest committed batch (open: its last
        # row ended no episode); and (actor_id, episode_id) cut short by an actor's death
        self.last_batch: dict[str, list[int]] = dict(committed.get("last_batch", {}))
        self.truncated_episodes: list[list[int]] = list(committed.get("truncated_episodes", []))
        self._meta_dirty = False
        self.online = ReplaySampler(store, seed=seed + 1)
        self.sampler: Any = (
            MixedSampler(offline, self.online, cfg.online.online_fraction, seed=seed)
            if offline is not None
            else self.online
        )
        self.owed_updates = 0.0
        self.counters = {
            "ingested_rows": 0,
            "ingested_batches": 0,
            "duplicates": 0,
            "append_failures": 0,
            "bad_batches": 0,
            "actors_dead": 0,
            "rollbacks": 0,
        }
        self.store_healthy = True
        self.generator = torch.Generator(device=agent.device).manual_seed(seed)
        # train.learner_backend: a LearnerStep (actor + V + Q with online.finetune_actor,
        # else V + Q) or the agent's update / critic_update
        self.updater = self._updater()
        self._last_metrics: dict[str, float] | torch.Tensor = {}
        self.last_checkpoint = time.monotonic()
        self.checkpointed_updates: int | None = None  # `updates` of a checkpoint in run_dir
        self.stop_requested = False

    # ------------------------------------------------------------ ingest
    def ingest(self, batches: Iterable[Any]) -> int:
        """Append new batches in one commit, then ack them; duplicates of committed batches
        are acked at once, copies of a batch in this same commit only after it lands.

        If the commit fails (disk full, read-only store) nothing is acked: the actors
        keep the batches and resend them; committed rows are untouched (reliability #15).
        A copy acked "duplicate" before its original committed would make the actor drop
        the batch for good if that commit then failed.
        """
        new: list[tuple[int, int, dict[str, np.ndarray]]] = []
        pending: set[tuple[int, int]] = set()
        copies: list[tuple[int, int]] = []  # duplicates of a batch in `new`
        for b in batches:
            key = (b.actor_id, b.seq)
            if self.seq.contains(*key):
                self.counters["duplicates"] += 1
                self.link.ack(b.actor_id, b.seq, len(self.store), status="duplicate")
                continue
            if key in pending:
                self.counters["duplicates"] += 1
                copies.append(key)
                continue
            try:
                rows = batch_rows(b.msg, b.actor_id, self.store.obs_dim, self.store.act_dim)
            except (KeyError, ValueError) as e:
                self.counters["bad_batches"] += 1
                self.link.reject(b.actor_id, b.seq, str(e))
                continue
            new.append((b.actor_id, b.seq, rows))
            pending.add(key)
        if not new:
            return 0
        merged = {k: np.concatenate([r[k] for _, _, r in new]) for k in new[0][2]}
        table = SeqTable(self.seq.to_json())
        last_batch = {k: list(v) for k, v in self.last_batch.items()}
        truncated = [list(t) for t in self.truncated_episodes]
        for actor_id, seq, rows in new:
            table.add(actor_id, seq)
            done = bool(rows["terminated"][-1] or rows["truncated"][-1])
            prev = last_batch.get(str(actor_id))
            if prev is None or seq > prev[0]:
                last_batch[str(actor_id)] = [seq, int(rows["episode_id"][-1]), int(not done)]
            # an actor declared dead that comes back continues its episode: not truncated
            eps = set(rows["episode_id"].tolist())
            truncated = [t for t in truncated if not (t[0] == actor_id and t[1] in eps)]
        meta = self._commit_meta(table, last_batch, truncated)
        try:
            committed = self.store.append(merged, commit_meta=meta)
        except OSError as e:
            self.counters["append_failures"] += 1
            if getattr(e, "committed", False):
                # The commit landed (only an fsync after it failed): the rows and this seq
                # table are in the store, so they count as committed. Leaving them un-acked
                # with the old table would store the actors' resends a second time.
                log.error("replay append committed, but not confirmed durable: %s", e)
                committed = len(self.store)
            else:
                if self.store_healthy:
                    log.error("replay append failed, not acknowledging until it works again: %s", e)
                self.store_healthy = False
                return 0
        if not self.store_healthy:
            log.info("replay store writable again")
        self.store_healthy = True
        self.seq, self.last_batch, self.truncated_episodes = table, last_batch, truncated
        self._meta_dirty = False
        for actor_id, seq, _ in new:
            self.link.ack(actor_id, seq, committed)
        for actor_id, seq in copies:
            self.link.ack(actor_id, seq, committed, status="duplicate")
        n = len(merged["reward"])
        self.counters["ingested_rows"] += n
        self.counters["ingested_batches"] += len(new)
        self.owed_updates += n * self.cfg.online.updates_per_transition
        return n

    def _commit_meta(
        self,
        table: SeqTable,
        last_batch: dict[str, list[int]],
        truncated: list[list[int]],
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "seq_table": table.to_json(),
            "policy_version": self.policy_version,
            "last_batch": last_batch,
            "truncated_episodes": truncated[-MAX_TRUNCATED_RECORDS:],
        }
        # CURVE key that speaks for each actor_id, committed with the rows it vouched for,
        # so that a restarted learner cannot be made to accept the id from another key.
        keys = self.link.actor_keys() if hasattr(self.link, "actor_keys") else {}
        if keys:
            meta["actor_keys"] = {str(k): v for k, v in sorted(keys.items())}
        return meta

    def forget_dead_actors(self, dead: Iterable[int]) -> None:
        """Record the open episode of each dead actor as truncated (reliability.md #2).

        The record is committed at once by a zero-row commit; if the store refuses, it
        rides along with the next successful commit (every commit carries all of it).
        """
        for actor_id in dead:
            self.counters["actors_dead"] += 1
            last = self.last_batch.pop(str(actor_id), None)
            self._meta_dirty |= last is not None
            if last is not None and last[2]:
                self.truncated_episodes.append([actor_id, last[1]])
                log.warning(
                    "actor %s missed its heartbeats: freed; its episode %d is recorded as"
                    " truncated",
                    actor_id,
                    last[1],
                )
            else:
                log.warning("actor %s missed its heartbeats: freed", actor_id)
        if self._meta_dirty:
            self._commit_meta_only()

    def _commit_meta_only(self) -> None:
        d, a = self.store.obs_dim, self.store.act_dim
        empty = {
            "obs": np.empty((0, d), np.float32),
            "next_obs": np.empty((0, d), np.float32),
            "action": np.empty((0, a), np.float32),
            "reward": np.empty(0, np.float32),
            "terminated": np.empty(0, bool),
            "truncated": np.empty(0, bool),
        }
        meta = self._commit_meta(self.seq, self.last_batch, self.truncated_episodes)
        try:
            self.store.append(empty, commit_meta=meta)
        except OSError as e:
            self.counters["append_failures"] += 1
            if self.store_healthy:
                log.error("could not commit the dead-actor record yet: %s", e)
            self.store_healthy = False
            return
        self._meta_dirty = False
        self.store_healthy = True

    # ------------------------------------------------------------ learning
    def train(self) -> int:
        """Run the updates owed by the update-to-data ratio, at most ``max_updates_per_poll``
        of them and, past the first, only while ``max_update_burst_s`` lasts: acks go out
        only between bursts, and a learner slowed by its own updates (or niced below the
        actors) must not keep them waiting past the actors' resend timeout."""
        o = self.cfg.online
        if len(self.store) < o.warmup_transitions or self.training_paused:
            self.owed_updates = 0.0
            return 0
        self.sampler.refresh()
        todo = min(int(self.owed_updates), o.max_updates_per_poll)
        end = time.monotonic() + o.max_update_burst_s
        for done in range(todo):
            if done and time.monotonic() >= end:
                return done
            batch = prepare_batch(
                self.sampler.sample(o.batch_size),
                self.transform,
                self.cfg.train.action_clip,
                self.agent.device,
            )
            self._last_metrics = self.updater.update(batch)  # no sync for a LearnerStep
            self.updates += 1
            self.owed_updates -= 1
            if self.updates % o.publish_every == 0:
                self.publish()
        return todo

    def _updater(self) -> AgentUpdate:
        o = self.cfg.online
        return AgentUpdate(
            self.agent,
            o.batch_size,
            actor=o.finetune_actor,
            generator=self.generator,
            train=self.cfg.train,
        )

    @property
    def learner_step(self) -> LearnerStep | None:
        """The fast update step in use (None: the agent's reference updates)."""
        return self.updater.step

    @property
    def last_metrics(self) -> dict[str, float]:
        """The newest update's losses as floats (empty before the first update)."""
        return self.updater.floats(self._last_metrics)

    def publish(self) -> None:
        # Above every version an actor reports holding (heartbeats), so that weights
        # published after a learner restart are never refused as stale.
        held = [
            v
            for st in (self.link.actors().values() if hasattr(self.link, "actors") else ())
            if isinstance(v := st.last_heartbeat.get("weights_version", -1), int)
            and v < MAX_HELD_VERSION
        ]
        groups = (
            ("q_target.", "v.", "score_ema.")
            if self.cfg.online.finetune_actor
            else ("q_target.", "v.")
        )
        tensors = {
            k: v.detach().cpu().numpy()
            for k, v in self.agent.inference_state().items()
            if k.startswith(groups)
        }
        bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
        if bad:  # never sent: the actors keep the last good weights
            self.roll_back(f"weights to publish ({', '.join(bad[:3])})")
            return
        self._rollbacks_in_a_row = 0
        self.policy_version = max([self.policy_version, *held]) + 1
        self.link.publish_weights(self.policy_version, tensors)

    def roll_back(self, what: str) -> None:
        """Non-finite weights after ``updates`` updates: reload the newest checkpoint of
        this run (else ``rollback_from``) with its optimiser state and go on from there;
        after 3 roll-backs with no good publish between them, or with nothing to roll back
        to, updates stop (ingest goes on; the actors keep the last published weights)."""
        self.counters["rollbacks"] += 1
        self._rollbacks_in_a_row += 1
        sources: list[str | os.PathLike[str]] = []
        if list_checkpoints(self.run_dir / "checkpoints"):
            sources.append(self.run_dir / "checkpoints")
        if self.rollback_from is not None:
            sources.append(self.rollback_from)
        ckpt, why = None, "nothing to roll back to"
        if self._rollbacks_in_a_row > 3:
            why = "3 roll-backs in a row"
        else:
            for source in sources:  # this run's newest valid checkpoint, else --pretrained
                try:
                    ckpt = load_checkpoint(source)
                    break
                except CheckpointError as e:  # every checkpoint of the run corrupt
                    log.error("cannot roll back to %s: %s", source, e)
                    why = "no valid checkpoint to roll back to"
        if ckpt is None:
            self.training_paused = True
            log.error(
                "non-finite %s after %d updates and %s: updates stop (ingest goes on, actors "
                "keep the last published weights)",
                what,
                self.updates,
                why,
            )
            return
        agent = restore_agent(ckpt, self.agent.device, optimisers=True)
        agent.cfg = self.cfg
        agent.apply_optimiser_config()
        self.agent = agent
        self.updater = self._updater()  # a new step on the restored parameters
        self._last_metrics = {}
        log.error(
            "non-finite %s after %d updates: rolled back to %s", what, self.updates, ckpt.path
        )

    # ------------------------------------------------------------ persistence
    def checkpoint(self) -> Path | None:
        """Save (atomically) unless a checkpoint of these very updates is already there:
        rewriting the same ``ckpt_<updates>`` would delete it before the new one lands."""
        if self.checkpointed_updates == self.updates:
            self.last_checkpoint = time.monotonic()
            return None
        bad = self.agent.nonfinite_tensors()
        if bad:  # a good checkpoint is never replaced by a diverged one
            self.last_checkpoint = time.monotonic()
            self.roll_back(f"weights to checkpoint ({', '.join(bad[:3])})")
            return None
        self.updater.sync_to_agent()  # a LearnerStep's optimiser state into the agent
        path = save_checkpoint(
            self.run_dir / "checkpoints",
            self.updates,
            self.agent,
            meta=self.meta,
            train_tensors={"rng.torch_global": torch.get_rng_state()},
            train_json={
                "policy_version": self.policy_version,
                "updates": self.updates,
                "online": True,
            },
            keep=self.cfg.train.keep_checkpoints,
        )
        self.last_checkpoint = time.monotonic()
        self.checkpointed_updates = self.updates
        return path

    def _run_gaps(self, actor_id: int, state: Any) -> int:
        """Seqs missing in the actor's current run: from the ``first_seq`` its heartbeats
        report; before its first heartbeat, from its newest committed interval."""
        first = getattr(state, "last_heartbeat", {}).get("first_seq")
        if not isinstance(first, int) or isinstance(first, bool):
            ivs = self.seq.intervals.get(actor_id)
            first = ivs[-1][0] if ivs else None
        return self.seq.gaps(actor_id, since=first)

    def status(self) -> dict[str, Any]:
        link = self.link.stats() if hasattr(self.link, "stats") else {}
        return {
            "rows": len(self.store),
            "updates": self.updates,
            "policy_version": self.policy_version,
            **self.counters,
            "store_healthy": self.store_healthy,
            "training_paused": self.training_paused,
            "actors_live": len(getattr(self.link, "actors", lambda: {})()),
            "truncated_episodes": len(self.truncated_episodes),
            "actors": {
                str(a): {"rows": s.rows, "gaps": self._run_gaps(a, s)}
                for a, s in getattr(self.link, "actors", lambda: {})().items()
            },
            "rejected_messages": link.get("rejected", 0),
            "torch_threads": torch.get_num_threads(),
            **self.last_metrics,
        }

    def forget_actors_gone_since_restart(self) -> list[int]:
        """Actors with an open episode in the committed record that this learner's link has
        not heard from: the link only declares dead the actors it has seen, so an actor that
        died while the learner was down would keep its episode open for ever (reliability.md
        #2). Called once, a heartbeat liveness period after start-up; returns their ids."""
        live: dict[int, Any] = getattr(self.link, "actors", lambda: {})()
        gone = sorted(int(a) for a in self.last_batch if int(a) not in live)
        if gone:
            log.warning("actors %s did not come back after the learner restarted", gone)
            self.forget_dead_actors(gone)
        return gone

    def run(self, max_seconds: float = 0.0, status_interval_s: float = 5.0) -> None:
        t_end = time.monotonic() + max_seconds if max_seconds > 0 else float("inf")
        next_status = time.monotonic() + status_interval_s
        liveness_s = getattr(self.link, "heartbeat_liveness_s", None)
        orphan_check = time.monotonic() + liveness_s if liveness_s else float("inf")
        self.publish()  # actors start on the learner's current weights
        while not self.stop_requested and time.monotonic() < t_end:
            busy = self.updates_owed_now()
            batches = self.link.poll(timeout_ms=0 if busy else 20)
            if batches:
                self.ingest(batches)
            elif not self.store_healthy:
                time.sleep(0.05)
                if self._meta_dirty:
                    self._commit_meta_only()
            # right after the poll: a long train() or checkpoint leaves heartbeats queued
            # in the socket, and a check after it would declare their actors dead
            dead = self.link.dead_actors() if hasattr(self.link, "dead_actors") else []
            if dead or (self._meta_dirty and self.store_healthy):
                self.forget_dead_actors(dead)
            self.train()
            now = time.monotonic()
            if now >= orphan_check:
                orphan_check = float("inf")
                self.forget_actors_gone_since_restart()
            if now - self.last_checkpoint >= self.cfg.online.checkpoint_interval_s:
                self.checkpoint()
            if now >= next_status:
                print(json.dumps({"learner": self.status()}), flush=True)
                next_status = now + status_interval_s

    def updates_owed_now(self) -> bool:
        return len(self.store) >= self.cfg.online.warmup_transitions and self.owed_updates >= 1


def _open_or_create_store(
    path: str, obs_dim: int, act_dim: int, attrs: dict[str, Any]
) -> ReplayStore:
    from idql_runtime.replay import is_replay_store

    if is_replay_store(path):
        store = ReplayStore.open(path, mode="a")
        if (store.obs_dim, store.act_dim) != (obs_dim, act_dim):
            raise ValueError(
                f"replay store {path} has obs/act dims {(store.obs_dim, store.act_dim)}, "
                f"the checkpoint {(obs_dim, act_dim)}"
            )
        return store
    return ReplayStore.create(path, obs_dim, act_dim, attrs=attrs)


class LearnerStartupError(Exception):
    """``idql-learner --pretrained`` cannot start with these inputs (a replay store of other
    dims, no --replay, an unreadable offline dataset): exit status 2, the message says why.
    Only start-up raises it, so an error of the running loop keeps its traceback."""


def run_online_learner(args: Namespace) -> int:
    """Entry point of ``idql-learner --pretrained``; resumes from ``--run-dir`` if it has
    online checkpoints (store + checkpoint + optimiser state + sequence table)."""
    return run_started_learner(start_online_learner(args), args)


def run_started_learner(learner: OnlineLearner, args: Namespace) -> int:
    """Run a learner from ``start_online_learner`` until ``--max-seconds`` or a signal;
    checkpoint it (store healthy), print the final status and close it, whatever ends it.
    Errors of the run propagate with their traceback (not start-up refusals)."""

    def _stop(_signum: int) -> None:
        learner.stop_requested = True

    # the caller's handlers come back afterwards (idql_runtime.signals)
    with stop_on_signals(_stop, process="idql-learner", what="checkpointing and stopping"):
        try:
            learner.run(args.max_seconds, getattr(args, "status_interval_s", 5.0))
        finally:
            try:
                if learner.store_healthy:
                    learner.checkpoint()
                print(json.dumps({"learner_final": learner.status()}), flush=True)
            finally:  # a failed last checkpoint still closes the sockets and the store
                learner.link.close()
                learner.store.close()
    return 0


def start_online_learner(args: Namespace) -> OnlineLearner:
    """The OnlineLearner of ``idql-learner --pretrained``'s arguments, its store and link
    open; bad inputs raise LearnerStartupError (ConfigError, the security checks'
    errors, CheckpointError, StoreLockedError and FileNotFoundError as themselves),
    with nothing left open."""
    from idql_runtime.transport import BindError, InsecureBindError

    try:
        return _start_online_learner(args)
    except (ConfigError, InsecureBindError):  # ValueErrors with their own report
        raise
    except (ValueError, FileExistsError, BindError) as e:
        raise LearnerStartupError(str(e)) from e


def _start_online_learner(args: Namespace) -> OnlineLearner:
    from idql_runtime.transport import (
        check_bind_address,
        curve_from_dir,
        load_secret_key,
    )

    # Refuse an exposed bind or a readable key (reliability.md #12, #13) before touching
    # checkpoints or the store.
    curve = curve_from_dir(args.curve_dir, "server") if args.curve_dir else None
    if curve is not None:
        load_secret_key(curve.secret_key_file)
    for endpoint in (args.bind_ingest, args.bind_weights):
        check_bind_address(endpoint, insecure=args.insecure, curve=curve)
    run_dir = Path(args.run_dir)
    resumed = False
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").glob("ckpt_*")):
        try:
            ckpt = load_checkpoint(run_dir / "checkpoints")
            resumed = True
        except CheckpointError as e:  # the store and its sequence table still hold the data
            log.error("no valid checkpoint in %s (%s); starting from --pretrained", run_dir, e)
    if not resumed:
        ckpt = load_checkpoint(args.pretrained)
    cfg_flat = {**_flat(ckpt.meta["config"]), **parse_overrides(args.set)}
    cfg = config_from_flat(cfg_flat)
    # --set may retune the run (rates, losses, online.*) but not what the weights were
    # built with: a checkpoint written with another network.hidden_dim would not load
    check_fixed_by_checkpoint(ckpt.config, cfg, what="--set", fixed=ONLINE_FIXED)
    if cfg.train.threads:
        # before any torch work: on a machine shared with actors, the learner's OpenMP
        # team is what takes their cores (train.threads was honoured offline only)
        torch.set_num_threads(cfg.train.threads)
    agent = restore_agent(ckpt, args.device, optimisers=True)
    agent.cfg = cfg
    agent.apply_optimiser_config()  # --set train.critic_lr etc. act, not only get recorded
    tj = ckpt.meta.get("train_json", {}) if resumed else {}
    if resumed and "rng.torch_global" in ckpt.train_tensors:
        torch.set_rng_state(ckpt.train_tensors["rng.torch_global"])
    transform = RewardTransform.from_dict(ckpt.meta["reward_transform"])
    meta = {
        k: v
        for k, v in ckpt.meta.items()
        if k in ("env_id", "reward_transform", "ref_scores", "spaces", "dataset")
    }
    if not args.replay:
        raise LearnerStartupError("--pretrained needs --replay STORE")
    store = _open_or_create_store(
        args.replay,
        agent.obs_dim,
        agent.act_dim,
        {"env_id": meta.get("env_id"), "source": "online"},
    )
    try:
        return _online_learner_on(
            args, cfg, agent, store, ckpt, meta, transform, tj, resumed, curve
        )
    except BaseException:
        store.close()  # its writer lock, for the next start
        raise


def _online_learner_on(
    args: Namespace,
    cfg: Config,
    agent: Agent,
    store: ReplayStore,
    ckpt: Any,
    meta: dict[str, Any],
    transform: RewardTransform,
    tj: dict[str, Any],
    resumed: bool,
    curve: Any,
) -> OnlineLearner:
    """The rest of start-up, on an open store (closed by the caller if this raises)."""
    from idql_runtime.transport import LearnerLink

    offline = None
    if args.offline:
        from idql_runtime.datasets import open_dataset

        try:
            offline_store = open_dataset(args.offline)
        except (OSError, ValueError) as e:  # missing, unreadable or malformed: refuse it
            raise LearnerStartupError(f"--offline {args.offline}: {e}") from e
        offline = ReplaySampler(offline_store, seed=cfg.train.seed)
        if cfg.train.val_fraction > 0:  # the rows pretraining held out stay held out
            offline = offline.split(1.0 - cfg.train.val_fraction, seed=cfg.train.seed)[0]
    link = LearnerLink(
        args.bind_ingest,
        args.bind_weights,
        curve=curve,
        insecure=args.insecure,
        heartbeat_liveness_s=args.heartbeat_liveness_s,
        actor_keys=store.commit_meta.get("actor_keys") if curve is not None else None,
    )
    try:
        learner = OnlineLearner(
            cfg,
            agent,
            store,
            offline,
            link,
            Path(args.run_dir),
            transform,
            meta=meta,
            policy_version=int(tj.get("policy_version", 0)),
            updates=int(tj.get("updates", 0)),
            seed=cfg.train.seed,
            rollback_from=args.pretrained,
        )
    except BaseException:
        link.close()
        raise
    if resumed:
        learner.checkpointed_updates = learner.updates
    log.info(
        "learner %s from %s: %d rows in %s, policy version %d, ingest %s, weights %s, "
        "torch threads %d",
        "resumed" if resumed else "started",
        ckpt.path,
        len(store),
        args.replay,
        learner.policy_version,
        link.ingest_endpoint,
        link.weights_endpoint,
        torch.get_num_threads(),
    )
    return learner


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
