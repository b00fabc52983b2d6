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
