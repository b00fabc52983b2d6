"""Exposure and authentication (reliability.md #12, #13) with real sockets."""

from __future__ import annotations

import gc
import os
import stat
import threading
import time

import numpy as np
import pytest
import zmq
from zmq.auth.thread import AuthenticationThread

from idql_runtime import protocol as P
from idql_runtime.client import ActionClient
from idql_runtime.transport import (
    ActionServer,
    ActorLink,
    CurveConfig,
    InsecureBindError,
    InsecureKeyFileError,
    LearnerLink,
    check_bind_address,
    generate_keypair,
    load_public_key,
    load_secret_key,
)

REJECT_WAIT_S = 0.6  # how long an unauthorised peer gets to push anything through


def decide(obs):
    return obs[:, :1] + 1.0, 3


@pytest.fixture
def keys(tmp_path):
    """A server keypair, an allow-listed client and a rogue client unknown to the server."""
    allowed = tmp_path / "authorized"
    server_pub, server_sec = generate_keypair(tmp_path / "server", "server")
    client_pub, client_sec = generate_keypair(tmp_path / "client", "client")
    _, rogue_sec = generate_keypair(tmp_path / "rogue", "rogue")
    _, other_server_sec = generate_keypair(tmp_path / "other", "other")
    allowed.mkdir()
    (allowed / "client.key").write_bytes(client_pub.read_bytes())
    return {
        "server": CurveConfig(server_sec, authorized_keys_dir=allowed),
        "client": CurveConfig(client_sec, server_public_key_file=server_pub),
        "rogue": CurveConfig(rogue_sec, server_public_key_file=server_pub),
        # An allow-listed client that trusts the wrong server key.
        "wrong_server": CurveConfig(client_sec, server_public_key_file=other_server_sec),
    }


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:5555", "tcp://127.8.9.10:*", "tcp://localhost:1", "tcp://[::1]:5555",
     "ipc:///tmp/x.sock", "inproc://x"],
)  # fmt: skip
def test_loopback_and_ipc_binds_allowed(endpoint):
    check_bind_address(endpoint)


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.20:5555", "tcp://[::]:5555",
     "tcp://eth0:5555", "tcp://robot.example.com:5555", "tcp://10.0.0.1:*"],
)  # fmt: skip
def test_non_loopback_bind_refused_without_curve_or_insecure(endpoint, keys):
    with pytest.raises(InsecureBindError, match="not loopback.*insecure=True"):
        check_bind_address(endpoint)
    with pytest.raises(InsecureBindError):
        check_bind_address(endpoint, curve=keys["client"])  # client keys do not count
    check_bind_address(endpoint, insecure=True)
    check_bind_address(endpoint, curve=keys["server"])


def test_servers_refuse_exposed_binds_before_opening_sockets():
    with pytest.raises(InsecureBindError):
        ActionServer("tcp://0.0.0.0:*", decide, obs_dim=2)
    with pytest.raises(InsecureBindError):
        LearnerLink("tcp://127.0.0.1:*", "tcp://*:*")
    with pytest.raises(ValueError, match="transport 'udp'"):
        check_bind_address("udp://127.0.0.1:5")
    server = ActionServer("tcp://0.0.0.0:*", decide, obs_dim=2, insecure=True)
    server.close()


def test_generated_secret_key_is_private_and_world_readable_key_refused(tmp_path, keys):
    _, secret = generate_keypair(tmp_path, "k")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    public, private = load_secret_key(secret)
    assert len(public) == 40 and len(private) == 40
    for mode in (0o644, 0o640, 0o604):
        os.chmod(secret, mode)
        with pytest.raises(InsecureKeyFileError, match="chmod 600"):
            load_secret_key(secret)
    os.chmod(keys["server"].secret_key_file, 0o644)
    with pytest.raises(InsecureKeyFileError):
        ActionServer("tcp://127.0.0.1:*", decide, obs_dim=2, curve=keys["server"])
    os.chmod(keys["client"].secret_key_file, 0o604)
    with pytest.raises(InsecureKeyFileError):
        ActionClient("tcp://127.0.0.1:9", curve=keys["client"])


@pytest.mark.parametrize("server", ["action_server", "learner_link"])
def test_refused_curve_server_stops_its_zap_thread(keys, server, monkeypatch):
    """A server whose construction fails after its ZAP thread started must stop that thread
    before closing the context: otherwise the thread dies polling closed sockets (ENOTSOCK)
    and its ``__del__`` raises again at a later, unrelated garbage collection."""
    errors: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: errors.append(repr(a.exc_value)))
    monkeypatch.setattr("sys.unraisablehook", lambda u: errors.append(repr(u.exc_value)))
    os.chmod(keys["server"].secret_key_file, 0o644)  # refused after the authenticator starts
    with pytest.raises(InsecureKeyFileError):
        if server == "action_server":
            ActionServer("tcp://127.0.0.1:*", decide, obs_dim=2, curve=keys["server"])
        else:
            LearnerLink("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", curve=keys["server"])
    time.sleep(0.3)  # give a thread left polling closed sockets the time to die
    gc.collect()
    alive = [t for t in threading.enumerate() if isinstance(t, AuthenticationThread)]
    assert alive == [] and errors == []


def test_curve_action_server_admits_only_allow_listed_clients(keys):
    server = ActionServer("tcp://127.0.0.1:*", decide, obs_dim=2, curve=keys["server"])
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop, 0.01), daemon=True)
    thread.start()
    try:
        with ActionClient(server.endpoint, curve=keys["client"], timeout_s=2.0) as good:
            assert good.act(np.array([1.0, 0.0]))[0].tolist() == [2.0]
        assert server.stats()["received"] == 1

        for name in ("rogue", "wrong_server"):
            with ActionClient(server.endpoint, curve=keys[name], timeout_s=REJECT_WAIT_S,
                              retries=0) as bad, pytest.raises(TimeoutError):  # fmt: skip
                bad.act(np.zeros(2))
        # Plaintext: a bare DEALER with no keys at all.
        ctx = zmq.Context()
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(server.endpoint)
        plain.send(P.encode(P.make_health(1)))
        assert not plain.poll(int(REJECT_WAIT_S * 1000))
        plain.close()
        ctx.term()
        assert server.stats()["received"] == 1  # zero messages from the three intruders

        # The allow-listed client (also via the file-path arguments) still gets through.
        with ActionClient(
            server.endpoint,
            server_public_key_file=keys["client"].server_public_key_file,
            client_secret_key_file=keys["client"].secret_key_file,
        ) as good:
            assert good.health()["counters"]["received"] == 2
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def test_curve_learner_link_admits_only_allow_listed_actors(keys):
    learner = LearnerLink(
        "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", curve=keys["server"], weights_republish_s=None
    )
    good = ActorLink(learner.ingest_endpoint, learner.weights_endpoint, 1, curve=keys["client"],
                     batch_size=1, heartbeat_interval_s=60)  # fmt: skip
    rogues = [
        ActorLink(
            learner.ingest_endpoint,
            learner.weights_endpoint,
            2,
            curve=keys[name],
            batch_size=1,
            heartbeat_interval_s=0.05,
        )  # fmt: skip
        for name in ("rogue", "wrong_server")
    ]
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(learner.ingest_endpoint)
    try:
        for actor in [good, *rogues]:
            actor.submit({"r": 1.0})
        plain.send(P.encode(P.make_transitions(3, 0, [0], 0, {"r": np.ones(1)})))
        got = []

        def poll():
            for batch in learner.poll(5):
                got.append(batch)
                learner.ack(batch.actor_id, batch.seq, 1)
            learner.publish_weights(1, {"w": np.ones(2, np.float32)})

        weights = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not (weights and good.stats()["acked"] == 1):
            poll()
            weights = weights or good.poll_weights()
        deadline = time.monotonic() + REJECT_WAIT_S  # give the intruders time to try
        while time.monotonic() < deadline:
            poll()
            time.sleep(0.01)
        stats = learner.stats()
        assert weights is not None and weights[0] == 1 and good.stats()["acked"] == 1
        assert [b.actor_id for b in got] == [1]
        # Everything that arrived came from the allow-listed actor: its batch + heartbeats.
        assert stats["batches"] == 1 and stats["heartbeats"] == good.stats()["heartbeats"]
        assert stats["received"] == 1 + stats["heartbeats"] and stats["rejected"] == 0
        assert set(learner.actors()) == {1}  # no heartbeat from a rogue ever arrived
        for rogue in rogues:
            rs = rogue.stats()
            assert rs["sent"] == 0 and rs["acked"] == 0 and rs["weights_version"] == -1
    finally:
        plain.close()
        ctx.term()
        for actor in [good, *rogues]:
            actor.close()
        learner.close()


def _second_client(keys, tmp_path, name: str) -> tuple[CurveConfig, str]:
    """Another allow-listed client keypair (file ``name.key`` in the allow-list)."""
    pub, sec = generate_keypair(tmp_path / name, name)
    allowed = keys["server"].authorized_keys_dir
    (allowed / f"{name}.key").write_bytes(pub.read_bytes())
    server_pub = keys["client"].server_public_key_file
    return CurveConfig(sec, server_public_key_file=server_pub), load_public_key(pub).decode()


def _drive(learner: LearnerLink, until, timeout_s: float = 5.0) -> list:
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(got):
        for batch in learner.poll(5):
            got.append(batch)
            learner.ack(batch.actor_id, batch.seq, 1)
    return got


@pytest.mark.parametrize("bound_by", ["first_use", "key_file", "persisted"])
def test_curve_actor_id_speaks_only_with_its_key(keys, tmp_path, bound_by):
    """An allow-listed key cannot claim an actor_id bound to another key: its batches and
    heartbeats are refused (error 'forbidden', with the seq so it stops resending), and
    the owner's acks keep reaching the owner."""
    other, other_key = _second_client(keys, tmp_path, "other")
    owner_key = load_public_key(tmp_path / "client" / "client.key").decode()
    persisted = None
    if bound_by == "key_file":
        (keys["server"].authorized_keys_dir / "actor-1.key").write_bytes(
            (tmp_path / "client" / "client.key").read_bytes()
        )
    elif bound_by == "persisted":
        persisted = {"1": owner_key}
    learner = LearnerLink("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", curve=keys["server"],
                          weights_republish_s=None, actor_keys=persisted)  # fmt: skip
    kw = dict(batch_size=1, heartbeat_interval_s=0.05)
    links: list[ActorLink] = []

    def link(curve):
        links.append(ActorLink(learner.ingest_endpoint, None, 1, curve=curve, **kw))
        return links[-1]

    try:
        got: list = []
        owner = None
        if bound_by == "first_use":  # the owner speaks first (even a heartbeat binds)
            owner = link(keys["client"])
            owner.submit({"r": np.float32(0.0)})
            got += _drive(learner, lambda g: owner.stats()["acked"] == 1)
        # else: bound before anyone spoke, so the thief may even come first
        thief = link(other)
        for i in range(5):
            thief.submit({"r": np.float32(100.0 + i)})
        got += _drive(learner, lambda g: thief.stats()["pending"] == 0)
        owner = owner or link(keys["client"])
        for i in range(5):
            owner.submit({"r": np.float32(1.0 + i)})
        got += _drive(learner, lambda g: owner.stats()["pending"] == 0)
        owner_stats, thief_stats, link_stats = owner.stats(), thief.stats(), learner.stats()
        bindings = learner.actor_keys()
    finally:
        for one in links:
            one.close()
        learner.close()
    rewards = sorted(float(b.msg["arrays"]["r"][0]) for b in got)
    assert rewards == ([0.0] if bound_by == "first_use" else []) + [1.0, 2.0, 3.0, 4.0, 5.0]
    assert owner_stats["acked"] == len(rewards) and owner_stats["rejected"] == 0
    assert thief_stats["rejected"] == 5 and thief_stats["acked"] == 0
    assert "bound to another CURVE key" in thief_stats["last_error"]
    assert link_stats["rejected_forbidden"] >= 5  # its batches, plus its heartbeats
    assert bindings == {1: owner_key}


def test_curve_free_actor_ids_bind_on_first_use_and_key_files_override(keys, tmp_path):
    other, other_key = _second_client(keys, tmp_path, "other")
    owner_key = load_public_key(tmp_path / "client" / "client.key").decode()
    (keys["server"].authorized_keys_dir / "actor-4.key").write_bytes(
        (tmp_path / "other" / "other.key").read_bytes()
    )
    # a persisted binding of id 4 to the client key is overridden by the actor-4.key file
    learner = LearnerLink("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", curve=keys["server"],
                          weights_republish_s=None, actor_keys={"4": owner_key, "9": "x" * 40})  # fmt: skip
    try:
        assert learner.actor_keys() == {4: other_key, 9: "x" * 40}
    finally:
        learner.close()
    plain = LearnerLink("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", weights_republish_s=None,
                        actor_keys={"4": owner_key})  # fmt: skip
    try:
        assert plain.actor_keys() == {}  # no CURVE, no identities to bind
    finally:
        plain.close()
