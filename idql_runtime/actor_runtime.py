"""The actor: run episodes at a fixed control rate, stream transitions, swap weights.

Per tick: wait for the tick (monotonic clock) -> decide within the deadline (fallback if
late) -> step the env -> submit the transition to the link (O(1), never blocks) -> at
the end of the tick, swap in newer weights if the link verified some. Weights change only
between ticks, never mid-decision, and each transition carries the policy version that
chose its action.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from idql_runtime.agent import Agent
from idql_runtime.control import DeadlineDecider, OverrunLimit, RateKeeper
from idql_runtime.envs import control_rate_hz, make_env

log = logging.getLogger(__name__)


@dataclass
class ActorReport:
    episodes: int = 0
    steps: int = 0
    returns: list[float] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    weight_swaps: int = 0
    weights_refused: int = 0
    stop_reason: str = ""
    precision_fallback_version: int | None = None


class Actor:
    """One environment, one engine, an optional link to a learner."""

    def __init__(
        self,
        agent: Agent,
        engine: Any,
        env_id: str,
        *,
        actor_id: int = 0,
        rate_hz: float | None = None,
        link: Any = None,
        seed: int = 0,
        overrun_limit: int = 50,
        deadline_fraction: float = 0.9,
        safe_action: np.ndarray | None = None,
        status_interval_s: float = 5.0,
        decide_on_main_thread: bool | None = None,
        float32_fallback: Any = None,
    ) -> None:
        """``float32_fallback``: with a reduced-precision ``engine`` chosen by the precision
        check (``idql-actor --dtype auto``), the float32 engine to switch to when an update
        changes the score network: the check held for the weights it measured, not for
        new ones."""
        self.agent, self.engine, self.link = agent, engine, link
        self._float32_fallback = float32_fallback
        # Decisions run on the main thread (torch's OpenMP kernels are ~2x slower from a
        # worker thread here) and the control loop on a helper thread, when built there.
        if decide_on_main_thread is None:
            decide_on_main_thread = threading.current_thread() is threading.main_thread()
        self.decide_on_main_thread = decide_on_main_thread
        self.env = make_env(env_id)
        self.env_id, self.actor_id, self.seed = env_id, actor_id, seed
        native = control_rate_hz(self.env)
        self.rate_hz = native if rate_hz is None else rate_hz
        self.deadline_fraction = deadline_fraction
        self.decider = DeadlineDecider(
            self._decide,
            agent.act_dim,
            safe_action=safe_action,
            overrun_limit=overrun_limit,
            own_thread=not decide_on_main_thread,
        )
        self.policy_version = 0
        self._pending_weights: tuple[int, dict[str, Any]] | None = None
        self._last_episode_id = 0
        self.report = ActorReport()
        self.status_interval_s = status_interval_s
        self.stop_requested = False
        self._recent_returns: deque[float] = deque(maxlen=20)

    def _decide(self, obs: np.ndarray) -> np.ndarray:
        return self.engine.decide(obs[None].astype(np.float32))[0]

    def maybe_swap_weights(self) -> bool:
        """Between ticks: apply the newest verified weights if newer, else keep the old.

        The agent validates every tensor before copying any (shape, NaN/inf), so a bad
        update leaves the current weights in place (reliability.md #10). While a late
        decision still runs in the decider's thread the swap waits for the next tick, so
        no decision ever runs on a mix of old and new weights.
        """
        if self.link is None:
            return False
        got = self.link.poll_weights()
        if got is not None:
            self._pending_weights = got  # the link only hands out newer versions
        if self._pending_weights is None or self.decider.busy:
            return False
        (version, arrays), self._pending_weights = self._pending_weights, None
        if version <= self.policy_version:
            self.report.weights_refused += 1
            return False
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        try:
            self.agent.load_inference_state(tensors, strict=False)
            if hasattr(self.engine, "load_weights"):
                # only the groups that came (usually target Q and V, ~140k values), not
                # the whole 1.7M-parameter score network again: this runs between ticks
                self.engine.load_weights(tensors, partial=True)
        except ValueError as e:
            self.report.weights_refused += 1
            log.warning("refused weights version %d: %s", version, e)
            if hasattr(self.link, "reject_weights"):
                self.link.reject_weights(version, self.policy_version)
            return False
        self.policy_version = version
        self.report.weight_swaps += 1
        if self._float32_fallback is not None and any(k.startswith("score_ema.") for k in arrays):
            self._fall_back_to_float32(version)
        return True

    def _fall_back_to_float32(self, version: int) -> None:
        """Between ticks, the score network just changed under a reduced-precision engine
        whose check ran on the old one: continue on the float32 engine (~ms to load)."""
        fallback, self._float32_fallback = self._float32_fallback, None
        fallback.load_weights(self.agent.inference_state())
        before = self.engine.info.get("precision_check") or {}
        dtype = self.engine.describe()["dtype"]
        fallback.info["precision_check"] = {
            "chosen": "float32",
            "why": f"version {version} changed the score network; {dtype} was checked on the"
            " weights the actor started with",
            "before": before,
        }
        self.engine = fallback
        self.report.precision_fallback_version = version
        log.warning("weights version %d changed the score network: %s -> float32", version, dtype)

    def status(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "actor_id": self.actor_id,
            "episodes": self.report.episodes,
            "steps": self.report.steps,
            "policy_version": self.policy_version,
            "rate_hz_target": self.rate_hz,
            "rate_hz_achieved": round(self.rate.achieved_hz(), 2),
            "missed_ticks": self.rate.missed_ticks,
            "tick_late": self.rate.take_jitter(),  # since the previous status line
            "recent_returns": [round(r, 1) for r in self._recent_returns],
            **self.decider.stats.summary(),
        }
        if self.link is not None:
            ls = self.link.stats()
            s["link"] = {
                k: ls[k]
                for k in ("sent", "acked", "resent", "dropped", "unacked", "lag_s")
                if k in ls
            }
        return s

    def run(
        self, *, episodes: int = 0, max_seconds: float = 0.0, max_steps: int = 0
    ) -> ActorReport:
        """Act until a budget is spent or ``stop_requested``; 0 means unbounded."""
        self.rate = RateKeeper(self.rate_hz)
        obs, _ = self.env.reset(seed=self.seed)
        for _ in range(3):  # warm-up: first calls allocate and pick kernels; not on the clock
            self._decide(np.asarray(obs, dtype=np.float32))
        self.rate = RateKeeper(self.rate_hz)

        def loop() -> ActorReport:
            return self._control_loop(
                obs, episodes=episodes, max_seconds=max_seconds, max_steps=max_steps
            )

        if not self.decide_on_main_thread:
            return loop()
        box: dict[str, Any] = {}

        def control() -> None:
            try:
                box["report"] = loop()
            except BaseException as e:  # re-raised on the calling thread
                box["error"] = e
            finally:
                self.decider.close()  # ends serve() below

        thread = threading.Thread(target=control, name="idql-control", daemon=True)
        thread.start()
        self.decider.serve()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["report"]  # type: ignore[no-any-return]

    def _control_loop(
        self, obs: Any, *, episodes: int, max_seconds: float, max_steps: int
    ) -> ActorReport:
        t_end = time.monotonic() + max_seconds if max_seconds > 0 else float("inf")
        next_status = time.monotonic() + self.status_interval_s
        episode_id = self._episode_id(0)
        ep_return, ep_index = 0.0, 0
        self.maybe_swap_weights()
        try:
            while not self.stop_requested:
                if time.monotonic() >= t_end or (max_steps and self.report.steps >= max_steps):
                    self.report.stop_reason = "budget"
                    break
                t0 = self.rate.wait()
                deadline = (
                    t0 + self.deadline_fraction * self.rate.period_s if self.rate.period_s else None
                )
                obs32 = np.asarray(obs, dtype=np.float32)
                action, _late = self.decider.decide(obs32, deadline)
                version = self.policy_version
                next_obs, reward, terminated, truncated, _ = self.env.step(action)
                self.report.steps += 1
                ep_return += float(reward)
                if self.link is not None:
                    self.link.submit(
                        {
                            "obs": obs32,
                            "action": np.asarray(action, np.float32),
                            "reward": np.float32(reward),
                            "next_obs": np.asarray(next_obs, np.float32),
                            "terminated": bool(terminated),
                            "truncated": bool(truncated),
                        },
                        episode_id=episode_id,
                        policy_version=version,
                    )
                obs = next_obs
                if terminated or truncated:
                    self.report.episodes += 1
                    self.report.returns.append(ep_return)
                    self.report.policy_versions.append(version)
                    self._recent_returns.append(ep_return)
                    print(
                        json.dumps(
                            {
                                "episode": {
                                    "actor_id": self.actor_id,
                                    "index": ep_index,
                                    "return": round(ep_return, 2),
                                    "policy_version": version,
                                    "steps": self.report.steps,
                                }
                            }
                        ),
                        flush=True,
                    )
                    ep_return, ep_index = 0.0, ep_index + 1
                    episode_id = self._episode_id(ep_index)
                    obs, _ = self.env.reset()
                    if episodes and self.report.episodes >= episodes:
                        self.report.stop_reason = "episodes"
                        break
                self.maybe_swap_weights()
                if time.monotonic() >= next_status:
                    print(json.dumps({"actor": self.status()}), flush=True)
                    next_status = time.monotonic() + self.status_interval_s
        except OverrunLimit as e:
            self.report.stop_reason = f"overrun_limit: {e}"
            log.error("stopping safely: %s", e)
        if self.stop_requested and not self.report.stop_reason:
            self.report.stop_reason = "signal"
        return self.report

    def _episode_id(self, index: int) -> int:
        """Unique per actor (rows are grouped by ``(actor_id, episode_id)``), across its
        restarts too: the wall clock in microseconds at the episode's start, strictly
        increasing. (Packing the actor id into the id overflowed int64 for actor ids of
        2**23 and up, which made every transition unencodable; an index field wrapped.)"""
        self._last_episode_id = max(self._last_episode_id + 1, time.time_ns() // 1000)
        return self._last_episode_id

    def close(self) -> None:
        self.decider.close()
        self.env.close()
