"""The wire protocol: msgpack messages with a version, a type, and raw-byte arrays.

This is the one module that knows the wire format (docs/protocol.md is its description for
people writing clients in other languages). It imports no zmq: framing and sockets live in
``transport/``.

Every message is a msgpack map ``{"v": PROTOCOL_VERSION, "type": str, ...}``. Arrays travel
as ``{"dtype": str, "shape": [int, ...], "data": bin}`` with the dtype from an allow-list of
little-endian numeric types; nothing is ever unpickled and object dtypes cannot be expressed.

``decode`` is written for hostile input: the byte size, msgpack container lengths, nesting
depth, array rank and element counts are all checked before anything proportional to the
claimed size is allocated, and every failure is a ``ProtocolError(code, message)`` whose
message names the field and the bad value. Decoded arrays are read-only views of the
received bytes (zero copy); copy them before writing.

Non-finite floats (NaN, +-inf) are rejected in every array that feeds learning or
actuation: transition arrays, weight tensors, action-request observations and action-reply
actions, and in every float scalar field.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# Message types (the "type" field).
TRANSITIONS = "transitions"
ACK = "ack"
WEIGHTS = "weights"
ACTION_REQUEST = "action_request"
ACTION_REPLY = "action_reply"
HEALTH = "health"
HEALTH_REPLY = "health_reply"
HEARTBEAT = "heartbeat"
ERROR = "error"
MESSAGE_TYPES = (
    TRANSITIONS,
    ACK,
    WEIGHTS,
    ACTION_REQUEST,
    ACTION_REPLY,
    HEALTH,
    HEALTH_REPLY,
    HEARTBEAT,
    ERROR,
)

# Error codes carried by ProtocolError and by "error" messages.
E_MALFORMED = "malformed"  # not msgpack, trailing bytes, not a map, bad key types
E_TOO_LARGE = "too_large"  # a size, length, depth, rank or element limit exceeded
E_VERSION = "version"  # "v" is not PROTOCOL_VERSION
E_UNKNOWN_TYPE = "unknown_type"
E_SCHEMA = "schema"  # missing field, wrong type, out of range
E_BAD_ARRAY = "bad_array"  # dtype not allowed, shape/data length mismatch, bad bool bytes
E_NON_FINITE = "non_finite"  # NaN or inf where only finite values are allowed
E_HASH_MISMATCH = "hash_mismatch"  # weights sha256 does not match the tensors
E_STALE = "stale"  # request older than the server's max age, or past its deadline
E_UNSUPPORTED = "unsupported"  # valid message, but not one this endpoint serves
E_INTERNAL = "internal"  # the server failed (engine error, non-finite engine output)
E_FORBIDDEN = "forbidden"  # the peer's CURVE key may not speak for this actor_id
ERROR_CODES = (
    E_MALFORMED,
    E_TOO_LARGE,
    E_VERSION,
    E_UNKNOWN_TYPE,
    E_SCHEMA,
    E_BAD_ARRAY,
    E_NON_FINITE,
    E_HASH_MISMATCH,
    E_STALE,
    E_UNSUPPORTED,
    E_INTERNAL,
    E_FORBIDDEN,
)

ACK_STATUSES = ("committed", "duplicate", "rejected")

# Wire dtype name -> little-endian numpy dtype. Nothing else is accepted or produced.
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
FLOAT_DTYPES = ("float16", "float32", "float64")
INT_DTYPES = ("int32", "int64")

_INT63 = 2**63  # ids, sequence numbers, versions and times are in [0, 2**63)
_INT31 = 2**31  # actor ids are in [0, 2**31)
_MAX_REQUEST_ID_CHARS = 128
_MAX_NAME_CHARS = 256
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_REPR_CHARS = 80

Message = dict[str, Any]
"""A decoded message: the known fields of its type, arrays as read-only ``np.ndarray``."""


class ProtocolError(ValueError):
    """A message that breaks the protocol.

    ``code`` is one of ``ERROR_CODES``; the message names the bad field and value. When the
    message got far enough to show them, ``request_id``, ``actor_id`` and ``seq`` are set so
    that a server can address its error reply.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: int | str | None = None,
        actor_id: int | None = None,
        seq: int | None = None,
    ) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.actor_id = actor_id
        self.seq = seq


@dataclass(frozen=True)
class Limits:
    """Size limits checked by ``decode`` before allocation (and by every socket).

    Defaults fit a 64 MiB weights message of a few hundred tensors and transition batches
    of up to 4096 rows; every field is a count or a byte size, never a fraction.
    """

    max_message_bytes: int = 64 * 2**20
    """Largest encoded message in bytes; also each socket's ZMQ_MAXMSGSIZE."""
    max_array_elements: int = 16 * 2**20
    """Largest element count of one array (product of its shape)."""
    max_array_rank: int = 8
    """Most dimensions of one array."""
    max_arrays_per_message: int = 1024
    """Most arrays in a transitions message or tensors in a weights message."""
    max_batch_transitions: int = 4096
    """Most rows in one transitions message; also the longest msgpack list accepted."""
    max_depth: int = 8
    """Deepest nesting of msgpack maps/lists (the top-level map is depth 1)."""
    max_str_len: int = 4096
    """Longest msgpack string in bytes (UTF-8)."""
    max_map_len: int = 1024
    """Most entries in one msgpack map."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {value!r}")

    @property
    def max_list_len(self) -> int:
        """Longest msgpack list accepted: a batch's episode ids, an array's shape."""
        return max(self.max_batch_transitions, self.max_array_rank, 64)


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------- encoding


def _short(value: Any) -> str:
    """A repr of at most _REPR_CHARS characters, built from a bounded prefix of the value.

    A hostile message can put a 60 MiB bin where a short string belongs; repr of the whole
    value would build ~240 MiB of text in the single-threaded learner loop before cutting it.
    """
    if isinstance(value, (bytes, bytearray, str, list, tuple)) and len(value) > _REPR_CHARS:
        head = repr(value[:_REPR_CHARS])
        text = f"{head[: _REPR_CHARS - 3]}... ({type(value).__name__} of length {len(value)})"
        return text
    if isinstance(value, dict) and len(value) > _REPR_CHARS:
        return f"dict of {len(value)} keys"
    text = repr(value)
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."


def dtype_name(dtype: np.dtype) -> str:
    """Wire name of a numpy dtype; raises ProtocolError(bad_array) if it is not allowed."""
    dtype = np.dtype(dtype)
    name = "bool" if dtype.kind == "b" else dtype.name
    if name not in DTYPES or dtype.kind not in "fiub":
        allowed = ", ".join(DTYPES)
        raise ProtocolError(
            E_BAD_ARRAY, f"dtype {dtype.str!r} is not in the allow-list ({allowed})"
        )
    return name


def array_to_wire(array: Any) -> dict[str, Any]:
    """``{"dtype", "shape", "data"}`` for an array: C order, little-endian bytes."""
    a = np.asarray(array)
    name = dtype_name(a.dtype)
    a = np.ascontiguousarray(a, dtype=DTYPES[name])  # byte-swaps big-endian input
    return {"dtype": name, "shape": list(a.shape), "data": a.tobytes()}


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return array_to_wire(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise ProtocolError(E_SCHEMA, f"cannot encode a {type(obj).__name__} on the wire")


def encode(msg: Mapping[str, Any]) -> bytes:
    """msgpack bytes of a message; numpy arrays anywhere in it travel as wire arrays."""
    return msgpack.packb(msg, use_bin_type=True, default=_default)


# --------------------------------------------------------------------------- decoding


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(E_MALFORMED, f"msgpack extension type {code} is not allowed")


_SCALAR_TYPES = (str, bytes, int, float, bool, type(None))


def _check_tree(obj: Any, max_depth: int) -> None:
    """Depth, key types and value types of the raw tree, iteratively (no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolError(E_TOO_LARGE, f"nesting deeper than max_depth={max_depth}")
        if type(node) is dict:
            for key, value in node.items():
                if type(key) is not str:
                    raise ProtocolError(E_MALFORMED, f"map key {_short(key)} is not a string")
                if type(value) is dict or type(value) is list:
                    stack.append((value, depth + 1))
                elif type(value) not in _SCALAR_TYPES:
                    raise ProtocolError(E_MALFORMED, f"value of type {type(value).__name__}")
        else:
            for value in node:
                if type(value) is dict or type(value) is list:
                    stack.append((value, depth + 1))
                elif type(value) not in _SCALAR_TYPES:
                    raise ProtocolError(E_MALFORMED, f"value of type {type(value).__name__}")


def unpack(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> dict:
    """msgpack bytes -> raw top-level map, with every size limit enforced."""
    size = len(data)
    if size > limits.max_message_bytes:
        raise ProtocolError(
            E_TOO_LARGE, f"message of {size} bytes > max_message_bytes={limits.max_message_bytes}"
        )
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=limits.max_message_bytes,
            max_str_len=limits.max_str_len,
            max_array_len=min(limits.max_list_len, size),
            max_map_len=min(limits.max_map_len, size),
            max_ext_len=0,
            ext_hook=_reject_ext,
        )
    except ProtocolError:
        raise
    except msgpack.StackError as exc:
        raise ProtocolError(E_TOO_LARGE, f"nesting too deep for msgpack: {exc}") from None
    except Exception as exc:  # every msgpack failure mode is a malformed message
        raise ProtocolError(
            E_MALFORMED, f"not valid msgpack: {type(exc).__name__}: {exc}"
        ) from None
    if type(obj) is not dict:
        raise ProtocolError(E_MALFORMED, f"top level is a {type(obj).__name__}, not a map")
    _check_tree(obj, limits.max_depth)
    return obj


def array_from_wire(
    obj: Any,
    limits: Limits = DEFAULT_LIMITS,
    *,
    field: str = "array",
    dtypes: Sequence[str] | None = None,
    finite: bool = False,
) -> np.ndarray:
    """A wire array -> read-only ndarray view of its bytes; validates before any allocation."""
    if type(obj) is not dict or set(obj) != {"dtype", "shape", "data"}:
        raise ProtocolError(
            E_BAD_ARRAY, f"{field}: expected a map with keys dtype, shape, data; got {_short(obj)}"
        )
    name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if type(name) is not str or name not in DTYPES:
        raise ProtocolError(
            E_BAD_ARRAY, f"{field}.dtype: {_short(name)} is not in the allow-list {list(DTYPES)}"
        )
    if dtypes is not None and name not in dtypes:
        raise ProtocolError(E_BAD_ARRAY, f"{field}.dtype: {name!r} not allowed here; use {dtypes}")
    if type(shape) is not list:
        raise ProtocolError(E_BAD_ARRAY, f"{field}.shape: expected a list, got {_short(shape)}")
    if len(shape) > limits.max_array_rank:
        raise ProtocolError(
            E_TOO_LARGE,
            f"{field}.shape: rank {len(shape)} > max_array_rank={limits.max_array_rank}",
        )
    elements = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise ProtocolError(E_BAD_ARRAY, f"{field}.shape: bad dimension {_short(dim)}")
        if dim > limits.max_array_elements:  # checked alone too: a 0 earlier keeps the product 0
            raise ProtocolError(
                E_TOO_LARGE,
                f"{field}.shape: dimension {dim} > max_array_elements={limits.max_array_elements}",
            )
        elements *= dim
        if elements > limits.max_array_elements:
            raise ProtocolError(
                E_TOO_LARGE,
                f"{field}.shape: {_short(shape)} has more than "
                f"max_array_elements={limits.max_array_elements} elements",
            )
    if type(data) is not bytes:
        raise ProtocolError(E_BAD_ARRAY, f"{field}.data: expected bin, got {type(data).__name__}")
    dtype = DTYPES[name]
    if len(data) != elements * dtype.itemsize:
        raise ProtocolError(
            E_BAD_ARRAY,
            f"{field}.data: {len(data)} bytes, but shape {shape} of {name} needs "
            f"{elements * dtype.itemsize}",
        )
    if name == "bool" and data and max(data) > 1:
        raise ProtocolError(E_BAD_ARRAY, f"{field}.data: bool bytes must be 0 or 1")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if finite and name in FLOAT_DTYPES and not np.isfinite(array).all():
        raise ProtocolError(E_NON_FINITE, f"{field}: contains NaN or inf")
    return array


class _Fields:
    """Typed access to the fields of one raw message, with errors that name the field."""

    def __init__(self, raw: dict, mtype: str, limits: Limits) -> None:
        self.raw, self.mtype, self.limits = raw, mtype, limits

    def _fail(self, code: str, name: str, what: str) -> ProtocolError:
        return ProtocolError(code, f"{self.mtype}.{name}: {what}")

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.raw:
            if required:
                raise self._fail(E_SCHEMA, name, "missing required field")
            return None
        return self.raw[name]

    def integer(
        self, name: str, lo: int = 0, hi: int = _INT63, required: bool = True
    ) -> int | None:
        value = self._get(name, required)
        if value is None and not required:
            return None
        if type(value) is not int or not lo <= value < hi:
            raise self._fail(E_SCHEMA, name, f"expected int in [{lo}, {hi}), got {_short(value)}")
        return value

    def number(self, name: str, lo: float = 0.0, required: bool = True) -> float | None:
        value = self._get(name, required)
        if value is None and not required:
            return None
        if type(value) is int:
            value = float(value)
        if type(value) is not float or not math.isfinite(value) or value < lo:
            raise self._fail(E_SCHEMA, name, f"expected finite float >= {lo}, got {_short(value)}")
        return value

    def text(
        self,
        name: str,
        *,
        choices: Sequence[str] | None = None,
        pattern: re.Pattern | None = None,
        required: bool = True,
    ) -> str | None:
        value = self._get(name, required)
        if value is None and not required:
            return None
        if type(value) is not str:
            raise self._fail(E_SCHEMA, name, f"expected str, got {_short(value)}")
        if choices is not None and value not in choices:
            raise self._fail(E_SCHEMA, name, f"{_short(value)} is not one of {list(choices)}")
        if pattern is not None and not pattern.match(value):
            raise self._fail(E_SCHEMA, name, f"{_short(value)} does not match {pattern.pattern}")
        return value

    def request_id(self, required: bool = True) -> int | str | None:
        value = self._get("request_id", required)
        if value is None and not required:
            return None
        if type(value) is int and 0 <= value < _INT63:
            return value
        if type(value) is str and 1 <= len(value) <= _MAX_REQUEST_ID_CHARS:
            return value
        raise self._fail(
            E_SCHEMA,
            "request_id",
            f"expected int in [0, 2**63) or str of 1..{_MAX_REQUEST_ID_CHARS} chars, "
            f"got {_short(value)}",
        )

    def array(self, name: str, **kwargs: Any) -> np.ndarray:
        value = self._get(name, True)
        return array_from_wire(value, self.limits, field=f"{self.mtype}.{name}", **kwargs)

    def array_map(self, name: str, *, finite: bool) -> dict[str, np.ndarray]:
        value = self._get(name, True)
        if type(value) is not dict or not value:
            raise self._fail(E_SCHEMA, name, f"expected a non-empty map, got {_short(value)}")
        if len(value) > self.limits.max_arrays_per_message:
            raise self._fail(
                E_TOO_LARGE,
                name,
                f"{len(value)} arrays > max_arrays_per_message="
                f"{self.limits.max_arrays_per_message}",
            )
        out = {}
        for key, item in value.items():
            _check_name(key, f"{self.mtype}.{name}")
            out[key] = array_from_wire(
                item, self.limits, field=f"{self.mtype}.{name}[{key!r}]", finite=finite
            )
        return out

    def scalar_map(self, name: str, *, ints_only: bool) -> dict[str, Any]:
        value = self._get(name, True)
        if type(value) is not dict:
            raise self._fail(E_SCHEMA, name, f"expected a map, got {_short(value)}")
        allowed = (int,) if ints_only else (int, float, bool, str)
        for key, item in value.items():
            ok = type(item) in allowed
            if ok and type(item) is float:
                ok = math.isfinite(item)
            if ok and ints_only:
                ok = -_INT63 <= item < _INT63
            if not ok:
                kind = "int" if ints_only else "finite scalar"
                raise self._fail(
                    E_SCHEMA, f"{name}[{key!r}]", f"expected {kind}, got {_short(item)}"
                )
        return dict(value)


def _check_name(name: str, where: str) -> None:
    if not 1 <= len(name) <= _MAX_NAME_CHARS or "\x00" in name:
        raise ProtocolError(
            E_SCHEMA, f"{where}: name {_short(name)} must be 1..{_MAX_NAME_CHARS} chars, no NUL"
        )


def _decode_transitions(f: _Fields) -> Message:
    actor_id = f.integer("actor_id", hi=_INT31)
    seq = f.integer("seq")
    policy_version = f.integer("policy_version")
    limits = f.limits
    ids = f.raw.get("episode_ids")
    if type(ids) is list:
        if not all(type(i) is int and -_INT63 <= i < _INT63 for i in ids):
            raise f._fail(E_SCHEMA, "episode_ids", "expected a list of int64")
        episode_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    elif type(ids) is dict:
        episode_ids = f.array("episode_ids", dtypes=INT_DTYPES).astype(np.int64)
        if episode_ids.ndim != 1:
            raise f._fail(E_SCHEMA, "episode_ids", f"expected rank 1, got {episode_ids.shape}")
    else:
        raise f._fail(E_SCHEMA, "episode_ids", f"expected a list or int array, got {_short(ids)}")
    rows = len(episode_ids)
    if not 1 <= rows <= limits.max_batch_transitions:
        raise f._fail(
            E_TOO_LARGE if rows else E_SCHEMA,
            "episode_ids",
            f"{rows} rows, expected 1..max_batch_transitions={limits.max_batch_transitions}",
        )
    arrays = f.array_map("arrays", finite=True)
    for name, array in arrays.items():
        if array.ndim < 1 or array.shape[0] != rows:
            raise f._fail(
                E_SCHEMA,
                f"arrays[{name!r}]",
                f"shape {array.shape} does not start with {rows} rows",
            )
    msg: Message = {
        "actor_id": actor_id,
        "seq": seq,
        "episode_ids": episode_ids,
        "policy_version": policy_version,
        "arrays": arrays,
    }
    sent_at_ns = f.integer("sent_at_ns", required=False)
    if sent_at_ns is not None:
        msg["sent_at_ns"] = sent_at_ns
    return msg


def _decode_ack(f: _Fields) -> Message:
    return {
        "actor_id": f.integer("actor_id", hi=_INT31),
        "seq": f.integer("seq"),
        "status": f.text("status", choices=ACK_STATUSES),
        "committed_rows": f.integer("committed_rows"),
    }


def _decode_weights(f: _Fields) -> Message:
    return {
        "version": f.integer("version"),
        "tensors": f.array_map("tensors", finite=True),
        "sha256": f.text("sha256", pattern=_HEX64_RE),
    }


def _decode_action_request(f: _Fields) -> Message:
    msg: Message = {"request_id": f.request_id()}
    obs = f.array("obs", dtypes=FLOAT_DTYPES, finite=True)
    if obs.ndim not in (1, 2) or obs.shape[-1] < 1 or (obs.ndim == 2 and obs.shape[0] < 1):
        raise f._fail(E_SCHEMA, "obs", f"expected shape [obs_dim] or [B, obs_dim], got {obs.shape}")
    msg["obs"] = obs
    for name in ("sent_at_ns", "deadline_ns"):
        value = f.integer(name, required=False)
        if value is not None:
            msg[name] = value
    mode = f.text("mode", pattern=_CODE_RE, required=False)
    if mode is not None:
        msg["mode"] = mode
    return msg


def _decode_action_reply(f: _Fields) -> Message:
    msg: Message = {"request_id": f.request_id()}
    action = f.array("action", dtypes=FLOAT_DTYPES, finite=True)
    if action.ndim not in (1, 2):
        raise f._fail(
            E_SCHEMA, "action", f"expected shape [act_dim] or [B, act_dim], got {action.shape}"
        )
    msg["action"] = action
    msg["policy_version"] = f.integer("policy_version")
    msg["server_latency_us"] = f.integer("server_latency_us")
    msg["batch_size"] = f.integer("batch_size", lo=1)
    return msg


def _decode_health(f: _Fields) -> Message:
    request_id = f.request_id(required=False)
    return {} if request_id is None else {"request_id": request_id}


def _decode_health_reply(f: _Fields) -> Message:
    msg: Message = {
        "status": f.text("status", pattern=_CODE_RE),
        "server": f.text("server"),
        "uptime_s": f.number("uptime_s"),
        "counters": f.scalar_map("counters", ints_only=True),
    }
    request_id = f.request_id(required=False)
    if request_id is not None:
        msg["request_id"] = request_id
    policy_version = f.integer("policy_version", required=False)
    if policy_version is not None:
        msg["policy_version"] = policy_version
    return msg


def _decode_heartbeat(f: _Fields) -> Message:
    return {
        "actor_id": f.integer("actor_id", hi=_INT31),
        "time_ns": f.integer("time_ns"),
        "stats": f.scalar_map("stats", ints_only=False),
    }


def _decode_error(f: _Fields) -> Message:
    msg: Message = {"code": f.text("code", pattern=_CODE_RE), "message": f.text("message")}
    request_id = f.request_id(required=False)
    if request_id is not None:
        msg["request_id"] = request_id
    actor_id = f.integer("actor_id", hi=_INT31, required=False)
    if actor_id is not None:
        msg["actor_id"] = actor_id
    seq = f.integer("seq", required=False)
    if seq is not None:
        msg["seq"] = seq
    return msg


_DECODERS = {
    TRANSITIONS: _decode_transitions,
    ACK: _decode_ack,
    WEIGHTS: _decode_weights,
    ACTION_REQUEST: _decode_action_request,
    ACTION_REPLY: _decode_action_reply,
    HEALTH: _decode_health,
    HEALTH_REPLY: _decode_health_reply,
    HEARTBEAT: _decode_heartbeat,
    ERROR: _decode_error,
}


def _addressing(raw: dict) -> dict[str, Any]:
    """Best-effort request_id / actor_id / seq of a rejected message, for the error reply."""
    out: dict[str, Any] = {}
    rid = raw.get("request_id")
    if (type(rid) is int and 0 <= rid < _INT63) or (
        type(rid) is str and 1 <= len(rid) <= _MAX_REQUEST_ID_CHARS
    ):
        out["request_id"] = rid
    actor_id = raw.get("actor_id")
    if type(actor_id) is int and 0 <= actor_id < _INT31:
        out["actor_id"] = actor_id
    seq = raw.get("seq")
    if type(seq) is int and 0 <= seq < _INT63:
        out["seq"] = seq
    return out


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validated message from bytes; raises ProtocolError, never anything else.

    The result holds ``"v"``, ``"type"`` and the known fields of that type (unknown
    fields are ignored, for forward compatibility); arrays are read-only ndarrays.
    """
    raw = unpack(data, limits)
    version = raw.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(
            E_VERSION,
            f"v: {_short(version)} is not the supported protocol version {PROTOCOL_VERSION}",
            **_addressing(raw),
        )
    mtype = raw.get("type")
    if not isinstance(mtype, str) or mtype not in _DECODERS:
        raise ProtocolError(
            E_UNKNOWN_TYPE,
            f"type: {_short(mtype)} is not one of {list(MESSAGE_TYPES)}",
            **_addressing(raw),
        )
    try:
        msg = _DECODERS[mtype](_Fields(raw, mtype, limits))
    except ProtocolError as exc:
        address = _addressing(raw)
        exc.request_id = address.get("request_id")
        exc.actor_id = address.get("actor_id")
        exc.seq = address.get("seq")
        raise
    msg["v"] = PROTOCOL_VERSION
    msg["type"] = mtype
    return msg


# --------------------------------------------------------------------------- constructors


def _header(mtype: str) -> Message:
    return {"v": PROTOCOL_VERSION, "type": mtype}


def _wire_ready(array: Any, where: str) -> np.ndarray:
    a = np.asarray(array)
    try:
        return np.ascontiguousarray(a, dtype=DTYPES[dtype_name(a.dtype)])
    except ProtocolError as exc:
        raise ProtocolError(exc.code, f"{where}: {exc.message}") from None


def make_transitions(
    actor_id: int,
    seq: int,
    episode_ids: Sequence[int] | np.ndarray,
    policy_version: int,
    arrays: Mapping[str, np.ndarray],
    *,
    sent_at_ns: int | None = None,
) -> Message:
    """A batch of ``n = len(episode_ids)`` transitions; every array has shape ``(n, ...)``."""
    ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
    out = {name: _wire_ready(a, f"arrays[{name!r}]") for name, a in arrays.items()}
    for name, a in out.items():
        if a.ndim < 1 or a.shape[0] != len(ids):
            raise ProtocolError(
                E_SCHEMA, f"arrays[{name!r}]: shape {a.shape} does not start with {len(ids)} rows"
            )
    msg = _header(TRANSITIONS)
    msg.update(
        actor_id=int(actor_id),
        seq=int(seq),
        episode_ids=ids,
        policy_version=int(policy_version),
        arrays=out,
    )
    if sent_at_ns is not None:
        msg["sent_at_ns"] = int(sent_at_ns)
    return msg


def make_ack(actor_id: int, seq: int, committed_rows: int, status: str = "committed") -> Message:
    """Acknowledge batch ``(actor_id, seq)``: committed now, a duplicate, or never acceptable."""
    if status not in ACK_STATUSES:
        raise ValueError(f"status must be one of {ACK_STATUSES}, got {status!r}")
    msg = _header(ACK)
    msg.update(
        actor_id=int(actor_id), seq=int(seq), status=status, committed_rows=int(committed_rows)
    )
    return msg


def weights_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 hex of the canonical tensor bytes (docs/protocol.md, "weights").

    For each tensor in order of its name's UTF-8 bytes: name, NUL, dtype name, NUL, shape as
    comma-separated decimals, NUL, byte length as uint64 little-endian, the C-order
    little-endian data.
    """
    digest = hashlib.sha256()
    items = sorted(((name.encode("utf-8"), a) for name, a in tensors.items()), key=lambda kv: kv[0])
    for name, array in items:
        a = _wire_ready(array, f"tensors[{name!r}]")
        data = a.reshape(-1).view(np.uint8)
        digest.update(name + b"\x00")
        digest.update(dtype_name(a.dtype).encode() + b"\x00")
        digest.update(",".join(str(d) for d in a.shape).encode() + b"\x00")
        digest.update(data.size.to_bytes(8, "little"))
        digest.update(data.data)
    return digest.hexdigest()


def make_weights(version: int, tensors: Mapping[str, np.ndarray]) -> Message:
    """A weights message with its sha256; tensors must be finite (checked here too)."""
    out = {name: _wire_ready(a, f"tensors[{name!r}]") for name, a in tensors.items()}
    if not out:
        raise ProtocolError(E_SCHEMA, "weights.tensors: at least one tensor is required")
    for name, a in out.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ProtocolError(E_NON_FINITE, f"weights.tensors[{name!r}]: contains NaN or inf")
    msg = _header(WEIGHTS)
    msg.update(version=int(version), tensors=out, sha256=weights_sha256(out))
    return msg


def verify_weights(msg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The tensors of a decoded weights message after recomputing its hash.

    Raises ProtocolError(hash_mismatch) when the tensors do not hash to ``msg["sha256"]``.
    """
    if msg.get("type") != WEIGHTS:
        raise ProtocolError(
            E_UNSUPPORTED, f"expected a weights message, got {_short(msg.get('type'))}"
        )
    tensors = dict(msg["tensors"])
    actual = weights_sha256(tensors)
    if actual != msg["sha256"]:
        raise ProtocolError(
            E_HASH_MISMATCH,
            f"weights.sha256: message says {msg['sha256']}, tensors hash to {actual}",
        )
    return tensors


def make_action_request(
    request_id: int | str,
    obs: np.ndarray,
    *,
    sent_at_ns: int | None = None,
    deadline_ns: int | None = None,
    mode: str | None = None,
) -> Message:
    """Ask for actions for ``obs`` of shape ``(obs_dim,)`` or ``(B, obs_dim)``.

    ``sent_at_ns`` and ``deadline_ns`` are Unix-epoch wall-clock nanoseconds.
    """
    msg = _header(ACTION_REQUEST)
    msg.update(request_id=request_id, obs=_wire_ready(obs, "obs"))
    if sent_at_ns is not None:
        msg["sent_at_ns"] = int(sent_at_ns)
    if deadline_ns is not None:
        msg["deadline_ns"] = int(deadline_ns)
    if mode is not None:
        msg["mode"] = mode
    return msg


def make_action_reply(
    request_id: int | str,
    action: np.ndarray,
    policy_version: int,
    server_latency_us: int,
    batch_size: int,
) -> Message:
    """Actions ``(act_dim,)`` or ``(B, act_dim)`` for one request; batch_size = engine rows."""
    msg = _header(ACTION_REPLY)
    msg.update(
        request_id=request_id,
        action=_wire_ready(action, "action"),
        policy_version=int(policy_version),
        server_latency_us=int(server_latency_us),
        batch_size=int(batch_size),
    )
    return msg


def make_health(request_id: int | str | None = None) -> Message:
    """A health request; any server answers it with ``health_reply`` without its engine."""
    msg = _header(HEALTH)
    if request_id is not None:
        msg["request_id"] = request_id
    return msg


def make_health_reply(
    *,
    server: str,
    uptime_s: float,
    counters: Mapping[str, int],
    policy_version: int | None = None,
    request_id: int | str | None = None,
    status: str = "ok",
) -> Message:
    msg = _header(HEALTH_REPLY)
    msg.update(
        status=status,
        server=server,
        uptime_s=float(uptime_s),
        counters={k: int(v) for k, v in counters.items()},
    )
    if request_id is not None:
        msg["request_id"] = request_id
    if policy_version is not None:
        msg["policy_version"] = int(policy_version)
    return msg


def make_heartbeat(
    actor_id: int, stats: Mapping[str, int | float | bool | str], *, time_ns: int | None = None
) -> Message:
    """An actor's liveness signal with its scalar stats; time_ns is Unix-epoch nanoseconds."""
    msg = _header(HEARTBEAT)
    msg.update(
        actor_id=int(actor_id),
        time_ns=time.time_ns() if time_ns is None else int(time_ns),
        stats=dict(stats),
    )
    return msg


def make_error(
    code: str,
    message: str,
    *,
    request_id: int | str | None = None,
    actor_id: int | None = None,
    seq: int | None = None,
    max_message_chars: int = 1024,
) -> Message:
    """An error reply; the message is cut to ``max_message_chars`` so it always fits."""
    msg = _header(ERROR)
    msg.update(code=code, message=message[:max_message_chars])
    if request_id is not None:
        msg["request_id"] = request_id
    if actor_id is not None:
        msg["actor_id"] = int(actor_id)
    if seq is not None:
        msg["seq"] = int(seq)
    return msg


def error_from(exc: ProtocolError) -> Message:
    """The error reply for a rejected message, addressed as far as it could be parsed."""
    return make_error(
        exc.code, exc.message, request_id=exc.request_id, actor_id=exc.actor_id, seq=exc.seq
    )
