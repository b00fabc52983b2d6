"""Graceful stop on SIGTERM / SIGINT for the runtime's loops (actor, server, learners).

One context manager, so every process stops the same way:

- the first SIGTERM or SIGINT calls ``on_stop`` (the loop finishes what it is doing and
  checkpoints / flushes) and gives the caller's handlers back, so a second signal acts at
  once as it would have without this (Ctrl-C twice: KeyboardInterrupt; SIGTERM twice: the
  default termination), e.g. during a flush wait or a checkpoint that would otherwise
  run to its end;
- a signal the process was started with ignored (``SIG_IGN``: a job started with ``&``
  from a non-interactive shell ignores SIGINT; ``nohup`` ignores SIGHUP) stays ignored,
  as Python's own SIGINT handling does;
- outside the main thread (an embedding program running the loop in a worker thread)
  nothing is installed: ``signal.signal`` only works in the main thread, and the caller
  stops the loop through its ``stop_requested`` flag instead;
- the caller's handlers are restored on exit, whatever ends the block: left installed, a
  later SIGTERM to an embedding process (a test runner, a supervisor) would go to a
  finished loop and be dropped.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals(
    on_stop: Callable[[int], None], *, process: str | None = None, what: str = "stopping"
) -> Iterator[list[int]]:
    """Inside the block, the first stop signal calls ``on_stop(signum)``; yields the list
    of signal numbers received (empty if none). ``process`` (e.g. "idql-learner") and
    ``what`` make the one stderr line printed at the first signal; None prints nothing."""
    received: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        log.debug("not in the main thread: no signal handlers installed")
        yield received
        return

    def _restore() -> None:
        for sig, handler in previous.items():
            # None: a handler not set from Python, which cannot be put back; the default
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _handler(signum: int, _frame: object) -> None:
        received.append(signum)
        _restore()  # a second signal acts at once
        if process:
            print(
                f"{process}: {signal.Signals(signum).name}: {what}; signal again to stop now",
                file=sys.stderr,
                flush=True,
            )
        on_stop(signum)

    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _handler)
    try:
        yield received
    finally:
        _restore()
