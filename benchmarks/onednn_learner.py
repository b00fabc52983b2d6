"""The CPU learner's products and optimiser steps: MKL vs oneDNN, unfused vs fused Adam.

Prints JSON lines:
- ``product``: GFLOP/s of the score network's block products (rows x 256 x 1024 and its
  transpose), forward, input gradient and weight gradient, through ``F.linear`` / ``mm``
  (MKL on x86) and through ``onednn.linear`` (oneDNN, transposes as strided views);
- ``adamw``: one AdamW step over the score network's parameters, torch.optim's default
  (single-tensor on the CPU), foreach, and fused;
- ``update``: ``Agent.update`` (actor + V + Q, batch 512) with the oneDNN training
  products off (plain PyTorch) and on, in alternating rounds, plus the largest parameter
  difference the two paths leave after the timed updates from the same start (float32
  rounding).

    python benchmarks/onednn_learner.py [--threads 2] [--batch 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from idql_runtime import onednn
from idql_runtime.agent import Agent
from idql_runtime.config import Config


def per_call(fn: Any, n: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def products(rows: int, dim: int, wide: int, n: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for k_in, k_out in ((dim, wide), (wide, dim)):  # fc1, fc2
        x = torch.randn(rows, k_in, generator=g)
        w = torch.randn(k_out, k_in, generator=g) / k_in**0.5
        dy = torch.randn(rows, k_out, generator=g)
        flops = 2.0 * rows * k_in * k_out
        cases = {
            "forward": (lambda x=x, w=w: F.linear(x, w), lambda x=x, w=w: onednn._mm_t(x, w)),
            "input_grad": (lambda d=dy, w=w: d @ w, lambda d=dy, w=w: onednn._mm_t(d, w.t())),
            "weight_grad": (
                lambda d=dy, x=x: d.t() @ x,
                lambda d=dy, x=x: onednn._mm_t(d.t(), x.t()),
            ),
        }
        for name, (mkl, dnn) in cases.items():
            t_mkl, t_dnn = per_call(mkl, n), per_call(dnn, n)
            out.append(
                {
                    "product": f"{rows}x{k_in}x{k_out}",
                    "pass": name,
                    "aten_gflops": round(flops / t_mkl / 1e9, 1),
                    "onednn_gflops": round(flops / t_dnn / 1e9, 1),
                    "ratio": round(t_mkl / t_dnn, 2),
                }
            )
    return out


def adamw(agent: Agent, n: int) -> dict[str, Any]:
    params = [p.detach().clone().requires_grad_() for p in agent.score.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    out: dict[str, Any] = {"params": sum(p.numel() for p in params)}
    for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4, **kw)
        out[f"{name}_ms"] = round(per_call(opt.step, n) * 1e3, 3)
    out["fused_ratio"] = round(out["default_ms"] / out["fused_ms"], 2)
    return out


def updates(batch_size: int, rounds: int, n: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    batch = {
        "obs": torch.randn(batch_size, 17, generator=g),
        "action": torch.rand(batch_size, 6, generator=g) * 2 - 1,
        "reward": torch.randn(batch_size, generator=g),
        "next_obs": torch.randn(batch_size, 17, generator=g),
        "terminated": torch.rand(batch_size, generator=g) < 0.05,
    }
    agents = {}
    for on in (False, True):
        torch.manual_seed(0)
        agents[on] = (Agent(Config(), 17, 6), torch.Generator().manual_seed(1))

    def run(on: bool) -> None:
        agent, gen = agents[on]
        with onednn.training_products(on):
            agent.update(batch, gen)

    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):  # alternate so load changes hit both alike
        for on in (False, True):
            torch.manual_seed(1000 + r)  # the same dropout masks for both paths
            times[on].append(per_call(lambda o=on: run(o), n, warm=1 if r == 0 else 0))
    diff = max(
        float((a - b).detach().abs().max())
        for a, b in zip(agents[False][0].parameters(), agents[True][0].parameters(), strict=True)
    )
    off, on = float(np.median(times[False])), float(np.median(times[True]))
    return {
        "batch": batch_size,
        "plain_ms": round(off * 1e3, 2),
        "onednn_ms": round(on * 1e3, 2),
        "ratio": round(off / on, 2),
        "updates_each": rounds * n + 1,
        "max_param_diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=6, help="updates per round and path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    head = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "onednn": onednn.available(),
        "cpu": (
            next(
                (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln),
                "?",
            )
        ),
    }
    print(json.dumps({"machine": head}), flush=True)
    for row in products(args.batch, 256, 1024, 30):
        print(json.dumps(row), flush=True)
    print(json.dumps({"adamw": adamw(Agent(Config(), 17, 6), 50)}), flush=True)
    print(json.dumps({"update": updates(args.batch, args.rounds, args.iters)}), flush=True)


if __name__ == "__main__":
    main()
