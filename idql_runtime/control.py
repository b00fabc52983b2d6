"""Fixed-rate control on a monotonic clock, with deadline-checked decisions.

``DeadlineDecider`` runs the engine in one worker thread. Each tick hands it the latest
observation and waits until the tick's decision deadline; a result that is not there in
time is never executed: the tick applies the fallback (hold the last action, or a
configured safe action) and counts an overrun (reliability.md #9, ros2_control's
overrun detection). ``overrun_limit`` overruns in a row raise ``OverrunLimit`` so the
caller can stop the robot safely.

``RateKeeper`` schedules ticks at start + k * period; when a tick is missed entirely it
skips ahead (no catch-up burst) and counts the missed ticks. It also records how late
each tick woke (its jitter), so that a stalled network or learner showing up in the
control loop would be visible (reliability.md #3, #8).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class OverrunLimit(RuntimeError):
    """Too many late decisions in a row: the actor must stop (or hold) safely."""


class DecisionEngineFailed(RuntimeError):
    """The decision function raised; the cause is chained (``__cause__``)."""


def check_rate_hz(rate_hz: float) -> float:
    """``rate_hz`` if it is a usable control rate (finite, >= 0; 0 = as fast as possible),
    else ValueError naming it. ``nan < 0`` is False, so a plain sign check would let NaN
    through: it runs unpaced with no deadline and reports NaN as the target rate."""
    rate_hz = float(rate_hz)
    if not (math.isfinite(rate_hz) and rate_hz >= 0):
        raise ValueError(
            f"rate_hz must be finite and >= 0 (0 = as fast as possible), got {rate_hz}"
        )
    return rate_hz


def check_safe_action(safe_action: Any, act_dim: int) -> np.ndarray:
    """``safe_action`` as a float32 array of shape (act_dim,), finite and within the
    actions' range [-1, 1], else ValueError naming it and ``act_dim``.

    Checked where it enters, because the fallback is executed only when a decision is
    late: a wrong length would surface there as a broadcast error inside ``env.step``
    (or, length 1, be broadcast by the env's clip yet stored as one value, which makes
    the whole transition batch unencodable), and a value outside [-1, 1] would be
    executed clipped but stored unclipped."""
    try:
        action = np.asarray(safe_action, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"safe_action must be {act_dim} numbers, got {safe_action!r}") from e
    if action.shape != (act_dim,):
        raise ValueError(
            f"safe_action must have shape (act_dim,) = ({act_dim},), got {safe_action!r} "
            f"of shape {action.shape}"
        )
    if not (np.isfinite(action).all() and (np.abs(action) <= 1.0).all()):
        raise ValueError(
            f"safe_action must be finite and within [-1, 1] (act_dim {act_dim}), got "
            f"{action.tolist()}"
        )
    return action


class RateKeeper:
    """Tick scheduler; ``rate_hz = 0`` means as fast as possible."""

    def __init__(self, rate_hz: float, clock: Callable[[], float] = time.monotonic) -> None:
        rate_hz = check_rate_hz(rate_hz)
        self.rate_hz = rate_hz
        self.period_s = 1.0 / rate_hz if rate_hz > 0 else 0.0
        self.clock = clock
        self.start = clock()
        self.next_tick = self.start
        self.ticks = 0
        self.missed_ticks = 0
        self._late_s: list[float] = []  # wake-up lateness of the ticks since take_jitter()

    def wait(self) -> float:
        """Sleep until the next tick; return its scheduled time (the tick's t0)."""
        if self.period_s == 0:
            self.ticks += 1
            return self.clock()
        now = self.clock()
        if now < self.next_tick:
            _sleep_until(self.next_tick, self.clock)
        elif now - self.next_tick >= self.period_s:
            skipped = int((now - self.next_tick) // self.period_s)
            self.missed_ticks += skipped
            self.next_tick += skipped * self.period_s
        t0 = self.next_tick
        self.next_tick += self.period_s
        self.ticks += 1
        if len(self._late_s) < 100_000:  # bounded if nobody takes the window for long
            self._late_s.append(self.clock() - t0)
        return t0

    def take_jitter(self) -> dict[str, float]:
        """Tick wake-up lateness in ms (p50, p99, max) over the ticks since the last call,
        and how many ticks that was; a skipped tick counts in ``missed_ticks`` instead."""
        late, self._late_s = np.asarray(self._late_s) * 1e3, []
        if not len(late):
            return {"ticks": 0}
        return {
            "ticks": int(len(late)),
            "p50_ms": round(float(np.percentile(late, 50)), 3),
            "p99_ms": round(float(np.percentile(late, 99)), 3),
            "max_ms": round(float(late.max()), 3),
        }

    def achieved_hz(self) -> float:
        elapsed = self.clock() - self.start
        return self.ticks / elapsed if elapsed > 0 else 0.0


def _sleep_until(deadline: float, clock: Callable[[], float]) -> None:
    # Plain sleeps, no busy-wait: a spinning control thread would hold the GIL and starve
    # the decision thread (sleep overshoots by ~0.1 ms, well inside a tick).
    while (remaining := deadline - clock()) > 0:
        time.sleep(remaining)


@dataclass
class DecisionStats:
    decisions: int = 0
    overruns: int = 0
    consecutive_overruns: int = 0
    max_consecutive_overruns: int = 0
    fallbacks: int = 0
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=20_000))

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s) * 1e3
        out: dict[str, Any] = {
            "decisions": self.decisions,
            "overruns": self.overruns,
            "fallbacks": self.fallbacks,
            "max_consecutive_overruns": self.max_consecutive_overruns,
        }
        if len(lat):
            out.update(
                latency_ms_p50=float(np.percentile(lat, 50)),
                latency_ms_p99=float(np.percentile(lat, 99)),
                latency_ms_max=float(lat.max()),
            )
        return out


class DeadlineDecider:
    """decide(obs) within a deadline, or a fallback action.

    ``decide_fn`` maps obs (obs_dim,) -> action (act_dim,). ``safe_action`` None means
    "hold the last executed action" (zeros before the first one); else (act_dim,) in
    [-1, 1] (``check_safe_action``).
    """

    def __init__(
        self,
        decide_fn: Callable[[np.ndarray], np.ndarray],
        act_dim: int,
        *,
        safe_action: np.ndarray | None = None,
        overrun_limit: int = 50,
        own_thread: bool = True,
    ) -> None:
        self.decide_fn = decide_fn
        self.safe_action = None if safe_action is None else check_safe_action(safe_action, act_dim)
        self.last_action = np.zeros(act_dim, np.float32)
        self.overrun_limit = overrun_limit
        self.stats = DecisionStats()
        self._cv = threading.Condition()
        self._job: tuple[int, np.ndarray | Callable[[], Any]] | None = None
        self._between: tuple[int, Any, BaseException | None] | None = None
        self._result: tuple[int, np.ndarray, float, float] | None = None  # ..., done at
        self._clock: Callable[[], float] = time.monotonic  # the deadlines' clock
        self._busy = False
        self._ticket = 0
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if own_thread:
            self._thread = threading.Thread(target=self._worker, name="idql-decider", daemon=True)
            self._thread.start()

    def serve(self) -> None:
        """Run the decision worker on the calling thread until ``close()``.

        For ``own_thread=False``: the actor runs its control loop on a helper thread and
        decisions on the main thread, because torch's OpenMP kernels run about 2x slower
        from a non-main thread on this class of machine (measured: cpu engine N=64
        3.2 ms on the main thread, 6.2 ms from a worker thread, 5.3 ms single-threaded).
        """
        self._worker()

    def _worker(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._stop:
                    self._cv.wait(timeout=0.2)  # timed: lets signal handlers run
                if self._stop:
                    return
                assert self._job is not None
                ticket, obs = self._job
                self._job = None
                self._busy = True
            if callable(obs):  # run_between's work, not a decision
                value, error = None, None
                try:
                    value = obs()
                except Exception as e:  # re-raised in run_between's caller
                    error = e
                with self._cv:
                    self._between = (ticket, value, error)
                    self._busy = False
                    self._cv.notify_all()
                continue
            t0 = time.perf_counter()
            try:
                action = np.asarray(self.decide_fn(obs), dtype=np.float32)
            except BaseException as e:  # surfaced on the control thread
                with self._cv:
                    self._error, self._busy = e, False
                    self._cv.notify_all()
                return
            dt = time.perf_counter() - t0
            done_at = self._clock()
            self.stats.latencies_s.append(dt)  # late decisions count in the percentiles too
            with self._cv:
                self._result = (ticket, action, dt, done_at)
                self._busy = False
                self._cv.notify_all()

    @property
    def busy(self) -> bool:
        """A (late) decision is still running in the worker thread."""
        with self._cv:
            return self._busy or self._job is not None

    def decide(
        self, obs: np.ndarray, deadline: float | None, clock: Callable[[], float] = time.monotonic
    ) -> tuple[np.ndarray, bool]:
        """Action for this tick and whether it is a fallback. ``deadline`` None = wait."""
        with self._cv:
            if self._error is not None:
                raise DecisionEngineFailed("decision engine failed") from self._error
            if self._busy:  # last tick's late decision is still running: cannot start one
                return self._fallback(), True
            self._ticket += 1
            ticket = self._ticket
            self._job, self._result, self._clock = (ticket, obs), None, clock
            self._cv.notify_all()
            while self._result is None or self._result[0] != ticket:
                if self._error is not None:
                    raise DecisionEngineFailed("decision engine failed") from self._error
                if deadline is None:
                    self._cv.wait(timeout=1.0)
                    continue
                remaining = deadline - clock()
                if remaining <= 0:
                    return self._fallback(), True
                self._cv.wait(timeout=remaining)
            _, action, _, done_at = self._result
            if deadline is not None and done_at > deadline:
                # Finished after its deadline and seen only because this thread woke
                # late from its wait: late all the same, never executed.
                return self._fallback(), True
        self.stats.decisions += 1
        self.stats.consecutive_overruns = 0
        self.last_action = action
        return action, False

    def run_between(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``fn()`` on the decision thread between two decisions and wait for it:
        (True, its value), or (False, None) without running it when a (late) decision is
        still running. For short idle-time work that must not overlap a decision and
        belongs on the thread torch runs fast on (the actor's precision re-check). Not
        counted in the decision stats; an exception from ``fn`` is raised here."""
        with self._cv:
            if self._error is not None:
                raise DecisionEngineFailed("decision engine failed") from self._error
            if self._busy or self._job is not None:
                return False, None
            self._ticket += 1
            ticket = self._ticket
            self._job, self._between = (ticket, fn), None
            self._cv.notify_all()
            while self._between is None or self._between[0] != ticket:
                if self._error is not None:
                    raise DecisionEngineFailed("decision engine failed") from self._error
                if self._stop:
                    return False, None
                self._cv.wait(timeout=1.0)
            _, value, error = self._between
            self._between = None
        if error is not None:
            raise error
        return True, value

    def _fallback(self) -> np.ndarray:
        s = self.stats
        s.overruns += 1
        s.fallbacks += 1
        s.consecutive_overruns += 1
        s.max_consecutive_overruns = max(s.max_consecutive_overruns, s.consecutive_overruns)
        if s.consecutive_overruns >= self.overrun_limit:
            raise OverrunLimit(
                f"{s.consecutive_overruns} late decisions in a row (limit {self.overrun_limit})"
            )
        action = self.safe_action if self.safe_action is not None else self.last_action
        self.last_action = action
        return action

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
