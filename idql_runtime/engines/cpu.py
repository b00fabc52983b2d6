"""The fast CPU engine: the hoisted decision on oneDNN with packed weights and fused epilogues.

Why it is faster than eager on x86 (measured on a 2-core AMD EPYC, see docs/engines.md):
- plain ``F.linear`` goes to MKL, which on this AMD processor runs a generic path at about
  200 GFLOP/s; oneDNN (``torch.ops.mkldnn._linear_pointwise``) reaches about 390 GFLOP/s
  float32 and 630 GFLOP/s bfloat16 (avx512_bf16) on the (64 x 256 x 1024) block products
  of an N = 64 decision (490 / 960 at 1024 rows), close to the two cores' peak;
- the weights are reordered once into oneDNN's blocked layout for the static row count
  B*N (``_reorder_linear_weight``) instead of on every call;
- the activation of each block's first layer (swish/relu) and, in float32, the residual
  add after its second layer are fused into the matrix product as oneDNN post-ops;
- the observation's and the T time embeddings' share of the first layer are computed once
  per decision (time shares once per weight load), as in ``Decision``.
In bfloat16 only the block products run in bf16 (weights and their inputs, float32
accumulation); LayerNorm, the residual stream, the reverse update and the critic stay
float32. Without oneDNN (non-x86 builds) the same code runs on ``F.linear``.

Where oneDNN has no native bf16 kernels (an AVX2-only CPU such as AMD Zen 3, where it
refuses to pack bf16 weights and plain bf16 ``F.linear`` is ~17x slower than float32),
bfloat16 is emulated: the weights, biases and every product's input and output are
rounded to bf16 and the products run in float32 -- bf16's numbers at float32's speed, so
that a bf16 deployment can be checked here (``info["bf16"] == "emulated"``). ``--dtype
auto`` never picks it (``precision.reduced_dtype_for``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idql_runtime import onednn
from idql_runtime.decision import DecisionNoise, DecisionOutput, DecisionSpec, select_index
from idql_runtime.engines.base import Engine, to_output

_POST_OPS = {nn.SiLU: "swish", nn.ReLU: "relu"}


def _bf16_round(x: Tensor) -> Tensor:
    """x rounded to bfloat16's values, kept in float32."""
    return x.to(torch.bfloat16).to(torch.float32)


class _Linear:
    """y = post(x @ W^T + b) on a weight packed for ``rows`` input rows; ``emulate``:
    bf16 values (weight, bias, output) in float32 kernels."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        rows: int,
        dtype: torch.dtype,
        onednn: bool,
        emulate: bool = False,
    ) -> None:
        self.onednn, self.emulate = onednn, emulate
        kernel = torch.float32 if emulate else dtype
        w = weight.detach().to(dtype).to(kernel).contiguous()
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, rows) if onednn else w
        self.b = None if bias is None else bias.detach().to(dtype).to(kernel).contiguous()

    def __call__(self, x: Tensor, post: str = "none") -> Tensor:
        if self.onednn:
            y = torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, post, [], "")
        else:
            y = F.linear(x, self.w, self.b)
            if post != "none":  # only the activation asked for (a dict of all three ran both)
                y = F.silu(y) if post == "swish" else torch.relu(y)
        return _bf16_round(y) if self.emulate else y

    def add(self, x: Tensor, other: Tensor) -> Tensor:
        """x @ W^T + b + other, the add fused into the product where oneDNN allows."""
        if self.onednn and x.dtype == other.dtype:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.w, self.b, "add")
        return torch.add(other, self(x))


class CpuEngine(Engine):
    """Hoisted decision on oneDNN; dtype float32 (default) or bfloat16 (block products)."""

    name = "cpu"

    def __init__(
        self, agent: Any, spec: DecisionSpec, *, threads: int | None = None, **kw: Any
    ) -> None:
        super().__init__(agent, spec, **kw)
        if self.device.type != "cpu":
            raise ValueError(f"the cpu engine runs on the CPU, not {self.device}")
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the cpu engine supports float32 and bfloat16, not {self.dtype}")
        if threads is not None:
            torch.set_num_threads(threads)
        self.onednn = onednn.available()
        # bf16 without native kernels: bf16 values in float32 products (module docstring)
        self._emulate = self.dtype == torch.bfloat16 and not onednn.bf16_native()
        self.info.update(
            backend="onednn" if self.onednn else "aten", threads=torch.get_num_threads()
        )
        if self.dtype == torch.bfloat16:
            self.info["bf16"] = "emulated" if self._emulate else "native"
        self._pack()

    def _weights_changed(self) -> None:
        self._pack()

    @torch.no_grad()
    def _pack(self) -> None:
        """Precompute everything that depends on the weights only."""
        d, s = self.decision, self.spec
        rows, f32, lo, em = s.batch * s.samples, torch.float32, self.dtype, self._emulate
        score: Any = d.score  # nn.Module attributes type as Tensor | Module for mypy
        w_a, w_o, _ = score.split_input_weight()
        self._w_a = w_a.T.contiguous().expand(s.batch, -1, -1)  # (B, A, H) for baddbmm
        self._w_o, self._b_in = w_o.T.contiguous(), score.inp.bias.detach().clone()
        self._time_share = d.time_shares(f32, self.device).contiguous()  # (T, H)
        self._blocks: list[tuple[Any, _Linear, str | None, Any, _Linear]] = []
        for blk in score.blocks:
            act = _POST_OPS.get(type(blk.act))
            self._blocks.append(
                (
                    blk.norm if isinstance(blk.norm, nn.LayerNorm) else None,
                    _Linear(blk.fc1.weight, blk.fc1.bias, rows, lo, self.onednn, em),
                    act,
                    blk.act,
                    _Linear(blk.fc2.weight, blk.fc2.bias, rows, lo, self.onednn, em),
                )
            )
        self._out_act: Any = score.act
        self._w_out, self._b_out = score.out.weight.T.contiguous(), score.out.bias.detach().clone()
        q: Any = d.q
        self._q_w_a = q.layers[0].weight[:, q.obs_dim :].contiguous()  # (E, A, H0)
        self._q_mid = [
            [
                _Linear(layer.weight[e].T, layer.bias[e, 0], rows, f32, self.onednn)
                for layer in q.layers[1:-1]
            ]
            for e in range(q.num_qs)
        ]
        last = q.layers[-1]
        self._q_last = [
            (last.weight[e].contiguous(), last.bias[e, 0].contiguous()) for e in range(q.num_qs)
        ]

    @torch.inference_mode()
    def _run(self, obs: Tensor, noise: DecisionNoise | None) -> DecisionOutput:
        d, s = self.decision, self.spec
        noise = self._draw_noise() if noise is None else noise
        b, n, a = s.batch, s.samples, s.act_dim
        x = noise.x_init.to(torch.float32).clone()
        z = noise.step_noise.to(torch.float32)
        obs_share = torch.addmm(self._b_in, obs, self._w_o)  # (B, H)
        h0 = (obs_share.unsqueeze(0) + self._time_share.unsqueeze(1)).unsqueeze(2)  # (T, B, 1, H)
        for t in range(s.steps - 1, -1, -1):
            x = self._step(x, h0[t], t, z[t])
        for _ in range(d.extra_final_steps):
            x = self._step(x, h0[0], 0, None)
        x = x.clamp_(-1.0, 1.0)

        q_obs = d.q.first_obs_share(obs)  # (E, B, H0)
        q = None
        for e in range(d.q.num_qs):
            h = torch.baddbmm(q_obs[e].unsqueeze(1), x, self._q_w_a[e].expand(b, -1, -1))
            h = torch.relu_(h).view(b * n, -1)
            for lin in self._q_mid[e]:
                h = lin(h, "relu")
            w, bias = self._q_last[e]
            qe = torch.addmm(bias, h, w).view(b, n)
            q = qe if q is None else torch.minimum(q, qe)
        assert q is not None
        v = d.v(obs)
        idx = select_index(q, v, noise.u.to(torch.float32), d.mode, d.value_loss, d.tau, d.alpha)
        action = torch.gather(x, 1, idx.view(b, 1, 1).expand(b, 1, a)).squeeze(1)
        chosen_q = torch.gather(q, 1, idx.view(b, 1)).squeeze(1)
        return to_output(DecisionOutput(action, chosen_q, v, q.amax(-1) - q.amin(-1), idx))

    def _step(self, x: Tensor, h0: Tensor, t: int, z: Tensor | None) -> Tensor:
        """One reverse step on all candidates: x (B, N, A), h0 (B, 1, H) = obs + time share."""
        d, s = self.decision, self.spec
        h = torch.baddbmm(h0, x, self._w_a).view(s.batch * s.samples, -1)  # (B*N, H) float32
        lo = self.dtype
        for norm, fc1, post, act, fc2 in self._blocks:
            y = (
                F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                if norm
                else h
            )
            if self._emulate:
                y = _bf16_round(y)
            elif lo != torch.float32:
                y = y.to(lo)
            y = fc1(y, post) if post else act(fc1(y))
            if self._emulate and not post:
                y = _bf16_round(y)  # as a bf16 activation's output would be
            h = fc2.add(y, h) if lo == torch.float32 else torch.add(h, fc2(y))
        eps_hat = torch.addmm(self._b_out, self._out_act(h), self._w_out).view_as(x)
        x = torch.add(x, eps_hat, alpha=-d._eps_coef[t]).mul_(d._inv_sqrt_alpha[t])
        if t > 0 and z is not None:
            x = x.add_(z, alpha=d._sigma[t] * d.temperature)
        if d.clip:
            x = x.clamp_(-1.0, 1.0)
        return x
