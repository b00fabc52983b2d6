"""The TensorRT engine: torch_tensorrt's dynamo path at static shapes, cached on disk.

Build: ``torch.export`` of the float32 decision (strict, static B, N, T; see export.py) ->
``torch_tensorrt.dynamo.compile`` with ``require_full_compilation`` (no PyTorch fallback
partitions) and refittable weights -> ``torch_tensorrt.save`` as an ExportedProgram under
``cache_dir``, keyed by the sha256 of the weights, the shapes, the dtype, the mode and the
torch / torch_tensorrt / TensorRT versions and the GPU's compute capability. A later build
with the same key loads the file instead of rebuilding. Low precision is TensorRT's job:
the graph stays float32 and float16/bfloat16 is asked for through the compile settings
(autocast in recent torch_tensorrt, ``enabled_precisions`` in older ones).
Noise is drawn by a private torch generator on the GPU and fed in as inputs.
``load_weights`` refits the engine in place (``refit_module_weights``) and rebuilds if the
refit fails.

TensorRT is not installable on the machines this package was developed on; the parts CI
can prove (the export has no graph breaks and only ops with TensorRT converters; ONNX of
the same graph matches eager in onnxruntime) are tested, the engine itself only where
torch_tensorrt and a GPU exist (docs/engines.md).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idql_runtime.decision import DecisionNoise, DecisionOutput, DecisionSpec
from idql_runtime.engines.base import (
    Engine,
    EngineUnavailable,
    dtype_name,
    to_output,
    weights_digest,
)
from idql_runtime.engines.export import export_decision, graph_report

log = logging.getLogger("idql_runtime.engines")

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "idql_runtime", "tensorrt")


@functools.lru_cache(maxsize=1)
def tensorrt_status() -> str | None:
    """None when torch_tensorrt imports, else a sentence saying what is missing."""
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError as e:
        return (
            f"torch_tensorrt is not installed ({e}); install the 'tensorrt' extra "
            "(pip install 'idql-runtime[tensorrt]', needs an NVIDIA driver) on a GPU machine"
        )
    except Exception as e:  # noqa: BLE001 - torch_tensorrt raises plain Exceptions for missing libs
        return (
            f"torch_tensorrt is installed but cannot load TensorRT's libraries "
            f"({type(e).__name__}: {e}); check the tensorrt wheel and the NVIDIA driver"
        )
    return None


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of kwargs that fn names explicitly (settings differ across 2.x releases)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _versions() -> str:
    import tensorrt
    import torch_tensorrt

    return f"torch={torch.__version__};torch_tensorrt={torch_tensorrt.__version__};trt={tensorrt.__version__}"


class TensorRTEngine(Engine):
    name = "tensorrt"

    def __init__(
        self,
        agent: Any,
        spec: DecisionSpec,
        *,
        cache_dir: str | None = None,
        optimization_level: int | None = None,
        **kw: Any,
    ) -> None:
        device = torch.device(kw.get("device", "cuda"))
        if device.type != "cuda":
            raise ValueError(f"the TensorRT engine runs on a CUDA device, not {device}")
        problems = [] if torch.cuda.is_available() else ["no CUDA GPU visible to torch"]
        missing = tensorrt_status()
        if missing is not None:
            problems.append(missing)
        if problems:
            raise EngineUnavailable("the TensorRT engine cannot run here: " + "; ".join(problems))
        super().__init__(agent, spec, **kw)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"the TensorRT engine runs float32, float16 or bfloat16, not {self.dtype}"
            )
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
        self.optimization_level = optimization_level
        self._inputs = [t.to(self.device) for t in self._example()]
        self._trt = self._load_or_build()
        self.info.update(
            card=torch.cuda.get_device_name(self.device),
            cache=str(self._path),
            versions=_versions(),
        )

    def _example(self) -> tuple[Tensor, ...]:
        s = self.spec
        noise = DecisionNoise.draw(s)
        return (torch.zeros(s.batch, s.obs_dim), *noise)

    def cache_key(self) -> str:
        s = self.spec
        cap = torch.cuda.get_device_capability(self.device)
        text = ";".join(
            [
                weights_digest(self.decision),
                f"B={s.batch};N={s.samples};T={s.steps}",
                f"A={s.act_dim};O={s.obs_dim};mode={s.mode}",
                dtype_name(self.dtype),
                _versions(),
                f"sm={cap[0]}{cap[1]}",
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def _path(self) -> Path:
        return self.cache_dir / f"decision-{self.cache_key()[:32]}.ep"

    def _load_or_build(self) -> Any:
        import torch_tensorrt

        path = self._path
        if path.exists():
            log.info("tensorrt: loading cached engine %s", path)
            self.info["cache_hit"] = True
            return torch_tensorrt.load(str(path)).module()
        self.info["cache_hit"] = False
        gm = self._compile()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch_tensorrt.save(
            gm,
            str(tmp),
            **_accepted(
                torch_tensorrt.save,
                {
                    "output_format": "exported_program",
                    "arg_inputs": self._inputs,
                    "inputs": self._inputs,
                },
            ),
        )
        os.replace(tmp, path)
        return gm

    def _compile(self) -> Any:
        import torch_tensorrt

        ep = export_decision(self.decision, self.spec, device=self.device)
        report = graph_report(ep)
        if not report.ok:
            log.warning("tensorrt: export report not clean: %s", report)
        settings: dict[str, Any] = {
            "arg_inputs": self._inputs,
            "inputs": self._inputs,
            "require_full_compilation": True,
            "min_block_size": 1,
            "immutable_weights": False,
            "make_refittable": True,
            "device": self.device,
            "truncate_double": True,
        }
        if self.optimization_level is not None:
            settings["optimization_level"] = self.optimization_level
        compile_fn = torch_tensorrt.dynamo.compile
        params = inspect.signature(compile_fn).parameters
        if self.dtype == torch.float32:
            settings["disable_tf32"] = True
        elif "enable_autocast" in params:
            settings.update(
                use_explicit_typing=True,
                enable_autocast=True,
                autocast_low_precision_type=self.dtype,
            )
        else:
            settings.update(
                enabled_precisions={torch.float32, self.dtype}, use_explicit_typing=False
            )
        if "arg_inputs" in params:
            settings.pop("inputs")
        log.info(
            "tensorrt: building engine (%s, B=%d N=%d)",
            dtype_name(self.dtype),
            self.spec.batch,
            self.spec.samples,
        )
        return compile_fn(ep, **_accepted(compile_fn, settings))

    def _weights_changed(self) -> None:
        from torch_tensorrt.dynamo import refit_module_weights

        ep = export_decision(self.decision, self.spec, device=self.device)
        try:
            self._trt = refit_module_weights(
                self._trt,
                ep,
                **_accepted(
                    refit_module_weights, {"arg_inputs": self._inputs, "inputs": self._inputs}
                ),
            )
            self.info["last_swap"] = "refit"
        except Exception as e:  # noqa: BLE001 - any refit failure falls back to a rebuild
            log.warning("tensorrt: refit failed (%s); rebuilding the engine", e)
            self._trt = self._compile()
            self.info["last_swap"] = "rebuild"

    @torch.no_grad()
    def _run(self, obs: Tensor, noise: DecisionNoise | None) -> DecisionOutput:
        noise = self._draw_noise() if noise is None else noise
        args = [obs.to(self.device, non_blocking=True)] + [
            t.to(self.device, torch.float32) for t in noise
        ]
        out = self._trt(*args)
        return to_output(DecisionOutput(*out))
