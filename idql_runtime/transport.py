"""ZeroMQ sockets: the only module in the package that imports zmq.

What lives here (docs/protocol.md describes the wire; ``protocol.py`` owns it):

- ``check_bind_address``: loopback and ipc binds by default; anything else needs CURVE
  server keys or an explicit ``insecure=True`` (reliability.md #12).
- ``CurveConfig``, ``generate_keypair``, ``load_secret_key``: CURVE encryption and an
  allow-list of client public keys through a ZAP authenticator (reliability.md #13).
- ``ActorLink``: the actor's side. A background thread owns its sockets; the control loop
  only calls ``submit`` (O(1), never blocks) and ``poll_weights``.
- ``LearnerLink``: the learner's side, single-threaded, driven by the learner loop's
  ``poll``: validated transition batches in, acks and weights out, actor liveness.
- ``ActionServer``: answers action requests, batching those that arrive within a small
  window into one ``decide_batch`` call; health requests never touch the engine.
- ``RequestChannel``: the socket under ``client.ActionClient`` (Lazy Pirate).

Every socket gets ZMQ_MAXMSGSIZE = ``Limits.max_message_bytes`` (an oversized message
drops that peer's connection before anything is allocated: reliability.md #6), a bounded
LINGER, and bounded high-water marks. No socket ever blocks a caller: sends use NOBLOCK.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import os
import re
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from idql_runtime import __version__
from idql_runtime.protocol import (
    ACK,
    ACTION_REQUEST,
    DEFAULT_LIMITS,
    E_FORBIDDEN,
    E_INTERNAL,
    E_SCHEMA,
    E_STALE,
    E_TOO_LARGE,
    E_UNSUPPORTED,
    ERROR,
    ERROR_CODES,
    HEALTH,
    HEARTBEAT,
    TRANSITIONS,
    WEIGHTS,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
    error_from,
    make_ack,
    make_action_reply,
    make_error,
    make_health_reply,
    make_heartbeat,
    make_transitions,
    make_weights,
    verify_weights,
)

log = logging.getLogger(__name__)

DEFAULT_LINGER_MS = 200
"""How long a closing socket may keep trying to deliver queued messages."""
DEFAULT_HWM = 1000
"""Messages queued per peer before sends fail (DEALER/ROUTER) or drop (PUB)."""
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
ZMQ_HEARTBEAT_IVL_MS = 1000
ZMQ_HEARTBEAT_TIMEOUT_MS = 5000


class InsecureBindError(ValueError):
    """A non-loopback bind without CURVE server keys or ``insecure=True``."""


class InsecureKeyFileError(PermissionError):
    """A CURVE secret key file that group or others may read or write."""


# --------------------------------------------------------------------------- addresses


def _tcp_host(endpoint: str) -> str:
    rest = endpoint.partition("://")[2]
    host = rest.rpartition(":")[0] if ":" in rest else rest
    host = host.rpartition(";")[2]  # "src;dst" form: the bound address is the last
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _is_loopback_host(host: str) -> bool:
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", interface names, DNS names: not provably loopback


def _is_ipv6(endpoint: str) -> bool:
    return endpoint.startswith("tcp://") and ":" in _tcp_host(endpoint)


def check_bind_address(
    endpoint: str, *, insecure: bool = False, curve: CurveConfig | None = None
) -> None:
    """Refuse to expose a socket beyond this machine without encryption (reliability #12).

    Allowed: ``ipc://``, ``inproc://`` and ``tcp://`` on 127.0.0.0/8, ``::1`` or
    ``localhost``. Any other tcp bind (``*``, ``0.0.0.0``, a LAN address, an interface
    name) needs a ``curve`` with server keys and a client allow-list, or ``insecure=True``.
    Raises ``InsecureBindError`` (a ValueError) otherwise, ValueError for other transports.
    """
    scheme, sep, _ = endpoint.partition("://")
    if not sep:
        raise ValueError(f"endpoint {endpoint!r} has no transport; use tcp://, ipc:// or inproc://")
    if scheme in ("ipc", "inproc"):
        return
    if scheme != "tcp":
        raise ValueError(f"endpoint {endpoint!r}: transport {scheme!r} unsupported; use tcp or ipc")
    host = _tcp_host(endpoint)
    if _is_loopback_host(host):
        return
    if curve is not None and curve.is_server:
        return
    if insecure:
        log.warning("binding %s without encryption or authentication (insecure=True)", endpoint)
        return
    raise InsecureBindError(
        f"refusing to bind {endpoint!r}: {host!r} is not loopback. Anyone who can reach it "
        "could send transitions or read weights. Configure CURVE (CurveConfig with "
        "secret_key_file and authorized_keys_dir; see generate_keypair) or pass "
        "insecure=True (--insecure) to accept the exposure."
    )


# --------------------------------------------------------------------------- CURVE


@dataclass(frozen=True)
class CurveConfig:
    """CURVE keys for one side of a connection (files in zmq.auth's certificate format).

    A server sets ``secret_key_file`` and ``authorized_keys_dir`` (a directory of the
    client public key files, ``*.key``, that may connect; everyone else is refused). A
    client sets ``secret_key_file`` (its own keypair, whose public half is in the server's
    allow-list) and ``server_public_key_file``.
    """

    secret_key_file: Path
    """This side's secret key file (``*.key_secret``); must be mode 0600 or stricter."""
    server_public_key_file: Path | None = None
    """Clients: the server's public key file (``*.key``)."""
    authorized_keys_dir: Path | None = None
    """Servers: directory of client public key files allowed to connect."""

    @property
    def is_server(self) -> bool:
        return self.authorized_keys_dir is not None

    def apply_server(self, sock: zmq.Socket) -> None:
        if self.authorized_keys_dir is None:
            raise ValueError("a CURVE server needs authorized_keys_dir (client allow-list)")
        public, secret = load_secret_key(self.secret_key_file)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_server = True

    def apply_client(self, sock: zmq.Socket) -> None:
        if self.server_public_key_file is None:
            raise ValueError("a CURVE client needs server_public_key_file")
        public, secret = load_secret_key(self.secret_key_file)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = load_public_key(self.server_public_key_file)


def curve_from_dir(directory: str | os.PathLike, role: str) -> CurveConfig:
    """The CLI convention for ``--curve-dir DIR``.

    server: ``DIR/server.key_secret`` and ``DIR/authorized/`` (client ``*.key`` files);
    client: ``DIR/client.key_secret`` and ``DIR/server.key``. Missing files are named.
    """
    d = Path(directory)
    if role == "server":
        cfg = CurveConfig(d / "server.key_secret", authorized_keys_dir=d / "authorized")
        needed = [cfg.secret_key_file, d / "authorized"]
    elif role == "client":
        cfg = CurveConfig(d / "client.key_secret", server_public_key_file=d / "server.key")
        needed = [cfg.secret_key_file, d / "server.key"]
    else:
        raise ValueError(f"role must be 'server' or 'client', got {role!r}")
    for path in needed:
        if not path.exists():
            raise FileNotFoundError(f"--curve-dir {d}: {path.name} is missing ({role} role)")
    return cfg


def generate_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` (mode 0600) under ``directory``.

    Same file format as ``zmq.auth.create_certificates``, but the secret file is created
    with mode 0600 from the start (never briefly world-readable). Returns both paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    banner = "#   ZeroMQ CURVE {} certificate (idql-runtime)\n"
    public_text = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    public_file.write_text(banner.format("Public") + public_text)
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(banner.format("**Secret**") + public_text)
        f.write(f'    secret-key = "{secret.decode()}"\n')
    os.chmod(secret_file, 0o600)  # O_CREAT's mode is ignored for an existing file
    return public_file, secret_file


def load_secret_key(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret key file that only its owner can access."""
    path = Path(path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise InsecureKeyFileError(
            f"secret key file {path} has mode {mode:#o}: group/others may access it; "
            f"run `chmod 600 {path}` (and consider the key compromised if it was shared)"
        )
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key (is it the public .key file?)")
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key from a ``*.key`` (or ``*.key_secret``) file."""
    public, _ = zmq.auth.load_certificate(Path(path))
    return public


ACTOR_KEY_FILE = re.compile(r"actor-(\d+)\.key")
"""``authorized/actor-<id>.key``: this public key, and only it, may speak for actor <id>."""


def _initial_actor_keys(curve: CurveConfig, persisted: Mapping[Any, str] | None) -> dict[int, str]:
    """actor_id -> Z85 public key: persisted bindings, overridden by actor-<id>.key files."""
    keys = {int(k): str(v) for k, v in (persisted or {}).items()}
    if curve.authorized_keys_dir is not None and Path(curve.authorized_keys_dir).is_dir():
        for path in sorted(Path(curve.authorized_keys_dir).glob("actor-*.key")):
            match = ACTOR_KEY_FILE.fullmatch(path.name)
            if match is None:
                continue
            actor_id, key = int(match.group(1)), load_public_key(path).decode("ascii")
            if keys.get(actor_id, key) != key:
                log.warning(
                    "actor %d: %s overrides the key bound to it by an earlier run", actor_id, path
                )
            keys[actor_id] = key
    return keys


def _start_authenticator(ctx: zmq.Context, curve: CurveConfig | None) -> ThreadAuthenticator | None:
    if curve is None:
        return None
    if curve.authorized_keys_dir is None:
        raise ValueError("a CURVE server needs authorized_keys_dir (client allow-list)")
    if not Path(curve.authorized_keys_dir).is_dir():
        raise FileNotFoundError(
            f"authorized_keys_dir {curve.authorized_keys_dir} is not a directory"
        )
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("idql_runtime.transport.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=str(curve.authorized_keys_dir))
    return auth


# --------------------------------------------------------------------------- sockets


def _configure(sock: zmq.Socket, limits: Limits, *, linger_ms: int, hwm: int) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    if _is_ipv6(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    sock.bind(endpoint)
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
        it, so a refused update with a huge version cannot block every later good one."""
        with self._lock:
            if self._weights_version == version:
                self._weights_version = current_version
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
                if version <= self._weights_version:
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
                items: list[_Unsent] = []
                while self._unsent and len(items) < self.batch_size:
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
            self._ctx.destroy(linger=0)
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
        if obs_dim < 1 or max_batch < 1 or batch_window_s < 0:
            raise ValueError(
                f"need obs_dim >= 1, max_batch >= 1, batch_window_s >= 0; got "
                f"{obs_dim}, {max_batch}, {batch_window_s}"
            )
        self.decide_batch, self.obs_dim, self.max_batch = decide_batch, obs_dim, max_batch
        self.batch_window_s, self.limits = batch_window_s, limits
        self.max_request_age_s, self.mode, self.name = max_request_age_s, mode, name
        self.obs_dtype = np.dtype(obs_dtype)
        self._ctx = zmq.Context()
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
            self._ctx.destroy(linger=0)
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
            now_ns = time.time_ns()
            if "deadline_ns" in msg and now_ns > msg["deadline_ns"]:
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
            if not np.isfinite(actions).all():
                raise ValueError("decide_batch returned NaN/inf actions")
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
            offset += len(r.obs)
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
