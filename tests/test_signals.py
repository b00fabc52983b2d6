"""idql_runtime.signals.stop_on_signals: the one way every loop (actor, server, both
learners) takes SIGTERM / SIGINT. Real signals, sent to this process with os.kill."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from idql_runtime.signals import stop_on_signals


@pytest.fixture
def recorder() -> Iterator[list[tuple[str, int]]]:
    """Installs a recording handler for SIGTERM and SIGINT, as an embedding program's
    own handlers; puts pytest's back afterwards."""
    calls: list[tuple[str, int]] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in saved:
        signal.signal(s, lambda signum, _f: calls.append(("caller", signum)))
    yield calls
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_stops_the_loop_and_the_second_goes_to_the_callers_handler(
    recorder: list[tuple[str, int]], sig: signal.Signals, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, a second Ctrl-C during a long evaluation round or a flush did nothing: the
    loop's handler only set its stop flag again."""
    with stop_on_signals(lambda s: recorder.append(("loop", s)), process="proc") as got:
        os.kill(os.getpid(), sig)
        assert recorder == [("loop", sig)] and got == [sig]
        os.kill(os.getpid(), sig)
        assert recorder == [("loop", sig), ("caller", sig)]
    err = capsys.readouterr().err
    assert f"proc: {sig.name}: stopping; signal again to stop now" in err
    # after the block the caller's handlers are in place (the second signal restored them)
    os.kill(os.getpid(), signal.SIGTERM)
    assert recorder[-1] == ("caller", signal.SIGTERM)


def test_the_callers_handlers_come_back_when_no_signal_came(
    recorder: list[tuple[str, int]],
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals(lambda s: recorder.append(("loop", s))) as got:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before and got == []
    os.kill(os.getpid(), signal.SIGINT)
    assert recorder == [("caller", signal.SIGINT)]


def test_a_signal_the_process_ignores_stays_ignored(recorder: list[tuple[str, int]]) -> None:
    """A job started with `&` from a non-interactive shell has SIGINT ignored: a Ctrl-C
    meant for the shell's foreground job must not stop it (Python's own rule)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with stop_on_signals(lambda s: recorder.append(("loop", s))) as got:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # not ignored: handled
    assert got == [signal.SIGTERM] and recorder == [("loop", signal.SIGTERM)]
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_outside_the_main_thread_nothing_is_installed() -> None:
    """signal.signal raises ValueError outside the main thread: an embedding program that
    runs a loop in a worker thread used to crash at its start."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    seen: list[object] = []

    def worker() -> None:
        try:
            with stop_on_signals(lambda s: None) as got:
                seen.append({s: signal.getsignal(s) for s in before} == before)
                seen.append(got)
        except Exception as e:  # noqa: BLE001 - the failure this test is about
            seen.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [True, []]
