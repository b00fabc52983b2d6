"""Tune the fused-kernel (triton) engine at one GPU shape, beside the other GPU engines.

For each engine variant at batch B and N samples: the decision latency as a caller sees it
(``decide(obs)``: host -> device copy, one graph replay, copy back; p50/p99 over
``--iters`` calls), the device time of one graph replay alone (CUDA events around
``--replays`` back-to-back replays: what the kernels cost without the host), and, with
``--checkpoint`` and ``--states``, the precision check of ``engines.precision`` (regret
as a fraction of the Q spread, action error, same pick, against the float64 reference on
the same noise). The plain eager engine is timed first and last in the same run, the
baseline for every ratio. One JSON line per variant on stdout (and ``--out`` file), as
soon as it is measured, so a run cut short keeps what it measured; a table on stderr.

    python benchmarks/triton_sweep.py --samples 128 --batch 1 --dtype bfloat16 \
        --checkpoint CKPT --states states.npy --out sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from idql_runtime.cli.bench import JsonLines, parse_options, percentile

DEFAULT_VARIANTS = [
    # (kind, dtype, options)
    ("cuda_graph", "float32", {}),
    ("cuda_graph", "bfloat16", {}),
    ("triton", "float32", {}),
    ("triton", "float32", {"input_precision": "tf32"}),
    ("triton", "bfloat16", {}),
    ("triton", "bfloat16", {"num_warps": 4}),
    ("triton", "bfloat16", {"hidden_chunk": 128}),
    ("triton", "bfloat16", {"hidden_chunk": 32}),
    ("triton", "bfloat16", {"hidden_chunk": 128, "num_warps": 4}),
    ("triton", "bfloat16", {"block_m": 32}),
    ("triton", "bfloat16", {"num_stages": 1}),
    ("triton", "bfloat16", {"num_stages": 3}),
    ("triton", "float16", {}),
]


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``kind:dtype[:key=value,...]`` -> (kind, dtype, options)."""
    parts = text.split(":")
    if len(parts) < 2:
        raise ValueError(f"variant {text!r}: expected kind:dtype[:key=value,...]")
    return parts[0], parts[1], parse_options(":".join(parts[2:]))


def pct(xs: list[float], q: float) -> float:
    return round(percentile(xs, q), 1)


def host_latency(eng: Any, obs: np.ndarray, iters: int, max_s: float) -> list[float]:
    out: list[float] = []
    t_end = time.perf_counter() + max_s
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        eng.decide(obs)
        out.append((time.perf_counter_ns() - t0) / 1e3)
        if time.perf_counter() > t_end and len(out) >= 50:
            break
    return out


def replay_us(eng: Any, replays: int) -> float | None:
    """Device time of one replay of the engine's own-noise graph (events, back to back)."""
    graph = getattr(eng, "_graph_rng", None)
    if graph is None or not torch.cuda.is_available():
        return None
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1e3 / replays, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint (default: random v2 weights, 17/6 dims)")
    p.add_argument("--states", help=".npy of observations for the precision check")
    p.add_argument("--precision-states", type=int, default=128)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", nargs="*", help="kind:dtype[:key=value,...] (default: a sweep)")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--max-seconds", type=float, default=1.0)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--device", default="cuda", help="cuda (cpu only to try the script)")
    p.add_argument("--out")
    args = p.parse_args(argv)

    from idql_runtime.engines import build_engine
    from idql_runtime.engines.precision import precision_ok, precision_report

    if args.checkpoint:
        from idql_runtime.checkpoint import load_checkpoint, restore_agent

        agent = restore_agent(load_checkpoint(args.checkpoint, with_train_state=False), "cpu")
        weights = args.checkpoint
    else:
        from idql_runtime.agent import Agent
        from idql_runtime.config import config_from_flat

        torch.manual_seed(0)
        agent = Agent(config_from_flat({}), 17, 6)
        weights = "random (v2 sizes, obs 17, act 6)"
    states = np.load(args.states)[: args.precision_states] if args.states else None
    rng = np.random.default_rng(0)
    obs = (
        states[: args.batch]
        if states is not None and len(states) >= args.batch
        else rng.standard_normal((args.batch, agent.obs_dim)).astype(np.float32)
    )
    variants = (
        [parse_variant(v) for v in args.variants] if args.variants else list(DEFAULT_VARIANTS)
    )
    sink = JsonLines(args.out)
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    shape = {"batch": args.batch, "samples": args.samples, "card": card, "weights": weights}
    print(json.dumps({"run": shape, "torch": torch.__version__}), flush=True)

    def emit(row: dict[str, Any]) -> None:
        sink.write(row)
        dev = row.get("replay_us")
        prec = row.get("precision") or {}
        print(
            f"{row['kind']:>10} {row['dtype']:>8} {json.dumps(row.get('options', {})):<44}"
            f" p50 {row.get('p50_us', '-'):>8} p99 {row.get('p99_us', '-'):>8}"
            f" replay {dev if dev is not None else '-':>8}"
            f" eager x{row.get('speedup_p50', '-')}"
            f" same {prec.get('same_pick', '-')} regret99 {round(prec.get('regret_p99', -1), 4)}"
            f" {row.get('error', '')}",
            file=sys.stderr,
            flush=True,
        )

    eager = build_engine(
        agent, kind="eager", batch=args.batch, samples=args.samples, device=args.device
    )
    for _ in range(5):
        eager.decide(obs)
    base = host_latency(eager, obs, args.iters, args.max_seconds)
    emit({"kind": "eager", "dtype": "float32", "p50_us": pct(base, 50), "p99_us": pct(base, 99)})
    eager_p50 = pct(base, 50)
    for kind, dtype, opts in variants:
        row: dict[str, Any] = {"kind": kind, "dtype": dtype, "options": opts}
        try:
            t0 = time.perf_counter()
            eng = build_engine(
                agent,
                kind=kind,
                batch=args.batch,
                samples=args.samples,
                dtype=dtype,
                device=args.device,
                **opts,
            )
            for _ in range(3):
                eng.decide(obs)
            row["build_s"] = round(time.perf_counter() - t0, 2)
            said = (
                "layout", "split_width", "pdl", "prefetch", "parts_dtype", "graph_copies",
                "graph_copies_refused",
            )  # fmt: skip
            row["info"] = {k: eng.info[k] for k in said if k in eng.info}
            lat = host_latency(eng, obs, args.iters, args.max_seconds)
            row.update(p50_us=pct(lat, 50), p99_us=pct(lat, 99), iters=len(lat))
            row["speedup_p50"] = round(eager_p50 / row["p50_us"], 2)
            row["replay_us"] = replay_us(eng, args.replays)
            if states is not None and len(states):
                rep = precision_report(eng, states)
                row["precision"] = {
                    k: rep[k] for k in ("same_pick", "regret_p99", "regret_max", "action_err_p99")
                }
                row["precision"]["ok"] = precision_ok(rep)
        except Exception as e:  # noqa: BLE001 - one variant failing must not stop the sweep
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        emit(row)
    base = host_latency(eager, obs, args.iters, args.max_seconds)
    emit(
        {"kind": "eager", "dtype": "float32", "p50_us": pct(base, 50), "p99_us": pct(base, 99),
         "note": "baseline again, after the sweep"}
    )  # fmt: skip
    sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
