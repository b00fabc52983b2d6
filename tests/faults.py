"""Fault tools for the reliability tests (reliability.md) and benchmarks/fault_costs.py.

- ``LossyProxy``: a ZeroMQ ROUTER/DEALER pair in a thread between actors and the
  learner's ingest endpoint that drops, duplicates and delays (hence reorders) frames in
  both directions with a seeded RNG, and counts what it did.
- ``SmallFs``: a small file system to put a replay store on and then fill up or make
  read-only. It tries, in order: a ``tmpfs`` mount (``mount -t tmpfs -o size=...``), a
  loop-mounted ext4 image, and, where neither is permitted, an injected write error: the
  learner then runs under ``python -m tests.faults learner-with-write-faults CONTROL --``
  (see ``learner_module``), which makes ``ReplayStore.append`` raise ``ReplayWriteError``
  (ENOSPC or EROFS) while the CONTROL file exists. ``SmallFs.kind`` says which is used.
- ``FakeLearner``: a ``LearnerLink`` in a thread that acks every batch, keeps the rows it
  got per actor, and publishes whatever bytes a test hands it (bad weights).
- ``python -m tests.faults slow-actor --every K --sleep-s S -- ACTOR ARGS``: ``idql-actor``
  whose engine sleeps ``S`` seconds on every K-th decision and then returns ``MARKER``, a
  test-only slowdown hook that leaves the package untouched.
- Store checks: rows per actor, duplicates by content, broken episode chains, and that a
  sampler never returns a row past the commit counter.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import heapq
import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = np.array([0.123, -0.456, 0.789], np.float32)
"""What the slowed engine returns for a slow (late) decision: it must never be executed."""
SAFE = np.array([0.05, -0.05, 0.0], np.float32)
"""A safe action that the tests pass as ``--safe-action`` and find in the store."""
SAFE_ARG = ",".join(str(float(x)) for x in SAFE)


# --------------------------------------------------------------------------- lossy proxy


class LossyProxy:
    """Forward ZeroMQ frames between actors (DEALER -> our ROUTER ``endpoint``) and a
    learner's ROUTER (our DEALER connects to ``backend``), losing some on purpose.

    Every message in either direction is dropped with probability ``drop``, else sent
    twice with probability ``dup``; each copy is held back a uniform 0..``max_delay_s``
    with probability ``reorder`` (later messages overtake it). The learner sees the
    proxy's DEALER identity plus the actor's as the envelope and routes acks back through
    it, exactly as through a plain zmq proxy. ``counts`` holds per-direction counters
    ("up": actor -> learner, "down": learner -> actor).
    """

    def __init__(
        self,
        backend: str,
        *,
        drop: float = 0.1,
        dup: float = 0.1,
        reorder: float = 0.3,
        max_delay_s: float = 0.05,
        seed: int = 0,
    ) -> None:
        import zmq

        self.backend = backend
        self.drop, self.dup, self.reorder, self.max_delay_s = drop, dup, reorder, max_delay_s
        self.rng = np.random.default_rng(seed)
        self.counts: dict[str, Counter[str]] = {"up": Counter(), "down": Counter()}
        self._ctx = zmq.Context()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._back = self._ctx.socket(zmq.DEALER)
        for s in (self._front, self._back):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.setsockopt(zmq.RCVHWM, 100_000)
        self._front.bind("tcp://127.0.0.1:*")
        self.endpoint = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._back.connect(backend)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="LossyProxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        held: list[tuple[float, int, str, list[bytes]]] = []
        order = itertools.count()
        out = {"up": self._back, "down": self._front}
        try:
            while not self._stop.is_set():
                timeout = 10 if not held else max(0, min(10, (held[0][0] - time.monotonic()) * 1e3))
                events = dict(poller.poll(int(timeout)))
                for sock, direction in ((self._front, "up"), (self._back, "down")):
                    if sock not in events:
                        continue
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        for copy in self._fate(direction):
                            heapq.heappush(
                                held, (time.monotonic() + copy, next(order), direction, frames)
                            )
                now = time.monotonic()
                while held and held[0][0] <= now:
                    _, _, direction, frames = heapq.heappop(held)
                    try:
                        out[direction].send_multipart(frames, zmq.NOBLOCK)
                        with self._lock:
                            self.counts[direction]["forwarded"] += 1
                    except zmq.ZMQError:  # peer gone (EHOSTUNREACH) or full: a loss too
                        with self._lock:
                            self.counts[direction]["unroutable"] += 1
        finally:
            self._front.close(0)
            self._back.close(0)
            self._ctx.term()

    def _fate(self, direction: str) -> list[float]:
        """Delays (s) of the copies to forward: [] dropped, two entries duplicated."""
        with self._lock:
            c = self.counts[direction]
            c["received"] += 1
            if self.rng.random() < self.drop:
                c["dropped"] += 1
                return []
            copies = 2 if self.rng.random() < self.dup else 1
            c["duplicated"] += copies - 1
            delays = []
            for _ in range(copies):
                if self.rng.random() < self.reorder:
                    c["delayed"] += 1
                    delays.append(float(self.rng.uniform(0, self.max_delay_s)))
                else:
                    delays.append(0.0)
            return delays

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {d: dict(c) for d, c in self.counts.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class LossyPubProxy(LossyProxy):
    """The weights link through a lossy hop: a SUB connected to the learner's PUB
    (``backend``) republishes on its own PUB (``endpoint``, actors subscribe there),
    dropping, duplicating and delaying (reordering) messages as ``LossyProxy`` does.
    ``sent_versions`` lists the weight versions in the order they went out."""

    def __init__(self, backend: str, **kw: Any) -> None:
        import zmq

        self.backend = backend
        self.drop, self.dup = kw.get("drop", 0.1), kw.get("dup", 0.1)
        self.reorder, self.max_delay_s = kw.get("reorder", 0.3), kw.get("max_delay_s", 0.05)
        self.rng = np.random.default_rng(kw.get("seed", 0))
        self.counts = {"down": Counter()}
        self.sent_versions: list[int] = []
        self._ctx = zmq.Context()
        self._front = self._ctx.socket(zmq.PUB)
        self._back = self._ctx.socket(zmq.SUB)
        for sock in (self._front, self._back):
            sock.setsockopt(zmq.LINGER, 0)
        self._back.setsockopt(zmq.SUBSCRIBE, b"")
        self._front.bind("tcp://127.0.0.1:*")
        self.endpoint = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._back.connect(backend)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="LossyPubProxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        from idql_runtime import protocol as P

        held: list[tuple[float, int, bytes]] = []
        order = itertools.count()
        try:
            while not self._stop.is_set():
                timeout = 10 if not held else max(0, min(10, (held[0][0] - time.monotonic()) * 1e3))
                if self._back.poll(int(timeout)):
                    while True:
                        try:
                            data = self._back.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        for delay in self._fate("down"):
                            heapq.heappush(held, (time.monotonic() + delay, next(order), data))
                now = time.monotonic()
                while held and held[0][0] <= now:
                    _, _, data = heapq.heappop(held)
                    self._front.send(data)  # PUB never blocks: drops at its HWM
                    with self._lock:
                        self.counts["down"]["forwarded"] += 1
                        self.sent_versions.append(int(P.decode(data)["version"]))
        finally:
            self._front.close(0)
            self._back.close(0)
            self._ctx.term()


# --------------------------------------------------------------------------- small file system


class SmallFs:
    """A small file system at ``root/mnt`` that can be filled up or made read-only.

    ``kind`` is "tmpfs", "loop" (ext4 image) or "injected" (no mount permitted: the
    learner must then run under ``learner_module()``, which fails appends while the
    control file exists). The environment variable ``IDQL_TEST_SMALLFS`` (tmpfs, loop,
    injected) picks the first one to try. Always ``close()`` (umount) it, after the
    processes using it have exited.
    """

    def __init__(self, root: Path, size_mib: int = 64, prefer: str = "tmpfs") -> None:
        self.root = Path(root)
        self.path = self.root / "mnt"
        self.path.mkdir(parents=True, exist_ok=True)
        self.size_mib = size_mib
        self.control = self.root / "write-fault"
        self.kind = ""
        self.why_not: list[str] = []
        prefer = os.environ.get("IDQL_TEST_SMALLFS", prefer)  # tmpfs, loop or injected
        order = [] if prefer == "injected" else [prefer, "tmpfs", "loop"]
        for kind in dict.fromkeys(order):
            if getattr(self, f"_mount_{kind}")():
                self.kind = kind
                break
        else:
            self.kind = "injected"
            self.why_not.append(f"IDQL_TEST_SMALLFS={prefer}" if prefer == "injected" else "")
        self._filler = self.path / ".filler"

    def _run(self, *cmd: str) -> bool:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.why_not.append(f"{cmd[0]}: {e}")
            return False
        if r.returncode:
            self.why_not.append(f"{' '.join(cmd)}: {r.stderr.strip()[:200]}")
        return r.returncode == 0

    def _mount_tmpfs(self) -> bool:
        return self._run(
            "mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m", "tmpfs", str(self.path)
        )

    def _mount_loop(self) -> bool:
        image = self.root / "fs.img"
        with open(image, "wb") as f:
            f.truncate(self.size_mib * 2**20)
        return self._run("mkfs.ext4", "-q", "-F", str(image)) and self._run(
            "mount", "-o", "loop", str(image), str(self.path)
        )

    def learner_module(self) -> list[str] | None:
        """What to run instead of ``-m learner`` (None: the plain learner)."""
        if self.kind != "injected":
            return None
        return [
            "-m",
            "tests.faults",
            "learner-with-write-faults",
            str(self.control),
            "--",
            "-m",
            "learner",
        ]

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def fill(self) -> int:
        """Take every free byte (ENOSPC for the next write); returns the filler's size."""
        if self.kind == "injected":
            self.control.write_text("ENOSPC")
            return 0
        written, size = 0, 2**20
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while size >= 1:
                try:
                    written += os.write(fd, b"\0" * size)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    size //= 4
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        if self.kind == "injected":
            self.control.unlink(missing_ok=True)
        else:
            self._filler.unlink(missing_ok=True)

    def read_only(self, busy_timeout_s: float = 10.0) -> None:
        """The file system turns read-only under the running learner. A remount to ro is
        refused (EBUSY) while a file on it is open for writing, i.e. while the learner is
        inside a write; retried until it lands between two writes (a kernel that remounts
        ro on an I/O error does not wait, but the learner sees the same EROFS next write)."""
        if self.kind == "injected":
            self.control.write_text("EROFS")
            return
        deadline = time.monotonic() + busy_timeout_s
        while not self._run("mount", "-o", "remount,ro", str(self.path)):
            if "busy" not in self.why_not[-1] or time.monotonic() > deadline:
                raise OSError(f"could not remount {self.path} read-only: {self.why_not[-1]}")
            self.why_not.pop()  # a busy retry is not a reason this fs lacks
            time.sleep(0.005)

    def writable(self) -> None:
        if self.kind == "injected":
            self.control.unlink(missing_ok=True)
        elif not self._run("mount", "-o", "remount,rw", str(self.path)):
            raise OSError(f"could not remount {self.path} read-write: {self.why_not[-1]}")

    def close(self) -> None:
        if self.kind in ("tmpfs", "loop") and not self._run("umount", str(self.path)):
            self._run("umount", "-l", str(self.path))
        self.kind = self.kind or "closed"


def _learner_with_write_faults(control: str, argv: list[str]) -> int:
    """The learner, with ``ReplayStore.append`` failing while ``control`` exists."""
    from idql_runtime import replay

    original = replay.ReplayStore.append

    def append(self: Any, batch: Any, *, commit_meta: Any = None) -> int:
        try:
            what = Path(control).read_text().strip()
        except FileNotFoundError:
            return original(self, batch, commit_meta=commit_meta)
        code = errno.EROFS if what == "EROFS" else errno.ENOSPC
        raise replay.ReplayWriteError(code, f"injected {what} (tests/faults.py)")

    replay.ReplayStore.append = append  # type: ignore[method-assign]
    if argv[:2] != ["-m", "learner"]:
        raise SystemExit("learner-with-write-faults CONTROL -- -m learner ARGS")
    from learner.cli import main

    return main(argv[2:])


# --------------------------------------------------------------------------- slow engine


class SlowEngine:
    """Wraps an engine: after ``warmup`` calls, every ``every``-th decision sleeps
    ``sleep_s`` and returns ``MARKER`` (a late action that must never be executed).
    It also counts weight loads that happen while a decision is running
    (``mid_decision_swaps``, printed as JSON at exit): there must be none."""

    def __init__(self, engine: Any, every: int, sleep_s: float, warmup: int = 3) -> None:
        self._engine, self.every, self.sleep_s, self.warmup = engine, every, sleep_s, warmup
        self.calls = 0
        self.deciding = False
        self.swaps = 0
        self.mid_decision_swaps = 0

    def decide(self, obs: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.deciding = True
        try:
            k = self.calls - self.warmup
            if k > 0 and k % self.every == 0:
                time.sleep(self.sleep_s)
                return np.repeat(MARKER[None], len(obs), axis=0)
            return self._engine.decide(obs)
        finally:
            self.deciding = False

    def load_weights(self, tensors: Any, **kw: Any) -> None:
        self.swaps += 1
        self.mid_decision_swaps += self.deciding
        self._engine.load_weights(tensors, **kw)

    def report(self) -> None:
        counts = {"calls": self.calls, "swaps": self.swaps}
        print(
            json.dumps({"slow_engine": {**counts, "mid_decision_swaps": self.mid_decision_swaps}})
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _slow_actor(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults slow-actor")
    p.add_argument("--every", type=int, required=True)
    p.add_argument("--sleep-s", type=float, required=True)
    args, rest = p.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    import idql_runtime.engines as engines

    build = engines.build_engine

    def slow_build(*a: Any, **kw: Any) -> Any:
        engine = SlowEngine(build(*a, **kw), args.every, args.sleep_s)
        atexit.register(engine.report)
        return engine

    engines.build_engine = slow_build  # actor.cli imports it at call time
    from actor.cli import main

    return main(rest)


# --------------------------------------------------------------------------- fake learner


class FakeLearner:
    """A LearnerLink on ``tcp://127.0.0.1:port`` / ``port+1`` run by a thread: acks every
    batch (duplicates by (actor, seq) acked as such), keeps the rows per actor, and
    publishes what ``publish_raw``/``publish_weights`` queue (in order)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.rows: dict[int, dict[int, dict[str, np.ndarray]]] = {}  # actor -> seq -> arrays
        self.versions: dict[int, dict[int, int]] = {}  # actor -> seq -> policy_version
        self.duplicates = 0
        self.heartbeats: dict[int, dict[str, Any]] = {}
        self.link_stats: dict[str, int] = {}
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="FakeLearner", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"fake learner did not start: {self._error}")

    def _run(self) -> None:
        from idql_runtime.transport import LearnerLink

        try:
            link = LearnerLink(
                f"tcp://127.0.0.1:{self.port}",
                f"tcp://127.0.0.1:{self.port + 1}",
                heartbeat_liveness_s=60.0,
                weights_republish_s=None,
            )
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        kind, payload = self._out.get_nowait()
                    except queue.Empty:
                        break
                    if kind == "raw":
                        link.publish_raw(payload)
                    else:
                        link.publish_weights(*payload)
                for b in link.poll(timeout_ms=5):
                    with self._lock:
                        mine = self.rows.setdefault(b.actor_id, {})
                        if b.seq in mine:
                            self.duplicates += 1
                        else:
                            mine[b.seq] = {k: np.array(v) for k, v in b.msg["arrays"].items()}
                            self.versions.setdefault(b.actor_id, {})[b.seq] = b.msg[
                                "policy_version"
                            ]
                    link.ack(b.actor_id, b.seq, 0)
                with self._lock:
                    self.heartbeats = {a: dict(s.last_heartbeat) for a, s in link.actors().items()}
                    self.link_stats = link.stats()
        finally:
            link.close()

    def publish_raw(self, data: bytes) -> None:
        self._out.put(("raw", data))

    def publish_weights(self, version: int, tensors: dict[str, np.ndarray]) -> None:
        self._out.put(("weights", (version, tensors)))

    def table(self, actor_id: int) -> dict[str, np.ndarray]:
        """The actor's rows in seq order (its steps in order), with ``policy_version``."""
        with self._lock:
            mine = dict(self.rows.get(actor_id, {}))
            versions = dict(self.versions.get(actor_id, {}))
        if not mine:
            return {}
        seqs = sorted(mine)
        out = {k: np.concatenate([mine[s][k] for s in seqs]) for k in mine[seqs[0]]}
        out["policy_version"] = np.concatenate(
            [np.full(len(mine[s]["reward"]), versions[s]) for s in seqs]
        )
        return out

    def row_count(self, actor_id: int) -> int:
        with self._lock:
            return sum(len(r["reward"]) for r in self.rows.get(actor_id, {}).values())

    def heartbeat(self, actor_id: int) -> dict[str, Any]:
        with self._lock:
            return dict(self.heartbeats.get(actor_id, {}))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------- store checks


def read_store(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every committed row (all fields) and the commit record's meta."""
    from idql_runtime.replay import ReplayStore

    store = ReplayStore.open(path)
    try:
        return store.read(0, len(store)), store.commit_meta
    finally:
        store.close()


def rows_of(data: dict[str, np.ndarray], actor_id: int) -> dict[str, np.ndarray]:
    mine = data["actor_id"] == actor_id
    return {k: v[mine] for k, v in data.items()}


def duplicate_rows(rows: dict[str, np.ndarray]) -> int:
    """Rows whose (actor_id, episode_id, obs bytes, action bytes) occurred before."""
    seen: set[tuple[int, int, bytes, bytes]] = set()
    dups = 0
    for a, e, o, act in zip(
        rows["actor_id"], rows["episode_id"], rows["obs"], rows["action"], strict=True
    ):
        key = (int(a), int(e), o.tobytes(), act.tobytes())
        dups += key in seen
        seen.add(key)
    return dups


def chain_breaks(rows: dict[str, np.ndarray]) -> dict[int, int]:
    """Per episode id: rows whose next_obs is no other row's obs in that episode and that
    end no episode. A whole episode has 0; an episode cut short (actor stopped or died,
    rows dropped) has 1 per cut; a missing batch inside an episode adds 1."""
    out: dict[int, int] = {}
    for ep in np.unique(rows["episode_id"]):
        m = rows["episode_id"] == ep
        obs = {o.tobytes() for o in rows["obs"][m]}
        done = rows["terminated"][m] | rows["truncated"][m]
        out[int(ep)] = int(
            sum(
                (nxt.tobytes() not in obs) and not d
                for nxt, d in zip(rows["next_obs"][m], done, strict=True)
            )
        )
    return out


def episode_starts(rows: dict[str, np.ndarray]) -> dict[int, int]:
    """Per episode id: rows whose obs is no other row's next_obs (1 = starts present)."""
    out: dict[int, int] = {}
    for ep in np.unique(rows["episode_id"]):
        m = rows["episode_id"] == ep
        nxt = {o.tobytes() for o in rows["next_obs"][m]}
        out[int(ep)] = int(sum(o.tobytes() not in nxt for o in rows["obs"][m]))
    return out


def sampled_rows_are_committed(path: Path, draws: int = 20_000) -> tuple[int, int]:
    """(sampled rows not among the committed ones, committed rows): a ReplaySampler on the
    store must only ever return committed rows, whatever lies past the counter."""
    from idql_runtime.replay import ReplaySampler, ReplayStore

    store = ReplayStore.open(path)
    try:
        committed = store.read(0, len(store), ["obs"])["obs"]
        known = {o.tobytes() for o in committed}
        sampler = ReplaySampler(store, seed=0)
        foreign = 0
        for _ in range(max(1, draws // 1000)):
            batch = sampler.sample(1000)
            foreign += sum(o.tobytes() not in known for o in np.asarray(batch["obs"], np.float32))
        sampler.close()
        return foreign, len(committed)
    finally:
        store.close()


def plant_torn_append(path: Path, rows: int = 50, value: float = 12345.0) -> list[Path]:
    """What a writer killed mid-append leaves: data arrays grown past the commit counter
    with rows that were never committed (all fields = ``value``), and stray ``*.partial``
    files (returned). A correct store ignores both; a writer reopening it removes them."""
    import zarr

    from idql_runtime.replay import PARTIAL_SUFFIX, commit_record_path

    committed = int(json.loads(commit_record_path(path).read_text())["rows"])
    for name in ("obs", "action", "reward", "next_obs", "terminated", "truncated", "actor_id"):
        arr = zarr.open_array(path, path=f"data/{name}", mode="r+")
        arr.resize((committed + rows, *arr.shape[1:]))
        arr[committed:] = value if arr.dtype.kind == "f" else 1
    planted = [
        commit_record_path(path).parent / f"commit.json.{uuid.uuid4().hex}{PARTIAL_SUFFIX}",
        path / "data" / "obs" / "c" / f"0.{uuid.uuid4().hex}{PARTIAL_SUFFIX}",
    ]
    for f in planted:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"{" * 100)
    return planted


def partial_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*.partial"))


# --------------------------------------------------------------------------- hostile input


def fuzz_module() -> Any:
    """benchmarks/fuzz_protocol.py (the mutation fuzzer) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fuzz_protocol", ROOT / "benchmarks" / "fuzz_protocol.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rce_pickle(marker: Path) -> bytes:
    """A pickle stream that would create ``marker`` if anything ever unpickled it (literal
    bytes: nothing here imports pickle)."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def request(sock: Any, payload: bytes, timeout_s: float = 5.0) -> dict | None:
    """Send one message on a DEALER and decode the one reply (None: no reply in time)."""
    from idql_runtime import protocol as P

    sock.send(payload)
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return P.decode(sock.recv_multipart()[-1])


def fuzz_process(
    endpoint: str, role: str, count: int, seed: int, pid: int, extra: list[bytes] = ()
) -> dict[str, Any]:
    """Send ``count`` mutated messages (and ``extra``) one at a time to a live learner
    ("learner") or action server ("action") process and account for every one.

    Each message must get exactly one reply (valid heartbeats to the learner: none), with
    the error code local decoding gives when it is malformed; the process's counters
    must grow by exactly what was sent and rejected. RSS is measured after a warm-up
    tenth and at the end.
    """
    import zmq

    from idql_runtime import protocol as P

    fz = fuzz_module()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    replies: Counter[str] = Counter()
    problems: list[str] = []
    expected_rejected = bad_batches = health = heartbeats = 0
    rss0 = rss1 = 0.0
    started = time.monotonic()
    try:
        before = request(sock, P.encode(P.make_health(0)), 30.0)
        assert before is not None, f"no health reply from {endpoint}"
        items = list(fz.messages(count, seed)) + [("extra", m) for m in extra]
        for i, (how, data) in enumerate(items):
            if i == count // 10:
                rss0 = rss_mib(pid)
            code, msg = fz.classify(data)
            mtype = None if msg is None else msg["type"]
            if role == "learner":
                if mtype == "heartbeat":
                    sock.send(data)
                    heartbeats += 1
                    continue
                if mtype == "transitions":
                    bad_batches += 1
                elif mtype == "health":
                    health += 1
                else:
                    expected_rejected += 1
            else:
                health += mtype == "health"
                expected_rejected += mtype != "health"
            reply = request(sock, data)
            if reply is None:
                problems.append(f"{i} ({how}): no reply")
                break
            replies[reply["type"]] += 1
            if code is not None and (reply["type"] != "error" or reply["code"] != code):
                problems.append(f"{i} ({how}): local {code}, process {reply}"[:300])
        rss1 = rss_mib(pid)
        after = request(sock, P.encode(P.make_health(1)))
        assert after is not None, f"{endpoint} stopped answering"
    finally:
        sock.close(0)
        ctx.term()
    delta = {k: after["counters"][k] - before["counters"].get(k, 0) for k in after["counters"]}
    return {
        "sent": len(items),
        "replies": dict(replies),
        "expected_rejected": expected_rejected,
        "rejected": delta["rejected"],
        "received": delta["received"] - 1,  # less the closing health request
        "bad_batches_sent": bad_batches,
        "heartbeats_sent": heartbeats,
        "health_sent": health,
        "problems": problems[:5],
        "rss_mib": round(rss1, 1),
        "rss_growth_mib": round(rss1 - rss0, 2),
        "seconds": round(time.monotonic() - started, 2),
    }


# --------------------------------------------------------------------------- processes

LEARN = (
    "--set",
    "online.warmup_transitions=200",
    "--set",
    "online.publish_every=10",
    "--set",
    "online.updates_per_transition=0.25",
    "--set",
    "online.batch_size=64",
    "--status-interval-s",
    "0.5",
)
"""Small updates so that the learner leaves CPU to the actors on a 2-core machine."""


def final(p: Any, key: str, timeout_s: float = 60.0) -> dict:
    rc = p.wait(timeout_s)
    assert rc == 0, f"{p.name} exited {rc}: {p.stderr()[-2000:]}"
    return p.find(key)[-1]


def last(p: Any, key: str) -> dict:
    got = p.find(key)
    assert got, f"{p.name} printed no {key!r} line yet: {p.stderr()[-1500:]}"
    return got[-1]


# --------------------------------------------------------------------------- misc


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.05) -> Any:
    """Poll ``pred`` until truthy (returns it) or raise TimeoutError naming ``what``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


_CKPT: dict[str, Path] = {}


def shared_checkpoint(store_path: Path, tmp_root: Path) -> Path:
    """One tiny pretrained checkpoint per test session (per store), shared by modules."""
    key = str(store_path)
    if key not in _CKPT or not _CKPT[key].exists():
        from tests.procs import pretrained_checkpoint

        _CKPT[key] = pretrained_checkpoint(store_path, tmp_root / "pre")
    return _CKPT[key]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["learner-with-write-faults"] and len(argv) >= 3 and argv[2] == "--":
        return _learner_with_write_faults(argv[1], argv[3:])
    if argv[:1] == ["slow-actor"]:
        return _slow_actor(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
