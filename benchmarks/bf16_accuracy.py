"""Reduced precision on trained weights: is the bf16 CPU engine safe for control?

For one checkpoint, on observations from a dataset (or rollouts), measure each engine
against the float64 reference on the same noise (``engines.precision.precision_report``:
Q regret as a fraction of the state's Q spread, action error of the executed candidate,
same-pick rate), its decision latency, and the returns of K evaluation episodes driven
by it (same env seeds for every engine). Prints one JSON object.

    python benchmarks/bf16_accuracy.py --checkpoint RUN/checkpoints/ckpt_... \
        --dataset data/HalfCheetah-v5-medium.zarr --states 512 --episodes 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", help="replay store / dataset for the states (default: rollouts)")
    p.add_argument("--states", type=int, default=512)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--engines", default="cpu:float32,cpu:bfloat16,eager:bfloat16")
    p.add_argument("--episodes", type=int, default=5, help="evaluation episodes per engine")
    p.add_argument("--timing-iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from idql_runtime.checkpoint import load_checkpoint, restore_agent
    from idql_runtime.engines import build_engine
    from idql_runtime.engines.precision import PRECISION_LIMITS, precision_ok, precision_report
    from idql_runtime.envs import reference_scores
    from idql_runtime.evaluation import evaluate

    ckpt = load_checkpoint(args.checkpoint, with_train_state=False)
    agent = restore_agent(ckpt, "cpu", optimisers=False)
    env_id = ckpt.meta.get("env_id")
    rng = np.random.default_rng(args.seed)
    if args.dataset:
        from idql_runtime.datasets import open_dataset

        store = open_dataset(args.dataset)
        rows = np.sort(rng.choice(len(store), size=args.states, replace=False))
        obs = store.read(0, len(store))["obs"][rows]
    else:
        from idql_runtime.engines.precision import rollout_states

        def random_policy(_obs: np.ndarray) -> np.ndarray:
            return rng.uniform(-1.0, 1.0, agent.act_dim).astype(np.float32)

        obs = rollout_states(env_id, random_policy, args.states, seed=args.seed)
    ref = tuple(ckpt.meta["ref_scores"]) if ckpt.meta.get("ref_scores") else None
    ref = ref or (reference_scores(env_id) if env_id else None)

    out: dict = {
        "checkpoint": str(ckpt.path),
        "iteration": ckpt.iteration,
        "env_id": env_id,
        "states_from": args.dataset or "random-action rollouts",
        "limits": PRECISION_LIMITS,
        "torch": torch.__version__,
        "threads": args.threads,
        "engines": [],
    }
    for item in args.engines.split(","):
        kind, dtype = item.split(":")
        engine = build_engine(agent, kind=kind, samples=args.samples, dtype=dtype, seed=args.seed)
        rep = precision_report(engine, obs, seed=args.seed)
        ok, why = precision_ok(rep)
        one = np.asarray(obs[:1])
        for _ in range(10):
            engine.decide(one)
        times = []
        for i in range(args.timing_iters):
            t0 = time.perf_counter()
            engine.decide(obs[i % len(obs)][None])
            times.append(time.perf_counter() - t0)
        ev = None
        if args.episodes and env_id:
            res = evaluate(lambda o, e=engine: e.decide(o[None])[0], env_id, args.episodes,
                           seed=args.seed, ref=ref)  # fmt: skip
            ev = res.summary()
        out["engines"].append({
            **rep,
            "passes": ok,
            "why": why,
            "p50_ms": 1e3 * float(np.median(times)),
            "p99_ms": 1e3 * float(np.quantile(times, 0.99)),
            "eval": ev,
        })  # fmt: skip
        print(f"{item}: {json.dumps(out['engines'][-1])}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
