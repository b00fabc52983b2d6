"""ActionClient: ask an action server for actions, with a timeout and retries (Lazy Pirate).

The ZeroMQ guide's Lazy Pirate pattern: send, wait up to ``timeout_s`` for the reply; if
none came, close the socket (linger 0, dropping whatever it queued), open a fresh one,
and send again; after ``retries`` retries raise ``TimeoutError`` naming the endpoint. A
server restart is therefore invisible to the caller beyond one timeout. Replies are
matched on ``request_id``, so a late reply to an earlier attempt is never mistaken for
the answer to a later request.

Action requests are idempotent (the server decides from the observation alone), so a
resend is safe even when the first request was served and only its reply was lost.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from idql_runtime.protocol import (
    ACTION_REPLY,
    DEFAULT_LIMITS,
    ERROR,
    HEALTH_REPLY,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
    make_action_request,
    make_health,
)
from idql_runtime.transport import CurveConfig, RequestChannel


def _is_number(x: object) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _is_integer(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


class ActionServerError(RuntimeError):
    """The server answered with an ``error`` message (``code`` is one of ERROR_CODES)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code, self.message = code, message


class ActionClient:
    """A client of ``transport.ActionServer`` (or anything that speaks docs/protocol.md).

    ``timeout_s`` is per attempt; a call makes at most ``1 + retries`` attempts. For CURVE,
    pass ``curve`` (a CurveConfig with this client's secret key file and the server's
    public key file), or ``server_public_key_file`` with ``client_secret_key_file``.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 1.0,
        retries: int = 3,
        curve: CurveConfig | None = None,
        server_public_key_file: str | os.PathLike | None = None,
        client_secret_key_file: str | os.PathLike | None = None,
        limits: Limits = DEFAULT_LIMITS,
        mode: str | None = None,
    ) -> None:
        # not (x > 0): NaN fails it too (it made every attempt time out at once)
        if not (_is_number(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a number > 0 (seconds), got {timeout_s!r}")
        if not _is_integer(retries) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if curve is None and (server_public_key_file or client_secret_key_file):
            if not (server_public_key_file and client_secret_key_file):
                raise ValueError(
                    "CURVE needs both server_public_key_file and client_secret_key_file"
                )
            curve = CurveConfig(
                secret_key_file=Path(client_secret_key_file),
                server_public_key_file=Path(server_public_key_file),
            )
        self.endpoint, self.timeout_s, self.retries = endpoint, timeout_s, retries
        self.limits, self.mode = limits, mode
        self._channel = RequestChannel(endpoint, limits=limits, curve=curve)
        # Random start: ids stay unique across clients sharing a server log.
        self._next_id = int.from_bytes(os.urandom(4), "little") << 20
        self.reconnects = 0
        self.discarded_replies = 0
        self.last_round_trip_s = 0.0

    def act(
        self, obs: np.ndarray, *, deadline_s: float | None = None, mode: str | None = None
    ) -> tuple[np.ndarray, int, int]:
        """Actions for ``obs`` (``(obs_dim,)`` -> ``(act_dim,)``, ``(B, obs_dim)`` -> ``(B, act_dim)``).

        Returns ``(action, policy_version, server_latency_us)``. ``deadline_s`` (seconds from
        now) lets the server refuse the request with ``stale`` if it cannot start in time.
        Raises TimeoutError after all attempts, ActionServerError on an error reply.
        """
        if deadline_s is not None and not (_is_number(deadline_s) and math.isfinite(deadline_s)):
            raise ValueError(f"deadline_s must be a finite number of seconds, got {deadline_s!r}")
        request_id = self._new_id()
        now_ns = time.time_ns()
        deadline_ns = None if deadline_s is None else now_ns + int(deadline_s * 1e9)
        msg = make_action_request(
            request_id,
            np.asarray(obs),
            sent_at_ns=now_ns,
            deadline_ns=deadline_ns,
            mode=mode or self.mode,
        )
        reply = self.request(msg, expect=ACTION_REPLY)
        return reply["action"], reply["policy_version"], reply["server_latency_us"]

    def health(self) -> Message:
        """The server's health reply: status, server, uptime_s, counters, policy_version."""
        return self.request(make_health(self._new_id()), expect=HEALTH_REPLY)

    def request(self, msg: Message, *, expect: str) -> Message:
        """Send ``msg`` (which has a request_id) and return the reply of type ``expect``."""
        request_id = msg["request_id"]
        payload = encode(msg)
        started = time.monotonic()
        for attempt in range(self.retries + 1):
            if attempt:
                self._channel.reset()
                self.reconnects += 1
            reply = self._attempt(payload, request_id)
            if reply is None:
                continue
            self.last_round_trip_s = time.monotonic() - started
            if reply["type"] == ERROR:
                raise ActionServerError(reply["code"], reply["message"])
            if reply["type"] != expect:
                raise ActionServerError(
                    "unsupported", f"expected a {expect} reply, got {reply['type']}"
                )
            return reply
        raise TimeoutError(
            f"no reply from {self.endpoint} after {self.retries + 1} attempts of "
            f"{self.timeout_s} s each"
        )

    def _attempt(self, payload: bytes, request_id: Any) -> Message | None:
        deadline = time.monotonic() + self.timeout_s
        if not self._channel.send(payload, self.timeout_s):
            return None
        while (remaining := deadline - time.monotonic()) > 0:
            raw = self._channel.recv(remaining)
            if raw is None:
                return None
            try:
                reply = decode(raw, self.limits)
            except ProtocolError:
                self.discarded_replies += 1
                continue
            rid = reply.get("request_id")
            # An error the server could not address (request_id None) can only be ours:
            # this socket has one request outstanding.
            if rid == request_id or (reply["type"] == ERROR and rid is None):
                return reply
            self.discarded_replies += 1  # a late reply to an earlier attempt
        return None

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ActionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
