"""The actor's side: ``ActorLink`` (a thread owns its sockets; ``submit`` never blocks)."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from idql_runtime.protocol import (
    ACK,
    DEFAULT_LIMITS,
    E_TOO_LARGE,
    E_UNSUPPORTED,
    ERROR,
    WEIGHTS,
    Limits,
    ProtocolError,
    decode,
    encode,
    make_heartbeat,
    make_transitions,
    verify_weights,
)
from idql_runtime.transport.security import (
    CurveConfig,
)
from idql_runtime.transport.sockets import (
    DEFAULT_HWM,
    DEFAULT_LINGER_MS,
    ZMQ_HEARTBEAT_IVL_MS,
    ZMQ_HEARTBEAT_TIMEOUT_MS,
    _configure,
    _connect,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- actor side


@dataclass
class _Batch:
    seq: int
    rows: int
    payload: bytes
    oldest_t: float  # monotonic submit time of its oldest row
    last_sent: float | None = None  # monotonic time of the last successful send
    sends: int = 0


@dataclass
class _Unsent:
    data: Mapping[str, Any]
    episode_id: int
    policy_version: int
    t: float


_ACTOR_COUNTERS = (
    "submitted",
    "sent",
    "sent_batches",
    "acked",
    "acked_batches",
    "resent",
    "resent_rows",
    "dropped",
    "invalid",
    "rejected",
    "duplicates",
    "reconnects",
    "heartbeats",
    "weights_received",
    "weights_rejected",
    "weights_stale",
    "bad_replies",
    "errors",
)


class ActorLink:
    """The actor's connection to the learner, run by its own thread.

    ``submit`` queues one transition in a bounded buffer (O(1), never blocks, thread-safe).
    The thread cuts the queue into batches of up to ``batch_size`` rows with consecutive
    sequence numbers (a batch never mixes policy versions or key sets), sends them without
    blocking, keeps each until the learner acks it, and resends it after
    ``resend_timeout_s`` or at once after a reconnect; the bytes of a resent batch are the
    bytes first sent, so the learner can deduplicate on ``(actor_id, seq)``.

    ``buffer_capacity`` bounds unsent rows plus rows in unacked batches together. When full,
    the oldest unsent row is dropped (counted once in ``dropped``); only when no row is
    unsent does the oldest unacked batch go (its seq then shows as a gap at the learner).

    Sequence numbers start at ``start_seq``; the default is the wall clock in microseconds,
    so a restarted actor with the same id never reuses a seq of its previous run (the
    jump is reported as ``first_seq`` in heartbeats so that it is not mistaken for a gap).
    """

    def __init__(
        self,
        endpoint_ingest: str,
        endpoint_weights: str | None,
        actor_id: int,
        *,
        buffer_capacity: int = 100_000,
        batch_size: int = 64,
        resend_timeout_s: float = 2.0,
        heartbeat_interval_s: float = 1.0,
        max_batch_delay_s: float = 0.05,
        max_inflight_batches: int = 16,
        limits: Limits = DEFAULT_LIMITS,
        curve: CurveConfig | None = None,
        start_seq: int | None = None,
        poll_interval_s: float = 0.005,
        linger_ms: int = DEFAULT_LINGER_MS,
    ) -> None:
        if not 0 <= actor_id < 2**31:
            raise ValueError(f"actor_id must be in [0, 2**31), got {actor_id}")
        if not 1 <= batch_size <= limits.max_batch_transitions:
            raise ValueError(
                f"batch_size={batch_size} must be in [1, max_batch_transitions="
                f"{limits.max_batch_transitions}]"
            )
        if buffer_capacity < batch_size:
            raise ValueError(f"buffer_capacity={buffer_capacity} < batch_size={batch_size}")
        for name, value in (
            ("resend_timeout_s", resend_timeout_s),
            ("heartbeat_interval_s", heartbeat_interval_s),
            ("poll_interval_s", poll_interval_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.actor_id = actor_id
        self.endpoint_ingest, self.endpoint_weights = endpoint_ingest, endpoint_weights
        self.buffer_capacity, self.batch_size = buffer_capacity, batch_size
        self.resend_timeout_s, self.heartbeat_interval_s = resend_timeout_s, heartbeat_interval_s
        self.max_batch_delay_s, self.max_inflight_batches = max_batch_delay_s, max_inflight_batches
        self.limits = limits
        self.first_seq = time.time_ns() // 1000 if start_seq is None else int(start_seq)
        self._next_seq = self.first_seq
        self._poll_ms = max(1, int(poll_interval_s * 1000))

        self._lock = threading.Lock()
        self._unsent: deque[_Unsent] = deque()
        self._unacked: OrderedDict[int, _Batch] = OrderedDict()
        self._pending_rows = 0  # unsent + in batches being formed + unacked
        self._dropped_seqs: OrderedDict[int, int] = OrderedDict()  # seq -> rows, bounded
        self._counts = dict.fromkeys(_ACTOR_COUNTERS, 0)
        self._new_weights: tuple[int, dict[str, np.ndarray]] | None = None
        self._weights_version = -1
        self._refused_versions: deque[int] = deque(maxlen=64)  # their copies in flight too
        self._connected = False
        self._ever_connected = False
        self._down_since = math.inf  # monotonic time of the last DISCONNECTED event
        self._flush_requested = False
        self._last_error = ""
        self._stop = threading.Event()

        self._ctx = zmq.Context()
        try:
            self._dealer = self._ctx.socket(zmq.DEALER)
            _configure(self._dealer, limits, linger_ms=linger_ms, hwm=DEFAULT_HWM)
            self._dealer.setsockopt(zmq.IMMEDIATE, 1)  # no queueing without a live learner
            self._dealer.setsockopt(zmq.HEARTBEAT_IVL, ZMQ_HEARTBEAT_IVL_MS)
            self._dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMQ_HEARTBEAT_TIMEOUT_MS)
            if curve is not None:
                curve.apply_client(self._dealer)
            self._monitor = self._dealer.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            )
            _connect(self._dealer, endpoint_ingest)
            self._sub: zmq.Socket | None = None
            if endpoint_weights is not None:
                self._sub = self._ctx.socket(zmq.SUB)
                _configure(self._sub, limits, linger_ms=0, hwm=4)
                self._sub.setsockopt(zmq.CONFLATE, 1)  # only the newest weights matter
                if curve is not None:
                    curve.apply_client(self._sub)
                self._sub.setsockopt(zmq.SUBSCRIBE, b"")
                _connect(self._sub, endpoint_weights)
        except Exception:
            self._ctx.destroy(linger=0)
            raise
        self._thread = threading.Thread(target=self._run, name=f"ActorLink-{actor_id}", daemon=True)
        self._thread.start()

    # -- control-loop side (any thread) --------------------------------------------

    def submit(
        self,
        transition: Mapping[str, np.ndarray | float | int | bool],
        episode_id: int | None = None,
        policy_version: int | None = None,
    ) -> None:
        """Queue one transition; O(1), never blocks, never raises for a full buffer.

        ``transition`` maps array names (obs, action, reward, next_obs, terminated,
        truncated, ...) to one row each; every transition of a batch must have the same
        names and shapes. ``episode_id`` and ``policy_version`` default to the keys of the
        same names in ``transition`` (which are then not sent as arrays), else 0.
        Arrays are copied here, so the caller may reuse its buffers.
        """
        data = dict(transition)
        ep = data.pop("episode_id", 0) if episode_id is None else episode_id
        pv = data.pop("policy_version", 0) if policy_version is None else policy_version
        data.pop("episode_id", None)  # given as arguments: never also sent as arrays
        data.pop("policy_version", None)
        for key, value in data.items():
            if type(value) is np.ndarray:
                data[key] = value.copy()
        item = _Unsent(data, int(ep), int(pv), time.monotonic())
        with self._lock:
            self._unsent.append(item)
            self._pending_rows += 1
            self._counts["submitted"] += 1
            self._enforce_capacity_locked()

    def _enforce_capacity_locked(self) -> None:
        """Drop the oldest unsent rows (else the oldest unacked batch) down to capacity."""
        while self._pending_rows > self.buffer_capacity:
            if self._unsent:
                self._unsent.popleft()
                self._pending_rows -= 1
                self._counts["dropped"] += 1
            elif self._unacked:
                seq, batch = self._unacked.popitem(last=False)
                self._pending_rows -= batch.rows
                self._counts["dropped"] += batch.rows
                self._dropped_seqs[seq] = batch.rows
                while len(self._dropped_seqs) > 4096:
                    self._dropped_seqs.popitem(last=False)
            else:
                return  # rows being cut into a batch right now; the thread re-checks

    def poll_weights(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest verified weights received since the last call, else None.

        Only versions newer than every version returned before are delivered; tensors are
        read-only arrays whose sha256 matched.
        """
        with self._lock:
            new, self._new_weights = self._new_weights, None
        return new

    def reject_weights(self, version: int, current_version: int) -> None:
        """The consumer refused ``version`` (e.g. shapes that do not fit its model): forget
        it, so a refused update with a huge version cannot block every later good one, and
        drop the copies of it still in flight (a learner republishes its latest weights)."""
        with self._lock:
            if self._weights_version == version:
                self._weights_version = current_version
            self._refused_versions.append(version)
            self._counts["weights_rejected"] += 1

    def flush(self, timeout_s: float) -> bool:
        """Send partial batches now and wait (bounded) until every row is acked."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._flush_requested = True
        try:
            while True:
                with self._lock:
                    if self._pending_rows == 0:
                        return True
                if time.monotonic() >= deadline or not self._thread.is_alive():
                    return False
                time.sleep(0.002)
        finally:
            with self._lock:
                self._flush_requested = False

    def stats(self) -> dict[str, Any]:
        """Counters (rows unless named ``*_batches``) and gauges of this link.

        sent: rows sent once; resent: batches sent again; acked: rows acked; dropped: rows
        dropped for capacity; invalid: rows that could not be encoded (shape mismatch,
        dtype outside the allow-list, NaN/inf); rejected: rows the learner refused;
        unacked/unsent/pending: rows now in flight / queued / both; lag_s: age of the
        oldest row not yet acked.
        """
        now = time.monotonic()
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            unacked = sum(b.rows for b in self._unacked.values())
            oldest = [b.oldest_t for b in itertools.islice(self._unacked.values(), 1)]
            if self._unsent:
                oldest.append(self._unsent[0].t)
            out.update(
                unacked=unacked,
                unacked_batches=len(self._unacked),
                unsent=len(self._unsent),
                pending=self._pending_rows,
                lag_s=(now - min(oldest)) if oldest else 0.0,
                weights_version=self._weights_version,
                connected=self._connected,
                next_seq=self._next_seq,
                first_seq=self.first_seq,
                thread_alive=self._thread.is_alive(),
                last_error=self._last_error,
            )
        return out

    def close(self, flush_timeout_s: float = 0.0) -> bool:
        """Optionally flush (bounded), then stop the thread and close the sockets.

        Returns whether everything submitted was acked (or dropped and counted).
        """
        flushed = self.flush(flush_timeout_s)
        self._stop.set()
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():  # stuck: do not wait for its sockets
            self._ctx.destroy(linger=0)
        else:
            self._ctx.term()
        return flushed

    def __enter__(self) -> ActorLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the link's thread -----------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        if self._sub is not None:
            poller.register(self._sub, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    events = dict(poller.poll(self._poll_ms))
                    if self._monitor in events:
                        self._drain_monitor()
                    if self._dealer in events:
                        self._drain_dealer()
                    if self._sub is not None and self._sub in events:
                        self._drain_weights()
                    now = time.monotonic()
                    self._form_batches(now)
                    self._send_due(now)
                    if now >= next_heartbeat:
                        self._send_heartbeat()
                        next_heartbeat = now + self.heartbeat_interval_s
                except Exception as exc:  # the link outlives any one bad event
                    with self._lock:
                        self._counts["errors"] += 1
                        self._last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("ActorLink %d: unexpected error", self.actor_id)
                    time.sleep(self._poll_ms / 1000)
        finally:
            self._dealer.disable_monitor()
            self._monitor.close(linger=0)
            self._dealer.close()
            if self._sub is not None:
                self._sub.close(linger=0)

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            with self._lock:
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._connected = True
                    if self._ever_connected:
                        self._counts["reconnects"] += 1
                        # libzmq tears the old pipe down asynchronously after the
                        # DISCONNECTED event, so a batch sent in that window can go into
                        # the dying pipe and vanish. Everything sent since the disconnect
                        # goes again on the new connection (the learner deduplicates on
                        # (actor_id, seq), so a batch that did get through costs one
                        # duplicate, never a loss).
                        for batch in self._unacked.values():
                            if batch.last_sent is not None and batch.last_sent >= self._down_since:
                                batch.last_sent = -math.inf
                    self._ever_connected = True
                elif event == zmq.EVENT_DISCONNECTED:
                    self._connected = False
                    self._down_since = time.monotonic()
                    # What was in flight on the lost connection may never arrive: resend it
                    # as soon as a new connection is up, not after resend_timeout_s.
                    for batch in self._unacked.values():
                        if batch.last_sent is not None:
                            batch.last_sent = -math.inf

    def _drain_dealer(self) -> None:
        while True:
            try:
                raw = self._dealer.recv_multipart(zmq.NOBLOCK)[-1]
            except zmq.Again:
                return
            try:
                msg = decode(raw, self.limits)
            except ProtocolError as exc:
                with self._lock:
                    self._counts["bad_replies"] += 1
                    self._last_error = f"bad reply from learner: {exc}"
                continue
            if msg["type"] == ACK and msg["actor_id"] == self.actor_id:
                self._settle(msg["seq"], msg["status"])
            elif msg["type"] == ERROR and "seq" in msg:
                with self._lock:
                    self._last_error = f"learner rejected seq {msg['seq']}: {msg['message']}"
                self._settle(msg["seq"], "rejected")
            else:
                with self._lock:
                    self._counts["bad_replies"] += 1
                    if msg["type"] == ERROR:
                        self._last_error = f"learner error [{msg['code']}]: {msg['message']}"

    def _settle(self, seq: int, status: str) -> None:
        with self._lock:
            batch = self._unacked.pop(seq, None)
            if batch is None:
                rows = self._dropped_seqs.pop(seq, None)
                if rows is not None and status != "rejected":
                    # Dropped for capacity, but it had reached the learner after all.
                    self._counts["dropped"] -= rows
                    self._counts["acked"] += rows
                    self._counts["acked_batches"] += 1
                else:
                    self._counts["duplicates"] += 1  # an ack for a resend already settled
                return
            self._pending_rows -= batch.rows
            if status == "rejected":
                self._counts["rejected"] += batch.rows
            else:
                self._counts["acked"] += batch.rows
                self._counts["acked_batches"] += 1

    def _drain_weights(self) -> None:
        assert self._sub is not None
        while True:
            try:
                raw = self._sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(raw, self.limits)
                if msg["type"] != WEIGHTS:
                    raise ProtocolError(E_UNSUPPORTED, f"expected weights, got {msg['type']}")
                version = msg["version"]
                with self._lock:
                    refused = version in self._refused_versions
                if refused or version <= self._weights_version:
                    if version < self._weights_version:
                        with self._lock:
                            self._counts["weights_stale"] += 1
                    continue  # the same version republished: nothing new
                tensors = verify_weights(msg)
            except ProtocolError as exc:
                with self._lock:
                    self._counts["weights_rejected"] += 1
                    self._last_error = f"weights rejected: {exc}"
                continue
            with self._lock:
                self._weights_version = version
                self._new_weights = (version, tensors)
                self._counts["weights_received"] += 1

    def _form_batches(self, now: float) -> None:
        while True:
            with self._lock:
                if len(self._unacked) >= self.max_inflight_batches or not self._unsent:
                    return
                if (
                    len(self._unsent) < self.batch_size
                    and not self._flush_requested
                    and now - self._unsent[0].t < self.max_batch_delay_s
                ):
                    return
                first = self._unsent[0]
                keys = first.data.keys()
                rows = min(self.batch_size, self._rows_that_fit(first))
                items: list[_Unsent] = []
                while self._unsent and len(items) < rows:
                    item = self._unsent[0]
                    if item.policy_version != first.policy_version or item.data.keys() != keys:
                        break
                    items.append(self._unsent.popleft())
                seq = self._next_seq
            batch, invalid = self._encode(seq, items)
            with self._lock:
                self._pending_rows -= invalid
                self._counts["invalid"] += invalid
                if batch is not None:
                    self._unacked[seq] = batch
                    self._next_seq = seq + 1
                self._enforce_capacity_locked()

    def _rows_that_fit(self, item: _Unsent) -> int:
        """Rows like ``item`` one batch can hold within the learner's limits (same ``Limits``
        at both ends): a batch of wide rows (camera images) cut to fit, rather than refused
        whole by the learner, every batch of the run. At least 1: a row too large on its own
        fails in ``_encode`` and is counted invalid."""
        arrays = [np.asarray(v) for v in item.data.values()]
        elements = max((a.size for a in arrays), default=1) or 1
        nbytes = sum(a.nbytes for a in arrays) + 64 * len(arrays) + 64  # msgpack headers
        by_bytes = (self.limits.max_message_bytes - 4096) // nbytes
        return max(1, min(self.limits.max_array_elements // elements, by_bytes))

    def _encode(self, seq: int, items: list[_Unsent]) -> tuple[_Batch | None, int]:
        """(batch, rows dropped as invalid): stacks rows, drops non-finite ones, encodes."""
        total = len(items)
        try:
            arrays = {
                name: np.stack([np.asarray(item.data[name]) for item in items])
                for name in items[0].data
            }
            keep = np.ones(total, dtype=bool)
            for array in arrays.values():
                if array.dtype.kind == "f":
                    keep &= np.isfinite(array.reshape(total, -1)).all(axis=1)
            if not keep.all():
                arrays = {name: array[keep] for name, array in arrays.items()}
                items = [item for item, k in zip(items, keep, strict=True) if k]
                with self._lock:
                    self._last_error = "transitions with NaN/inf were dropped (counted in invalid)"
            if not items:
                return None, total
            for name, array in arrays.items():
                if array.size > self.limits.max_array_elements:
                    raise ProtocolError(
                        E_TOO_LARGE,
                        f"{name}: one row of {array.size} elements > max_array_elements="
                        f"{self.limits.max_array_elements}",
                    )
            msg = make_transitions(
                self.actor_id,
                seq,
                [item.episode_id for item in items],
                items[0].policy_version,
                arrays,
                sent_at_ns=time.time_ns(),
            )
            payload = encode(msg)
            if len(payload) > self.limits.max_message_bytes:
                raise ProtocolError(
                    E_TOO_LARGE, f"batch of {len(payload)} bytes > max_message_bytes"
                )
        except (ProtocolError, ValueError, TypeError, KeyError, OverflowError) as exc:
            with self._lock:
                self._last_error = f"transitions could not be encoded: {exc}"
            return None, total
        return _Batch(seq, len(items), payload, oldest_t=items[0].t), total - len(items)

    def _send_due(self, now: float) -> None:
        with self._lock:
            window = list(itertools.islice(self._unacked.values(), self.max_inflight_batches))
        for batch in window:
            if batch.last_sent is not None and now - batch.last_sent < self.resend_timeout_s:
                continue
            try:
                self._dealer.send(batch.payload, zmq.NOBLOCK)
            except zmq.Again:
                return  # no learner connected, or its queue is full: try next tick
            with self._lock:
                if batch.sends == 0:
                    self._counts["sent"] += batch.rows
                    self._counts["sent_batches"] += 1
                else:
                    self._counts["resent"] += 1
                    self._counts["resent_rows"] += batch.rows
            batch.sends += 1
            batch.last_sent = now

    def _send_heartbeat(self) -> None:
        stats = self.stats()
        payload = {k: v for k, v in stats.items() if type(v) in (int, float, bool)}
        try:
            self._dealer.send(encode(make_heartbeat(self.actor_id, payload)), zmq.NOBLOCK)
        except zmq.Again:
            return
        with self._lock:
            self._counts["heartbeats"] += 1
