"""``idql-demo``: the whole pipeline on embedded defaults, bounded in time.

1. ``idql-collect``: a small D4RL-recipe medium-replay dataset on Hopper-v5 (ARS).
2. ``idql-learner --dataset``: brief offline pretraining with configs/demo.yaml.
3. ``idql-learner --pretrained`` plus two ``idql-actor --learner`` processes over
   loopback ZeroMQ for ``--seconds``, printing episode returns and policy versions.
Everything lands under ``--out`` (local zarr stores, checkpoints, logs). CPU engine.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from idql_runtime.ports import free_port_pair

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _pump(name: str, proc: subprocess.Popen[str], out: queue.Queue[tuple[str, str]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.put((name, line.rstrip("\n")))


def _describe(name: str, line: str) -> str | None:
    """Human lines for the interesting JSON events; None to stay quiet."""
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        return None
    if "episode" in msg:
        e = msg["episode"]
        return f"[{name}] episode {e['index']:3d}  return {e['return']:8.1f}  policy v{e['policy_version']}"
    if "actor" in msg:
        a = msg["actor"]
        return (
            f"[{name}] {a['rate_hz_achieved']:.0f}/{a['rate_hz_target']:.0f} Hz, "
            f"decision p50 {a.get('latency_ms_p50', 0):.2f} ms p99 {a.get('latency_ms_p99', 0):.2f} ms, "
            f"overruns {a['overruns']}, policy v{a['policy_version']}, "
            f"acked {a.get('link', {}).get('acked', 0)}"
        )
    if "learner" in msg:
        s = msg["learner"]
        return (
            f"[{name}] rows {s['rows']}  updates {s['updates']}  policy v{s['policy_version']}  "
            f"duplicates {s['duplicates']}"
        )
    if "actor_final" in msg:
        a = msg["actor_final"]
        recent = a.get("recent_returns") or [float("nan")]
        return (
            f"[{name}] final: {a['episodes']} episodes, {a['steps']} steps at "
            f"{a['rate_hz_achieved']:.1f}/{a['rate_hz_target']:.0f} Hz, policy "
            f"v{a['policy_version']}, late decisions {a['overruns']} (fallback held), "
            f"missed ticks {a['missed_ticks']}, decision p50 {a.get('latency_ms_p50', 0):.2f} "
            f"ms p99 {a.get('latency_ms_p99', 0):.2f} ms, last {len(recent)} returns "
            f"{min(recent):.0f}-{max(recent):.0f} (mean {sum(recent) / len(recent):.0f}), "
            f"stop: {a.get('stop_reason', '')}"
        )
    if "learner_final" in msg:
        s = msg["learner_final"]
        gaps = {k: v["gaps"] for k, v in s.get("actors", {}).items()}
        return (
            f"[{name}] final: {s['rows']} rows, {s['updates']} updates, policy "
            f"v{s['policy_version']}, duplicates {s['duplicates']}, roll-backs "
            f"{s['rollbacks']}, gaps per actor {gaps}, store healthy {s['store_healthy']}"
        )
    return None


def actor_rate_hz(ckpt: Path, env_id: str) -> tuple[float, float, float]:
    """(rate, the env's own rate, decision p90 in ms): the actors' control rate is the env's
    own unless one decision on the pretrained weights (timed here on one thread, the
    actors' engine and setting) would take more than a quarter of its period, then 1 / (4 x
    p90). On a 2-core AVX2 Zen 3 (2026-12-03) two actors at Hopper's 125 Hz beside the
    learner held 39 % of their ticks late and one stopped at the overrun limit. The rate
    is wall-clock pacing only: the simulated dynamics (the env's dt) do not change."""
    import numpy as np
    import torch

    from idql_runtime.checkpoint import load_checkpoint, restore_agent
    from idql_runtime.cli.bench import _time_calls
    from idql_runtime.engines import build_engine
    from idql_runtime.envs import control_rate_hz, gym_make

    env = gym_make(env_id)
    own = control_rate_hz(env)  # 0: the env states none (the actor then runs unpaced)
    env.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        agent = restore_agent(load_checkpoint(ckpt, with_train_state=False), optimisers=False)
        engine = build_engine(agent, kind="cpu", batch=1, samples=agent.cfg.policy.samples)
        obs = np.zeros((1, agent.obs_dim), np.float32)
        _time_calls(lambda: engine.decide(obs), 5)  # warm-up
        p90 = float(np.percentile(_time_calls(lambda: engine.decide(obs), 40), 90)) / 1e6
    finally:
        torch.set_num_threads(threads)
    cap = 1.0 / (4.0 * p90)
    return (min(own, cap) if own else cap), own, 1e3 * p90


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="idql-demo",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="where data, checkpoints and logs go")
    p.add_argument("--env", default="Hopper-v5", help="gymnasium MuJoCo task")
    p.add_argument("--dataset-size", type=int, default=20_000, help="transitions in the dataset")
    p.add_argument(
        "--ars-iters", type=int, default=15, help="ARS iterations for the behaviour policy"
    )
    p.add_argument("--pretrain-iterations", type=int, default=1500, help="offline iterations")
    p.add_argument("--seconds", type=float, default=60.0, help="online phase duration")
    p.add_argument("--actors", type=int, default=2, help="actor processes")
    p.add_argument("--seed", type=int, default=0, help="seed")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    t_start = time.monotonic()

    print(f"== 1/3 dataset: {args.env} medium-replay, {args.dataset_size} transitions", flush=True)
    from idql_runtime.collect import CollectConfig, run_collect

    summary = run_collect(
        CollectConfig(
            env=args.env,
            out=str(out / "data"),
            size=args.dataset_size,
            seed=args.seed,
            datasets="medium-replay",
            ars_iters=args.ars_iters,
            ref_episodes=5,
            eval_episodes=2,
        ),
        progress=True,
    )
    dataset = summary["datasets"]["medium-replay"]
    print(
        f"   {dataset}  (ref returns: random {summary['refs']['ref_min_score']:.1f}, "
        f"expert {summary['refs']['ref_max_score']:.1f})",
        flush=True,
    )

    print(
        f"== 2/3 offline pretraining: {args.pretrain_iterations} iterations (configs/demo.yaml)",
        flush=True,
    )
    pre_dir = out / "pretrain"
    cmd = [
        py,
        "-m",
        "learner",
        "--dataset",
        dataset,
        "--config",
        str(CONFIGS / "demo.yaml"),
        "--run-dir",
        str(pre_dir),
        "--set",
        f"train.iterations={args.pretrain_iterations}",
        "--set",
        f"train.seed={args.seed}",
        "--resume",
    ]
    subprocess.run(cmd, check=True, env=env)
    ckpt = pre_dir / "checkpoints"

    port = free_port_pair()
    ingest, weights = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    rate, own_rate, p90_ms = actor_rate_hz(ckpt, args.env)
    print(
        f"== 3/3 online: learner on {ingest} (weights {weights}) + {args.actors} actors at "
        f"{rate:.0f} Hz, {args.seconds:.0f} s",
        flush=True,
    )
    if not own_rate or rate < own_rate:
        instead = f"{args.env}'s own {own_rate:.0f} Hz" if own_rate else "unpaced (no env rate)"
        print(
            f"   (decision p90 {p90_ms:.1f} ms on this machine: actors paced at {rate:.0f} Hz, "
            f"not {instead}, so that a decision fits a quarter of a tick; the simulation "
            "is the same, it runs slower)",
            flush=True,
        )
    lines: queue.Queue[tuple[str, str]] = queue.Queue()
    learner = subprocess.Popen(
        [
            py,
            "-m",
            "learner",
            "--pretrained",
            str(ckpt),
            "--replay",
            str(out / "online.zarr"),
            "--offline",
            dataset,
            "--bind-ingest",
            ingest,
            "--bind-weights",
            weights,
            "--run-dir",
            str(out / "online"),
            "--max-seconds",
            str(args.seconds + 15),
            # The actors' control loops come first on a shared machine: the learner runs
            # niced, on one OpenMP thread as each actor does (measured on 2 cores: at equal
            # priority with 2 threads the actors missed 31 % of their decision deadlines)
            "--nice",
            "10",
            "--set",
            "train.threads=1",
        ],
        stdout=subprocess.PIPE,
        stderr=open(out / "learner.log", "w"),
        text=True,
        env=env,
    )
    procs = {"learner": learner}
    time.sleep(1.0)
    for i in range(args.actors):
        procs[f"actor{i}"] = subprocess.Popen(
            [
                py,
                "-m",
                "actor",
                "--checkpoint",
                str(ckpt),
                "--env",
                args.env,
                "--learner",
                ingest,
                "--weights",
                weights,
                "--actor-id",
                str(i),
                "--seed",
                str(args.seed + i),
                "--max-seconds",
                str(args.seconds),
                "--engine",
                "cpu",
                "--threads",
                "1",
                "--rate-hz",
                f"{rate:.3f}",
            ],
            stdout=subprocess.PIPE,
            stderr=open(out / f"actor{i}.log", "w"),
            text=True,
            env=env,
        )
    for name, proc in procs.items():
        threading.Thread(target=_pump, args=(name, proc, lines), daemon=True).start()
    actors = [p for n, p in procs.items() if n != "learner"]
    while any(a.poll() is None for a in actors) or not lines.empty():
        try:
            name, line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        text = _describe(name, line)
        if text:
            print(text, flush=True)
    learner.terminate()
    try:
        learner.wait(timeout=30)
    except subprocess.TimeoutExpired:
        learner.kill()
    time.sleep(0.2)
    while not lines.empty():
        name, line = lines.get()
        text = _describe(name, line)
        if text:
            print(text, flush=True)
    codes = {n: p.returncode for n, p in procs.items()}
    print(
        f"== done in {time.monotonic() - t_start:.0f} s; exit codes {codes}; outputs in {out}",
        flush=True,
    )
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
