"""``ActionServer``: action requests in, batched engine calls, replies out."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from idql_runtime import __version__
from idql_runtime.protocol import (
    ACTION_REQUEST,
    DEFAULT_LIMITS,
    E_INTERNAL,
    E_NON_FINITE,
    E_SCHEMA,
    E_STALE,
    E_TOO_LARGE,
    E_UNSUPPORTED,
    ERROR_CODES,
    HEALTH,
    Limits,
    ProtocolError,
    decode,
    error_from,
    make_action_reply,
    make_health_reply,
)
from idql_runtime.transport.security import (
    CurveConfig,
    _abandon,
    _start_authenticator,
    check_bind_address,
)
from idql_runtime.transport.sockets import (
    DEFAULT_HWM,
    DEFAULT_LINGER_MS,
    _route,
    _server_socket,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- action server


@dataclass
class _Request:
    envelope: list[bytes]
    request_id: int | str
    obs: np.ndarray  # (rows, obs_dim)
    single: bool  # the request sent obs of shape (obs_dim,)
    t_recv_ns: int  # time.perf_counter_ns() at receipt


_SERVER_COUNTERS = (
    "received",
    "action_requests",
    "action_replies",
    "health",
    "rejected",
    *(f"rejected_{code}" for code in ERROR_CODES),
    "engine_calls",
    "engine_rows",
    "engine_errors",
    "max_batch_rows",
    "replies_dropped",
)

ACTIVE_CLIENT_S = 1.0
"""A client that sent an action request this recently is expected in the next batch."""

DecideBatch = Callable[[np.ndarray], tuple[np.ndarray, int]]
"""``decide_batch(obs (B, obs_dim)) -> (actions (B, act_dim), policy_version)``."""


class ActionServer:
    """Serves action requests from any ZeroMQ client over a ROUTER socket.

    Requests that arrive within ``batch_window_s`` of the first one (up to ``max_batch``
    observation rows) go to ONE ``decide_batch`` call; the server stops waiting early once
    every client active in the last ``ACTIVE_CLIENT_S`` has a request in the batch; each reply carries that request's
    action rows, the policy version, the server-side latency in microseconds (receipt to
    reply) and the engine batch size. Health requests are answered from counters without
    the engine. Malformed or refused requests get an ``error`` reply; nothing a client
    sends can stop the server (engine exceptions become ``internal`` errors).
    A request whose ``sent_at_ns`` is older than ``max_request_age_s`` (if set), or whose
    ``deadline_ns`` has passed, is refused with ``stale``.
    """

    def __init__(
        self,
        bind: str,
        decide_batch: DecideBatch,
        *,
        obs_dim: int,
        max_batch: int = 64,
        batch_window_s: float = 0.001,
        limits: Limits = DEFAULT_LIMITS,
        curve: CurveConfig | None = None,
        insecure: bool = False,
        max_request_age_s: float | None = None,
        mode: str | None = None,
        obs_dtype: np.dtype | type = np.float32,
        name: str = f"idql-serve/{__version__}",
        linger_ms: int = DEFAULT_LINGER_MS,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        check_bind_address(bind, insecure=insecure, curve=curve)
        if obs_dim < 1 or max_batch < 1:
            raise ValueError(f"need obs_dim >= 1 and max_batch >= 1; got {obs_dim}, {max_batch}")
        # written "ok unless" so that NaN (false in every comparison) is refused too
        if not (math.isfinite(batch_window_s) and batch_window_s >= 0):
            raise ValueError(f"batch_window_s must be a finite number >= 0, got {batch_window_s}")
        if max_request_age_s is not None and not (
            math.isfinite(max_request_age_s) and max_request_age_s > 0
        ):  # 0 or less would refuse every request as stale; NaN would refuse none
            raise ValueError(
                f"max_request_age_s must be a finite number > 0 (or None), got {max_request_age_s}"
            )
        self.decide_batch, self.obs_dim, self.max_batch = decide_batch, obs_dim, max_batch
        self.batch_window_s, self.limits = batch_window_s, limits
        self.max_request_age_s, self.mode, self.name = max_request_age_s, mode, name
        self.obs_dtype = np.dtype(obs_dtype)
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        try:
            self._auth = _start_authenticator(self._ctx, curve)
            self._sock, self.endpoint = _server_socket(
                self._ctx,
                zmq.ROUTER,
                bind,
                limits=limits,
                curve=curve,
                linger_ms=linger_ms,
                hwm=hwm,
            )
        except Exception:
            _abandon(self._ctx, self._auth)
            raise
        self._started = time.monotonic()
        self._counts = dict.fromkeys(_SERVER_COUNTERS, 0)
        self._policy_version: int | None = None
        self._clients: dict[bytes, float] = {}  # routing id -> last action request (monotonic)
        self._closed = False

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    def serve_forever(self, stop_event: threading.Event, poll_interval_s: float = 0.05) -> None:
        """Serve until ``stop_event`` is set (checked every ``poll_interval_s``)."""
        while not stop_event.is_set():
            self.serve_once(poll_interval_s)

    def serve(self, duration_s: float) -> None:
        """Serve for ``duration_s`` seconds."""
        end = time.monotonic() + duration_s
        while (left := end - time.monotonic()) > 0:
            self.serve_once(min(left, 0.05))

    def serve_once(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for a message, then serve one batch window; returns
        the number of messages handled."""
        if not self._sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return 0
        pending: list[_Request] = []
        rows, handled = 0, 0
        window_end = math.inf
        while True:
            while True:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                handled += 1
                request = self._admit(frames)
                if request is None:
                    continue
                if not pending:
                    window_end = time.perf_counter() + self.batch_window_s
                if pending and rows + len(request.obs) > self.max_batch:
                    self._run_batch(pending)
                    pending, rows = [], 0
                    window_end = time.perf_counter() + self.batch_window_s
                pending.append(request)
                rows += len(request.obs)
                if rows >= self.max_batch:
                    self._run_batch(pending)
                    pending, rows, window_end = [], 0, math.inf
            if not pending or self._everyone_waiting(pending):
                break
            remaining = window_end - time.perf_counter()
            if remaining <= 0 or not self._sock.poll(math.ceil(remaining * 1000), zmq.POLLIN):
                break
        if pending:
            self._run_batch(pending)
        return handled

    def _everyone_waiting(self, pending: list[_Request]) -> bool:
        """True when every recently active client has a request in this batch.

        Then waiting out the batch window cannot grow the batch: a lone client (a robot's
        control loop) never pays the window, while concurrent clients still share calls.
        """
        cutoff = time.monotonic() - ACTIVE_CLIENT_S
        for identity in [i for i, t in self._clients.items() if t < cutoff]:
            del self._clients[identity]
        return len({r.envelope[0] for r in pending}) >= len(self._clients)

    def _reject(self, envelope: list[bytes], exc: ProtocolError) -> None:
        self._counts["rejected"] += 1
        self._counts[f"rejected_{exc.code}"] += 1
        if not _route(self._sock, envelope, error_from(exc)):
            self._counts["replies_dropped"] += 1

    def _admit(self, frames: list[bytes]) -> _Request | None:
        """Decode and check one message; replies at once unless it is a valid action request."""
        t_recv_ns = time.perf_counter_ns()
        self._counts["received"] += 1
        envelope, payload = frames[:-1], frames[-1]
        try:
            msg = decode(payload, self.limits)
        except ProtocolError as exc:
            self._reject(envelope, exc)
            return None
        if msg["type"] == HEALTH:
            self._counts["health"] += 1
            reply = make_health_reply(
                server=self.name,
                uptime_s=time.monotonic() - self._started,
                counters=self._counts,
                policy_version=self._policy_version,
                request_id=msg.get("request_id"),
            )
            if not _route(self._sock, envelope, reply):
                self._counts["replies_dropped"] += 1
            return None
        request_id = msg.get("request_id")
        if msg["type"] != ACTION_REQUEST:
            self._reject(
                envelope,
                ProtocolError(
                    E_UNSUPPORTED,
                    f"the action server does not serve {msg['type']!r} messages",
                    request_id=request_id,
                ),
            )
            return None
        self._counts["action_requests"] += 1
        obs = msg["obs"]
        problem: ProtocolError | None = None
        if obs.shape[-1] != self.obs_dim:
            problem = ProtocolError(
                E_SCHEMA,
                f"action_request.obs: shape {obs.shape}, expected last dim obs_dim={self.obs_dim}",
            )
        elif obs.ndim == 2 and len(obs) > self.max_batch:
            problem = ProtocolError(
                E_TOO_LARGE, f"action_request.obs: {len(obs)} rows > max_batch={self.max_batch}"
            )
        elif msg.get("mode") is not None and msg["mode"] != self.mode:
            problem = ProtocolError(
                E_UNSUPPORTED,
                f"action_request.mode: {msg['mode']!r}; this server runs {self.mode!r}",
            )
        else:
            # a finite float64 can overflow the engine's dtype; refused here, it would
            # turn its row non-finite and fail every request batched with it
            with np.errstate(over="ignore"):
                obs = obs.astype(self.obs_dtype, copy=False)
            now_ns = time.time_ns()
            if not np.isfinite(obs).all():
                problem = ProtocolError(
                    E_NON_FINITE,
                    f"action_request.obs: not finite in {self.obs_dtype.name} "
                    f"(|obs| max {float(np.abs(msg['obs']).max()):.3g})",
                )
            elif "deadline_ns" in msg and now_ns > msg["deadline_ns"]:
                late_ms = (now_ns - msg["deadline_ns"]) / 1e6
                problem = ProtocolError(E_STALE, f"deadline passed {late_ms:.3f} ms ago")
            elif (
                self.max_request_age_s is not None
                and "sent_at_ns" in msg
                and now_ns - msg["sent_at_ns"] > self.max_request_age_s * 1e9
            ):
                age_ms = (now_ns - msg["sent_at_ns"]) / 1e6
                problem = ProtocolError(
                    E_STALE,
                    f"request sent {age_ms:.3f} ms ago > max_request_age_s={self.max_request_age_s}",
                )
        if problem is not None:
            problem.request_id = request_id
            self._reject(envelope, problem)
            return None
        single = obs.ndim == 1
        self._clients[envelope[0]] = time.monotonic()
        return _Request(
            envelope, msg["request_id"], obs.reshape(1, -1) if single else obs, single, t_recv_ns
        )

    def _run_batch(self, pending: list[_Request]) -> None:
        obs = np.concatenate([r.obs for r in pending], axis=0).astype(self.obs_dtype, copy=False)
        rows = len(obs)
        try:
            actions, version = self.decide_batch(obs)
            actions = np.asarray(actions)
            if actions.ndim != 2 or len(actions) != rows:
                raise ValueError(f"decide_batch returned shape {actions.shape} for {rows} rows")
            if actions.dtype.kind != "f":
                actions = actions.astype(np.float32)
            finite = np.asarray(np.isfinite(actions.reshape(rows, -1)).all(axis=1))
            version = int(version)
        except Exception as exc:  # an engine failure must not take the server down
            self._counts["engine_errors"] += 1
            log.exception("decide_batch failed for %d rows", rows)
            for r in pending:
                self._reject(
                    r.envelope,
                    ProtocolError(E_INTERNAL, f"engine failed: {type(exc).__name__}: {exc}",
                                  request_id=r.request_id),
                )  # fmt: skip
            return
        self._policy_version = version
        self._counts["engine_calls"] += 1
        self._counts["engine_rows"] += rows
        self._counts["max_batch_rows"] = max(self._counts["max_batch_rows"], rows)
        offset = 0
        for r in pending:
            action = actions[offset : offset + len(r.obs)]
            ok = finite[offset : offset + len(r.obs)].all()
            offset += len(r.obs)
            if not ok:  # only the requests whose own rows came out NaN/inf fail
                self._counts["engine_errors"] += 1
                log.error("decide_batch returned NaN/inf actions for request %r", r.request_id)
                self._reject(
                    r.envelope,
                    ProtocolError(E_INTERNAL, "engine returned NaN/inf actions for this request",
                                  request_id=r.request_id),
                )  # fmt: skip
                continue
            latency_us = (time.perf_counter_ns() - r.t_recv_ns) // 1000
            reply = make_action_reply(
                r.request_id, action[0] if r.single else action, version, latency_us, rows
            )
            if _route(self._sock, r.envelope, reply):
                self._counts["action_replies"] += 1
            else:
                self._counts["replies_dropped"] += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def __enter__(self) -> ActionServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
