"""oneDNN float32 products on the CPU: the fast CPU engine's and the learner's.

On x86 PyTorch sends ``F.linear`` / ``torch.mm`` to MKL. On the AVX-512 AMD EPYC (Zen 5)
most of these machines have, MKL runs a generic path at about 190-210 GFLOP/s for the score network's
(512 x 256 x 1024) block products, where oneDNN (``torch.ops.mkldnn._linear_pointwise``)
reaches 460 (forward), 470 (input gradient) and 340 GFLOP/s (weight gradient), in
IEEE float32 (measured 2026-11-26, 2 threads, ``benchmarks/onednn_learner.py``). The
transposed operands of the two gradient products go in as strided views, without copies.

``linear`` is that product as an autograd function. The score network's residual blocks
use it for their fc1/fc2 while training on the CPU in float32 (``BlockLinear`` in
networks.py); the narrower 256-wide layers stay on MKL, which is as fast there.
``training_products(False)`` turns it off (the benchmarks' plain-PyTorch baseline).

Where MKL is not slow, oneDNN is no gain. On an AVX2-only AMD EPYC (Zen 3, 2026-12-03)
oneDNN's gradient products ran at 0.79-0.92x MKL's and ``Agent.update`` took 106.2 ms
against 97.3 ms on MKL; on a 2-core Intel Xeon (Granite Rapids, AMX;
2026-12-03) MKL ran the same products at 280-346 GFLOP/s against oneDNN's 183-329 (the
weight gradient at 0.62x), and the whole ``Agent.update`` took 38.2 ms on oneDNN against
35.1 ms on MKL. So the products go to oneDNN by default only on AMD processors with
AVX-512 (``training_default``); ``IDQL_ONEDNN_TRAINING=1`` / ``0`` forces them on / off. The
inference engine (engines/cpu.py) stays on oneDNN everywhere: its prepacked weights and
fused epilogues won on the Xeon too (N = 64 float32 5.7 vs 6.0 ms, bf16 3.4 vs 4.1 ms)
and on the Zen 3 (64-row block products at 101-116 against MKL's 74-95 GFLOP/s).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_enabled: bool | None = None  # None: training_default(); set by training_products


@functools.cache
def available() -> bool:
    """Whether oneDNN's fused linear ops are usable in this torch build."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8), 4)
        torch.ops.mkldnn._linear_pointwise(torch.ones(4, 8), w, None, "relu", [], "")
        torch.ops.mkldnn._linear_pointwise(
            torch.ones(8, 4).t(), torch.ones(8, 8), None, "none", [], ""
        )
    except (RuntimeError, AttributeError):
        return False
    return True


@functools.cache
def bf16_native() -> bool:
    """Whether oneDNN runs bfloat16 products natively here (avx512_bf16, AMX or
    avx_ne_convert): probed with a packed product, since on an AVX2-only CPU
    (e.g. AMD Zen 3) oneDNN refuses to pack bf16 weights at all."""
    if not available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=torch.bfloat16), 4)
        torch.ops.mkldnn._linear_pointwise(
            torch.ones(4, 8, dtype=torch.bfloat16), w, None, "none", [], ""
        )
    except (RuntimeError, AttributeError):
        return False
    return True


def _cpuinfo(key: str) -> str:
    """The value of the first ``key`` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id ("AuthenticAMD", "GenuineIntel", ...; "" where unknown)."""
    return _cpuinfo("vendor_id")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo ("avx2", "avx512f", ...; empty where
    unknown)."""
    return frozenset(_cpuinfo("flags").split())


@functools.cache
def training_default() -> bool:
    """Whether training products go to oneDNN when nothing says otherwise: on AMD with
    AVX-512 (Zen 4/5: MKL runs a generic path there at half oneDNN's rate), not elsewhere
    (MKL as fast or faster: Intel Xeon, and AVX2-only AMD Zen 3, where oneDNN made
    ``Agent.update`` 8 % slower). ``IDQL_ONEDNN_TRAINING`` ("1" / "0", read once)
    overrides it; another value raises ValueError naming it."""
    forced = os.environ.get("IDQL_ONEDNN_TRAINING", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"IDQL_ONEDNN_TRAINING must be 0 or 1, got {forced!r}")
    return cpu_vendor() == "AuthenticAMD" and "avx512f" in cpu_flags()


def training_enabled() -> bool:
    """Whether training products go to oneDNN: available, and on (``training_products``
    inside its block, else ``training_default``)."""
    on = training_default() if _enabled is None else _enabled
    return on and available()


@contextlib.contextmanager
def training_products(enabled: bool) -> Iterator[None]:
    """Turn oneDNN training products on or off inside the block (process-wide)."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = old


def _mm_t(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """a @ b.T (+ bias) on oneDNN (a (M, K), b (N, K), either may be a strided view)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _mm_t(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm_t(dy2, weight.t()).view(ctx.x_shape)  # dy @ W
        if ctx.needs_input_grad[1]:
            dw = _mm_t(dy2.t(), x2.t())  # dy^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` (float32, CPU) with forward and both gradient products on oneDNN."""
    return _Linear.apply(x, weight, bias)  # type: ignore[no-any-return]
