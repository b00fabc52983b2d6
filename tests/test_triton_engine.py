"""The "triton" engine (the decision in fused Triton kernels, "split" and "fused"
layouts) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter (numpy on CPU tensors): the engine
is built with device="cpu" while TRITON_INTERPRET=1 is set for the test (monkeypatch, so
nothing leaks into other tests). That proves the kernels' arithmetic: the same code is
what ``triton.jit`` compiles for the GPU. It does not prove GPU numerics (tl.dot on tensor
cores, fast exp/sqrt, bf16 rounding to nearest-even where the interpreter truncates) nor
speed: the ``gpu``-marked tests at the end and ``benchmarks/gpu_check.sh`` do that on a
CUDA machine. ``test_kernels_compile_for_sm90_without_a_gpu`` compiles the exact kernels
to cubin for the H100's architecture with Triton's bundled ptxas, no GPU needed.

Tolerances are those of tests/test_engines.py (float32 1e-4, bfloat16 0.15 / 0.05
relative); most checks here also compare every candidate and every Q value, not only the
chosen one, on noise that keeps the candidates inside [-1, 1] (linear beta schedule,
half-scale x_init): with the default VP schedule an untrained score network drives most
candidates onto the clip boundary, where equal clipped actions hide errors and tie Q.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from idql_runtime.agent import Agent
from idql_runtime.config import config_from_flat
from idql_runtime.decision import DecisionNoise
from idql_runtime.engines import available_engines, build_engine
from idql_runtime.engines.base import Engine, EngineUnavailable
from tests.test_engines import TOL, Reference, assert_matches_reference, reference

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    # Import triton for compilation before any test sets TRITON_INTERPRET: triton fixes
    # its own library's mode at import (the engine lets the interpreter run either way).
    import triton  # noqa: F401

needs_triton = pytest.mark.skipif(
    not HAVE_TRITON, reason="triton is not installed (scripts/install.sh dev installs it)"
)

SMALL = {
    "network.hidden_dim": 48,  # pads to 64: LayerNorm must still use the true width 48
    "network.num_blocks": 2,
    "network.time_dim": 8,
    "network.cond_hidden": [16, 16],
    "critic.hidden": [40, 24],  # pad to 64 and 32
    "diffusion.beta_schedule": "linear",
}
"""Small networks with non-power-of-two widths; Hopper's obs 11 / act 3 pad to 16."""


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _agent(flat: dict | None = None, obs_dim: int = 11, act_dim: int = 3, seed: int = 0) -> Agent:
    torch.manual_seed(seed)
    return Agent(config_from_flat({**SMALL, **(flat or {})}), obs_dim, act_dim)


def _inputs(eng: Engine, seed: int = 1) -> tuple[torch.Tensor, DecisionNoise]:
    """obs and noise whose candidates stay mostly inside [-1, 1] (half-scale x_init)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(eng.spec.batch, eng.spec.obs_dim, generator=g)
    n = DecisionNoise.draw(eng.spec, generator=g)
    return obs, DecisionNoise(0.5 * n.x_init, n.step_noise, n.u)


def _check(
    eng: Engine, obs: torch.Tensor, noise: DecisionNoise, dtype: str, interior: bool = True
) -> None:
    """The chosen action/Q/V like every engine (``reference_decide`` in float64), then
    every candidate and every Q."""
    out = eng.decide_with_noise(obs, noise)
    ref = Reference(eng, obs, noise)
    x64, q64 = ref.x, ref.q
    assert_matches_reference(out, ref, dtype)
    x, q = eng.last_candidates()  # type: ignore[attr-defined]
    act_tol, q_rel = TOL[dtype]
    x_err = (x.double() - x64).abs().max().item()
    q_err = ((q.double() - q64).abs() / q64.abs().clamp_min(1.0)).max().item()
    assert x_err <= act_tol, f"candidate error {x_err:.3g} > {act_tol} ({dtype})"
    assert q_err <= q_rel, f"candidate Q error {q_err:.3g} > {q_rel} ({dtype})"
    if interior:
        assert (x64.abs() < 0.999).double().mean() > 0.5, "most candidates clipped: weak check"


# ---------------------------------------------------------------- CPU: Triton's interpreter
@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_leaves_the_critic_in_float32(dtype: str) -> None:
    """Only the score network's block products are reduced: the Q of every candidate the
    kernel produced equals the float32 torch critic on those same candidates (bf16 Q
    scrambled the pick on trained weights: docs/engines.md)."""
    eng = build_engine(_agent(), kind="triton", batch=2, samples=8, dtype=dtype)
    bufs = eng._bufs  # type: ignore[attr-defined]
    assert bufs["w1"].dtype == getattr(torch, dtype)  # the blocks are reduced ...
    assert bufs["qw1"].dtype == bufs["vw1"].dtype == torch.float32  # ... the critic is not
    obs, noise = _inputs(eng)
    out = eng.decide_with_noise(obs, noise)
    x, q = eng.last_candidates()  # type: ignore[attr-defined]
    with torch.no_grad():
        q32 = eng.decision.score_candidates(obs, x)
        v32 = eng.decision.v(obs)
    torch.testing.assert_close(q, q32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.value, v32, rtol=1e-5, atol=1e-5)


# The interpreter takes 5-18 s per case on 2 cores (2-3x that on an AVX2 Zen 3, where the
# default suite took 16.5 min on 2026-12-03): the default suite keeps enough cases that the
# split and fused layouts, each dtype and each mode run at least once (the opt-in persist
# layout only in `-m slow`), `-m slow` (CI's second stage) runs the rest, so CI still runs
# every one.
SLOW = pytest.mark.slow


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("dtype", "mode", "layout"),
    [
        ("float32", "argmax", "split"),
        ("bfloat16", "implicit", "fused"),
        pytest.param("bfloat16", "implicit", "split", marks=SLOW),
        pytest.param("float32", "implicit", "fused", marks=SLOW),
        pytest.param("bfloat16", "argmax", "fused", marks=SLOW),
        pytest.param("bfloat16", "argmax", "split", marks=SLOW),
        pytest.param("float32", "implicit", "split", marks=SLOW),
        pytest.param("float32", "argmax", "fused", marks=SLOW),
    ],
)
def test_matches_float64_reference_with_padding(dtype: str, mode: str, layout: str) -> None:
    """Hopper dims (obs 11, act 3) and widths 48/40/24 all pad; B*N = 30 leaves a partial
    row tile and tiles that span two states. Split: 32-column slices, 2 programs per row
    tile writing 2 parts of the same rows."""
    agent = _agent()
    for batch, samples in ((1, 16), (3, 10)):
        eng = build_engine(
            agent,
            kind="triton",
            batch=batch,
            samples=samples,
            mode=mode,
            dtype=dtype,
            layout=layout,
            split_width=32,
            hidden_chunk=16,
        )
        assert eng.name == "triton" and eng.info["interpret"] is True
        assert eng.info["layout"] == layout
        assert eng.info["kernels"] == (3 + 5 * 2 if layout == "split" else 2)
        _check(eng, *_inputs(eng), dtype)


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("dtype", "mode"),
    [
        pytest.param("bfloat16", "argmax", marks=SLOW),  # 36 s on the Zen 3
        pytest.param("bfloat16", "implicit", marks=SLOW),
        pytest.param("float16", "argmax", marks=SLOW),
        pytest.param("float16", "implicit", marks=SLOW),
    ],
)
def test_persist_layout_is_the_split_decision_in_one_launch(dtype: str, mode: str) -> None:
    """layout='persist' runs the split layout's launches as phases of one kernel (grid
    barriers between them on a GPU; here, one interpreted launch per phase, barriers
    compiled out). Same slices and chunks, so the same sums in the same order: every
    candidate, every Q and the pick equal the split layout's bit for bit, and match the
    float64 reference. Hopper dims pad; B*N = 30 leaves a partial row tile."""
    agent = _agent()
    for batch, samples in ((1, 16), (3, 10)):
        opts = dict(batch=batch, samples=samples, mode=mode, dtype=dtype, split_width=32)
        split = build_engine(agent, kind="triton", layout="split", hidden_chunk=32, **opts)
        persist = build_engine(agent, kind="triton", layout="persist", **opts)
        assert persist.info["kernels"] == 1 and persist.info["layout"] == "persist"
        assert persist.info["hidden_chunk"] == split.info["hidden_chunk"] == 32
        obs, noise = _inputs(persist)
        a, b = split.decide_with_noise(obs, noise), persist.decide_with_noise(obs, noise)
        for name in ("action", "chosen_q", "value", "adv_spread", "index"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        for xa, xb in zip(split.last_candidates(), persist.last_candidates(), strict=True):  # type: ignore[attr-defined]
            assert torch.equal(xa, xb)
        _check(persist, obs, noise, dtype)


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    "layout,dtype,tol",
    [
        ("split", "float32", "float16"),
        pytest.param("split", "bfloat16", "bfloat16", marks=SLOW),
        pytest.param("persist", "bfloat16", "bfloat16", marks=SLOW),
    ],
)
def test_float16_parts_match_reference(layout: str, dtype: str, tol: str) -> None:
    """parts_dtype='float16': each block's output parts are stored in float16 (half the
    parts traffic; h rounded to 11 significant bits at block boundaries). Every candidate
    and Q still match the float64 reference, float32 weights within the float16
    tolerances; and the candidates move from the float32-parts decision by no more than
    that rounding can explain."""
    agent = _agent()
    opts = dict(batch=3, samples=10, dtype=dtype, layout=layout, split_width=32, hidden_chunk=32)
    eng = build_engine(agent, kind="triton", parts_dtype="float16", **opts)
    assert eng._h.dtype == torch.float16 and eng.info["parts_dtype"] == "float16"  # type: ignore[attr-defined]
    obs, noise = _inputs(eng)
    _check(eng, obs, noise, tol)
    f32 = build_engine(agent, kind="triton", **opts)
    f32.decide_with_noise(obs, noise)
    x16, _ = eng.last_candidates()  # type: ignore[attr-defined]
    x32, _ = f32.last_candidates()  # type: ignore[attr-defined]
    diff = (x16 - x32).abs().max().item()
    assert 0 < diff <= TOL["float16"][0], diff  # rounded (not a no-op), and only that


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_persist_layout_refuses_float32_and_says_why() -> None:
    with pytest.raises(ValueError, match="layout='persist' runs bfloat16 or float16"):
        build_engine(_agent(), kind="triton", layout="persist", dtype="float32")


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("dtype", "layout"),
    [
        ("float32", "split"),
        ("bfloat16", "fused"),
        pytest.param("bfloat16", "split", marks=SLOW),
        pytest.param("float32", "fused", marks=SLOW),
    ],
)
def test_full_v2_sizes_match_reference(dtype: str, layout: str) -> None:
    """Default (v2) networks: width 256, 3 blocks x 1024 in hidden chunks, Q/V 256-256,
    the VP schedule; the decision the GPU will run, as the other engines' tests use it."""
    torch.manual_seed(0)
    agent = Agent(config_from_flat({}), 17, 6)
    eng = build_engine(agent, kind="triton", batch=1, samples=16, dtype=dtype, layout=layout)
    obs = torch.randn(1, 17, generator=torch.Generator().manual_seed(7))
    noise = DecisionNoise.draw(eng.spec, generator=torch.Generator().manual_seed(1))
    _check(eng, obs, noise, dtype, interior=False)


VARIANTS = {
    "v1-mish-no-value-ln": ({"version": "v1", "network.time_dim": 8}, 11, 3, {}),
    "v1-fused": ({"version": "v1", "network.time_dim": 8}, 11, 3, {"layout": "fused"}),
    "relu-no-ln-1-layer-critic-exponential": (
        {
            "network.activation": "relu",
            "network.layer_norm": False,
            "critic.hidden": [32],
            "critic.value_loss": "exponential",
            "critic.alpha": 2.0,
            "diffusion.extra_final_steps": 2,
            "diffusion.temperature": 0.5,
            "diffusion.clip_sampler": False,
        },
        100,  # obs pads to 128: two 64-wide chunks of the obs projections
        5,
        {"split_width": 16, "hidden_chunk": 16},
    ),
    "relu-no-ln-fused": (
        {
            "network.activation": "relu",
            "network.layer_norm": False,
            "critic.hidden": [32],
            "diffusion.extra_final_steps": 2,
            "diffusion.clip_sampler": False,
        },
        100,
        5,
        {"layout": "fused"},
    ),
    "quantile-3-heads-T3-options": (
        {"critic.value_loss": "quantile", "critic.tau": 0.9, "critic.num_qs": 3},
        17,
        6,
        {"block_m": 32, "hidden_chunk": 16, "num_warps": 4, "layout": "fused"},
    ),
    "critic-in-8-slices-tf32x3": (
        {"critic.hidden": [128, 128], "critic.num_qs": 3},
        17,
        6,
        {"critic_split": 8, "critic_precision": "tf32x3"},
    ),
    "critic-whole-1-head": (
        {"critic.num_qs": 1},
        17,
        6,
        {"critic_split": 1},
    ),
    "quantile-3-heads-split-options": (
        {"critic.value_loss": "quantile", "critic.tau": 0.9, "critic.num_qs": 3},
        17,
        6,
        {"block_m": 32, "split_width": 64, "hidden_chunk": 32, "num_warps": 8},
    ),
}


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(v, marks=SLOW) if v == "relu-no-ln-1-layer-critic-exponential" else v
        for v in sorted(VARIANTS)
    ],
)
def test_config_variants_match_reference(variant: str) -> None:
    flat, obs_dim, act_dim, opts = VARIANTS[variant]
    agent = _agent(flat, obs_dim, act_dim)
    for mode, dtype in (("implicit", "float32"), ("argmax", "bfloat16")):
        eng = build_engine(
            agent, kind="triton", batch=3, samples=10, mode=mode, dtype=dtype, **opts
        )
        _check(eng, *_inputs(eng, seed=2), dtype)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_float16_matches_reference() -> None:
    eng = build_engine(_agent(), kind="triton", batch=2, samples=16, dtype="float16")
    _check(eng, *_inputs(eng), "float16")


@needs_triton
@SLOW  # 32 s interpreted (five decisions); the cpu and eager swap tests stay in the default suite
@pytest.mark.usefixtures("interpret")
def test_load_weights_matches_fresh_engine_on_new_weights() -> None:
    old, new = _agent(seed=0), _agent(seed=1)
    eng = build_engine(old, kind="triton", batch=2, samples=16)
    obs, noise = _inputs(eng)
    before = eng.decide_with_noise(obs, noise)
    eng.load_weights(new.inference_state())
    after = eng.decide_with_noise(obs, noise)
    fresh = build_engine(new, kind="triton", batch=2, samples=16).decide_with_noise(obs, noise)
    assert (before.action - after.action).abs().max() > 1e-3, "weights did not change it"
    torch.testing.assert_close(after.action, fresh.action, atol=1e-6, rtol=0)
    torch.testing.assert_close(after.chosen_q, fresh.chosen_q, atol=1e-6, rtol=1e-6)
    assert after.index.tolist() == fresh.index.tolist()

    # What the online learner broadcasts (target Q and V) swaps in alone.
    critic = {k: v for k, v in old.inference_state().items() if k.startswith(("q_target.", "v."))}
    eng.load_weights(critic, partial=True)
    mixed = _agent(seed=1)
    mixed.load_inference_state(critic, strict=False)
    want = build_engine(mixed, kind="triton", batch=2, samples=16).decide_with_noise(obs, noise)
    got = eng.decide_with_noise(obs, noise)
    torch.testing.assert_close(got.action, want.action, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.value, want.value, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        bad = dict(critic)
        bad["v.mlp.0.bias"] = torch.full_like(critic["v.mlp.0.bias"], float("nan"))
        eng.load_weights(bad, partial=True)
    torch.testing.assert_close(eng.decide_with_noise(obs, noise).action, got.action)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_decide_draws_fresh_noise_and_decides_on_it() -> None:
    eng = build_engine(_agent(), kind="triton", batch=2, samples=8, seed=3)
    obs = torch.randn(2, 11).numpy()
    out1 = eng.decide_full(obs)
    n1 = eng.last_noise()  # type: ignore[attr-defined]
    out2 = eng.decide_full(obs)
    assert not torch.equal(out1.action, out2.action) or not torch.equal(out1.index, out2.index)
    again = eng.decide_with_noise(obs, n1)
    torch.testing.assert_close(again.action, out1.action, atol=0, rtol=0)
    assert out1.index.dtype == torch.int64 and out1.action.shape == (2, 3)
    assert eng.decide(obs).shape == (2, 3)


@needs_triton
def test_on_the_cpu_it_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in available_engines("cpu")
    with pytest.raises(EngineUnavailable, match="TRITON_INTERPRET=1"):
        build_engine(_agent(), kind="triton", device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in available_engines("cpu")


def test_without_triton_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    with pytest.raises(EngineUnavailable, match="triton is not importable"):
        build_engine(_agent(), kind="triton", device="cpu")
    assert "triton" not in available_engines("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu_raises_a_clear_error() -> None:
    with pytest.raises(EngineUnavailable, match="no CUDA GPU"):
        build_engine(_agent(), kind="triton", device="cuda")


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_unsupported_options_are_named_not_miscomputed() -> None:
    with pytest.raises(EngineUnavailable, match="critic.hidden"):
        build_engine(_agent({"critic.hidden": [16, 16, 16]}), kind="triton")
    with pytest.raises(ValueError, match="float64"):
        build_engine(_agent(), kind="triton", dtype="float64")
    with pytest.raises(ValueError, match="block_m"):
        build_engine(_agent(), kind="triton", block_m=24)
    with pytest.raises(ValueError, match="input_precision"):
        build_engine(_agent(), kind="triton", input_precision="bf16x3")
    with pytest.raises(ValueError, match="layout"):
        build_engine(_agent(), kind="triton", layout="tiled")
    with pytest.raises(ValueError, match="split_width"):
        build_engine(_agent(), kind="triton", split_width=48)
    with pytest.raises(ValueError, match="critic_split must be a power of two >= 1, got 3"):
        build_engine(_agent(), kind="triton", critic_split=3)
    with pytest.raises(ValueError, match="critic_precision .* got 'bf16'"):
        build_engine(_agent(), kind="triton", critic_precision="bf16")
    with pytest.raises(ValueError, match="pdl must be true or false, got 2"):
        build_engine(_agent(), kind="triton", pdl=2)
    with pytest.raises(
        ValueError, match="parts_dtype must be 'float32' or 'float16', got 'bfloat16'"
    ):
        build_engine(_agent(), kind="triton", parts_dtype="bfloat16")
    with pytest.raises(ValueError, match="prefetch must be true or false, got 'on'"):
        build_engine(_agent(), kind="triton", prefetch="on")
    with pytest.raises(ValueError, match="graph_copies must be true or false, got 'yes'"):
        build_engine(_agent(), kind="triton", graph_copies="yes")
    with pytest.raises(ValueError, match="pdl=True applies to layout='split'.*'fused'"):
        build_engine(_agent(), kind="triton", layout="fused", pdl=True)


@needs_triton
@SLOW
def test_kernels_compile_for_sm90_without_a_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The GPU build of the exact v2 kernels (float32 and bf16, both layouts) goes through
    Triton's compiler and its bundled ptxas for sm_90, fits an H100's 227 KiB of shared
    memory per block, and spills (almost) no registers: at 4 warps the selection kernel
    spilled ~12 kB per thread to local memory (ptxas 12.8, Triton 3.6, the GPU machine's),
    and hoisting the observation's share above the parts sum spilled the first block's
    update variant. Compiled with the launcher's specialization (16-byte-aligned pointers),
    as the GPU runs them. Says nothing about speed or GPU numerics."""
    from idql_runtime.engines.triton_fused import _triton_imported_interpreted

    if _triton_imported_interpreted():
        pytest.skip("triton was imported under TRITON_INTERPRET=1 in this process")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # to build the engine on the CPU
    # Triton 3.10's default: the kernels must still get the FMA contraction they were
    # measured and precision-checked with, because every launch asks for it by name.
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    torch.manual_seed(0)
    agent = Agent(config_from_flat({}), 17, 6)
    kernels = {
        "fused": {"decide_kernel", "select_kernel"},
        "split": {"value_kernel", "block_kernel", "finish_kernel", "select_kernel"},
        "persist": {"persist_kernel"},
    }
    small = build_engine(agent, kind="triton", batch=1, samples=16, dtype="bfloat16")
    small.decide(torch.zeros(1, 17).numpy())  # interpreter first: it must not spoil compiling
    for dtype, layout in (
        ("bfloat16", "split"),
        ("float32", "split"),
        ("bfloat16", "fused"),
        ("bfloat16", "persist"),
    ):
        eng = build_engine(agent, kind="triton", batch=1, samples=128, dtype=dtype, layout=layout)
        info = eng.compile_for(90)  # type: ignore[attr-defined]
        assert set(info) == kernels[layout]
        for name, k in info.items():
            assert 0 < k["shared_bytes"] <= 227 * 1024, (dtype, name, k)
            assert k["cubin_bytes"] > 0
            assert k["registers"] is not None and 0 < k["registers"] <= 255, (name, k)
            # persist: every phase's registers in one kernel; ~1 kB per thread spills
            # (ptxas 12.8 and 12.9); a failed allocation would show as tens of kB
            limit = 2048 if layout == "persist" else 0
            assert k["spill_bytes"] <= limit, (dtype, layout, name, k)
            assert k["gdc_waits"] == 0, (name, k)  # no PDL unless asked for
            assert k["fp_fusion"] is True, (name, k)
            assert k["l1_prefetches"] == 0, (name, k)
    # pdl: the chained launches wait for their predecessor (griddepcontrol.wait) before
    # the first dependent load; V and the selection are launched as before. prefetch:
    # each block program's fc1/fc2 lines, 512 + 512 of 128 bytes (bf16, split_width 128;
    # float32: 64 columns, 512 + 512), over 256 threads = 4 prefetches per thread
    for dtype in ("bfloat16", "float32"):
        eng = build_engine(
            agent, kind="triton", batch=1, samples=128, dtype=dtype, pdl=True, prefetch=True
        )
        info = eng.compile_for(90)  # type: ignore[attr-defined]
        waits = {name: k["gdc_waits"] for name, k in info.items()}
        assert waits["block_kernel"] >= 1 and waits["finish_kernel"] >= 1, waits
        assert waits["value_kernel"] == 0 and waits["select_kernel"] == 0, waits
        pf = {name: k["l1_prefetches"] for name, k in info.items()}
        assert pf == {"value_kernel": 0, "block_kernel": 4, "finish_kernel": 0, "select_kernel": 0}
        for name, k in info.items():
            assert k["spill_bytes"] == 0, (dtype, "pdl", name, k)


# ---------------------------------------------------------------- GPU (compiled kernels)
def _v2_agent(seed: int = 0, linear: bool = False) -> Agent:
    """Default (v2) sizes; ``linear``: linear betas, so candidates stay inside [-1, 1]."""
    torch.manual_seed(seed)
    flat = {"diffusion.beta_schedule": "linear"} if linear else {}
    return Agent(config_from_flat(flat), 17, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["split", "fused"])
@pytest.mark.parametrize("mode", ["argmax", "implicit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_matches_reference_and_eager(dtype: str, mode: str, layout: str) -> None:
    """Full v2 sizes, N = 128: float64 reference, every candidate, and plain eager."""
    agent = _v2_agent()
    for batch, samples in ((1, 128), (4, 64)):
        eng = build_engine(
            agent,
            kind="triton",
            batch=batch,
            samples=samples,
            mode=mode,
            dtype=dtype,
            device="cuda",
            layout=layout,
        )
        obs = torch.randn(batch, 17)
        noise = DecisionNoise.draw(eng.spec, generator=torch.Generator().manual_seed(1))
        out = eng.decide_with_noise(obs, noise)
        assert_matches_reference(out, reference(eng, obs, noise), dtype)
        eager = build_engine(agent, kind="eager", batch=batch, samples=samples, mode=mode)
        want = eager.decide_with_noise(obs, noise)
        same = out.index == want.index
        assert same.any()
        err = (out.action[same] - want.action[same]).abs().max().item()
        assert err <= TOL[dtype][0], f"vs eager: {err:.3g}"
        lin = build_engine(
            _v2_agent(linear=True),
            kind="triton",
            batch=batch,
            samples=samples,
            mode=mode,
            dtype=dtype,
            device="cuda",
            layout=layout,
        )
        _check(lin, *_inputs(lin), dtype)  # interior candidates: every row compared


@pytest.mark.gpu
def test_gpu_in_graph_rng_draws_fresh_noise_and_decides_on_it() -> None:
    eng = build_engine(_v2_agent(), kind="triton", batch=2, samples=64, device="cuda")
    obs = torch.randn(2, 17).numpy()
    out1 = eng.decide_full(obs)
    n1 = eng.last_noise()  # type: ignore[attr-defined]
    out2 = eng.decide_full(obs)
    n2 = eng.last_noise()  # type: ignore[attr-defined]
    assert not torch.equal(n1.x_init, n2.x_init)
    for out, noise in ((out1, n1), (out2, n2)):
        assert_matches_reference(out, reference(eng, torch.as_tensor(obs), noise), "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["argmax", "implicit"])
def test_gpu_persist_layout_matches_split_and_reference(mode: str) -> None:
    """The one-launch layout on a GPU (grid barriers for real): the float64 reference and
    the split layout on the same noise, then 300 own-noise replays without a barrier
    timeout (which would raise) and with finite, in-range actions."""
    agent = _v2_agent()
    for batch, samples, width in ((1, 128, 64), (4, 64, 128)):  # 128 programs each
        opts = dict(batch=batch, samples=samples, mode=mode, dtype="bfloat16", device="cuda")
        split = build_engine(
            agent, kind="triton", layout="split", split_width=width, hidden_chunk=width, **opts
        )
        persist = build_engine(agent, kind="triton", layout="persist", split_width=width, **opts)
        obs = torch.randn(batch, 17)
        noise = DecisionNoise.draw(persist.spec, generator=torch.Generator().manual_seed(1))
        got = persist.decide_with_noise(obs, noise)
        assert_matches_reference(got, reference(persist, obs, noise), "bfloat16")
        want = split.decide_with_noise(obs, noise)
        xs, xp = split.last_candidates()[0], persist.last_candidates()[0]  # type: ignore[attr-defined]
        # Not bit for bit as in the interpreter: two different compiled kernels may order
        # float32 sums differently, and a last-bit difference can move a bf16 rounding of
        # an activation by one bf16 step (2**-8) before the next product.
        diff = (xs - xp).abs().max().item()
        assert diff <= 0.05, (batch, samples, width, diff)
        same = (got.index == want.index).float().mean().item()
        assert same >= 0.75, (batch, samples, width, same)
        for _ in range(300):
            a = persist.decide(obs.numpy())
            assert np.isfinite(a).all() and np.abs(a).max() <= 1.0


@pytest.mark.gpu
def test_gpu_persist_layout_refuses_a_grid_larger_than_the_gpu() -> None:
    with pytest.raises(ValueError, match="needs every program resident at once"):
        build_engine(
            _v2_agent(), kind="triton", layout="persist", batch=64, samples=128,
            dtype="bfloat16", device="cuda",
        )  # fmt: skip


@pytest.mark.gpu
def test_gpu_load_weights_keeps_graph_valid() -> None:
    old, new = _v2_agent(0), _v2_agent(1)
    eng = build_engine(old, kind="triton", batch=2, samples=32, device="cuda")
    obs = torch.randn(2, 17)
    noise = DecisionNoise.draw(eng.spec, generator=torch.Generator().manual_seed(1))
    eng.load_weights(new.inference_state())
    fresh = build_engine(new, kind="eager", batch=2, samples=32)
    got, want = eng.decide_with_noise(obs, noise), fresh.decide_with_noise(obs, noise)
    same = got.index == want.index
    assert same.all() or (got.chosen_q - want.chosen_q).abs().max() < 1e-4
    torch.testing.assert_close(got.action[same], want.action[same], atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts,dtype",
    [
        ({"layout": "fused", "block_m": 32, "hidden_chunk": 64, "num_warps": 4}, "bfloat16"),
        ({"layout": "fused", "block_m": 64, "num_warps": 8, "num_stages": 2}, "bfloat16"),
        ({"layout": "split", "block_m": 64, "split_width": 256, "num_warps": 8}, "bfloat16"),
        ({"layout": "split", "split_width": 32, "hidden_chunk": 32}, "float16"),
        ({"split_width": 64, "num_warps": 8}, "bfloat16"),
        ({"split_width": 128, "hidden_chunk": 128, "num_warps": 8}, "bfloat16"),
        ({"num_warps": 8}, "float32"),
        ({"input_precision": "tf32"}, "float32"),
        ({"critic_precision": "tf32x3"}, "bfloat16"),
        ({"critic_split": 8, "split_width": 128}, "bfloat16"),
        ({"critic_split": 1}, "float32"),
        ({"pdl": True}, "bfloat16"),
        ({"pdl": True, "split_width": 64}, "float32"),
        ({"prefetch": True}, "float32"),
        ({"pdl": True, "prefetch": True}, "bfloat16"),
        ({"parts_dtype": "float16"}, "bfloat16"),
        ({"parts_dtype": "float16", "layout": "persist"}, "bfloat16"),
    ],
)
def test_gpu_kernel_options_match_reference(opts: dict, dtype: str) -> None:
    agent = _v2_agent(linear=True)
    eng = build_engine(
        agent, kind="triton", batch=1, samples=128, dtype=dtype, device="cuda", **opts
    )
    obs, noise = _inputs(eng)
    # TF32 keeps 10 mantissa bits: checked with the bf16 tolerances.
    _check(eng, obs, noise, "bfloat16" if opts.get("input_precision") == "tf32" else dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts",
    [
        {"pdl": True},
        {"prefetch": True},
        {"graph_copies": True},
        {"pdl": True, "prefetch": True, "graph_copies": True},
    ],
)
def test_gpu_pdl_prefetch_and_graph_copies_change_no_decision(opts: dict) -> None:
    """PDL only lets launches overlap, prefetch only warms L1, and graph_copies only moves
    the two copies into the graph: call after call with changing observations, through decide (numpy) and
    decide_full, the engine returns the decision the default build makes on the noise it
    drew. graph_copies either holds or was refused, said so in info. (Written without a
    GPU on 2026-11-26: not yet run on one.)"""
    agent = _v2_agent()
    base = build_engine(agent, kind="triton", batch=2, samples=64, dtype="bfloat16", device="cuda")
    eng = build_engine(
        agent, kind="triton", batch=2, samples=64, dtype="bfloat16", device="cuda", **opts
    )
    assert eng.info["pdl"] == opts.get("pdl", False)
    assert eng.info["prefetch"] == opts.get("prefetch", False)
    if opts.get("graph_copies"):
        assert eng.info["graph_copies"] or "graph_copies_refused" in eng.info, eng.info
    rng = np.random.default_rng(3)
    for i in range(4):
        obs = rng.standard_normal((2, 17)).astype(np.float32)
        if i % 2:
            got = eng.decide_full(obs)
            want = base.decide_with_noise(obs, eng.last_noise())  # type: ignore[attr-defined]
            assert torch.equal(got.index, want.index)
            torch.testing.assert_close(got.action, want.action, atol=1e-6, rtol=0)
            torch.testing.assert_close(got.value, want.value, atol=1e-6, rtol=0)
        else:
            a = eng.decide(obs)
            want = base.decide_with_noise(obs, eng.last_noise())  # type: ignore[attr-defined]
            np.testing.assert_allclose(a, want.action.numpy(), atol=1e-6, rtol=0)
