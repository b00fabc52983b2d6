"""Crash safety of the replay store with real processes (reliability.md #1, #15).

A writer process appends deterministic rows in a loop and prints the committed count after
every append; the test SIGKILLs it at random moments. After each kill the store must
reopen with every printed row (and at most the one append in flight), with each row equal
to the value the writer wrote for that index: no fill values, no half rows. A concurrent
reader must see a count that only grows and never a row that differs from the generator.

Run as a script, this file is the writer or the reader process:
    python test_replay_crash.py writer STORE
    python test_replay_crash.py reader STORE SECONDS [MIN_COMMITS MAX_SECONDS]
(the reader reads for SECONDS, then on until it has seen MIN_COMMITS commits or
MAX_SECONDS have passed: a slow or loaded machine commits less often, not less safely)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from idql_runtime.replay import FIELDS, ReplaySampler, ReplayStore

OBS_DIM, ACT_DIM, CHUNK_ROWS = 5, 2, 64
MAX_BATCH = 150
REPO_ROOT = Path(__file__).resolve().parents[1]


def batch_size_at(row: int) -> int:
    """Deterministic batch size for the append starting at ``row`` (1..MAX_BATCH), so that
    appends straddle chunk boundaries in every possible way."""
    return 1 + (row * 7919) % MAX_BATCH


def expected_rows(start: int, stop: int) -> dict[str, np.ndarray]:
    """The value of every field for rows [start, stop). Floats are exact binary fractions,
    so equality checks are exact; obs[:, 0] == row index identifies a row."""
    i = np.arange(start, stop, dtype=np.int64)
    obs = (i[:, None] + np.arange(OBS_DIM) / 8.0).astype(np.float32)
    return {
        "obs": obs,
        "action": ((i[:, None] % 13) / 4.0 - np.arange(ACT_DIM)).astype(np.float32),
        "reward": ((i % 101) * 0.25).astype(np.float32),
        "next_obs": obs + np.float32(1.0),
        "terminated": i % 23 == 22,
        "truncated": i % 61 == 60,
        "actor_id": (i % 7).astype(np.int32),
        "policy_version": i // 10,
    }


def expected_episode_fields(n: int) -> tuple[np.ndarray, np.ndarray]:
    """episode_id per row (episodes ended before it) and the exclusive episode ends."""
    rows = expected_rows(0, n)
    done = rows["terminated"] | rows["truncated"]
    return np.cumsum(done) - done, np.flatnonzero(done) + 1


def assert_store_matches_generator(store: ReplayStore) -> None:
    n = len(store)
    got = store.read(0, n)
    want = expected_rows(0, n)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=f"field {k}")
    episode_id, ends = expected_episode_fields(n)
    np.testing.assert_array_equal(got["episode_id"], episode_id)
    np.testing.assert_array_equal(store.episode_ends(), ends)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


# --------------------------------------------------------------------------- processes
def writer_main(path: str) -> None:
    store = ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=CHUNK_ROWS, exist_ok=True)
    print(f"ready {len(store)}", flush=True)
    while True:
        n = len(store)
        stop = n + batch_size_at(n)
        # commit_meta rides in the same atomic commit (the learner keeps its dedup table there)
        store.append(expected_rows(n, stop), commit_meta={"rows": stop})
        print(len(store), flush=True)


def reader_main(
    path: str, seconds: float, min_commits: int = 0, max_seconds: float | None = None
) -> None:
    store = ReplayStore.open(path, "r")
    sampler = ReplaySampler(store, seed=1)
    rng = np.random.default_rng(0)
    prev, counts, errors, checked = len(store), [len(store)], [], 0
    start = time.monotonic()
    deadline, last = start + seconds, start + max(seconds, max_seconds or 0.0)

    def reading() -> bool:
        now = time.monotonic()
        return now < deadline or (len(counts) < min_commits and now < last)

    while reading() and len(errors) < 5:
        n = store.refresh()
        if n and store.commit_meta.get("rows") != n:
            errors.append(f"commit_meta {store.commit_meta} does not match the {n} rows")
        if n < prev:
            errors.append(f"committed count went back from {prev} to {n}")
        if n > prev:
            counts.append(n)
            got = store.read(prev, n)
            want = expected_rows(prev, n)
            for k, v in want.items():
                if not np.array_equal(got[k], v):
                    errors.append(f"rows [{prev}, {n}) field {k} differ from the generator")
            checked += n - prev
            prev = n
        sampler.refresh()
        if len(sampler):
            batch = sampler.sample(64)
            rows = batch["obs"][:, 0].astype(np.int64)
            if rows.max() >= len(sampler):
                errors.append("sampled a row past the commit counter")
            for k, v in expected_rows(0, int(rows.max()) + 1).items():
                if not np.array_equal(batch[k], v[rows]):
                    errors.append(f"sampled rows of field {k} differ from the generator")
        if n:
            old = rng.integers(0, n, size=16)
            for r in old:
                got = store.read(int(r), int(r) + 1)
                if not np.array_equal(got["obs"], expected_rows(int(r), int(r) + 1)["obs"]):
                    errors.append(f"row {r} changed after it was committed")
        time.sleep(0.002)
    print(json.dumps({"counts": counts, "checked_rows": checked, "errors": errors}), flush=True)


# --------------------------------------------------------------------------- tests
def test_sigkill_during_appends_never_loses_or_exposes_rows(tmp_path):
    """25 SIGKILLs at random moments of a durable writer (about 30 s in all)."""
    path = tmp_path / "crash.zarr"
    rng = np.random.default_rng(1234)
    last_len = 0
    progressed = 0
    for cycle in range(25):
        proc = _spawn("writer", str(path))
        ready = proc.stdout.readline()
        assert ready.startswith("ready"), proc.stderr.read()
        assert int(ready.split()[1]) == last_len
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        out, _err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        printed = [int(x) for x in out.split()] or [last_len]
        acknowledged = printed[-1]

        store = ReplayStore.open(path, "a")  # a stale lock from the dead writer must not block
        n = len(store)
        # every acknowledged row is there; at most the one append in flight is extra
        assert acknowledged <= n <= acknowledged + MAX_BATCH, (cycle, acknowledged, n)
        assert n == 0 or store.commit_meta == {"rows": n}  # committed together with the rows
        assert not list(path.rglob("*.partial"))
        for name in FIELDS:
            assert store._arrays[name].shape[0] == n, f"{name} not truncated to the counter"
        assert_store_matches_generator(store)
        store.close()
        progressed += n > last_len
        last_len = n
    assert progressed >= 15, "the writer should make progress in most cycles"
    # and appends continue normally after the last kill
    store = ReplayStore.open(path, "a")
    store.append(expected_rows(last_len, last_len + 10))
    assert_store_matches_generator(store)
    store.close()


def test_concurrent_reader_sees_only_growing_committed_rows(tmp_path):
    path = tmp_path / "shared.zarr"
    ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=CHUNK_ROWS).close()
    writer = _spawn("writer", str(path))
    assert writer.stdout.readline().startswith("ready")
    reader = _spawn("reader", str(path), "4", "12", "40")  # 4 s, on to 12 commits (40 s)
    out, err = reader.communicate(timeout=90)
    writer.send_signal(signal.SIGKILL)
    writer_out, _ = writer.communicate(timeout=30)
    assert reader.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["errors"] == []
    counts = report["counts"]
    assert counts == sorted(counts)
    assert len(counts) >= 10, f"reader saw too few commits to prove anything: {counts}"
    assert report["checked_rows"] > 1000
    final = ReplayStore.open(path, "a")
    assert len(final) >= int(writer_out.split()[-1])
    assert_store_matches_generator(final)
    final.close()


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer_main(sys.argv[2])
    elif sys.argv[1] == "reader":
        extra = sys.argv[4:6]
        reader_main(
            sys.argv[2],
            float(sys.argv[3]),
            int(extra[0]) if extra else 0,
            float(extra[1]) if len(extra) > 1 else None,
        )
    else:
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
