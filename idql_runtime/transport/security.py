"""Who may connect: loopback-only binds by default, CURVE keys and the client allow-list,
and the binding of each actor_id to one client key (reliability.md #12, #13)."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


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
    try:
        auth.configure_curve(domain="*", location=str(curve.authorized_keys_dir))
    except BaseException:
        auth.stop()
        raise
    return auth


def _abandon(ctx: zmq.Context, auth: ThreadAuthenticator | None) -> None:
    """Undo a server's half-finished construction.

    The ZAP thread is stopped first: destroying the context under it closes its sockets
    while it polls them, which kills the thread with ENOTSOCK and makes its ``__del__``
    raise again later, at some unrelated garbage collection.
    """
    if auth is not None:
        auth.stop()
    ctx.destroy(linger=0)
