"""engines.precision: the reduced-precision check against the float64 reference."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from idql_runtime import onednn
from idql_runtime.decision import DecisionNoise, DecisionOutput
from idql_runtime.engines import build_engine
from idql_runtime.engines.base import Engine
from idql_runtime.engines.precision import (
    PRECISION_LIMITS,
    PrecisionCheck,
    precision_ok,
    precision_report,
    reduced_dtype_for,
    rollout_states,
    select_precision,
)
from tests.procs import actor, pretrained_checkpoint
from tests.test_engines import Reference, _agent


class WorstPick(Engine):
    """Picks the float64 reference's *worst* candidate and returns its exact action:
    regret is then exactly 1 in every state, the action error exactly 0."""

    name = "worst"

    def _run(self, obs: torch.Tensor, noise: DecisionNoise | None) -> DecisionOutput:
        assert noise is not None
        ref = Reference(self, obs, noise)
        idx = ref.q.argmin(dim=-1)
        rows = torch.arange(obs.shape[0])
        return DecisionOutput(
            ref.x[rows, idx].float(), ref.q[rows, idx].float(), ref.out.value.float(),
            (ref.q.amax(-1) - ref.q.amin(-1)).float(), idx,
        )  # fmt: skip


def _obs(m: int, d: int = 17, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)


def test_candidates_are_the_naive_references_candidates():
    engine = build_engine(_agent(0, tiny=True), kind="eager", batch=2, samples=8)
    obs = torch.as_tensor(_obs(2))
    noise = DecisionNoise.draw(engine.spec, generator=torch.Generator().manual_seed(1))
    ref = Reference(engine, obs, noise)  # naive float64 sampler + full Q forward
    d64 = engine.decision.to(torch.float64)
    with torch.no_grad():
        x, q = d64.candidates(obs.double(), noise.x_init.double(), noise.step_noise.double())
    torch.testing.assert_close(q, ref.q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x[torch.arange(2), ref.out.index], ref.out.action)


def test_sample_steps_is_sample_one_reverse_step_at_a_time():
    d64 = build_engine(_agent(0, tiny=True), kind="eager", batch=2, samples=8).reference_decision()
    d64.extra_final_steps = 1  # a noiseless extra step at t = 0 too
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(2, 17, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 8, 6, generator=g, dtype=torch.float64)
    z = torch.randn(d64.steps, 2, 8, 6, generator=g, dtype=torch.float64)
    steps = d64.sample_steps(obs, x0, z)
    yields = 0
    try:
        while True:
            next(steps)
            yields += 1
    except StopIteration as end:
        x = end.value
    assert yields == d64.steps + 1 == len(d64.reverse_plan())
    assert torch.equal(x, d64.sample(obs, x0, z))  # the same operations, bit for bit
    d64.trunk_dtype = torch.bfloat16
    with pytest.raises(ValueError, match="trunk_dtype"):
        next(d64.sample_steps(obs, x0, z))


def test_check_steps_are_small_units_with_the_one_shot_result():
    """Each step() is one unit (engine decision, one reference reverse step, or critic and
    metrics); states count as measured per whole batch; the report equals the one-shot
    computation (decision, float64 candidates, selection) on the same noise draws."""
    engine = build_engine(_agent(0, tiny=True), kind="cpu", dtype="bfloat16", batch=2, samples=8)
    obs = _obs(5)
    check = PrecisionCheck(engine, obs, seed=3)
    units = check.units_per_batch
    assert units == 2 + engine.spec.steps
    progress, kinds = [], [check.next_unit]
    while not check.step():
        progress.append(check.measured)
        kinds.append(check.next_unit)
    assert len(progress) + 1 == 3 * units  # 3 batches of 2 (the last padded)
    assert progress == [0] * (units - 1) + [2] * units + [4] * units
    one = ["decide"] + ["reverse"] * (units - 2) + ["score"]
    assert kinds == one * 3 and check.next_unit is None
    got = check.report()

    from idql_runtime.decision import select_index

    d64, gen = engine.reference_decision(), torch.Generator().manual_seed(3)
    regret, same = [], []
    for start in (0, 2, 4):
        chunk = obs[start : start + 2]
        chunk = np.concatenate([chunk, chunk[-1:]]) if len(chunk) < 2 else chunk
        noise = DecisionNoise.draw(engine.spec, generator=gen)
        out = engine.decide_with_noise(chunk, noise)
        o64, n64 = torch.as_tensor(chunk, dtype=torch.float64), [t.double() for t in noise]
        with torch.no_grad():
            x, q = d64.candidates(o64, n64[0], n64[1])
            ref = select_index(q, d64.v(o64), n64[2], d64.mode, d64.value_loss, d64.tau, d64.alpha)
        best, idx = q.amax(-1), out.index
        r = (best - q[torch.arange(2), idx]) / (best - q.amin(-1)).clamp_min(1e-12)
        keep = min(2, 5 - start)
        regret.append(r[:keep].numpy())
        same.append((idx == ref)[:keep].numpy())
    assert got["regret_max"] == np.concatenate(regret).max()
    assert got["regret_mean"] == np.concatenate(regret).mean()
    assert got["same_pick"] == np.concatenate(same).mean()


def test_reference_is_free_of_the_engines_speedups():
    """The GPU engines serve the time shares from a float32 cache on their device and run
    the score network in bf16: the float64 reference must do neither (on a GPU engine the
    cached buffer raised a device mismatch inside precision_report)."""
    from idql_runtime.engines.base import TimeShareCache

    engine = build_engine(_agent(0, tiny=True), kind="eager", batch=2, samples=8)
    TimeShareCache(engine.decision)  # what cuda_graph / compiled attach
    engine.decision.trunk_dtype = torch.bfloat16
    assert engine.decision.time_shares(torch.float64, torch.device("cpu")).dtype == torch.float32
    d64 = engine.reference_decision()
    assert d64.trunk_dtype is None
    shares = d64.time_shares(torch.float64, torch.device("cpu"))
    assert shares.dtype == torch.float64
    want = engine.decision.time_shares(torch.float32, torch.device("cpu")).double()
    torch.testing.assert_close(shares, want, rtol=1e-6, atol=1e-6)
    assert engine.decision.trunk_dtype == torch.bfloat16  # the engine keeps its own


@pytest.mark.parametrize("batch", [1, 3])
def test_float32_cpu_engine_has_no_regret(batch):
    engine = build_engine(_agent(0, tiny=True), kind="cpu", batch=batch, samples=16)
    rep = precision_report(engine, _obs(10), seed=0)  # 10 states: last chunk padded for B=3
    assert rep["states"] == 10
    assert rep["regret_max"] <= 1e-4 and rep["action_err_max"] <= 1e-4
    assert rep["same_pick"] >= 0.9  # a different pick only on a float32 near-tie
    assert precision_ok(rep) == (True, "within limits")


def test_worst_pick_has_regret_one_and_fails():
    agent = _agent(1, tiny=True)
    spec = build_engine(agent, kind="eager", batch=2, samples=8).spec
    engine = WorstPick(agent, spec)
    rep = precision_report(engine, _obs(6), seed=0)
    assert rep["regret_mean"] == pytest.approx(1.0, abs=1e-12)
    assert rep["regret_p99"] == pytest.approx(1.0, abs=1e-12)
    assert rep["action_err_max"] <= 1e-6 and rep["same_pick"] == 0.0
    ok, why = precision_ok(rep)
    assert not ok and why.startswith("regret_p99 = 1 > 0.05")


def test_limits_name_the_failing_metric():
    rep = {"regret_p99": 0.01, "action_err_p99": 0.2}
    assert precision_ok(rep) == (False, "action_err_p99 = 0.2 > 0.05")
    assert precision_ok(rep, {"regret_p99": 0.5}) == (True, "within limits")


def test_needs_states():
    engine = build_engine(_agent(0, tiny=True), kind="eager", batch=1, samples=4)
    with pytest.raises(ValueError, match="at least one observation"):
        precision_report(engine, np.zeros((0, 17), np.float32))


def test_rollout_states_refuses_a_count_below_one_before_making_an_env(monkeypatch):
    """idql-actor --dtype auto --calibration-states 0 used to end in numpy's "need at least
    one array to stack"; now the count is named, and no env is made for it."""
    import idql_runtime.envs as envs

    made: list[str] = []

    class FakeEnv:  # obs = the step count, never terminates
        def reset(self, seed=None):
            self.t = 0
            return np.zeros(3, np.float32), {}

        def step(self, action):
            self.t += 1
            return np.full(3, self.t, np.float32), 0.0, False, False, {}

        def close(self):
            pass

    monkeypatch.setattr(envs, "make_env", lambda env_id: made.append(env_id) or FakeEnv())
    for count in (0, -2):
        with pytest.raises(ValueError, match=rf"positive integer .*got {count}$"):
            rollout_states("Hopper-v5", lambda obs: np.zeros(1), count)
    assert made == []
    states = rollout_states("Hopper-v5", lambda obs: np.zeros(1), np.int64(2))
    assert states.shape == (2, 3) and states[:, 0].tolist() == [0.0, 1.0]
    assert made == ["Hopper-v5"]


# ------------------------------------------------------------------ choosing a precision


def test_select_precision_keeps_reduced_only_when_it_passes():
    agent = _agent(2, tiny=True)
    good = {"float32": build_engine(agent, kind="cpu", batch=1, samples=8)}
    spec = good["float32"].spec
    states = _obs(8)

    # A "reduced" engine that is exactly as good as float32: kept.
    chosen = select_precision(
        lambda dtype: build_engine(agent, kind="cpu", batch=1, samples=8), "bfloat16", states
    )
    assert chosen.info["precision_check"]["chosen"] == "bfloat16"
    assert chosen.info["precision_check"]["why"] == "within limits"

    # One that picks the worst candidate: refused, the float32 fallback is returned.
    def build(dtype):
        return WorstPick(agent, spec) if dtype == "bfloat16" else good["float32"]

    chosen = select_precision(build, "bfloat16", states, fallback=good["float32"])
    assert chosen is good["float32"]
    record = chosen.info["precision_check"]
    assert record["chosen"] == "float32" and record["why"].startswith("regret_p99 = 1 >")
    assert record["tried"]["regret_mean"] == pytest.approx(1.0, abs=1e-12)

    # Nothing to try, or nothing to try it on: float32 without measuring.
    for reduced, s, why in [
        (None, states, "no reduced precision"),
        ("bfloat16", None, "no calibration"),
    ]:
        chosen = select_precision(
            lambda dtype: build_engine(agent, kind="cpu", samples=8), reduced, s
        )
        assert chosen.dtype == torch.float32 and chosen.info["precision_check"]["why"].startswith(
            why
        )


def test_reduced_dtype_only_where_it_can_pay():
    assert reduced_dtype_for("eager", "cpu") is None  # autocast bf16 is no faster on a CPU
    assert reduced_dtype_for("cuda_graph", "cpu") is None
    # not on an AVX2-only CPU, where bf16 is only emulated (engines/cpu.py)
    assert reduced_dtype_for("cpu", "cpu") == ("bfloat16" if onednn.bf16_native() else None)


@pytest.fixture(scope="module")
def tiny_ckpt(hopper_store_path, tmp_path_factory):
    return pretrained_checkpoint(hopper_store_path, tmp_path_factory.mktemp("pre"))


def test_actor_dtype_auto_decides_by_the_measured_check(tiny_ckpt, tmp_path):
    """idql-actor --dtype auto: the precision it runs is the one its own measurement on
    the float32 policy's states allows (a real process, a real MuJoCo env)."""
    p = actor(tmp_path, tiny_ckpt, None, 0, "--engine", "cpu", "--dtype", "auto",
              "--calibration-states", "24", "--episodes", "1", "--rate-hz", "0")  # fmt: skip
    assert p.wait(120) == 0, p.stderr()[-2000:]
    final = p.find("actor_final")[0]
    record = final["precision_check"]
    reduced = reduced_dtype_for("cpu", "cpu")
    if reduced is None:
        assert record["chosen"] == "float32" and "tried" not in record
    else:
        tried = record["tried"]
        assert tried["states"] == 24 and tried["dtype"] == reduced
        passes = all(tried[k] <= v for k, v in PRECISION_LIMITS.items())
        assert record["chosen"] == (reduced if passes else "float32")
    assert final["dtype"] == record["chosen"]
    assert "--dtype auto: " + record["chosen"] in p.stderr()


def test_reduced_precision_runs_only_the_score_network_in_it():
    """bf16 engines (eager here; cuda_graph and compiled share Decision.trunk_dtype) round
    the score network's products only: Q gaps between candidates are often below bf16's
    resolution of Q, so the critic must score the candidates in float32."""
    agent = _agent(0, tiny=True)
    e32 = build_engine(agent, kind="eager", samples=16)
    e16 = build_engine(agent, kind="eager", samples=16, dtype="bfloat16")
    assert e16.decision.trunk_dtype == torch.bfloat16 and e32.decision.trunk_dtype is None
    obs = torch.as_tensor(_obs(1))
    noise = DecisionNoise.draw(e16.spec, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        x32, _ = e32.decision.candidates(obs, noise.x_init, noise.step_noise)
        x16, q16 = e16.decision.candidates(obs, noise.x_init, noise.step_noise)
        q_exact = e32.decision.score_candidates(obs, x16)  # float32 critic, same candidates
    assert x16.dtype == torch.float32 and q16.dtype == torch.float32
    assert float((x16 - x32).abs().max()) > 1e-4  # the bf16 trunk did run
    assert torch.equal(q16, q_exact)  # and the critic did not
    out = e16.decide_with_noise(obs, noise)
    assert torch.equal(out.chosen_q, q_exact[0, out.index])


def test_actor_leaves_reduced_precision_when_the_score_network_changes():
    """--dtype auto checked bf16 on the weights the actor started with. A critic update
    keeps it; an update of the score network (learner --finetune-actor) switches the actor,
    between ticks, to the float32 engine on the new weights (real links over loopback
    ZeroMQ, a real MuJoCo env)."""
    from idql_runtime.actor_runtime import Actor
    from idql_runtime.transport import ActorLink, LearnerLink
    from tests.test_transport import wait_for

    agent, new = _agent(0, tiny=True), _agent(1, tiny=True)
    reduced = build_engine(agent, kind="eager", dtype="bfloat16", samples=16)
    reduced.info["precision_check"] = {"chosen": "bfloat16", "why": "within limits"}
    fallback = build_engine(agent, kind="cpu", dtype="float32", samples=16)
    learner = LearnerLink("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", weights_republish_s=None)
    link = ActorLink(learner.ingest_endpoint, learner.weights_endpoint, 1)
    actor = Actor(agent, reduced, "HalfCheetah-v5", link=link, float32_fallback=fallback)
    state = {k: v.numpy() for k, v in new.inference_state().items()}
    critic = {k: v for k, v in state.items() if not k.startswith("score_ema.")}
    try:
        swapped = wait_for(
            actor.maybe_swap_weights, 5.0, 0.02, poll=lambda: learner.publish_weights(1, critic)
        )
        assert swapped
        assert actor.engine is reduced and actor.policy_version == 1

        swapped = wait_for(
            actor.maybe_swap_weights, 5.0, 0.02, poll=lambda: learner.publish_weights(2, state)
        )
        assert swapped
        assert actor.engine is fallback and actor.report.precision_fallback_version == 2
        record = fallback.info["precision_check"]
        assert record["chosen"] == "float32" and record["before"]["chosen"] == "bfloat16"
        obs = torch.as_tensor(_obs(1))
        noise = DecisionNoise.draw(fallback.spec, generator=torch.Generator().manual_seed(4))
        want = build_engine(new, kind="cpu", samples=16).decide_with_noise(obs, noise)
        got = actor.engine.decide_with_noise(obs, noise)
        torch.testing.assert_close(got.action, want.action, atol=1e-5, rtol=0)
    finally:
        actor.close()
        link.close(flush_timeout_s=0.5)
        learner.close()


def _recheck_setup(limits: dict[str, float], **actor_kw: object) -> tuple:
    """An actor on a bf16 engine (as --dtype auto leaves it), its float32 fallback, six
    calibration states, and a learner link over loopback ZeroMQ to publish weights on."""
    from idql_runtime.actor_runtime import Actor
    from idql_runtime.transport import ActorLink, LearnerLink

    agent = _agent(0, tiny=True)
    reduced = build_engine(agent, kind="eager", dtype="bfloat16", samples=16)
    reduced.info["precision_check"] = {"chosen": "bfloat16", "why": "within limits"}
    fp32 = build_engine(agent, kind="cpu", dtype="float32", samples=16)
    learner = LearnerLink("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", weights_republish_s=None)
    link = ActorLink(learner.ingest_endpoint, learner.weights_endpoint, 1)
    actor = Actor(
        agent, reduced, "HalfCheetah-v5", link=link, rate_hz=0, float32_fallback=fp32,
        precision_states=_obs(6), precision_limits=limits, **actor_kw,
    )  # fmt: skip
    return actor, reduced, fp32, learner, link


def _units(engine: Engine) -> int:
    """Idle steps per calibration state (batch 1): the engine's decision, one float64
    reference reverse step each, the reference critic and the metrics."""
    return 2 + len(engine.reference_decision().reverse_plan())


def _publish(actor: object, learner: object, version: int, agent_seed: int) -> None:
    from tests.test_transport import wait_for

    state = {k: v.numpy() for k, v in _agent(agent_seed, tiny=True).inference_state().items()}
    swapped = wait_for(
        actor.maybe_swap_weights,  # type: ignore[attr-defined]
        5.0,
        0.02,
        poll=lambda: learner.publish_weights(version, state),  # type: ignore[attr-defined]
    )
    assert swapped and actor.policy_version == version  # type: ignore[attr-defined]


def test_actor_rechecks_a_new_score_network_between_ticks_and_returns_to_bf16():
    """After the fall-back to float32, the actor re-runs the precision check on the new
    score network, one small unit per tick in the idle time on the decision thread (the
    real run loop: control on a helper thread, decisions on this one), and goes back to
    the reduced engine, now on the new weights, when it passes."""
    lenient = {"regret_p99": 1.0, "action_err_p99": 2.0}  # the mechanism, not the limits
    actor, reduced, fp32, learner, link = _recheck_setup(lenient)
    try:
        _publish(actor, learner, 2, agent_seed=1)
        assert actor.engine is fp32 and actor.report.precision_fallback_version == 2
        assert actor.status()["precision"] == {"dtype": "float32", "recheck": "v2 0/6"}

        ticks = 2 + 6 * _units(reduced)  # rate 0: one idle step a tick; load, init, 6 states
        report = actor.run(max_steps=ticks)
        assert actor.engine is reduced and report.precision_return_version == 2
        assert report.steps == ticks and actor.decider.stats.decisions == ticks  # none refused
        fell, back = report.precision_events
        assert fell == {"version": 2, "dtype": "float32", "why": "score network changed"}
        assert back["version"] == 2 and back["dtype"] == "bfloat16"
        assert "precision" in actor.status() and "recheck" not in actor.status()["precision"]

        # the reduced engine now decides with the new weights, and the re-check measured
        # exactly what precision_report measures on them
        obs = torch.as_tensor(_obs(1, seed=9))
        noise = DecisionNoise.draw(reduced.spec, generator=torch.Generator().manual_seed(4))
        want = build_engine(_agent(1, tiny=True), kind="eager", dtype="bfloat16", samples=16)
        got = actor.engine.decide_with_noise(obs, noise)
        torch.testing.assert_close(got.action, want.decide_with_noise(obs, noise).action)
        full = precision_report(actor.engine, _obs(6), seed=actor.seed)
        for key in ("regret_p99", "action_err_p99", "same_pick"):
            assert back[key] == full[key]
    finally:
        actor.close()
        link.close(flush_timeout_s=0.5)
        learner.close()


def test_actor_recheck_restarts_on_a_newer_score_network_and_can_keep_float32():
    """A score update during a re-check restarts it on the newest weights; a re-check
    that fails the limits leaves the actor on float32 and says why."""
    from idql_runtime.control import RateKeeper

    strict = {"regret_p99": -1.0}  # nothing passes
    actor, reduced, fp32, learner, link = _recheck_setup(strict, decide_on_main_thread=False)
    actor.rate = RateKeeper(0)
    try:
        _publish(actor, learner, 2, agent_seed=1)
        units = _units(reduced)
        for _ in range(2 + units):  # load, init, then the first state's units
            assert actor.idle_work()
        assert actor.status()["precision"]["recheck"] == "v2 1/6"
        _publish(actor, learner, 3, agent_seed=2)
        assert actor.engine is fp32  # still: no second fall-back event
        assert actor.status()["precision"]["recheck"] == "v3 0/6"
        steps = 0
        while actor.idle_work():
            steps += 1
        assert steps == 2 + 6 * units  # load, init, 6 states, for version 3 only
        assert actor.engine is fp32 and actor.report.precision_return_version is None
        last = actor.report.precision_events[-1]
        assert len(actor.report.precision_events) == 2
        assert last["version"] == 3 and last["dtype"] == "float32"
        assert "regret_p99" in last["why"] and last["regret_p99"] >= 0.0
        assert not actor.idle_work()  # nothing left to do until the next score update
    finally:
        actor.close()
        link.close(flush_timeout_s=0.5)
        learner.close()


def test_actor_recheck_waits_for_enough_time_before_the_next_tick():
    """The re-check's steps run only when the time left before the next tick is at least
    half a period (the first step of a kind) and then twice the longest step of the same
    kind so far: a long one-off weight load does not hold back the short units."""
    from idql_runtime.control import RateKeeper

    actor, reduced, fp32, learner, link = _recheck_setup({}, decide_on_main_thread=False)
    actor.rate = RateKeeper(10.0)  # period 0.1 s
    try:
        _publish(actor, learner, 2, agent_seed=1)
        actor.rate.next_tick = time.monotonic() + 0.03  # < half a period left
        assert not actor.idle_work() and actor.status()["precision"]["recheck"] == "v2 0/6"
        actor.rate.next_tick = time.monotonic() + 10.0
        units = _units(reduced)
        for _ in range(2 + units):  # load, init, then the first state's units
            assert actor.idle_work()
        assert set(actor._recheck_unit_s) == {"load", "init", "decide", "reverse", "score"}
        assert actor._recheck_next_unit() == "decide"
        longest = actor._recheck_unit_s["decide"]
        assert longest > 0
        actor.rate.next_tick = time.monotonic() + 1.5 * longest  # < twice the longest step
        assert not actor.idle_work() and actor.status()["precision"]["recheck"] == "v2 1/6"
        actor._recheck_unit_s["load"] = 10.0  # a long load counts for loads only
        actor.rate.next_tick = time.monotonic() + 3.0 * longest + 0.05
        assert actor.idle_work() and actor._recheck_next_unit() == "reverse"
        actor.rate.next_tick = time.monotonic() + 10.0
        for _ in range(units - 1):
            assert actor.idle_work()
        assert actor.status()["precision"]["recheck"] == "v2 2/6"
    finally:
        actor.close()
        link.close(flush_timeout_s=0.5)
        learner.close()


def test_actor_recheck_that_raises_leaves_the_actor_on_float32_and_running():
    """An error inside the re-check (here: the reduced engine refuses the weights) is an
    event, not a crash: the actor stays on float32 and goes on deciding."""
    from idql_runtime.control import RateKeeper

    actor, reduced, fp32, learner, link = _recheck_setup({}, decide_on_main_thread=False)
    actor.rate = RateKeeper(0)

    def refuse(*_a: object, **_k: object) -> None:
        raise ValueError("weights refused by the reduced engine")

    try:
        _publish(actor, learner, 2, agent_seed=1)
        reduced.load_weights = refuse  # type: ignore[method-assign]
        assert not actor.idle_work()
        event = actor.report.precision_events[-1]
        assert event["version"] == 2 and event["dtype"] == "float32"
        assert "ValueError: weights refused by the reduced engine" in event["why"]
        assert not actor.idle_work() and "recheck" not in actor.status()["precision"]
        assert actor.engine is fp32
        action, late = actor.decider.decide(_obs(1)[0], time.monotonic() + 5.0)
        assert not late and action.shape == (6,)
    finally:
        actor.close()
        link.close(flush_timeout_s=0.5)
        learner.close()
