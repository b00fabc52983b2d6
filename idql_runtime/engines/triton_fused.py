"""The "triton" engine: the decision in Triton kernels, one CUDA graph per decision.

Why: on an H100/H200 the stock GPU engines are bound by kernel launches, not math
(cuda_graph ~560-710 us, compiled + graph ~360 us at N = 128, B = 1, with ~60-160 small
kernels per decision). Candidate rows are independent through all T reverse steps and
through the critic; only the selection mixes rows. Three layouts
(``engines/triton_kernels.py``):

"split" (default): ``block_kernel`` once per (reverse step, LN-ResNet block), on a grid
of (row tiles of BLOCK_M candidates) x (K = wide width / split_width slices): program
(i, f) computes its slice's share of fc2(act(fc1(LN(h)))) and writes it as part f of the
block's output; the next launch sums the K parts in a fixed order (deterministic). So one
block's weights are spread over K programs (SMs) instead of each row tile streaming all
of them. The first block of a step also computes the input projection, and advances x by
the previous step's update. ``finish_kernel``: one program per (row tile, slice of the
critic's second layer): the last update, the clip, and that slice's part of every Q
head. ``value_kernel``: V(obs) in slices, on a second stream, so that in the graph it is
a branch beside the reverse steps. ``select_kernel``: Q = min over heads of the summed
parts, then the pick. H200, N = 128, B = 1, bf16: 15 block launches of ~9.3 us, the
finish ~20 us, the selection ~2 us: a 169-179 us replay, 192-202 us per ``decide``.

"persist": the split layout's launches as phases of ONE launch (``persist_kernel``):
every program of the (row tiles) x (K slices) grid runs its share of each block, then
waits at a grid barrier (an arrival counter: one release add per program, acquire polls)
before the next; then the finish items and, after another barrier, the selection (which
computes V there). Needs the whole grid resident at once (grid <= SMs: B*N = 128 at
split_width 64, 256 at 128) and reduced precision (float32 spills). Under the
interpreter each phase is its own launch (programs run one after another there, a
barrier would never open). Measured on an H200: correct, but slower than split (280 vs
179 us replay): the launches it saves cost less than its barriers and its one big
kernel's registers. Opt-in only.

"fused": ``decide_kernel``, one program per BLOCK_M rows runs everything above (the
wide layer kept in registers chunk by chunk), then ``select_kernel`` with V. Fewer
launches, but B*N/16 programs each stream every weight: slower at B = 1 on an H200
(659 us, docs/engines.md).

Weights are packed once (and on ``load_weights``, in place) into padded contiguous
buffers; float32 runs ``tl.dot`` in IEEE float32 (``input_precision="tf32"`` is an
option); bfloat16/float16 store the score network's big products' weights (block
fc1/fc2) in that dtype and accumulate in float32; the residual stream, LayerNorm, the
small layers, the reverse update and the whole critic (Q and V) stay float32: rounding
the critic to bf16 scrambled the pick on trained weights (regret p99 0.17 of the Q spread
in the interpreter, docs/engines.md). On CUDA the noise draws and the launches are
captured in a CUDA graph, so a decision is one replay.

On the CPU the engine exists only for tests: with TRITON_INTERPRET=1 the same kernels run
in Triton's interpreter (numpy). Its speed there means nothing. GPU parity and speed were
measured on an H200 (docs/engines.md, "The triton engine").
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from idql_runtime.decision import Decision, DecisionNoise, DecisionOutput, DecisionSpec
from idql_runtime.engines.base import (
    Engine,
    EngineUnavailable,
    capture_cuda_graph,
    dtype_name,
    pinned_decide,
)

log = logging.getLogger("idql_runtime.engines")
_WARMUP_CALLS = 2
LAYOUTS = ("split", "fused", "persist")
_PERSIST_MAX_SPIN = 1 << 18  # polls per grid barrier before it gives up (~0.1-0.3 s)
_KERNELS: dict[bool, ModuleType] = {}
# Every launch asks for FP fusion (a*b+c as one FMA) by name: it is what the kernels were
# measured and precision-checked with, and Triton 3.10 turns its default off
# (TRITON_DEFAULT_FP_FUSION).
_LAUNCH_OPTIONS = {"enable_fp_fusion": True}
_ACT_TYPES = {nn.SiLU: "swish", nn.Mish: "mish", nn.ReLU: "relu"}


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_status(device: str | torch.device) -> str | None:
    """None when the triton engine can run on ``device`` here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return (
            f"triton is not importable ({e}); CUDA torch wheels ship it, on a CPU-only "
            "install `pip install --no-deps triton` (scripts/install.sh dev does)"
        )
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
        if _triton_imported_interpreted():
            return (
                "triton was imported with TRITON_INTERPRET=1 in this process, so its "
                "kernels cannot compile for the GPU here; unset it and restart"
            )
        return None
    if dev.type == "cpu":
        if not interpret_requested():
            return (
                "on the CPU it runs only under Triton's interpreter, for tests: set "
                "TRITON_INTERPRET=1 (slow), or build it with device='cuda'"
            )
        return None
    return f"it runs on CUDA (or on the CPU under TRITON_INTERPRET=1), not on {dev}"


def _triton_imported_interpreted() -> bool:
    """Whether ``import triton`` ran under TRITON_INTERPRET=1: then Triton's own library
    functions (tl.sum, tl.sigmoid, ...) are interpreter objects and nothing compiles."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.standard.sum, JITFunction)


@contextmanager
def interpretable_triton_library() -> Iterator[None]:
    """Let interpreted kernels call Triton's library in a process that imported triton
    for compilation.

    ``import triton`` decorates its own library (tl.sum, tl.zeros, tl.sigmoid, tl.argmax,
    ...) once, compiled or interpreted after TRITON_INTERPRET at that moment, and the
    interpreter cannot call the compiled kind. While this is active those attributes of
    ``triton.language.*`` are interpreter wrappers of the same functions; on exit the
    originals are back. Process-wide while active: for the CPU interpreter (tests) only.
    """
    import sys

    import triton.runtime.interpreter as interp
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # The interpreter patches triton.language while it runs; a kernel's own patches are
    # undone when it returns, but those of the jit functions it calls are not (harmless
    # in a process that only interprets, fatal for later GPU compilation in this one).
    # Record the first original of everything patched and put it back on exit.
    patch_lang = getattr(interp, "_patch_lang", None)
    missing = getattr(interp, "_MISSING", object())
    originals: dict[tuple[int, str], tuple[Any, str, Any]] = {}

    def recording_patch_lang(fn: Any) -> Any:
        assert patch_lang is not None
        scope = patch_lang(fn)
        for obj, attr, original in getattr(scope, "_changes", ()):
            originals.setdefault((id(obj), attr), (obj, attr, original))
        return scope

    swapped: list[tuple[ModuleType, str, Any]] = []
    try:
        if patch_lang is not None:
            interp._patch_lang = recording_patch_lang
        for name, mod in list(sys.modules.items()):
            if mod is None or not name.startswith("triton.language"):
                continue
            for attr, val in list(vars(mod).items()):
                if isinstance(val, JITFunction):
                    swapped.append((mod, attr, val))
                    if id(val) not in _INTERPRETED:  # by id: hashing a JITFunction parses it
                        _INTERPRETED[id(val)] = (val, InterpretedFunction(val.fn))
                    setattr(mod, attr, _INTERPRETED[id(val)][1])
        yield
    finally:
        if patch_lang is not None:
            interp._patch_lang = patch_lang
        for obj, attr, original in originals.values():
            if original is missing:
                if attr in vars(obj):
                    delattr(obj, attr)
            else:
                setattr(obj, attr, original)
        for mod, attr, val in reversed(swapped):
            setattr(mod, attr, val)


_INTERPRETED: dict[int, tuple[Any, Any]] = {}  # id -> (JITFunction kept alive, wrapper)


def load_kernels(interpret: bool) -> ModuleType:
    """The kernel module, compiled by ``triton.jit`` or run by Triton's interpreter.

    The interpreted copy is the same file loaded a second time with ``INTERPRET`` set, so
    the choice is per engine and TRITON_INTERPRET is never changed for the process.
    """
    if interpret not in _KERNELS:
        if not interpret:
            from idql_runtime.engines import triton_kernels

            _KERNELS[False] = triton_kernels
        else:
            path = Path(__file__).with_name("triton_kernels.py")
            spec = importlib.util.spec_from_file_location(
                "idql_runtime.engines._triton_kernels_interpreted", path
            )
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            mod.INTERPRET = True  # type: ignore[attr-defined]
            spec.loader.exec_module(mod)
            _KERNELS[True] = mod
    return _KERNELS[interpret]


def _max_or_none(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def _ptxas_report(ptx: str, arch: int) -> dict[str, int | None]:
    """Registers per thread and spilled bytes per thread (stores + loads) by ``ptxas -v``
    (Triton's bundled one) on ``ptx``; None where ptxas is not found."""
    try:  # the ptxas Triton itself compiles with, for this architecture
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = Path(get_ptxas(arch).path)
    except Exception:  # noqa: BLE001 - an older/newer Triton layout: report nothing
        return {"registers": None, "spill_bytes": None}
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(src) + ".o"],
            capture_output=True,
            text=True,
            check=True,
        )
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
    }


def _p2(n: int, lo: int = 16) -> int:
    """The padded size of a dimension: a power of two, at least ``lo`` (tl.dot needs 16)."""
    p = 1
    while p < n:
        p *= 2
    return max(lo, p)


def _pow2_option(name: str, value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


class TritonEngine(Engine):
    """The decision in Triton kernels (one CUDA graph around them on a GPU).

    Options: ``layout`` "split" (default: one launch per reverse step and block, the wide
    layer split across programs of ``split_width`` columns, then one for the last update
    and the critic, one for the selection), "persist" (the same work in one launch with
    grid barriers; bf16/fp16, grid <= SMs; measured slower than split) or "fused" (one
    program per row tile runs the whole decision, then the selection); ``block_m``
    candidate rows per program (16: larger tiles spill registers at v2 sizes);
    ``split_width`` (128 for bf16, else 64); ``hidden_chunk`` columns of the wide layer
    per inner step (64 for bf16/fp16, 32 for float32);
    ``num_warps`` (8: at v2 sizes and block_m 16, ptxas 12.8 for sm_90 reports no spills
    with 8 and spills with 4, see ``compile_for``); ``num_stages`` (Triton's default);
    ``input_precision`` of the float32 products ("ieee" default, or "tf32");
    ``critic_split`` (split and persist layouts: critic work items per row tile, each a
    slice of the critic's second layer for every Q head; also the slices of V; 4) and
    ``critic_precision`` of the critic's float32 products (default: ``input_precision``;
    "tf32x3": three TF32 tensor-core products, near float32); ``pdl`` (split layout, CUDA
    sm_90+: launch the block and finish kernels with programmatic dependent launch, so
    that each one's programs start, and issue their weight loads, while the launch before
    it still computes; off by default until measured on a GPU); ``prefetch`` (split
    layout on a GPU, when a block program's weights take more than one chunk, i.e.
    ``split_width`` > ``hidden_chunk``: every line of its fc1/fc2 weights is prefetched
    into L1 at the start, before the parts sum and, with ``pdl``, before the wait, so
    the chunk loop does not wait on L2 chunk by chunk; off until measured);
    ``parts_dtype`` (split and persist: "float32", or "float16" for half the parts
    traffic, h rounded to float16 between blocks; checked in the interpreter, not yet
    measured on a GPU); ``graph_copies`` (CUDA:
    the observation's host -> device copy and the packed rows' device -> host copy are
    captured in the graph, so a decision is one replay and a sync; if the capture refuses
    them, the engine captures without them and says why in ``info``; off by default
    until measured on a GPU).
    """

    name = "triton"

    def __init__(
        self,
        agent: Any,
        spec: DecisionSpec,
        *,
        layout: str = "split",
        block_m: int | None = None,
        split_width: int | None = None,
        hidden_chunk: int | None = None,
        num_warps: int | None = None,
        num_stages: int | None = None,
        input_precision: str = "ieee",
        critic_split: int = 4,
        critic_precision: str | None = None,
        pdl: bool | int = False,
        prefetch: bool | int = False,
        graph_copies: bool | int = False,
        parts_dtype: str = "float32",
        **kw: Any,
    ) -> None:
        device = torch.device(kw.get("device", "cpu"))
        why = triton_status(device)
        if why is not None:
            raise EngineUnavailable(f"the triton engine cannot run here: {why}")
        if device.type == "cuda" and device.index is None:
            kw["device"] = torch.device("cuda", torch.cuda.current_device())
        super().__init__(agent, spec, **kw)
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"the triton engine runs float32, bfloat16 or float16, not {self.dtype}"
            )
        if input_precision not in ("ieee", "tf32"):
            raise ValueError(f"input_precision must be 'ieee' or 'tf32', got {input_precision!r}")
        critic_precision = critic_precision or input_precision
        if critic_precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(
                f"critic_precision must be 'ieee', 'tf32' or 'tf32x3', got {critic_precision!r}"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.interpret = self.device.type == "cpu"
        self._k = load_kernels(self.interpret)
        self._lowp = self.dtype != torch.float32
        if layout == "persist" and not self._lowp:
            raise ValueError(
                "layout='persist' runs bfloat16 or float16 block weights, not float32: in "
                "float32 its one kernel spills ~25 kB per thread on sm_90 (ptxas); use "
                "layout='split' for float32"
            )
        rows = spec.batch * spec.samples
        if block_m is None:
            block_m = 16  # larger tiles spill at v2 sizes (32: 1.3 kB bf16, 42 kB float32)
        self._block_m = _pow2_option("block_m", block_m)
        if split_width is None:
            # bf16: 128 measured 5% faster than 64 on an H200 in two runs (N = 128, B = 1:
            # replay 169 vs 179 us; ptxas: no spills), precision check passed (same pick
            # 0.97, regret p99 0.004); float32 and float16 were measured at 64 only
            split_width = 128 if self.dtype == torch.bfloat16 else 64
        self._split = _pow2_option("split_width", split_width)
        chunk = hidden_chunk if hidden_chunk is not None else (64 if self._lowp else 32)
        self._chunk = _pow2_option("hidden_chunk", chunk)
        if num_warps is None:
            num_warps = 8  # ptxas (sm_90): no spills at v2 sizes; 4 spills (compile_for)
        self._opts: dict[str, int] = {"num_warps": num_warps}
        if num_stages is not None:
            self._opts["num_stages"] = num_stages
        self._prec = input_precision
        self._qprec = critic_precision
        if critic_split < 1 or critic_split & (critic_split - 1):
            raise ValueError(f"critic_split must be a power of two >= 1, got {critic_split}")
        self._critic_split = critic_split
        for option, value in (("pdl", pdl), ("prefetch", prefetch), ("graph_copies", graph_copies)):
            if value not in (True, False):  # 0 and 1 too (bench option strings)
                raise ValueError(f"{option} must be true or false, got {value!r}")
        self._pdl = bool(pdl)
        self._prefetch = bool(prefetch)
        parts = {"float32": torch.float32, "float16": torch.float16}
        if parts_dtype not in parts:
            raise ValueError(f"parts_dtype must be 'float32' or 'float16', got {parts_dtype!r}")
        self._parts_dtype = parts[parts_dtype]
        self._graph_copies = bool(graph_copies)
        self._layout_req = layout
        self._consts = self._structure()
        self.layout = layout if self._consts["NB"] > 0 else "fused"  # split needs a block
        self._bufs: dict[str, Tensor] = {}
        self._pack()
        s, dev, c = self.spec, self.device, self._consts
        if self._pdl:
            self._check_pdl()
        if self.layout == "persist" and self.device.type == "cuda":
            tiles = -(-rows // self._block_m)
            grid = tiles * c["K"]
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            if grid > sms:
                raise ValueError(
                    f"layout='persist' needs every program resident at once: its grid of "
                    f"{tiles} row tiles x {c['K']} slices = {grid} programs "
                    f"exceeds this GPU's {sms} SMs (B * N = {rows}); use layout='split' or "
                    "a larger split_width"
                )
        self._sync = torch.zeros(1, dtype=torch.int32, device=dev)
        self._persist_failed = ""  # why, once a grid barrier timed out
        if self.layout in ("split", "persist"):
            # A block's output in K parts (ping-pong: block l writes [l % 2] and reads the
            # previous block's [(l - 1) % 2]), and x before every step s >= 1.
            # float16 parts (``parts_dtype``): half the L2 traffic of the parts sums, h
            # rounded to 11 significant bits at every block boundary
            self._h = torch.zeros(2, c["K"], rows, c["HP"], device=dev, dtype=self._parts_dtype)
            self._xs = torch.zeros(max(1, c["S"]), rows, s.act_dim, device=dev)
        self._x = torch.zeros(rows, s.act_dim, device=dev)
        # Q (fused: the min over heads) or, split and persist, each head's QS parts; V's parts
        self._q = torch.zeros(c["E"] * c["QS"] if c["ITEMS"] else 1, rows, device=dev)
        self._vp = torch.zeros(c["VS"], s.batch, device=dev)
        self._cols = s.act_dim + 4  # action | chosen_q | value | adv_spread | index
        # The packed rows and, after them, the persistent layout's barrier-timeout flag (an
        # int32 in the last float32 slot): one device -> host copy per decision for both.
        self._out_buf = torch.zeros(s.batch * self._cols + 1, device=dev)
        self._out = self._out_buf[:-1].view(s.batch, self._cols)
        self._err = self._out_buf[-1:].view(torch.int32)
        self._drawn: DecisionNoise | None = None
        self.info.update(
            layout=self.layout,
            kernels={"split": 3 + c["S"] * c["NB"], "fused": 2, "persist": 1}[self.layout],
            block_m=self._block_m,
            split_width=self._consts["FS"] if self.layout != "fused" else None,
            hidden_chunk=self._consts["FC"],
            num_warps=num_warps,
            num_stages=num_stages,
            critic_split=c["QS"] if c["ITEMS"] else None,
            critic_precision=self._qprec,
            pdl=self._pdl,
            prefetch=self._prefetch,
            parts_dtype=parts_dtype if self.layout != "fused" else None,
            precision=(
                f"{dtype_name(self.dtype)} score-network block products, float32 accumulate;"
                " critic float32"
                if self._lowp
                else f"float32 ({self._prec})"
            ),
            interpret=self.interpret,
        )
        self._side: torch.cuda.Stream | None = None  # value_kernel's stream (split, CUDA)
        self._copies_in_graph = False  # the interpreter has no graph
        if self.device.type == "cuda":
            if self.layout == "split":
                self._side = torch.cuda.Stream(dev)
            self._obs = torch.zeros(s.batch, s.obs_dim, device=dev)
            self._obs_host = torch.zeros(s.batch, s.obs_dim).pin_memory()
            self._out_host_buf = torch.zeros(s.batch * self._cols + 1).pin_memory()
            self._out_host = self._out_host_buf[:-1].view(s.batch, self._cols)
            self._noise_in = DecisionNoise.draw(spec, device=dev)
            self._copies_in_graph = self._graph_copies
            try:
                self._graph_rng = self._capture(self._body_rng, register_rng=True)
            except Exception as e:  # noqa: BLE001 - a refused capture falls back, says why
                if not self._copies_in_graph:
                    raise
                self._copies_in_graph = False
                torch.cuda.synchronize(dev)
                self.info["graph_copies_refused"] = f"{type(e).__name__}: {str(e)[:300]}"
                log.warning(
                    "triton engine: graph_copies refused by the capture (%s): the "
                    "copies stay outside the graph",
                    self.info["graph_copies_refused"],
                )
                self._graph_rng = self._capture(self._body_rng, register_rng=True)
            self.info["graph_copies"] = self._copies_in_graph
            self._graph_given: torch.cuda.CUDAGraph | None = None
            fast = pinned_decide(
                self._obs_host, self._obs, self._replay_rng, self._out_buf,
                self._out_host_buf, self._cols, s.act_dim, dev, self._check_persist,
                copies_in_graph=self._copies_in_graph,
            )  # fmt: skip
            self._fast_decide = (fast, (s.batch, s.obs_dim))
            self.info.update(
                rng="torch philox inside the graph (private generator)",
                card=torch.cuda.get_device_name(dev),
            )
        else:
            self.info.update(rng="private generator", note="Triton interpreter: tests only")

    def _check_pdl(self) -> None:
        """Why ``pdl=True`` cannot be built here, as an error that names it."""
        if self.layout != "split":
            raise ValueError(
                f"pdl=True applies to layout='split' (a chain of launches to overlap), not "
                f"{self.layout!r}"
            )
        try:
            from triton.language.extra import cuda as tl_cuda

            has_gdc = hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")
        except Exception:  # noqa: BLE001 - any import failure means no PDL
            has_gdc = False
        if not has_gdc:
            import triton

            raise EngineUnavailable(
                "pdl=True needs Triton's tl.extra.cuda.gdc_wait (Triton >= 3.4); this is "
                f"Triton {triton.__version__}"
            )
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            if major < 9:
                raise ValueError(
                    "pdl=True needs compute capability 9.0 or newer (programmatic dependent "
                    f"launch); {torch.cuda.get_device_name(self.device)} is {major}.{minor}"
                )

    # ------------------------------------------------------------------ structure
    def _structure(self) -> dict[str, Any]:
        """Check that the networks are what the kernels compute; the static kernel dims."""
        d: Decision = self.decision
        score: Any = d.score
        q: Any = d.q
        v: Any = d.v
        s = self.spec

        def unsupported(option: str, what: str) -> EngineUnavailable:
            return EngineUnavailable(f"the triton engine does not support {option} ({what})")

        acts = {type(b.act) for b in score.blocks} | {type(score.act)}
        if len(acts) != 1 or next(iter(acts)) not in _ACT_TYPES:
            names = sorted(a.__name__ for a in acts)
            raise unsupported("network.activation", f"activations {names}")
        act = _ACT_TYPES[next(iter(acts))]
        norms = {type(b.norm) for b in score.blocks}
        if not norms <= {nn.LayerNorm, nn.Identity} or len(norms) > 1:
            raise unsupported(
                "network.layer_norm", f"block norms {sorted(n.__name__ for n in norms)}"
            )
        use_ln = nn.LayerNorm in norms
        if use_ln:
            eps = {float(b.norm.eps) for b in score.blocks}
            if len(eps) != 1:
                raise unsupported("network.ln_eps", "different epsilons per block")
            if any(b.norm.weight is None for b in score.blocks):
                raise unsupported("network.layer_norm", "LayerNorm without affine weights")
        ln_eps = float(score.blocks[0].norm.eps) if use_ln and len(score.blocks) else 1e-6
        if len(q.layers) not in (2, 3):
            raise unsupported("critic.hidden", f"{len(q.layers) - 1} hidden layers; 1 or 2 run")
        lins = [m for m in v.mlp if isinstance(m, nn.Linear)]
        others = [m for m in v.mlp if not isinstance(m, (nn.Linear, nn.ReLU))]
        if len(lins) not in (2, 3) or others:
            raise unsupported("critic.hidden", f"a V network of {len(lins)} linear layers")
        v_ln = isinstance(v.norm, nn.LayerNorm)
        if not v_ln and not isinstance(v.norm, nn.Identity):
            raise unsupported("critic.value_layer_norm", type(v.norm).__name__)
        if d.value_loss not in self._k.VALUE_LOSSES:
            raise unsupported("critic.value_loss", d.value_loss)
        hidden = score.inp.out_features
        wide = score.blocks[0].fc1.out_features if len(score.blocks) else 16
        q0 = q.layers[0].weight.shape[-1]
        q1 = q.layers[1].weight.shape[-1] if len(q.layers) == 3 else 16
        v0 = lins[0].out_features
        v1 = lins[1].out_features if len(lins) == 3 else 16
        op = _p2(s.obs_dim)
        c: dict[str, Any] = {
            "OBS": s.obs_dim,
            "A": s.act_dim,
            "H": hidden,
            "OP": op,
            "OC": min(op, 64),
            "AP": _p2(s.act_dim),
            "HP": _p2(hidden),
            "FP": _p2(wide),
            "NB": len(score.blocks),
            "T": s.steps,
            "S": s.steps + d.extra_final_steps,
            "LN": use_ln,
            "ACT": self._k.ACTIVATIONS[act],
            "CLIP": bool(d.clip),
            "E": q.num_qs,
            "QP0": _p2(q0),
            "QP1": _p2(q1),
            "QDEPTH": len(q.layers) - 1,
            "VP0": _p2(v0),
            "VP1": _p2(v1),
            "VDEPTH": len(lins) - 1,
            "VLN": v_ln,
            "NP": _p2(s.samples),
            "MODE": 0 if s.mode == "argmax" else 1,
            "VL": self._k.VALUE_LOSSES[d.value_loss],
            "ln_eps": ln_eps,
            "v_eps": float(v.norm.eps) if v_ln else 1e-6,
        }
        c["FS"] = min(self._split, c["FP"])
        c["K"] = c["FP"] // c["FS"]  # parts per block output (split and persist layouts)
        c["FC"] = min(self._chunk, c["FP"], c["FS"] if self._layout_req != "fused" else c["FP"])
        c["QPL"] = c["QP1"] if c["QDEPTH"] == 2 else c["QP0"]
        c["QC"] = min(64, c["QP1"])
        c["VPL"] = c["VP1"] if c["VDEPTH"] == 2 else c["VP0"]
        c["VC"] = min(64, c["VP1"])
        # The split and persist layouts' critic work items (finish_kernel): per row tile and
        # Q head QS slices of the second layer; V in VS slices (split: value_kernel; persist:
        # summed in the selection; fused: whole, VS = 1, in the selection).
        c["ITEMS"] = self._layout_req != "fused" and c["NB"] > 0
        c["QS"], c["VS"] = 1, 1
        if c["ITEMS"]:
            # at most width / 16 slices (tl.dot's minimum): small critics get fewer
            qs = min(self._critic_split, c["QP1"] // 16) if c["QDEPTH"] == 2 else 1
            vs = min(self._critic_split, c["VP1"] // 16) if c["VDEPTH"] == 2 else 1
            c["QS"], c["VS"] = qs, vs
            # two or more chunks per slice: with one, ptxas (sm_90) held the kernel to 32
            # registers and spilled kBs (a one-trip loop becomes straight-line code)
            c["QC"] = min(64, max(16, c["QP1"] // qs // 2))
            c["VC"] = min(64, max(16, c["VP1"] // vs // 2))
        return c

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def _pack(self) -> None:
        """Padded, contiguous kernel buffers from ``self.decision``; refreshed in place."""
        d: Decision = self.decision
        score: Any = d.score
        q: Any = d.q
        v: Any = d.v
        c, dev, f32 = self._consts, self.device, torch.float32
        low = self.dtype
        nb = max(1, c["NB"])
        new: dict[str, Tensor] = {}

        def pad(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype = f32) -> None:
            out = torch.zeros(shape, dtype=f32, device=dev)
            out[tuple(slice(0, n) for n in t.shape)] = t.detach().to(dev, f32)
            new[name] = out.to(dtype).contiguous()

        hp, ap, op, fp = c["HP"], c["AP"], c["OP"], c["FP"]
        w_a, w_o, _ = score.split_input_weight()
        pad("wa", w_a.T, (ap, hp))
        pad("wo", w_o.T, (op, hp))
        pad("bin", score.inp.bias, (hp,))
        pad("ts", Decision.time_shares(d, f32, dev), (c["T"], hp))
        blocks = list(score.blocks)
        ln_g = torch.zeros(nb, hp, device=dev)
        ln_b = torch.zeros(nb, hp, device=dev)
        w1 = torch.zeros(nb, hp, fp, device=dev)
        b1 = torch.zeros(nb, fp, device=dev)
        w2 = torch.zeros(nb, fp, hp, device=dev)
        b2 = torch.zeros(nb, hp, device=dev)
        for i, blk in enumerate(blocks):
            if c["LN"]:
                ln_g[i, : c["H"]] = blk.norm.weight
                ln_b[i, : c["H"]] = blk.norm.bias
            w = blk.fc1.weight.T  # (H, F)
            w1[i, : w.shape[0], : w.shape[1]] = w
            b1[i, : w.shape[1]] = blk.fc1.bias
            w = blk.fc2.weight.T  # (F, H)
            w2[i, : w.shape[0], : w.shape[1]] = w
            b2[i, : w.shape[1]] = blk.fc2.bias
        new.update(lng=ln_g, lnb=ln_b, b1=b1, b2=b2)
        new["w1"] = w1.to(low).contiguous()
        new["w2"] = w2.to(low).contiguous()
        pad("wout", score.out.weight.T, (hp, ap))
        pad("bout", score.out.bias, (ap,))

        # Reverse-step coefficients per executed step s (s < T: t = T-1-s; then M extra t = 0).
        coef = torch.zeros(c["S"], 4, dtype=torch.float64)
        for step in range(c["S"]):
            t = max(c["T"] - 1 - step, 0)
            sigma = d._sigma[t] * d.temperature if (step < c["T"] and t > 0) else 0.0
            coef[step] = torch.tensor([d._inv_sqrt_alpha[t], d._eps_coef[t], sigma, float(t)])
        new["coef"] = coef.to(dev, f32)

        e, qp0, qp1, qpl = c["E"], c["QP0"], c["QP1"], c["QPL"]
        w = q.layers[0].weight  # (E, OBS + A, H0)
        pad("qwo", w[:, : c["OBS"]], (e, op, qp0))
        pad("qwa", w[:, c["OBS"] :], (e, ap, qp0))
        pad("qb0", q.layers[0].bias[:, 0], (e, qp0))
        if c["QDEPTH"] == 2:
            pad("qw1", q.layers[1].weight, (e, qp0, qp1))
            pad("qb1", q.layers[1].bias[:, 0], (e, qp1))
        else:
            new["qw1"] = torch.zeros(e, qp0, qp1, device=dev)
            new["qb1"] = torch.zeros(e, qp1, device=dev)
        last = q.layers[-1]
        pad("qwl", last.weight[:, :, 0], (e, qpl))
        pad("qbl", last.bias[:, 0, 0], (e,))

        lins = [m for m in v.mlp if isinstance(m, nn.Linear)]
        vp0, vp1, vpl = c["VP0"], c["VP1"], c["VPL"]
        if c["VLN"]:
            pad("vlng", v.norm.weight, (op,))
            pad("vlnb", v.norm.bias, (op,))
        else:
            new["vlng"] = torch.zeros(op, device=dev)
            new["vlnb"] = torch.zeros(op, device=dev)
        pad("vw0", lins[0].weight.T, (op, vp0))
        pad("vb0", lins[0].bias, (vp0,))
        if c["VDEPTH"] == 2:
            pad("vw1", lins[1].weight.T, (vp0, vp1))
            pad("vb1", lins[1].bias, (vp1,))
        else:
            new["vw1"] = torch.zeros(vp0, vp1, device=dev)
            new["vb1"] = torch.zeros(vp1, device=dev)
        pad("vwl", lins[-1].weight[0], (vpl,))
        pad("vbl", lins[-1].bias, (1,))

        if not self._bufs:
            self._bufs = new
        else:  # in place: captured graphs keep reading the same addresses
            for k, t in new.items():
                self._bufs[k].copy_(t)

    def _weights_changed(self) -> None:
        self._pack()

    # ------------------------------------------------------------------ launches
    def _kernel_calls(
        self, obs: Tensor, x0: Tensor, z: Tensor, u: Tensor, *, gpu: bool | None = None
    ) -> list[tuple[Any, tuple[int, ...], list[Any], dict[str, Any], dict[str, int]]]:
        """(kernel, grid, positional args, constexprs, launch options) of every launch, in
        order: candidates + Q into self._x/_q, then the packed rows into self._out. ``gpu``
        (default: not interpreted): the launches of the compiled kernels, where they differ
        (the persistent layout's one launch; the interpreter gets one per phase)."""
        if gpu is None:
            gpu = not self.interpret
        c, b, s = self._consts, self._bufs, self.spec
        rows = s.batch * s.samples
        low = {
            "LOWP": self._lowp,
            "UPCAST": self.interpret and self.dtype == torch.bfloat16,
            "PREC": self._prec,
        }
        bm, bb = self._block_m, 16
        tiles = -(-rows // bm)
        critic = [b[k] for k in ("qwo", "qwa", "qb0", "qw1", "qb1", "qwl", "qbl")]
        critic_const = {k: c[k] for k in "E QP0 QP1 QPL QC QDEPTH".split()}
        calls: list[tuple[Any, tuple[int, ...], list[Any], dict[str, Any], dict[str, int]]] = []
        if self.layout == "fused":
            decide_args = [
                obs, x0, z, b["coef"],
                b["wo"], b["bin"], b["wa"], b["ts"],
                b["lng"], b["lnb"], b["w1"], b["b1"], b["w2"], b["b2"], b["wout"], b["bout"],
                *critic, self._x, self._q[0],
                c["ln_eps"], rows, s.samples,
            ]  # fmt: skip
            decide_const = {k: c[k] for k in "OBS A H OP OC AP HP FP FC NB T S LN ACT CLIP".split()}
            decide_const.update(critic_const, BM=bm, **low)
            calls.append((self._k.decide_kernel, (tiles,), decide_args, decide_const, self._opts))
        elif self.layout == "persist":
            return self._persist_calls(obs, z, u, gpu)
        else:
            nb, steps = c["NB"], c["S"]
            hbuf, xbuf = self._h, self._xs

            def x_before(step: int) -> Tensor:  # x0, then x written by step's first block
                return x0 if step == 0 else xbuf[step]

            block_const = {k: c[k] for k in "OBS A H OP OC AP HP FP FC FS T LN ACT CLIP".split()}
            pdl = self._pdl and gpu  # the interpreter has no launches to overlap
            line = 128 // b["w1"].element_size()  # weights per 128-byte cache line
            prefetch = self._prefetch and gpu  # inline PTX: not in the interpreter
            block_const.update(K=c["K"], BM=bm, PDL=pdl, PREFETCH=prefetch, LINE=line, **low)
            block_opts = dict(self._opts, launch_pdl=True) if pdl else self._opts
            weights = [b[k] for k in "wo bin wa ts lng lnb w1 b1 w2 b2 wout bout".split()]
            grid = (tiles, c["K"])
            for step in range(steps):
                for blk in range(nb):
                    layer = step * nb + blk
                    args = [
                        obs, x_before(max(step - 1, 0)), x_before(step), z, b["coef"],
                        hbuf[(layer - 1) % 2], hbuf[layer % 2], *weights,
                        c["ln_eps"], rows, s.samples, step, blk,
                    ]  # fmt: skip
                    const = dict(block_const, FIRST=blk == 0, UPDATE=blk == 0 and step > 0)
                    calls.append((self._k.block_kernel, grid, args, const, block_opts))
            calls.insert(0, self._value_call(obs))  # a branch of the graph (``_launch``)
            hlast = hbuf[(steps * nb - 1) % 2]
            calls.append(self._finish_call(obs, x_before(steps - 1), z, hlast, pdl=pdl))
        select_args = [
            obs, u, self._x, self._q, self._vp,
            b["vlng"], b["vlnb"], b["vw0"], b["vb0"], b["vw1"], b["vb1"], b["vwl"], b["vbl"],
            self._out,
            float(self.decision.tau), float(self.decision.alpha), c["v_eps"],
            s.batch, s.samples,
        ]  # fmt: skip
        select_const = {
            k: c[k] for k in "NP OBS OP OC A AP VP0 VP1 VPL VC VDEPTH VLN MODE VL QS VS".split()
        }
        items = self.layout == "split"  # Q in parts by finish_kernel, V by value_kernel
        select_const.update(QE=c["E"] if items else 1, VLOAD=items, BB=bb, **low)
        calls.append(
            (
                self._k.select_kernel,
                (-(-s.batch // bb),),
                select_args,
                select_const,
                {"num_warps": 8},  # at 4, ptxas (sm_90) spills ~12 kB per thread
            )
        )
        return calls

    def _critic_items(self) -> tuple[int, int]:
        """(rows per work item, work items) of the split/persist critic (finish) launch."""
        c, s = self._consts, self.spec
        cbm = min(self._block_m, 16)  # the float32 critic on more rows spills
        return cbm, -(-(s.batch * s.samples) // cbm) * c["QS"]

    def _finish_call(
        self, obs: Tensor, xprev: Tensor, z: Tensor, hlast: Tensor, *, pdl: bool
    ) -> tuple[Any, tuple[int, ...], list[Any], dict[str, Any], dict[str, int]]:
        """The split layout's ``finish_kernel``: one program per critic work item."""
        c, b, s = self._consts, self._bufs, self.spec
        cbm, q_items = self._critic_items()
        args = [
            obs, xprev, z, b["coef"], hlast, b["wout"], b["bout"],
            *(b[k] for k in "qwo qwa qb0 qw1 qb1 qwl qbl".split()), self._x, self._q,
            s.batch * s.samples, s.samples,
        ]  # fmt: skip
        keys = "OBS A OP OC AP HP K T S ACT CLIP E QP0 QP1 QPL QC QDEPTH QS"
        const = {k: c[k] for k in keys.split()}
        const.update(CBM=cbm, QPREC=self._qprec, PDL=pdl)
        opts: dict[str, int] = {"num_warps": 8}
        if pdl:
            opts["launch_pdl"] = True
        return (self._k.finish_kernel, (q_items,), args, const, opts)

    def _value_call(
        self, obs: Tensor
    ) -> tuple[Any, tuple[int, ...], list[Any], dict[str, Any], dict[str, int]]:
        """The split layout's ``value_kernel``: V(obs) in VS parts per tile of 16 states."""
        c, b, s = self._consts, self._bufs, self.spec
        args: list[Any] = [obs, *(b[k] for k in "vlng vlnb vw0 vb0 vw1 vb1 vwl vbl".split())]
        args += [self._vp, c["v_eps"], s.batch]
        const = {k: c[k] for k in "OBS OP OC VP0 VP1 VPL VC VDEPTH VLN VS".split()}
        const.update(BB=16, PREC=self._qprec)
        return (self._k.value_kernel, (-(-s.batch // 16), c["VS"]), args, const, {"num_warps": 8})

    def _persist_calls(
        self, obs: Tensor, z: Tensor, u: Tensor, gpu: bool
    ) -> list[tuple[Any, tuple[int, ...], list[Any], dict[str, Any], dict[str, int]]]:
        """The persistent layout: one launch on the GPU; under the interpreter the same
        kernel once per layer, then once for the finish and once for the selection (its
        programs run one after another there, so a grid barrier could never open)."""
        c, b, s = self._consts, self._bufs, self.spec
        rows = s.batch * s.samples
        grid: tuple[int, ...] = (-(-rows // self._block_m), c["K"])
        layers = c["S"] * c["NB"]
        names = "wo bin wa ts lng lnb w1 b1 w2 b2 wout bout qwo qwa qb0 qw1 qb1 qwl qbl"
        head: list[Any] = [obs, self._xs, z, b["coef"], self._h, *(b[k] for k in names.split())]
        head += [self._x, self._q, u]
        head += [b[k] for k in "vlng vlnb vw0 vb0 vw1 vb1 vwl vbl".split()]
        head += [self._out, self._sync, self._err]
        head += [c["ln_eps"], float(self.decision.tau), float(self.decision.alpha), c["v_eps"]]
        head += [rows, s.samples, s.batch]
        keys = (
            "OBS A H OP OC AP HP FP FC FS K NB T S LN ACT CLIP E QP0 QP1 QPL QC QDEPTH QS NP VP0"
            " VP1 VPL VC VDEPTH VLN VS MODE VL"
        )
        cbm, q_items = self._critic_items()
        const: dict[str, Any] = {k: c[k] for k in keys.split()}
        const.update(
            BB=16,
            BM=self._block_m,
            LOWP=self._lowp,
            UPCAST=self.interpret and self.dtype == torch.bfloat16,
            PREC=self._prec,
            CBM=cbm,
            QPREC=self._qprec,
            MAX_SPIN=_PERSIST_MAX_SPIN,
        )
        kernel = self._k.persist_kernel
        if gpu:
            full = dict(const, DO_FINISH=True, DO_SELECT=True, PERSIST=True)
            return [(kernel, grid, [*head, 0, layers, q_items], full, self._opts)]
        phase = dict(const, DO_FINISH=False, DO_SELECT=False, PERSIST=False)
        calls: list[tuple[Any, tuple[int, ...], list[Any], dict[str, Any], dict[str, int]]]
        calls = [
            (kernel, grid, [*head, i, i + 1, q_items], phase, self._opts) for i in range(layers)
        ]
        for flag in ("DO_FINISH", "DO_SELECT"):
            calls.append(
                (kernel, grid, [*head, layers, layers, q_items], {**phase, flag: True}, {})
            )
        return calls

    def _launch(self, obs: Tensor, x0: Tensor, z: Tensor, u: Tensor) -> None:
        if self.layout == "persist":
            self._xs[0].copy_(x0.reshape(self._xs[0].shape))  # x before step 0
            self._sync.zero_()  # barrier arrivals count from zero in every decision
        side = self._side
        for kernel, grid, args, const, opts in self._kernel_calls(obs, x0, z, u):
            if side is not None and kernel is self._k.value_kernel:
                # V(obs) needs only the observation: on a second stream, so that in the
                # graph it is a branch beside the reverse steps, joined before the selection
                main = torch.cuda.current_stream(self.device)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    kernel[grid](*args, **const, **opts, **_LAUNCH_OPTIONS)
                continue
            if side is not None and kernel is self._k.select_kernel:
                torch.cuda.current_stream(self.device).wait_stream(side)
            kernel[grid](*args, **const, **opts, **_LAUNCH_OPTIONS)

    def compile_for(self, arch: int = 90) -> dict[str, dict[str, Any]]:
        """Compile every kernel for CUDA compute capability ``arch`` without a GPU (Triton
        brings its own ptxas): a check that the GPU build of this engine's exact kernels
        goes through. Returns per kernel (the largest of its variants) the shared memory
        (bytes), the PTX/cubin sizes, the ``griddepcontrol.wait`` instructions in the PTX
        (``pdl``), and, from ``ptxas -v`` on the PTX, the registers per
        thread and the bytes spilled to local memory per thread (None without ptxas)."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        if self.interpret and _triton_imported_interpreted():
            raise EngineUnavailable("triton was imported with TRITON_INTERPRET=1: cannot compile")
        kernels = load_kernels(False)
        target = GPUTarget("cuda", arch, 32)
        backend = triton.compiler.make_backend(target)
        types = {
            torch.float32: "*fp32",
            torch.bfloat16: "*bf16",
            torch.float16: "*fp16",
            torch.int32: "*i32",
        }
        s = self.spec
        noise = DecisionNoise.draw(s, device=self.device)
        obs = torch.zeros(s.batch, s.obs_dim, device=self.device)
        out: dict[str, dict[str, Any]] = {}
        seen: set[str] = set()
        for kernel, _, args, const, opts in self._kernel_calls(obs, *noise, gpu=True):
            key = f"{kernel.__name__}{sorted(const.items())}"
            if key in seen:  # the split layout launches block_kernel once per (step, block)
                continue
            seen.add(key)
            kernel = getattr(kernels, kernel.__name__)
            values = dict(zip(kernel.arg_names, args, strict=False))
            sig: dict[str, str] = {}
            # What the launcher specializes on: pointers aligned to 16 bytes and integers
            # divisible by 16 are marked so, which lets loads vectorize (without it, this
            # report showed bf16 weights loaded 2 bytes at a time, not the real kernel).
            attrs: dict[tuple[int, ...], list[list[Any]]] = {}
            for i, name in enumerate(kernel.arg_names):
                v = values.get(name)
                if name in const:
                    sig[name] = "constexpr"
                elif isinstance(v, Tensor):
                    sig[name] = types[v.dtype]
                    if v.data_ptr() % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                else:
                    sig[name] = "fp32" if isinstance(v, float) else "i32"
                    if isinstance(v, int) and v != 0 and v % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            if "UPCAST" in const:
                const = {**const, "UPCAST": False}
            options = backend.parse_options({**opts, **_LAUNCH_OPTIONS}).__dict__
            compiled = triton.compile(
                ASTSource(kernel, sig, const, attrs), target=target, options=options
            )
            got = {
                "shared_bytes": int(compiled.metadata.shared),
                "ptx_chars": len(compiled.asm["ptx"]),
                "cubin_bytes": len(compiled.asm["cubin"]),
                # programmatic dependent launch: the waits compiled in (``pdl``)
                "gdc_waits": compiled.asm["ptx"].count("griddepcontrol.wait"),
                "l1_prefetches": compiled.asm["ptx"].count("prefetch.global.L1"),
                "fp_fusion": bool(compiled.metadata.enable_fp_fusion),
                **_ptxas_report(compiled.asm["ptx"], arch),
            }
            prev = out.get(kernel.__name__)
            out[kernel.__name__] = (  # the largest variant of each kernel
                got if prev is None else {k: _max_or_none(prev[k], v) for k, v in got.items()}
            )
        return out

    def _launch_noise(self, obs: Tensor, noise: DecisionNoise) -> None:
        f32 = torch.float32
        x0, z, u = (t.to(self.device, f32).contiguous() for t in noise)
        self._launch(obs, x0, z, u)

    # ------------------------------------------------------------------ CUDA graph
    def _body_rng(self) -> None:
        self._drawn = DecisionNoise.draw(self.spec, generator=self.generator, device=self.device)
        self._body(self._drawn)

    def _body_given(self) -> None:
        self._body(self._noise_in)

    def _body(self, noise: DecisionNoise) -> None:
        """One captured decision: (``graph_copies``) the observation in from the pinned
        buffer, the launches, (``graph_copies``) the packed rows out to the pinned buffer."""
        if self._copies_in_graph:
            self._obs.copy_(self._obs_host, non_blocking=True)
        self._launch(self._obs, *noise)
        if self._copies_in_graph:
            self._out_host_buf.copy_(self._out_buf, non_blocking=True)

    def _capture(self, body: Any, *, register_rng: bool = False) -> torch.cuda.CUDAGraph:
        # warm-up: Triton compiles (or loads its cache)
        gen = self.generator if register_rng else None
        return capture_cuda_graph(body, self.device, warmup=_WARMUP_CALLS, generator=gen)[0]

    # ------------------------------------------------------------------ run
    def _run(self, obs: Tensor, noise: DecisionNoise | None) -> DecisionOutput:
        if self.device.type != "cuda":  # the interpreter: plain calls on CPU tensors
            if noise is None:
                noise = self._draw_noise()
                self._drawn = noise
            with torch.no_grad(), interpretable_triton_library():
                self._launch_noise(obs.contiguous(), noise)
            return self._unpack(self._out)
        if self._persist_failed:
            raise RuntimeError(self._persist_failed)
        self._obs_host.copy_(obs)
        if not self._copies_in_graph:
            self._obs.copy_(self._obs_host, non_blocking=True)
        if noise is None:
            self._replay_rng()
        else:
            for dst, src in zip(self._noise_in, noise, strict=True):
                dst.copy_(src.to(self.device, torch.float32))
            if self._graph_given is None:
                self._graph_given = self._capture(self._body_given)
            self._graph_given.replay()
        if not self._copies_in_graph:
            self._out_host_buf.copy_(self._out_buf, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        self._check_persist(self._out_host_buf.numpy())
        return self._unpack(self._out_host)

    def _replay_rng(self) -> None:
        if self._persist_failed:
            raise RuntimeError(self._persist_failed)
        self._graph_rng.replay()

    def _check_persist(self, host: np.ndarray) -> None:
        """The persistent layout's barrier-timeout flag: an int32 in the last float32 slot
        of the packed output rows as they came back to the host."""
        if self.layout == "persist" and int(host.reshape(-1)[-1:].view(np.int32)[0]):
            self._persist_failed = (
                "the triton engine's persistent kernel timed out at a grid barrier (not "
                "every program was resident?): its output is not valid, and this engine "
                "refuses every later decision; rebuild with layout='split'"
            )
            raise RuntimeError(self._persist_failed)

    def _unpack(self, packed: Tensor) -> DecisionOutput:
        a = self.spec.act_dim
        h = packed.to("cpu", torch.float32, copy=True)
        return DecisionOutput(
            h[:, :a], h[:, a], h[:, a + 1], h[:, a + 2], h[:, a + 3].round().to(torch.int64)
        )

    def last_candidates(self) -> tuple[Tensor, Tensor]:
        """CPU copies of the latest decision's candidates x (B, N, A) and their Q (B, N),
        the min over heads (what the selection saw): for parity checks of every row."""
        s, c = self.spec, self._consts
        x = self._x.detach().to("cpu", copy=True).view(s.batch, s.samples, s.act_dim)
        parts = self._q.detach().to("cpu", copy=True)
        if c["ITEMS"]:  # min over heads of each head's parts summed in the selection's order
            heads = parts.view(c["E"], c["QS"], -1)
            q = torch.full_like(heads[0, 0], float("inf"))
            for e in range(c["E"]):
                qe = heads[e, 0].clone()
                for j in range(1, c["QS"]):
                    qe += heads[e, j]
                q = torch.minimum(q, qe)
        else:
            q = parts[0]
        return x, q.view(s.batch, s.samples)

    def last_noise(self) -> DecisionNoise:
        """CPU copies of the noise drawn for the latest ``decide`` call."""
        assert self._drawn is not None
        return DecisionNoise(*(t.detach().to("cpu", copy=True) for t in self._drawn))
