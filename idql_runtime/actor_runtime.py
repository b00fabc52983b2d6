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
from idql_runtime.control import (
    DeadlineDecider,
    DecisionEngineFailed,
    OverrunLimit,
    RateKeeper,
    check_rate_hz,
    check_safe_action,
)
from idql_runtime.envs import check_env_fits, control_rate_hz, make_env

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
    precision_return_version: int | None = None
    precision_events: list[dict[str, Any]] = field(default_factory=list)


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
        precision_states: np.ndarray | None = None,
        precision_limits: dict[str, float] | None = None,
    ) -> None:
        """``float32_fallback``: with a reduced-precision ``engine`` chosen by the precision
        check (``idql-actor --dtype auto``), the float32 engine to switch to when an update
        changes the score network: the check held for the weights it measured, not for
        new ones. ``precision_states``: the calibration states of that check; given, the
        actor re-runs the check on the new score network in the idle time between ticks
        (``idle_work``) and returns to the reduced engine if it passes."""
        # Refuse bad settings before the env exists, so that a refusal leaks nothing.
        if rate_hz is not None:
            rate_hz = check_rate_hz(rate_hz)
        if safe_action is not None:
            safe_action = check_safe_action(safe_action, agent.act_dim)
        self.agent, self.engine, self.link = agent, engine, link
        self._pair: tuple[Any, Any] | None = (
            (engine, float32_fallback) if float32_fallback is not None else None
        )  # (reduced, float32) under --dtype auto
        self._precision_states = precision_states
        self._precision_limits = precision_limits
        self._recheck: Any = None  # PrecisionCheck in progress
        self._recheck_version: int | None = None  # the score network it must check
        self._recheck_loaded = False  # its weights are in the reduced engine
        # the budget of the next idle step of each kind: the last "load" and "init" (once
        # per check), and the longest of PrecisionCheck's "decide", "reverse", "score"
        # steps in the current check (an outlier holds back no later check)
        self._recheck_unit_s: dict[str, float] = {}
        # Decisions run on the main thread (torch's OpenMP kernels are ~2x slower from a
        # worker thread here) and the control loop on a helper thread, when built there.
        if decide_on_main_thread is None:
            decide_on_main_thread = threading.current_thread() is threading.main_thread()
        self.decide_on_main_thread = decide_on_main_thread
        self.env = make_env(env_id)
        try:
            check_env_fits(self.env, env_id, agent.obs_dim, agent.act_dim)
        except ValueError:
            self.env.close()
            raise
        self.env_id, self.actor_id, self.seed = env_id, actor_id, seed
        native = control_rate_hz(self.env)
        self.rate_hz = native if rate_hz is None else rate_hz
        self.deadline_fraction = deadline_fraction
        self.rate = RateKeeper(self.rate_hz)  # replaced when run() starts the clock
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
        score_changed = self._pair is not None and any(k.startswith("score_ema.") for k in arrays)
        leaving = score_changed and self.engine is self._pair[0]  # type: ignore[index]
        try:
            self.agent.load_inference_state(tensors, strict=False)
            # a reduced engine being left for float32 is not loaded: _score_changed loads
            # the float32 one, and a re-check reloads this one when it starts
            if not leaving and hasattr(self.engine, "load_weights"):
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
        if score_changed:
            self._score_changed(version)
        return True

    def _score_changed(self, version: int) -> None:
        """Between ticks, the score network just changed (version ``version``): a reduced-
        precision engine was checked on the old one, so continue on float32 (~ms to load)
        and, with calibration states, schedule the check of the new one (restarting any
        check of an older one)."""
        assert self._pair is not None
        reduced, fp32 = self._pair
        dtype = reduced.describe()["dtype"]
        if self.engine is reduced:
            fp32.load_weights(self.agent.inference_state())
            fp32.info["precision_check"] = {
                "chosen": "float32",
                "why": f"version {version} changed the score network; {dtype} was checked"
                " on older weights",
                "before": reduced.info.get("precision_check") or {},
            }
            self.engine = fp32
            self.report.precision_fallback_version = version
            self.report.precision_events.append(
                {"version": version, "dtype": "float32", "why": "score network changed"}
            )
            log.warning(
                "weights version %d changed the score network: %s -> float32", version, dtype
            )
        if self._precision_states is not None and len(self._precision_states):
            self._recheck, self._recheck_version = None, version
            self._recheck_loaded = False

    def idle_work(self) -> bool:
        """One short piece of deferred work in the time left before the next tick, on the
        decision thread: today, one step of the precision re-check (``_recheck_step``:
        load the weights, build the float64 reference, or one ``PrecisionCheck`` unit: the
        engine's decision on a state, one float64 reverse step, the critic and metrics; a
        few ms at most at N = 64 on a 2-core CPU). It runs only when the time left is at
        least twice the budget of its kind (``_recheck_unit_s``; half a period before the
        first of a kind), so it does not delay a tick and a slow one-off weight load does
        not hold back the short steps; at ``rate_hz = 0`` (no deadlines) it runs every tick.
        Returns whether it ran something."""
        if self._recheck_version is None or self._pair is None:
            return False
        kind = self._recheck_next_unit()
        period = self.rate.period_s
        if period > 0:
            left = self.rate.next_tick - time.monotonic()
            longest = self._recheck_unit_s.get(kind)
            need = 2.0 * longest if longest else 0.5 * period
            if left < need:
                return False
        t0 = time.perf_counter()
        try:
            ran, finished = self.decider.run_between(self._recheck_step)
        except DecisionEngineFailed:
            raise  # the decision engine itself failed: the control loop must see it
        except Exception as e:  # an optional speed-up must not stop the robot: stay float32
            version = self._end_recheck()
            why = f"re-check on version {version} failed: {type(e).__name__}: {e}"
            self.report.precision_events.append(
                {"version": version, "dtype": "float32", "why": why}
            )
            log.warning("%s; staying on float32", why)
            return False
        if ran:
            took = time.perf_counter() - t0
            once = kind in ("load", "init")
            self._recheck_unit_s[kind] = (
                took if once else max(self._recheck_unit_s.get(kind, 0.0), took)
            )
        if ran and finished:
            self._recheck_done()
        return bool(ran)

    def _end_recheck(self) -> int | None:
        """Forget the re-check in progress (done or failed); the version it was checking."""
        version = self._recheck_version
        self._recheck, self._recheck_version, self._recheck_loaded = None, None, False
        return version

    def _recheck_next_unit(self) -> str:
        """The kind of the re-check's next step (``idle_work`` budgets by kind)."""
        if not self._recheck_loaded:
            return "load"
        if self._recheck is None:
            return "init"
        return str(self._recheck.next_unit)

    def _recheck_step(self) -> bool:
        """On the decision thread, one step of the re-check: load the newest weights into
        the idle reduced engine, then build the check (its float64 reference), then its
        units; True when every state is measured."""
        from idql_runtime.engines.precision import PrecisionCheck

        reduced, _ = self._pair  # type: ignore[misc]
        if not self._recheck_loaded:
            reduced.load_weights(self.agent.inference_state())
            self._recheck_loaded = True
            return False
        if self._recheck is None:
            states = self._precision_states
            assert states is not None
            self._recheck = PrecisionCheck(reduced, states, seed=self.seed)
            for unit in ("decide", "reverse", "score"):  # budgets of this check's own steps
                self._recheck_unit_s.pop(unit, None)
            return False
        return bool(self._recheck.step())

    def _recheck_done(self) -> None:
        from idql_runtime.engines.precision import precision_ok

        reduced, fp32 = self._pair  # type: ignore[misc]
        report = self._recheck.report()
        version = self._end_recheck()
        ok, why = precision_ok(report, self._precision_limits)
        dtype = reduced.describe()["dtype"]
        event = {
            "version": version,
            "dtype": dtype if ok else "float32",
            "why": f"re-check on version {version}: {why}",
            "regret_p99": report["regret_p99"],
            "action_err_p99": report["action_err_p99"],
            "same_pick": report["same_pick"],
        }
        self.report.precision_events.append(event)
        if not ok:
            log.warning("weights version %s: %s stays off (%s)", version, dtype, why)
            return
        # The check restarts on every score change, so only critic updates since it began
        # (they went to the float32 engine) are missing here: those groups, not a repack
        # of the whole score network on the control thread.
        critic = {
            k: v for k, v in self.agent.inference_state().items() if not k.startswith("score_ema.")
        }
        reduced.load_weights(critic, partial=True)
        reduced.info["precision_check"] = {"chosen": dtype, "why": why, "tried": report}
        self.engine = reduced
        self.report.precision_return_version = version
        log.info("weights version %s passed the precision re-check: float32 -> %s", version, dtype)

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
        if self._pair is not None:
            s["precision"] = {"dtype": self.engine.describe()["dtype"]}
            if self._recheck_version is not None:
                total = len(self._precision_states)  # type: ignore[arg-type]
                done = self._recheck.measured if self._recheck is not None else 0
                s["precision"]["recheck"] = f"v{self._recheck_version} {done}/{total}"
            if self._recheck_unit_s:  # the budgets idle_work holds each kind of step to
                s["precision"]["recheck_unit_ms"] = {
                    k: round(v * 1e3, 2) for k, v in self._recheck_unit_s.items()
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
                self.idle_work()
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
