"""Is a reduced-precision engine good enough on *these* weights? Measure it, then decide.

Rounding in bf16 block products perturbs every candidate through T reverse steps and the
critic, so whether bf16 is safe depends on the trained weights, not on a fixed tolerance
checked once on random ones. ``precision_report`` runs an engine and the float64 naive
reference (``Decision.candidates`` on a float64 copy of the same weights) on the same
observations and noise, and measures what matters for control:

- ``regret``: how much worse, under the float64 critic, the engine's pick is than the best
  candidate, as a fraction of that state's Q spread (max - min over the N candidates);
  0 when it picks the reference's best; 1 when it picks the worst.
- ``action_err``: max |a_engine - a_reference| over action dims for the candidate it
  picked: how far its rounding moved the executed action.
- ``same_pick``: the fraction of states where it picked the reference's candidate (for
  ``implicit`` mode: the reference's draw with the same uniform).

``precision_ok`` applies the limits (``PRECISION_LIMITS``): the engine may pick a
different candidate where Q values nearly tie, but the value it gives up and the distance
it moves the action must stay small at the 99th percentile.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import torch

from idql_runtime import onednn
from idql_runtime.decision import DecisionNoise, select_index

PRECISION_LIMITS = {"regret_p99": 0.05, "action_err_p99": 0.05}
"""Accept a reduced-precision engine only when, at the 99th percentile over calibration
states, it gives up at most 5 % of the state's Q spread and moves the executed action by
at most 0.05 (actions live in [-1, 1])."""


class PrecisionCheck:
    """``precision_report`` in small steps, for a caller that has only short idle windows
    (an actor between ticks). Each ``step()`` does one unit of work: the engine's decision
    on the next ``engine.spec.batch`` states, one reverse step of the float64 reference on
    them, or the reference critic and the metrics; ``units_per_batch`` units measure one
    batch (at N = 64 on a 2-core CPU one unit takes a few ms, where a whole batch took
    ~18 ms and never fitted between the ticks of a 100+ Hz actor). ``step()`` returns True
    once every state is measured; ``report()`` then gives what ``precision_report`` gives.

    The float64 reference is taken from the engine's weights when the check is created:
    load the weights to check first.
    """

    def __init__(self, engine: Any, obs: np.ndarray, *, seed: int = 0) -> None:
        spec = engine.spec
        self.engine, self.spec = engine, spec
        self.obs = np.asarray(obs, np.float32).reshape(-1, spec.obs_dim)
        if len(self.obs) == 0:
            raise ValueError("a precision check needs at least one observation")
        self._d64 = engine.reference_decision()
        self._gen = torch.Generator().manual_seed(seed)
        self._next = 0
        self._work: Generator[None, None, None] | None = None  # the batch in progress
        self._unit = 0  # units of that batch done
        # step() calls per batch of states: the engine's decision, one per reverse step of
        # the reference, then its critic and the metrics
        self.units_per_batch = 2 + len(self._d64.reverse_plan())
        self._regret: list[np.ndarray] = []
        self._action_err: list[np.ndarray] = []
        self._same: list[np.ndarray] = []

    @property
    def done(self) -> bool:
        return self._next >= len(self.obs)

    @property
    def measured(self) -> int:
        """States measured so far (whole batches)."""
        return min(self._next, len(self.obs))

    @property
    def next_unit(self) -> str | None:
        """What the next ``step()`` does: "decide" (the engine on a new batch), "reverse"
        (one float64 reverse step) or "score" (critic, selection, metrics); None when done.
        Units of one kind take about the same time, so a caller can budget by kind."""
        if self.done:
            return None
        if self._unit == 0:
            return "decide"
        return "score" if self._unit == self.units_per_batch - 1 else "reverse"

    def step(self) -> bool:
        """One unit of work (class docstring); True when every state is measured."""
        if self.done:
            return True
        if self._work is None:
            self._work = self._measure_batch()
        with torch.no_grad():
            try:
                next(self._work)
                self._unit += 1
            except StopIteration:
                self._work, self._unit = None, 0
        return self.done

    def _measure_batch(self) -> Generator[None, None, None]:
        """The next batch of states, yielding between units (``step``)."""
        spec, d64 = self.spec, self._d64
        start = self._next
        chunk = self.obs[start : start + spec.batch]
        k = len(chunk)
        if k < spec.batch:  # padded with repeats, which are not counted
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], spec.batch - k, axis=0)])
        noise = DecisionNoise.draw(spec, generator=self._gen)
        out = self.engine.decide_with_noise(chunk, noise)
        yield None
        o64 = torch.as_tensor(chunk, dtype=torch.float64)
        n64 = DecisionNoise(*(t.to(torch.float64) for t in noise))
        x_ref = yield from d64.sample_steps(o64, n64.x_init, n64.step_noise)
        q_ref = d64.score_candidates(o64, x_ref)
        v_ref = d64.v(o64)
        ref_idx = select_index(q_ref, v_ref, n64.u, d64.mode, d64.value_loss, d64.tau, d64.alpha)
        idx = out.index.to(torch.int64)
        rows = torch.arange(spec.batch)
        best = q_ref.amax(dim=-1)
        spread = (best - q_ref.amin(dim=-1)).clamp_min(1e-12)
        r = (best - q_ref[rows, idx]) / spread
        err = (out.action.to(torch.float64) - x_ref[rows, idx]).abs().amax(dim=-1)
        self._regret.append(r[:k].numpy())
        self._action_err.append(err[:k].numpy())
        self._same.append((idx == ref_idx)[:k].numpy())
        self._next = start + spec.batch

    def report(self) -> dict[str, Any]:
        if not self.done:
            raise RuntimeError(
                f"the precision check has measured {self.measured} of {len(self.obs)} states"
            )
        reg = np.concatenate(self._regret)
        aerr = np.concatenate(self._action_err)
        sm = np.concatenate(self._same)
        return {
            "engine": self.engine.name,
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "states": int(len(self.obs)),
            "samples": int(self.spec.samples),
            "same_pick": float(sm.mean()),
            "regret_mean": float(reg.mean()),
            "regret_p99": float(np.quantile(reg, 0.99)),
            "regret_max": float(reg.max()),
            "action_err_mean": float(aerr.mean()),
            "action_err_p99": float(np.quantile(aerr, 0.99)),
            "action_err_max": float(aerr.max()),
        }


def precision_report(engine: Any, obs: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """Metrics of ``engine`` against the float64 reference on ``obs`` (M, obs_dim).

    ``engine`` is any built Engine; its own float32 master copy of the weights
    (``engine.decision``) gives the float64 reference. M need not be a multiple of the
    engine's batch (the last chunk is padded with repeats, which are not counted).
    """
    check = PrecisionCheck(engine, obs, seed=seed)
    while not check.step():
        pass
    return check.report()


def precision_ok(
    report: dict[str, Any], limits: dict[str, float] | None = None
) -> tuple[bool, str]:
    """(passed, reason naming the first metric over its limit, or 'within limits')."""
    for key, limit in (limits or PRECISION_LIMITS).items():
        if report[key] > limit:
            return False, f"{key} = {report[key]:.4g} > {limit}"
    return True, "within limits"


def reduced_dtype_for(kind: str, device: str | torch.device) -> str | None:
    """The reduced precision worth trying for an engine kind on this machine, or None.

    cpu: bfloat16 when oneDNN has native bf16 kernels here (avx512_bf16 / AMX); GPU engines:
    bfloat16 when the GPU supports it. The eager engine (autocast) is not faster in bf16 on
    a CPU, so it stays float32.
    """
    dev = torch.device(device)
    if dev.type == "cpu" and kind == "cpu":
        return "bfloat16" if onednn.bf16_native() else None
    if dev.type == "cuda" and kind in ("cuda_graph", "compiled", "triton"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else None
    return None


def rollout_states(env_id: str, policy: Any, count: int, *, seed: int = 0) -> np.ndarray:
    """``count`` observations visited by ``policy`` (obs -> action) in a fresh ``env_id``
    instance (resets on episode end): the states a deployed policy actually meets.

    Raises ValueError naming ``count`` unless it is a positive integer, before an env is
    made: a caller asking for a calibration of no states (``--dtype auto
    --calibration-states 0``) gets that said, not numpy's error on stacking nothing, nor a
    float32 engine chosen quietly for want of states.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(
            "the count of calibration states must be a positive integer"
            f" (idql-actor --calibration-states), got {count!r}"
        )
    from idql_runtime.envs import make_env

    env = make_env(env_id)
    try:
        obs, _ = env.reset(seed=seed)
        states: list[np.ndarray] = []
        while len(states) < count:
            states.append(np.asarray(obs, np.float32))
            obs, _, terminated, truncated, _ = env.step(policy(states[-1]))
            if terminated or truncated:
                obs, _ = env.reset()
        return np.stack(states)
    finally:
        env.close()


def select_precision(
    build: Any,
    reduced: str | None,
    states: np.ndarray | None,
    *,
    fallback: Any = None,
    limits: dict[str, float] | None = None,
    seed: int = 0,
) -> Any:
    """The reduced-precision engine if it passes ``precision_ok`` on ``states``, else float32.

    ``build(dtype)`` builds an engine; ``fallback`` is an already-built float32 engine (used
    as is when the reduced one fails, or when there is no reduced dtype or no states).
    The chosen engine's ``info["precision_check"]`` records the decision and its measurements.
    """
    if reduced is None:
        record: dict[str, Any] = {"why": "no reduced precision on this engine/machine"}
    elif states is None or len(states) == 0:
        record = {"why": "no calibration states"}
    else:
        engine = build(reduced)
        report = precision_report(engine, states, seed=seed)
        ok, why = precision_ok(report, limits)
        record = {"why": why, "tried": report}
        if ok:
            engine.info["precision_check"] = {"chosen": reduced, **record}
            return engine
    chosen = fallback if fallback is not None else build("float32")
    chosen.info["precision_check"] = {"chosen": "float32", **record}
    return chosen
