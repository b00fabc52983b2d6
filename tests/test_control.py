"""Fixed-rate ticks and deadline-checked decisions (reliability.md #9)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from idql_runtime.control import DeadlineDecider, OverrunLimit, RateKeeper


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rate_keeper_schedules_on_a_grid_and_skips_missed_ticks() -> None:
    clock = FakeClock()
    rk = RateKeeper(10.0, clock=clock)  # period 0.1 s
    assert rk.wait() == pytest.approx(100.0)
    clock.t = 100.1  # exactly on time
    assert rk.wait() == pytest.approx(100.1)
    clock.t = 100.45  # ticks at 100.2, 100.3 and 100.4 missed
    t0 = rk.wait()
    assert t0 == pytest.approx(100.4) and rk.missed_ticks == 2
    assert rk.next_tick == pytest.approx(100.5)  # no catch-up burst


def test_rate_keeper_real_clock_holds_rate() -> None:
    rk = RateKeeper(200.0)
    t = np.array([rk.wait() for _ in range(40)])
    # every tick sits on the 5 ms grid; a tick lost to a loaded machine is counted, not bunched
    steps = np.diff(t) / 0.005
    assert np.allclose(steps, np.round(steps)) and (np.round(steps) >= 1).all()
    assert int(np.round(steps).sum()) == 39 + rk.missed_ticks


def test_late_decision_gets_fallback_and_is_never_executed() -> None:
    calls: list[float] = []

    def slow_then_fast(obs: np.ndarray) -> np.ndarray:
        calls.append(obs[0])
        if obs[0] == 1.0:
            time.sleep(0.15)
        return np.full(2, obs[0], np.float32)

    d = DeadlineDecider(slow_then_fast, 2, overrun_limit=10)
    a0, late0 = d.decide(np.array([0.0]), time.monotonic() + 1.0)
    assert not late0 and a0.tolist() == [0.0, 0.0]
    a1, late1 = d.decide(np.array([1.0]), time.monotonic() + 0.02)
    assert late1 and a1.tolist() == [0.0, 0.0]  # held the last executed action
    # the slow decision is still running: the next tick cannot start one either
    a2, late2 = d.decide(np.array([2.0]), time.monotonic() + 0.01)
    assert late2 and a2.tolist() == [0.0, 0.0]
    time.sleep(0.2)
    a3, late3 = d.decide(np.array([3.0]), time.monotonic() + 1.0)
    assert not late3 and a3.tolist() == [3.0, 3.0]  # the late [1, 1] never came out
    assert d.stats.overruns == 2 and d.stats.decisions == 2
    assert calls == [0.0, 1.0, 3.0]
    d.close()


def test_safe_action_and_overrun_limit() -> None:
    d = DeadlineDecider(
        lambda o: (time.sleep(0.05), np.ones(2, np.float32))[1],
        2,
        safe_action=np.array([0.5, -0.5]),
        overrun_limit=3,
    )
    a, late = d.decide(np.zeros(1), time.monotonic() + 0.001)
    assert late and a.tolist() == [0.5, -0.5]
    time.sleep(0.06)
    with pytest.raises(OverrunLimit, match="3 late decisions in a row"):
        for _ in range(3):
            d.decide(np.zeros(1), time.monotonic() + 0.001)
            time.sleep(0.06)
    d.close()


def test_run_between_runs_on_the_decision_thread_and_never_beside_a_decision() -> None:
    import threading

    threads: list[str] = []

    def decide(obs: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        if obs[0] == 1.0:
            time.sleep(0.15)
        return np.full(2, obs[0], np.float32)

    d = DeadlineDecider(decide, 2, overrun_limit=10)
    try:
        d.decide(np.array([0.0]), time.monotonic() + 1.0)
        ran, value = d.run_between(lambda: threading.current_thread().name)
        assert ran and value == threads[0] == "idql-decider"
        assert d.stats.decisions == 1 and len(d.stats.latencies_s) == 1  # not counted

        # a late decision still runs: the work is refused, not queued behind it
        _, late = d.decide(np.array([1.0]), time.monotonic() + 0.01)
        assert late
        assert d.run_between(lambda: threads.append("between")) == (False, None)
        time.sleep(0.2)
        assert "between" not in threads

        # its exception reaches the caller, and the decider keeps deciding
        def boom() -> None:
            raise ValueError("bad idle work")

        with pytest.raises(ValueError, match="bad idle work"):
            d.run_between(boom)
        a, late = d.decide(np.array([3.0]), time.monotonic() + 1.0)
        assert not late and a.tolist() == [3.0, 3.0]
    finally:
        d.close()


@pytest.mark.parametrize("rate_hz", [float("nan"), float("inf"), -1.0])
def test_rate_keeper_refuses_a_rate_that_is_not_finite_and_non_negative(rate_hz: float) -> None:
    # nan < 0 is False: a sign check alone would run unpaced and report NaN as the target
    with pytest.raises(ValueError, match=f"got {rate_hz}"):
        RateKeeper(rate_hz)


@pytest.mark.parametrize(
    ("safe_action", "why"),
    [
        ([0.0, 0.0], r"\(3,\).*shape \(2,\)"),  # would crash env.step when executed
        ([0.0], r"\(3,\).*shape \(1,\)"),  # broadcast by the env, yet stored as one value
        ([0.0, 1.5, 0.0], r"within \[-1, 1\] \(act_dim 3\), got \[0.0, 1.5, 0.0\]"),
        ([0.0, float("nan"), 0.0], "finite"),
        (["abc", 0.0, 0.0], "3 numbers, got"),
    ],
)
def test_safe_action_must_be_act_dim_finite_values_in_range(safe_action: list, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        DeadlineDecider(lambda o: np.zeros(3, np.float32), 3, safe_action=safe_action)


def test_a_valid_safe_action_is_executed_exactly_as_given() -> None:
    # float32, shape (act_dim,): what the env executes is what the transition stores
    d = DeadlineDecider(
        lambda o: (time.sleep(0.05), np.ones(3, np.float32))[1],
        3,
        safe_action=[-1.0, 0.25, 1.0],  # the range's ends are allowed
    )
    try:
        a, late = d.decide(np.zeros(1), time.monotonic() + 0.001)
        assert late and a.dtype == np.float32 and a.tolist() == [-1.0, 0.25, 1.0]
    finally:
        d.close()
