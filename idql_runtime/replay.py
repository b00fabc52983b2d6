"""Crash-safe replay store (one zarr v3 group) and the samplers that read it.

This is the only module of the package that imports zarr.

Layout (Diffusion Policy's ReplayBuffer layout plus a commit record)::

    store.zarr/
      zarr.json               group; attributes {"idql_replay": {...}, "attrs": {user metadata}}
      data/<field>            one row per transition, chunks of ``chunk_rows`` rows (see FIELDS)
      meta/episode_ends       int64, exclusive end row of every committed episode
      meta/commit             int64[2] = [rows, episodes], a copy for plain-zarr readers
      meta/commit/commit.json the commit record {"rows", "episodes", "meta"}; written LAST
      meta/commit/writer.lock flock()ed by the one writer

Commit protocol (docs/replay.md): an append writes every data array (grow in whole chunks,
write whole chunks, so zarr never reads a chunk back), fsyncs what it touched, then
replaces the commit record atomically (``*.partial`` temp file, fsync, rename, fsync
dir). Readers never look past the record's row count, so a crash at any instant exposes
nothing half-written and loses nothing an ``append`` had returned. Opening for writing
deletes stray ``*.partial`` files and truncates arrays back to the committed rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as _zarr_sync  # runs coroutines on zarr's own IO loop

FORMAT_NAME = "idql-replay"
FORMAT_VERSION = 1
COMMIT_KEY = "meta/commit"
COMMIT_RECORD = "commit.json"  # inside the meta/commit array's directory, unseen by zarr
EPISODE_ENDS_KEY = "meta/episode_ends"
LOCK_NAME = "writer.lock"
PARTIAL_SUFFIX = ".partial"
DEFAULT_RAM_MIRROR_BYTES = 1 << 30  # mirrors larger than this live in a cache file
_EPISODE_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class Field:
    """One column of the store: ``width`` is "obs", "act" or None (one value per row)."""

    dtype: np.dtype
    width: str | None
    doc: str


FIELDS: dict[str, Field] = {
    "obs": Field(np.dtype(np.float32), "obs", "observation s_t, shape (obs_dim,)"),
    "action": Field(np.dtype(np.float32), "act", "action a_t as stored (raw, not clipped)"),
    "reward": Field(np.dtype(np.float32), None, "reward r_t"),
    "next_obs": Field(np.dtype(np.float32), "obs", "observation s_{t+1}"),
    "terminated": Field(np.dtype(np.bool_), None, "episode ended in a terminal state"),
    "truncated": Field(np.dtype(np.bool_), None, "episode cut (time limit, data end, actor loss)"),
    "actor_id": Field(np.dtype(np.int32), None, "actor that produced the row; -1: offline data"),
    "policy_version": Field(
        np.dtype(np.int64), None, "weights version that chose a_t; -1: unknown"
    ),
    "episode_id": Field(np.dtype(np.int64), None, "episode number; default: episodes ended before"),
}
REQUIRED_FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")
PROVENANCE_DEFAULTS = {"actor_id": -1, "policy_version": -1}  # episode_id is derived
FLOAT_FIELDS = tuple(k for k, f in FIELDS.items() if f.dtype.kind == "f")


class SchemaError(ValueError):
    """A store or a batch does not have the expected layout; the message names the key."""


class StoreLockedError(RuntimeError):
    """Another process holds the store's writer lock."""


class ReplayWriteError(OSError):
    """An append could not be committed (disk full, read-only, IO error).

    Committed rows are intact and ``len(store)`` says how many there are; the same append
    can be retried once the cause is gone. ``committed`` is True in the one case where the
    commit record's rename landed and only the directory fsync after it failed: the rows
    and ``commit_meta`` of this append are then committed (visible, counted, and kept by a
    crash of the process) but their survival of a power cut is not confirmed, and the
    append must not be retried (it would store the rows twice).
    """

    def __init__(self, code: int, message: str, *, committed: bool = False) -> None:
        super().__init__(code, message)
        self.committed = committed


def _row_shape(field: Field, obs_dim: int, act_dim: int) -> tuple[int, ...]:
    if field.width == "obs":
        return (obs_dim,)
    if field.width == "act":
        return (act_dim,)
    return ()


# --------------------------------------------------------------------------- file helpers
def _fsync_path(path: Path | str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old or the new bytes, never a mix,
    and the new bytes survive a power loss once this returns."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_path(path.parent, directory=True)


def _remove_partials(root: Path) -> list[Path]:
    removed = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(PARTIAL_SUFFIX):
                p = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                removed.append(p)
    return removed


def _json_checked(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{what} must be JSON-serialisable: {e}") from e


async def _write_all(writes: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run ``writes`` concurrently and return, or raise the first failure, only once none of
    them is still writing. A failed append must leave nothing running: a write that landed
    after ``append`` had raised could overwrite rows that a later append has committed."""
    results = await asyncio.gather(*writes, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        # zarr writes one array's chunks as concurrent tasks and stops waiting at the first
        # that fails, so chunk writes of a failed column may still be running: wait for
        # every task on zarr's IO loop (a few rounds, in case they spawned more).
        me = asyncio.current_task()
        for _ in range(8):
            running = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not running:
                break
            await asyncio.wait(running)
        raise errors[0]


# --------------------------------------------------------------------------- writer column
class _Column:
    """Writer-side state of one growing array: its committed length and the rows of its
    last, partly filled chunk (the tail), so that every write covers whole chunks."""

    def __init__(self, root: Path, arr: zarr.Array, length: int):
        self.root = root
        self.arr = arr
        self.length = length
        # Set when the array is resized, cleared only by a durable commit: a failed append
        # can grow the array (rewrite zarr.json) without reaching its fsync, and the retry,
        # finding the array long enough, would otherwise not fsync that metadata either.
        self.meta_unsynced = False
        self.chunk_rows = int(arr.chunks[0])
        tail_start = (length // self.chunk_rows) * self.chunk_rows
        self.tail = np.asarray(arr[tail_start:length]) if length > tail_start else self._empty()

    def _empty(self) -> np.ndarray:
        return np.empty((0, *self.arr.shape[1:]), dtype=self.arr.dtype)

    def plan(self, new: np.ndarray) -> tuple[int, int, np.ndarray]:
        """Rows [start, end) to write (whole chunks, padded with the fill value)."""
        start = (self.length // self.chunk_rows) * self.chunk_rows
        stop = self.length + len(new)
        end = -(-stop // self.chunk_rows) * self.chunk_rows
        block = np.empty((end - start, *self.arr.shape[1:]), dtype=self.arr.dtype)
        n_tail = len(self.tail)
        block[:n_tail] = self.tail
        block[n_tail : n_tail + len(new)] = new
        block[n_tail + len(new) :] = self.arr.fill_value
        return start, end, block

    async def write(self, start: int, end: int, block: np.ndarray) -> None:
        aa = self.arr.async_array
        if aa.shape[0] < end:
            self.meta_unsynced = True  # before the resize: it may rewrite zarr.json, then fail
            await aa.resize((end, *aa.shape[1:]))
        await aa.setitem(slice(start, end), block)

    def touched(self, start: int, end: int) -> tuple[set[Path], set[Path]]:
        """Files and directories that must be fsynced for rows [start, end) to be durable."""
        files: set[Path] = set()
        dirs: set[Path] = set()
        array_dir = self.root / self.arr.path
        for i in range(start // self.chunk_rows, end // self.chunk_rows):
            coords = (i,) + (0,) * (self.arr.ndim - 1)
            f = array_dir / self.arr.metadata.encode_chunk_key(coords)
            files.add(f)
            d = f.parent
            while d != array_dir:
                dirs.add(d)
                d = d.parent
        if self.meta_unsynced:
            files.add(array_dir / "zarr.json")
            dirs.add(array_dir)
        return files, dirs

    def advance(self, new: np.ndarray) -> None:
        combined = np.concatenate([self.tail, new]) if len(self.tail) else new
        start = (self.length // self.chunk_rows) * self.chunk_rows
        self.length += len(new)
        keep_from = (self.length // self.chunk_rows) * self.chunk_rows - start
        self.tail = np.array(combined[keep_from:], copy=True)


# --------------------------------------------------------------------------- the store
class ReplayStore:
    """A zarr v3 replay store: one writer process, any number of readers.

    Rows are transitions (see ``FIELDS``). ``len(store)`` is the committed row count;
    readers call ``refresh()`` to see rows committed since they opened. One object is
    meant for one thread; another thread or process opens its own reader.
    """

    def __init__(self, path: Path, mode: str, *, durable: bool = True):
        self.path = Path(path)
        self.mode = mode
        self.durable = durable
        self._lock_fd: int | None = None
        self._closed = False
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._cols: dict[str, _Column] = {}
        self._ends_col: _Column | None = None
        self._rows = 0
        self._episodes = 0
        self._commit_meta: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.obs_dim = 0
        self.act_dim = 0
        self.chunk_rows = 0
        self._attrs: dict[str, Any] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        obs_dim: int,
        act_dim: int,
        *,
        chunk_rows: int = 16384,
        attrs: dict | None = None,
        exist_ok: bool = False,
        durable: bool = True,
    ) -> ReplayStore:
        """Create an empty store and open it for writing (mode "a").

        With ``exist_ok`` an existing store of the same dimensions is opened instead.
        The store appears under ``path`` in one rename, so a crash during creation leaves
        no half store behind.
        """
        path = Path(path)
        for name, v in (("obs_dim", obs_dim), ("act_dim", act_dim), ("chunk_rows", chunk_rows)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        user_attrs = _json_checked(dict(attrs or {}), "attrs")
        if path.exists():
            if not exist_ok:
                raise FileExistsError(f"replay store {path} already exists (pass exist_ok=True)")
            store = cls.open(path, "a", durable=durable)
            if (store.obs_dim, store.act_dim) != (obs_dim, act_dim):
                store.close()
                raise SchemaError(
                    f"existing store {path} has obs_dim={store.obs_dim}, act_dim={store.act_dim};"
                    f" asked for obs_dim={obs_dim}, act_dim={act_dim}"
                )
            if user_attrs:
                store.set_attrs(user_attrs)
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.creating")
        try:
            group = zarr.open_group(tmp, mode="w-")
            group.attrs.update(
                {
                    "idql_replay": {
                        "format": FORMAT_NAME,
                        "format_version": FORMAT_VERSION,
                        "obs_dim": int(obs_dim),
                        "act_dim": int(act_dim),
                        "chunk_rows": int(chunk_rows),
                    },
                    "attrs": user_attrs,
                }
            )
            data = group.create_group("data")
            for name, f in FIELDS.items():
                shape = _row_shape(f, obs_dim, act_dim)
                data.create_array(
                    name,
                    shape=(0, *shape),
                    chunks=(chunk_rows, *shape),
                    dtype=f.dtype,
                    fill_value=np.nan if f.dtype.kind == "f" else 0,
                    # MuJoCo floats barely compress; skipping the codec keeps appends cheap.
                    compressors=None if f.dtype.kind == "f" else "auto",
                )
            meta = group.create_group("meta")
            meta.create_array(
                "episode_ends", shape=(0,), chunks=(_EPISODE_CHUNK_ROWS,), dtype=np.int64
            )
            meta.create_array("commit", shape=(2,), chunks=(2,), dtype=np.int64, compressors=None)
            (tmp / COMMIT_KEY / LOCK_NAME).touch()
            _write_commit_file(tmp, 0, 0, {})
            for dirpath, _dirs, files in os.walk(tmp, topdown=False):
                for fname in files:
                    _fsync_path(Path(dirpath) / fname)
                _fsync_path(dirpath, directory=True)
            os.rename(tmp, path)  # fails if path appeared meanwhile: never clobber a store
            _fsync_path(path.parent, directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path, "a", durable=durable)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, durable: bool = True) -> ReplayStore:
        """Open a store: mode "r" (reader, any number) or "a" (the one writer).

        A writer takes an exclusive flock (released by the kernel if the process dies),
        deletes stray ``*.partial`` files and truncates arrays back to the commit counter.
        ``durable``: fsync data before each commit (power-loss safe); without it a commit
        still survives a killed process, only not a power cut.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no replay store at {path}")
        store = cls(path, mode, durable=durable)
        try:
            store._open()
        except BaseException:
            store.close()
            raise
        return store

    def _open(self) -> None:
        commit_dir = self.path / COMMIT_KEY
        if self.mode == "a":
            if not commit_dir.is_dir():
                raise SchemaError(f"{self.path} is not an idql replay store (no {COMMIT_KEY})")
            fd = os.open(commit_dir / LOCK_NAME, os.O_RDONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreLockedError(
                    f"replay store {self.path} is already open for writing by another process"
                    " (only one writer at a time; open with mode='r' to read)"
                ) from None
            self._lock_fd = fd
            _remove_partials(self.path)
        try:
            self._group = zarr.open_group(self.path, mode="r" if self.mode == "r" else "r+")
        except (FileNotFoundError, ValueError) as e:
            raise SchemaError(f"{self.path} is not a zarr group: {e}") from e
        info = self._group.attrs.get("idql_replay")
        if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
            raise SchemaError(f"{self.path} is not an idql replay store (no idql_replay attrs)")
        if info.get("format_version") != FORMAT_VERSION:
            raise SchemaError(
                f"{self.path}: format_version {info.get('format_version')} is not supported"
                f" (expected {FORMAT_VERSION})"
            )
        self.obs_dim = int(info["obs_dim"])
        self.act_dim = int(info["act_dim"])
        self.chunk_rows = int(info["chunk_rows"])
        user_attrs = self._group.attrs.get("attrs")
        self._attrs = dict(user_attrs) if isinstance(user_attrs, dict) else {}
        self._rows, self._episodes, self._commit_meta = _read_commit_file(self.path)
        self._open_arrays()
        self._check_schema()
        if self.mode == "a":
            self._truncate_to_commit()
            self._cols = {k: _Column(self.path, self._arrays[k], self._rows) for k in FIELDS}
            self._ends_col = _Column(self.path, self._arrays[EPISODE_ENDS_KEY], self._episodes)
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="replay-fsync")

    def _open_arrays(self) -> None:
        for name in [*FIELDS, EPISODE_ENDS_KEY]:
            self._reopen_array(name)

    def _reopen_array(self, name: str) -> None:
        key = _array_key(name)
        try:
            arr = zarr.open_array(self.path, path=key, mode="r" if self.mode == "r" else "r+")
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise SchemaError(f"{self.path}: array '{key}' is missing or unreadable: {e}") from e
        if self.mode == "a":
            # Always write whole chunks (never turn an all-fill chunk into a delete) so the
            # files an append touched, and must fsync, are exactly the chunks it wrote.
            arr = arr.with_config({"write_empty_chunks": True})
        self._arrays[name] = arr

    def _check_schema(self) -> None:
        for name, f in FIELDS.items():
            arr = self._arrays[name]
            want_shape = _row_shape(f, self.obs_dim, self.act_dim)
            if arr.dtype != f.dtype:
                raise SchemaError(f"array 'data/{name}': dtype {arr.dtype}, expected {f.dtype}")
            if tuple(arr.shape[1:]) != want_shape:
                raise SchemaError(
                    f"array 'data/{name}': row shape {tuple(arr.shape[1:])}, expected {want_shape}"
                )
            if arr.shape[0] < self._rows:
                raise SchemaError(
                    f"array 'data/{name}' has {arr.shape[0]} rows but {self._rows} are committed"
                )
        ends = self._arrays[EPISODE_ENDS_KEY]
        if ends.dtype != np.int64 or ends.ndim != 1:
            raise SchemaError(f"array '{EPISODE_ENDS_KEY}': expected 1-d int64, got {ends.dtype}")
        if ends.shape[0] < self._episodes:
            raise SchemaError(
                f"array '{EPISODE_ENDS_KEY}' has {ends.shape[0]} entries but {self._episodes}"
                " episodes are committed"
            )
        if self._episodes and int(np.asarray(ends[self._episodes - 1])) > self._rows:
            raise SchemaError(f"'{EPISODE_ENDS_KEY}' points past the committed rows")

    def _truncate_to_commit(self) -> None:
        for name in FIELDS:
            arr = self._arrays[name]
            if arr.shape[0] != self._rows:
                arr.resize((self._rows, *arr.shape[1:]))
        ends = self._arrays[EPISODE_ENDS_KEY]
        if ends.shape[0] != self._episodes:
            ends.resize((self._episodes,))

    # ----------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self._rows

    @property
    def num_episodes(self) -> int:
        """Committed episodes (rows after the last end belong to an open episode)."""
        return self._episodes

    @property
    def commit_meta(self) -> dict[str, Any]:
        """The JSON metadata of the last commit (see ``append``); a copy."""
        return json.loads(json.dumps(self._commit_meta))

    @property
    def attrs(self) -> dict[str, Any]:
        """User metadata (a copy): env_id, ref_min_score, ref_max_score, seed, settings, ..."""
        return json.loads(json.dumps(self._attrs))

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Merge ``attrs`` into the user metadata and persist it (writer only)."""
        self._require_writer()
        merged = {**self._attrs, **_json_checked(dict(attrs), "attrs")}
        assert self._group is not None
        self._group.attrs["attrs"] = merged
        self._attrs = merged
        if self.durable:
            _fsync_path(self.path / "zarr.json")
            _fsync_path(self.path, directory=True)

    def schema(self) -> dict[str, dict[str, Any]]:
        """Per array: dtype, shape (committed rows), chunks, compressors."""
        out = {}
        for name in [*FIELDS, EPISODE_ENDS_KEY]:
            arr = self._arrays[name]
            n = self._episodes if name == EPISODE_ENDS_KEY else self._rows
            key = _array_key(name)
            out[key] = {
                "dtype": str(arr.dtype),
                "shape": [n, *arr.shape[1:]],
                "chunks": list(arr.chunks),
                "compressors": [type(c).__name__ for c in arr.compressors],
            }
        return out

    # ----------------------------------------------------------------- reading
    def refresh(self) -> int:
        """Re-read the commit counter; return the committed row count."""
        self._check_open()
        if self.mode == "r":
            self._rows, self._episodes, self._commit_meta = _read_commit_file(self.path)
        return self._rows

    def _array(self, name: str, need_rows: int) -> zarr.Array:
        arr = self._arrays[name]
        if arr.shape[0] < need_rows:  # a writer grew it since we read its metadata
            self._reopen_array(name)
            arr = self._arrays[name]
            if arr.shape[0] < need_rows:
                raise SchemaError(f"array '{_array_key(name)}' is shorter than the commit counter")
        return arr

    def read(
        self, start: int, stop: int, keys: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Committed rows ``[start, stop)`` of ``keys`` (default: all FIELDS)."""
        self._check_open()
        keys = list(FIELDS) if keys is None else list(keys)
        for k in keys:
            if k not in FIELDS:
                raise KeyError(f"unknown field {k!r}; fields are {list(FIELDS)}")
        if not 0 <= start <= stop:
            raise IndexError(f"bad row range [{start}, {stop})")
        if stop > self._rows:
            raise IndexError(
                f"rows [{start}, {stop}) reach past the {self._rows} committed rows"
                " (call refresh() to see newer commits)"
            )
        if start == stop:
            return {
                k: np.empty(
                    (0, *_row_shape(FIELDS[k], self.obs_dim, self.act_dim)), FIELDS[k].dtype
                )
                for k in keys
            }
        arrays = [self._array(k, stop) for k in keys]

        async def gather() -> list[Any]:
            return await asyncio.gather(
                *[a.async_array.getitem(slice(start, stop)) for a in arrays]
            )

        return {k: np.asarray(v) for k, v in zip(keys, _zarr_sync(gather()), strict=True)}

    def iter_blocks(
        self,
        start: int = 0,
        stop: int | None = None,
        keys: Sequence[str] | None = None,
        block_rows: int | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(first_row, columns)`` for chunk-aligned blocks of committed rows."""
        stop = self._rows if stop is None else stop
        block = block_rows or max(self.chunk_rows * 4, 65536)
        block = -(-block // self.chunk_rows) * self.chunk_rows
        pos = start
        while pos < stop:
            end = min(stop, (pos // block + 1) * block)
            yield pos, self.read(pos, end, keys)
            pos = end

    def episode_ends(self) -> np.ndarray:
        """int64 exclusive end rows of the committed episodes (a row with terminated or
        truncated ends its episode), as Diffusion Policy's ``meta/episode_ends``."""
        self._check_open()
        if self._episodes == 0:
            return np.empty(0, np.int64)
        arr = self._array(EPISODE_ENDS_KEY, self._episodes)
        return np.asarray(arr[: self._episodes], dtype=np.int64)

    # ----------------------------------------------------------------- writing
    def append(
        self, batch: Mapping[str, np.ndarray], *, commit_meta: Mapping[str, Any] | None = None
    ) -> int:
        """Append R rows atomically; return the committed row count afterwards.

        ``commit_meta`` (JSON) is committed in the same atomic step as the rows and read back
        as ``store.commit_meta`` (e.g. the learner's per-actor sequence table, so that rows
        and the record of which batches they came from can never disagree after a crash);
        None keeps the previous one.

        ``batch`` maps field names to arrays with R rows: obs (R, obs_dim), action
        (R, act_dim), reward/terminated/truncated (R,) are required; actor_id and
        policy_version default to -1, episode_id to the number of episodes ended before
        each row. Raises SchemaError (naming the key) for a bad batch, ReplayWriteError
        (an OSError) when the disk refuses; either way committed rows are untouched.
        """
        self._require_writer()
        cols = self._validate(batch)
        meta = (
            self._commit_meta
            if commit_meta is None
            else _json_checked(dict(commit_meta), "commit_meta")
        )
        n = len(cols["obs"])
        if n == 0 and commit_meta is None:
            return self._rows
        start = self._rows
        done = cols["terminated"] | cols["truncated"]
        ends = (start + 1 + np.flatnonzero(done)).astype(np.int64)
        assert self._ends_col is not None
        work = [(self._cols[k], cols[k]) for k in FIELDS] + [(self._ends_col, ends)]
        work = [(c, v) for c, v in work if len(v)]
        plans = [(c, v, *c.plan(v)) for c, v in work]
        try:
            _zarr_sync(_write_all([c.write(s, e, b) for c, _v, s, e, b in plans]))
            if self.durable:
                files: set[Path] = set()
                dirs: set[Path] = set()
                for c, _v, s, e, _b in plans:
                    f, d = c.touched(s, e)
                    files |= f
                    dirs |= d
                assert self._pool is not None
                list(self._pool.map(_fsync_path, sorted(files)))
                list(self._pool.map(lambda p: _fsync_path(p, True), sorted(dirs)))
            _write_commit_file(self.path, start + n, self._episodes + len(ends), meta)
        except OSError as e:
            if self._reconcile_after_failure(start + n, self._episodes + len(ends), meta, work):
                what = "rows" if n else "commit_meta"
                raise ReplayWriteError(
                    e.errno or errno.EIO,
                    f"append of {n} rows to {self.path} was committed ({self._rows} rows now),"
                    f" but an fsync after the commit failed ({e}): the {what} may not survive a"
                    " power cut; do not retry this append",
                    committed=True,
                ) from e
            raise ReplayWriteError(
                e.errno or errno.EIO,
                f"append of {n} rows to {self.path} was not committed ({e}); the {self._rows}"
                " committed rows are intact, retry once the cause is fixed",
            ) from e
        for c, v in work:
            c.advance(v)
            if self.durable:
                c.meta_unsynced = False
        self._rows = start + n
        self._episodes += len(ends)
        self._commit_meta = meta
        return self._rows

    def _reconcile_after_failure(
        self, rows: int, episodes: int, meta: dict[str, Any], work: list[tuple[_Column, np.ndarray]]
    ) -> bool:
        """After a failed append meant to commit ``(rows, episodes, meta)``: True (and the
        writer's state moved on to that commit) if its record's rename landed although a
        later fsync failed. The record proves it when it holds the intended commit and
        differs from the previous one; that covers a commit of 0 rows and new meta too."""
        try:
            record = _read_commit_file(self.path)
        except (OSError, SchemaError):
            return False
        previous = (self._rows, self._episodes, self._commit_meta)
        if record != (rows, episodes, meta) or record == previous:
            return False
        for c, v in work:
            c.advance(v)
        self._rows, self._episodes, self._commit_meta = record
        return True

    def _validate(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(batch, Mapping):
            raise SchemaError(f"batch must be a mapping of field -> array, got {type(batch)}")
        unknown = [k for k in batch if k not in FIELDS]
        if unknown:
            raise SchemaError(f"unknown key {unknown[0]!r} in batch; fields are {list(FIELDS)}")
        missing = [k for k in REQUIRED_FIELDS if k not in batch]
        if missing:
            raise SchemaError(f"batch is missing required key {missing[0]!r}")
        n_rows = None
        out: dict[str, np.ndarray] = {}
        for name, f in FIELDS.items():
            if name not in batch:
                continue
            value = np.asarray(batch[name])
            want = _row_shape(f, self.obs_dim, self.act_dim)
            if value.dtype.kind not in "biuf":
                raise SchemaError(
                    f"key {name!r}: dtype {value.dtype} is not allowed, expected {f.dtype}"
                )
            if value.ndim != 1 + len(want) or tuple(value.shape[1:]) != want:
                raise SchemaError(
                    f"key {name!r}: expected shape {(_shape_str(want))}, got {value.shape}"
                )
            if n_rows is None:
                n_rows = value.shape[0]
            elif value.shape[0] != n_rows:
                raise SchemaError(f"key {name!r} has {value.shape[0]} rows, 'obs' has {n_rows}")
            out[name] = _cast(name, value, f.dtype)
        assert n_rows is not None
        for name, default in PROVENANCE_DEFAULTS.items():
            if name not in out:
                out[name] = np.full(n_rows, default, FIELDS[name].dtype)
        if "episode_id" not in out:
            done = out["terminated"] | out["truncated"]
            before = np.cumsum(done) - done
            out["episode_id"] = (self._episodes + before).astype(np.int64)
        return out

    def close(self) -> None:
        """Release the writer lock (a writer truncates arrays to the committed rows first)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.mode == "a" and self._arrays and self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    self._truncate_to_commit()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the fd releases the flock
                self._lock_fd = None

    def __enter__(self) -> ReplayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)

    def __repr__(self) -> str:
        return (
            f"ReplayStore({str(self.path)!r}, mode={self.mode!r}, rows={self._rows},"
            f" episodes={self._episodes}, obs_dim={self.obs_dim}, act_dim={self.act_dim})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"replay store {self.path} is closed")

    def _require_writer(self) -> None:
        self._check_open()
        if self.mode != "a":
            raise PermissionError(f"replay store {self.path} is open read-only (mode='r')")


def _array_key(name: str) -> str:
    return name if name.startswith("meta/") else f"data/{name}"


def _shape_str(row_shape: tuple[int, ...]) -> str:
    return "(R,)" if not row_shape else f"(R, {', '.join(map(str, row_shape))})"


def _cast(name: str, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        out = value.astype(dtype, copy=False)
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out).reshape(len(out), -1).all(axis=1))[0])
            raise SchemaError(f"key {name!r}: non-finite value in row {bad}")
        return out
    if dtype.kind == "b":
        if value.dtype.kind != "b":
            if not np.isin(value, (0, 1)).all():
                raise SchemaError(
                    f"key {name!r}: expected bool (or 0/1), got values outside {{0, 1}}"
                )
        return value.astype(np.bool_, copy=False)
    if value.dtype.kind == "f":
        raise SchemaError(f"key {name!r}: expected {dtype}, got {value.dtype}")
    info = np.iinfo(dtype)
    if value.size and (value.min() < info.min or value.max() > info.max):
        raise SchemaError(f"key {name!r}: values do not fit {dtype}")
    return value.astype(dtype, copy=False)


def commit_record_path(root: Path) -> Path:
    """The file whose atomic replace commits an append (JSON: rows, episodes, meta)."""
    return root / COMMIT_KEY / COMMIT_RECORD


def _write_commit_file(root: Path, rows: int, episodes: int, meta: dict[str, Any]) -> None:
    """The commit: one atomic, fsync'd replace of the commit record. The int64 chunk of the
    ``meta/commit`` zarr array is a courtesy copy for plain-zarr readers, written after."""
    record = {"rows": int(rows), "episodes": int(episodes), "meta": meta}
    _atomic_write_bytes(commit_record_path(root), json.dumps(record).encode())
    with contextlib.suppress(OSError):  # the record above is what counts
        chunk = root / COMMIT_KEY / "c" / "0"
        chunk.parent.mkdir(parents=True, exist_ok=True)
        tmp = chunk.with_name(f"0.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        tmp.write_bytes(np.array([rows, episodes], dtype="<i8").tobytes())
        os.replace(tmp, chunk)


def _read_commit_file(root: Path) -> tuple[int, int, dict[str, Any]]:
    path = commit_record_path(root)
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SchemaError(
            f"{root} has no commit record ({COMMIT_KEY}/{COMMIT_RECORD}); it is not a complete"
            " replay store"
        ) from None
    except ValueError as e:
        raise SchemaError(f"{path}: unreadable commit record: {e}") from e
    try:
        rows, episodes, meta = int(record["rows"]), int(record["episodes"]), record["meta"]
    except (KeyError, TypeError, ValueError) as e:
        raise SchemaError(f"{path}: commit record lacks {e}") from e
    if rows < 0 or episodes < 0 or not isinstance(meta, dict):
        raise SchemaError(f"{path}: bad commit record {record}")
    return rows, episodes, meta


def is_replay_store(path: str | os.PathLike) -> bool:
    """True if ``path`` looks like a complete idql replay store."""
    p = Path(path)
    if not (p / "zarr.json").is_file() or not commit_record_path(p).is_file():
        return False
    try:
        meta = json.loads((p / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("attributes", {}).get("idql_replay", {}).get("format") == FORMAT_NAME


# --------------------------------------------------------------------------- samplers
class _Mirror:
    """Committed rows copied out of a store into one record array, grown incrementally;
    shared by a sampler and the samplers split from it, and released (RAM or cache file)
    when the last of them closes (``users`` counts them).

    Up to ``cache_rows`` rows it is a numpy array in RAM. Beyond, it is an unlinked cache
    file read with one ``pread`` per sampled row: memory-mapping it would fault whole
    page-cache folios (up to 2 MiB each) into this process for every random row, and RSS
    would reach the file size within a few batches; pread keeps the data in the kernel's
    page cache, outside RSS, at ~0.4 ms per 512-row batch.
    """

    def __init__(
        self,
        store: ReplayStore,
        keys: Sequence[str],
        cache_rows: int | None,
        cache_dir: str | os.PathLike | None,
    ):
        self.store = store
        self.keys = list(keys)
        self.dtype = np.dtype(
            [
                (k, FIELDS[k].dtype, _row_shape(FIELDS[k], store.obs_dim, store.act_dim))
                for k in self.keys
            ]
        )
        if cache_rows is None:
            cache_rows = max(1, DEFAULT_RAM_MIRROR_BYTES // self.dtype.itemsize)
        self.cache_rows = int(cache_rows)
        self.cache_dir = cache_dir
        self.rows = 0
        self.buf: np.ndarray = np.empty(0, self.dtype)
        self.fd: int | None = None
        self.users = 0

    @property
    def file_backed(self) -> bool:
        return self.fd is not None

    def _ensure_capacity(self, need: int) -> None:
        if self.file_backed or need <= len(self.buf):
            return
        if need > self.cache_rows:
            fd, name = tempfile.mkstemp(prefix="idql-mirror-", suffix=".bin", dir=self.cache_dir)
            os.unlink(name)  # the fd keeps it alive; nothing is left behind after a crash
            self.fd = fd
            for s in range(0, self.rows, 1 << 16):
                self._write(s, self.buf[s : min(self.rows, s + (1 << 16))])
            self.buf = np.empty(0, self.dtype)
            return
        cap = min(max(need, 2 * len(self.buf), 1024), max(self.cache_rows, need))
        new = np.empty(cap, self.dtype)
        new[: self.rows] = self.buf[: self.rows]
        self.buf = new

    def _write(self, row: int, records: np.ndarray) -> None:
        if self.fd is not None:
            data = np.ascontiguousarray(records).view(np.uint8).data
            offset = row * self.dtype.itemsize
            while data:
                n = os.pwrite(self.fd, data, offset)
                data, offset = data[n:], offset + n
        else:
            self.buf[row : row + len(records)] = records

    def grow(self) -> int:
        committed = self.store.refresh()
        if committed <= self.rows:
            return self.rows
        self._ensure_capacity(committed)
        for first, cols in self.store.iter_blocks(self.rows, committed, self.keys):
            n = len(cols[self.keys[0]])
            rec = np.empty(n, self.dtype)
            for k in self.keys:
                rec[k] = cols[k]
            self._write(first, rec)
        self.rows = committed
        return self.rows

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        if self.fd is None:
            rec = self.buf[idx]
        else:
            fd, size, pread = self.fd, self.dtype.itemsize, os.pread
            raw = b"".join([pread(fd, size, off) for off in (idx * size).tolist()])
            rec = np.frombuffer(raw, dtype=self.dtype)
        return {k: np.ascontiguousarray(rec[k]) for k in self.keys}

    def empty(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """A batch of 0 rows: ``keys`` with their dtypes and row shapes."""
        return {k: np.empty(0, self.dtype[k]) for k in keys}

    def release(self) -> None:
        """One sampler sharing the mirror is done with it; the last one frees it."""
        self.users -= 1
        if self.users <= 0:
            self.close()

    def close(self) -> None:
        self.buf = np.empty(0, self.dtype)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        # a parent sampler nobody closes (split() and dropped) must not leak the cache file
        fd = getattr(self, "fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class ReplaySampler:
    """Uniform sampling with replacement from a mirror of a store's committed rows.

    The mirror is numpy (RAM) up to ``cache_rows`` rows (default: 1 GiB of rows) and an
    unlinked cache file in ``cache_dir`` beyond (read with pread, so RSS stays small); ``refresh()`` copies only the rows
    committed since the last refresh. ``indices`` restricts sampling to those rows.
    """

    def __init__(
        self,
        store: ReplayStore,
        *,
        seed: int = 0,
        indices: np.ndarray | None = None,
        cache_rows: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        keys: Sequence[str] | None = None,
        _mirror: _Mirror | None = None,
    ):
        self.store = store
        self._rng = np.random.default_rng(seed)
        self._closed = False
        self._mirror = _mirror or _Mirror(store, keys or list(FIELDS), cache_rows, cache_dir)
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.refresh()
        if self._indices is not None and len(self._indices):
            if self._indices.min() < 0 or self._indices.max() >= self._mirror.rows:
                raise IndexError("indices reach outside the committed rows")
        self._mirror.users += 1

    @property
    def file_backed(self) -> bool:
        """True when the mirror lives in a cache file rather than RAM."""
        return self._mirror.file_backed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("replay sampler is closed")

    def refresh(self) -> int:
        """Pick up newly committed rows (reads only those); return the rows available."""
        self._check_open()
        self._mirror.grow()
        return len(self)

    def __len__(self) -> int:
        return self._mirror.rows if self._indices is None else len(self._indices)

    def _draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        self._check_open()
        n = len(self)
        if n == 0:
            raise ValueError("cannot sample from an empty replay store")
        pick = rng.integers(0, n, size=batch_size)
        return pick if self._indices is None else self._indices[pick]

    def _sample_with(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        return self._mirror.gather(self._draw(rng, batch_size))

    def take(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``positions`` (0 .. len - 1) of this sampler's own row order."""
        pos = np.asarray(positions, dtype=np.int64)
        if len(pos) and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"positions reach outside this sampler's {len(self)} rows")
        return self._mirror.gather(pos if self._indices is None else self._indices[pos])

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of ``batch_size`` rows drawn uniformly with replacement: obs (B, obs_dim),
        action (B, act_dim), reward (B,), next_obs, terminated, truncated (+ provenance)."""
        return self._sample_with(self._rng, batch_size)

    def split(self, fraction: float = 0.95, seed: int = 0) -> tuple[ReplaySampler, ReplaySampler]:
        """Random permutation of the rows: the first ``floor(fraction * n)`` for training,
        the rest for validation (the reference IDQL split is 95/5). Both share this
        sampler's mirror; closing one leaves the others sampling."""
        self._check_open()
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        pool = np.arange(self._mirror.rows) if self._indices is None else self._indices
        perm = np.random.default_rng(seed).permutation(pool)
        n_train = int(len(pool) * fraction)
        seeds = np.random.SeedSequence(seed).spawn(2)
        train = ReplaySampler(
            self.store,
            seed=int(seeds[0].generate_state(1)[0]),
            indices=perm[:n_train],
            _mirror=self._mirror,
        )
        val = ReplaySampler(
            self.store,
            seed=int(seeds[1].generate_state(1)[0]),
            indices=perm[n_train:],
            _mirror=self._mirror,
        )
        return train, val

    def close(self) -> None:
        """Stop using the mirror; it is freed once every sampler sharing it has closed."""
        if not self._closed:
            self._closed = True
            self._mirror.release()


class MixedSampler:
    """A fixed share of every batch from each source (online finetuning; the reference
    draws 128 online + 128 offline). While ``online`` is empty, every row is offline."""

    def __init__(
        self,
        offline: ReplaySampler,
        online: ReplaySampler,
        online_fraction: float = 0.5,
        seed: int = 0,
    ):
        if not 0.0 <= online_fraction <= 1.0:
            raise ValueError(f"online_fraction must be in [0, 1], got {online_fraction}")
        self.offline = offline
        self.online = online
        self.online_fraction = online_fraction
        self._rng = np.random.default_rng(seed)

    def refresh(self) -> tuple[int, int]:
        return self.offline.refresh(), self.online.refresh()

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """``round(batch_size * online_fraction)`` rows from online, the rest from offline,
        interleaved evenly: every prefix of the batch holds the same share (to within a
        row). The critic trains on a prefix (``train.critic_batch_rows``, v1's 256), and
        with the sources back to back a prefix no longer than the offline share saw no
        online row at all. ``sample(0)`` gives 0-row arrays of the keys both sources hold."""
        if batch_size == 0:
            self.offline._check_open()
            self.online._check_open()
            keys = [k for k in self.offline._mirror.keys if k in self.online._mirror.keys]
            return self.offline._mirror.empty(keys)
        n_online = int(round(batch_size * self.online_fraction)) if len(self.online) else 0
        if len(self.offline) == 0:
            n_online = batch_size
        n_offline = batch_size - n_online
        parts, slots = [], []
        if n_offline:
            parts.append(self.offline._sample_with(self._rng, n_offline))
            slots.append((np.arange(n_offline) + 0.5) / n_offline)
        if n_online:
            parts.append(self.online._sample_with(self._rng, n_online))
            slots.append((np.arange(n_online) + 0.5) / n_online)
        order = np.argsort(np.concatenate(slots), kind="stable")
        keys = [k for k in parts[0] if all(k in p for p in parts)]
        return {k: np.concatenate([p[k] for p in parts])[order] for k in keys}


# --------------------------------------------------------------------------- foreign zarr
def list_zarr_arrays(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every array in a zarr hierarchy (v2 or v3): key -> {"shape", "dtype"}."""
    root = zarr.open_group(Path(path), mode="r")
    out: dict[str, dict[str, Any]] = {}
    for key, arr in root.arrays():
        out[key] = {"shape": tuple(arr.shape), "dtype": str(arr.dtype)}
    for gname, group in root.groups():
        for key, arr in group.arrays():
            out[f"{gname}/{key}"] = {"shape": tuple(arr.shape), "dtype": str(arr.dtype)}
    return out


def read_zarr_arrays(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read whole arrays ``keys`` (e.g. "data/action", "meta/episode_ends") of a zarr store."""
    root = zarr.open_group(Path(path), mode="r")
    out = {}
    for key in keys:
        node = root[key]
        if not isinstance(node, zarr.Array):
            raise SchemaError(f"{path}: {key!r} is a group, expected an array")
        out[key] = np.asarray(node[...])
    return out


def mirror_bytes_per_row(obs_dim: int, act_dim: int, keys: Sequence[str] | None = None) -> int:
    """Bytes one row takes in a sampler mirror (for sizing ``cache_rows``)."""
    keys = list(FIELDS) if keys is None else keys
    return sum(
        FIELDS[k].dtype.itemsize * math.prod(_row_shape(FIELDS[k], obs_dim, act_dim)) for k in keys
    )
