"""Runtime numbers of issue 4, as JSON on stdout; each beside a baseline in the same run.

1. transitions/s actor -> learner with acks (ActorLink -> LearnerLink -> zarr commit -> ack),
   vs a naive synchronous REQ/REP round trip per transition.
2. action round trip over loopback minus engine time (p50/p99), vs the engine time itself.
3. achieved control rate and overruns on Hopper-v5 at its native rate with N=64, for the
   chosen engine and for the eager engine.

    python benchmarks/bench_runtime.py [--seconds 20] [--engine auto] [--samples 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from idql_runtime.agent import Agent
from idql_runtime.client import ActionClient
from idql_runtime.config import Config
from idql_runtime.engines import build_engine
from idql_runtime.online import SeqTable, batch_rows
from idql_runtime.ports import free_port_pair
from idql_runtime.replay import ReplayStore
from idql_runtime.transport import ActionServer, ActorLink, LearnerLink


def _ports() -> int:
    return free_port_pair()


def _transition(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "obs": rng.standard_normal(11).astype(np.float32),
        "action": rng.uniform(-1, 1, 3).astype(np.float32),
        "reward": np.float32(1.0),
        "next_obs": rng.standard_normal(11).astype(np.float32),
        "terminated": False,
        "truncated": False,
    }


def ingest_throughput(seconds: float) -> dict[str, float]:
    port = _ports()
    tmp = Path(tempfile.mkdtemp())
    store = ReplayStore.create(tmp / "s.zarr", 11, 3)
    link = LearnerLink(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}")
    stop = threading.Event()
    seq = SeqTable()

    def learner_loop() -> None:
        while not stop.is_set():
            batches = link.poll(timeout_ms=10)
            new = [b for b in batches if not seq.contains(b.actor_id, b.seq)]
            if not new:
                continue
            rows = [batch_rows(b.msg, b.actor_id) for b in new]
            merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
            for b in new:
                seq.add(b.actor_id, b.seq)
            n = store.append(merged, commit_meta={"seq_table": seq.to_json()})
            for b in new:
                link.ack(b.actor_id, b.seq, n)

    th = threading.Thread(target=learner_loop, daemon=True)
    th.start()
    actor = ActorLink(
        f"tcp://127.0.0.1:{port}",
        None,
        0,
        batch_size=256,
        buffer_capacity=200_000,
        max_inflight_batches=32,
    )
    rng = np.random.default_rng(0)
    pool = [_transition(rng) for _ in range(1024)]
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(256):
            actor.submit(pool[i % 1024], episode_id=0, policy_version=0)
            i += 1
        while actor.stats()["pending"] > 50_000:
            time.sleep(0.001)
    actor.flush(30.0)
    elapsed = time.perf_counter() - t0
    acked = actor.stats()["acked"]
    actor.close()
    stop.set()
    th.join(5)
    link.close()
    committed = len(store)
    store.close()

    # baseline: one synchronous REQ/REP round trip (+ commit) per transition
    ctx = zmq.Context()
    rep, req = ctx.socket(zmq.REP), ctx.socket(zmq.REQ)
    port2 = rep.bind_to_random_port("tcp://127.0.0.1")
    req.connect(f"tcp://127.0.0.1:{port2}")
    base_store = ReplayStore.create(tmp / "b.zarr", 11, 3)
    from idql_runtime.protocol import decode, encode, make_transitions

    def rep_loop() -> None:
        while True:
            msg = decode(rep.recv())
            if msg["type"] != "transitions":
                rep.send(b"bye")
                return
            base_store.append(batch_rows(msg, 0))
            rep.send(b"ok")

    th2 = threading.Thread(target=rep_loop, daemon=True)
    th2.start()
    n_base, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min(seconds, 5.0):
        tr = pool[n_base % 1024]
        arrays = {
            k: np.asarray(v).reshape(1, -1).squeeze(-1) if np.ndim(v) == 0 else np.asarray(v)[None]
            for k, v in tr.items()
        }
        req.send(encode(make_transitions(0, n_base, [0], 0, arrays)))
        req.recv()
        n_base += 1
    base_elapsed = time.perf_counter() - t0
    req.send(encode({"v": 1, "type": "health"}))
    req.recv()
    th2.join(5)
    ctx.destroy(linger=0)
    base_store.close()
    rate, base_rate = acked / elapsed, n_base / base_elapsed
    return {
        "acked_transitions": acked,
        "committed": committed,
        "transitions_per_s": rate,
        "baseline_reqrep_per_transition_per_s": base_rate,
        "speedup_vs_baseline": rate / base_rate,
    }


def _agent(seed: int = 0) -> Agent:
    torch.manual_seed(seed)
    return Agent(Config(), 11, 3)  # full v2 sizes, Hopper dims, random weights


def action_round_trip(engine_kind: str, samples: int, n: int = 400) -> dict[str, float]:
    agent = _agent()
    engine = build_engine(agent, kind=engine_kind, batch=1, samples=samples)
    engine_s: list[float] = []

    def decide_batch(obs: np.ndarray) -> tuple[np.ndarray, int]:
        t0 = time.perf_counter()
        a = engine.decide(obs.astype(np.float32))
        engine_s.append(time.perf_counter() - t0)
        return a, 0

    port = _ports()
    server = ActionServer(
        f"tcp://127.0.0.1:{port}", decide_batch, obs_dim=11, max_batch=1, batch_window_s=0.0
    )
    # the server (and so the engine) runs on the main thread, as in `idql-serve`: torch's
    # OpenMP kernels run ~2x slower from a worker thread; the client runs on a thread
    stop = threading.Event()
    rtt: list[float] = []

    def client_loop() -> None:
        client = ActionClient(f"tcp://127.0.0.1:{port}", timeout_s=5.0)
        obs = np.zeros(11, np.float32)
        for _ in range(20):
            client.act(obs)
        engine_s.clear()
        for _ in range(n):
            t0 = time.perf_counter()
            client.act(obs)
            rtt.append(time.perf_counter() - t0)
        client.close()
        stop.set()

    th = threading.Thread(target=client_loop, daemon=True)
    th.start()
    server.serve_forever(stop, 0.01)
    th.join(5)
    server.close()
    rtt_us, eng_us = np.asarray(rtt) * 1e6, np.asarray(engine_s[-n:]) * 1e6
    overhead = rtt_us - eng_us
    return {
        "engine": engine.name,
        "samples": samples,
        "overhead_us_p50": float(np.percentile(overhead, 50)),
        "overhead_us_p99": float(np.percentile(overhead, 99)),
        "engine_us_p50": float(np.percentile(eng_us, 50)),
        "engine_us_p99": float(np.percentile(eng_us, 99)),
        "round_trip_us_p50": float(np.percentile(rtt_us, 50)),
    }


def control_rate(engine_kind: str, samples: int, seconds: float) -> dict[str, object]:
    from idql_runtime.actor_runtime import Actor

    agent = _agent()
    engine = build_engine(agent, kind=engine_kind, batch=1, samples=samples)
    act = Actor(agent, engine, "Hopper-v5", status_interval_s=1e9)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        act.run(max_seconds=seconds)
    s = act.status()
    act.close()
    return {
        "engine": engine.name,
        "samples": samples,
        "rate_hz_target": s["rate_hz_target"],
        "rate_hz_achieved": s["rate_hz_achieved"],
        "ticks": act.rate.ticks,
        "overruns": s["overruns"],
        "missed_ticks": s["missed_ticks"],
        "decision_ms_p50": s.get("latency_ms_p50"),
        "decision_ms_p99": s.get("latency_ms_p99"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0, help="per control-rate run")
    p.add_argument("--engine", default="auto", help="engine for the rate and round-trip runs")
    p.add_argument("--samples", type=int, default=64, help="N candidates")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": a.threads,
        "ingest": ingest_throughput(min(a.seconds, 10.0)),
        "action_round_trip": [
            action_round_trip(a.engine, a.samples),
            action_round_trip("eager", a.samples),
        ],
        "control_rate_hopper_native": [
            control_rate(a.engine, a.samples, a.seconds),
            control_rate("eager", a.samples, a.seconds),
        ],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
