"""Offline pretraining loop: sample, update, log, evaluate, checkpoint, resume exactly.

Exact resume: a checkpoint holds the networks, optimiser moments, LR-schedule counter,
the torch global RNG (dropout), the loss-noise generator, the batch sampler's numpy RNG
and the device batch generator (``train.batch_source``, ``batches.py``), so iteration
k+1.. after ``--resume`` computes the same losses as an uninterrupted run with the same
seed (tests/test_trainer.py checks this).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idql_runtime.agent import Agent
from idql_runtime.batches import (
    DeviceBatches,
    prepare_batch,
    resident_bytes,
    resolve_batch_source,
)
from idql_runtime.checkpoint import load_checkpoint, restore_agent, save_checkpoint
from idql_runtime.config import Config, changed_fields, check_fixed_by_checkpoint
from idql_runtime.engines.learner_step import AgentUpdate, LearnerStep
from idql_runtime.envs import RewardTransform, reference_scores
from idql_runtime.evaluation import Policy, evaluate
from idql_runtime.replay import ReplaySampler, ReplayStore

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss or a weight became NaN/inf: the run stops before it checkpoints the damage."""


def fit_reward_transform(store: ReplayStore, kind: str) -> RewardTransform:
    n = len(store)
    reward = store.read(0, n, keys=["reward"])["reward"]
    return RewardTransform.fit(kind, np.asarray(reward, dtype=np.float64), store.episode_ends())


def _batch_seed(seed: int, *more: int) -> int:
    """The device batch generator's seed: a stream of its own, apart from the loss noise's."""
    return int(np.random.SeedSequence([seed, 1, *more]).generate_state(1)[0])


def _sampler_rng(sampler: Any) -> np.random.Generator:
    return getattr(sampler, "rng", None) or sampler._rng  # type: ignore[no-any-return]


class OfflineTrainer:
    """Owns the agent, data and bookkeeping of one offline run in ``run_dir``."""

    def __init__(
        self,
        cfg: Config,
        store: ReplayStore,
        run_dir: str | os.PathLike[str],
        *,
        device: str = "cpu",
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.cfg, self.store, self.run_dir = cfg, store, Path(run_dir)
        self.device = torch.device(device)
        self.progress, self.use_tb = progress, tensorboard
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed)
        if len(store) < 2:
            raise ValueError(f"dataset {store} has {len(store)} rows; need at least 2")
        full = ReplaySampler(store, seed=t.seed)
        self.train_sampler: ReplaySampler
        self.val_sampler: ReplaySampler | None
        if t.val_fraction > 0:
            self.train_sampler, self.val_sampler = full.split(1.0 - t.val_fraction, seed=t.seed)
        else:
            self.train_sampler, self.val_sampler = full, None
        self.env_id = cfg.env_id or store.attrs.get("env_id")
        if self.env_id and t.eval_interval:
            self._check_eval_env(self.env_id, store.obs_dim, store.act_dim)
        self.ref = reference_scores(self.env_id, store.attrs)
        self.transform = fit_reward_transform(store, t.reward_transform)
        self.agent = Agent(cfg, store.obs_dim, store.act_dim, device=self.device)
        self.updater = self._updater()
        # Device batches: a generator of their own (not the loss noise's stream), seeded
        # apart from it; the rows are copied on the first draw (after a resume).
        self.batch_generator = torch.Generator(device=self.device).manual_seed(_batch_seed(t.seed))
        nbytes = resident_bytes(len(self.train_sampler), store.obs_dim, store.act_dim)
        self.batch_source, why = resolve_batch_source(t.batch_source, self.device, nbytes)
        log.info("training batches: %s", why)
        self.device_batches: DeviceBatches | None = None
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.stop_requested = False
        """Set (e.g. by a signal handler) to end ``run`` after the current iteration, with
        a checkpoint of it: a preempted or interrupted run loses nothing."""

    def _check_eval_env(self, env_id: str, obs_dim: int, act_dim: int) -> None:
        """ValueError now, not at the first evaluation round (250k iterations in by
        default), when the evaluation env cannot be made (a D4RL file's env name that
        gymnasium does not know) or is another task's."""
        from idql_runtime.envs import check_env_id_fits

        source = "env_id" if self.cfg.env_id else "the dataset's env_id"
        try:
            check_env_id_fits(env_id, obs_dim, act_dim, against="the dataset's rows", hint="")
        except ValueError as e:
            raise ValueError(
                f"evaluation env ({source} {env_id!r}): {e}; pass --set "
                "env_id=<a gymnasium id of this task> or --set train.eval_interval=0"
            ) from e

    # ------------------------------------------------------------- state
    def meta(self) -> dict[str, Any]:
        return {
            "env_id": self.env_id,
            "reward_transform": self.transform.to_dict(),
            "ref_scores": list(self.ref) if self.ref else None,
            "dataset": {
                "path": str(getattr(self.store, "path", "")),
                "rows": len(self.store),
                "attrs": self.store.attrs,
            },
            "spaces": {
                "obs_shape": [self.store.obs_dim],
                "act_shape": [self.store.act_dim],
                "act_low": [-1.0] * self.store.act_dim,
                "act_high": [1.0] * self.store.act_dim,
            },
        }

    def save(self) -> Path:
        bad = self.agent.nonfinite_tensors()
        if bad:  # the newest good checkpoint stays the newest
            raise TrainingDiverged(
                f"non-finite weights at iteration {self.iteration} ({', '.join(bad[:3])}); "
                f"not checkpointed: resume from the newest checkpoint in "
                f"{self.run_dir / 'checkpoints'} with a lower learning rate"
            )
        self.updater.sync_to_agent()  # a LearnerStep's moments, step counts, LR position
        tensors = {
            "rng.torch_global": torch.get_rng_state(),
            "rng.loss_generator": self.generator.get_state(),
            "rng.batch_generator": self.batch_generator.get_state(),
        }
        train_json = {
            "train_sampler_rng": _sampler_rng(self.train_sampler).bit_generator.state,
            "val_sampler_rng": (
                _sampler_rng(self.val_sampler).bit_generator.state if self.val_sampler else None
            ),
        }
        return save_checkpoint(
            self.run_dir / "checkpoints",
            self.iteration,
            self.agent,
            meta=self.meta(),
            train_tensors=tensors,
            train_json=train_json,
            keep=self.cfg.train.keep_checkpoints,
        )

    def resume(self) -> bool:
        """Load the newest valid checkpoint of this run; False if there is none.

        The run goes on with ``self.cfg`` (see ``config.resume_config`` for how the CLI
        builds it): learning rates, iterations and losses may change; a field of
        ``config.FIXED_BY_CHECKPOINT`` that differs from the checkpoint's raises
        ConfigError, before anything is restored."""
        root = self.run_dir / "checkpoints"
        if not root.exists() or not any(root.glob("ckpt_*")):
            return False
        ckpt = load_checkpoint(root)
        # This run's config goes on (it is what the checkpoints written from now on
        # record), except where it contradicts the weights, the split or the reward scale.
        check_fixed_by_checkpoint(ckpt.config, self.cfg, what="the resumed run's config")
        changed = changed_fields(ckpt.config, self.cfg)
        self.agent = restore_agent(ckpt, self.device)
        self.agent.cfg = self.cfg
        self.agent.apply_optimiser_config()  # a changed train.critic_lr etc. acts
        self.updater = self._updater()  # on the restored agent and its optimiser state
        self.iteration = ckpt.iteration
        self.transform = RewardTransform.from_dict(ckpt.meta["reward_transform"])
        torch.set_rng_state(ckpt.train_tensors["rng.torch_global"])
        self.generator.set_state(ckpt.train_tensors["rng.loss_generator"])
        if "rng.batch_generator" in ckpt.train_tensors:
            self.batch_generator.set_state(ckpt.train_tensors["rng.batch_generator"])
        else:  # a checkpoint from before device batches: do not replay the first draws
            self.batch_generator.manual_seed(_batch_seed(self.cfg.train.seed, ckpt.iteration))
        self.device_batches = None  # rebuilt with the restored reward transform
        tj = ckpt.meta["train_json"]
        _sampler_rng(self.train_sampler).bit_generator.state = tj["train_sampler_rng"]
        if self.val_sampler and tj.get("val_sampler_rng"):
            _sampler_rng(self.val_sampler).bit_generator.state = tj["val_sampler_rng"]
        log.info("resumed from %s at iteration %d", ckpt.path, self.iteration)
        if changed:
            log.info(
                "resumed with changed fields: %s",
                ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changed),
            )
        return True

    # ------------------------------------------------------------- loop
    def _updater(self) -> AgentUpdate:
        t = self.cfg.train
        return AgentUpdate(self.agent, t.batch_size, generator=self.generator, train=t)

    @property
    def learner_step(self) -> LearnerStep | None:
        """The fast update step in use (None: ``Agent.update``, the reference)."""
        return self.updater.step

    def step(self) -> dict[str, float]:
        """One iteration: sample a batch, update actor -> V -> Q."""
        return self.updater.floats(self._update())

    def _update(self) -> dict[str, float] | torch.Tensor:
        """One iteration; a LearnerStep's metrics stay a device tensor (no host sync)."""
        metrics = self.updater.update(self._train_batch())
        self.iteration += 1
        return metrics

    def _train_batch(self) -> dict[str, torch.Tensor]:
        t = self.cfg.train
        if self.batch_source == "host":
            return prepare_batch(
                self.train_sampler.sample(t.batch_size), self.transform, t.action_clip, self.device
            )
        if self.device_batches is None:
            try:
                self.device_batches = DeviceBatches(
                    self.train_sampler,
                    self.transform,
                    t.action_clip,
                    self.device,
                    self.batch_generator,
                )
            except torch.OutOfMemoryError:
                if t.batch_source != "auto":
                    raise
                log.warning("training rows do not fit on %s: host batches", self.device)
                self.batch_source = "host"
                return self._train_batch()
            log.info(
                "%d training rows resident on %s (%.1f MiB)",
                self.device_batches.rows,
                self.device,
                self.device_batches.nbytes / 2**20,
            )
        return self.device_batches.sample(t.batch_size, out=self.updater.batch_buffers())

    def validation_metrics(self, batch_size: int = 512) -> dict[str, float]:
        """Losses on held-out rows without updating anything (no RNG of training is used)."""
        if self.val_sampler is None:
            return {}
        t = self.cfg.train
        rng_state = _sampler_rng(self.val_sampler).bit_generator.state
        batch = prepare_batch(
            self.val_sampler.sample(batch_size), self.transform, t.action_clip, self.device
        )
        _sampler_rng(self.val_sampler).bit_generator.state = rng_state
        from idql_runtime.diffusion import ddpm_loss

        gen = torch.Generator(device=self.device).manual_seed(12345)
        with torch.no_grad():
            self.agent.score_ema.eval()
            actor = float(
                ddpm_loss(
                    self.agent.score_ema, batch["obs"], batch["action"], self.agent.schedule, gen
                )
            )
        return {"val_actor_loss": actor, "val_td_error": self.agent.td_error(batch)}

    def evaluate_now(self, episodes: int | None = None) -> dict[str, Any]:
        t = self.cfg.train
        if not self.env_id:
            return {}
        out: dict[str, Any] = {}
        samples = t.eval_samples if self.agent.gaussian is None else [1]
        for n in samples:
            pol = Policy(self.agent, samples=n, seed=t.seed + self.iteration)
            res = evaluate(
                pol,
                self.env_id,
                episodes or t.eval_episodes,
                seed=t.seed + 10_000,
                ref=self.ref,
                should_stop=lambda: self.stop_requested,
            )
            out[f"N{n}"] = res.summary()
            if res.interrupted:  # a stop request: the rest of the round is not run
                break
        return out

    def run(self, iterations: int | None = None) -> dict[str, Any]:
        t = self.cfg.train
        total = t.iterations if iterations is None else iterations
        writer = None
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tb"))
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            initial=self.iteration,
            disable=not self.progress,
            desc="pretrain",
            unit="it",
            dynamic_ncols=True,
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.run_dir / "metrics.jsonl", "a")
        t0, it0 = time.perf_counter(), self.iteration
        try:
            while self.iteration < total and not self.stop_requested:
                raw = self._update()
                bar.update(1)
                if self.iteration % t.log_interval == 0 or self.iteration == total:
                    m = self.updater.floats(raw)
                    bad = [k for k, v in m.items() if not math.isfinite(v)]
                    if bad:
                        raise TrainingDiverged(
                            f"{bad[0]} = {m[bad[0]]} at iteration {self.iteration}; stopped "
                            f"before checkpointing it (newest good checkpoint in "
                            f"{self.run_dir / 'checkpoints'})"
                        )
                    elapsed = time.perf_counter() - t0
                    m["its_per_s"] = (self.iteration - it0) / max(elapsed, 1e-9)
                    m.update(self.validation_metrics())
                    m["iteration"] = self.iteration
                    self.history.append(m)
                    log_file.write(json.dumps(m) + "\n")
                    log_file.flush()
                    bar.set_postfix(
                        actor=f"{m['actor_loss']:.3f}",
                        q=f"{m['q_loss']:.3f}",
                        v=f"{m['v_loss']:.3f}",
                    )
                    if writer:
                        for k, v in m.items():
                            writer.add_scalar(f"train/{k}", v, self.iteration)
                if t.eval_interval and self.iteration % t.eval_interval == 0:
                    ev = self.evaluate_now()
                    log_file.write(json.dumps({"iteration": self.iteration, "eval": ev}) + "\n")
                    for key, s in ev.items():
                        if s["interrupted"]:  # a part of a round: not a point on the curve
                            bar.write(
                                f"[eval it={self.iteration}] {key}: interrupted after "
                                f"{s['episodes']} of {t.eval_episodes} episodes"
                            )
                            continue
                        if writer:
                            writer.add_scalar(
                                f"eval/{key}/return", s["return_mean"], self.iteration
                            )
                            if "normalized_mean" in s:
                                writer.add_scalar(
                                    f"eval/{key}/normalized", s["normalized_mean"], self.iteration
                                )
                        bar.write(
                            f"[eval it={self.iteration}] {key}: return {s['return_mean']:.1f}"
                            + (
                                f", normalized {s['normalized_mean']:.1f}"
                                if "normalized_mean" in s
                                else ""
                            )
                        )
                if self.iteration % t.checkpoint_interval == 0:
                    self.save()
            if not list((self.run_dir / "checkpoints").glob(f"ckpt_{self.iteration:09d}")):
                self.save()
        finally:
            bar.close()
            log_file.close()
            if writer:
                writer.close()
        return {
            "iteration": self.iteration,
            "history": self.history,
            "stopped_early": self.iteration < total,
        }
