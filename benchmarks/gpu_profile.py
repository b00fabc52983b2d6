"""Where one decision's (or one learner iteration's) GPU time goes, kernel by kernel.

A CUDA-graph replay hides its kernels from the host: ``triton_sweep.py`` measures a whole
replay, not what is inside it. This script runs the same work *without* the graph (the
engine's own-noise body, or the learner step's iteration) under ``torch.profiler`` with
CUDA activity (CUPTI), ``--iters`` times with a sync between calls, and prints per target
one JSON line:

- ``kernels_per_call``: device kernels (and memcpy/memset) per call;
- ``busy_us``: the sum of their device times per call: what the kernels cost;
- ``span_us``: first kernel start to last kernel end per call (median): busy time plus
  the gaps between kernels. Without a graph the gaps include host launch cost; compare
  ``busy_us`` with ``triton_sweep.py``'s ``replay_us`` for the same variant: replay close
  to busy means the kernels themselves are slow; replay well above busy means per-node
  overhead inside the graph;
- ``top``: the kernels with the largest total time: name (cut to 90 characters), calls per
  decision, mean and max us.

Targets (``--targets``): ``decision:KIND:DTYPE[:key=value,...]`` (engine options as in
``idql-bench --engine-options``) and ``learner:BACKEND[:tf32][:overlap]``.

    python benchmarks/gpu_profile.py --samples 128 --batch 1 --checkpoint CKPT \\
        --targets decision:triton:bfloat16 decision:cuda_graph:bfloat16 learner:cuda_graph:tf32

``--device cpu`` runs the same code with CPU activity only (op times instead of kernels),
to try the script without a GPU; those numbers mean nothing for the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from idql_runtime.cli.bench import JsonLines, parse_options


def profile_calls(fn: Callable[[], Any], iters: int, device: str, top: int = 15) -> dict[str, Any]:
    """Profile ``iters`` calls of ``fn`` (a sync after each); per-call kernel statistics."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
            sync()
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == want]
    if not cuda:  # CPU ops nest: keep the leaves (no child ops), as kernels would be
        events = [e for e in events if not e.cpu_children]
    events.sort(key=lambda e: e.time_range.start)
    if not events:
        return {"kernels_per_call": 0, "note": "the profiler saw no device activity"}
    per_call = len(events) / iters
    # Calls are separated by a sync, so they are consecutive runs of per_call events.
    k = max(1, round(per_call))
    spans = []
    for i in range(0, len(events) - k + 1, k):
        chunk = events[i : i + k]
        spans.append(max(e.time_range.end for e in chunk) - chunk[0].time_range.start)
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    busy = sum(e.time_range.elapsed_us() for e in events) / iters
    return {
        "kernels_per_call": round(per_call, 2),
        "busy_us": round(busy, 2),
        "span_us": round(statistics.median(spans), 2) if spans else None,
        "distinct_kernels": len(by_name),
        "top": [
            {
                "name": name[:90],
                "per_call": round(len(ts) / iters, 2),
                "mean_us": round(sum(ts) / len(ts), 2),
                "max_us": round(max(ts), 2),
                "share": round(sum(ts) / iters / busy, 3) if busy else None,
            }
            for name, ts in ranked[:top]
        ],
    }


def decision_body(eng: Any) -> Callable[[], Any]:
    """The engine's decision without its CUDA graph: ``_body_rng`` for the graph engines
    (noise draws included), ``decide`` for the others."""
    body = getattr(eng, "_body_rng", None)
    if body is not None and eng.device.type == "cuda":
        return body  # type: ignore[no-any-return]
    obs = np.zeros((eng.spec.batch, eng.spec.obs_dim), np.float32)
    return lambda: eng.decide(obs)


def learner_body(agent: Any, backend: str, batch_size: int, seed: int) -> Callable[[], Any]:
    """One ``LearnerStep`` iteration without its graph (``_iteration`` on a fixed batch)."""
    from idql_runtime.engines.learner_step import LearnerStep, parse_backend_spec

    spec = parse_backend_spec(backend)
    name = spec.pop("backend")
    graphless = {"cuda_graph": "eager", "compile_cuda_graph": "compile"}.get(name, name)
    step = LearnerStep(agent, batch_size, backend=graphless, seed=seed, **spec)
    dev = step.device
    g = torch.Generator().manual_seed(seed)
    o, a = agent.obs_dim, agent.act_dim
    batch = {
        "obs": torch.randn(batch_size, o, generator=g).to(dev),
        "action": (torch.rand(batch_size, a, generator=g) * 2 - 1).to(dev),
        "reward": torch.randn(batch_size, generator=g).to(dev),
        "next_obs": torch.randn(batch_size, o, generator=g).to(dev),
        "terminated": torch.zeros(batch_size, dtype=torch.bool).to(dev),
    }
    for _ in range(3):  # autograd, cuBLAS and compile warm-up
        step.step(batch)
    return lambda: step.step(batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint (default: random v2 weights, 17/6 dims)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--learner-batch", type=int, default=512)
    p.add_argument("--targets", nargs="+", default=["decision:cuda_graph:float32"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON lines here")
    args = p.parse_args(argv)

    from idql_runtime.engines import build_engine

    def load_agent() -> tuple[Any, str]:
        if args.checkpoint:
            from idql_runtime.checkpoint import load_checkpoint, restore_agent

            ck = load_checkpoint(args.checkpoint, with_train_state=False)
            return restore_agent(ck, args.device), args.checkpoint
        from idql_runtime.agent import Agent
        from idql_runtime.config import config_from_flat

        torch.manual_seed(args.seed)
        return Agent(config_from_flat({}), 17, 6).to(args.device), "random (v2, obs 17, act 6)"

    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    sink = JsonLines(args.out)
    emit = sink.write
    emit({"run": {"card": card, "torch": torch.__version__, "iters": args.iters}})
    for target in args.targets:
        parts = target.split(":")
        row: dict[str, Any] = {"target": target}
        try:
            agent, weights = load_agent()
            row["weights"] = weights
            if parts[0] == "decision" and len(parts) >= 3:
                eng = build_engine(
                    agent,
                    kind=parts[1],
                    batch=args.batch,
                    samples=args.samples,
                    dtype=parts[2],
                    device=args.device,
                    seed=args.seed,
                    **parse_options(":".join(parts[3:])),
                )
                row.update(engine=eng.name, batch=args.batch, samples=args.samples)
                fn = decision_body(eng)
            elif parts[0] == "learner" and len(parts) >= 2:
                row.update(batch=args.learner_batch)
                fn = learner_body(agent, ":".join(parts[1:]), args.learner_batch, args.seed)
            else:
                raise ValueError(
                    f"target {target!r}: expected decision:KIND:DTYPE[:opts] or learner:BACKEND"
                )
            row.update(profile_calls(fn, args.iters, args.device, args.top))
        except Exception as e:  # noqa: BLE001 - one target failing must not stop the rest
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        emit(row)
    sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
