"""int8 on the CPU: does dynamic int8 quantisation of the score network beat the CPU engine?

The issue lists int8 dynamic quantisation (~9.2 ms vs ~10.4 ms eager at N = 64, on random
weights) as a possible CPU speed-up whose accuracy was never checked on trained weights.
This measures it beside the engines that ship: the eager engine with the residual
blocks' ``nn.Linear`` layers of its score network replaced by
``torch.ao.quantization.quantize_dynamic`` (qint8 weights, activations quantised per call;
per-tensor and per-channel weight scales), the critic and the selection float32 as in the
bf16 engines; against ``cpu`` float32 and
bfloat16 and plain eager, timed in the same process, and each checked against the float64
reference (``precision_report``: same pick, Q regret as a fraction of the state's Q
spread, action error) on the given states. Prints one JSON object per engine.

    python benchmarks/int8_cpu.py --checkpoint CKPT --states states.npy
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn


def latency_us(eng: Any, obs: np.ndarray, iters: int) -> list[float]:
    for _ in range(5):
        eng.decide(obs)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        eng.decide(obs)
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def int8_engine(agent: Any, samples: int, per_channel: bool) -> Any:
    """The eager engine with its score network's linear layers dynamically quantised; its
    float64 reference stays the float32 master weights (a float engine's)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    from idql_runtime.engines import build_engine

    eng = build_engine(agent, kind="eager", batch=1, samples=samples)
    ref = build_engine(agent, kind="eager", batch=1, samples=samples)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    # the residual blocks' fc1/fc2 (all but ~3 % of the FLOPs); the input projection stays
    # float32: the decision splits its weight into obs / action / time shares (hoisting)
    blocks = {
        name: qconfig
        for name, m in eng.decision.score.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("blocks.")
    }
    eng.decision.score = torch.ao.quantization.quantize_dynamic(
        eng.decision.score, blocks, dtype=torch.qint8
    )
    eng.reference_decision = ref.reference_decision  # type: ignore[method-assign]
    eng.info["precision"] = "int8 dynamic (score network), " + (
        "per-channel" if per_channel else "per-tensor"
    )
    return eng


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--states", required=True, help=".npy of observations")
    p.add_argument("--precision-states", type=int, default=128)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from idql_runtime.checkpoint import load_checkpoint, restore_agent
    from idql_runtime.engines import build_engine
    from idql_runtime.engines.precision import precision_ok, precision_report

    agent = restore_agent(load_checkpoint(args.checkpoint, with_train_state=False), "cpu")
    states = np.load(args.states).astype(np.float32)
    obs = states[:1]
    check = states[: args.precision_states]
    eager = build_engine(agent, kind="eager", batch=1, samples=args.samples)
    engines = {
        "cpu float32": lambda: build_engine(agent, kind="cpu", batch=1, samples=args.samples),
        "cpu bfloat16": lambda: build_engine(
            agent, kind="cpu", batch=1, samples=args.samples, dtype="bfloat16"
        ),
        "eager int8 per-tensor": lambda: int8_engine(agent, args.samples, False),
        "eager int8 per-channel": lambda: int8_engine(agent, args.samples, True),
    }
    print(
        json.dumps(
            {
                "run": {"samples": args.samples, "batch": 1, "threads": args.threads},
                "checkpoint": args.checkpoint,
                "torch": torch.__version__,
                "quantized_engine": torch.backends.quantized.engine,
            }
        ),
        flush=True,
    )
    for name, make in engines.items():
        eng = make()
        # engine and eager in alternating blocks, so load changes hit both alike
        mine: list[float] = []
        base: list[float] = []
        for _ in range(3):
            mine += latency_us(eng, obs, args.iters // 3)
            base += latency_us(eager, obs, args.iters // 3)
        rep = precision_report(eng, check)
        row = {
            "engine": name,
            "p50_us": round(float(np.percentile(mine, 50)), 1),
            "p99_us": round(float(np.percentile(mine, 99)), 1),
            "eager_p50_us": round(float(np.percentile(base, 50)), 1),
            "eager_p99_us": round(float(np.percentile(base, 99)), 1),
            "precision": {
                k: rep[k] for k in ("same_pick", "regret_p99", "regret_max", "action_err_p99")
            },
            "precision_ok": precision_ok(rep),
        }
        row["speedup_p50"] = round(row["eager_p50_us"] / row["p50_us"], 2)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
