"""The torch.compile engine.

CPU: ``torch.compile`` (inductor's C++ backend) of the hoisted decision, weights as graph
inputs, so ``load_weights`` (in-place copies) stays valid with no recompilation. Inductor's
``freezing`` (weights folded in as constants, oneDNN prepacking) is deliberately not
offered: a frozen graph keeps (part of) the old weights when they change in place, and
dynamo may hand one engine's compiled code to another Decision of the same structure.
Measured on the 2-core EPYC (docs/engines.md) it was no faster than the ``cpu`` engine.
CUDA: the decision compiled with ``compile_mode`` (default "max-autotune-no-cudagraphs")
and then captured in this package's own CUDA graph with the noise drawn inside it
(``CudaGraphEngine`` with a compiled module), which is what inductor's "reduce-overhead"
would do, minus its per-call input copies and plus in-graph random numbers.

Compilation is paid once per process and shape; inductor's on-disk caches (under
``cache_dir`` when given, else ``TORCHINDUCTOR_CACHE_DIR`` or /tmp) make later builds of the
same graph much cheaper.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from idql_runtime.decision import DecisionNoise, DecisionOutput, DecisionSpec
from idql_runtime.engines.base import Engine, to_output
from idql_runtime.engines.cuda_graph import CudaGraphEngine

DEFAULT_GPU_MODE = "max-autotune-no-cudagraphs"


def _use_cache_dir(cache_dir: str | None) -> None:
    if cache_dir:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "inductor"))


class CompiledCpuEngine(Engine):
    name = "compiled"

    def __init__(
        self,
        agent: Any,
        spec: DecisionSpec,
        *,
        compile_mode: str | None = None,
        cache_dir: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(agent, spec, **kw)
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"the compiled CPU engine supports float32 and bfloat16, not {self.dtype}"
            )
        _use_cache_dir(cache_dir)
        # bf16: the score network's products under autocast, critic and selection float32.
        self.decision.trunk_dtype = None if self.dtype == torch.float32 else self.dtype
        self._fn = torch.compile(self.decision, mode=compile_mode, fullgraph=True, dynamic=False)
        self.info.update(compile_mode=compile_mode or "default")

    @torch.no_grad()
    def _run(self, obs: Tensor, noise: DecisionNoise | None) -> DecisionOutput:
        noise = self._draw_noise() if noise is None else noise
        return to_output(self._fn(obs, *noise))


class CompiledCudaEngine(CudaGraphEngine):
    name = "compiled"

    def __init__(
        self,
        agent: Any,
        spec: DecisionSpec,
        *,
        compile_mode: str | None = None,
        cache_dir: str | None = None,
        **kw: Any,
    ) -> None:
        _use_cache_dir(cache_dir)
        super().__init__(agent, spec, compile_mode=compile_mode or DEFAULT_GPU_MODE, **kw)


def CompiledEngine(agent: Any, spec: DecisionSpec, **kw: Any) -> Engine:  # noqa: N802
    """The compiled engine for the device in ``kw`` (CPU or CUDA)."""
    if torch.device(kw.get("device", "cpu")).type == "cuda":
        return CompiledCudaEngine(agent, spec, **kw)
    return CompiledCpuEngine(agent, spec, **kw)
