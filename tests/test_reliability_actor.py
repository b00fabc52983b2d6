"""reliability.md scenarios 9, 10 and 11 with real actor and learner processes.

9 and 10 run ``python -m actor`` against a ``FakeLearner`` (a LearnerLink in this
process) that keeps every transition the actor executed, in order, and publishes
whatever weights the test hands it. 11 kills a real learner while it checkpoints.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from idql_runtime import protocol as P
from idql_runtime.checkpoint import load_checkpoint, restore_agent
from tests import faults
from tests.faults import LEARN, final
from tests.procs import Proc, actor, free_port_pair, learner


@pytest.fixture(scope="module")
def ckpt(hopper_store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faults.shared_checkpoint(hopper_store_path, tmp_path_factory.getbasetemp())


@pytest.fixture
def reaper():
    procs: list[Proc] = []
    closers: list = []
    yield procs, closers
    for p in procs:
        p.kill()
    for c in closers:
        c.close()


def fake_learner(reaper) -> faults.FakeLearner:
    fl = faults.FakeLearner(free_port_pair())
    reaper[1].append(fl)
    return fl


def run_actor(tmp: Path, ckpt: Path, fl: faults.FakeLearner, i: int, reaper, *extra: str, **kw):
    p = actor(tmp, ckpt, fl.port, i, "--status-interval-s", "0.5", *extra, **kw)
    reaper[0].append(p)
    return p


def good_weights(ckpt: Path) -> dict[str, np.ndarray]:
    """What a learner publishes (the critic groups) for this checkpoint."""
    agent = restore_agent(load_checkpoint(ckpt, with_train_state=False), optimisers=False)
    return {
        k: v.detach().numpy().copy()
        for k, v in agent.inference_state().items()
        if k.startswith(("q_target.", "v."))
    }


def rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b).all(axis=1)


# --------------------------------------------------------------------------- scenario 9


def test_9_late_decisions_get_the_fallback_and_are_never_executed(
    ckpt: Path, tmp_path: Path, reaper
) -> None:
    """Slow: every 7th decision takes 60 ms (3 ticks at 50 Hz) and returns MARKER.
    Limit: at 20 kHz no decision can meet its deadline; 5 in a row stop the actor."""
    fl = fake_learner(reaper)
    slow = run_actor(
        tmp_path, ckpt, fl, 0, reaper,
        "--rate-hz", "50", "--safe-action", faults.SAFE_ARG, "--max-seconds", "5",
        module=["-m", "tests.faults", "slow-actor", "--every", "7", "--sleep-s", "0.06", "--"],
    )  # fmt: skip
    limited = run_actor(
        tmp_path, ckpt, fl, 1, reaper,
        "--rate-hz", "20000", "--overrun-limit", "5", "--safe-action", faults.SAFE_ARG,
    )  # fmt: skip
    t = time.monotonic()
    assert limited.wait(60) == 3, limited.stderr()[-2000:]  # documented: exit status 3
    fin_lim = limited.find("actor_final")[-1]
    # new weights keep coming while slow decisions run: swaps must wait for them
    good = good_weights(ckpt)
    version = 1
    while slow.popen.poll() is None and version < 400:
        fl.publish_weights(version, good)
        version += 1
        time.sleep(0.01)
    fin = final(slow, "actor_final", 60)
    engine = slow.find("slow_engine")[-1]
    assert fin["weight_swaps"] >= 10 and engine["swaps"] == fin["weight_swaps"]
    assert engine["mid_decision_swaps"] == 0  # never a swap while a decision runs

    rows = fl.table(0)
    executed = rows["action"]
    assert len(executed) == fin["steps"] == fin["decisions"] + fin["fallbacks"]
    assert fin["fallbacks"] > 10 and fin["overruns"] == fin["fallbacks"]
    assert not rows_equal(executed, faults.MARKER).any()  # a late action is never executed
    assert rows_equal(executed, faults.SAFE).sum() == fin["fallbacks"]  # the fallback was
    assert fin["max_consecutive_overruns"] <= 6 and fin["stop_reason"] == "budget"
    # the slow decision never held up the control loop: the fallback came at the deadline
    assert fin["missed_ticks"] <= 3 and fin["rate_hz_achieved"] >= 47.0

    assert fin_lim["stop_reason"].startswith("overrun_limit")
    assert fin_lim["overruns"] == 5 and fin_lim["decisions"] == 0
    lim_rows = fl.table(1)["action"]
    assert len(lim_rows) == fin_lim["steps"] == 4  # the 5th late decision stops before acting
    assert rows_equal(lim_rows, faults.SAFE).all()
    assert fin_lim["flushed"] and time.monotonic() - t < 60


def test_9_a_result_seen_after_a_late_wakeup_is_still_late() -> None:
    """The control thread can wake from its wait after the deadline and find the result
    there: if the worker finished *after* the deadline it is late all the same. (A fake
    clock makes this deterministic: the worker finishes at t=2, the deadline is t=1.)"""
    import threading

    from idql_runtime.control import DeadlineDecider

    def clock() -> float:
        return 2.0 if threading.current_thread().name == "idql-decider" else 0.0

    d = DeadlineDecider(lambda o: np.ones(3, np.float32), 3, safe_action=faults.SAFE)
    try:
        action, late = d.decide(np.zeros(11, np.float32), deadline=1.0, clock=clock)
        assert late and np.array_equal(action, faults.SAFE)
        assert d.stats.decisions == 0 and d.stats.overruns == 1
        action, late = d.decide(np.zeros(11, np.float32), deadline=None)  # no deadline
        assert not late and np.array_equal(action, np.ones(3, np.float32))
    finally:
        d.close()


# --------------------------------------------------------------------------- scenario 10


def bad_updates(good: dict[str, np.ndarray], v: int) -> list[tuple[str, bytes]]:
    """Weight messages an actor must refuse, versions v..v+5 (each newer than the last)."""
    name = next(k for k, a in good.items() if a.ndim == 2)
    rows, cols = good[name].shape
    wrong_shape = {**good, name: np.zeros((rows + 1, cols), np.float32)}
    nan = P.make_weights(v + 1, good)
    t = np.array(nan["tensors"][name])
    t[0, 0] = np.nan
    nan["tensors"][name] = t
    nan["sha256"] = P.weights_sha256(nan["tensors"])  # a correct hash of NaN weights
    full = P.encode(P.make_weights(v + 2, good))
    wrong_hash = P.make_weights(v + 3, good)
    wrong_hash["sha256"] = "0" * 64
    unknown = {**good, "evil.w": np.ones(3, np.float32)}
    missing = {k: a for k, a in good.items() if k != name}
    return [
        ("wrong_shape", P.encode(P.make_weights(v, wrong_shape))),  # refused by the agent
        ("nan", P.encode(nan)),  # refused by the link (protocol: non_finite)
        ("truncated", full[: len(full) // 2]),  # link: malformed
        ("wrong_hash", P.encode(wrong_hash)),  # link: hash_mismatch
        ("unknown_tensor", P.encode(P.make_weights(v + 4, unknown))),  # agent
        ("missing_tensor", P.encode(P.make_weights(v + 5, missing))),  # agent
    ]


def test_10_bad_weight_updates_keep_the_old_weights_only_newer_versions_apply(
    ckpt: Path, tmp_path: Path, reaper
) -> None:
    """Two actors with the same seeds at --rate-hz 0 (no deadline, so deterministic):
    the reference gets no weights; the other gets a stream of bad updates (each newer
    than the last), then a good one, then a stale good one. Until the good one its
    actions must be bit-identical to the reference's; after it they must differ (so the
    comparison can see a weight change)."""
    good = good_weights(ckpt)
    rng = np.random.default_rng(10)
    changed = {
        k: (v + rng.normal(0, 0.5, v.shape).astype(np.float32) if k.startswith("q_target.") else v)
        for k, v in good.items()
    }
    ref_fl, fl = fake_learner(reaper), fake_learner(reaper)
    args = ("--rate-hz", "0", "--seed", "3", "--max-seconds", "120")
    ref = run_actor(tmp_path, ckpt, ref_fl, 0, reaper, *args, name="reference")
    act = run_actor(tmp_path, ckpt, fl, 0, reaper, *args)
    end, v = time.monotonic() + 90, 1
    while True:  # bad updates, ever newer, until each kind was refused at least twice
        assert time.monotonic() < end, f"bad updates not all seen: {fl.heartbeat(0)}"
        for _, data in bad_updates(good, v):
            fl.publish_raw(data)
            time.sleep(0.02)
        v += 6
        hb = fl.heartbeat(0)
        seen = hb.get("weights_rejected", 0) >= 6 and hb.get("weights_received", 0) >= 6
        if seen and fl.row_count(0) > 800:
            break
    good_v = v + 100

    def applied() -> bool:
        fl.publish_weights(good_v, changed)
        return good_v in fl.table(0)["policy_version"]

    faults.wait_until(applied, 30, "the good update applied", 0.1)
    for _ in range(10):  # stale: older than the applied version, however good
        fl.publish_weights(good_v - 1, good)
        time.sleep(0.05)
    faults.wait_until(lambda: fl.heartbeat(0).get("weights_stale", 0) >= 1, 10, "stale seen")
    act.signal(signal.SIGTERM)
    fin = final(act, "actor_final")
    n_rows = len(fl.table(0)["reward"])
    faults.wait_until(lambda: ref_fl.row_count(0) >= n_rows, 60, "reference rows")
    ref.signal(signal.SIGTERM)
    final(ref, "actor_final")

    assert fin["policy_version"] == good_v and fin["weight_swaps"] == 1
    assert fin["weights_refused"] >= 6  # wrong shape, unknown tensor, missing tensor
    assert fin["link_final"]["weights_rejected"] >= 6  # NaN, truncated, wrong hash
    assert fin["link_final"]["weights_stale"] >= 1
    rows, ref_rows = fl.table(0), ref_fl.table(0)
    n = min(len(rows["reward"]), len(ref_rows["reward"]))
    assert set(np.unique(rows["policy_version"])) == {0, good_v}  # nothing else was used
    before = rows["policy_version"][:n] == 0
    assert before.sum() > 800 and (~before).sum() > 20
    for k in ("obs", "action"):  # old weights, bit for bit, through every bad update
        assert (rows[k][:n][before] == ref_rows[k][:n][before]).all(), k
    assert (rows["action"][:n][~before] != ref_rows["action"][:n][~before]).any()


# --------------------------------------------------------------------------- scenario 11


@pytest.mark.parametrize(
    "kills", [pytest.param(2, id="2kills"), pytest.param(6, id="6kills", marks=pytest.mark.slow)]
)
def test_11_crash_while_checkpointing_restart_loads_newest_complete(
    ckpt: Path, tmp_path: Path, reaper, kills: int
) -> None:
    """online.checkpoint_interval_s=0: the learner checkpoints after every loop that did
    updates, so a SIGKILL at a random moment often lands inside save_checkpoint. After
    one kill the newest complete checkpoint is also corrupted (as a bad disk could):
    the restart must skip it for the one before."""
    rng = np.random.default_rng(11 + kills)
    port = free_port_pair()
    ckpts = tmp_path / "run" / "checkpoints"
    extra = ("--set", "online.checkpoint_interval_s=0")

    def start(k: int) -> Proc:
        p = learner(
            tmp_path,
            ckpt,
            tmp_path / "online.zarr",
            port,
            tmp_path / "run",
            *LEARN,
            *extra,
            name=f"learner{k}",
        )
        reaper[0].append(p)
        return p

    lrn = start(0)
    act = actor(tmp_path, ckpt, port, 0, "--max-seconds", "150", "--flush-timeout-s", "20")
    reaper[0].append(act)
    torn = 0
    k = 0
    while k < kills or (torn == 0 and k < kills + 6):
        lrn.wait_for("learner", lambda s: s["updates"] > 0, timeout_s=90, since=0)
        if k % 2 == 0:  # a random moment
            time.sleep(rng.uniform(0.3, 1.5))
        else:  # a chosen moment: as soon as a checkpoint's temp dir appears
            faults.wait_until(lambda: any(ckpts.glob(".tmp-*")), 30, "a checkpoint write", 0.0005)
        lrn.kill()
        torn += any(ckpts.glob(".tmp-*"))  # the kill interrupted a checkpoint being written
        if k == 1:  # corrupt the newest complete one: the restart must fall back further
            newest = load_checkpoint(ckpts, with_train_state=False).path
            with open(newest / "weights.safetensors", "r+b") as f:
                f.seek(64)
                f.write(b"\xde\xad\xbe\xef")
        expected = load_checkpoint(ckpts, with_train_state=False)  # newest complete one
        k += 1
        lrn = start(k)
        lrn.wait_for("learner", timeout_s=90)
        m = re.search(r"learner resumed from (\S+):", lrn.stderr())
        assert m and Path(m.group(1)) == expected.path, (lrn.stderr()[-800:], expected.path)
        s = lrn.find("learner")[0]
        assert s["updates"] >= expected.meta["train_json"]["updates"]
    assert torn >= 1, "no kill landed inside a checkpoint write"
    act.signal(signal.SIGTERM)
    final(act, "actor_final")
    lrn.signal(signal.SIGTERM)
    lfin = final(lrn, "learner_final")
    assert not list(ckpts.glob(".tmp-*"))  # a later save cleaned the dead writers' temp dirs
    newest = load_checkpoint(ckpts, with_train_state=False)
    assert newest.meta["train_json"]["updates"] == lfin["updates"]
    assert lfin["rows"] > 0
    # no valid checkpoint left at all: start from --pretrained, keep the store's rows
    for c in ckpts.glob("ckpt_*"):
        (c / "meta.json").unlink()
    lrn = start(k + 1)
    s = lrn.wait_for("learner", timeout_s=90)
    assert "starting from --pretrained" in lrn.stderr() and s["rows"] == lfin["rows"]
    lrn.signal(signal.SIGTERM)
    final(lrn, "learner_final")
