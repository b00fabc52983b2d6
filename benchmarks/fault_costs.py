"""What each fault of reliability.md costs, measured with real processes on loopback.

    python benchmarks/fault_costs.py                  # every fault (a few minutes on 2 cores)
    python benchmarks/fault_costs.py --only lossy_link,disk_full

Prints one JSON object: per fault, the transitions resent (rows in batches sent again),
duplicates the learner dropped, rows dropped by a full actor buffer, rows lost (sent but
never acknowledged: must be 0), seconds until the system was back to normal, overruns and
missed ticks of the actors' control loops, and fault-specific numbers. Uses the tools of
tests/faults.py and tests/procs.py (Hopper-v5, the tests' TINY checkpoint, eager engine);
timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import faults  # noqa: E402
from tests.faults import LEARN, final, last  # noqa: E402
from tests.procs import Proc, actor, free_port_pair, learner  # noqa: E402


class Run:
    """Processes of one measurement; all killed at the end, however it ends."""

    def __init__(self, root: Path, name: str, ckpt: Path, offline: Path) -> None:
        self.tmp = root / name
        self.tmp.mkdir(parents=True)
        self.ckpt, self.offline = ckpt, offline
        self.procs: list[Proc] = []
        self.port = free_port_pair()

    def learner(self, *extra: str, name: str = "learner", **kw: Any) -> Proc:
        kw.setdefault("replay", self.tmp / "online.zarr")
        replay = kw.pop("replay")
        p = learner(
            self.tmp,
            self.ckpt,
            replay,
            self.port,
            self.tmp / "run",
            *LEARN,
            *extra,
            name=name,
            **kw,
        )
        self.procs.append(p)
        return p

    def actor(self, i: int, *extra: str, direct: bool = True, **kw: Any) -> Proc:
        """An actor of this run's learner (``direct=False``: ``extra`` names the endpoints)."""
        p = actor(
            self.tmp, self.ckpt, self.port if direct else None, i,
            "--status-interval-s", "0.5", "--max-seconds", "300", "--flush-timeout-s", "30", *extra, **kw,
        )  # fmt: skip
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            p.kill()


def status_after(
    p: Proc, key: str, t: float, pred: Callable[[dict], bool], timeout_s: float = 120
) -> float:
    """Arrival time of the first ``key`` line that arrived after ``t`` and satisfies pred."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for ta, s in p.find_timed(key):
            if ta > t and pred(s):
                return ta
        time.sleep(0.05)
    raise TimeoutError(f"{p.name}: no {key} line after the fault matched in {timeout_s} s")


def control_delta(p: Proc, t0: float, t1: float) -> dict[str, int]:
    """Overruns and missed ticks an actor counted between two times."""
    lines = p.find_timed("actor")
    a = [s for t, s in lines if t <= t0][-1]
    b = [s for t, s in lines if t <= t1][-1]
    return {k: b[k] - a[k] for k in ("overruns", "missed_ticks")}


def link_costs(fins: list[dict], lfin: dict | None = None) -> dict[str, Any]:
    links = [f["link_final"] for f in fins]
    out = {
        "rows_sent": sum(x["sent"] for x in links),
        "rows_resent": sum(x["resent_rows"] for x in links),
        "batches_resent": sum(x["resent"] for x in links),
        "rows_dropped_buffer_full": sum(x["dropped"] for x in links),
        "rows_lost": sum(x["submitted"] - x["acked"] - x["dropped"] for x in links),
    }
    if lfin is not None:
        out["duplicates_dropped_by_learner"] = lfin["duplicates"]
    return out


def learner_outage(run: Run, kind: str) -> dict[str, Any]:
    """sigkill: SIGKILL + immediate restart; down: SIGKILL, 6 s down, restart, with a 250-row
    actor buffer; sigstop: SIGSTOP 10 s, SIGCONT."""
    extra = ("--buffer-capacity", "250") if kind == "down" else ()
    lrn = run.learner(offline=run.offline)
    actors = [run.actor(i, *extra) for i in range(2)]
    for a in actors:
        a.wait_for("actor", lambda s: s["link"]["acked"] > 100, timeout_s=120)
    time.sleep(3.0)
    acked = [last(a, "actor")["link"]["acked"] for a in actors]
    t_fault = time.monotonic()
    out: dict[str, Any] = {}
    if kind == "sigstop":
        lrn.signal(signal.SIGSTOP)
        time.sleep(10.0)
        lrn.signal(signal.SIGCONT)
        t_back = time.monotonic()
    else:
        lrn.kill()
        if kind == "down":
            time.sleep(6.0)
        t_restart = time.monotonic()
        lrn = run.learner(offline=run.offline, name="learner1")
        lrn.wait_for("learner", timeout_s=120)
        t_back = lrn.find_timed("learner")[0][0]
        out["learner_start_s"] = round(t_back - t_restart, 2)  # process start to 1st status
    t_ok = max(
        status_after(
            a, "actor", t_back, lambda s, n=n: s["link"]["acked"] > n and s["link"]["unacked"] < 64
        )
        for a, n in zip(actors, acked, strict=True)
    )
    lags = [
        s["link"]["lag_s"] for a in actors for t, s in a.find_timed("actor") if t_fault < t < t_ok
    ]
    control = [control_delta(a, t_fault, t_ok) for a in actors]
    time.sleep(1.0)
    for a in actors:
        a.signal(signal.SIGTERM)
    fins = [final(a, "actor_final", 90) for a in actors]
    lrn.signal(signal.SIGTERM)
    lfin = final(lrn, "learner_final", 90)
    out.update(
        fault_s=round(t_back - t_fault, 2),
        recover_s=round(t_ok - t_fault, 2),
        recover_after_back_s=round(t_ok - t_back, 2),
        max_lag_s=round(max(lags, default=0.0), 2),
        overruns_during=sum(c["overruns"] for c in control),
        missed_ticks_during=sum(c["missed_ticks"] for c in control),
        **link_costs(fins, lfin),
    )
    return out


def no_fault(run: Run) -> dict[str, Any]:
    """The baseline: what 2 actors and a learner cost on this machine with nothing wrong
    (overruns here come from sharing the CPUs, not from any fault)."""
    lrn = run.learner(offline=run.offline)
    actors = [run.actor(i) for i in range(2)]
    for a in actors:
        a.wait_for("actor", lambda s: s["link"]["acked"] > 100, timeout_s=120)
    t0 = time.monotonic()
    time.sleep(10.0)
    control = [control_delta(a, t0, time.monotonic()) for a in actors]
    for a in actors:
        a.signal(signal.SIGTERM)
    fins = [final(a, "actor_final", 90) for a in actors]
    lrn.signal(signal.SIGTERM)
    lfin = final(lrn, "learner_final", 90)
    return {
        "window_s": 10.0,
        "overruns_in_window": sum(c["overruns"] for c in control),
        "missed_ticks_in_window": sum(c["missed_ticks"] for c in control),
        **link_costs(fins, lfin),
    }


def lossy_link(run: Run) -> dict[str, Any]:
    lrn = run.learner()
    proxy = faults.LossyProxy(f"tcp://127.0.0.1:{run.port}", drop=0.1, dup=0.1, reorder=0.3, seed=1)
    try:
        lrn.wait_for("learner", timeout_s=120)
        via = ("--learner", proxy.endpoint, "--weights", f"tcp://127.0.0.1:{run.port + 1}")
        actors = [
            run.actor(i, *via, "--max-seconds", "10", "--resend-timeout-s", "0.5", direct=False)
            for i in range(2)
        ]
        fins = [final(a, "actor_final", 120) for a in actors]
        lrn.signal(signal.SIGTERM)
        lfin = final(lrn, "learner_final", 60)
    finally:
        proxy.close()
    gaps = [g["gaps"] for s in lrn.find("learner") for g in s["actors"].values()]
    return {
        "drop": 0.1,
        "dup": 0.1,
        "reorder": 0.3,
        "proxy": proxy.stats(),
        "max_gaps_reported": max(gaps, default=0),
        "overruns": sum(f["overruns"] for f in fins),
        "missed_ticks": sum(f["missed_ticks"] for f in fins),
        **link_costs(fins, lfin),
    }


def actor_sigkill(run: Run) -> dict[str, Any]:
    lrn = run.learner()
    run.actor(0)
    doomed = run.actor(1)
    doomed.wait_for("actor", lambda s: s["link"]["acked"] > 150, timeout_s=120)
    time.sleep(0.2)
    doomed.kill()
    t_kill = time.monotonic()
    t_noticed = status_after(lrn, "learner", t_kill, lambda s: s["actors_dead"] >= 1, 60)
    data, meta = faults.read_store(run.tmp / "online.zarr")
    marks = [e for a, e in meta.get("truncated_episodes", []) if a == 1]
    rows = faults.rows_of(data, 1)
    half = int((rows["episode_id"] == marks[-1]).sum()) if marks else 0
    return {
        "liveness_s": 2.0,
        "noticed_after_s": round(t_noticed - t_kill, 2),
        "episodes_recorded_truncated": len(marks),
        "rows_of_the_truncated_episode": half,
        "rows_committed_of_killed_actor": int(len(rows["reward"])),
    }


def disk_full(run: Run) -> dict[str, Any]:
    fs = faults.SmallFs(run.tmp / "fs", size_mib=48)
    try:
        replay = fs.path / "online.zarr"
        lrn = run.learner(replay=replay, module=fs.learner_module())
        act = run.actor(0)
        act.wait_for("actor", lambda s: s["link"]["acked"] > 200, timeout_s=120)
        t_fault = time.monotonic()
        fs.fill()
        time.sleep(3.0)
        fs.free()
        t_back = time.monotonic()
        t_healthy = status_after(lrn, "learner", t_back, lambda s: s["store_healthy"], 60)
        acked = last(act, "actor")["link"]["acked"]
        t_ok = status_after(
            act, "actor", t_back, lambda s: s["link"]["acked"] > acked and s["link"]["unacked"] < 64
        )
        control = control_delta(act, t_fault, t_ok)
        act.signal(signal.SIGTERM)
        fin = final(act, "actor_final", 90)
        lrn.signal(signal.SIGTERM)
        lfin = final(lrn, "learner_final", 90)
    finally:
        run.close()
        fs.close()
    return {
        "filesystem": fs.kind,
        "full_s": round(t_back - t_fault, 2),
        "store_healthy_after_space_back_s": round(t_healthy - t_back, 2),
        "recover_after_space_back_s": round(t_ok - t_back, 2),
        "append_failures": lfin["append_failures"],
        "overruns_during": control["overruns"],
        "missed_ticks_during": control["missed_ticks"],
        **link_costs([fin], lfin),
    }


def inference_overrun(run: Run) -> dict[str, Any]:
    fl = faults.FakeLearner(run.port)
    try:
        slow = run.actor(
            0, "--rate-hz", "50", "--safe-action", faults.SAFE_ARG, "--max-seconds", "6",
            module=["-m", "tests.faults", "slow-actor", "--every", "7", "--sleep-s", "0.06", "--"],
        )  # fmt: skip
        lim = run.actor(1, "--rate-hz", "20000", "--overrun-limit", "5")
        t0 = time.monotonic()
        rc = lim.wait(120)
        limit_exit_s = time.monotonic() - t0
        fin = final(slow, "actor_final", 120)
    finally:
        fl.close()
    return {
        "slow_every_7th_decision_by_s": 0.06,
        "rate_hz": 50,
        "steps": fin["steps"],
        "overruns": fin["overruns"],
        "fallbacks_executed": fin["fallbacks"],
        "max_consecutive_overruns": fin["max_consecutive_overruns"],
        "missed_ticks": fin["missed_ticks"],
        "rate_hz_achieved": fin["rate_hz_achieved"],
        "overrun_limit_5_exit_code": rc,
        "overrun_limit_5_process_s": round(limit_exit_s, 2),
    }


def checkpoint_crash(run: Run) -> dict[str, Any]:
    ckpts = run.tmp / "run" / "checkpoints"
    lrn = run.learner("--set", "online.checkpoint_interval_s=0")
    run.actor(0)
    lrn.wait_for("learner", lambda s: s["updates"] > 50, timeout_s=120)
    faults.wait_until(lambda: any(ckpts.glob(".tmp-*")), 60, "a checkpoint write", 0.0005)
    updates_at_kill = last(lrn, "learner")["updates"]
    lrn.kill()
    torn = any(ckpts.glob(".tmp-*"))
    t_kill = time.monotonic()
    lrn = run.learner("--set", "online.checkpoint_interval_s=0", name="learner1")
    first = lrn.wait_for("learner", timeout_s=120)
    t_up = lrn.find_timed("learner")[0][0]
    m = re.search(r"learner resumed from \S*ckpt_(\d+)", lrn.stderr())
    resumed = int(m.group(1)) if m else -1
    return {
        "killed_inside_a_checkpoint_write": torn,
        "updates_at_kill_last_status": updates_at_kill,
        "resumed_at_updates": resumed,
        "updates_lost": max(0, updates_at_kill - resumed),
        "restart_to_first_status_s": round(t_up - t_kill, 2),
        "rows_after_restart": first["rows"],
    }


def hostile_input(run: Run) -> dict[str, Any]:
    lrn = run.learner()
    serve_port = free_port_pair()
    srv = Proc(
        "server",
        ["-m", "actor", "--checkpoint", str(run.ckpt), "--serve", f"tcp://127.0.0.1:{serve_port}",
         "--engine", "eager", "--threads", "1", "--batch-window-s", "0"],
        run.tmp,
    )  # fmt: skip
    run.procs.append(srv)
    lrn.wait_for("learner", timeout_s=120)
    faults.wait_until(lambda: any(t.startswith("serving") for t in srv.text), 120, "server")
    out = {}
    for name, endpoint, role, p in (
        ("learner", f"tcp://127.0.0.1:{run.port}", "learner", lrn),
        ("action_server", f"tcp://127.0.0.1:{serve_port}", "action", srv),
    ):
        r = faults.fuzz_process(endpoint, role, 5000, 3, p.popen.pid)
        out[name] = {
            "messages": r["sent"],
            "rejected_and_counted": r["rejected"],
            "messages_per_s": round(r["sent"] / max(r["seconds"], 1e-9)),
            "rss_growth_mib": r["rss_growth_mib"],
            "problems": r["problems"],
        }
    return out


FAULTS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "no_fault": no_fault,
    "learner_sigkill": lambda r: learner_outage(r, "sigkill"),
    "learner_down_6s_buffer_250": lambda r: learner_outage(r, "down"),
    "learner_sigstop_10s": lambda r: learner_outage(r, "sigstop"),
    "lossy_link": lossy_link,
    "actor_sigkill": actor_sigkill,
    "disk_full_3s": disk_full,
    "inference_overrun": inference_overrun,
    "checkpoint_crash": checkpoint_crash,
    "hostile_input": hostile_input,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(FAULTS))
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        p.error(f"unknown faults {unknown}")
    root = Path(tempfile.mkdtemp(prefix="fault-costs-"))
    from tests.conftest import make_hopper_store
    from tests.procs import pretrained_checkpoint

    started = time.monotonic()
    make_hopper_store(root / "hopper.zarr").close()
    ckpt = pretrained_checkpoint(root / "hopper.zarr", root / "pre")
    result: dict[str, Any] = {"machine_cpus": os.cpu_count()}
    try:
        for name in names:
            run = Run(root, name, ckpt, root / "hopper.zarr")
            t = time.monotonic()
            try:
                result[name] = FAULTS[name](run)
            except Exception as e:  # one fault's failure is reported, the others still run
                result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            finally:
                run.close()
            result[name]["measure_s"] = round(time.monotonic() - t, 1)
            print(f"{name}: done", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=1))
    return 0 if not any("error" in v for v in result.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
