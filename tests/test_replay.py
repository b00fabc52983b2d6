"""Replay store and samplers: layout, schema checks, commit protocol, sampling."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from idql_runtime import replay
from idql_runtime.replay import (
    FIELDS,
    MixedSampler,
    ReplaySampler,
    ReplayStore,
    ReplayWriteError,
    SchemaError,
    StoreLockedError,
)

OBS_DIM, ACT_DIM = 4, 2


def rows(start: int, stop: int, *, done_every: int = 10, actor_id: int | None = None) -> dict:
    """Rows whose obs[:, 0] is the row index; an episode ends every ``done_every`` rows
    (terminated on odd episodes, truncated on even ones)."""
    i = np.arange(start, stop)
    obs = np.repeat(i[:, None], OBS_DIM, axis=1).astype(np.float32)
    end = (i % done_every) == done_every - 1
    odd = (i // done_every) % 2 == 1
    batch = {
        "obs": obs,
        "action": np.full((len(i), ACT_DIM), 0.5, np.float32),
        "reward": i.astype(np.float32),
        "next_obs": obs + 1,
        "terminated": end & odd,
        "truncated": end & ~odd,
    }
    if actor_id is not None:
        batch["actor_id"] = np.full(len(i), actor_id, np.int32)
    return batch


@pytest.fixture
def store(tmp_path):
    s = ReplayStore.create(tmp_path / "r.zarr", OBS_DIM, ACT_DIM, chunk_rows=16)
    yield s
    s.close()


def test_layout_is_diffusion_policy_replay_buffer_plus_commit(store):
    store.append(rows(0, 25))
    root = zarr.open_group(store.path, mode="r")
    assert sorted(root["data"].array_keys()) == sorted(FIELDS)
    # the writer grows arrays in whole chunks; readers of the raw layout use the counter
    assert root["meta/commit"][:].tolist() == [25, 2]
    np.testing.assert_array_equal(root["meta/episode_ends"][:2], [10, 20])
    store.close()
    root = zarr.open_group(store.path, mode="r")
    assert root["data/obs"].shape == (25, OBS_DIM)  # close truncates to the committed rows
    np.testing.assert_array_equal(root["data/reward"][:], np.arange(25))


def test_append_read_roundtrip_and_episode_ends(store):
    assert store.append(rows(0, 7)) == 7
    assert store.append(rows(7, 33)) == 33
    got = store.read(0, 33)
    want = rows(0, 33)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)
    # rows 9 (truncated), 19 (terminated), 29 (truncated) end episodes -> exclusive ends
    np.testing.assert_array_equal(store.episode_ends(), [10, 20, 30])
    np.testing.assert_array_equal(got["episode_id"], np.arange(33) // 10)
    np.testing.assert_array_equal(got["actor_id"], -np.ones(33))  # default: offline data
    np.testing.assert_array_equal(got["policy_version"], -np.ones(33))
    assert got["terminated"].dtype == np.bool_ and got["policy_version"].dtype == np.int64
    with pytest.raises(IndexError, match="committed"):
        store.read(30, 34)


def test_reader_sees_only_commits_and_refreshes(store):
    store.append(rows(0, 5))
    reader = ReplayStore.open(store.path, "r")
    assert len(reader) == 5
    store.append(rows(5, 40))
    assert len(reader) == 5  # until it re-reads the counter
    with pytest.raises(IndexError):
        reader.read(0, 6)
    assert reader.refresh() == 40
    np.testing.assert_array_equal(reader.read(30, 40)["reward"], np.arange(30, 40))
    np.testing.assert_array_equal(reader.episode_ends(), [10, 20, 30, 40])
    with pytest.raises(PermissionError):
        reader.append(rows(40, 41))
    reader.close()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.pop("reward"), "missing required key 'reward'"),
        (
            lambda b: b.update(obs=np.zeros((5, OBS_DIM + 1), np.float32)),
            "key 'obs': expected shape \\(R, 4\\)",
        ),
        (lambda b: b.update(action=np.zeros(5, np.float32)), "key 'action'"),
        (lambda b: b.update(reward=np.zeros(4, np.float32)), "key 'reward' has 4 rows"),
        (lambda b: b.update(bogus=np.zeros(5)), "unknown key 'bogus'"),
        (lambda b: b.update(terminated=np.array([0, 2, 0, 0, 0])), "key 'terminated'"),
        (
            lambda b: b.update(next_obs=np.full((5, OBS_DIM), np.nan, np.float32)),
            "key 'next_obs': non-finite",
        ),
        (lambda b: b.update(actor_id=np.array(["a"] * 5)), "key 'actor_id': dtype <U1"),
        (
            lambda b: b.update(episode_id=np.zeros(5, np.float64)),
            "key 'episode_id': expected int64",
        ),
    ],
)
def test_append_schema_errors_name_the_key(store, mutate, message):
    batch = rows(0, 5)
    mutate(batch)
    with pytest.raises(SchemaError, match=message):
        store.append(batch)
    assert len(store) == 0


def test_open_schema_errors_name_the_array(tmp_path):
    path = tmp_path / "bad.zarr"
    ReplayStore.create(path, OBS_DIM, ACT_DIM).close()
    root = zarr.open_group(path, mode="r+")
    del root["data/reward"]
    root["data"].create_array("reward", shape=(0,), dtype=np.float64)
    with pytest.raises(SchemaError, match="'data/reward': dtype float64"):
        ReplayStore.open(path)
    del root["data/reward"]
    with pytest.raises(SchemaError, match="'data/reward' is missing"):
        ReplayStore.open(path)
    with pytest.raises(SchemaError, match="not an idql replay store"):
        ReplayStore.open(tmp_path / "bad.zarr/data")


def test_open_rejects_arrays_shorter_than_the_counter(tmp_path):
    path = tmp_path / "short.zarr"
    with ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=8) as s:
        s.append(rows(0, 20))
    zarr.open_array(path, path="data/action", mode="r+").resize((12, ACT_DIM))
    with pytest.raises(SchemaError, match="'data/action' has 12 rows but 20 are committed"):
        ReplayStore.open(path, "a")


def test_writer_open_cleans_partials_and_truncates_uncommitted_rows(tmp_path):
    path = tmp_path / "r.zarr"
    with ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=8) as s:
        s.append(rows(0, 12))
    # what a writer killed mid-append leaves: longer arrays, a zarr temp file, a commit temp
    for name in FIELDS:
        a = zarr.open_array(path, path=f"data/{name}", mode="r+")
        a.resize((30, *a.shape[1:]))
        a[12:30] = a[0:18] if a.shape[0] else 0
    (path / f"data/obs/c/0.{uuid.uuid4().hex}.partial").write_bytes(b"junk")
    (path / "meta/commit/c/0.deadbeef.partial").write_bytes(b"\x01" * 16)
    reader = ReplayStore.open(path, "r")
    assert len(reader) == 12  # readers never look past the counter
    writer = ReplayStore.open(path, "a")
    assert not list(path.rglob("*.partial"))
    assert all(writer._arrays[k].shape[0] == 12 for k in FIELDS)
    writer.append(rows(12, 20))
    np.testing.assert_array_equal(writer.read(0, 20)["reward"], np.arange(20))
    writer.close()
    reader.close()


def test_second_writer_fails_clearly_first_keeps_working(store):
    with pytest.raises(StoreLockedError, match="already open for writing"):
        ReplayStore.open(store.path, "a")
    store.append(rows(0, 3))
    store.close()
    with ReplayStore.open(store.path, "a") as again:  # lock released on close
        assert len(again) == 3


def test_create_refuses_existing_and_checks_dims(tmp_path):
    path = tmp_path / "r.zarr"
    ReplayStore.create(path, OBS_DIM, ACT_DIM, attrs={"env_id": "Hopper-v5"}).close()
    with pytest.raises(FileExistsError):
        ReplayStore.create(path, OBS_DIM, ACT_DIM)
    with pytest.raises(SchemaError, match="obs_dim=4"):
        ReplayStore.create(path, OBS_DIM + 1, ACT_DIM, exist_ok=True)
    with ReplayStore.create(path, OBS_DIM, ACT_DIM, exist_ok=True, attrs={"seed": 3}) as s:
        assert s.attrs == {"env_id": "Hopper-v5", "seed": 3}
    assert not [p for p in tmp_path.iterdir() if p.name != "r.zarr"]  # no temp dirs left


def test_attrs_merge_persist_and_must_be_json(store):
    store.set_attrs({"env_id": "Hopper-v5", "ref_min_score": -20.5})
    store.set_attrs({"seed": 0})
    with pytest.raises(SchemaError, match="JSON"):
        store.set_attrs({"bad": object()})
    with ReplayStore.open(store.path) as r:
        assert r.attrs == {"env_id": "Hopper-v5", "ref_min_score": -20.5, "seed": 0}


def test_explicit_provenance_is_kept(store):
    b = rows(0, 4)
    b.update(
        actor_id=np.array([3, 3, 4, 4], np.int32),
        policy_version=np.array([7, 7, 8, 9]),
        episode_id=np.array([100, 100, 101, 101]),
    )
    store.append(b)
    got = store.read(0, 4, ["actor_id", "policy_version", "episode_id"])
    assert got["actor_id"].tolist() == [3, 3, 4, 4]
    assert got["policy_version"].tolist() == [7, 7, 8, 9]
    assert got["episode_id"].tolist() == [100, 100, 101, 101]


def test_commit_meta_is_committed_with_the_rows(store, monkeypatch):
    store.append(rows(0, 5), commit_meta={"seq": {"3": 1}})
    store.append(rows(5, 8))  # None keeps the last one
    reader = ReplayStore.open(store.path)
    assert (len(reader), reader.commit_meta) == (8, {"seq": {"3": 1}})
    monkeypatch.setattr(replay, "_write_commit_file", _raise_enospc)
    with pytest.raises(ReplayWriteError):
        store.append(rows(8, 9), commit_meta={"seq": {"3": 2}})
    assert store.commit_meta == {"seq": {"3": 1}}
    monkeypatch.undo()
    store.append(rows(8, 9), commit_meta={"seq": {"3": 2}})
    reader.refresh()
    assert (len(reader), reader.commit_meta) == (9, {"seq": {"3": 2}})
    with pytest.raises(SchemaError, match="commit_meta must be JSON"):
        store.append(rows(9, 10), commit_meta={"x": object()})
    reader.close()


def _raise_enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


# --------------------------------------------------------------------------- failures
class _Boom(Exception):
    pass


def test_injected_disk_full_keeps_committed_rows_and_recovers(store, monkeypatch):
    store.append(rows(0, 20))
    real_write = replay._Column.write
    calls = {"n": 0}

    async def failing_write(self, start, end, block):
        calls["n"] += 1
        if calls["n"] == 3:  # fail part-way: some arrays already hold the new rows
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_write(self, start, end, block)

    monkeypatch.setattr(replay._Column, "write", failing_write)
    with pytest.raises(ReplayWriteError) as info:
        store.append(rows(20, 50))
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert "20 committed rows are intact" in str(info.value)
    assert len(store) == 20
    with ReplayStore.open(store.path) as r:
        assert len(r) == 20
        np.testing.assert_array_equal(r.read(0, 20)["reward"], np.arange(20))
    monkeypatch.setattr(replay._Column, "write", real_write)
    assert store.append(rows(20, 50)) == 50  # space is back: the same append goes through
    np.testing.assert_array_equal(store.read(0, 50)["obs"][:, 0], np.arange(50))
    np.testing.assert_array_equal(store.episode_ends(), [10, 20, 30, 40, 50])


def test_injected_counter_write_failure(store, monkeypatch):
    store.append(rows(0, 10))
    real = replay._write_commit_file

    def fail(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(replay, "_write_commit_file", fail)
    with pytest.raises(ReplayWriteError, match="not committed"):
        store.append(rows(10, 15))
    assert len(store) == 10
    monkeypatch.setattr(replay, "_write_commit_file", real)
    store.append(rows(10, 15))
    np.testing.assert_array_equal(store.read(0, 15)["reward"], np.arange(15))


def test_fsync_failing_after_the_commit_rename_reports_the_append_committed(store, monkeypatch):
    # The record's rename is the commit; if only the directory fsync after it fails, the
    # append is in the store, and a caller that retried it would store its rows twice.
    store.append(rows(0, 10), commit_meta={"seq": 1})
    commit_dir = replay.commit_record_path(store.path).parent
    real = replay._fsync_path

    def eio_on_commit_dir(path, directory=False):
        if directory and Path(path) == commit_dir:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, directory)

    monkeypatch.setattr(replay, "_fsync_path", eio_on_commit_dir)
    with pytest.raises(ReplayWriteError, match="was committed .15 rows now.") as info:
        store.append(rows(10, 15), commit_meta={"seq": 2})
    assert info.value.committed and info.value.errno == errno.EIO
    assert (len(store), store.commit_meta) == (15, {"seq": 2})
    monkeypatch.undo()
    assert store.append(rows(15, 20)) == 20  # the writer's state matches the record
    with ReplayStore.open(store.path) as r:
        np.testing.assert_array_equal(r.read(0, 20)["reward"], np.arange(20))
    with pytest.raises(ReplayWriteError) as info:  # a failure before the rename: not committed
        monkeypatch.setattr(replay, "_write_commit_file", _raise_enospc)
        store.append(rows(20, 25))
    assert not info.value.committed and len(store) == 20


def _full_of(batch: dict, value: float) -> dict:
    """``batch`` with every float field set to ``value`` (rows that must never be read)."""
    return {k: np.full_like(v, value) if v.dtype.kind == "f" else v for k, v in batch.items()}


def test_failed_append_returns_only_after_every_column_write_ended(store, monkeypatch):
    # One column hits ENOSPC while the others are still writing (a slow disk). If append
    # raised at once, those writes would land after the next append had committed and
    # overwrite its rows with the rows of the append that was reported not committed.
    store.append(rows(0, 3))
    real_write = replay._Column.write
    state = {"fail": True, "running": 0}

    async def write(self, start, end, block):
        state["running"] += 1
        try:
            if state["fail"]:
                if self.arr.path == "data/truncated":
                    raise OSError(errno.ENOSPC, "No space left on device")
                await asyncio.sleep(0.3)
            return await real_write(self, start, end, block)
        finally:
            state["running"] -= 1

    monkeypatch.setattr(replay._Column, "write", write)
    with pytest.raises(ReplayWriteError) as info:
        store.append(_full_of(rows(3, 8), 111.0))
    assert not info.value.committed and info.value.errno == errno.ENOSPC
    assert state["running"] == 0  # nothing of the failed append is still in flight
    state["fail"] = False
    assert store.append(rows(3, 8)) == 8
    time.sleep(0.4)  # time enough for writes left running to land
    with ReplayStore.open(store.path) as r:
        got = r.read(0, 8)
    np.testing.assert_array_equal(got["reward"], np.arange(8))
    np.testing.assert_array_equal(got["obs"][:, 0], np.arange(8))


def test_failed_append_waits_for_zarrs_own_chunk_writes(tmp_path, monkeypatch):
    # The same race one level down: zarr writes the chunks of one array concurrently and
    # its gather gives up on the first failing chunk while the others are still running.
    store = ReplayStore.create(tmp_path / "r.zarr", OBS_DIM, ACT_DIM, chunk_rows=4)
    real_set = zarr.storage.LocalStore.set
    state = {"fail": True}

    async def set_(self, key, value):
        if state["fail"] and key.startswith("data/reward/c/"):
            if key == "data/reward/c/0":
                raise OSError(errno.ENOSPC, "No space left on device")
            await asyncio.sleep(0.3)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    with pytest.raises(ReplayWriteError) as info:
        store.append(_full_of(rows(0, 12), 111.0))
    assert not info.value.committed and len(store) == 0
    state["fail"] = False
    assert store.append(rows(0, 12)) == 12
    time.sleep(0.4)
    with ReplayStore.open(store.path) as r:
        np.testing.assert_array_equal(r.read(0, 12)["reward"], np.arange(12))
    store.close()


def test_retry_after_a_partial_failure_fsyncs_the_arrays_it_grew(store, monkeypatch):
    # The failed attempt grew most arrays (their zarr.json now says 32 rows) but never
    # reached the fsync step; the retry finds them long enough already and must still
    # fsync that metadata, or a power cut could leave arrays shorter than the counter.
    store.append(rows(0, 16))
    real_write, real_fsync = replay._Column.write, replay._fsync_path

    async def enospc_on_episode_id(self, start, end, block):
        if self.arr.path == "data/episode_id":
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_write(self, start, end, block)

    monkeypatch.setattr(replay._Column, "write", enospc_on_episode_id)
    with pytest.raises(ReplayWriteError):
        store.append(rows(16, 20))
    grown = [k for k in FIELDS if zarr.open_array(store.path, path=f"data/{k}").shape[0] == 32]
    assert sorted(grown) == sorted(set(FIELDS) - {"episode_id"})  # the failure was part-way
    monkeypatch.setattr(replay._Column, "write", real_write)
    synced: list[tuple[Path, bool]] = []

    def recording_fsync(path, directory=False):
        synced.append((Path(path), directory))
        return real_fsync(path, directory)

    monkeypatch.setattr(replay, "_fsync_path", recording_fsync)
    assert store.append(rows(16, 20)) == 20
    for k in FIELDS:
        assert (store.path / "data" / k / "zarr.json", False) in synced, k
        assert (store.path / "data" / k, True) in synced, k
    synced.clear()
    assert store.append(rows(20, 24)) == 24  # nothing grows: no metadata fsync on this one
    assert not [p for p, _d in synced if p.name == "zarr.json"]
    with ReplayStore.open(store.path) as r:
        np.testing.assert_array_equal(r.read(0, 24)["reward"], np.arange(24))


def test_meta_only_commit_whose_dir_fsync_fails_is_reported_committed(store, monkeypatch):
    # A commit of 0 rows and new commit_meta (the learner's record of a dead actor): once
    # the record's rename landed, the meta is committed even if the fsync after it failed.
    empty = rows(0, 0)
    store.append(empty, commit_meta={"v": 1})
    commit_dir = replay.commit_record_path(store.path).parent
    real = replay._fsync_path

    def eio_on_commit_dir(path, directory=False):
        if directory and Path(path) == commit_dir:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, directory)

    monkeypatch.setattr(replay, "_fsync_path", eio_on_commit_dir)
    with pytest.raises(ReplayWriteError, match="was committed") as info:
        store.append(empty, commit_meta={"v": 2})
    assert info.value.committed and info.value.errno == errno.EIO
    assert (len(store), store.commit_meta) == (0, {"v": 2})
    monkeypatch.undo()
    assert store.append(rows(0, 5)) == 5  # None keeps the meta committed above
    with ReplayStore.open(store.path) as r:
        assert (len(r), r.commit_meta) == (5, {"v": 2})
    monkeypatch.setattr(replay, "_write_commit_file", _raise_enospc)
    with pytest.raises(ReplayWriteError, match="not committed") as info:
        store.append(empty, commit_meta={"v": 3})  # fails before the rename
    assert not info.value.committed and store.commit_meta == {"v": 2}


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_disk_full_and_read_only_tmpfs(tiny_tmpfs):
    path = tiny_tmpfs / "r.zarr"
    store = ReplayStore.create(path, 64, 8, chunk_rows=256)
    start = 0
    with pytest.raises(ReplayWriteError) as info:
        for _ in range(1000):
            batch = rows_wide(start, start + 200)
            store.append(batch)
            start += 200
    assert info.value.errno == errno.ENOSPC
    committed = len(store)
    assert committed == start > 0
    with ReplayStore.open(path) as r:
        np.testing.assert_array_equal(r.read(0, committed)["reward"], np.arange(committed))
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_tmpfs)], check=True)
    assert store.append(rows_wide(committed, committed + 200)) == committed + 200
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(ReplayWriteError) as info:
        store.append(rows_wide(committed + 200, committed + 400))
    assert info.value.errno == errno.EROFS
    subprocess.run(["mount", "-o", "remount,rw", str(tiny_tmpfs)], check=True)
    store.append(rows_wide(committed + 200, committed + 400))
    np.testing.assert_array_equal(store.read(0, len(store))["reward"], np.arange(committed + 400))
    store.close()


def rows_wide(start: int, stop: int) -> dict:
    i = np.arange(start, stop)
    obs = np.random.default_rng(start).standard_normal((len(i), 64)).astype(np.float32)
    return {
        "obs": obs,
        "action": np.zeros((len(i), 8), np.float32),
        "reward": i.astype(np.float32),
        "next_obs": obs,
        "terminated": np.zeros(len(i), bool),
        "truncated": np.zeros(len(i), bool),
    }


# --------------------------------------------------------------------------- samplers
def test_sampler_is_uniform_with_replacement(store):
    store.append(rows(0, 10))
    s = ReplaySampler(store, seed=0)
    counts = np.bincount(s.sample(100_000)["obs"][:, 0].astype(int), minlength=10)
    # 10,000 expected per row; binomial std ~95, so +-500 is > 5 sigma
    assert np.all(np.abs(counts - 10_000) < 500), counts
    b = s.sample(512)
    assert b["obs"].shape == (512, OBS_DIM) and b["obs"].dtype == np.float32
    assert b["action"].shape == (512, ACT_DIM) and b["terminated"].dtype == np.bool_
    assert b["obs"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(b["next_obs"], b["obs"] + 1)  # rows are never mixed up
    np.testing.assert_array_equal(b["reward"], b["obs"][:, 0])


def test_sampler_refresh_reads_only_new_rows(store, monkeypatch):
    store.append(rows(0, 40))
    reader = ReplayStore.open(store.path)
    s = ReplaySampler(reader, seed=0)
    reads = []
    real = reader.read
    monkeypatch.setattr(
        reader, "read", lambda a, b, keys=None: reads.append((a, b)) or real(a, b, keys)
    )
    for _ in range(5):
        s.sample(64)
    assert reads == []  # sampling never touches zarr
    store.append(rows(40, 45))
    assert s.refresh() == 45
    assert reads == [(40, 45)]
    assert s.sample(2000)["obs"][:, 0].max() == 44
    reader.close()


def test_file_backed_mirror_matches_ram_mirror(store, tmp_path):
    store.append(rows(0, 300))
    ram = ReplaySampler(store, seed=5)
    disk = ReplaySampler(store, seed=5, cache_rows=100, cache_dir=tmp_path)
    assert disk.file_backed and not ram.file_backed
    assert not list(tmp_path.glob("idql-mirror-*"))  # cache file is unlinked, nothing leaks
    for _ in range(3):
        a, b = ram.sample(256), disk.sample(256)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    store.append(rows(300, 1200))
    assert ram.refresh() == disk.refresh() == 1200
    a, b = ram.sample(1000), disk.sample(1000)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(b["reward"], b["obs"][:, 0])


def test_ram_mirror_moves_to_file_when_store_outgrows_cache_rows(store, tmp_path):
    store.append(rows(0, 50))
    s = ReplaySampler(store, seed=0, cache_rows=64, cache_dir=tmp_path)
    assert not s.file_backed
    store.append(rows(50, 200))
    s.refresh()
    assert s.file_backed
    b = s.sample(4000)
    assert set(np.unique(b["obs"][:, 0]).astype(int)) == set(range(200))


def test_split_is_a_disjoint_permutation_95_5(store):
    store.append(rows(0, 1000))
    s = ReplaySampler(store, seed=0)
    train, val = s.split(0.95, seed=3)
    assert (len(train), len(val)) == (950, 50)
    assert set(train._indices).isdisjoint(val._indices)
    assert set(train._indices) | set(val._indices) == set(range(1000))
    assert set(val.sample(500)["obs"][:, 0].astype(int)) <= set(val._indices)
    again, _ = s.split(0.95, seed=3)
    np.testing.assert_array_equal(again._indices, train._indices)


def test_mixed_sampler_takes_fixed_fraction_from_each(tmp_path):
    offline = ReplayStore.create(tmp_path / "off.zarr", OBS_DIM, ACT_DIM)
    online = ReplayStore.create(tmp_path / "on.zarr", OBS_DIM, ACT_DIM)
    offline.append(rows(0, 100, actor_id=-1))
    mixed = MixedSampler(ReplaySampler(offline), ReplaySampler(online), online_fraction=0.5, seed=0)
    assert (mixed.sample(256)["actor_id"] == -1).all()  # online empty: all offline
    online.append(rows(0, 30, actor_id=7))
    mixed.refresh()
    b = mixed.sample(256)
    assert (b["actor_id"] == 7).sum() == 128 and set(b["actor_id"].tolist()) == {-1, 7}
    # interleaved: every prefix keeps the share to within a row (the critic trains on a
    # prefix, train.critic_batch_rows); back to back, the first 128 rows were all offline
    for rows_ in (2, 64, 128, 255):
        assert abs((b["actor_id"][:rows_] == 7).sum() - rows_ * 0.5) <= 1
    np.testing.assert_array_equal(b["reward"], b["obs"][:, 0])  # one order for every key
    quarter = MixedSampler(ReplaySampler(offline), ReplaySampler(online), online_fraction=0.25)
    q = quarter.sample(256)
    assert (q["actor_id"] == 7).sum() == 64
    assert [(q["actor_id"][:k] == 7).sum() for k in (4, 100, 128)] == [1, 25, 32]
    offline.close()
    online.close()


def test_mixed_sampler_sample_zero_is_empty_like_replay_sampler(tmp_path):
    offline = ReplayStore.create(tmp_path / "off.zarr", OBS_DIM, ACT_DIM)
    online = ReplayStore.create(tmp_path / "on.zarr", OBS_DIM, ACT_DIM)
    offline.append(rows(0, 20, actor_id=-1))
    online.append(rows(0, 10, actor_id=7))
    off = ReplaySampler(offline)
    mixed = MixedSampler(off, ReplaySampler(online), online_fraction=0.5)
    got, want = mixed.sample(0), off.sample(0)
    assert sorted(got) == sorted(want) == sorted(FIELDS)
    for k in FIELDS:
        assert (got[k].shape, got[k].dtype) == (want[k].shape, want[k].dtype), k
    assert got["obs"].shape == (0, OBS_DIM) and got["action"].shape == (0, ACT_DIM)
    assert got["terminated"].dtype == np.bool_ and got["reward"].shape == (0,)
    assert mixed.sample(4)["obs"].shape == (4, OBS_DIM)  # and batches with rows still work
    offline.close()
    online.close()


def test_closing_one_split_half_leaves_the_other_sampling(store, tmp_path):
    store.append(rows(0, 200))
    full = ReplaySampler(store, seed=0, cache_rows=100, cache_dir=tmp_path)  # file-backed
    train, val = full.split(0.9, seed=1)
    mirror = full._mirror
    val.close()
    val.close()  # closing twice releases the mirror once
    b = train.sample(500)
    assert set(b["obs"][:, 0].astype(int)) <= set(train._indices.tolist())
    np.testing.assert_array_equal(b["reward"], b["obs"][:, 0])
    with pytest.raises(ValueError, match="closed"):
        val.sample(4)
    train.close()
    assert mirror.file_backed  # the parent still holds it
    assert full.sample(8)["obs"].shape == (8, OBS_DIM)
    full.close()
    assert not mirror.file_backed  # the last sampler closed: the cache file is released


def test_sampler_on_empty_store_raises(store):
    with pytest.raises(ValueError, match="empty"):
        ReplaySampler(store).sample(4)


def test_durable_and_fast_modes_store_the_same_rows(tmp_path):
    for durable in (True, False):
        p = tmp_path / f"d{durable}.zarr"
        with ReplayStore.create(p, OBS_DIM, ACT_DIM, chunk_rows=8, durable=durable) as s:
            for a in range(0, 50, 7):
                s.append(rows(a, min(a + 7, 50)))
        with ReplayStore.open(p) as r:
            np.testing.assert_array_equal(r.read(0, 50)["obs"][:, 0], np.arange(50))
    assert os.path.isdir(tmp_path / "dTrue.zarr")


def test_file_backed_mirror_keeps_rss_far_below_the_data(tmp_path):
    """A 170 MB mirror sampled 400 x 512 times (random rows all over the file) must not
    pull the file into this process: growth stays a fraction of the mirror's size."""
    psutil = pytest.importorskip("psutil")
    obs_dim, n = 64, 300_000
    store = ReplayStore.create(tmp_path / "big.zarr", obs_dim, 8, durable=False)
    for start in range(0, n, 60_000):
        store.append(rows_wide(start, start + 60_000))
    sampler = ReplaySampler(store, seed=0, cache_rows=1000, cache_dir=tmp_path)
    mirror_mb = len(sampler) * replay.mirror_bytes_per_row(obs_dim, 8) / 2**20
    assert sampler.file_backed and mirror_mb > 150
    before = psutil.Process().memory_info().rss / 2**20
    for _ in range(400):
        batch = sampler.sample(512)
    grown = psutil.Process().memory_info().rss / 2**20 - before
    assert grown < 0.25 * mirror_mb, (grown, mirror_mb)
    # rows come back whole: reward is the row index, obs that row's own random draw
    rows_back = batch["reward"].astype(np.int64)
    for block in range(0, n, 60_000):
        sel = (rows_back >= block) & (rows_back < block + 60_000)
        want = rows_wide(block, block + 60_000)["obs"][rows_back[sel] - block]
        np.testing.assert_array_equal(batch["obs"][sel], want)
    sampler.close()
    store.close()
