"""The learner's side: ``LearnerLink`` (single-threaded, driven by the learner loop)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from idql_runtime import __version__
from idql_runtime.protocol import (
    DEFAULT_LIMITS,
    E_FORBIDDEN,
    E_SCHEMA,
    E_TOO_LARGE,
    E_UNSUPPORTED,
    ERROR_CODES,
    HEALTH,
    HEARTBEAT,
    TRANSITIONS,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
    error_from,
    make_ack,
    make_error,
    make_health_reply,
    make_weights,
)
from idql_runtime.transport.security import (
    CurveConfig,
    _abandon,
    _initial_actor_keys,
    _start_authenticator,
    check_bind_address,
)
from idql_runtime.transport.sockets import (
    DEFAULT_HWM,
    DEFAULT_LINGER_MS,
    _route,
    _server_socket,
)

# --------------------------------------------------------------------------- learner side


class IngestBatch(NamedTuple):
    """One validated transitions message: unpacks as ``(actor_id, seq, msg)``."""

    actor_id: int
    seq: int
    msg: Message


@dataclass
class ActorState:
    """What the learner link knows about one live actor."""

    envelope: list[bytes]
    last_seen: float  # monotonic
    batches: int = 0
    rows: int = 0
    heartbeats: int = 0
    last_heartbeat: dict[str, Any] = field(default_factory=dict)


_LEARNER_COUNTERS = (
    "received",
    "batches",
    "rows",
    "heartbeats",
    "health",
    "rejected",
    *(f"rejected_{code}" for code in ERROR_CODES),
    "acks_sent",
    "acks_unroutable",
    "replies_dropped",
    "weights_published",
    "weights_republished",
    "actors_dead",
)


class LearnerLink:
    """The learner's sockets: a ROUTER for transitions/acks/heartbeats and a PUB for weights.

    Single-threaded: the learner loop calls ``poll``. Malformed messages never raise: they
    are counted in ``stats()["rejected"]`` (and per code) and answered with an ``error``
    (carrying the seq when it could be parsed, so the actor stops resending). Health
    requests are answered with the counters. Deduplication by ``(actor_id, seq)`` is the
    caller's job; ``poll`` hands every batch through, resends included.
    """

    def __init__(
        self,
        bind_ingest: str,
        bind_weights: str,
        *,
        limits: Limits = DEFAULT_LIMITS,
        curve: CurveConfig | None = None,
        insecure: bool = False,
        heartbeat_liveness_s: float = 5.0,
        weights_republish_s: float | None = 5.0,
        linger_ms: int = DEFAULT_LINGER_MS,
        hwm: int = DEFAULT_HWM,
        actor_keys: Mapping[Any, str] | None = None,
    ) -> None:
        check_bind_address(bind_ingest, insecure=insecure, curve=curve)
        check_bind_address(bind_weights, insecure=insecure, curve=curve)
        self.limits = limits
        self.heartbeat_liveness_s = heartbeat_liveness_s
        self.weights_republish_s = weights_republish_s
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        try:
            self._auth = _start_authenticator(self._ctx, curve)
            self._router, self.ingest_endpoint = _server_socket(
                self._ctx, zmq.ROUTER, bind_ingest,
                limits=limits, curve=curve, linger_ms=linger_ms, hwm=hwm,
            )  # fmt: skip
            self._pub, self.weights_endpoint = _server_socket(
                self._ctx, zmq.PUB, bind_weights,
                limits=limits, curve=curve, linger_ms=linger_ms, hwm=8,
            )  # fmt: skip
        except Exception:
            _abandon(self._ctx, self._auth)
            raise
        self._started = time.monotonic()
        self._counts = dict.fromkeys(_LEARNER_COUNTERS, 0)
        self._actors: dict[int, ActorState] = {}
        self._last_weights: bytes | None = None
        self._last_publish = 0.0
        self._weights_version: int | None = None
        self._curve = curve is not None
        self._actor_keys: dict[int, str] = {}
        if curve is not None:
            self._actor_keys = _initial_actor_keys(curve, actor_keys)

    def actor_keys(self) -> dict[int, str]:
        """actor_id -> the Z85 CURVE public key that speaks for it (empty without CURVE).

        Seeded from ``authorized/actor-<id>.key`` files and from ``actor_keys`` (bindings
        persisted by an earlier run); any other id is bound to the first key that uses it.
        The online learner commits this map with every replay commit, so a restart keeps it.
        """
        return dict(self._actor_keys)

    def _authorize(self, actor_id: int, user_id: str | None) -> bool:
        """Whether the connection's CURVE key may speak for ``actor_id`` (binds a new id)."""
        if not self._curve:
            return True
        if not user_id:  # cannot happen on a CURVE socket; refuse rather than trust
            return False
        owner = self._actor_keys.setdefault(actor_id, user_id)
        return owner == user_id

    def poll(self, timeout_ms: int = 0, max_messages: int = 1024) -> list[IngestBatch]:
        """Validated transition batches that arrived (waiting up to ``timeout_ms`` for one).

        Heartbeats and health requests are handled here; the list holds only batches.
        """
        out: list[IngestBatch] = []
        if self._router.poll(timeout_ms, zmq.POLLIN):
            for _ in range(max_messages):
                user_id: str | None = None
                try:
                    if self._curve:  # the ZAP handler put the peer's public key on each frame
                        parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        user_id = str(parts[-1].get("User-Id"))
                        frames = [p.bytes for p in parts]
                    else:
                        frames = self._router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(frames, out, user_id)
        self._maybe_republish()
        return out

    def _handle(
        self, frames: list[bytes], out: list[IngestBatch], user_id: str | None = None
    ) -> None:
        self._counts["received"] += 1
        envelope, payload = frames[:-1], frames[-1]
        now = time.monotonic()
        try:
            msg = decode(payload, self.limits)
        except ProtocolError as exc:
            self._reject(envelope, exc)
            return
        mtype = msg["type"]
        if mtype in (TRANSITIONS, HEARTBEAT) and not self._authorize(msg["actor_id"], user_id):
            # Never touch the bound actor's state: its acks must keep going to its own
            # connection, not to a peer that claims its id.
            key = (user_id or "")[:8]
            self._reject(
                envelope,
                ProtocolError(
                    E_FORBIDDEN,
                    f"actor_id {msg['actor_id']} is bound to another CURVE key; this"
                    f" connection's key starts {key!r} (bind ids with"
                    f" authorized/actor-<id>.key, or use a free actor_id)",
                    actor_id=msg["actor_id"],
                    seq=msg.get("seq"),
                ),
            )
            return
        if mtype == TRANSITIONS:
            state = self._touch(msg["actor_id"], envelope, now)
            rows = len(msg["episode_ids"])
            state.batches += 1
            state.rows += rows
            self._counts["batches"] += 1
            self._counts["rows"] += rows
            out.append(IngestBatch(msg["actor_id"], msg["seq"], msg))
        elif mtype == HEARTBEAT:
            state = self._touch(msg["actor_id"], envelope, now)
            state.heartbeats += 1
            state.last_heartbeat = msg["stats"]
            self._counts["heartbeats"] += 1
        elif mtype == HEALTH:
            self._counts["health"] += 1
            reply = make_health_reply(
                server=f"idql-learner/{__version__}",
                uptime_s=now - self._started,
                counters={**self._counts, "actors_live": len(self._actors)},
                policy_version=self._weights_version,
                request_id=msg.get("request_id"),
            )
            if not _route(self._router, envelope, reply):
                self._counts["replies_dropped"] += 1
        else:
            self._reject(
                envelope,
                ProtocolError(
                    E_UNSUPPORTED,
                    f"the learner's ingest endpoint does not serve {mtype!r} messages",
                    request_id=msg.get("request_id"),
                ),
            )

    def _touch(self, actor_id: int, envelope: list[bytes], now: float) -> ActorState:
        state = self._actors.get(actor_id)
        if state is None:
            state = self._actors[actor_id] = ActorState(envelope, now)
        state.envelope, state.last_seen = envelope, now
        return state

    def _reject(self, envelope: list[bytes], exc: ProtocolError) -> None:
        self._counts["rejected"] += 1
        self._counts[f"rejected_{exc.code}"] += 1
        if not _route(self._router, envelope, error_from(exc)):
            self._counts["replies_dropped"] += 1

    def ack(self, actor_id: int, seq: int, committed_rows: int, status: str = "committed") -> bool:
        """Tell an actor that batch ``seq`` is committed (or a duplicate, or rejected).

        Returns False when the actor is unknown (never seen or declared dead) or its queue
        is full; the actor will resend and the batch will be acked then.
        """
        state = self._actors.get(actor_id)
        if state is None:
            self._counts["acks_unroutable"] += 1
            return False
        if not _route(
            self._router, state.envelope, make_ack(actor_id, seq, committed_rows, status)
        ):
            self._counts["replies_dropped"] += 1
            return False
        self._counts["acks_sent"] += 1
        return True

    def reject(self, actor_id: int, seq: int, message: str, code: str = E_SCHEMA) -> bool:
        """Tell an actor that batch ``seq`` will never be accepted (it stops resending it)."""
        state = self._actors.get(actor_id)
        if state is None:
            return False
        return _route(
            self._router, state.envelope, make_error(code, message, actor_id=actor_id, seq=seq)
        )

    def publish_weights(self, version: int, tensors: Mapping[str, np.ndarray]) -> int:
        """Broadcast weights (hashed) to every subscribed actor; returns the message bytes.

        PUB never blocks: a slow subscriber loses older versions, never newer ones. The
        last weights are republished every ``weights_republish_s`` from ``poll`` so that
        actors that joined late get them too.
        """
        data = encode(make_weights(version, tensors))
        if len(data) > self.limits.max_message_bytes:
            raise ProtocolError(
                E_TOO_LARGE,
                f"weights message of {len(data)} bytes > max_message_bytes="
                f"{self.limits.max_message_bytes}",
            )
        self._last_weights, self._weights_version = data, int(version)
        self.publish_raw(data)
        self._counts["weights_published"] += 1
        return len(data)

    def publish_raw(self, data: bytes) -> None:
        """Publish bytes as they are (for fault-injection tests: truncated, stale, NaN)."""
        self._pub.send(data, zmq.NOBLOCK)
        self._last_publish = time.monotonic()

    def _maybe_republish(self) -> None:
        if self._last_weights is None or self.weights_republish_s is None:
            return
        if time.monotonic() - self._last_publish >= self.weights_republish_s:
            self.publish_raw(self._last_weights)
            self._counts["weights_republished"] += 1

    def actors(self) -> dict[int, ActorState]:
        """Live actors by id (a copy of the table; ``last_seen`` is time.monotonic())."""
        return dict(self._actors)

    def dead_actors(self) -> list[int]:
        """Actors silent for more than ``heartbeat_liveness_s``; each is reported once."""
        cutoff = time.monotonic() - self.heartbeat_liveness_s
        dead = sorted(aid for aid, st in self._actors.items() if st.last_seen < cutoff)
        for aid in dead:
            del self._actors[aid]
        self._counts["actors_dead"] += len(dead)
        return dead

    def stats(self) -> dict[str, int]:
        return {**self._counts, "actors_live": len(self._actors)}

    def close(self) -> None:
        """Close both sockets (bounded linger) and the context; safe to call twice."""
        if self._router.closed:
            return
        self._router.close()
        self._pub.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def __enter__(self) -> LearnerLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
