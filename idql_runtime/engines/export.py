"""torch.export and ONNX views of the decision, and the check of what TensorRT would get.

``export_decision`` exports the decision at static (B, N, T) with ``strict=True`` (TorchDynamo
tracing: a graph break is an error, not a silent fallback), ``graph_report`` lowers it to
core ATen and checks every node against the ops torch_tensorrt's dynamo converters accept
(``TRT_CONVERTIBLE_OPS``), and ``export_onnx``/``run_onnx`` give the same graph to
onnxruntime. This is what CI can prove about the TensorRT engine on a machine without
TensorRT or a GPU (docs/engines.md says what was verified where).
"""

from __future__ import annotations

import collections
import copy
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from idql_runtime.decision import Decision, DecisionNoise, DecisionOutput, DecisionSpec

# ATen ops with a converter in torch_tensorrt's dynamo frontend
# (py/torch_tensorrt/dynamo/conversion/aten_ops_converters.py, 2.x), restricted to what a
# decision graph can contain after core-ATen lowering. A node outside this set would run
# in PyTorch between TensorRT engines (a graph partition), which the engine forbids
# (require_full_compilation=True).
TRT_CONVERTIBLE_OPS: frozenset[str] = frozenset(
    {
        "aten.abs.default",
        "aten.add.Scalar",
        "aten.add.Tensor",
        "aten.addmm.default",
        "aten.amax.default",
        "aten.amin.default",
        "aten.arange.start_step",
        "aten.argmax.default",
        "aten.argmin.default",
        "aten.bmm.default",
        "aten.cat.default",
        "aten.clamp.default",
        "aten.clamp.Tensor",
        "aten.clone.default",
        "aten.cos.default",
        "aten.cumsum.default",
        "aten.div.Scalar",
        "aten.div.Tensor",
        "aten.eq.Scalar",
        "aten.eq.Tensor",
        "aten.exp.default",
        "aten.expand.default",
        "aten.expm1.default",
        "aten.full.default",
        "aten.gather.default",
        "aten.ge.Scalar",
        "aten.ge.Tensor",
        "aten.gt.Scalar",
        "aten.gt.Tensor",
        "aten.le.Scalar",
        "aten.le.Tensor",
        "aten.log.default",
        "aten.lt.Scalar",
        "aten.lt.Tensor",
        "aten.maximum.default",
        "aten.minimum.default",
        "aten.mm.default",
        "aten.mul.Scalar",
        "aten.mul.Tensor",
        "aten.native_layer_norm.default",
        "aten.neg.default",
        "aten.permute.default",
        "aten.reciprocal.default",
        "aten.relu.default",
        "aten.rsqrt.default",
        "aten.select.int",
        "aten.sigmoid.default",
        "aten.sin.default",
        "aten.slice.Tensor",
        "aten.sqrt.default",
        "aten.squeeze.dim",
        "aten.squeeze.dims",
        "aten.sub.Scalar",
        "aten.sub.Tensor",
        "aten.sum.dim_IntList",
        "aten.tanh.default",
        "aten.unsqueeze.default",
        "aten.view.default",
        "aten.where.self",
        "aten._to_copy.default",
    }
)

# torch_tensorrt's ``to_copy_dtype_validator``: the casts its _to_copy converter accepts.
_TRT_CASTS = {torch.float32, torch.int32, torch.int64, torch.bool, torch.int8, torch.float16}

# Ops whose converter accepts only the first output through getitem (the validator
# ``one_user_validator`` in torch_tensorrt): in eval mode the mean/rstd outputs are unused.
_FIRST_OUTPUT_ONLY = {"aten.native_layer_norm.default"}

OUTPUT_NAMES = ("action", "chosen_q", "value", "adv_spread", "index")
INPUT_NAMES = ("obs", "x_init", "step_noise", "u")


class ExportableDecision(nn.Module):
    """The decision with plain-tuple outputs (what exporters want), weights in ``dtype``.

    Inputs are expected in ``dtype`` already and outputs come back in it (index int64):
    casts stay outside the graph, so a low-precision graph holds no dtype conversions.
    It holds a copy of ``decision``: ``agent.decision()`` shares the agent's own score_ema,
    q_target and v, which a cast (or a later ``.to(device)``) in place would turn into
    bf16 training parameters.
    """

    def __init__(self, decision: Decision, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.decision = copy.deepcopy(decision).to(dtype=dtype)

    def forward(
        self, obs: Tensor, x_init: Tensor, step_noise: Tensor, u: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return tuple(self.decision(obs, x_init, step_noise, u))  # type: ignore[return-value]


def example_inputs(
    spec: DecisionSpec,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    noise = DecisionNoise.draw(spec, generator=g)
    obs = torch.randn(spec.batch, spec.obs_dim, generator=g)
    return tuple(t.to(device, dtype) for t in (obs, *noise))  # type: ignore[return-value]


def export_decision(
    decision: Decision,
    spec: DecisionSpec,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    strict: bool = True,
) -> torch.export.ExportedProgram:
    """torch.export the decision at static shapes; strict=True fails on any graph break."""
    module = ExportableDecision(decision, compute_dtype).to(device).eval()
    with torch.no_grad():
        return torch.export.export(
            module, example_inputs(spec, device, compute_dtype), strict=strict
        )


def _full_like(
    x: Tensor,
    fill_value: Any,
    *,
    dtype: torch.dtype | None = None,
    layout: Any = None,
    device: Any = None,
    pin_memory: Any = None,
    memory_format: Any = None,
) -> Tensor:
    return torch.full(x.shape, fill_value, dtype=dtype or x.dtype, device=device or x.device)


def lower_to_core_aten(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Core-ATen decompositions (+ full_like -> full, which TensorRT's lowering also does)."""
    table = torch.export.default_decompositions()
    table[torch.ops.aten.full_like.default] = _full_like
    return ep.run_decompositions(table)


@dataclass
class GraphReport:
    """What a lowered exported decision contains, judged against TensorRT's converters."""

    ops: dict[str, int]
    not_convertible: list[str] = field(default_factory=list)
    non_aten: list[str] = field(default_factory=list)
    dynamic_inputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.not_convertible or self.non_aten or self.dynamic_inputs or self.notes)


def graph_report(
    ep: torch.export.ExportedProgram, *, convertible: frozenset[str] = TRT_CONVERTIBLE_OPS
) -> GraphReport:
    """Lower ``ep`` to core ATen and check every node.

    Flags: ops without a TensorRT converter, anything that is not an ATen op overload
    (higher-order ops such as cond/while_loop, Python callables, call_module nodes),
    placeholders with symbolic (dynamic) shapes, and multi-output ops whose extra outputs
    are used (the converters accept only output 0).
    """
    low = lower_to_core_aten(ep)
    ops: collections.Counter[str] = collections.Counter()
    rep = GraphReport(ops={})
    for node in low.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, Tensor) and any(not isinstance(d, int) for d in val.shape):
                rep.dynamic_inputs.append(node.name)
            continue
        if node.op in ("output", "get_attr"):
            continue
        if node.op != "call_function":
            rep.non_aten.append(f"{node.op}:{node.target}")
            continue
        target = node.target
        if target is operator.getitem:
            src = node.args[0]
            if (
                str(getattr(src, "target", "")) in _FIRST_OUTPUT_ONLY
                and node.args[1] != 0
                and len(node.users) > 0
            ):
                rep.notes.append(f"{src.target} output {node.args[1]} is used")
            continue
        if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
            rep.non_aten.append(str(target))
            continue
        name = str(target)
        ops[name] += 1
        if name not in convertible:
            rep.not_convertible.append(name)
        elif name == "aten._to_copy.default" and node.kwargs.get("dtype") not in _TRT_CASTS:
            rep.not_convertible.append(f"{name}(dtype={node.kwargs.get('dtype')})")
    rep.ops = dict(sorted(ops.items()))
    rep.not_convertible = sorted(set(rep.not_convertible))
    return rep


def export_onnx(
    decision: Decision,
    spec: DecisionSpec,
    path: str | Path,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> Path:
    """Export the decision to ONNX (torch.onnx dynamo exporter) at static shapes."""
    path = Path(path)
    module = ExportableDecision(decision, compute_dtype).eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            example_inputs(spec, dtype=compute_dtype),
            str(path),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            verbose=False,
        )
    return path


def run_onnx(path: str | Path, obs: Tensor, noise: DecisionNoise) -> DecisionOutput:
    """Run an exported float32 decision in onnxruntime (CPU) on the given noise."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        name: np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy())
        for name, t in zip(INPUT_NAMES, (obs, *noise), strict=True)
    }
    out = sess.run(list(OUTPUT_NAMES), feeds)
    return DecisionOutput(*(torch.from_numpy(np.asarray(o)) for o in out))
