"""ZeroMQ sockets: the only package in idql_runtime that imports zmq.

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

from idql_runtime.transport.action_server import ActionServer
from idql_runtime.transport.actor_link import ActorLink
from idql_runtime.transport.learner_link import ActorState, IngestBatch, LearnerLink
from idql_runtime.transport.security import (
    ACTOR_KEY_FILE,
    CurveConfig,
    InsecureBindError,
    InsecureKeyFileError,
    check_bind_address,
    curve_from_dir,
    generate_keypair,
    load_public_key,
    load_secret_key,
)
from idql_runtime.transport.sockets import (
    DEFAULT_HWM,
    DEFAULT_LINGER_MS,
    BindError,
    RequestChannel,
)

__all__ = [
    "ACTOR_KEY_FILE",
    "DEFAULT_HWM",
    "DEFAULT_LINGER_MS",
    "ActionServer",
    "ActorLink",
    "ActorState",
    "BindError",
    "CurveConfig",
    "IngestBatch",
    "InsecureBindError",
    "InsecureKeyFileError",
    "LearnerLink",
    "RequestChannel",
    "check_bind_address",
    "curve_from_dir",
    "generate_keypair",
    "load_public_key",
    "load_secret_key",
]
