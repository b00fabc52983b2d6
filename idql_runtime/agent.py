"""IDQL agent: parameters, optimisers and the update steps.

``Agent.create`` is the one place hyperparameters enter. One offline iteration is
actor -> V -> Q (+ target-Q EMA), all on the same batch (idql-reference.md s3, s5);
online finetuning runs V -> Q only (``critic_update``), or all three with
``online.finetune_actor``. Each step returns a dict of float metrics.

Baselines on the same critic (``train.algo``): ``iql_awr`` extracts a Gaussian policy by
advantage-weighted regression (paper Eq. 3), ``bc`` fits the same Gaussian by maximum
likelihood. Both act with the Gaussian mean.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from idql_runtime.config import Config
from idql_runtime.critic import q_loss, value_loss
from idql_runtime.decision import Decision
from idql_runtime.diffusion import Schedule, ddpm_loss
from idql_runtime.networks import GaussianPolicy, QEnsemble, ScoreNetwork, ValueNetwork

Batch = dict[str, Tensor]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, rate: float) -> None:
    """target <- rate * online + (1 - rate) * target (optax.incremental_update)."""
    for pt, po in zip(target.parameters(), online.parameters(), strict=True):
        pt.lerp_(po, rate)


class Agent(nn.Module):
    """All networks of one IDQL run (plus the Gaussian policy of the baselines)."""

    def __init__(self, cfg: Config, obs_dim: int, act_dim: int, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg, self.obs_dim, self.act_dim = cfg, obs_dim, act_dim
        self.schedule = Schedule.make(cfg.diffusion.beta_schedule, cfg.diffusion.steps)
        self.score = ScoreNetwork(obs_dim, act_dim, cfg.network)
        self.score_ema = copy.deepcopy(self.score).eval().requires_grad_(False)
        self.q = QEnsemble(obs_dim, act_dim, cfg.critic)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.v = ValueNetwork(obs_dim, cfg.critic)
        self.gaussian: GaussianPolicy | None = None
        if cfg.train.algo != "idql":
            self.gaussian = GaussianPolicy(obs_dim, act_dim, cfg.critic.hidden)
        self.to(device)
        self.device = torch.device(device)
        self._make_optimisers()

    def _make_optimisers(self) -> None:
        t = self.cfg.train
        actor_params = (
            self.score.parameters() if self.gaussian is None else self.gaussian.parameters()
        )
        # fused: one kernel per optimiser step instead of ~10 ops per parameter tensor
        # (the CPU's AdamW step over the 1.8M-parameter score network: 0.46 vs 1.63 ms,
        # benchmarks/onednn_learner.py); the same Adam arithmetic.
        fused = self.device.type in ("cpu", "cuda")
        self.actor_opt = torch.optim.AdamW(
            actor_params,
            lr=t.actor_lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=t.actor_weight_decay,
            fused=fused,
        )
        decay = max(t.lr_decay_steps, 1)
        # optax.cosine_decay_schedule(lr, decay): lr * 0.5 (1 + cos(pi min(k, decay) / decay))
        self.actor_sched = torch.optim.lr_scheduler.LambdaLR(
            self.actor_opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, decay) / decay))
        )
        self.v_opt = torch.optim.Adam(self.v.parameters(), lr=t.critic_lr, eps=1e-8, fused=fused)
        self.q_opt = torch.optim.Adam(self.q.parameters(), lr=t.critic_lr, eps=1e-8, fused=fused)

    def apply_optimiser_config(self) -> None:
        """Make the optimisers follow ``cfg.train`` (learning rates, the actor's weight decay
        and cosine horizon), keeping their moments and step counts.

        A restored agent's optimisers carry the learning rates saved with the checkpoint;
        a learner that resumes with ``--set train.critic_lr=...`` must train at the new
        rate, not record it in its config while using the old one. The actor's LR stays at
        its cosine position: lr = actor_lr * cos_decay(k), k the scheduler's step count.
        """
        t = self.cfg.train
        for opt in (self.v_opt, self.q_opt):
            for group in opt.param_groups:
                group["lr"] = t.critic_lr
        decay = max(t.lr_decay_steps, 1)

        def cosine(k: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(k, decay) / decay))

        sched = self.actor_sched
        sched.lr_lambdas = [cosine]
        sched.base_lrs = [t.actor_lr]
        for group in self.actor_opt.param_groups:
            group["initial_lr"] = t.actor_lr
            group["weight_decay"] = t.actor_weight_decay
            group["lr"] = t.actor_lr * cosine(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.actor_opt.param_groups]  # get_last_lr()

    def optimisers(self) -> dict[str, Any]:
        return {
            "actor": self.actor_opt,
            "actor_sched": self.actor_sched,
            "v": self.v_opt,
            "q": self.q_opt,
        }

    # ---------------------------------------------------------------- updates
    def actor_step(
        self, batch: Batch, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        t = self.cfg.train
        if self.gaussian is not None:
            return self._gaussian_step(batch)
        self.score.train()
        loss = ddpm_loss(self.score, batch["obs"], batch["action"], self.schedule, generator)
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        self.actor_sched.step()
        ema_update(self.score_ema, self.score, t.actor_ema)
        if t.v1_double_actor_step:
            # v1 bug (idql-reference.md s10.1): an Adam step on an empty batch = zero grads
            # (momentum still moves the weights), the LR counter advances, a second EMA.
            for p in self.score.parameters():
                p.grad = torch.zeros_like(p)
            self.actor_opt.step()
            self.actor_sched.step()
            ema_update(self.score_ema, self.score, t.actor_ema)
        return {
            "actor_loss": float(loss.detach()),
            "actor_lr": float(self.actor_sched.get_last_lr()[0]),
        }

    def _gaussian_step(self, batch: Batch) -> dict[str, float]:
        assert self.gaussian is not None
        t = self.cfg.train
        obs, act = batch["obs"], batch["action"]
        if t.algo == "iql_awr":
            with torch.no_grad():
                adv = self.q_target(obs, act).amin(0) - self.v(obs)
                weights = torch.exp(t.awr_temperature * adv).clamp(max=t.awr_max_weight)
        else:
            weights = torch.ones(obs.shape[0], device=obs.device)
        loss = -(weights * self.gaussian.log_prob(obs, act)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        self.actor_sched.step()
        return {
            "actor_loss": float(loss.detach()),
            "actor_lr": float(self.actor_sched.get_last_lr()[0]),
        }

    def value_step(self, batch: Batch) -> dict[str, float]:
        c = self.cfg.critic
        with torch.no_grad():
            q = self.q_target(batch["obs"], batch["action"]).amin(0)
        u = q - self.v(batch["obs"])
        loss = value_loss(u, c.value_loss, c.tau, c.alpha, c.exp_clip)
        self.v_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.v_opt.step()
        return {"v_loss": float(loss.detach()), "v_mean": float(q.mean() - u.detach().mean())}

    def q_step(self, batch: Batch) -> dict[str, float]:
        c = self.cfg.critic
        with torch.no_grad():
            mask = 1.0 - batch["terminated"].to(batch["reward"].dtype)
            target = batch["reward"] + c.discount * mask * self.v(batch["next_obs"])
        pred = self.q(batch["obs"], batch["action"])
        loss = q_loss(pred, target)
        self.q_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.q_opt.step()
        ema_update(self.q_target, self.q, c.target_ema)
        return {"q_loss": float(loss.detach()), "q_mean": float(pred.detach().mean())}

    def critic_update(self, batch: Batch) -> dict[str, float]:
        """V then Q (used online, and by ``update`` after the actor step)."""
        rows = self.cfg.train.critic_batch_rows
        if rows is not None:
            batch = {k: v[:rows] for k, v in batch.items()}
        return {**self.value_step(batch), **self.q_step(batch)}

    def update(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, float]:
        """One offline iteration: actor -> V -> Q on the same batch."""
        return {**self.actor_step(batch, generator), **self.critic_update(batch)}

    @torch.no_grad()
    def td_error(self, batch: Batch) -> float:
        """Mean squared TD error of the online Q ensemble against r + gamma * mask * V(s')."""
        mask = 1.0 - batch["terminated"].to(batch["reward"].dtype)
        y = batch["reward"] + self.cfg.critic.discount * mask * self.v(batch["next_obs"])
        return float(q_loss(self.q(batch["obs"], batch["action"]), y))

    # ---------------------------------------------------------------- acting
    def decision(self, mode: str | None = None) -> Decision:
        """The decision module over the EMA score network, target Q and V (eval mode).

        Refused for the Gaussian baselines: they train no diffusion model (its EMA keeps
        its random initial weights) and act with the Gaussian mean (``evaluation.Policy``).
        """
        c = self.cfg
        if self.gaussian is not None:
            raise ValueError(
                f"train.algo={c.train.algo!r} is a Gaussian baseline: it trains no diffusion "
                "model, so there is no diffusion decision to build an engine of; evaluate it "
                "with idql-eval (it acts with the Gaussian mean)"
            )
        return Decision(
            self.score_ema,
            self.q_target,
            self.v,
            self.schedule,
            mode=mode or c.policy.mode,
            value_loss=c.critic.value_loss,
            tau=c.critic.tau,
            alpha=c.critic.alpha,
            temperature=c.diffusion.temperature,
            clip=c.diffusion.clip_sampler,
            extra_final_steps=c.diffusion.extra_final_steps,
        ).eval()

    # ---------------------------------------------------------------- weights
    def nonfinite_tensors(self) -> list[str]:
        """Names of the parameters and buffers holding NaN or inf (one device sync)."""
        named = [(k, v) for k, v in self.state_dict().items() if v.is_floating_point()]
        if not named:
            return []
        ok = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu()
        return [k for (k, _), good in zip(named, ok.tolist(), strict=True) if not good]

    def inference_state(self) -> dict[str, Tensor]:
        """The tensors an actor needs (what checkpoints deploy and the learner broadcasts)."""
        out = {f"score_ema.{k}": v for k, v in self.score_ema.state_dict().items()}
        out.update({f"q_target.{k}": v for k, v in self.q_target.state_dict().items()})
        out.update({f"v.{k}": v for k, v in self.v.state_dict().items()})
        if self.gaussian is not None:
            out.update({f"gaussian.{k}": v for k, v in self.gaussian.state_dict().items()})
        return out

    def load_inference_state(self, tensors: dict[str, Tensor], strict: bool = True) -> None:
        """Load ``inference_state`` tensors (all of them, or only some groups with
        ``strict=False``). Everything is validated before anything is copied, so a bad
        update (unknown key, wrong shape, NaN/inf) raises ValueError naming the tensor and
        leaves the current weights untouched (reliability.md #10)."""
        groups: dict[str, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            head, _, rest = k.partition(".")
            groups.setdefault(head, {})[rest] = v
        for name in groups:
            if (
                name not in ("score_ema", "q_target", "v", "gaussian")
                or getattr(self, name) is None
            ):
                raise ValueError(f"unexpected weight group {name!r}")
        if strict:
            for name in ("score_ema", "q_target", "v"):
                if name not in groups:
                    raise ValueError(f"weights are missing the {name!r} group")
        for name, group in groups.items():
            own = getattr(self, name).state_dict()
            missing = set(own) - set(group)
            if missing:
                raise ValueError(f"weights for {name!r} miss {sorted(missing)[:3]}")
            for k, v in group.items():
                if k not in own:
                    raise ValueError(f"unexpected tensor {name}.{k}")
                if tuple(own[k].shape) != tuple(v.shape):
                    raise ValueError(
                        f"tensor {name}.{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                    )
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise ValueError(f"tensor {name}.{k} has non-finite values")
        with torch.no_grad():
            for name, group in groups.items():
                own = getattr(self, name).state_dict()
                for k, v in group.items():
                    own[k].copy_(v.to(own[k].device, own[k].dtype))


def to_tensors(batch: dict[str, Any], device: torch.device | str = "cpu") -> Batch:
    """numpy batch -> float32 tensors (bool flags kept as bool)."""
    out: Batch = {}
    for k in ("obs", "action", "reward", "next_obs", "terminated"):
        v = torch.as_tensor(batch[k], device=device)
        out[k] = v if v.dtype == torch.bool else v.to(torch.float32)
    return out
