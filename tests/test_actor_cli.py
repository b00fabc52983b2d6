"""``idql-actor`` in-process: start-up refusals (exit 2) and a control loop that fails
(exit 1, the link still flushed), with a real Hopper-v5 env and a tiny real checkpoint."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actor.cli import main
from tests import faults
from tests.procs import free_port_pair


@pytest.fixture(scope="module")
def ckpt(hopper_store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faults.shared_checkpoint(hopper_store_path, tmp_path_factory.getbasetemp())


def base_args(ckpt: Path) -> list[str]:
    return ["--checkpoint", str(ckpt), "--env", "Hopper-v5", "--engine", "eager"]


def live_threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


LEARNER = "tcp://127.0.0.1:{port}"  # nothing listens there: the link is only opened

REFUSALS = [
    pytest.param(["--env", "NoSuchEnv-v0"], "NoSuchEnv-v0", id="bad-env"),
    # the link opens first, then the Actor refuses the env: the link must be closed again
    pytest.param(
        ["--env", "NoSuchEnv-v0", "--learner", LEARNER], "NoSuchEnv-v0", id="bad-env-with-link"
    ),
    # another task's env: was a failed control loop (exit 1) at the first decision
    pytest.param(["--env", "HalfCheetah-v5"], "(17,)", id="another-tasks-env"),
    pytest.param(
        ["--env", "HalfCheetah-v5", "--learner", LEARNER], "(11,)", id="another-tasks-env-link"
    ),
    pytest.param(["--learner", "ipc:///tmp/idql-x"], "pass --weights", id="ipc-without-weights"),
    pytest.param(["--rate-hz", "-1"], "got -1.0", id="rate-negative"),
    pytest.param(["--rate-hz", "nan"], "got nan", id="rate-nan"),
    pytest.param(["--rate-hz", "inf"], "got inf", id="rate-inf"),
    pytest.param(["--safe-action", "abc"], "'abc'", id="safe-not-a-number"),
    pytest.param(["--safe-action", "0,0"], "(3,)", id="safe-too-short"),
    pytest.param(["--safe-action", "0"], "(3,)", id="safe-one-value"),
    pytest.param(["--safe-action", "0,0,2"], "[-1, 1]", id="safe-out-of-range"),
    pytest.param(["--safe-action", "0,nan,0"], "finite", id="safe-nan"),
    pytest.param(["--learner", LEARNER, "--send-batch", "0"], "batch_size=0", id="send-batch-0"),
    pytest.param(
        ["--learner", "tcp://127.0.0.1:notaport", "--weights", "tcp://127.0.0.1:notaport"],
        "notaport",
        id="malformed-endpoint",
    ),
]


@pytest.mark.parametrize(("extra", "names"), REFUSALS)
def test_start_up_refusal_exits_2_with_a_message_and_leaves_nothing_open(
    ckpt: Path, extra: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port_pair()
    extra = [a.format(port=port) for a in extra]
    rc = main([*base_args(ckpt), "--max-seconds", "0.5", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]  # documented: refused at start-up
    lines = [ln for ln in err.splitlines() if ln.startswith("idql-actor: ")]
    assert len(lines) == 1 and names in lines[0], err[-2000:]  # the message names the value
    assert "Traceback" not in err
    assert live_threads("ActorLink-") == [] and live_threads("idql-decider") == []


class FailingEngine:
    """Wraps an engine; its ``fail_at``-th decide call raises (warm-up calls count)."""

    def __init__(self, engine: Any, fail_at: int) -> None:
        self._engine, self.fail_at, self.calls = engine, fail_at, 0

    def decide(self, obs: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected engine fault")
        return self._engine.decide(obs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@pytest.mark.parametrize(
    ("fail_at", "reason"),
    [
        # call 43: 3 warm-up calls, then 39 ticks; the decider surfaces it as
        # DecisionEngineFailed, which Actor.run does not catch (only OverrunLimit)
        pytest.param(43, "failed: DecisionEngineFailed", id="in-the-loop"),
        pytest.param(2, "failed: RuntimeError", id="in-warm-up"),  # before the loop starts
    ],
)
def test_a_failing_control_loop_still_flushes_the_link_and_exits_1(
    ckpt: Path,
    fail_at: int,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import idql_runtime.engines as engines

    build = engines.build_engine
    monkeypatch.setattr(  # actor.cli imports build_engine at call time
        engines, "build_engine", lambda *a, **kw: FailingEngine(build(*a, **kw), fail_at)
    )
    fl = faults.FakeLearner(free_port_pair())
    sigint_before = signal.getsignal(signal.SIGINT)
    try:
        rc = main(
            [
                *base_args(ckpt),
                "--rate-hz", "0", "--max-seconds", "30", "--send-batch", "64",
                "--safe-action", faults.SAFE_ARG, "--flush-timeout-s", "10",
                "--learner", f"tcp://127.0.0.1:{fl.port}",
                "--weights", f"tcp://127.0.0.1:{fl.port + 1}",
            ]
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert rc == 1, err[-2000:]  # documented: the control loop failed
        fin = json.loads(next(ln for ln in out.splitlines() if "actor_final" in ln))["actor_final"]
        steps = max(fail_at - 4, 0)  # decisions that succeeded on the clock, each executed
        assert fin["stop_reason"].startswith(reason) and "injected engine fault" in err
        assert fin["steps"] == steps
        # fewer rows than --send-batch: they reached the learner only through the flush
        assert fin["flushed"] and fl.row_count(0) == steps
        assert "idql-actor: the control loop failed" in err
        assert live_threads("ActorLink-") == [] and live_threads("idql-decider") == []
        assert signal.getsignal(signal.SIGINT) is sigint_before  # the caller's handler back
    finally:
        fl.close()


def test_overrun_limit_still_exits_3_after_flushing(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At 20 kHz no decision meets its 45 us deadline: 5 late in a row stop the actor
    (exit 3, not the failure status 1), each executed fallback being the safe action."""
    fl = faults.FakeLearner(free_port_pair())
    try:
        rc = main(
            [
                *base_args(ckpt),
                "--rate-hz", "20000", "--overrun-limit", "5", "--max-seconds", "30",
                "--safe-action", faults.SAFE_ARG,
                "--learner", f"tcp://127.0.0.1:{fl.port}",
                "--weights", f"tcp://127.0.0.1:{fl.port + 1}",
            ]
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert rc == 3, err[-2000:]
        fin = json.loads(next(ln for ln in out.splitlines() if "actor_final" in ln))["actor_final"]
        assert fin["stop_reason"].startswith("overrun_limit") and fin["flushed"]
        rows = fl.table(0)["action"]
        assert len(rows) == fin["steps"] == 4  # the 5th late decision stops before acting
        assert (rows == faults.SAFE).all()
    finally:
        fl.close()


def test_cpu_bf16_without_bf16_kernels_runs_emulated_and_says_so(
    ckpt: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An AVX2-only CPU (AMD Zen 3): ``--engine cpu --dtype bfloat16`` died at start-up in
    oneDNN's weight packing. It now acts on emulated bf16 and says so, in the log and the
    final report (forced here on any CPU)."""
    from idql_runtime import onednn

    monkeypatch.setattr(onednn, "bf16_native", lambda: False)
    caplog.set_level(logging.WARNING, logger="idql-actor")
    rc = main(
        ["--checkpoint", str(ckpt), "--env", "Hopper-v5", "--engine", "cpu", "--dtype",
         "bfloat16", "--samples", "8", "--max-seconds", "1", "--rate-hz", "0"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "bfloat16 is emulated on this CPU" in caplog.text
    fin = json.loads(next(ln for ln in out.splitlines() if "actor_final" in ln))["actor_final"]
    assert (fin["engine"], fin["dtype"], fin["bf16"]) == ("cpu", "bfloat16", "emulated")
    assert fin["steps"] > 0


SERVE_REFUSALS = [
    pytest.param(["--max-batch", "0"], "--max-batch must be >= 1, got 0", id="max-batch-0"),
    pytest.param(["--batch-window-s", "-1"], "got -1.0", id="window-negative"),
    pytest.param(["--batch-window-s", "nan"], "got nan", id="window-nan"),
    # 0 or less refused every request as stale; NaN none (it was accepted silently)
    pytest.param(["--max-request-age-s", "0"], "got 0.0", id="age-0"),
    pytest.param(["--max-request-age-s", "nan"], "got nan", id="age-nan"),
]


@pytest.mark.parametrize(("extra", "names"), SERVE_REFUSALS)
def test_serve_refuses_bad_arguments_at_start_up(
    ckpt: Path, extra: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port_pair()
    rc = main(
        [*base_args(ckpt), "--serve", f"tcp://127.0.0.1:{port}", "--max-seconds", "0.5", *extra]
    )
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("idql-actor: ")]
    assert len(lines) == 1 and names in lines[0], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("endpoint", ["in-use", "foo"])
def test_serve_on_an_endpoint_that_cannot_be_bound_is_refused_naming_it(
    ckpt: Path, endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port held by another server (or an endpoint with no transport) printed pyzmq's
    (the library's) traceback and exited 1."""
    import zmq

    ctx = zmq.Context()
    holder = ctx.socket(zmq.ROUTER)
    if endpoint == "in-use":
        endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
        holder.bind(endpoint)
        names = f"cannot bind '{endpoint}': Address already in use"
    else:
        names = "endpoint 'foo' has no transport"
    try:
        rc = main([*base_args(ckpt), "--serve", endpoint, "--max-seconds", "0.5"])
    finally:
        holder.close(linger=0)
        ctx.term()
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"idql-actor: {names}" in err and "Traceback" not in err


def test_serve_answers_then_gives_the_callers_signal_handlers_back(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real client gets an action from `--serve` (in a thread of this process); after
    `--max-seconds` the server returns 0 with SIGTERM/SIGINT back to the caller's."""
    from idql_runtime.client import ActionClient

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    got: dict[str, Any] = {}

    def ask() -> None:
        with ActionClient(endpoint, timeout_s=10.0) as client:
            got["action"], got["version"], _ = client.act(np.zeros(11, np.float32))

    asker = threading.Thread(target=ask)
    asker.start()
    rc = main([*base_args(ckpt), "--serve", endpoint, "--max-seconds", "3"])
    asker.join(15)
    assert rc == 0, capsys.readouterr().err[-2000:]
    action = np.asarray(got["action"])
    assert action.shape == (3,) and np.all(np.abs(action) <= 1.0) and got["version"] == 0
    assert {s: signal.getsignal(s) for s in before} == before
