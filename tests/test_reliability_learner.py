"""reliability.md scenarios 1, 2, 3, 4, 8, 14, 15 with real learner and actor processes.

Every test runs ``python -m learner`` and ``python -m actor`` (Hopper-v5, the TINY
checkpoint) on loopback, injects the fault with signals, a lossy proxy or a small file
system (tests/faults.py), and then checks the replay store by content: per actor the
rows equal what the actor saw acknowledged, no row twice, no episode with a hole.
Every wait has a timeout and every process is killed in teardown.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests import faults
from tests.faults import LEARN, final, last
from tests.procs import Proc, actor, free_port_pair, learner


@pytest.fixture(scope="module")
def ckpt(hopper_store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faults.shared_checkpoint(hopper_store_path, tmp_path_factory.getbasetemp())


@pytest.fixture
def reaper():
    """Processes to SIGKILL (whole process group) when the test ends, however it ends."""
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.kill()


def start_learner(tmp: Path, ckpt: Path, port: int, reaper: list, *extra: str, **kw) -> Proc:
    name = kw.pop("name", "learner")
    replay = kw.pop("replay", tmp / "online.zarr")
    p = learner(tmp, ckpt, replay, port, tmp / "run", *LEARN, *extra, name=name, **kw)
    reaper.append(p)
    return p


def start_actor(tmp: Path, ckpt: Path, port: int | None, i: int, reaper: list, *extra: str, **kw):
    p = actor(tmp, ckpt, port, i, "--status-interval-s", "0.5", *extra, **kw)
    reaper.append(p)
    return p


def check_actor_rows(data: dict, actor_id: int, fin: dict, *, cut_episodes: int = 1) -> dict:
    """The store holds exactly the rows the actor saw acked, each once, episodes whole
    (only the last ``cut_episodes`` may be cut short, never holed)."""
    link = fin["link_final"]
    rows = faults.rows_of(data, actor_id)
    assert len(rows["reward"]) == link["acked"], (actor_id, len(rows["reward"]), link)
    assert faults.duplicate_rows(rows) == 0
    breaks = faults.chain_breaks(rows)
    assert sum(breaks.values()) <= cut_episodes, breaks
    assert all(v == 1 for v in faults.episode_starts(rows).values())
    return rows


# --------------------------------------------------------------------------- scenario 1


@pytest.mark.parametrize(
    "kills",
    [pytest.param(1, id="1kill"), pytest.param(4, id="4kills", marks=pytest.mark.slow)],
)
def test_1_learner_sigkilled_mid_append_loses_and_duplicates_nothing(
    ckpt: Path, hopper_store_path: Path, tmp_path: Path, reaper: list, kills: int
) -> None:
    """SIGKILL the learner at random moments while 2 actors stream (every other time
    after freezing it for 0.3 s, so that batches are surely in flight unacknowledged);
    restart it on the same --run-dir/--replay each time. After the first kill a torn
    append (rows past the commit counter, stray *.partial files) is planted on top of
    what the kill left."""
    rng = np.random.default_rng(1000 + kills)
    port = free_port_pair()
    replay = tmp_path / "online.zarr"
    lrn = start_learner(tmp_path, ckpt, port, reaper, offline=hopper_store_path, name="learner0")
    actors = [
        start_actor(
            tmp_path, ckpt, port, i, reaper, "--max-seconds", "150", "--flush-timeout-s", "30"
        )
        for i in range(2)
    ]
    rows_at_kill = 0
    version_at_kill = 0
    for k in range(kills):
        lrn.wait_for(
            "learner",
            lambda s, n=rows_at_kill: s["rows"] >= n + 150 and s["policy_version"] >= 12,
            timeout_s=90,
        )
        time.sleep(rng.uniform(0.0, 1.0))  # a random moment of the stream
        acked = {i: last(a, "actor")["link"]["acked"] for i, a in enumerate(actors)}
        if k % 2 == 0:  # frozen first, wherever it was: batches in flight are never acked
            lrn.signal(signal.SIGSTOP)
            time.sleep(0.3)
        lrn.kill()  # SIGKILL
        # a status line printed after the kill has every version the dead learner sent
        after = [a.wait_for("actor", timeout_s=30, since=a.count("actor")) for a in actors]
        version_at_kill = max(s["policy_version"] for s in after)
        seen = [a.count("actor") for a in actors]
        data, _ = faults.read_store(replay)
        for i in acked:  # acknowledged before the kill -> committed
            assert (data["actor_id"] == i).sum() >= acked[i], (k, i, acked[i])
        rows_at_kill = len(data["reward"])
        stray = faults.partial_files(replay)  # what the kill left mid-write, if anything
        if k == 0:
            stray += faults.plant_torn_append(replay, rows=50, value=12345.0)
        foreign, committed = faults.sampled_rows_are_committed(replay)
        assert (foreign, committed) == (0, rows_at_kill)
        lrn = start_learner(
            tmp_path, ckpt, port, reaper, offline=hopper_store_path, name=f"learner{k + 1}"
        )
        lrn.wait_for("learner", timeout_s=90)
        assert not any(f.exists() for f in stray)  # the reopened writer removed them
    # the restarted learner's weights are taken: its versions continue above the old ones
    for a, n in zip(actors, seen, strict=True):
        a.wait_for("actor", lambda s: s["policy_version"] > version_at_kill, 60, since=n)
    for a in actors:
        a.signal(signal.SIGTERM)
    fins = [final(a, "actor_final", 60) for a in actors]
    lrn.signal(signal.SIGTERM)
    lfin = final(lrn, "learner_final", 60)

    data, meta = faults.read_store(replay)
    total = 0
    for i, fin in enumerate(fins):
        link = fin["link_final"]
        assert fin["flushed"] and link["acked"] == link["sent"] == link["submitted"], link
        check_actor_rows(data, i, fin)
        total += link["acked"]
    assert len(data["reward"]) == total == lfin["rows"]
    assert not (data["obs"] == 12345.0).any()  # the torn rows never became committed rows
    assert faults.partial_files(replay) == []
    # versions only grow across a crash, although the restart resumes an older checkpoint:
    # at most the restart's first few publications are older than what an actor holds
    # (restarting versions from the checkpoint, every one would be, 12+ per kill)
    assert all(f["link_final"]["weights_stale"] <= 4 * kills for f in fins), [
        f["link_final"]["weights_stale"] for f in fins
    ]
    assert sum(f["link_final"]["resent"] for f in fins) > 0  # the kills cost resends ...
    for i, fin in enumerate(fins):  # ... and each (actor, seq) is committed once
        ivs = meta["seq_table"][str(i)]
        assert len(ivs) == 1 and ivs[0][1] - ivs[0][0] + 1 == fin["link_final"]["sent_batches"]


# --------------------------------------------------------------------------- scenario 2


def test_2_actor_sigkilled_mid_episode_is_freed_and_its_episode_truncated(
    ckpt: Path, tmp_path: Path, reaper: list
) -> None:
    port = free_port_pair()
    replay = tmp_path / "online.zarr"
    lrn = start_learner(tmp_path, ckpt, port, reaper)
    keep = start_actor(tmp_path, ckpt, port, 0, reaper, "--max-seconds", "90")
    doomed = start_actor(tmp_path, ckpt, port, 1, reaper, "--max-seconds", "90")
    doomed.wait_for("actor", lambda s: s["link"]["acked"] >= 150, timeout_s=90)
    time.sleep(np.random.default_rng(2).uniform(0.0, 0.4))
    doomed.kill()  # SIGKILL, mid-episode (Hopper episodes here last ~0.4 s)
    killed_at = time.monotonic()
    s = lrn.wait_for("learner", lambda s: s["actors_dead"] >= 1, timeout_s=30)
    noticed_s = time.monotonic() - killed_at
    assert s["actors_live"] == 1 and "1" not in s["actors"]  # its link state is freed
    assert noticed_s < 2.0 + 5.0  # --heartbeat-liveness-s 2 (tests/procs.py) + slack
    assert re.search(r"actor 1 missed its heartbeats: freed", lrn.stderr())
    keep.signal(signal.SIGTERM)
    fin0 = final(keep, "actor_final")
    # the stopped actor is declared dead too; then its cut episode is recorded as well
    lrn.wait_for("learner", lambda s: s["actors_dead"] >= 2, timeout_s=30)
    lrn.signal(signal.SIGTERM)
    final(lrn, "learner_final")

    data, meta = faults.read_store(replay)
    marked = {(a, e) for a, e in meta["truncated_episodes"]}
    for actor_id in (0, 1):
        rows = faults.rows_of(data, actor_id)
        assert len(rows["reward"]) > 0
        # whole rows only: every field of every committed row is there and finite
        for k in ("obs", "action", "reward", "next_obs"):
            assert np.isfinite(rows[k]).all(), k
        assert faults.duplicate_rows(rows) == 0
        breaks = faults.chain_breaks(rows)
        assert all(v == 1 for v in faults.episode_starts(rows).values())  # no holes
        ended = {
            int(e)
            for e in np.unique(rows["episode_id"])
            if (rows["terminated"] | rows["truncated"])[rows["episode_id"] == e].any()
        }
        open_eps = {e for e in breaks if e not in ended}
        # stored truncated (marked in the commit record) or not at all; never open
        assert {(actor_id, e) for e in open_eps} == {m for m in marked if m[0] == actor_id}
        assert all(breaks[e] == 1 for e in open_eps) and all(breaks[e] == 0 for e in ended)
    assert len(faults.rows_of(data, 0)["reward"]) == fin0["link_final"]["acked"]
    # the marking was exercised (each actor stopped mid-episode unless its very last
    # step happened to end one, ~1/45 each)
    assert marked


# --------------------------------------------------------------------------- scenarios 3, 8


def windows(p: Proc, t0: float, t1: float) -> list[dict]:
    """Per-status-line deltas of an actor between arrival times t0 and t1."""
    lines = p.find_timed("actor")
    out = []
    for (ta, a), (tb, b) in zip(lines, lines[1:], strict=False):
        if t0 <= ta and tb <= t1:
            dt = tb - ta
            out.append(
                {
                    "hz": (b["steps"] - a["steps"]) / dt,
                    "missed": b["missed_ticks"] - a["missed_ticks"],
                    "overruns": b["overruns"] - a["overruns"],
                    "late_p99_ms": b["tick_late"].get("p99_ms", 0.0),
                    "unacked": b["link"]["unacked"],
                    "lag_s": b["link"]["lag_s"],
                }
            )
    return out


def assert_control_unaffected(base: list[dict], fault: list[dict], rate_hz: float) -> dict:
    """The control loop during the fault looks like the baseline: rate, missed ticks,
    overruns and tick jitter (medians over status windows, so one scheduler hiccup of
    a shared machine does not decide)."""
    assert len(base) >= 3 and len(fault) >= 3, (len(base), len(fault))
    med = lambda ws, k: float(np.median([w[k] for w in ws]))  # noqa: E731
    summary = {
        k: (round(med(base, k), 3), round(med(fault, k), 3))
        for k in ("hz", "missed", "overruns", "late_p99_ms")
    }
    assert med(fault, "hz") >= 0.93 * rate_hz, summary
    assert med(fault, "missed") <= med(base, "missed") + 1, summary
    assert med(fault, "overruns") <= med(base, "overruns") + 2, summary
    assert med(fault, "late_p99_ms") <= max(
        2 * med(base, "late_p99_ms"), med(base, "late_p99_ms") + 2.0
    ), summary
    return summary


@pytest.mark.slow
def test_3_learner_down_then_back_rate_unaffected_buffer_bounded_resent_once(
    ckpt: Path, tmp_path: Path, reaper: list
) -> None:
    capacity = 250  # 2 s of Hopper at 125 Hz: a 6 s outage must overflow it
    port = free_port_pair()
    replay = tmp_path / "online.zarr"
    lrn = start_learner(tmp_path, ckpt, port, reaper)
    act = start_actor(
        tmp_path, ckpt, port, 0, reaper,
        "--buffer-capacity", str(capacity), "--max-seconds", "120", "--flush-timeout-s", "20",
    )  # fmt: skip
    act.wait_for("actor", lambda s: s["link"]["acked"] > 100, timeout_s=90)
    t_base = time.monotonic()
    time.sleep(4.0)
    lrn.signal(signal.SIGSTOP)  # frozen, then killed: what was in flight is never acked
    t_down = time.monotonic()
    time.sleep(0.3)
    lrn.kill()
    time.sleep(5.7)
    t_back = time.monotonic()
    acked_down = last(act, "actor")["link"]["acked"]
    n = act.count("actor")
    lrn = start_learner(tmp_path, ckpt, port, reaper, name="learner1")
    s = act.wait_for(
        "actor",
        lambda s: s["link"]["acked"] > acked_down and s["link"]["unacked"] < 64,
        timeout_s=60,
        since=n,
    )
    assert s["link"]["resent"] > 0
    time.sleep(2.0)
    act.signal(signal.SIGTERM)
    fin = final(act, "actor_final")
    lrn.signal(signal.SIGTERM)
    lfin = final(lrn, "learner_final")

    summary = assert_control_unaffected(
        windows(act, t_base, t_down), windows(act, t_down + 0.5, t_back), 125.0
    )
    print("control during outage (baseline, outage):", summary)
    statuses = act.find("actor")
    assert max(s["link"]["unacked"] for s in statuses) <= capacity  # bounded
    link = fin["link_final"]
    assert link["dropped"] > 0  # the oldest were dropped, and counted
    assert link["submitted"] == link["acked"] + link["dropped"] + link["invalid"] + link["rejected"]
    assert link["pending"] == 0 and fin["flushed"]
    assert link["resent"] > 0
    data, _ = faults.read_store(replay)
    rows = faults.rows_of(data, 0)
    assert len(rows["reward"]) == link["acked"] == lfin["rows"]
    assert faults.duplicate_rows(rows) == 0  # resends deduplicated
    # the outage cut a few episodes (dropped rows), the rest are whole
    breaks = faults.chain_breaks(rows)
    assert sum(v > 0 for v in breaks.values()) <= 1 + int(np.ceil(link["dropped"] / 30)), breaks


@pytest.mark.slow
def test_8_learner_sigstopped_10s_actor_jitter_unchanged_lag_reported_memory_bounded(
    ckpt: Path, tmp_path: Path, reaper: list
) -> None:
    capacity = 600
    port = free_port_pair()
    replay = tmp_path / "online.zarr"
    lrn = start_learner(tmp_path, ckpt, port, reaper)
    act = start_actor(
        tmp_path, ckpt, port, 0, reaper,
        "--buffer-capacity", str(capacity), "--max-seconds", "120", "--flush-timeout-s", "20",
    )  # fmt: skip
    act.wait_for("actor", lambda s: s["link"]["acked"] > 100, timeout_s=90)
    t_base = time.monotonic()
    time.sleep(4.0)
    rss_before = faults.rss_mib(act.popen.pid)
    lrn.signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    rss_during = []
    while time.monotonic() - t_stop < 10.0:
        time.sleep(0.5)
        rss_during.append(faults.rss_mib(act.popen.pid))
    n = act.count("actor")
    lrn.signal(signal.SIGCONT)
    t_cont = time.monotonic()
    act.wait_for(
        "actor",
        lambda s: s["link"]["unacked"] < 64 and s["link"]["lag_s"] < 1.0,
        timeout_s=60,
        since=n,
    )
    act.signal(signal.SIGTERM)
    fin = final(act, "actor_final")
    lrn.signal(signal.SIGTERM)
    final(lrn, "learner_final")

    during = windows(act, t_stop + 0.5, t_cont)
    summary = assert_control_unaffected(windows(act, t_base, t_stop), during, 125.0)
    print("control while the learner is frozen (baseline, frozen):", summary)
    assert max(w["lag_s"] for w in during) >= 4.0  # the lag is reported while frozen
    assert max(w["unacked"] for w in during) <= capacity
    assert max(rss_during) - rss_before < 30.0, (rss_before, rss_during)  # bounded memory
    link = fin["link_final"]
    assert fin["flushed"] and link["pending"] == 0
    data, _ = faults.read_store(replay)
    rows = faults.rows_of(data, 0)
    assert len(rows["reward"]) == link["acked"]
    assert faults.duplicate_rows(rows) == 0


# --------------------------------------------------------------------------- scenario 4


def test_4_lossy_link_each_batch_lands_exactly_once_gaps_reported_no_deadlock(
    ckpt: Path, tmp_path: Path, reaper: list
) -> None:
    port = free_port_pair()
    replay = tmp_path / "online.zarr"
    lrn = start_learner(tmp_path, ckpt, port, reaper, "--status-interval-s", "0.25")
    proxy = faults.LossyProxy(
        f"tcp://127.0.0.1:{port}", drop=0.15, dup=0.15, reorder=0.4, max_delay_s=0.08, seed=4
    )
    try:
        lrn.wait_for("learner", timeout_s=90)
        via = ["--learner", proxy.endpoint, "--weights", f"tcp://127.0.0.1:{port + 1}"]
        actors = [
            start_actor(
                tmp_path,
                ckpt,
                None,
                i,
                reaper,
                *via,
                "--max-seconds",
                "8",
                "--resend-timeout-s",
                "0.4",
                "--flush-timeout-s",
                "30",
            )  # fmt: skip
            for i in range(2)
        ]
        fins = [final(a, "actor_final", 90) for a in actors]
        lrn.signal(signal.SIGTERM)
        lfin = final(lrn, "learner_final")
    finally:
        proxy.close()
    lossy = proxy.stats()
    print("proxy:", lossy)
    for d in ("up", "down"):
        assert lossy[d]["dropped"] > 0 and lossy[d]["duplicated"] > 0 and lossy[d]["delayed"] > 0
    data, meta = faults.read_store(replay)
    for i, fin in enumerate(fins):
        link = fin["link_final"]
        assert fin["flushed"] and link["acked"] == link["sent"] == link["submitted"], link
        check_actor_rows(data, i, fin)
        ivs = meta["seq_table"][str(i)]  # every seq exactly once, none missing at the end
        assert len(ivs) == 1 and ivs[0][1] - ivs[0][0] + 1 == link["sent_batches"]
        assert link["resent"] > 0
    assert lfin["duplicates"] > 0  # duplicated and resent batches came in, and were dropped
    gaps = [g["gaps"] for s in lrn.find("learner") for g in s["actors"].values()]
    assert max(gaps) > 0  # gaps were reported while batches were missing ...
    assert all(v["gaps"] == 0 for v in lfin["actors"].values())  # ... and closed


# --------------------------------------------------------------------------- scenario 14


def test_14_sigint_sigterm_exit_0_flushed_sockets_closed(
    ckpt: Path, tmp_path: Path, reaper: list
) -> None:
    """Actor A (SIGINT) and actor B (id 2**30) stream; A stops with the learner up and
    must be fully acked; the learner stops on SIGTERM (checkpoint, exit 0, ports free at
    once); B stops with the learner gone: exit 0 after the bounded flush, its unacked rows
    counted, every row it saw acked in the store."""
    import zmq

    port = free_port_pair()
    replay = tmp_path / "online.zarr"
    big_id = 2**30  # episode ids once overflowed int64 for actor ids >= 2**23
    lrn = start_learner(tmp_path, ckpt, port, reaper)
    a = start_actor(tmp_path, ckpt, port, 0, reaper, "--max-seconds", "90")
    b = start_actor(
        tmp_path, ckpt, port, big_id, reaper, "--max-seconds", "90", "--flush-timeout-s", "2"
    )
    for p in (a, b):
        p.wait_for("actor", lambda s: s["link"]["acked"] > 100, timeout_s=90)
    a.signal(signal.SIGINT)
    t = time.monotonic()
    fa = final(a, "actor_final", 30)
    assert time.monotonic() - t < 8.0
    la = fa["link_final"]
    assert fa["stop_reason"] == "signal" and fa["flushed"]
    assert la["acked"] == la["sent"] == la["submitted"] == fa["steps"] and la["invalid"] == 0

    lrn.signal(signal.SIGTERM)
    t = time.monotonic()
    lfin = final(lrn, "learner_final", 30)
    assert time.monotonic() - t < 15.0
    ctx = zmq.Context()
    try:  # the ports are free at once: the learner closed its sockets (bounded linger)
        for p in (port, port + 1):
            s = ctx.socket(zmq.ROUTER)
            s.bind(f"tcp://127.0.0.1:{p}")
            s.close(0)
    finally:
        ctx.term()
    assert any((tmp_path / "run" / "checkpoints").glob("ckpt_*"))

    time.sleep(1.0)  # B keeps acting with no learner
    b.signal(signal.SIGTERM)
    t = time.monotonic()
    fb = final(b, "actor_final", 30)
    assert time.monotonic() - t < 2.0 + 6.0  # --flush-timeout-s 2 + exit
    lb = fb["link_final"]
    assert fb["stop_reason"] == "signal" and not fb["flushed"] and lb["pending"] > 0
    assert lb["submitted"] == lb["acked"] + lb["pending"] + lb["dropped"] and lb["invalid"] == 0
    data, _ = faults.read_store(replay)
    assert len(faults.rows_of(data, 0)["reward"]) == la["acked"]
    rows_b = faults.rows_of(data, big_id)
    assert len(rows_b["reward"]) == lb["acked"] > 0 and faults.duplicate_rows(rows_b) == 0
    assert lfin["rows"] == len(data["reward"])


# --------------------------------------------------------------------------- scenario 15


@pytest.mark.parametrize("fault", ["full", pytest.param("read_only", marks=pytest.mark.slow)])
def test_15_full_or_read_only_store_stops_acks_keeps_rows_resumes(
    ckpt: Path, tmp_path: Path, reaper: list, fault: str
) -> None:
    fs = faults.SmallFs(tmp_path / "fs", size_mib=48)
    print(f"small file system: {fs.kind} ({'; '.join(fs.why_not) or 'mounted'})")
    try:
        port = free_port_pair()
        replay = fs.path / "online.zarr"
        lrn = start_learner(tmp_path, ckpt, port, reaper, replay=replay, module=fs.learner_module())
        act = start_actor(
            tmp_path, ckpt, port, 0, reaper, "--max-seconds", "120", "--flush-timeout-s", "20"
        )
        act.wait_for("actor", lambda s: s["link"]["acked"] >= 200, timeout_s=90)
        fs.fill() if fault == "full" else fs.read_only()
        lrn.wait_for("learner", lambda s: not s["store_healthy"], timeout_s=30)
        before, _ = faults.read_store(replay)
        acked = act.wait_for("actor", timeout_s=10, since=act.count("actor"))["link"]["acked"]
        time.sleep(3.0)
        during, _ = faults.read_store(replay)
        s_act, s_lrn = last(act, "actor"), last(lrn, "learner")
        # no acks while the store refuses; the rows committed before are intact
        assert s_act["link"]["acked"] == acked
        assert s_act["link"]["unacked"] > 0 and s_lrn["append_failures"] > 0
        assert len(during["reward"]) == len(before["reward"])
        for k in before:
            assert before[k].tobytes() == during[k].tobytes(), k
        fs.free() if fault == "full" else fs.writable()
        lrn.wait_for(
            "learner",
            lambda s: s["store_healthy"] and s["rows"] > len(before["reward"]),
            timeout_s=30,
        )
        act.wait_for("actor", lambda s: s["link"]["unacked"] < 64, timeout_s=30)
        act.signal(signal.SIGTERM)
        fin = final(act, "actor_final")
        lrn.signal(signal.SIGTERM)
        lfin = final(lrn, "learner_final")
    finally:
        for p in reaper:
            p.kill()
        data, _ = faults.read_store(replay) if (replay / "zarr.json").exists() else ({}, {})
        fs.close()
    assert lfin["append_failures"] > 0 and lfin["store_healthy"]
    link = fin["link_final"]
    assert fin["flushed"] and link["acked"] == link["sent"] == link["submitted"]
    check_actor_rows(data, 0, fin)  # the resends landed exactly once
    for k in before:  # what was committed before the fault is still there, unchanged
        assert data[k][: len(before[k])].tobytes() == before[k].tobytes(), k


def test_gaps_count_the_current_run_not_the_jump_from_a_restart() -> None:
    """An actor restarted with the same id numbers its batches from the wall clock in
    microseconds: the jump from its previous run is not a loss. gaps(since=first_seq of
    the run) counts only seqs missing in that run, lost first batches included."""
    from idql_runtime.online import SeqTable

    table = SeqTable({"3": [[100, 110], [113, 120]]})  # run 1 lost 111 and 112
    run2 = 5_000_000
    for seq in [*range(run2 + 2, run2 + 10), *range(run2 + 12, run2 + 21)]:
        table.add(3, seq)  # run 2 lost its first two and two in the middle
    assert table.gaps(3) == (run2 + 20 - 100 + 1) - (11 + 8 + 8 + 9)  # from the first seq
    assert table.gaps(3, since=100) == table.gaps(3)
    assert table.gaps(3, since=run2) == 2 + 2
    assert table.gaps(3, since=run2 + 2) == 2
    assert table.gaps(3, since=run2 + 21) == 0  # nothing committed in that run yet
    assert table.gaps(7) == 0  # no actor 7
