"""oneDNN float32 training products (onednn.py, networks.BlockLinear) against float64.

Expected values: F.linear and autograd in float64 on the same inputs. A float32 product of
K terms has relative error ~K * 2^-24 in the worst case; the bounds below (2e-5 of the
output scale for K <= 1024) leave room for any summation order and none for a wrong
transpose or a missing bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idql_runtime import onednn
from idql_runtime.networks import BlockLinear

pytestmark = pytest.mark.skipif(not onednn.available(), reason="no oneDNN in this torch build")


def _float64_grads(x, w, b, gy):
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    y = F.linear(x64, w64, b64)
    y.backward(gy.double())
    return y, x64.grad, w64.grad, None if b64 is None else b64.grad


def _close(got, want, scale_of=None):
    scale = float((want if scale_of is None else scale_of).detach().abs().max())
    err = float((got.double() - want).detach().abs().max())
    assert err <= 2e-5 * scale, (err, scale)


@pytest.mark.parametrize("shape", [(512, 256), (4, 7, 256)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out", [1024, 32])
def test_linear_and_both_gradients_match_float64(shape, bias, out) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).requires_grad_()
    w = (torch.randn(out, shape[-1], generator=g) / 16).requires_grad_()
    b = torch.randn(out, generator=g).requires_grad_() if bias else None
    gy = torch.randn(*shape[:-1], out, generator=g)
    y = onednn.linear(x, w, b)
    y.backward(gy)
    y64, gx64, gw64, gb64 = _float64_grads(
        x.detach(), w.detach(), None if b is None else b.detach(), gy
    )
    assert y.shape == y64.shape and y.dtype == torch.float32
    _close(y, y64)
    _close(x.grad, gx64)
    _close(w.grad, gw64)
    if b is not None:
        _close(b.grad, gb64)


def test_only_the_asked_gradients_are_computed() -> None:
    x = torch.randn(8, 16)
    w = torch.randn(4, 16).requires_grad_()
    onednn.linear(x, w).sum().backward()
    assert x.grad is None and w.grad is not None
    torch.testing.assert_close(w.grad, torch.ones(8, 4).t() @ x, rtol=1e-5, atol=1e-5)


def test_block_linear_uses_onednn_only_for_cpu_float32_training(monkeypatch) -> None:
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: calls.append(1) or real(*a))
    layer = BlockLinear(16, 64)
    x = torch.randn(5, 16)
    ref = F.linear(x, layer.weight, layer.bias)
    with onednn.training_products(True):
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1  # training mode, grad enabled, float32, CPU
        with torch.no_grad():
            layer(x)
        layer.eval()
        layer(x)
        layer.train()
        layer.double()(x.double())
        layer.float()
        with onednn.training_products(False):
            torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)  # exactly F.linear
        assert len(calls) == 1
        assert onednn.training_enabled()
    assert onednn.training_enabled() == onednn.training_default()


AVX512 = frozenset({"avx2", "avx512f", "avx512bw"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize(
    ("vendor", "flags", "env", "on"),
    [
        ("AuthenticAMD", AVX512, None, True),  # Zen 5: MKL's generic path, half oneDNN's rate
        ("AuthenticAMD", AVX2, None, False),  # Zen 3: MKL 8 % faster on Agent.update
        ("GenuineIntel", AVX512, None, False),  # MKL as fast or faster (Xeon, 2026-12-03)
        ("", frozenset(), None, False),
        ("GenuineIntel", AVX512, "1", True),
        ("AuthenticAMD", AVX512, "0", False),
    ],
)
def test_training_products_default_to_onednn_only_where_mkl_is_slow(
    monkeypatch, vendor: str, flags: frozenset[str], env: str | None, on: bool
) -> None:
    """On the Intel Xeon the CI machines can be, oneDNN made Agent.update 9 % slower
    (38.2 vs 35.1 ms): it was on for every x86 CPU. On an AVX2-only AMD Zen 3, 8 % slower
    (106.2 vs 97.3 ms): it was on for every AMD CPU."""
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(onednn, "cpu_flags", lambda: flags)
    if env is None:
        monkeypatch.delenv("IDQL_ONEDNN_TRAINING", raising=False)
    else:
        monkeypatch.setenv("IDQL_ONEDNN_TRAINING", env)
    onednn.training_default.cache_clear()
    try:
        assert onednn.training_default() is on
        assert onednn.training_enabled() is on
        with onednn.training_products(not on):
            assert onednn.training_enabled() is (not on)
        assert onednn.training_enabled() is on
        monkeypatch.setenv("IDQL_ONEDNN_TRAINING", "yes")
        onednn.training_default.cache_clear()
        with pytest.raises(ValueError, match="IDQL_ONEDNN_TRAINING must be 0 or 1, got 'yes'"):
            onednn.training_default()
    finally:
        monkeypatch.undo()
        onednn.training_default.cache_clear()


def test_cpu_flags_read_this_machines_flags() -> None:
    text = open("/proc/cpuinfo").read()
    expected = next(
        ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")
    )
    assert onednn.cpu_flags() == frozenset(expected) and "sse2" in onednn.cpu_flags()


def test_cpu_vendor_reads_this_machines_vendor_id() -> None:
    text = open("/proc/cpuinfo").read()
    expected = next(
        ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("vendor_id")
    )
    assert onednn.cpu_vendor() == expected
