"""The eager engine: ``Agent.decision`` as written, under ``torch.inference_mode``.

The baseline every other engine is timed against. In float32/float64 the whole module
runs in that dtype; in bfloat16/float16 the score network's matrix products run under
autocast (``Decision.trunk_dtype``); LayerNorm, the residual stream, the reverse update,
the critic and the selection stay float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from idql_runtime.decision import DecisionNoise, DecisionOutput, DecisionSpec
from idql_runtime.engines.base import Engine, to_output


class EagerEngine(Engine):
    name = "eager"

    def __init__(self, agent: Any, spec: DecisionSpec, **kw: Any) -> None:
        super().__init__(agent, spec, **kw)
        self._autocast = self.dtype in (torch.bfloat16, torch.float16)
        if self.dtype == torch.float64:
            self.decision.double()
        if self._autocast and self.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("float16 is a GPU dtype; use float32 or bfloat16 on the CPU")
        self.info["precision"] = "autocast (score network)" if self._autocast else "full"
        self.decision.trunk_dtype = self.dtype if self._autocast else None

    @torch.inference_mode()
    def _run(self, obs: Tensor, noise: DecisionNoise | None) -> DecisionOutput:
        noise = self._draw_noise() if noise is None else noise
        wide = torch.float64 if self.dtype == torch.float64 else torch.float32
        obs = obs.to(self.device, wide, non_blocking=True)
        args = [t.to(self.device, wide) for t in noise]
        return to_output(self.decision(obs, *args))
