"""reliability.md scenarios 5, 6, 7, 12, 13 against live ``idql-learner`` and
``idql-actor --serve`` processes (the library-level versions, including the 100k fuzz
run, are tests/test_fuzz_protocol.py and tests/test_security.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from idql_runtime import protocol as P
from idql_runtime.checkpoint import sha256_file
from idql_runtime.client import ActionClient
from idql_runtime.transport import ActorLink, CurveConfig, generate_keypair, load_public_key
from tests import faults
from tests.faults import LEARN, final, last
from tests.procs import Proc, actor, free_port_pair, learner


@pytest.fixture(scope="module")
def ckpt(hopper_store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faults.shared_checkpoint(hopper_store_path, tmp_path_factory.getbasetemp())


@pytest.fixture
def reaper():
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.kill()


def server(
    tmp: Path, ckpt: Path, bind: str, reaper: list, *extra: str, name: str = "server"
) -> Proc:
    args = ["-m", "actor", "--checkpoint", str(ckpt), "--serve", bind, "--engine", "eager"]
    p = Proc(name, [*args, "--threads", "1", "--batch-window-s", "0", *extra], tmp)
    reaper.append(p)
    return p


def wait_serving(p: Proc, timeout_s: float = 90.0) -> None:
    faults.wait_until(
        lambda: any(t.startswith("serving") for t in p.text) or p.popen.poll() is not None,
        timeout_s,
        f"{p.name} serving",
    )
    assert p.popen.poll() is None, p.stderr()[-2000:]


def listening(pid: int) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def obs_batch(rows: int, obs_dim: int = 11, **over: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    arrays = {
        "obs": rng.standard_normal((rows, obs_dim)).astype(np.float32),
        "action": rng.uniform(-1, 1, (rows, 3)).astype(np.float32),
        "reward": rng.standard_normal(rows).astype(np.float32),
        "next_obs": rng.standard_normal((rows, 11)).astype(np.float32),
        "terminated": np.zeros(rows, bool),
        "truncated": np.zeros(rows, bool),
    }
    return {**arrays, **over}


# --------------------------------------------------------------------------- 5, 6, 7


@pytest.mark.parametrize(
    "count", [pytest.param(1500, id="1500"), pytest.param(20_000, id="20k", marks=pytest.mark.slow)]
)
def test_5_6_7_hostile_input_to_live_learner_and_action_server(
    ckpt: Path, tmp_path: Path, reaper: list, count: int
) -> None:
    """Malformed (5), oversized (6) and pickled (7) messages against the real processes:
    each is answered with an error or dropped, and counted; nothing is unpickled; both
    processes keep serving with bounded memory. Pickled checkpoints are refused."""
    pwned = tmp_path / "PWNED"
    port, serve_port = free_port_pair(), free_port_pair()
    lrn = learner(tmp_path, ckpt, tmp_path / "online.zarr", port, tmp_path / "run", *LEARN)
    reaper.append(lrn)
    srv = server(tmp_path, ckpt, f"tcp://127.0.0.1:{serve_port}", reaper)
    # a checkpoint whose weights file is a pickle (hash updated so the loader gets that far)
    evil = tmp_path / "evil" / ckpt.name
    shutil.copytree(ckpt, evil)
    (evil / "weights.safetensors").write_bytes(faults.rce_pickle(pwned))
    meta = json.loads((evil / "meta.json").read_text())
    meta["sha256"]["weights.safetensors"] = sha256_file(evil / "weights.safetensors")
    (evil / "meta.json").write_text(json.dumps(meta))
    evil_actor = Proc(
        "evil-actor", ["-m", "actor", "--checkpoint", str(evil), "--env", "Hopper-v5"], tmp_path
    )
    evil_learner = learner(
        tmp_path,
        evil,
        tmp_path / "evil.zarr",
        free_port_pair(),
        tmp_path / "evil-run",
        name="evil-learner",
    )
    reaper += [evil_actor, evil_learner]
    lrn.wait_for("learner", timeout_s=90)
    wait_serving(srv)
    # 12 at the process level: what the defaults expose is loopback only
    for p in (lrn, srv):
        assert {ip for ip, _ in listening(p.popen.pid)} == {"127.0.0.1"}, listening(p.popen.pid)

    # store-level nonsense a fuzzer rarely builds: decodes fine, must still be refused
    crafted = [
        P.encode(P.make_transitions(7, 1, [0, 0], 0, obs_batch(2, obs_dim=5))),  # obs_dim 5
        P.encode(P.make_transitions(7, 2, [0], 0, obs_batch(1, obs=np.full((1, 11), 1e300)))),
        P.encode(P.make_transitions(7, 3, [0], 0, obs_batch(1, terminated=np.array([2])))),
        P.encode(P.make_transitions(7, 4, [0], 0, {"obs": np.ones((1, 11), np.float32)})),
        faults.rce_pickle(pwned),
        *faults.fuzz_module().PICKLES,
    ]
    res_l = faults.fuzz_process(
        f"tcp://127.0.0.1:{port}", "learner", count, 7, lrn.popen.pid, crafted
    )
    res_s = faults.fuzz_process(
        f"tcp://127.0.0.1:{serve_port}", "action", count, 8, srv.popen.pid, crafted
    )
    print("learner:", res_l, "\nserver:", res_s)
    for r in (res_l, res_s):
        assert r["problems"] == [], r
        assert r["received"] == r["sent"], r  # every message reached the process ...
        assert sum(r["replies"].values()) == r["sent"] - r["heartbeats_sent"], r  # ... answered
        assert r["rejected"] == r["expected_rejected"], r  # ... and counted
        assert r["rss_growth_mib"] < 40.0, r
    assert res_s["replies"].get("error", 0) == res_s["rejected"]
    # every decodable transitions batch was refused by the learner (none fits the store)
    status = lrn.wait_for("learner", lambda s: s["bad_batches"] >= res_l["bad_batches_sent"], 30)
    assert status["bad_batches"] == res_l["bad_batches_sent"] and status["rows"] == 0

    # 6: messages over max_message_bytes (64 MiB) are dropped by ZMQ_MAXMSGSIZE before
    # anything is allocated; the processes stay small and keep serving
    big = b"\x00" * (P.DEFAULT_LIMITS.max_message_bytes + 4096)
    for endpoint, p in ((f"tcp://127.0.0.1:{port}", lrn), (f"tcp://127.0.0.1:{serve_port}", srv)):
        rss = faults.rss_mib(p.popen.pid)
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        try:
            for _ in range(3):
                assert faults.request(s, big, timeout_s=2.0) is None  # no reply: dropped
        finally:
            s.close(0)
            ctx.term()
        assert faults.rss_mib(p.popen.pid) - rss < 32.0
    # still serving: a valid batch is committed, a valid request answered
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        ack = faults.request(s, P.encode(P.make_transitions(9, 1, [5] * 3, 0, obs_batch(3))))
        assert ack is not None and ack["type"] == "ack" and ack["status"] == "committed"
    finally:
        s.close(0)
        ctx.term()
    with ActionClient(f"tcp://127.0.0.1:{serve_port}", timeout_s=5.0, retries=0) as c:
        action, _, _ = c.act(np.zeros(11, np.float32))
        assert action.shape == (3,)

    # 7: the pickled checkpoint is refused by both programs, and nothing was unpickled
    assert evil_actor.wait(90) != 0 and evil_learner.wait(90) != 0
    assert not pwned.exists()
    # 14 for the action server: SIGTERM -> exit 0, quickly
    for p in (srv, lrn):
        p.signal(signal.SIGTERM)
        t = time.monotonic()
        assert p.wait(30) == 0, p.stderr()[-2000:]
        assert time.monotonic() - t < 15.0
    assert last(lrn, "learner_final")["rows"] == 3


# --------------------------------------------------------------------------- 12


def test_12_exposed_binds_refused_unless_insecure(ckpt: Path, tmp_path: Path, reaper: list) -> None:
    from actor.cli import build_parser as actor_parser
    from learner.cli import build_parser as learner_parser

    args = learner_parser().parse_args(["--pretrained", "x"])
    assert args.bind_ingest.startswith("tcp://127.0.0.1:") and args.bind_weights.startswith(
        "tcp://127.0.0.1:"
    )
    assert actor_parser().parse_args(["--checkpoint", "x"]).insecure is False
    p1, p2, p3, p4 = (free_port_pair() for _ in range(4))
    refused: list[Proc] = [
        server(tmp_path, ckpt, f"tcp://0.0.0.0:{p3}", reaper, name="exposed-server")
    ]
    # tests/procs.py binds 127.0.0.1; append the exposed bind (argparse keeps the last)
    refused += [
        learner(
            tmp_path, ckpt, tmp_path / "a.zarr", p1, tmp_path / "a",
            "--bind-ingest", f"tcp://0.0.0.0:{p1}", name="exposed-ingest",
        ),
        learner(
            tmp_path, ckpt, tmp_path / "b.zarr", p2, tmp_path / "b",
            "--bind-weights", f"tcp://0.0.0.0:{p2 + 1}", name="exposed-weights",
        ),
    ]  # fmt: skip
    insecure = learner(
        tmp_path, ckpt, tmp_path / "c.zarr", p4, tmp_path / "c", *LEARN,
        "--bind-ingest", f"tcp://0.0.0.0:{p4}", "--insecure", name="insecure",
    )  # fmt: skip
    reaper += [*refused, insecure]
    for p in refused:
        assert p.wait(90) == 2, (p.name, p.stderr()[-1500:])
        err = p.stderr()
        assert "refusing to bind" in err and "--insecure" in err and "Traceback" not in err, err[
            -800:
        ]
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    insecure.wait_for("learner", timeout_s=90)
    assert ("0.0.0.0", p4) in listening(insecure.popen.pid)  # exposed, as asked explicitly
    assert "without encryption" in insecure.stderr()
    insecure.signal(signal.SIGTERM)
    assert insecure.wait(30) == 0


# --------------------------------------------------------------------------- 13


def curve_dirs(root: Path) -> dict[str, Path]:
    """The --curve-dir layouts (transport.curve_from_dir): server: server.key_secret +
    authorized/*.key; client: client.key_secret + server.key."""
    d = {k: root / k for k in ("server", "client", "rogue", "wrong_server", "other", "peer")}
    server_pub, _ = generate_keypair(d["server"], "server")
    client_pub, client_sec = generate_keypair(d["client"], "client")
    (d["server"] / "authorized").mkdir()
    shutil.copy(client_pub, d["server"] / "authorized" / "client.key")
    shutil.copy(server_pub, d["client"] / "server.key")
    peer_pub, _ = generate_keypair(d["peer"], "client")  # allow-listed, but not actor 1
    shutil.copy(peer_pub, d["server"] / "authorized" / "peer.key")
    shutil.copy(server_pub, d["peer"] / "server.key")
    generate_keypair(d["rogue"], "client")  # a keypair the server does not know
    shutil.copy(server_pub, d["rogue"] / "server.key")
    other_pub, _ = generate_keypair(d["other"], "other")
    d["wrong_server"].mkdir()
    shutil.copy(client_sec, d["wrong_server"] / "client.key_secret")  # allowed client ...
    shutil.copy(other_pub, d["wrong_server"] / "server.key")  # ... trusting the wrong server
    return d


def client_curve(d: Path) -> CurveConfig:
    return CurveConfig(d / "client.key_secret", server_public_key_file=d / "server.key")


def test_13_curve_admits_only_allow_listed_keys(ckpt: Path, tmp_path: Path, reaper: list) -> None:
    d = curve_dirs(tmp_path / "keys")
    port, serve_port = free_port_pair(), free_port_pair()
    curve = ("--curve-dir", str(d["server"]))
    lrn = learner(
        tmp_path,
        ckpt,
        tmp_path / "online.zarr",
        port,
        tmp_path / "run",
        *LEARN,
        *curve,
        "--bind-ingest",
        f"tcp://0.0.0.0:{port}",
        "--bind-weights",
        f"tcp://0.0.0.0:{port + 1}",
    )  # fmt: skip  (non-loopback: allowed because CURVE is on)
    srv = server(tmp_path, ckpt, f"tcp://0.0.0.0:{serve_port}", reaper, *curve)
    good = actor(tmp_path, ckpt, port, 1, "--curve-dir", str(d["client"]), "--max-seconds", "600")
    # secret keys others may read are refused, by both programs
    leaky = {k: tmp_path / f"leaky-{k}" for k in ("server", "client")}
    for k, path in leaky.items():
        shutil.copytree(d[k], path)
        os.chmod(path / f"{k}.key_secret", 0o644)
    leaky_lrn = learner(
        tmp_path, ckpt, tmp_path / "l.zarr", free_port_pair(), tmp_path / "l", "--curve-dir", str(leaky["server"]),
        name="leaky-learner",
    )  # fmt: skip
    leaky_act = actor(
        tmp_path, ckpt, port, 2, "--curve-dir", str(leaky["client"]), name="leaky-actor"
    )
    reaper += [lrn, good, leaky_lrn, leaky_act]
    for p in (leaky_lrn, leaky_act):
        assert p.wait(90) == 2, (p.name, p.stderr()[-1500:])
        assert "chmod 600" in p.stderr(), p.stderr()[-800:]
    lrn.wait_for("learner", timeout_s=90)
    wait_serving(srv)

    endpoint, weights = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    intruders = {
        name: ActorLink(
            endpoint, weights, 50 + i, curve=cfg, batch_size=1, heartbeat_interval_s=0.1
        )
        for i, (name, cfg) in enumerate(
            [
                ("unknown_key", client_curve(d["rogue"])),
                ("wrong_server_key", client_curve(d["wrong_server"])),
                ("plaintext", None),
            ]
        )
    }
    # An allow-listed key that claims actor 1, whose id is bound to the client key: its
    # full-schema transitions must be refused, and acks must keep reaching actor 1.
    hijacker = ActorLink(
        endpoint, None, 1, curve=client_curve(d["peer"]), batch_size=1, heartbeat_interval_s=0.1
    )
    try:
        good.wait_for("actor", lambda s: s["link"]["acked"] > 100 and s["policy_version"] >= 1, 90)
        acked_before = good.find("actor")[-1]["link"]["acked"]
        row = {
            "obs": np.zeros(11, np.float32), "action": np.zeros(3, np.float32),
            "reward": np.float32(1.0), "next_obs": np.zeros(11, np.float32),
            "terminated": False, "truncated": False,
        }  # fmt: skip
        for _ in range(100):
            for link in intruders.values():
                link.submit({"reward": np.float32(1.0)})
            hijacker.submit(row, episode_id=7)
            time.sleep(0.02)
        status = lrn.wait_for("learner", since=lrn.count("learner"), timeout_s=30)
        acked_after = good.wait_for("actor", since=good.count("actor"), timeout_s=30)["link"]
        assert hijacker.flush(10.0)  # every hijack batch settled: refused, not pending
        intruder_stats = {name: link.stats() for name, link in intruders.items()}
        hijack_stats = hijacker.stats()
    finally:
        for link in [*intruders.values(), hijacker]:
            link.close()
    for name, st in intruder_stats.items():  # zero messages through, either way
        assert st["sent"] == 0 and st["acked"] == 0 and st["weights_version"] == -1, (name, st)
        assert not st["connected"], (name, st)
    assert hijack_stats["acked"] == 0 and hijack_stats["rejected"] == 100, hijack_stats
    assert "bound to another CURVE key" in hijack_stats["last_error"]
    assert acked_after["acked"] > acked_before  # actor 1 still gets its acks
    assert set(status["actors"]) == {"1"}  # only the allow-listed actor was ever seen
    assert status["rejected_messages"] >= 100 and status["bad_batches"] == 0

    # the action server: allow-listed client served; unknown key and plaintext get nothing
    with ActionClient(
        f"tcp://127.0.0.1:{serve_port}", curve=client_curve(d["client"]), timeout_s=10.0
    ) as c:
        action, _, _ = c.act(np.zeros(11, np.float32))
        assert action.shape == (3,)
        before = c.health()["counters"]["received"]
    for cfg in (client_curve(d["rogue"]), None):  # unknown key, plaintext
        with ActionClient(
            f"tcp://127.0.0.1:{serve_port}", curve=cfg, timeout_s=1.0, retries=1
        ) as c:
            with pytest.raises(TimeoutError):
                c.act(np.zeros(11, np.float32))
    with ActionClient(
        f"tcp://127.0.0.1:{serve_port}", curve=client_curve(d["client"]), timeout_s=10.0
    ) as c:
        assert c.health()["counters"]["received"] == before + 1  # only this health request

    good.signal(signal.SIGTERM)
    fin = final(good, "actor_final")
    assert fin["flushed"] and fin["link_final"]["acked"] == fin["link_final"]["sent"] > 0
    for p in (lrn, srv):
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0, p.stderr()[-1500:]
    data, meta = faults.read_store(tmp_path / "online.zarr")
    assert set(np.unique(data["actor_id"]).tolist()) == {1}
    assert len(data["reward"]) == fin["link_final"]["acked"]  # no hijacked row got in
    assert 7 not in data["episode_id"].tolist()
    client_key = load_public_key(d["client"] / "client.key").decode()
    assert meta["actor_keys"] == {"1": client_key}  # committed: survives a restart
