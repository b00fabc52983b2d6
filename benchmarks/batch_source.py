"""Host time per training batch: host batches (numpy draw + gather + reward transform +
clip + tensors, copied to the device) against device batches (one draw and one gather
per field on the device), in the same run. JSON on stdout.

On a CPU both are host work. On a GPU the device source's host time is its kernel
launches (until the launch queue is full, then the GPU's pace), while the host path also
waits at each pageable copy for the stream to drain. Random HalfCheetah-sized rows
(obs 17, act 6), batch 512.

    python benchmarks/batch_source.py [--device cuda] [--rows 1000000] [--iters 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from idql_runtime.batches import DeviceBatches, prepare_batch
from idql_runtime.replay import ReplaySampler, ReplayStore
from idql_runtime.trainer import fit_reward_transform


def _store(path: Path, rows: int) -> ReplayStore:
    rng = np.random.default_rng(0)
    store = ReplayStore.create(path, obs_dim=17, act_dim=6)
    step = 100_000
    for s in range(0, rows, step):
        n = min(step, rows - s)
        trunc = np.zeros(n, bool)
        trunc[999::1000] = True
        store.append(
            {
                "obs": rng.standard_normal((n, 17), np.float32),
                "action": rng.uniform(-1, 1, (n, 6)).astype(np.float32),
                "reward": rng.standard_normal(n).astype(np.float32),
                "next_obs": rng.standard_normal((n, 17), np.float32),
                "terminated": np.zeros(n, bool),
                "truncated": trunc,
            }
        )
    return store


def _time(fn, iters: int, sync) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    sync()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp) / "rows.zarr", a.rows)
        train, _ = ReplaySampler(store, seed=0).split(0.95, seed=0)
        transform = fit_reward_transform(store, "locomotion")
        t0 = time.perf_counter()
        db = DeviceBatches(
            train, transform, 1 - 1e-5, dev, torch.Generator(device=dev).manual_seed(0)
        )
        sync()
        build_s = time.perf_counter() - t0

        def host() -> None:
            prepare_batch(train.sample(a.batch), transform, 1 - 1e-5, dev)

        def device() -> None:
            db.sample(a.batch)

        rows = {}
        for name, fn in (("host", host), ("device", device)) * 2:  # alternate, keep the 2nd
            t = np.array(_time(fn, a.iters, sync)) * 1e6
            rows[name] = {
                "p50_us": round(float(np.percentile(t, 50)), 1),
                "p99_us": round(float(np.percentile(t, 99)), 1),
            }
        store.close()
    print(
        json.dumps(
            {
                "device": str(dev),
                "cpu_threads": a.threads,
                "rows": len(train),
                "batch": a.batch,
                "resident_mib": round(db.nbytes / 2**20, 1),
                "build_s": round(build_s, 2),
                "host_us_per_batch": rows,
                "host_over_device_p50": round(rows["host"]["p50_us"] / rows["device"]["p50_us"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
