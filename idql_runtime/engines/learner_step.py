"""A fast offline learner iteration: actor -> V -> Q (+ EMAs) as one replayable step.

``Agent.update`` is the reference: three torch.optim optimisers, an LR scheduler, a
Python float per metric (a device sync each). ``LearnerStep`` computes the same iteration
(same losses from diffusion.py / critic.py, same Adam/AdamW arithmetic, the same random
numbers drawn from the same generator in the same order) with

- the optimiser updates written with ``torch._foreach_*`` ops and the step counts, the
  actor's cosine learning rate and the metrics kept as device tensors (no host syncs);
- backend "cuda_graph": the whole iteration (forward, ``autograd.grad``, three optimiser
  updates, two EMAs) captured once in a CUDA graph and replayed on static batch buffers;
- backend "compile": the three losses and the optimiser update ``torch.compile``d
  (works on the CPU too, for the offline trainer); "compile_cuda_graph" captures those
  compiled pieces in one CUDA graph;
- backend "eager": the same functional iteration, uncompiled (the parity bridge);
- ``actor=False``: V then Q only, ``Agent.critic_update`` (what the online learner runs
  unless it finetunes the behaviour model); no loss noise is drawn;
- ``generator``: the loss noise comes from the caller's generator (a trainer's, whose state
  its checkpoints keep, so a resumed run draws what an uninterrupted one would);
- ``overlap`` (CUDA): the actor's loss, gradient and AdamW + EMA update run on a second
  stream beside V's and Q's (they share no tensor but the read-only batch), so that in
  the graph they are two branches; the metrics join them. Off by default until measured
  on a GPU.

The diffusion loss's t and eps are drawn before the compiled/captured part, into static
buffers, from ``generator`` exactly as ``ddpm_loss`` draws them; dropout inside the
score network draws from torch's default generator (in-graph philox on the GPU), so runs
with dropout > 0 match ``Agent.update`` in distribution, not bit for bit.
``sync_to_agent`` writes the optimiser moments, step counts and scheduler position back
into the agent's optimisers, so checkpoints and ``Agent.update`` can carry on.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from idql_runtime.critic import q_loss, value_loss

log = logging.getLogger(__name__)

METRICS = ("actor_loss", "actor_lr", "v_loss", "v_mean", "q_loss", "q_mean")
CRITIC_METRICS = METRICS[2:]  # ``actor=False``: Agent.critic_update's V then Q
BACKENDS = ("eager", "compile", "cuda_graph", "compile_cuda_graph")
_BATCH_KEYS = ("obs", "action", "reward", "next_obs", "terminated")


def parse_backend_spec(text: str) -> dict[str, Any]:
    """``BACKEND[:tf32][:overlap]`` (idql-bench, gpu_profile) -> LearnerStep keywords."""
    name, *flags = (part.strip() for part in text.split(":"))
    unknown = sorted(set(flags) - {"tf32", "overlap"})
    if unknown:
        raise ValueError(
            f"learner backend {text!r}: unknown suffix {unknown[0]!r} (BACKEND[:tf32][:overlap])"
        )
    return {
        "backend": name,
        "matmul_precision": "high" if "tf32" in flags else "highest",
        "overlap": "overlap" in flags,
    }


def _same_device(a: Any, b: Any) -> bool:
    """Same device type and, where both name one, the same index ("cuda" is the current)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def learner_step_for(
    agent: Any,
    batch_size: int,
    *,
    actor: bool = True,
    generator: torch.Generator | None = None,
    train: Any = None,
) -> LearnerStep | None:
    """The update step ``train.learner_backend`` asks for in idql-learner (offline and
    online); None means ``Agent.update`` / ``Agent.critic_update`` (the reference).
    ``train`` is the run's current TrainConfig (default: the agent's): a resumed run may
    change how it computes, not what.

    ``auto``: ``cuda_graph`` on a CUDA device for IDQL, where it removes ~160 launches and
    every per-metric sync; the reference elsewhere: on the CPU ``Agent.update`` (oneDNN
    block products, fused Adam) is the fastest step measured, 31.7 ms per actor + V + Q
    iteration at batch 512 on the 2-core EPYC against 33.8 for the functional step (its
    foreach Adam is slower there) and 47.6 for ``compile``. The Gaussian baselines and the v1
    double-step bug run the reference under ``auto``; asked for by name, a fast backend
    refuses them with the reason.
    """
    t = train if train is not None else agent.cfg.train
    backend = asked = t.learner_backend
    if backend == "auto":
        what = agent.cfg.train
        supported = what.algo == "idql" and not what.v1_double_actor_step
        on_gpu = next(agent.parameters()).device.type == "cuda"
        backend = "cuda_graph" if supported and on_gpu else "reference"
    if backend == "reference":
        if t.tf32 and asked == "reference":
            raise ValueError(
                "train.tf32=true needs a LearnerStep backend; train.learner_backend=reference "
                "is Agent.update in float32"
            )
        if t.tf32:
            log.warning("train.tf32 has no effect: learner_backend=auto runs Agent.update here")
        return None
    return LearnerStep(
        agent,
        batch_size,
        backend=backend,
        matmul_precision="high" if t.tf32 else "highest",
        actor=actor,
        generator=generator,
    )


class AgentUpdate:
    """idql-learner's update (offline and online): the ``LearnerStep`` that
    ``train.learner_backend`` asks for, or the agent's reference update. The step is built
    on the first update, so it starts from a resumed agent's optimiser state.

    ``update(batch)`` returns a LearnerStep's metrics as a device tensor (no host sync per
    iteration) or the reference's floats; ``floats`` turns either into ``{name: float}``;
    ``sync_to_agent`` (before a checkpoint) writes a step's optimiser state into the agent.
    """

    def __init__(
        self,
        agent: Any,
        batch_size: int,
        *,
        actor: bool = True,
        generator: torch.Generator | None = None,
        train: Any = None,
    ) -> None:
        self.agent, self.batch_size, self.actor = agent, batch_size, actor
        self.generator, self.train = generator, train
        self._step: LearnerStep | None = None
        self._built = False

    @property
    def step(self) -> LearnerStep | None:
        """The LearnerStep in use, None for the reference (built here on first use)."""
        if not self._built:
            self._step = learner_step_for(
                self.agent,
                self.batch_size,
                actor=self.actor,
                generator=self.generator,
                train=self.train,
            )
            self._built = True
            ref = "Agent.update" if self.actor else "Agent.critic_update"
            log.info(
                "update step: %s",
                f"{ref} (reference)"
                if self._step is None
                else f"LearnerStep backend={self._step.backend}",
            )
        return self._step

    def update(self, batch: dict[str, Tensor]) -> dict[str, float] | Tensor:
        step = self.step
        if step is not None:
            return step.step(batch)
        if self.actor:
            return self.agent.update(batch, self.generator)  # type: ignore[no-any-return]
        return self.agent.critic_update(batch)  # type: ignore[no-any-return]

    def batch_buffers(self) -> dict[str, Tensor] | None:
        """The captured step's static batch inputs (a batch gathered into them is not
        copied again), None before the capture and for the other backends."""
        return None if self._step is None else self._step.batch_buffers()

    def floats(self, metrics: dict[str, float] | Tensor) -> dict[str, float]:
        if isinstance(metrics, dict):
            return metrics
        assert self._step is not None
        return self._step.floats(metrics)

    def sync_to_agent(self) -> None:
        if self._step is not None:
            self._step.sync_to_agent()


# ---------------------------------------------------------------- losses (pure functions)
def actor_loss(
    score: nn.Module, alpha_bars: Tensor, obs: Tensor, action: Tensor, t: Tensor, eps: Tensor
) -> Tensor:
    """diffusion.ddpm_loss with t (B,) and eps (B, A) given: batch mean of |eps_hat - eps|^2."""
    abar = alpha_bars[t].unsqueeze(-1)
    x_t = torch.sqrt(abar) * action + torch.sqrt(1.0 - abar) * eps
    pred = score(obs, x_t, t.to(action.dtype).unsqueeze(-1))
    return ((pred - eps) ** 2).sum(-1).mean()


def critic_v_loss(
    q_target: nn.Module,
    v: nn.Module,
    obs: Tensor,
    action: Tensor,
    kind: str,
    tau: float,
    alpha: float,
    exp_clip: float | None,
) -> tuple[Tensor, Tensor]:
    """Agent.value_step's loss and its v_mean metric."""
    q = q_target(obs, action).amin(0).detach()
    u = q - v(obs)
    return value_loss(u, kind, tau, alpha, exp_clip), (q.mean() - u.detach().mean())


def critic_q_loss(
    q: nn.Module,
    v: nn.Module,
    obs: Tensor,
    action: Tensor,
    reward: Tensor,
    next_obs: Tensor,
    terminated: Tensor,
    discount: float,
) -> tuple[Tensor, Tensor]:
    """Agent.q_step's loss (target from the just-updated V) and its q_mean metric."""
    mask = 1.0 - terminated.to(reward.dtype)
    target = (reward + discount * mask * v(next_obs)).detach()
    pred = q(obs, action)
    return q_loss(pred, target), pred.detach().mean()


def adam_update(
    params: list[Tensor],
    grads: Sequence[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    step: Tensor,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """torch.optim.Adam (weight_decay=0) / AdamW (decoupled decay) with tensor step and lr."""
    grads = list(grads)
    step.add_(1.0)
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
    bias1 = 1.0 - torch.pow(beta1, step)
    inv_bias2_sqrt = torch.rsqrt(1.0 - torch.pow(beta2, step))
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_mul_(denom, inv_bias2_sqrt)
    torch._foreach_add_(denom, eps)
    upd = torch._foreach_div(exp_avg, denom)
    torch._foreach_mul_(upd, -lr / bias1)
    torch._foreach_add_(params, upd)


def cosine_lr(k: Tensor, base_lr: float, decay: float) -> Tensor:
    """optax cosine decay (Agent's LambdaLR): base * 0.5 (1 + cos(pi min(k, D) / D))."""
    return base_lr * 0.5 * (1.0 + torch.cos(math.pi * torch.clamp(k, max=decay) / decay))


def adam_ema_update(
    opt: _Opt,
    grads: Sequence[Tensor],
    lr: Tensor,
    ema_params: list[Tensor] | None = None,
    ema_rate: float = 0.0,
) -> None:
    """``opt``'s Adam/AdamW step at ``lr``, then (given ``ema_params``) the EMA that follows
    those parameters: one function, so both compile (and are captured) together."""
    adam_update(
        opt.params, grads, opt.exp_avg, opt.exp_avg_sq, opt.step, lr,
        opt.beta1, opt.beta2, opt.eps, opt.weight_decay,
    )  # fmt: skip
    if ema_params is not None:
        ema_lerp(ema_params, opt.params, ema_rate)


def actor_adam_update(
    opt: _Opt,
    grads: Sequence[Tensor],
    k: Tensor,
    base_lr: float,
    decay: float,
    ema_params: list[Tensor],
    ema_rate: float,
) -> Tensor:
    """The actor's AdamW step at scheduler position k and the sampling network's EMA, then
    k + 1; returns the learning rate at k + 1 (the metric ``Agent.update`` reports). The
    schedule's scalar ops compile with the update instead of running as small kernels."""
    adam_ema_update(opt, grads, cosine_lr(k, base_lr, decay), ema_params, ema_rate)
    k.add_(1.0)
    return cosine_lr(k, base_lr, decay)


def ema_lerp(target: list[Tensor], online: list[Tensor], rate: float) -> None:
    """agent.ema_update as one foreach op: target <- target + rate * (online - target)."""
    torch._foreach_lerp_(target, online, rate)


class _Opt:
    """Moments, step count and hyperparameters of one Adam/AdamW, as device tensors."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[Tensor]) -> None:
        group = opt.param_groups[0]
        self.opt, self.params = opt, params
        self.beta1, self.beta2 = (float(b) for b in group["betas"])
        self.eps, self.weight_decay = float(group["eps"]), float(group["weight_decay"])
        if not isinstance(opt, torch.optim.AdamW):
            self.weight_decay = 0.0  # the agent's V/Q Adam has no (coupled) decay
        dev = params[0].device
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step = torch.zeros((), device=dev)
        for i, p in enumerate(params):
            st = opt.state.get(p)
            if st:
                self.exp_avg[i].copy_(st["exp_avg"])
                self.exp_avg_sq[i].copy_(st["exp_avg_sq"])
                self.step.fill_(float(st["step"]))

    def write_back(self) -> None:
        step = float(self.step)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            self.opt.state[p] = {
                "step": torch.tensor(step),
                "exp_avg": m.detach().clone(),
                "exp_avg_sq": v.detach().clone(),
            }


class LearnerStep:
    """One offline IDQL iteration on a static batch size, fast (see module docstring).

    ``step(batch)`` returns the metrics as a device tensor (``self.metrics`` order: ``METRICS``,
    or ``CRITIC_METRICS`` with ``actor=False``; no sync); ``update(batch)`` returns them as
    floats like ``Agent.update`` / ``Agent.critic_update``. The agent's parameters
    are updated in place; call ``sync_to_agent`` before checkpointing or mixing with
    ``Agent.update``.
    """

    def __init__(
        self,
        agent: Any,
        batch_size: int,
        *,
        backend: str = "auto",
        seed: int = 0,
        compile_mode: str | None = None,
        matmul_precision: str = "highest",
        overlap: bool = False,
        actor: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        cfg = agent.cfg
        if matmul_precision not in ("highest", "high"):
            raise ValueError(
                f"matmul_precision must be 'highest' (float32) or 'high' (TF32), "
                f"got {matmul_precision!r}"
            )
        self.matmul_precision = matmul_precision
        if cfg.train.algo != "idql":
            raise ValueError(
                f"LearnerStep runs the IDQL iteration, not train.algo={cfg.train.algo!r}"
            )
        if cfg.train.v1_double_actor_step:
            raise ValueError(
                "train.v1_double_actor_step is not supported by LearnerStep; use Agent.update"
            )
        self.agent, self.batch_size = agent, batch_size
        self.device = next(agent.parameters()).device
        if backend == "auto":
            # on the CPU compile measured slower than eager (47.6 vs 33.8 ms, batch 512)
            backend = "cuda_graph" if self.device.type == "cuda" else "eager"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
        if "cuda_graph" in backend and self.device.type != "cuda":
            raise ValueError(
                f"backend {backend!r} needs the agent on a CUDA device, not {self.device}"
            )
        self.backend = backend
        for name, flag in (("actor", actor), ("overlap", overlap)):
            if flag not in (True, False):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        if overlap and not actor:
            raise ValueError("overlap=True runs the actor beside the critic; actor=False has none")
        if overlap and self.device.type != "cuda":
            raise ValueError(
                f"overlap=True runs the actor on a second CUDA stream: the agent is on "
                f"{self.device}, not a CUDA device"
            )
        self.overlap = bool(overlap)
        # actor=False: V then Q only (Agent.critic_update, the online learner's default)
        self.actor = bool(actor)
        self.metrics = METRICS if self.actor else CRITIC_METRICS
        # the actor's branch (``_iteration``); None: one stream, in Agent.update's order
        self._branch = torch.cuda.Stream(device=self.device) if self.overlap else None
        if generator is not None and not _same_device(generator.device, self.device):
            raise ValueError(
                f"the loss-noise generator is on {generator.device}, the agent on {self.device}"
            )
        # the caller's generator (a trainer's, whose state its checkpoints keep) or our own
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self.generator = generator

        self._p_actor = list(agent.score.parameters())
        self._p_ema = list(agent.score_ema.parameters())
        self._p_v = list(agent.v.parameters())
        self._p_q = list(agent.q.parameters())
        self._p_qt = list(agent.q_target.parameters())
        self._actor = _Opt(agent.actor_opt, self._p_actor)
        self._vopt = _Opt(agent.v_opt, self._p_v)
        self._qopt = _Opt(agent.q_opt, self._p_q)
        t = cfg.train
        self._base_lr = float(agent.actor_sched.base_lrs[0])
        self._critic_lr = float(t.critic_lr)
        self._decay = float(max(t.lr_decay_steps, 1))
        self._k = torch.full((), float(agent.actor_sched.last_epoch), device=self.device)
        self._critic_lr_t = torch.full((), self._critic_lr, device=self.device)
        self._alpha_bars = agent.schedule.alpha_bars.to(self.device, torch.float32)
        self._rows = t.critic_batch_rows

        compiled = "compile" in backend
        wrap: Callable[[Any], Any] = (
            (lambda f: torch.compile(f, mode=compile_mode, dynamic=False))
            if compiled
            else (lambda f: f)
        )
        self._actor_loss = wrap(actor_loss)
        self._v_loss = wrap(critic_v_loss)
        self._q_loss = wrap(critic_q_loss)
        self._adam_ema = wrap(adam_ema_update)
        self._actor_adam = wrap(actor_adam_update)

        b, a, o = batch_size, agent.act_dim, agent.obs_dim
        dev = self.device
        self._t = torch.zeros(b, dtype=torch.int64, device=dev)
        self._eps = torch.zeros(b, a, device=dev)
        self._static: dict[str, Tensor] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: Tensor | None = None
        self._shapes = {
            "obs": (b, o),
            "action": (b, a),
            "reward": (b,),
            "next_obs": (b, o),
            "terminated": (b,),
        }

    # ------------------------------------------------------------------ the iteration
    def _lr_at(self, k: Tensor) -> Tensor:
        """optax cosine decay (Agent's LambdaLR) at scheduler position k."""
        return cosine_lr(k, self._base_lr, self._decay)

    def _actor_part(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The actor's loss, gradient, AdamW step and EMA: (loss, learning rate at k + 1)."""
        ag, c = self.agent, self.agent.cfg
        ag.score.train()
        loss_a = self._actor_loss(
            ag.score, self._alpha_bars, batch["obs"], batch["action"], self._t, self._eps
        )
        grads = torch.autograd.grad(loss_a, self._p_actor)
        with torch.no_grad():
            lr_next = self._actor_adam(
                self._actor, grads, self._k, self._base_lr, self._decay,
                self._p_ema, c.train.actor_ema,
            )  # fmt: skip
        return loss_a.detach(), lr_next

    def _iteration(self, batch: dict[str, Tensor]) -> Tensor:
        ag, c = self.agent, self.agent.cfg
        branch = self._branch
        if not self.actor:
            loss_a = lr_next = None
        elif branch is None:
            loss_a, lr_next = self._actor_part(batch)
        else:
            # The actor on its own stream, from the point the batch and t/eps are ready;
            # V then Q on the calling stream at the same time; joined before the metrics.
            main = torch.cuda.current_stream(self.device)
            branch.wait_stream(main)
            with torch.cuda.stream(branch):
                loss_a, lr_next = self._actor_part(batch)
            for t in (loss_a, lr_next):
                t.record_stream(main)  # made on the branch, read on main after the join
            assert loss_a is not None and lr_next is not None

        if self._rows is not None:
            batch = {k: v[: self._rows] for k, v in batch.items()}
        cc = c.critic
        loss_v, v_mean = self._v_loss(
            ag.q_target,
            ag.v,
            batch["obs"],
            batch["action"],
            cc.value_loss,
            cc.tau,
            cc.alpha,
            cc.exp_clip,
        )
        grads = torch.autograd.grad(loss_v, self._p_v)
        with torch.no_grad():
            self._adam_ema(self._vopt, grads, self._critic_lr_t)
        loss_q, q_mean = self._q_loss(
            ag.q,
            ag.v,
            batch["obs"],
            batch["action"],
            batch["reward"],
            batch["next_obs"],
            batch["terminated"],
            cc.discount,
        )
        grads = torch.autograd.grad(loss_q, self._p_q)
        with torch.no_grad():
            self._adam_ema(self._qopt, grads, self._critic_lr_t, self._p_qt, cc.target_ema)
            if branch is not None:
                torch.cuda.current_stream(self.device).wait_stream(branch)
            critic = [loss_v.detach(), v_mean, loss_q.detach(), q_mean]
            actor = [] if loss_a is None or lr_next is None else [loss_a, lr_next]
            return torch.stack(actor + critic).to(torch.float32)

    def _draw(self) -> None:
        """t and eps exactly as diffusion.ddpm_loss draws them (same generator, same order),
        written straight into the static buffers."""
        b = self.batch_size
        torch.randint(0, self.agent.schedule.steps, (b,), generator=self.generator, out=self._t)
        torch.randn(self._eps.shape, generator=self.generator, out=self._eps)

    # ------------------------------------------------------------------ public
    def step(self, batch: dict[str, Tensor]) -> Tensor:
        """One iteration on ``batch`` (tensors on the agent's device); metrics (6,) on device."""
        for k, shape in self._shapes.items():
            if tuple(batch[k].shape) != shape:
                raise ValueError(
                    f"batch[{k!r}] has shape {tuple(batch[k].shape)}, expected {shape}"
                )
        if self.actor:
            self._draw()
        if "cuda_graph" not in self.backend:
            with self._precision():
                return self._iteration(batch)
        if self._graph is None:
            with self._precision():
                self._capture(batch)
        assert self._static is not None and self._graph is not None and self._graph_out is not None
        for k in _BATCH_KEYS:
            if batch[k] is not self._static[k]:  # batch_buffers() are the inputs already
                self._static[k].copy_(batch[k], non_blocking=True)
        self._graph.replay()
        return self._graph_out

    def batch_buffers(self) -> dict[str, Tensor] | None:
        """The CUDA graph's static batch inputs once captured (else None): a caller may
        gather the next batch straight into them and pass them to ``step``."""
        return self._static

    def update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """``step`` plus one sync: the metrics as floats (Agent.update's names)."""
        return self.floats(self.step(batch))

    def floats(self, metrics: Tensor) -> dict[str, float]:
        """A ``step`` result as ``{name: float}`` (one sync)."""
        return dict(zip(self.metrics, metrics.tolist(), strict=True))

    def sync_to_agent(self) -> None:
        """Write moments, step counts and the LR scheduler position back into the agent
        (with ``actor=False`` only V's and Q's: the actor's optimiser was not used)."""
        for o in (self._vopt, self._qopt):
            o.write_back()
        if not self.actor:
            return
        self._actor.write_back()
        k = int(round(float(self._k)))
        sched = self.agent.actor_sched
        sched.last_epoch = k
        lr = float(self._lr_at(torch.tensor(float(k))))
        for g in self.agent.actor_opt.param_groups:
            g["lr"] = lr
        sched._last_lr = [lr]

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """float32 matmuls as asked, restoring the process setting afterwards. A captured
        graph keeps the (cuBLAS / Triton) kernels chosen under it."""
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.matmul_precision)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)

    def _capture(self, batch: dict[str, Tensor]) -> None:
        """Warm up on a side stream on a copy of the state, then capture one iteration."""
        self._static = {k: batch[k].detach().clone() for k in _BATCH_KEYS}
        saved = self._snapshot()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # autograd / cuBLAS / compile warm-up, undone below
                self._iteration(self._static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(saved)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._iteration(self._static)
        torch.cuda.synchronize(self.device)
        self._graph, self._graph_out = graph, out

    def _state_tensors(self) -> list[Tensor]:
        out = self._p_actor + self._p_ema + self._p_v + self._p_q + self._p_qt + [self._k]
        for o in (self._actor, self._vopt, self._qopt):
            out += o.exp_avg + o.exp_avg_sq + [o.step]
        return out

    def _snapshot(self) -> list[Tensor]:
        with torch.no_grad():
            return [t.detach().clone() for t in self._state_tensors()]

    def _restore(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for dst, src in zip(self._state_tensors(), saved, strict=True):
                dst.copy_(src)
