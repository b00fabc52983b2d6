"""The CUDA-graph engine: the whole decision captured once and replayed.

One graph holds the noise draws (philox, from a private generator registered with the
graph, so every replay draws fresh numbers), all T reverse steps, the critic, the
selection (gather, never ``a[argmax]``) and the packing of the outputs into one buffer,
which comes back to the host in one copy. Inputs and outputs live in static buffers; the
observation goes host -> pinned buffer -> device buffer before each replay.

A second graph, captured on first use, takes the noise from static input buffers instead
(``decide_with_noise``, for parity tests). ``load_weights`` copies into the parameters in
place, so both graphs stay valid. With ``compile_mode`` set (the "compiled" engine) the
captured module is ``torch.compile``d first, so the graph replays Triton kernels.
In bfloat16/float16 the score network's matrix products run under autocast
(``Decision.trunk_dtype``); LayerNorm, the residual stream, the reverse update, the critic
and the selection stay float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from idql_runtime.decision import DecisionNoise, DecisionOutput, DecisionSpec
from idql_runtime.engines.base import (
    Engine,
    EngineUnavailable,
    TimeShareCache,
    capture_cuda_graph,
    pinned_decide,
)

_WARMUP_CALLS = 3


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"this engine runs on a CUDA device, not {device}")
    if not torch.cuda.is_available():
        raise EngineUnavailable("no CUDA GPU visible to torch (torch.cuda.is_available() is False)")


class CudaGraphEngine(Engine):
    name = "cuda_graph"

    def __init__(
        self, agent: Any, spec: DecisionSpec, *, compile_mode: str | None = None, **kw: Any
    ) -> None:
        device = torch.device(kw.get("device", "cuda"))
        require_cuda(device)
        if device.index is None:
            kw["device"] = torch.device("cuda", torch.cuda.current_device())
        super().__init__(agent, spec, **kw)
        if self.dtype == torch.float64:
            raise ValueError("the CUDA-graph engine runs float32, bfloat16 or float16")
        self._autocast = self.dtype in (torch.bfloat16, torch.float16)
        self.decision.trunk_dtype = self.dtype if self._autocast else None
        self._time_shares = TimeShareCache(self.decision)  # no time-embedding kernels per call
        self._fn: Callable[..., DecisionOutput] = self.decision
        if compile_mode is not None:
            self._fn = torch.compile(
                self.decision, mode=compile_mode, fullgraph=True, dynamic=False
            )
        s, dev = spec, self.device
        self._cols = s.act_dim + 4  # action | chosen_q | value | adv_spread | index
        self._obs = torch.zeros(s.batch, s.obs_dim, device=dev)
        self._obs_host = torch.zeros(s.batch, s.obs_dim).pin_memory()
        self._out_host = torch.zeros(s.batch, self._cols).pin_memory()
        self._noise_in = DecisionNoise.draw(spec, device=dev)  # static inputs of graph 2
        self._drawn: DecisionNoise | None = None
        self._graph_rng, self._out_rng = self._capture(self._body_rng, register_rng=True)
        self._graph_given: torch.cuda.CUDAGraph | None = None
        self._out_given: Tensor | None = None
        fast = pinned_decide(
            self._obs_host, self._obs, self._graph_rng.replay, self._out_rng,
            self._out_host, self._cols, s.act_dim, dev,
        )  # fmt: skip
        self._fast_decide = (fast, (s.batch, s.obs_dim))
        self.info.update(
            precision="autocast (score network)" if self._autocast else "full",
            compile_mode=compile_mode,
            rng="in-graph philox (private generator)",
            card=torch.cuda.get_device_name(dev),
        )

    def _weights_changed(self) -> None:
        self._time_shares.refresh()

    # ------------------------------------------------------------------ capture
    def _packed(self, obs: Tensor, noise: DecisionNoise) -> Tensor:
        out = self._fn(obs, *noise)
        f = torch.float32
        cols = [
            out.action.to(f),
            out.chosen_q.to(f).unsqueeze(1),
            out.value.to(f).unsqueeze(1),
            out.adv_spread.to(f).unsqueeze(1),
            out.index.to(f).unsqueeze(1),
        ]
        return torch.cat(cols, dim=1)  # (B, A + 4); indices < 2**24 are exact in float32

    def _body_rng(self) -> Tensor:
        noise = DecisionNoise.draw(self.spec, generator=self.generator, device=self.device)
        self._drawn = noise
        return self._packed(self._obs, noise)

    def _body_given(self) -> Tensor:
        return self._packed(self._obs, self._noise_in)

    def _capture(
        self, body: Callable[[], Tensor], *, register_rng: bool = False
    ) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # warm-up compiles, autotunes, creates cuBLAS handles
        gen = self.generator if register_rng else None
        return capture_cuda_graph(body, self.device, warmup=_WARMUP_CALLS, generator=gen)

    # ------------------------------------------------------------------ run
    def _run(self, obs: Tensor, noise: DecisionNoise | None) -> DecisionOutput:
        self._obs_host.copy_(obs)
        self._obs.copy_(self._obs_host, non_blocking=True)
        if noise is None:
            self._graph_rng.replay()
            packed = self._out_rng
        else:
            for dst, src in zip(self._noise_in, noise, strict=True):
                dst.copy_(src.to(self.device, torch.float32))
            if self._graph_given is None:  # capture reads the buffers, never writes them
                self._graph_given, self._out_given = self._capture(self._body_given)
            self._graph_given.replay()
            assert self._out_given is not None
            packed = self._out_given
        self._out_host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return self._unpack(self._out_host)

    def _unpack(self, host: Tensor) -> DecisionOutput:
        a = self.spec.act_dim
        h = host.clone()
        return DecisionOutput(
            h[:, :a], h[:, a], h[:, a + 1], h[:, a + 2], h[:, a + 3].round().to(torch.int64)
        )

    def last_noise(self) -> DecisionNoise:
        """CPU copies of the noise the in-graph RNG drew in the latest ``decide`` call."""
        assert self._drawn is not None
        return DecisionNoise(*(t.detach().to("cpu", copy=True) for t in self._drawn))
