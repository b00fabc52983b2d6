"""Real ZeroMQ sockets on loopback / ipc: ActorLink, LearnerLink, ActionServer, ActionClient."""

from __future__ import annotations

import contextlib
import json
import os
import pickle  # only to build a hostile payload; nothing here unpickles
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from idql_runtime import protocol as P
from idql_runtime.client import ActionClient, ActionServerError
from idql_runtime.transport import ActionServer, ActorLink, LearnerLink

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "tcp://127.0.0.1:*"


def wait_for(predicate, timeout_s: float, step_s: float = 0.005, *, poll=None):
    """Call ``poll()`` (if given) and test ``predicate()`` until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if poll is not None:
            poll()
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


@contextlib.contextmanager
def serving(server: ActionServer):
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop, 0.01), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@contextlib.contextmanager
def raw_dealer(endpoint: str):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def roundtrip(sock: zmq.Socket, payload: bytes, timeout_s: float = 2.0) -> dict | None:
    sock.send(payload)
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return P.decode(sock.recv())


def transition(i: int) -> dict:
    return {
        "obs": np.full(4, i, np.float32),
        "action": np.full(2, -i, np.float32),
        "reward": float(i),
        "terminated": i % 10 == 9,
    }


def collect(learner: LearnerLink, want_rows: int, timeout_s: float, *, ack: bool) -> list:
    got: list = []

    def poll():
        for batch in learner.poll(5):
            got.append(batch)
            if ack:
                learner.ack(batch.actor_id, batch.seq, len(batch.msg["episode_ids"]))

    wait_for(lambda: sum(len(b.msg["episode_ids"]) for b in got) >= want_rows, timeout_s, poll=poll)
    return got


# --------------------------------------------------------------------------- actor / learner


def test_batches_are_acked_and_removed():
    with LearnerLink(LOOPBACK, LOOPBACK, weights_republish_s=None) as learner:
        actor = ActorLink(learner.ingest_endpoint, None, 7, batch_size=8, start_seq=100)
        try:
            for i in range(100):
                actor.submit(transition(i), episode_id=i // 10, policy_version=3)
            got = collect(learner, 100, 5.0, ack=True)
            assert actor.flush(5.0)
            stats = actor.stats()
        finally:
            actor.close()
    # 100 rows in batches of 8 with consecutive seqs from start_seq, in order.
    assert [b.seq for b in got] == list(range(100, 113))
    assert {b.actor_id for b in got} == {7}
    obs = np.concatenate([b.msg["arrays"]["obs"] for b in got])
    assert obs[:, 0].tolist() == list(range(100))
    ep = np.concatenate([b.msg["episode_ids"] for b in got])
    assert ep.tolist() == [i // 10 for i in range(100)]
    assert {b.msg["policy_version"] for b in got} == {3}
    assert got[0].msg["arrays"]["terminated"].dtype == np.bool_
    assert (stats["submitted"], stats["sent"], stats["acked"]) == (100, 100, 100)
    assert (stats["unacked"], stats["pending"], stats["dropped"], stats["resent"]) == (0, 0, 0, 0)


def test_wide_rows_are_batched_within_the_learners_element_limit():
    """Rows of 300 elements under max_array_elements=1000: batches of 3 rows, all acked.
    Before, the actor sent batches of 8 (2400 elements) and the learner, with the same
    limits, refused every one: each row of the run ended "rejected"."""
    limits = P.Limits(max_array_elements=1000)
    with LearnerLink(LOOPBACK, LOOPBACK, weights_republish_s=None, limits=limits) as learner:
        actor = ActorLink(
            learner.ingest_endpoint, None, 7, batch_size=8, start_seq=0, limits=limits
        )
        try:
            for i in range(20):
                row = {**transition(i), "obs": np.full(300, i, np.float32)}
                actor.submit(row, episode_id=0)
            got = collect(learner, 20, 5.0, ack=True)
            assert actor.flush(5.0)
            stats = actor.stats()
        finally:
            actor.close()
    assert [len(b.msg["episode_ids"]) for b in got] == [3] * 6 + [2]
    obs = np.concatenate([b.msg["arrays"]["obs"] for b in got])
    assert obs[:, 0].tolist() == list(range(20))
    assert (stats["acked"], stats["rejected"], stats["invalid"]) == (20, 0, 0)
    assert learner.stats().get("rejected", 0) == 0


def test_resend_after_learner_restart_keeps_actor_id_and_seq(tmp_path):
    ingest = f"ipc://{tmp_path}/ingest"
    first = LearnerLink(ingest, f"ipc://{tmp_path}/weights")
    # resend_timeout_s is long: the resend must come from the reconnect itself.
    actor = ActorLink(ingest, None, 2, batch_size=10, resend_timeout_s=60.0)
    try:
        for i in range(30):
            actor.submit(transition(i))
        before = collect(first, 30, 5.0, ack=False)  # received, never acked
        first.close()
        assert actor.stats()["unacked"] == 30

        second = LearnerLink(ingest, f"ipc://{tmp_path}/weights")
        try:
            after = collect(second, 30, 15.0, ack=True)
            assert actor.flush(15.0)
            stats = actor.stats()
        finally:
            second.close()
    finally:
        actor.close()
    key = lambda b: (b.actor_id, b.seq)  # noqa: E731
    # A resend can go into the old connection's pipe while libzmq is still tearing it
    # down; the link then sends it once more on the new connection. The learner may so
    # see a batch twice (it deduplicates on (actor_id, seq)), but every copy must carry
    # the same actor_id, seq and bytes as the first send.
    first_copy = {key(b): b for b in reversed(after)}
    assert sorted(map(key, before)) == sorted(first_copy)
    for old in before:
        new = first_copy[key(old)]
        for name, array in old.msg["arrays"].items():
            assert array.tobytes() == new.msg["arrays"][name].tobytes()
    for b in after:
        assert b.msg["arrays"]["obs"].tobytes() == first_copy[key(b)].msg["arrays"]["obs"].tobytes()
    assert stats["resent"] in (3, 6) and stats["reconnects"] >= 1
    assert (stats["sent"], stats["acked"], stats["pending"]) == (30, 30, 0)


def test_submit_never_blocks_without_learner():
    with socket.socket() as s:  # a loopback port with nothing behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    actor = ActorLink(f"tcp://127.0.0.1:{port}", None, 1, buffer_capacity=1000, batch_size=32)
    try:
        durations = []
        t0 = time.perf_counter()
        for i in range(10_000):
            t = time.perf_counter()
            actor.submit(transition(i))
            durations.append(time.perf_counter() - t)
        total_s = time.perf_counter() - t0
        time.sleep(0.1)  # let the thread cut batches; the bound must hold after that too
        stats = actor.stats()
    finally:
        actor.close()
    assert total_s < 2.0, f"10k submits took {total_s:.3f} s"
    assert np.percentile(durations, 99) < 1e-3
    assert stats["submitted"] == 10_000
    assert stats["pending"] == 1000  # exactly the capacity
    assert stats["dropped"] == 9000  # every row beyond it, counted once
    assert stats["sent"] == 0 and stats["acked"] == 0
    assert stats["lag_s"] > 0


def test_weights_broadcast_verified_and_bad_ones_dropped():
    learner = LearnerLink(LOOPBACK, LOOPBACK, weights_republish_s=None)
    actor = ActorLink(learner.ingest_endpoint, learner.weights_endpoint, 1)
    good = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float64)}
    try:
        # PUB/SUB drops messages until the subscription lands: publish until one arrives.
        received = []
        assert wait_for(
            lambda: received.append(actor.poll_weights()) or received[-1] is not None,
            5.0,
            0.02,
            poll=lambda: learner.publish_weights(5, good),
        )
        version, tensors = received[-1]
        assert version == 5 and set(tensors) == {"w", "b"}
        assert tensors["w"].tobytes() == good["w"].tobytes()

        wire = msgpack.unpackb(P.encode(P.make_weights(6, good)), raw=False)
        tampered = dict(wire, sha256="0" * 64)
        nan = P.encode(P.make_weights(6, good)).replace(
            np.float32(1.0).tobytes(), np.float32(np.nan).tobytes(), 1
        )
        bad = [
            P.encode(P.make_weights(6, good))[:-7],  # truncated
            msgpack.packb(tampered, use_bin_type=True),  # hash mismatch
            nan,  # NaN inside a tensor
            P.encode(P.make_health()),  # not weights
        ]
        for i, payload in enumerate(bad, start=1):
            learner.publish_raw(payload)
            assert wait_for(lambda i=i: actor.stats()["weights_rejected"] == i, 3.0)
        learner.publish_weights(4, good)  # older than 5: ignored
        assert wait_for(lambda: actor.stats()["weights_stale"] == 1, 3.0)
        assert actor.poll_weights() is None
        learner.publish_weights(8, {"w": np.zeros(2, np.float32)})
        assert wait_for(lambda: received.append(actor.poll_weights()) or received[-1], 3.0)
        assert received[-1][0] == 8 and received[-1][1]["w"].tolist() == [0.0, 0.0]
        assert actor.stats()["weights_version"] == 8
    finally:
        actor.close()
        learner.close()


def test_weights_over_a_lossy_link_only_newer_versions_apply_and_the_newest_arrives():
    """reliability #4 and #10 on the weights link: through a hop that drops 20 %,
    duplicates 20 % and delays 40 % of messages (so older versions overtake newer ones),
    the actor delivers strictly increasing versions, each bit-identical to what the
    learner published for that version, and ends on the newest (the learner republishes
    it, so a dropped last update is not the end)."""
    from tests.faults import LossyPubProxy

    learner = LearnerLink(LOOPBACK, LOOPBACK, weights_republish_s=0.2)
    proxy = LossyPubProxy(learner.weights_endpoint, drop=0.2, dup=0.2, reorder=0.4,
                          max_delay_s=0.08, seed=3)  # fmt: skip
    actor = ActorLink(learner.ingest_endpoint, proxy.endpoint, 1)
    published = {
        v: {"w": np.full((4, 3), v, np.float32) + np.arange(12, dtype=np.float32).reshape(4, 3),
            "b": np.full(3, -v, np.float64)}
        for v in range(1, 61)
    }  # fmt: skip
    delivered: list = []

    def poll():
        got = actor.poll_weights()
        if got is not None:
            delivered.append(got)

    try:
        # PUB/SUB loses messages until both subscriptions land: warm up with version 1.
        assert wait_for(lambda: bool(delivered), 5.0, 0.02,
                        poll=lambda: (learner.publish_weights(1, published[1]), poll()))  # fmt: skip
        for v in range(2, 61):
            learner.publish_weights(v, published[v])
            for _ in range(3):
                poll()
                time.sleep(0.005)
        assert wait_for(lambda: delivered[-1][0] == 60, 10.0, 0.01,
                        poll=lambda: (learner.poll(0), poll()))  # fmt: skip
        stats, sent = actor.stats(), list(proxy.sent_versions)
    finally:
        actor.close()
        proxy.close()
        learner.close()
    versions = [v for v, _ in delivered]
    assert versions == sorted(set(versions))  # strictly increasing: never an older one
    for v, tensors in delivered:
        assert tensors["w"].tobytes() == published[v]["w"].tobytes()
        assert tensors["b"].tobytes() == published[v]["b"].tobytes()
    # the faults happened: versions went out of order, some were lost or repeated
    assert any(b < a for a, b in zip(sent, sent[1:], strict=False))
    assert proxy.stats()["down"]["dropped"] > 0 and proxy.stats()["down"]["duplicated"] > 0
    assert stats["weights_version"] == 60 and stats["weights_rejected"] == 0


def test_heartbeats_and_dead_actor_detection():
    learner = LearnerLink(LOOPBACK, LOOPBACK, heartbeat_liveness_s=0.3)
    actor = ActorLink(learner.ingest_endpoint, None, 42, heartbeat_interval_s=0.05)
    try:
        assert wait_for(lambda: 42 in learner.actors(), 3.0, poll=lambda: learner.poll(5))
        assert wait_for(
            lambda: learner.actors()[42].heartbeats >= 2, 3.0, poll=lambda: learner.poll(5)
        )
        assert learner.actors()[42].last_heartbeat["submitted"] == 0
        assert learner.dead_actors() == []
        actor.close()
        dead: list[int] = []
        assert wait_for(lambda: dead.extend(learner.dead_actors()) or dead, 3.0,
                        poll=lambda: learner.poll(5))  # fmt: skip
        assert dead == [42] and learner.dead_actors() == []
        assert learner.stats()["actors_dead"] == 1
    finally:
        actor.close()
        learner.close()


def test_learner_rejects_malformed_counts_and_keeps_serving():
    with LearnerLink(LOOPBACK, LOOPBACK) as learner, raw_dealer(learner.ingest_endpoint) as sock:
        bad = [
            b"\xc1garbage",
            pickle.dumps({"v": 1, "type": "transitions"}),
            P.encode(P.make_action_request(3, np.zeros(2))),  # valid, but not for the learner
            P.encode(P.make_transitions(1, 9, [0], 0, {"r": np.array([np.inf])})),
        ]
        codes = []
        for payload in bad:
            sock.send(payload)
            assert wait_for(lambda: sock.poll(0), 3.0, poll=lambda: learner.poll(5))
            codes.append(P.decode(sock.recv()))
        assert [c["code"] for c in codes] == ["malformed", "malformed", "unsupported", "non_finite"]
        assert codes[2]["request_id"] == 3 and codes[3]["seq"] == 9  # addressed replies
        # Still serving: a valid batch comes through and health answers.
        sock.send(P.encode(P.make_transitions(1, 10, [0], 0, {"r": np.array([1.0])})))
        got = collect(learner, 1, 3.0, ack=True)
        assert [(b.actor_id, b.seq) for b in got] == [(1, 10)]
        assert P.decode(sock.recv())["type"] == "ack"
        sock.send(P.encode(P.make_health(1)))
        wait_for(lambda: sock.poll(0), 3.0, poll=lambda: learner.poll(5))
        health = P.decode(sock.recv())
        stats = learner.stats()
    assert health["counters"]["rejected"] == 4 and health["counters"]["batches"] == 1
    assert stats["rejected"] == 4 and stats["rejected_malformed"] == 2
    assert stats["received"] == 6 and stats["health"] == 1


def test_rejected_and_invalid_rows_are_counted_not_resent():
    with LearnerLink(LOOPBACK, LOOPBACK) as learner:
        actor = ActorLink(learner.ingest_endpoint, None, 5, batch_size=4)
        try:
            for i in range(8):
                row = transition(i)
                if i == 2:
                    row["obs"] = np.array([0, np.nan, 0, 0], np.float32)
                actor.submit(row)
            got = collect(learner, 7, 5.0, ack=False)
            learner.reject(5, got[0].seq, "disk says no")
            learner.ack(5, got[1].seq, len(got[1].msg["episode_ids"]))
            assert actor.flush(3.0)
            stats = actor.stats()
        finally:
            actor.close()
    assert [len(b.msg["episode_ids"]) for b in got] == [3, 4]  # the NaN row never left
    assert (stats["invalid"], stats["rejected"], stats["acked"]) == (1, 3, 4)
    assert "disk says no" in stats["last_error"]


# --------------------------------------------------------------------------- action server


def double_first(act_dim: int = 2, calls: list | None = None, delay_s: float = 0.0):
    """A decide_batch whose action is 2 * obs[:, :act_dim], at policy version 7."""

    def decide(obs: np.ndarray):
        if calls is not None:
            calls.append(len(obs))
        if delay_s:
            time.sleep(delay_s)
        return 2.0 * obs[:, :act_dim], 7

    return decide


def test_action_server_batches_four_concurrent_clients():
    calls: list[int] = []
    server = ActionServer(LOOPBACK, double_first(2, calls, 0.003), obs_dim=5, batch_window_s=0.005)
    rounds, results, errors = 25, [], []
    barrier = threading.Barrier(4)

    def client(k: int):
        try:
            with ActionClient(server.endpoint, timeout_s=2.0) as c:
                for r in range(rounds):
                    obs = np.full(5, 10 * k + r, np.float32)
                    barrier.wait(timeout=5)
                    action, version, latency_us = c.act(obs)
                    results.append((obs, action, version, latency_us))
        except Exception as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    with serving(server):
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        stats = server.stats()
    assert not errors
    assert len(results) == 4 * rounds
    for obs, action, version, latency_us in results:
        assert action.shape == (2,) and action.tolist() == (2 * obs[:2]).tolist()
        assert version == 7 and latency_us > 0
    assert sum(calls) == 4 * rounds  # every row decided exactly once
    assert max(calls) > 1 and len(calls) < 4 * rounds  # requests were batched
    assert stats["engine_calls"] == len(calls) and stats["action_replies"] == 4 * rounds


def test_lone_client_does_not_wait_out_the_batch_window():
    calls: list[int] = []
    server = ActionServer(LOOPBACK, double_first(2, calls), obs_dim=3, batch_window_s=0.5)
    with serving(server), ActionClient(server.endpoint, timeout_s=5.0) as c:
        t0 = time.monotonic()
        for _ in range(5):
            c.act(np.zeros(3, np.float32))
        elapsed = time.monotonic() - t0
    assert elapsed < 0.5, f"5 requests took {elapsed:.3f} s: the window was waited out"
    assert calls == [1] * 5


def test_batch_size_reported_and_batched_rows():
    server = ActionServer(LOOPBACK, double_first(3), obs_dim=4, max_batch=8)
    with serving(server), ActionClient(server.endpoint) as c:
        obs = np.arange(12, dtype=np.float32).reshape(3, 4)
        action, version, _ = c.act(obs)
        assert action.shape == (3, 3) and action.tolist() == (2 * obs[:, :3]).tolist()
        with pytest.raises(ActionServerError) as info:
            c.act(np.zeros((9, 4), np.float32))  # more rows than max_batch
        assert info.value.code == "too_large"
        with raw_dealer(server.endpoint) as sock:
            reply = roundtrip(sock, P.encode(P.make_action_request(1, obs)))
        assert reply["batch_size"] == 3


def test_health_answers_without_engine():
    calls: list[int] = []
    server = ActionServer(LOOPBACK, double_first(2, calls), obs_dim=3)
    with serving(server), ActionClient(server.endpoint) as c:
        for _ in range(5):
            health = c.health()
        assert calls == []
        assert health["status"] == "ok" and health["counters"]["health"] == 5
        assert health["counters"]["engine_calls"] == 0 and "policy_version" not in health
        c.act(np.zeros(3, np.float32))
        assert c.health()["policy_version"] == 7
    assert calls == [1]


def test_malformed_requests_get_errors_and_server_keeps_serving():
    server = ActionServer(LOOPBACK, double_first(2), obs_dim=3)
    bad = {
        b"\x93\x01\x02": "malformed",
        pickle.dumps(np.zeros(3)): "malformed",
        P.encode(P.make_action_request(1, np.zeros(4))): "schema",  # wrong obs_dim
        P.encode(P.make_action_request(2, np.array([0, np.nan, 0]))): "non_finite",
        P.encode(P.make_ack(1, 1, 1)): "unsupported",
        msgpack.packb({"v": 1, "type": "action_request", "request_id": 3,
                       "obs": {"dtype": "float32", "shape": [2**40], "data": b"\0" * 8}}): "too_large",
    }  # fmt: skip
    with serving(server), raw_dealer(server.endpoint) as sock:
        for payload, code in bad.items():
            reply = roundtrip(sock, payload)
            assert reply["type"] == "error" and reply["code"] == code, reply
        ok = roundtrip(sock, P.encode(P.make_action_request(9, np.ones(3))))
        assert ok["type"] == "action_reply" and ok["action"].tolist() == [2.0, 2.0]
        stats = server.stats()
    assert stats["rejected"] == len(bad) and stats["received"] == len(bad) + 1


def test_one_clients_bad_row_fails_only_its_own_request():
    """A finite float64 obs that overflows float32 is refused at admission (before, it became
    inf in the batch), and a row the engine turns NaN fails only the request it came from."""
    calls: list[int] = []

    def decide(obs: np.ndarray):
        calls.append(len(obs))
        out = 2.0 * obs[:, :2]
        out[obs[:, 0] == 7.0] = np.nan
        return out, 7

    server = ActionServer(LOOPBACK, decide, obs_dim=3, max_batch=2, batch_window_s=0.5)
    with serving(server), raw_dealer(server.endpoint) as a, raw_dealer(server.endpoint) as b:
        overflow = roundtrip(b, P.encode(P.make_action_request(1, np.array([1e39, 0.0, 0.0]))))
        assert overflow["type"] == "error" and overflow["code"] == "non_finite", overflow
        assert "float32" in overflow["message"] and "1e+39" in overflow["message"]
        for sock in (a, b):  # both become active clients: the server then waits for both
            assert roundtrip(sock, P.encode(P.make_action_request(0, np.ones(3))))["type"] == (
                "action_reply"
            )
        calls.clear()
        a.send(P.encode(P.make_action_request(2, np.ones(3, np.float32))))
        b.send(P.encode(P.make_action_request(3, np.array([7.0, 0.0, 0.0], np.float32))))
        ra, rb = P.decode(a.recv()), P.decode(b.recv())
        stats = server.stats()
    assert calls == [2], "both requests should have shared one engine call"
    assert ra["type"] == "action_reply" and ra["action"].tolist() == [2.0, 2.0], ra
    assert rb["type"] == "error" and rb["code"] == "internal" and rb["request_id"] == 3, rb
    assert stats["engine_errors"] == 1 and stats["action_replies"] == 3


def test_stale_requests_refused():
    server = ActionServer(LOOPBACK, double_first(2), obs_dim=3, max_request_age_s=0.5)
    old = time.time_ns() - 2 * 10**9
    with serving(server), raw_dealer(server.endpoint) as sock:
        reply = roundtrip(sock, P.encode(P.make_action_request(1, np.ones(3), sent_at_ns=old)))
        assert (reply["code"], reply["request_id"]) == ("stale", 1)
        reply = roundtrip(sock, P.encode(P.make_action_request(2, np.ones(3), deadline_ns=old)))
        assert reply["code"] == "stale" and "deadline" in reply["message"]
        fresh = P.make_action_request(3, np.ones(3), sent_at_ns=time.time_ns())
        assert roundtrip(sock, P.encode(fresh))["type"] == "action_reply"
        assert server.stats()["rejected_stale"] == 2


def test_engine_failure_is_an_internal_error_not_a_crash():
    state = {"fail": True}

    def decide(obs):
        if state["fail"]:
            raise RuntimeError("CUDA fell over")
        return obs[:, :1], 1

    server = ActionServer(LOOPBACK, decide, obs_dim=2)
    with serving(server), ActionClient(server.endpoint) as c:
        with pytest.raises(ActionServerError) as info:
            c.act(np.zeros(2))
        assert info.value.code == "internal" and "CUDA fell over" in str(info.value)
        state["fail"] = False
        assert c.act(np.ones(2))[0].tolist() == [1.0]
        assert server.stats()["engine_errors"] == 1


def test_oversized_message_dropped_before_allocation_server_serves_others():
    limits = P.Limits(max_message_bytes=64 * 1024)
    server = ActionServer(LOOPBACK, double_first(2), obs_dim=3, limits=limits)
    with serving(server), raw_dealer(server.endpoint) as big:
        big.send(b"\x00" * (1024 * 1024))  # ZMQ_MAXMSGSIZE: zmq drops this connection
        assert not big.poll(300)
        with ActionClient(server.endpoint, timeout_s=2.0, limits=limits) as c:
            assert c.act(np.ones(3))[0].tolist() == [2.0, 2.0]
        assert server.stats()["received"] == 1  # the big message never reached the server


def test_client_times_out_with_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    c = ActionClient(endpoint, timeout_s=0.1, retries=2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="after 3 attempts") as info:
        c.act(np.zeros(3))
    elapsed = time.monotonic() - t0
    c.close()
    assert endpoint in str(info.value)
    assert 0.25 < elapsed < 1.5
    assert c.reconnects == 2


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"timeout_s": float("nan")}, "timeout_s must be a number > 0 (seconds), got nan"),
        ({"timeout_s": 0}, "got 0"),
        ({"timeout_s": "1"}, "got '1'"),
        ({"retries": 1.5}, "retries must be an integer >= 0, got 1.5"),
        ({"retries": -1}, "got -1"),
        ({"retries": True}, "got True"),
    ],
)
def test_action_client_refuses_a_bad_timeout_or_retry_count_naming_it(kwargs, named):
    """A NaN timeout passed the old `timeout_s <= 0` check and made every attempt time
    out at once; a float retry count failed later inside range()."""
    with pytest.raises(ValueError, match=re.escape(named)):
        ActionClient("tcp://127.0.0.1:1", **kwargs)


@pytest.mark.parametrize("deadline_s", [float("nan"), float("inf"), "0.1"])
def test_action_client_refuses_a_deadline_that_is_not_finite_seconds(deadline_s):
    """NaN reached int() as a bare "cannot convert float NaN to integer"; nothing is sent."""
    with ActionClient("tcp://127.0.0.1:1", timeout_s=0.05, retries=0) as c:
        with pytest.raises(ValueError, match="deadline_s must be a finite number"):
            c.act(np.zeros(3), deadline_s=deadline_s)
        assert c.reconnects == 0


SERVER_SCRIPT = """
import sys, threading, numpy as np
from idql_runtime.transport import ActionServer
version = int(sys.argv[2])
server = ActionServer(sys.argv[1], lambda obs: (obs[:, :1] * 0 + version, version), obs_dim=2)
print("READY", flush=True)
server.serve_forever(threading.Event())
"""


def start_server_process(endpoint: str, version: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, endpoint, str(version)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY"
    return proc


def test_server_restart_is_invisible_to_client_beyond_its_timeout(tmp_path):
    endpoint = f"ipc://{tmp_path}/serve"
    first = start_server_process(endpoint, 1)
    second = None
    try:
        with ActionClient(endpoint, timeout_s=0.5, retries=8) as c:
            assert c.act(np.zeros(2))[1] == 1
            first.send_signal(signal.SIGSTOP)  # frozen: the next request is lost in it
            result: dict = {}
            thread = threading.Thread(
                target=lambda: result.update(out=c.act(np.zeros(2)), t=time.monotonic())
            )
            t0 = time.monotonic()
            thread.start()
            time.sleep(0.2)
            first.kill()
            first.wait(timeout=5)
            second = start_server_process(endpoint, 2)
            thread.join(timeout=10)
            assert result, "act() did not return"
            action, version, _ = result["out"]
            assert version == 2 and action.tolist() == [2.0]
            assert result["t"] - t0 < 0.5 * 9  # within the client's retry budget
            assert c.reconnects >= 1
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


def test_raw_client_example_talks_to_server():
    server = ActionServer(LOOPBACK, double_first(2), obs_dim=5)
    script = str(ROOT / "examples" / "raw_client.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with serving(server):
        out = subprocess.run(
            [sys.executable, script, server.endpoint, "--obs-dim", "5", "--requests", "3"],
            capture_output=True, text=True, timeout=60, env=env, cwd="/",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        batch = subprocess.run(
            [sys.executable, script, server.endpoint, "--obs-dim", "5", "--batch", "4",
             "--requests", "1"], capture_output=True, text=True, timeout=60, env=env, cwd="/",
        )  # fmt: skip
        health = subprocess.run(
            [sys.executable, script, server.endpoint, "--health"],
            capture_output=True, text=True, timeout=60, env=env, cwd="/",
        )  # fmt: skip
    assert [line["request_id"] for line in lines] == [0, 1, 2]
    assert all(len(line["action"]) == 2 and line["policy_version"] == 7 for line in lines)
    assert np.array(json.loads(batch.stdout)["action"]).shape == (4, 2)
    assert json.loads(health.stdout)["status"] == "ok"


def test_raw_client_imports_nothing_from_the_package():
    source = (ROOT / "examples" / "raw_client.py").read_text()
    assert "idql_runtime" not in source.split('"""', 2)[2]


def test_refused_weights_do_not_block_later_versions():
    """A protocol-valid update the actor refuses (e.g. wrong shapes) with a huge version
    is forgotten by reject_weights, so the next good, smaller version still arrives, and
    copies of the refused version still in flight (or republished) are not offered again."""
    learner = LearnerLink(LOOPBACK, LOOPBACK, weights_republish_s=None)
    actor = ActorLink(learner.ingest_endpoint, learner.weights_endpoint, 1)
    w = {"w": np.ones(3, np.float32)}
    try:
        got = []
        assert wait_for(
            lambda: got.append(actor.poll_weights()) or got[-1] is not None,
            5.0,
            0.02,
            poll=lambda: learner.publish_weights(10**12, w),
        )
        assert got[-1][0] == 10**12
        actor.reject_weights(10**12, 0)  # the consumer kept version 0
        got.clear()
        assert wait_for(
            lambda: got.append(actor.poll_weights()) or got[-1] is not None,
            5.0,
            0.02,
            poll=lambda: (learner.publish_weights(10**12, w), learner.publish_weights(7, w)),
        )
        assert got[-1][0] == 7 and actor.stats()["weights_rejected"] == 1
    finally:
        actor.close()
        learner.close()


def test_learner_link_on_a_port_in_use_raises_bind_error_and_releases_the_other():
    """The weights port is taken: BindError names it, and the ingest port the link had
    already bound is free again (a retry on other ports, or the other learner, can use it)."""
    from idql_runtime.ports import free_port_pair
    from idql_runtime.transport import BindError

    port = free_port_pair()
    ingest, weights = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    ctx = zmq.Context()
    holder = ctx.socket(zmq.PUB)
    holder.bind(weights)
    try:
        with pytest.raises(BindError, match=f"cannot bind '{weights}': Address already in use"):
            LearnerLink(ingest, weights)
        probe = ctx.socket(zmq.ROUTER)
        probe.bind(ingest)
        probe.close(linger=0)
    finally:
        holder.close(linger=0)
        ctx.term()


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"batch_window_s": float("nan")}, "batch_window_s must be a finite number >= 0, got nan"),
        ({"batch_window_s": -0.1}, "got -0.1"),
        ({"max_request_age_s": 0.0}, "max_request_age_s must be a finite number > 0"),
        ({"max_request_age_s": float("nan")}, "got nan"),
        ({"max_request_age_s": float("inf")}, "got inf"),
    ],
)
def test_action_server_refuses_windows_and_ages_that_cannot_mean_anything(kw, names):
    with pytest.raises(ValueError, match=names):
        ActionServer("tcp://127.0.0.1:0", lambda obs: (obs[:, :1], 0), obs_dim=3, **kw)
