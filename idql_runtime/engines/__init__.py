"""Decision engines: one interface, several backends (eager, cpu, cuda_graph, compiled, tensorrt,
triton).

    engine = build_engine(agent, kind="auto", batch=1, samples=64, device="cpu")
    action = engine.decide(obs)             # (B, obs_dim) float32 -> (B, act_dim) float32
    engine.load_weights(agent.inference_state())   # swap weights between decisions

``kind="auto"`` picks the fastest engine available on the device for the decision's size
(``AUTO_ORDER``; on CUDA "triton" only up to ``TRITON_AUTO_MAX_ROWS`` = B * N), builds the
next one when a build fails, logs which, and ``engine.name`` says it. Only the modules in
this package know CUDA graphs or TensorRT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from idql_runtime.engines.base import Engine, EngineUnavailable, parse_dtype, spec_of

log = logging.getLogger("idql_runtime.engines")

KINDS = ("eager", "cpu", "cuda_graph", "compiled", "tensorrt", "triton")

# Fastest first among engines that build in about a second (docs/engines.md has the
# numbers). On CUDA "triton" (the decision in Triton kernels in one CUDA graph) leads, but
# auto_candidates drops it above TRITON_AUTO_MAX_ROWS = B * N (an H200 measured it faster
# than cuda_graph up to there and slower from 1024, below), and build_engine builds the
# next candidate when it fails to build (e.g. a GPU with less shared memory per block). "compiled" also beats
# cuda_graph (bf16, N = 128, H200: 366 vs 638 us; triton 204 us) but costs minutes of
# autotuning per shape, so auto never picks it: ask for it by name. "tensorrt" comes after
# cuda_graph because its speed was never measured here.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "eager"),
    "cuda": ("triton", "cuda_graph", "tensorrt", "eager"),
}
# auto takes "triton" on CUDA only up to this many candidate rows (B * N). Measured on an
# H200 (docs/engines.md): faster than cuda_graph at B = 1 for N = 16..256 in float32 and
# bfloat16 (e.g. 204 vs 591 us bf16 at N = 128), slower from B * N = 1024 (B = 64: 1.9 vs
# 1.2 ms at N = 16, 18.8 vs 4.0 ms at N = 128); between 256 and 1024 it is unmeasured.
TRITON_AUTO_MAX_ROWS = 256

__all__ = [
    "Engine",
    "EngineUnavailable",
    "KINDS",
    "auto_candidates",
    "available_engines",
    "build_engine",
]


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def _tensorrt_ok() -> bool:
    from idql_runtime.engines.tensorrt import tensorrt_status

    return _cuda_ok() and tensorrt_status() is None


def _triton_ok(device: torch.device) -> bool:
    from idql_runtime.engines.triton_fused import triton_status

    return triton_status(device) is None


def available_engines(device: str | torch.device = "cpu") -> list[str]:
    """Engine kinds that can be built on ``device`` in this process ("triton" on the CPU
    only under TRITON_INTERPRET=1, Triton's interpreter, which is for tests)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return ["eager", "cpu", "compiled"] + (["triton"] if _triton_ok(dev) else [])
    if dev.type == "cuda":
        if not _cuda_ok():
            return []
        out = ["eager", "cuda_graph", "compiled"]
        out += ["tensorrt"] if _tensorrt_ok() else []
        return out + (["triton"] if _triton_ok(dev) else [])
    return ["eager"]


def _factory(kind: str) -> Callable[..., Engine]:
    if kind == "eager":
        from idql_runtime.engines.eager import EagerEngine

        return EagerEngine
    if kind == "cpu":
        from idql_runtime.engines.cpu import CpuEngine

        return CpuEngine
    if kind == "cuda_graph":
        from idql_runtime.engines.cuda_graph import CudaGraphEngine

        return CudaGraphEngine
    if kind == "compiled":
        from idql_runtime.engines.compiled import CompiledEngine

        return CompiledEngine
    if kind == "tensorrt":
        from idql_runtime.engines.tensorrt import TensorRTEngine

        return TensorRTEngine
    if kind == "triton":
        from idql_runtime.engines.triton_fused import TritonEngine

        return TritonEngine
    raise ValueError(f"unknown engine kind {kind!r}; choose from {('auto', *KINDS)}")


def auto_candidates(device: str | torch.device, rows: int | None = None) -> list[str]:
    """The kinds ``kind="auto"`` tries on ``device``, fastest first, for ``rows`` = B * N
    candidate rows (None: any size, so no size-dependent kind)."""
    dev = torch.device(device)
    have = available_engines(dev)
    out = [k for k in AUTO_ORDER.get(dev.type, ("eager",)) if k in have]
    if rows is None or rows > TRITON_AUTO_MAX_ROWS:
        out = [k for k in out if k != "triton"]
    return out


def resolve_kind(kind: str, device: str | torch.device, rows: int | None = None) -> str:
    """The concrete kind ``build_engine`` would build first for ``kind`` on ``device`` (for
    auto, at ``rows`` = B * N candidate rows; ``build_engine`` falls back to the next
    candidate when that one fails to build)."""
    dev = torch.device(device)
    if kind != "auto":
        return kind
    candidates = auto_candidates(dev, rows)
    if not candidates:
        raise EngineUnavailable(f"no engine can run on {dev} here")
    return candidates[0]


def build_engine(
    agent: Any,
    *,
    kind: str = "auto",
    batch: int = 1,
    samples: int = 64,
    mode: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    cache_dir: str | None = None,
    kind_options: dict[str, dict[str, Any]] | None = None,
    **options: Any,
) -> Engine:
    """Build a decision engine over the agent's EMA score network, target Q and V.

    batch B and samples N are static for the engine; the step count T is the agent's.
    ``options`` go to the engine class (e.g. ``threads`` for cpu, ``compile_mode`` for
    compiled); ``kind_options`` maps a kind to options only that kind is given when it is
    the one built (``{"cpu": {"threads": 2}}``), which is how a caller of ``kind="auto"``
    tunes a candidate without handing its options to the others. Raises EngineUnavailable,
    naming what is missing, when the kind cannot run here (no CUDA GPU, no TensorRT).
    """
    dev = torch.device(device)
    parse_dtype(dtype)
    if dev.type == "cuda" and not _cuda_ok() and kind != "tensorrt":
        raise EngineUnavailable(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    spec = spec_of(agent, batch, samples, mode)

    def make(chosen: str) -> Engine:
        opts = {**options, **(kind_options or {}).get(chosen, {})}
        if chosen == "tensorrt" or chosen == "compiled":
            opts.setdefault("cache_dir", cache_dir)
        return _factory(chosen)(agent, spec, device=dev, dtype=dtype, seed=seed, **opts)

    if kind != "auto":
        return make(kind)
    candidates = auto_candidates(dev, batch * samples)
    if not candidates:
        raise EngineUnavailable(f"no engine can run on {dev} here")
    failed: list[str] = []
    for chosen in candidates[:-1]:
        try:
            engine = make(chosen)
            break
        except Exception as e:  # noqa: BLE001 - auto: say why, then the next fastest kind
            failed.append(f"{chosen}: {type(e).__name__}: {str(e)[:200]}")
            log.warning("engine auto on %s: %s did not build (%s); trying the next", dev, chosen, e)
    else:  # the last candidate's error, if any, is the caller's
        chosen = candidates[-1]
        engine = make(chosen)
    log.info(
        "engine auto on %s: picked %r for B*N = %d (available: %s%s)",
        dev,
        chosen,
        batch * samples,
        ", ".join(available_engines(dev)),
        f"; did not build: {'; '.join(failed)}" if failed else "",
    )
    engine.info["auto"] = {"candidates": candidates, "failed": failed}
    return engine
