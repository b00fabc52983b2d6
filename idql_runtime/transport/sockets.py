"""Socket options and helpers shared by every endpoint, and ``RequestChannel`` (the
socket under ``client.ActionClient``)."""

from __future__ import annotations

import math

import zmq

from idql_runtime.protocol import (
    DEFAULT_LIMITS,
    Limits,
    Message,
    encode,
)
from idql_runtime.transport.security import CurveConfig, _is_ipv6

DEFAULT_LINGER_MS = 200
"""How long a closing socket may keep trying to deliver queued messages."""
DEFAULT_HWM = 1000
"""Messages queued per peer before sends fail (DEALER/ROUTER) or drop (PUB)."""
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
ZMQ_HEARTBEAT_IVL_MS = 1000
ZMQ_HEARTBEAT_TIMEOUT_MS = 5000


# --------------------------------------------------------------------------- sockets


def _configure(sock: zmq.Socket, limits: Limits, *, linger_ms: int, hwm: int) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)


class BindError(OSError):
    """An endpoint could not be bound: in use (another learner or server still running
    there?), not an address of this machine, or malformed. The message names it."""


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    if _is_ipv6(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        errno = e.errno or 0
        hints: dict[int, str] = {
            int(zmq.EADDRINUSE): ": another process holds it (an earlier learner or server still "
            "running?); stop it or choose another port",
            int(zmq.EADDRNOTAVAIL): ": not an address of this machine",
        }
        hint = hints.get(errno, "")
        err = BindError(f"cannot bind {endpoint!r}: {zmq.strerror(errno)}{hint}")
        err.errno = errno
        raise err from e
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _connect(sock: zmq.Socket, endpoint: str) -> None:
    if _is_ipv6(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.connect(endpoint)


def _server_socket(
    ctx: zmq.Context,
    kind: int,
    endpoint: str,
    *,
    limits: Limits,
    curve: CurveConfig | None,
    linger_ms: int,
    hwm: int,
) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(kind)
    try:
        _configure(sock, limits, linger_ms=linger_ms, hwm=hwm)
        if curve is not None:
            curve.apply_server(sock)
        return sock, _bind(sock, endpoint)
    except Exception:
        sock.close(linger=0)
        raise


def _route(sock: zmq.Socket, envelope: list[bytes], msg: Message) -> bool:
    """Send a reply to a ROUTER peer without blocking; False if it was dropped."""
    try:
        sock.send_multipart([*envelope, encode(msg)], zmq.NOBLOCK)
        return True
    except zmq.ZMQError:  # EAGAIN at the HWM, or a peer gone
        return False


class RequestChannel:
    """A DEALER socket for request/reply clients that throw it away on timeout.

    ``client.ActionClient`` builds Lazy Pirate on this: ``send``, ``recv`` with a timeout,
    ``reset`` (close with linger 0 and reconnect) when no reply came.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        limits: Limits = DEFAULT_LIMITS,
        curve: CurveConfig | None = None,
        hwm: int = 100,
    ) -> None:
        self.endpoint, self._limits, self._curve, self._hwm = endpoint, limits, curve, hwm
        self._ctx: zmq.Context = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        _configure(sock, self._limits, linger_ms=0, hwm=self._hwm)
        if self._curve is not None:
            self._curve.apply_client(sock)
        _connect(sock, self.endpoint)
        self._sock = sock

    def send(self, data: bytes, timeout_s: float) -> bool:
        """Queue ``data``; False if the socket stayed full for ``timeout_s``."""
        assert self._sock is not None, "channel is closed"
        if not self._sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLOUT):
            return False
        try:
            self._sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def recv(self, timeout_s: float) -> bytes | None:
        """The next reply's payload, or None after ``timeout_s``."""
        assert self._sock is not None, "channel is closed"
        if not self._sock.poll(max(0, math.ceil(timeout_s * 1000)), zmq.POLLIN):
            return None
        try:
            return self._sock.recv_multipart(zmq.NOBLOCK)[-1]
        except zmq.Again:
            return None

    def reset(self) -> None:
        """Close the socket (dropping queued requests) and open a fresh connection."""
        self.close()
        self._open()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
