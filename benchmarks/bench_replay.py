"""Replay store benchmark; prints one JSON object.

    python benchmarks/bench_replay.py [--rows 10000000] [--dir /tmp] [--samples 2000]

Measures, on Hopper-size rows (obs 11, action 3):
  - append throughput (transitions/s) for 256- and 4096-row batches, durable (fsync
    before each commit) and not;
  - the time to fill the store to ``--rows`` and to build the sampler mirror;
  - latency p50/p99 of a sampled batch of 512 from the mirror, beside a naive baseline
    that reads each batch's random rows from zarr (``oindex``), in the same run;
  - resident memory (psutil RSS) of this process at each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from idql_runtime.replay import FIELDS, ReplaySampler, ReplayStore, mirror_bytes_per_row

OBS_DIM, ACT_DIM = 11, 3


def make_batch(rng: np.random.Generator, n: int, first_row: int) -> dict[str, np.ndarray]:
    obs = rng.standard_normal((n, OBS_DIM), dtype=np.float32)
    i = np.arange(first_row, first_row + n)
    return {
        "obs": obs,
        "action": rng.uniform(-1, 1, (n, ACT_DIM)).astype(np.float32),
        "reward": rng.standard_normal(n, dtype=np.float32),
        "next_obs": obs,
        "terminated": i % 1000 == 999,
        "truncated": np.zeros(n, bool),
        "actor_id": np.zeros(n, np.int32),
        "policy_version": i // 100_000,
    }


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def percentiles_ms(times: list[float]) -> dict[str, float]:
    a = np.array(times) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "n": len(a),
    }


def append_throughput(root: Path, batch: int, total_rows: int, durable: bool) -> dict[str, float]:
    path = root / f"append-{batch}-{durable}.zarr"
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, batch, k * batch) for k in range(total_rows // batch)]
    store = ReplayStore.create(path, OBS_DIM, ACT_DIM, durable=durable)
    lat = []
    t0 = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        store.append(b)
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    store.close()
    shutil.rmtree(path)
    return {
        "batch_rows": batch,
        "durable": durable,
        "rows": len(batches) * batch,
        "transitions_per_s": len(batches) * batch / elapsed,
        "append_latency": percentiles_ms(lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows in the sampling store")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--samples", type=int, default=2000, help="mirror batches to time")
    ap.add_argument("--naive-samples", type=int, default=30, help="naive zarr batches to time")
    ap.add_argument("--batch", type=int, default=512, help="sampled batch size")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-replay-", dir=args.dir))
    out: dict = {
        "rows": args.rows,
        "obs_dim": OBS_DIM,
        "act_dim": ACT_DIM,
        "bytes_per_row_mirror": mirror_bytes_per_row(OBS_DIM, ACT_DIM),
        "cpu_count": os.cpu_count(),
        "rss_mb": {"start": rss_mb()},
    }
    try:
        out["append"] = [
            append_throughput(root, 256, 256 * 400, durable=True),
            append_throughput(root, 256, 256 * 400, durable=False),
            append_throughput(root, 4096, 4096 * 100, durable=True),
            append_throughput(root, 4096, 4096 * 100, durable=False),
        ]
        out["rss_mb"]["after_append_bench"] = rss_mb()

        path = root / "big.zarr"
        store = ReplayStore.create(path, OBS_DIM, ACT_DIM, durable=False)
        rng = np.random.default_rng(1)
        fill_batch = 65536
        t0 = time.perf_counter()
        while len(store) < args.rows:
            n = min(fill_batch, args.rows - len(store))
            store.append(make_batch(rng, n, len(store)))
        fill_s = time.perf_counter() - t0
        out["fill"] = {
            "rows": len(store),
            "seconds": fill_s,
            "transitions_per_s": len(store) / fill_s,
        }
        store.close()
        out["rss_mb"]["after_fill"] = rss_mb()

        reader = ReplayStore.open(path, "r")
        t0 = time.perf_counter()
        sampler = ReplaySampler(reader, seed=0, cache_dir=root)
        out["mirror"] = {
            "build_seconds": time.perf_counter() - t0,
            "file_backed": sampler.file_backed,
            "bytes": len(sampler) * mirror_bytes_per_row(OBS_DIM, ACT_DIM),
        }
        out["rss_mb"]["after_mirror_build"] = rss_mb()
        times = []
        for _ in range(args.samples):
            t = time.perf_counter()
            sampler.sample(args.batch)
            times.append(time.perf_counter() - t)
        out["sample_mirror"] = {"batch": args.batch, **percentiles_ms(times)}
        out["rss_mb"]["after_mirror_sampling"] = rss_mb()
        # refresh with nothing new must be cheap (the learner calls it every step)
        t0 = time.perf_counter()
        for _ in range(100):
            sampler.refresh()
        out["refresh_noop_ms"] = (time.perf_counter() - t0) * 10

        # naive baseline: a zarr read of the batch's random rows, every batch
        arrays = {k: reader._arrays[k] for k in FIELDS}
        nrng = np.random.default_rng(0)
        times = []
        for _ in range(args.naive_samples):
            t = time.perf_counter()
            idx = np.sort(nrng.integers(0, len(reader), args.batch))
            {k: a.oindex[idx] for k, a in arrays.items()}
            times.append(time.perf_counter() - t)
        out["sample_naive_zarr"] = {"batch": args.batch, **percentiles_ms(times)}
        out["rss_mb"]["after_naive_sampling"] = rss_mb()
        out["sample_speedup_p50"] = (
            out["sample_naive_zarr"]["p50_ms"] / out["sample_mirror"]["p50_ms"]
        )
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sampler.close()
        reader.close()
        out["store_bytes_on_disk"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
