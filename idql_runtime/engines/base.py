"""The engine interface every decision backend implements, and what they share.

An engine owns private copies of the three networks a decision needs (the EMA score
network, target Q and V), built from an ``Agent`` for one static shape (B, N, T) and one
mode. ``decide`` draws its own noise from a private generator; ``decide_with_noise``
takes the noise as tensors so that every engine can be checked against the float64
reference (``reference_decide``) on the same random numbers. ``load_weights`` swaps the
weights in place (``param.copy_``), so compiled code and captured CUDA graphs stay valid.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from idql_runtime.decision import (
    Decision,
    DecisionNoise,
    DecisionOutput,
    DecisionSpec,
    reference_decide,
)
from idql_runtime.diffusion import Schedule

log = logging.getLogger("idql_runtime.engines")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# The groups of ``Agent.inference_state`` an engine consumes, and the Decision attribute
# each maps onto. ``gaussian.*`` (baseline policies) is accepted and ignored.
WEIGHT_GROUPS: dict[str, str] = {"score_ema": "score", "q_target": "q", "v": "v"}


class EngineUnavailable(RuntimeError):
    """An engine cannot be built here (no GPU, TensorRT missing, ...); the message says why."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def private_decision(agent: Any, mode: str | None, device: torch.device) -> Decision:
    """A Decision over deep copies of the agent's EMA score network, target Q and V."""
    decision = copy.deepcopy(agent.decision(mode))
    decision.requires_grad_(False)
    return decision.to(device).eval()


def capture_cuda_graph(
    body: Any,
    device: torch.device,
    *,
    warmup: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """One CUDA graph of ``body()`` on ``device`` and what its capture returned.

    ``warmup`` calls first run on a side stream (compilation, autotuning, cuBLAS handles,
    Triton's cache) so none of that is captured; ``generator`` is registered with the
    graph, so its random draws advance on every replay.
    """
    with torch.cuda.device(device):  # Triton launches on the current device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = body()
        torch.cuda.synchronize(device)
    return graph, out


class TimeShareCache:
    """Serve ``Decision.time_shares`` from a (T, H) float32 buffer computed once per weight
    load, so a captured or compiled decision runs no time-embedding kernels.

    ``refresh()`` recomputes the buffer in place after the weights changed (graphs that
    read it stay valid). The decision's output is unchanged up to float32 rounding.
    """

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        p = next(decision.score.parameters())
        with torch.no_grad():
            self.buffer = Decision.time_shares(decision, torch.float32, p.device).clone()
        decision.time_shares = self._lookup  # type: ignore[method-assign]

    def _lookup(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.buffer

    def refresh(self) -> None:
        with torch.no_grad():
            self.buffer.copy_(
                Decision.time_shares(self.decision, torch.float32, self.buffer.device)
            )


def decision_state(decision: Decision) -> dict[str, Tensor]:
    """The decision's tensors under ``Agent.inference_state`` names."""
    out: dict[str, Tensor] = {}
    for group, attr in WEIGHT_GROUPS.items():
        for k, v in getattr(decision, attr).state_dict().items():
            out[f"{group}.{k}"] = v
    return out


@torch.no_grad()
def copy_weights_into(
    decision: Decision, tensors: dict[str, Tensor], *, partial: bool = False
) -> None:
    """Copy ``inference_state``-named tensors into the decision's parameters in place.

    Every score_ema/q_target/v tensor of the decision must be present; with ``partial``
    whole groups may be absent (a learner that finetunes only Q and V broadcasts just
    those), but a group that is present must be complete. Unknown names, wrong shapes
    and non-finite values raise ValueError naming the tensor. Nothing is written unless
    everything checks out.
    """
    own = decision_state(decision)
    given = {k: v for k, v in tensors.items() if not k.startswith("gaussian.")}
    unexpected = sorted(set(given) - set(own))
    if unexpected:
        raise ValueError(f"unexpected tensor(s) for a decision engine: {unexpected[:5]}")
    if partial:
        present = {k.split(".", 1)[0] for k in given}
        own = {k: v for k, v in own.items() if k.split(".", 1)[0] in present}
    missing = sorted(set(own) - set(given))
    if missing:
        raise ValueError(f"weights are missing tensor(s): {missing[:5]}")
    for k, v in given.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"tensor {k} has non-finite values")
    for k, v in given.items():
        own[k].copy_(v.to(own[k].device, own[k].dtype))


def weights_digest(decision: Decision) -> str:
    """sha256 over the decision's tensors (names, shapes, float32 bytes), e.g. for caches."""
    h = hashlib.sha256()
    for k, v in sorted(decision_state(decision).items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def spec_of(agent: Any, batch: int, samples: int, mode: str | None) -> DecisionSpec:
    if batch <= 0 or samples <= 0:
        raise ValueError(
            f"batch and samples must be positive, got batch={batch}, samples={samples}"
        )
    return DecisionSpec(
        batch=batch,
        samples=samples,
        steps=agent.schedule.steps,
        act_dim=agent.act_dim,
        obs_dim=agent.obs_dim,
        mode=mode or agent.cfg.policy.mode,
    )


class Engine(abc.ABC):
    """A built decision for static (B, N, T), mode and dtype.

    Outputs of ``decide_full`` and ``decide_with_noise`` are fresh CPU tensors: action,
    chosen_q, value, adv_spread float32, index int64 (B,); they never alias buffers an
    engine reuses.
    """

    name: str = "base"

    def __init__(
        self,
        agent: Any,
        spec: DecisionSpec,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.schedule: Schedule = agent.schedule
        self.decision = private_decision(agent, spec.mode, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.info: dict[str, Any] = {}
        # (fn, obs shape): a numpy-in, numpy-out ``decide`` without torch ops on the host
        # (the CUDA-graph engines: ``pinned_decide``); None: through ``decide_full``
        self._fast_decide: tuple[Callable[[np.ndarray], np.ndarray], tuple[int, int]] | None
        self._fast_decide = None

    # ------------------------------------------------------------------ public API
    def decide(self, obs: np.ndarray | Tensor) -> np.ndarray:
        """obs (B, obs_dim) float32 -> actions (B, act_dim) float32 numpy (own noise)."""
        fast = self._fast_decide
        if fast is not None and isinstance(obs, np.ndarray) and obs.shape == fast[1]:
            return fast[0](obs)
        return self.decide_full(obs).action.numpy()

    def decide_full(self, obs: np.ndarray | Tensor) -> DecisionOutput:
        """Like ``decide`` with the diagnostics: chosen Q, V, advantage spread, index."""
        return self._run(self._check_obs(obs), None)

    def decide_with_noise(self, obs: np.ndarray | Tensor, noise: DecisionNoise) -> DecisionOutput:
        """The decision on given noise (shapes of ``DecisionNoise.draw(spec)``), for parity."""
        s = self.spec
        want = {
            "x_init": (s.batch, s.samples, s.act_dim),
            "step_noise": (s.steps, s.batch, s.samples, s.act_dim),
            "u": (s.batch,),
        }
        for name, shape in want.items():
            got = tuple(getattr(noise, name).shape)
            if got != shape:
                raise ValueError(f"noise.{name} has shape {got}, this engine needs {shape}")
        return self._run(self._check_obs(obs), noise)

    def load_weights(self, tensors: dict[str, Tensor], *, partial: bool = False) -> None:
        """Swap in new ``Agent.inference_state`` tensors between decisions (``partial``:
        only the complete groups given, e.g. target Q and V)."""
        copy_weights_into(self.decision, tensors, partial=partial)
        self._weights_changed()

    def reference_decision(self) -> Decision:
        """A float64 CPU copy of this engine's decision without the engine's speed-ups (its
        time-share cache on the engine's device, its reduced-precision score network):
        the reference to measure the engine against."""
        d64 = copy.deepcopy(self.decision)
        d64.__dict__.pop("time_shares", None)  # TimeShareCache's float32 buffer, on its device
        d64.trunk_dtype = None
        return d64.to("cpu", torch.float64)

    def reference(self, obs: Tensor, noise: DecisionNoise) -> DecisionOutput:
        """The float64 naive reference on a float64 CPU copy of this engine's weights."""
        d64 = self.reference_decision()
        return reference_decide(
            d64,
            torch.as_tensor(obs).to(torch.float64),
            DecisionNoise(*(t.to("cpu", torch.float64) for t in noise)),
            self.schedule,
        )

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary: name, shape, dtype, device and engine-specific notes."""
        s = self.spec
        return {
            "engine": self.name,
            "batch": s.batch,
            "samples": s.samples,
            "steps": s.steps,
            "mode": s.mode,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            **self.info,
        }

    # ------------------------------------------------------------------ for subclasses
    @abc.abstractmethod
    def _run(self, obs: Tensor, noise: DecisionNoise | None) -> DecisionOutput:
        """obs: (B, obs_dim) float32 CPU tensor; noise None = draw from ``self.generator``."""

    def _weights_changed(self) -> None:  # noqa: B027  (an optional hook, empty by default)
        """Called after ``load_weights`` copied new values into ``self.decision``."""

    def _draw_noise(self) -> DecisionNoise:
        return DecisionNoise.draw(self.spec, generator=self.generator, device=self.device)

    def _check_obs(self, obs: np.ndarray | Tensor) -> Tensor:
        t = torch.as_tensor(obs)
        if t.device.type != "cpu":
            t = t.cpu()
        want = (self.spec.batch, self.spec.obs_dim)
        if tuple(t.shape) != want:
            raise ValueError(f"obs has shape {tuple(t.shape)}, this engine was built for {want}")
        return t.to(torch.float32)


def pinned_decide(
    obs_host: Tensor,
    obs_dev: Tensor,
    replay: Callable[[], None],
    out_dev: Tensor,
    out_host: Tensor,
    cols: int,
    act_dim: int,
    device: torch.device,
    check: Callable[[np.ndarray], None] | None = None,
    *,
    copies_in_graph: bool = False,
) -> Callable[[np.ndarray], np.ndarray]:
    """A graph engine's ``decide`` on numpy, with no torch op on the host but the two
    copies: obs into the pinned ``obs_host`` through its numpy view, one host -> device
    copy, ``replay()``, one device -> host copy of the packed rows ``out_dev`` (B rows of
    ``cols`` values, the ``act_dim`` action columns first; a flat buffer may hold more
    after the B * cols) into the pinned ``out_host``, a sync, and a fresh copy of the
    action columns. ``check`` sees the host rows first (e.g. an error flag).
    ``decide_full`` keeps the torch path. ``copies_in_graph``: the graph itself copies
    ``obs_host`` in and ``out_host`` out, so only the replay and the sync remain."""
    obs_np = obs_host.numpy()
    out_np = out_host.numpy()
    rows = obs_np.shape[0]
    flat = out_np.reshape(-1)

    def decide(obs: np.ndarray) -> np.ndarray:
        np.copyto(obs_np, obs, casting="same_kind")
        if not copies_in_graph:
            obs_dev.copy_(obs_host, non_blocking=True)
        replay()
        if not copies_in_graph:
            out_host.copy_(out_dev, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        if check is not None:
            check(out_np)
        return flat[: rows * cols].reshape(rows, cols)[:, :act_dim].copy()

    return decide


def to_output(out: DecisionOutput) -> DecisionOutput:
    """Fresh CPU copies (float32 values, int64 index) of an engine's raw output."""
    f = torch.float32
    return DecisionOutput(
        out.action.to("cpu", f, copy=True),
        out.chosen_q.to("cpu", f, copy=True),
        out.value.to("cpu", f, copy=True),
        out.adv_spread.to("cpu", f, copy=True),
        out.index.to("cpu", torch.int64, copy=True),
    )
