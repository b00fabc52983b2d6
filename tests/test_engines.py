"""Decision engines against the float64 naive reference on the same noise.

Tolerances (max abs error of the chosen action, actions live in [-1, 1]):
- float32 engines: 1e-4. The float32 hoisted decision differs from float64 by rounding
  only (~1e-6 here); 1e-4 leaves room for other BLAS/oneDNN blockings.
- bfloat16 (block products in bf16, float32 accumulation and residual stream): 0.15 on
  the action, 0.05 relative on the chosen Q. bf16 keeps 8 mantissa bits (rel. 4e-3 per
  product); five reverse steps with an exploding random-weight score net amplify it.
A candidate index may differ from the reference's only where the reference's two best
Q values are within the dtype's Q tolerance of each other (a near-tie), asserted below.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idql_runtime import diffusion, onednn
from idql_runtime.agent import Agent
from idql_runtime.config import Config, load_config
from idql_runtime.decision import DecisionNoise, DecisionOutput
from idql_runtime.engines import available_engines, build_engine, resolve_kind
from idql_runtime.engines.base import Engine, EngineUnavailable
from tests.conftest import TINY

TOL = {"float32": (1e-4, 1e-4), "bfloat16": (0.15, 0.05), "float16": (0.1, 0.03)}
"""dtype -> (max abs action error, relative chosen-Q error), see module docstring."""


def _agent(seed: int = 0, tiny: bool = False, obs_dim: int = 17, act_dim: int = 6) -> Agent:
    torch.manual_seed(seed)
    c = Config()
    if tiny:  # for tests that compile: keeps inductor's work small on 2 cores
        c.network.hidden_dim, c.network.num_blocks, c.network.time_dim = 32, 1, 8
        c.network.cond_hidden, c.critic.hidden = [16, 16], [32, 32]
    return Agent(c, obs_dim, act_dim)


def _noise(engine: Engine, seed: int = 1) -> DecisionNoise:
    return DecisionNoise.draw(engine.spec, generator=torch.Generator().manual_seed(seed))


class Reference:
    """The float64 naive reference of an engine on given noise: ``out`` (the decision),
    ``x`` every candidate (B, N, A) and ``q`` its min-over-heads Q (B, N)."""

    def __init__(self, engine: Engine, obs: torch.Tensor, noise: DecisionNoise) -> None:
        self.out = engine.reference(obs, noise)
        d64 = copy.deepcopy(engine.decision).to("cpu", torch.float64)
        b, n, a = noise.x_init.shape
        obs64 = obs.double().repeat_interleave(n, dim=0)
        with torch.no_grad():
            x = diffusion.sample(
                d64.score,
                obs64,
                noise.x_init.double().reshape(b * n, a),
                noise.step_noise.double().reshape(-1, b * n, a),
                engine.schedule,
                temperature=d64.temperature,
                clip=d64.clip,
                extra_final_steps=d64.extra_final_steps,
            )
            self.q = d64.q(obs64, x).amin(0).reshape(b, n)
            self.x = x.reshape(b, n, a)
        torch.testing.assert_close(
            self.q.gather(1, self.out.index.view(b, 1)).squeeze(1), self.out.chosen_q
        )


def assert_matches_reference(out: DecisionOutput, ref: Reference, dtype: str) -> None:
    """Action and chosen Q within the dtype's tolerance; same candidate unless a near-tie."""
    act_tol, q_rel = TOL[dtype]
    r = ref.out
    assert out.action.shape == r.action.shape
    for b in range(r.index.shape[0]):
        q_tol = q_rel * max(1.0, abs(float(r.chosen_q[b])))
        picked, best = int(out.index[b]), int(r.index[b])
        if picked != best:
            # Allowed only where the reference's Q of the engine's pick ties with its best.
            gap = float(ref.q[b, best] - ref.q[b, picked])
            assert 0.0 <= gap <= q_tol, (
                f"row {b}: engine picked {picked}, reference {best}; Q gap {gap:.3g} > {q_tol:.3g}"
            )
            continue
        err = (out.action[b].double() - r.action[b]).abs().max().item()
        assert err <= act_tol, f"row {b}: action error {err:.3g} > {act_tol} ({dtype})"
        q_err = abs(float(out.chosen_q[b]) - float(r.chosen_q[b]))
        assert q_err <= q_tol, f"row {b}: chosen-Q error {q_err:.3g} > {q_tol:.3g} ({dtype})"
    torch.testing.assert_close(out.value.double(), r.value, atol=q_rel, rtol=q_rel)
    assert out.action.abs().max() <= 1.0


def reference(engine: Engine, obs: torch.Tensor, noise: DecisionNoise) -> Reference:
    return Reference(engine, torch.as_tensor(obs), noise)


@pytest.mark.parametrize("mode", ["argmax", "implicit"])
@pytest.mark.parametrize(
    "kind,dtype", [("eager", "float32"), ("cpu", "float32"), ("cpu", "bfloat16")]
)
def test_cpu_engines_match_float64_reference(kind: str, dtype: str, mode: str) -> None:
    agent = _agent()
    for batch, samples in ((1, 64), (3, 16)):
        eng = build_engine(agent, kind=kind, batch=batch, samples=samples, mode=mode, dtype=dtype)
        assert eng.name == kind
        obs = torch.randn(batch, 17, generator=torch.Generator().manual_seed(7))
        noise = _noise(eng)
        assert_matches_reference(
            eng.decide_with_noise(obs, noise), reference(eng, obs, noise), dtype
        )


def test_cpu_bf16_is_emulated_where_onednn_has_no_bf16_kernels(monkeypatch) -> None:
    """On an AVX2-only CPU (AMD Zen 3, 2026-12-03) oneDNN refused to pack bf16 weights
    ("bf16 path needs the cpu support avx_ne_convert") and ``--dtype bfloat16`` crashed the
    cpu engine. It now emulates bf16 there (bf16 values, float32 products); forced here on
    any CPU: still within bf16's tolerance of the float64 reference, and not float32."""
    monkeypatch.setattr(onednn, "bf16_native", lambda: False)
    agent = _agent()
    eng = build_engine(agent, kind="cpu", batch=1, samples=64, dtype="bfloat16")
    assert eng.info["bf16"] == "emulated" and eng.dtype == torch.bfloat16
    obs = torch.randn(1, 17, generator=torch.Generator().manual_seed(7))
    noise = _noise(eng)
    out = eng.decide_with_noise(obs, noise)
    assert_matches_reference(out, reference(eng, obs, noise), "bfloat16")
    f32 = build_engine(agent, kind="cpu", batch=1, samples=64).decide_with_noise(obs, noise)
    assert float((out.action - f32.action).abs().max()) > 1e-4, "no bf16 rounding ran"


def test_emulated_bf16_product_equals_a_bf16_product_to_one_rounding() -> None:
    """The emulated block product (bf16-rounded weight, bias, input; float32 kernel; output
    rounded to bf16) gives what a bf16 product with float32 accumulation gives (aten's bf16
    ``F.linear``, which runs on every CPU): equal to within one bf16 rounding of the output
    (2**-8 relative), where plain float32 differs by far more."""
    from idql_runtime.engines.cpu import _bf16_round, _Linear

    g = torch.Generator().manual_seed(0)
    w, b, x = (
        torch.randn(96, 64, generator=g),
        torch.randn(96, generator=g),
        torch.randn(8, 64, generator=g),
    )
    lin = _Linear(w, b, 8, torch.bfloat16, onednn.available(), emulate=True)
    got = lin(_bf16_round(x), "relu")
    want = torch.relu(F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())).float()
    assert got.dtype == torch.float32 and torch.equal(got, _bf16_round(got))  # bf16 values
    scale = want.abs().clamp_min(1.0)
    assert float(((got - want).abs() / scale).max()) <= 2.0**-7
    assert float(((torch.relu(F.linear(x, w, b)) - want).abs() / scale).max()) > 2.0**-7 / 4


def test_decide_returns_numpy_actions_and_draws_fresh_noise() -> None:
    eng = build_engine(_agent(), kind="cpu", batch=2, samples=16, seed=3)
    obs = torch.randn(2, 17).numpy()
    a1, a2 = eng.decide(obs), eng.decide(obs)
    assert a1.shape == (2, 6) and str(a1.dtype) == "float32"
    assert not (a1 == a2).all(), "two decisions on the same obs drew the same noise"
    same_seed = build_engine(_agent(), kind="cpu", batch=2, samples=16, seed=3)
    assert (same_seed.decide(obs) == a1).all(), "a private generator with the same seed repeats"
    full = eng.decide_full(obs)
    assert full.index.dtype == torch.int64 and full.chosen_q.shape == (2,)
    assert (full.adv_spread >= 0).all()
    with pytest.raises(ValueError, match="shape"):
        eng.decide(torch.randn(3, 17).numpy())


@pytest.mark.parametrize("kind", ["eager", "cpu"])
def test_load_weights_matches_fresh_engine_on_new_weights(kind: str) -> None:
    old, new = _agent(seed=0), _agent(seed=1)
    eng = build_engine(old, kind=kind, batch=2, samples=32)
    obs, noise = torch.randn(2, 17), _noise(eng)
    before = eng.decide_with_noise(obs, noise)
    eng.load_weights(new.inference_state())
    after = eng.decide_with_noise(obs, noise)
    fresh = build_engine(new, kind=kind, batch=2, samples=32).decide_with_noise(obs, noise)
    assert (before.action - after.action).abs().max() > 1e-3, "weights did not change the decision"
    torch.testing.assert_close(after.action, fresh.action, atol=1e-6, rtol=0)
    assert after.index.tolist() == fresh.index.tolist()


@pytest.mark.parametrize("kind", ["eager", "cpu"])
def test_partial_load_swaps_only_the_groups_given(kind: str) -> None:
    """What the online learner broadcasts (target Q and V) swaps in alone: the result
    equals a fresh engine on the old score network with the new critic."""
    old, new = _agent(seed=0), _agent(seed=1)
    eng = build_engine(old, kind=kind, batch=2, samples=32)
    obs, noise = torch.randn(2, 17), _noise(eng)
    critic = {k: v for k, v in new.inference_state().items() if k.startswith(("q_target.", "v."))}
    eng.load_weights(critic, partial=True)
    mixed = _agent(seed=0)
    mixed.load_inference_state(critic, strict=False)
    fresh = build_engine(mixed, kind=kind, batch=2, samples=32).decide_with_noise(obs, noise)
    after = eng.decide_with_noise(obs, noise)
    torch.testing.assert_close(after.action, fresh.action, atol=1e-6, rtol=0)
    torch.testing.assert_close(after.chosen_q, fresh.chosen_q, atol=1e-5, rtol=1e-5)
    incomplete = {k: v for k, v in critic.items() if k != "v.mlp.0.bias"}
    with pytest.raises(ValueError, match="missing"):
        eng.load_weights(incomplete, partial=True)


def test_load_weights_rejects_bad_tensors_and_leaves_weights_alone() -> None:
    """A rejected load writes nothing. Each bad dict is *another* agent's weights with the
    bad tensor last in its order, so a load that checks and writes tensor by tensor would
    have written every other tensor before raising: the engine's weights and decisions
    are compared exactly with what they were."""
    from idql_runtime.engines.base import decision_state

    eng = build_engine(_agent(seed=0), kind="cpu", samples=16)
    obs, noise = torch.randn(1, 17), _noise(eng)
    before = eng.decide_with_noise(obs, noise)
    weights = {k: v.clone() for k, v in decision_state(eng.decision).items()}
    other = _agent(seed=1).inference_state()
    last = list(other)[-1]  # "v.mlp.4.bias": checked last by a load in dict order

    def unchanged() -> None:
        now = decision_state(eng.decision)
        changed = [k for k, v in weights.items() if not torch.equal(now[k], v)]
        assert not changed, f"a rejected load wrote {len(changed)} tensor(s): {changed[:3]}"
        after = eng.decide_with_noise(obs, noise)
        assert torch.equal(after.action, before.action)
        assert torch.equal(after.index, before.index)

    bad = dict(other)
    bad[last] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=f"{last} has shape"):
        eng.load_weights(bad)
    unchanged()
    missing = {k: v for k, v in other.items() if k != last}
    with pytest.raises(ValueError, match="missing"):
        eng.load_weights(missing)
    unchanged()
    nan = dict(other)
    nan[last] = torch.full_like(other[last], float("nan"))
    with pytest.raises(ValueError, match=f"{last} has non-finite"):
        eng.load_weights(nan)
    unchanged()
    with pytest.raises(ValueError, match="unexpected"):
        eng.load_weights({**other, "v.mlp.6.bias": torch.zeros(1)})
    unchanged()
    # the other agent's weights do move the decision, so a partial write could be seen
    eng.load_weights(other)
    assert (eng.decide_with_noise(obs, noise).action - before.action).abs().max() > 1e-3


def test_engine_owns_its_weights() -> None:
    """Training the agent after building an engine does not change the engine's decisions."""
    agent = _agent()
    eng = build_engine(agent, kind="cpu", samples=16)
    obs, noise = torch.randn(1, 17), _noise(eng)
    before = eng.decide_with_noise(obs, noise).action
    with torch.no_grad():
        for p in agent.score_ema.parameters():
            p.mul_(2.0)
    torch.testing.assert_close(eng.decide_with_noise(obs, noise).action, before)


def test_time_share_cache_serves_the_same_decision_and_follows_weight_swaps() -> None:
    """The GPU engines read the T time shares from a buffer refreshed on load_weights."""
    from idql_runtime.engines.base import TimeShareCache, copy_weights_into, private_decision

    agent, other = _agent(seed=0), _agent(seed=1)
    plain = private_decision(agent, None, torch.device("cpu"))
    cached = private_decision(agent, None, torch.device("cpu"))
    cache = TimeShareCache(cached)
    eng = build_engine(agent, kind="eager", samples=16)
    obs, noise = torch.randn(1, 17), _noise(eng)
    with torch.no_grad():
        torch.testing.assert_close(cached(obs, *noise).action, plain(obs, *noise).action)
        copy_weights_into(cached, other.inference_state())
        copy_weights_into(plain, other.inference_state())
        stale = cache.buffer.clone()
        cache.refresh()
        assert not torch.equal(stale, cache.buffer)
        torch.testing.assert_close(cached(obs, *noise).action, plain(obs, *noise).action)


def test_auto_picks_fastest_available_and_names_it() -> None:
    assert available_engines("cpu") == ["eager", "cpu", "compiled"]
    assert resolve_kind("auto", "cpu") == "cpu"
    eng = build_engine(_agent(), samples=8)
    assert eng.name == "cpu"
    assert eng.describe()["engine"] == "cpu"


def test_auto_on_cuda_takes_triton_for_small_decisions_and_falls_back_when_it_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The CUDA choice as a rule, with the engines stood in for (no GPU here): triton up to
    TRITON_AUTO_MAX_ROWS = B * N (measured faster there, slower at B = 64), cuda_graph
    above; a triton build that fails is logged with its reason and cuda_graph is built."""
    import idql_runtime.engines as engines
    from idql_runtime.engines.eager import EagerEngine

    have = ["eager", "cuda_graph", "compiled", "triton"]
    monkeypatch.setattr(engines, "available_engines", lambda device="cpu": list(have))
    monkeypatch.setattr(engines, "_cuda_ok", lambda: True)
    limit = engines.TRITON_AUTO_MAX_ROWS
    assert engines.auto_candidates("cuda", 128) == ["triton", "cuda_graph", "eager"]
    assert resolve_kind("auto", "cuda", rows=limit) == "triton"
    assert resolve_kind("auto", "cuda", rows=limit + 1) == "cuda_graph"
    assert resolve_kind("auto", "cuda") == "cuda_graph"  # size unknown

    built: list[str] = []

    def factory(kind: str):
        def make(agent, spec, **kw):
            built.append(kind)
            if kind == "triton":
                raise RuntimeError("out of resources: shared memory, required: 300000")
            return EagerEngine(agent, spec, device="cpu", seed=kw["seed"])

        return make

    monkeypatch.setattr(engines, "_factory", factory)
    with caplog.at_level(logging.INFO, logger=engines.log.name):
        eng = build_engine(_agent(), batch=1, samples=128, device="cuda")
    assert built == ["triton", "cuda_graph"]
    assert eng.info["auto"]["failed"][0].startswith("triton: RuntimeError: out of resources")
    assert "triton did not build (out of resources" in caplog.text
    built.clear()
    build_engine(_agent(), batch=64, samples=16, device="cuda")
    assert built == ["cuda_graph"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
@pytest.mark.parametrize("kind", ["cuda_graph", "compiled", "eager"])
def test_gpu_engines_without_gpu_raise_a_clear_error(kind: str) -> None:
    with pytest.raises(EngineUnavailable, match="no CUDA GPU"):
        build_engine(_agent(), kind=kind, device="cuda")


def test_tensorrt_without_tensorrt_names_what_is_missing() -> None:
    from idql_runtime.engines.tensorrt import tensorrt_status

    if tensorrt_status() is None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: the engine builds (tested under -m gpu)")
    with pytest.raises(EngineUnavailable, match="TensorRT engine cannot run here") as info:
        build_engine(_agent(), kind="tensorrt", device="cuda")
    msg = str(info.value)
    assert ("torch_tensorrt" in msg) or ("no CUDA GPU" in msg)
    with pytest.raises(ValueError, match="CUDA device"):
        build_engine(_agent(), kind="tensorrt", device="cpu")


def test_unknown_engine_and_dtype_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown engine kind"):
        build_engine(_agent(), kind="tpu")
    with pytest.raises(ValueError, match="dtype"):
        build_engine(_agent(), kind="cpu", dtype="int8")
    with pytest.raises(ValueError, match="float16"):
        build_engine(_agent(), kind="cpu", dtype="float16")


# ---------------------------------------------------------------- what TensorRT would get
@pytest.mark.parametrize("mode", ["argmax", "implicit"])
def test_decision_exports_strictly_with_only_tensorrt_convertible_ops(mode: str) -> None:
    """torch.export(strict=True) fails on any graph break; then every core-ATen node must
    have a torch_tensorrt dynamo converter, shapes must be static, no Python callbacks."""
    from idql_runtime.engines.base import spec_of
    from idql_runtime.engines.export import export_decision, graph_report

    agent = _agent()
    ep = export_decision(agent.decision(mode), spec_of(agent, 1, 64, mode))
    rep = graph_report(ep)
    assert rep.ok, rep
    assert rep.ops["aten.native_layer_norm.default"] == 5 * 3 + 1  # T steps x blocks + V
    assert "aten.gather.default" in rep.ops  # selection by gather, not a[argmax]
    # The exported program computes the same decision as eager.
    from idql_runtime.engines.export import example_inputs

    args = example_inputs(spec_of(agent, 1, 64, mode))
    got = ep.module()(*args)
    want = agent.decision(mode)(*args)
    torch.testing.assert_close(got[0], want.action)
    assert got[4].tolist() == want.index.tolist()


def test_graph_report_flags_unconvertible_ops() -> None:
    from idql_runtime.engines.export import graph_report

    class Sorts(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.svdvals(x)

    rep = graph_report(torch.export.export(Sorts(), (torch.randn(3, 3),), strict=True))
    assert not rep.ok and rep.not_convertible


def test_bf16_export_leaves_the_agents_networks_in_float32() -> None:
    """agent.decision() shares score_ema, q_target and v with the agent: exporting it in
    bfloat16 must cast a copy, or the agent would go on training bf16 parameters."""
    from idql_runtime.engines.base import spec_of
    from idql_runtime.engines.export import export_decision

    agent = _agent(tiny=True)
    nets = {"score_ema": agent.score_ema, "q_target": agent.q_target, "v": agent.v}
    before = {
        f"{n}.{k}": t.detach().clone() for n, m in nets.items() for k, t in m.state_dict().items()
    }
    ep = export_decision(agent.decision(), spec_of(agent, 1, 8, None), compute_dtype=torch.bfloat16)
    assert {t.dtype for t in ep.state_dict.values()} == {torch.bfloat16}  # the export is bf16
    after = {f"{n}.{k}": t for n, m in nets.items() for k, t in m.state_dict().items()}
    for k, t in before.items():
        assert after[k].dtype == t.dtype == torch.float32, k
        assert torch.equal(after[k], t), k


def test_onnx_export_matches_eager_in_onnxruntime(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from idql_runtime.engines.base import spec_of
    from idql_runtime.engines.export import export_onnx, run_onnx

    agent = _agent()
    for mode in ("argmax", "implicit"):
        spec = spec_of(agent, 2, 32, mode)
        path = export_onnx(agent.decision(mode), spec, tmp_path / f"decision-{mode}.onnx")
        eng = build_engine(agent, kind="eager", batch=2, samples=32, mode=mode)
        obs, noise = torch.randn(2, 17), _noise(eng, seed=4)
        got = run_onnx(path, obs, noise)
        assert_matches_reference(got, reference(eng, obs, noise), "float32")
        want = eng.decide_with_noise(obs, noise)
        torch.testing.assert_close(got.action, want.action, atol=1e-5, rtol=0)
        assert got.index.tolist() == want.index.tolist()


# ---------------------------------------------------------------- compiled (CPU inductor)
def test_compiled_cpu_engine_matches_reference_and_swaps_weights() -> None:
    """torch.compile on a small network (compile time), weights swapped in place."""
    old, new = _agent(seed=0, tiny=True), _agent(seed=1, tiny=True)
    eng = build_engine(old, kind="compiled", batch=2, samples=16)
    assert eng.name == "compiled"
    obs, noise = torch.randn(2, 17), _noise(eng)
    assert_matches_reference(
        eng.decide_with_noise(obs, noise), reference(eng, obs, noise), "float32"
    )
    eng.load_weights(new.inference_state())
    fresh = build_engine(new, kind="eager", batch=2, samples=16)
    torch.testing.assert_close(
        eng.decide_with_noise(obs, noise).action,
        fresh.decide_with_noise(obs, noise).action,
        atol=1e-5,
        rtol=0,
    )


# ---------------------------------------------------------------- GPU engines
def _gpu_parity(kind: str, dtype: str, mode: str, **opts) -> None:
    agent = _agent()
    for batch, samples in ((1, 128), (4, 64)):
        eng = build_engine(
            agent,
            kind=kind,
            batch=batch,
            samples=samples,
            mode=mode,
            dtype=dtype,
            device="cuda",
            **opts,
        )
        obs = torch.randn(batch, 17)
        noise = _noise(eng)
        assert_matches_reference(
            eng.decide_with_noise(obs, noise), reference(eng, obs, noise), dtype
        )


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["argmax", "implicit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_engine_matches_reference(dtype: str, mode: str) -> None:
    _gpu_parity("cuda_graph", dtype, mode)


@pytest.mark.gpu
def test_cuda_graph_in_graph_rng_draws_fresh_noise_and_decides_on_it() -> None:
    """decide() replays the graph with philox draws inside it: fresh noise every call, and
    the action equals the reference on exactly the noise the graph drew."""
    agent = _agent()
    eng = build_engine(agent, kind="cuda_graph", batch=2, samples=64, device="cuda")
    obs = torch.randn(2, 17).numpy()
    out1 = eng.decide_full(obs)
    n1 = eng.last_noise()
    out2 = eng.decide_full(obs)
    n2 = eng.last_noise()
    assert not torch.equal(n1.x_init, n2.x_init)
    assert n1.x_init.std().item() == pytest.approx(1.0, abs=0.15)
    for out, noise in ((out1, n1), (out2, n2)):
        assert_matches_reference(out, reference(eng, obs, noise), "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cuda_graph", "triton"])
def test_gpu_numpy_decide_is_the_decision_on_the_noise_it_drew(kind: str) -> None:
    """decide(numpy) (the pinned-buffer path, no torch ops on the host) returns the action
    of the same decision that decide_with_noise computes on the noise the graph drew, as a
    fresh array, also from float64 observations; other inputs take the checked path.
    (Written after the last device call of 2026-11-26: not yet run on a GPU.)"""
    eng = build_engine(_agent(), kind=kind, batch=2, samples=32, device="cuda")
    obs = np.random.default_rng(0).standard_normal((2, 17))
    for given in (obs.astype(np.float32), obs):
        a = eng.decide(given)
        noise = eng.last_noise()  # type: ignore[attr-defined]
        want = eng.decide_with_noise(obs.astype(np.float32), noise).action.numpy()
        assert a.dtype == np.float32 and a.shape == (2, 6)
        np.testing.assert_allclose(a, want, rtol=0, atol=1e-6)
        b = eng.decide(given)
        assert not np.shares_memory(a, b)
    with pytest.raises(ValueError, match=r"obs has shape \(3, 17\)"):
        eng.decide(np.zeros((3, 17), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cuda_graph", "compiled"])
def test_gpu_load_weights_keeps_graph_valid(kind: str) -> None:
    old, new = _agent(seed=0, tiny=kind == "compiled"), _agent(seed=1, tiny=kind == "compiled")
    opts = {"compile_mode": "default"} if kind == "compiled" else {}
    eng = build_engine(old, kind=kind, batch=2, samples=32, device="cuda", **opts)
    obs, noise = torch.randn(2, 17), _noise(eng)
    eng.load_weights(new.inference_state())
    fresh = build_engine(new, kind="eager", batch=2, samples=32)
    torch.testing.assert_close(
        eng.decide_with_noise(obs, noise).action,
        fresh.decide_with_noise(obs, noise).action,
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.gpu
def test_compiled_gpu_engine_matches_reference() -> None:
    agent = _agent(tiny=True)
    eng = build_engine(
        agent, kind="compiled", batch=1, samples=64, device="cuda", compile_mode="default"
    )
    obs, noise = torch.randn(1, 17), _noise(eng)
    assert_matches_reference(
        eng.decide_with_noise(obs, noise), reference(eng, obs, noise), "float32"
    )


@pytest.mark.gpu
def test_tensorrt_engine_matches_reference_or_says_why_not(tmp_path) -> None:
    from idql_runtime.engines.tensorrt import tensorrt_status

    missing = tensorrt_status()
    if missing is not None:
        with pytest.raises(EngineUnavailable, match="torch_tensorrt"):
            build_engine(_agent(), kind="tensorrt", device="cuda", cache_dir=str(tmp_path))
        return
    agent = _agent()
    eng = build_engine(agent, kind="tensorrt", samples=64, device="cuda", cache_dir=str(tmp_path))
    obs, noise = torch.randn(1, 17), _noise(eng)
    assert_matches_reference(
        eng.decide_with_noise(obs, noise), reference(eng, obs, noise), "float32"
    )
    again = build_engine(agent, kind="tensorrt", samples=64, device="cuda", cache_dir=str(tmp_path))
    assert again.info["cache_hit"] is True


# ---------------------------------------------------------------- idql-bench
def test_idql_bench_writes_json_table_and_histogram(tmp_path, capsys) -> None:
    import json

    from idql_runtime.cli.bench import main

    rc = main(
        [
            "--engines",
            "auto,eager,cuda_graph",
            "--samples",
            "8",
            "--batch",
            "1,2",
            "--iters",
            "12",
            "--max-seconds",
            "0.3",
            "--rate-hz",
            "0,400",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["weights"]["source"] == "random" and "HalfCheetah" in out["weights"]["note"]
    assert out["machine"]["torch"] == torch.__version__
    rows = {(r["requested"], r["batch"], r.get("rate_hz")): r for r in out["decision"]}
    assert rows[("auto", 1, 0)]["engine"] == "cpu"
    for b in (1, 2):
        for rate in (0, 400):  # back to back, and paced at 400 Hz beside it
            r = rows[("auto", b, rate)]
            assert r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"] and r["eager_p50_us"] > 0
            assert r["speedup_p50"] == pytest.approx(r["eager_p50_us"] / r["p50_us"], rel=1e-2)
    # --device cpu: the CUDA-only engine is a clear error row, not a crash
    assert "CUDA device" in rows[("cuda_graph", 1, None)]["error"]
    assert (tmp_path / "latency_hist.png").stat().st_size > 1000
    assert json.loads((tmp_path / "bench.json").read_text())["decision"] == out["decision"]
    assert "auto>cpu" in captured.err  # what auto picked, told apart from a requested engine
    assert any(line.split()[3:4] == ["400"] for line in captured.err.splitlines())  # Hz column
    assert main(["--rate-hz", "-5", "--out", str(tmp_path)]) == 2
    assert "--rate-hz takes rates >= 0 (0 = back to back), got '-5'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--samples", "0"], "--samples takes a comma list of integers >= 1, got '0'"),
        (["--samples", "16,x"], "got '16,x'"),
        (["--batch", "-1"], "--batch takes a comma list of integers >= 1, got '-1'"),
        (["--engines", "cpu,cuda_grpah"], "unknown kind 'cuda_grpah'"),
        (["--dtype", "bf16"], "--dtype 'bf16': choose from float32, bfloat16, float16"),
        (["--dtype", "auto"], "float16 (auto is idql-actor's choice, made by a precision check"),
        (["--iters", "0"], "--iters must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--max-seconds", "nan"], "--max-seconds must be a finite number > 0, got nan"),
        (["--heavy-shapes", "128"], "--heavy-shapes takes NxB,NxB... or 'all', got '128'"),
        (["--learner-batch", "0"], "--learner-batch must be >= 1, got 0"),
    ],
)
def test_idql_bench_refuses_a_bad_flag_naming_it_before_building_anything(
    tmp_path, capsys, argv, named
) -> None:
    """Before: --samples 0 was a traceback; a misspelt engine or dtype gave error rows
    among (or instead of) the timed ones, and the run still exited 0."""
    from idql_runtime.cli.bench import main

    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()  # refused before anything was built or written


def _bench_json(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[dict, str]:
    import json

    from idql_runtime.cli.bench import main

    assert main(argv) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out[captured.out.index("{\n") :]), captured.err


def test_idql_bench_auto_falls_back_as_build_engine_does(
    tmp_path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--engines auto builds through build_engine(kind="auto"): when its first candidate
    (cpu here, stood in for by one that raises) fails to build, the row is timed on the
    next one (eager), says so (auto>eager) and lists the failure."""
    import idql_runtime.engines as engines

    real = engines._factory

    def factory(kind: str):
        if kind != "cpu":
            return real(kind)

        def fail(*args, **kw):
            raise RuntimeError("stand-in: cpu engine failed to build")

        return fail

    monkeypatch.setattr(engines, "_factory", factory)
    out, err = _bench_json(
        capsys,
        ["--engines", "auto,cpu", "--samples", "8", "--batch", "1", "--iters", "10",
         "--max-seconds", "0.2", "--out", str(tmp_path)],
    )  # fmt: skip
    rows = {r["requested"]: r for r in out["decision"]}
    auto = rows["auto"]
    assert "error" not in auto, auto
    assert auto["engine"] == "eager" and auto["p50_us"] > 0 and auto["eager_p50_us"] > 0
    assert auto["auto_failed"] == ["cpu: RuntimeError: stand-in: cpu engine failed to build"]
    assert auto["info"]["auto"]["candidates"] == ["cpu", "eager"]
    assert "auto>eager" in err
    assert rows["cpu"]["engine"] == "cpu" and "stand-in" in rows["cpu"]["error"]


def test_idql_bench_records_the_dtype_each_engine_was_built_in(tmp_path, capsys) -> None:
    """--dtype bfloat16: the eager row is built in float32 (the baseline) and says float32;
    the cpu engine is built in bfloat16 and says so."""
    out, _ = _bench_json(
        capsys,
        ["--engines", "eager,cpu", "--dtype", "bfloat16", "--samples", "8", "--batch", "1",
         "--iters", "10", "--max-seconds", "0.2", "--out", str(tmp_path)],
    )  # fmt: skip
    rows = {r["requested"]: r for r in out["decision"]}
    assert rows["eager"]["dtype"] == "float32" and rows["eager"]["info"]["precision"] == "full"
    assert rows["cpu"]["dtype"] == "bfloat16"


def test_idql_bench_learner_times_the_checkpoints_agent(tmp_path, capsys) -> None:
    """--learner --checkpoint: the learner rows run the checkpoint's config and sizes
    (obs 5, act 2, 32 wide, 1 block), not the default agent, and say so."""
    from idql_runtime.checkpoint import save_checkpoint

    agent = _agent(tiny=True, obs_dim=5, act_dim=2)
    ckpt = save_checkpoint(tmp_path / "run", 1, agent, meta={})
    out, err = _bench_json(
        capsys,
        ["--checkpoint", str(ckpt), "--no-decisions", "--learner", "--learner-backends",
         "reference,eager", "--learner-batch", "16", "--learner-iters", "5",
         "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert out["weights"]["source"] == "checkpoint"
    assert [r["requested"] for r in out["learner"]] == ["reference", "eager"]
    for row in out["learner"]:
        assert "error" not in row, row  # a 17-dim default agent would reject 5-dim obs
        about = {k: row.get(k) for k in ("weights", "obs_dim", "act_dim", "hidden_dim")}
        assert about == {"weights": "checkpoint", "obs_dim": 5, "act_dim": 2, "hidden_dim": 32}
        assert row["num_blocks"] == 1 and row["us_per_iter"] > 0


def test_idql_bench_paces_one_call_per_tick_without_catch_up() -> None:
    """--rate-hz: each call waits for its tick (call k starts no earlier than k + 1 periods
    after the loop began: sleeps never return early; measured from the loop's start, since
    a late wake-up of one call must not move the ticks after it), and after a call that
    overran its tick the next starts at once and the ticks restart from there, with no
    burst of back-to-back calls to catch up."""
    import time

    from idql_runtime.cli.bench import _time_calls

    period = 0.004
    starts: list[float] = []
    began = time.perf_counter()
    _time_calls(lambda: starts.append(time.perf_counter()), 12, period_s=period)
    assert all(t - began >= (k + 1) * period - 1e-4 for k, t in enumerate(starts))
    assert starts[-1] - began < 12 * period + 0.5  # paced, not asleep for ever

    starts = []

    def call() -> None:
        starts.append(time.perf_counter())
        if len(starts) == 3:
            time.sleep(5 * period)  # this call overruns the next ticks

    _time_calls(call, 8, period_s=period)
    assert all(t - starts[3] >= (k - 3) * period - 1e-4 for k, t in enumerate(starts[3:], 3))


def test_gpu_profile_counts_each_calls_kernels() -> None:
    """benchmarks/gpu_profile.py groups the profiler's device events per call: on the CPU
    (op events stand in for kernels) two adds per call come out as 2 per call, and every
    per-kernel share is a fraction of the busy time."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b, out = torch.randn(64, 64), torch.randn(64, 64), torch.empty(64, 64)

    def two_adds() -> None:
        torch.add(a, b, out=out)
        torch.add(out, b, out=out)

    got = mod.profile_calls(two_adds, 7, "cpu")
    adds = [k for k in got["top"] if k["name"] == "aten::add"]
    assert len(adds) == 1 and adds[0]["per_call"] == 2.0
    assert got["kernels_per_call"] >= 2.0 and got["busy_us"] > 0
    assert 0 < sum(k["share"] for k in got["top"]) <= 1.0 + 1e-6


@pytest.mark.parametrize("algo", ["iql_awr", "bc"])
def test_gaussian_baselines_are_refused_by_every_engine_and_evaluated_by_their_mean(algo):
    """A baseline trains no diffusion model: before, engines built a decision over its random
    initial score network and idql-actor deployed that, while idql-eval used the mean."""
    from idql_runtime.evaluation import Policy

    agent = Agent(load_config(overrides={**TINY, "train.algo": algo}), 3, 2)
    for kind in ("eager", "cpu"):
        with pytest.raises(ValueError, match=f"train.algo='{algo}' is a Gaussian baseline"):
            build_engine(agent, kind=kind, batch=1, samples=4)
    obs = np.array([[0.1, -0.2, 0.3]], np.float32)
    with torch.no_grad():
        mean = agent.gaussian(torch.as_tensor(obs))[0].numpy()
    np.testing.assert_array_equal(Policy(agent)(obs), mean)
