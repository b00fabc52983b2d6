"""How long one step of the actor's precision re-check takes, against the control period.

An actor that fell back to float32 after a score-network update re-runs the precision
check in the idle time between ticks (``Actor.idle_work``), one ``PrecisionCheck.step()``
at a time, and only when the time left is at least twice the longest step so far. This
times every step of a check of the bf16 ``cpu`` engine (B = 1) on random v2 weights, for
each N, and reports the longest step, the work of one whole state (what one step was
before the check was split into units: the engine's decision, each float64 reverse step,
the critic and the metrics) and, beside them, the engine's own decision time measured in
the same run. Prints one JSON object per N.

    python benchmarks/recheck_units.py --samples 16,64 --states 16
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
    p.add_argument("--samples", default="16,64")
    p.add_argument("--states", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from idql_runtime.agent import Agent
    from idql_runtime.config import Config
    from idql_runtime.engines import build_engine
    from idql_runtime.engines.precision import PrecisionCheck

    torch.manual_seed(0)
    agent = Agent(Config(), 17, 6)
    states = np.random.default_rng(0).standard_normal((args.states, 17)).astype(np.float32)
    for n in (int(v) for v in args.samples.split(",")):
        eng = build_engine(agent, kind="cpu", batch=1, samples=n, dtype="bfloat16")
        for _ in range(5):
            eng.decide(states[:1])
        check = PrecisionCheck(eng, states)
        units = check.units_per_batch
        steps: list[float] = []
        done = False
        while not done:
            t0 = time.perf_counter()
            done = check.step()
            steps.append((time.perf_counter() - t0) * 1e3)
        per_state = np.asarray(steps).reshape(-1, units)
        decide = []
        for s in states:
            t0 = time.perf_counter()
            eng.decide(s[None])
            decide.append((time.perf_counter() - t0) * 1e3)
        longest = float(max(steps))
        whole = per_state.sum(axis=1)
        print(
            json.dumps(
                {
                    "samples": n,
                    "batch": 1,
                    "units_per_state": units,
                    "unit_ms_p50": round(float(np.median(steps)), 2),
                    "unit_ms_max": round(longest, 2),
                    "state_ms_p50": round(float(np.median(whole)), 2),
                    "state_ms_max": round(float(whole.max()), 2),
                    "decide_ms_p50": round(float(np.median(decide)), 2),
                    # idle_work runs a step only with 2 x the longest step left before the
                    # tick: the highest control rate at which it still runs, given that
                    # the decision itself takes decide_ms of each period
                    "max_rate_hz_units": round(1e3 / (np.median(decide) + 2 * longest), 1),
                    "max_rate_hz_whole_state": round(
                        1e3 / (np.median(decide) + 2 * float(whole.max())), 1
                    ),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
