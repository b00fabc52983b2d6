"""Real processes for end-to-end and fault tests: learner, actors, servers on loopback.

Every helper is bounded in time; ``Proc`` collects stdout JSON lines on a thread so a
test can wait for an event without blocking on a pipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from idql_runtime.ports import free_port_pair  # noqa: F401  (re-exported for tests)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


class Proc:
    """A subprocess whose stdout lines are parsed as JSON (others kept as text)."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.err"
        self.events: list[dict[str, Any]] = []
        self.arrived: list[float] = []  # time.monotonic() each event was read (same order)
        self.text: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=open(self.stderr_path, "w"),
            text=True,
            env=ENV,
            cwd=ROOT,
            start_new_session=True,
        )
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.strip()
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                with self._lock:
                    self.text.append(line)
                continue
            if isinstance(ev, dict):
                with self._lock:
                    self.events.append(ev)
                    self.arrived.append(time.monotonic())

    def find(self, key: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e[key] for e in self.events if key in e]

    def find_timed(self, key: str) -> list[tuple[float, dict[str, Any]]]:
        """``(arrival time.monotonic(), event[key])`` for every event with ``key``."""
        with self._lock:
            return [(t, e[key]) for t, e in zip(self.arrived, self.events, strict=True) if key in e]

    def count(self, key: str) -> int:
        """How many ``key`` events arrived so far (for ``wait_for(..., since=)``)."""
        return len(self.find(key))

    def wait_for(
        self, key: str, pred=lambda e: True, timeout_s: float = 60.0, since: int = 0
    ) -> dict[str, Any]:
        """The first ``key`` event (from the ``since``-th on) for which ``pred`` holds."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for e in self.find(key)[since:]:
                if pred(e):
                    return e
            if self.popen.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.05)
        raise TimeoutError(
            f"{self.name}: no {key!r} event matched in {timeout_s} s; "
            f"rc={self.popen.poll()}; stderr tail: {self.stderr()[-1500:]}"
        )

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        rc = self.popen.wait(timeout=timeout_s)
        self._thread.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)


def learner(
    log_dir: Path,
    ckpt: Path,
    replay: Path,
    port: int,
    run_dir: Path,
    *extra: str,
    offline: Path | None = None,
    name: str = "learner",
    module: list[str] | None = None,
) -> Proc:
    """``module``: what runs instead of ``-m learner`` (e.g. a fault-injecting wrapper that
    takes the learner's arguments after it)."""
    args = [
        *(module or ["-m", "learner"]),
        "--pretrained",
        str(ckpt),
        "--replay",
        str(replay),
        "--bind-ingest",
        f"tcp://127.0.0.1:{port}",
        "--bind-weights",
        f"tcp://127.0.0.1:{port + 1}",
        "--run-dir",
        str(run_dir),
        "--heartbeat-liveness-s",
        "2.0",
        *extra,
    ]
    if offline is not None:
        args += ["--offline", str(offline)]
    return Proc(name, args, log_dir)


def actor(
    log_dir: Path,
    ckpt: Path,
    port: int | None,
    actor_id: int,
    *extra: str,
    module: list[str] | None = None,
    name: str | None = None,
) -> Proc:
    """Later options in ``extra`` override the defaults here (argparse keeps the last)."""
    args = [
        *(module or ["-m", "actor"]),
        "--checkpoint",
        str(ckpt),
        "--env",
        "Hopper-v5",
        "--actor-id",
        str(actor_id),
        "--engine",
        "eager",
        "--threads",
        "1",
        "--seed",
        str(actor_id),
        "--status-interval-s",
        "1",
        "--resend-timeout-s",
        "1.0",
        # a loaded 2-core machine can starve an actor for 50 ticks (0.4 s at Hopper's 125
        # Hz) while the others start; tests of the limit itself pass their own
        "--overrun-limit",
        "2000",
        *extra,
    ]
    if port is not None:
        args += ["--learner", f"tcp://127.0.0.1:{port}", "--weights", f"tcp://127.0.0.1:{port + 1}"]
    return Proc(name or f"actor{actor_id}", args, log_dir)


def pretrained_checkpoint(store_path: Path, run_dir: Path, iterations: int = 30) -> Path:
    """A tiny pretrained checkpoint (TINY config) from the small Hopper store."""
    from idql_runtime.config import load_config
    from idql_runtime.replay import ReplayStore
    from idql_runtime.trainer import OfflineTrainer
    from tests.conftest import TINY

    tr = OfflineTrainer(
        load_config(overrides=TINY),
        ReplayStore.open(store_path),
        run_dir,
        progress=False,
        tensorboard=False,
    )
    for _ in range(iterations):
        tr.step()
    return tr.save()
