"""The wire protocol: round trips of every message type and rejection of bad input."""

from __future__ import annotations

import hashlib
import math
import pickle  # only to build a hostile payload; nothing here unpickles
import tracemalloc

import msgpack
import numpy as np
import pytest

from idql_runtime import protocol as P
from idql_runtime.protocol import Limits, ProtocolError, decode, encode

RNG = np.random.default_rng(0)


def raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def wire(array) -> dict:
    return P.array_to_wire(np.asarray(array))


def request_raw(**overrides) -> dict:
    msg = {"v": 1, "type": "action_request", "request_id": 5, "obs": wire(np.zeros(3, np.float32))}
    msg.update(overrides)
    return msg


def rejects(data: bytes, code: str, *, limits: Limits = P.DEFAULT_LIMITS, match: str = ""):
    with pytest.raises(ProtocolError) as info:
        decode(data, limits)
    assert info.value.code == code, str(info.value)
    assert match in str(info.value)
    return info.value


def all_messages() -> dict[str, dict]:
    """One valid message of every type, with every wire dtype somewhere."""
    obs = RNG.standard_normal((4, 11)).astype(np.float32)
    return {
        "transitions": P.make_transitions(
            actor_id=3,
            seq=2**40 + 1,
            episode_ids=[7, 7, 8, 8],
            policy_version=12,
            arrays={
                "obs": obs,
                "action": RNG.standard_normal((4, 3)),  # float64
                "reward": np.array([0.5, -1.0, 2.0, 0.0], np.float16),
                "terminated": np.array([False, False, True, False]),
                "pixels": RNG.integers(0, 255, (4, 2, 2, 3), dtype=np.uint8),
                "step": np.arange(4, dtype=np.int32),
            },
            sent_at_ns=1_700_000_000_000_000_000,
        ),
        "ack": P.make_ack(3, 2**40 + 1, 4, "committed"),
        "weights": P.make_weights(
            9, {"w": RNG.standard_normal((5, 4)).astype(np.float32), "b": np.arange(3)}
        ),
        "action_request": P.make_action_request(
            "req-1", obs, sent_at_ns=1, deadline_ns=2, mode="argmax"
        ),
        "action_reply": P.make_action_reply(
            17, RNG.standard_normal((4, 3)).astype(np.float32), 12, 250, 8
        ),
        "health": P.make_health(99),
        "health_reply": P.make_health_reply(
            server="idql-serve/0.1.0",
            uptime_s=1.5,
            counters={"received": 10},
            policy_version=3,
            request_id=99,
        ),
        "heartbeat": P.make_heartbeat(3, {"sent": 10, "lag_s": 0.25, "connected": True, "x": "y"}),
        "error": P.make_error("schema", "bad field", request_id=4, actor_id=3, seq=11),
    }


def assert_same(a, b):
    if isinstance(a, np.ndarray):
        b = np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bit-exact, NaN-free by construction
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same(a[key], b[key])
    else:
        assert a == b


@pytest.mark.parametrize("mtype", P.MESSAGE_TYPES)
def test_round_trip_every_type_bit_exact(mtype):
    msg = all_messages()[mtype]
    out = decode(encode(msg))
    assert out["type"] == mtype and out["v"] == P.PROTOCOL_VERSION
    expected = dict(msg)
    if mtype == "transitions":
        expected["episode_ids"] = np.asarray(msg["episode_ids"], np.int64)
    assert_same(expected, out)


def test_decoded_arrays_are_read_only_views():
    out = decode(encode(all_messages()["action_request"]))
    assert not out["obs"].flags.writeable


def test_episode_ids_as_array_or_list():
    msg = raw(
        {
            "v": 1,
            "type": "transitions",
            "actor_id": 0,
            "seq": 0,
            "policy_version": 0,
            "episode_ids": wire(np.array([5, 6], np.int32)),
            "arrays": {"r": wire(np.zeros(2, np.float32))},
        }
    )
    out = decode(msg)
    assert out["episode_ids"].dtype == np.int64 and out["episode_ids"].tolist() == [5, 6]


def test_big_endian_input_travels_little_endian():
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    w = P.array_to_wire(big)
    assert w["data"] == np.arange(6, dtype="<f4").tobytes()
    assert decode(encode(P.make_action_request(1, big)))["obs"].tolist() == big.tolist()


def test_weights_hash_is_the_documented_canonical_form():
    tensors = {"b": np.array([1, 2], np.int64), "a": np.ones((2, 1), np.float32)}
    digest = hashlib.sha256()
    for name in ("a", "b"):  # sorted by UTF-8 bytes
        a = tensors[name]
        dtype = {"float32": "float32", "int64": "int64"}[a.dtype.name]
        digest.update(name.encode() + b"\0" + dtype.encode() + b"\0")
        digest.update(",".join(map(str, a.shape)).encode() + b"\0")
        digest.update(
            a.nbytes.to_bytes(8, "little") + a.astype(a.dtype.newbyteorder("<")).tobytes()
        )
    assert P.weights_sha256(tensors) == digest.hexdigest()
    msg = decode(encode(P.make_weights(4, tensors)))
    verified = P.verify_weights(msg)
    assert_same(verified, {k: np.ascontiguousarray(v) for k, v in tensors.items()})


def test_verify_weights_rejects_tampered_tensor():
    msg = P.make_weights(4, {"w": np.ones(4, np.float32)})
    wire_msg = msgpack.unpackb(encode(msg), raw=False)
    data = bytearray(wire_msg["tensors"]["w"]["data"])
    data[0] ^= 0x01  # one flipped bit
    wire_msg["tensors"]["w"]["data"] = bytes(data)
    decoded = decode(raw(wire_msg))
    with pytest.raises(ProtocolError) as info:
        P.verify_weights(decoded)
    assert info.value.code == P.E_HASH_MISMATCH and "weights.sha256" in str(info.value)


def test_make_weights_refuses_nan():
    with pytest.raises(ProtocolError) as info:
        P.make_weights(1, {"w": np.array([1.0, np.nan], np.float32)})
    assert info.value.code == P.E_NON_FINITE


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("mtype", P.MESSAGE_TYPES)
def test_rejects_every_truncation(mtype):
    data = encode(all_messages()[mtype])
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:cut])


def test_rejects_trailing_bytes():
    rejects(encode(P.make_health()) + b"\x00", P.E_MALFORMED, match="extra data")


def test_rejects_pickle_payload():
    payload = pickle.dumps({"v": 1, "type": "health", "obs": np.zeros(3)})
    rejects(payload, P.E_MALFORMED)


def test_rejects_non_map_top_level():
    rejects(raw([1, 2, 3]), P.E_MALFORMED, match="not a map")
    rejects(raw("health"), P.E_MALFORMED)


def test_rejects_wrong_version_and_unknown_type():
    err = rejects(raw({"v": 2, "type": "health", "request_id": 3}), P.E_VERSION, match="v: 2")
    assert err.request_id == 3
    rejects(raw({"v": True, "type": "health"}), P.E_VERSION)
    rejects(raw({"v": 1, "type": "exec"}), P.E_UNKNOWN_TYPE, match="'exec'")
    rejects(raw({"v": 1}), P.E_UNKNOWN_TYPE)


@pytest.mark.parametrize(
    "overrides, code, field",
    [
        ({"request_id": None}, P.E_SCHEMA, "request_id"),
        ({"request_id": -1}, P.E_SCHEMA, "request_id"),
        ({"request_id": 2**63}, P.E_SCHEMA, "request_id"),
        ({"request_id": ""}, P.E_SCHEMA, "request_id"),
        ({"request_id": 1.5}, P.E_SCHEMA, "request_id"),
        ({"obs": [1.0, 2.0]}, P.E_BAD_ARRAY, "action_request.obs"),
        ({"sent_at_ns": "now"}, P.E_SCHEMA, "action_request.sent_at_ns"),
        ({"mode": "Arg Max!"}, P.E_SCHEMA, "action_request.mode"),
        ({"obs": wire(np.zeros((2, 3, 4), np.float32))}, P.E_SCHEMA, "action_request.obs"),
        ({"obs": wire(np.zeros((0, 3), np.float32))}, P.E_SCHEMA, "action_request.obs"),
        ({"obs": wire(np.zeros(3, np.int32))}, P.E_BAD_ARRAY, "action_request.obs.dtype"),
    ],
)
def test_rejects_wrong_schema_naming_the_field(overrides, code, field):
    rejects(raw(request_raw(**overrides)), code, match=field)


def test_rejects_missing_field_and_bool_for_int():
    rejects(raw({"v": 1, "type": "ack", "actor_id": 1, "seq": 2, "status": "committed"}),
            P.E_SCHEMA, match="ack.committed_rows: missing")  # fmt: skip
    ack = {"v": 1, "type": "ack", "actor_id": True, "seq": 2, "status": "committed",
           "committed_rows": 1}  # fmt: skip
    rejects(raw(ack), P.E_SCHEMA, match="ack.actor_id")
    ack.update(actor_id=1, status="maybe")
    rejects(raw(ack), P.E_SCHEMA, match="ack.status")


def test_rejects_transition_rows_mismatch():
    msg = all_messages()["transitions"]
    msg["arrays"]["obs"] = msg["arrays"]["obs"][:3]
    data = raw({**msg, "episode_ids": [1, 2, 3, 4], "arrays": {
        k: P.array_to_wire(v) for k, v in msg["arrays"].items()}})  # fmt: skip
    err = rejects(data, P.E_SCHEMA, match="arrays['obs']")
    assert (err.actor_id, err.seq) == (3, 2**40 + 1)  # so the learner can address the error


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["obs", "action", "transition", "weights"])
def test_rejects_non_finite_arrays(bad, where):
    if where == "obs":
        msg = P.make_action_request(1, np.array([0.0, bad], np.float32))
    elif where == "action":
        msg = P.make_action_reply(1, np.array([bad], np.float64), 0, 0, 1)
    elif where == "transition":
        msg = P.make_transitions(0, 0, [0], 0, {"reward": np.array([bad], np.float16)})
    else:
        msg = P.make_weights(1, {"w": np.ones(2, np.float32)})
        msg["tensors"]["w"] = np.array([1.0, bad], np.float32)
    rejects(encode(msg), P.E_NON_FINITE, match="NaN or inf")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_rejects_non_finite_scalars(bad):
    reply = P.make_health_reply(server="s", uptime_s=1.0, counters={})
    reply["uptime_s"] = bad
    rejects(encode(reply), P.E_SCHEMA, match="health_reply.uptime_s")
    hb = P.make_heartbeat(1, {"lag_s": bad})
    rejects(encode(hb), P.E_SCHEMA, match="heartbeat.stats['lag_s']")


def test_rejects_huge_shape_header_before_allocation():
    msg = request_raw(obs={"dtype": "float32", "shape": [2**40], "data": b"\0" * 8})
    tracemalloc.start()
    try:
        rejects(raw(msg), P.E_TOO_LARGE, match="max_array_elements")
        many_dims = {"dtype": "float64", "shape": [2**20, 2**20, 2**20], "data": b"\0" * 8}
        rejects(raw(request_raw(obs=many_dims)), P.E_TOO_LARGE)
        # msgpack headers claiming 2**32-1 list items / map entries / bin bytes.
        for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):
            rejects(b"\x81\xa1x" + header + b"\0" * 8, P.E_MALFORMED)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"decode allocated {peak} bytes for a tiny message"


@pytest.mark.parametrize(
    "shape", [[0, 2**64 - 1], [0, 2**63], [0, 2**40, 2**40], [3, 0, 2**30], [0, 2**24 + 1]]
)
def test_rejects_a_huge_dimension_after_a_zero_one(shape):
    """A 0 keeps the running product 0; each dimension is bounded on its own as well."""
    obs = {"dtype": "float32", "shape": shape, "data": b""}
    rejects(raw(request_raw(obs=obs)), P.E_TOO_LARGE, match="max_array_elements")
    # empty arrays with sane dimensions still decode
    empty = P.array_from_wire({"dtype": "float32", "shape": [0, 7], "data": b""})
    assert empty.shape == (0, 7)


def test_errors_about_huge_values_cost_only_a_prefix():
    huge = b"x" * (8 << 20)
    message = raw(request_raw(request_id=huge))
    tracemalloc.start()
    try:
        err = rejects(message, P.E_SCHEMA, match="request_id")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "bytes of length 8388608" in str(err)
    assert len(str(err)) < 400
    assert peak < 1.5 * len(huge), f"the error text of an 8 MiB value allocated {peak} bytes"


def test_rejects_shape_data_mismatch_and_bad_dims():
    rejects(raw(request_raw(obs={"dtype": "float32", "shape": [3], "data": b"\0" * 8})),
            P.E_BAD_ARRAY, match="needs 12")  # fmt: skip
    rejects(raw(request_raw(obs={"dtype": "float32", "shape": [-3], "data": b""})),
            P.E_BAD_ARRAY, match="bad dimension")  # fmt: skip
    rejects(raw(request_raw(obs={"dtype": "float32", "shape": [9] * 9, "data": b""})),
            P.E_TOO_LARGE, match="max_array_rank")  # fmt: skip
    extra = {"dtype": "float32", "shape": [1], "data": b"\0" * 4, "order": "F"}
    rejects(raw(request_raw(obs=extra)), P.E_BAD_ARRAY)


@pytest.mark.parametrize("dtype", ["<f4", "float128", "complex64", "object", "O", "|O", "U8", "int8",
                                   "uint16", "datetime64", ">f8", "", 7])  # fmt: skip
def test_rejects_dtype_outside_allow_list(dtype):
    obs = {"dtype": dtype, "shape": [1], "data": b"\0" * 8}
    rejects(raw(request_raw(obs=obs)), P.E_BAD_ARRAY, match="allow-list")


def test_rejects_object_dtype_on_encode():
    for bad in (np.array([object(), 1], dtype=object), np.array(["a"]), np.zeros(2, np.complex64)):
        with pytest.raises(ProtocolError) as info:
            encode(P.make_action_request(1, np.zeros(3)) | {"obs": bad})
        assert info.value.code == P.E_BAD_ARRAY


def test_rejects_bool_array_with_non_boolean_bytes():
    msg = P.make_transitions(0, 0, [0, 1], 0, {"done": np.array([True, False])})
    wire_msg = msgpack.unpackb(encode(msg), raw=False)
    wire_msg["arrays"]["done"]["data"] = b"\x01\x02"
    rejects(raw(wire_msg), P.E_BAD_ARRAY, match="0 or 1")


def test_rejects_deep_nesting():
    nested: dict = {"leaf": 1}
    for _ in range(P.DEFAULT_LIMITS.max_depth):
        nested = {"x": nested}
    rejects(raw({"v": 1, "type": "health", "extra": nested}), P.E_TOO_LARGE, match="max_depth")
    # Far past msgpack's own stack: a list nested 100k deep.
    rejects(b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0", P.E_TOO_LARGE)


def test_rejects_ext_types_and_timestamps():
    ext = msgpack.packb({"v": 1, "type": "health", "x": msgpack.ExtType(5, b"abc")})
    rejects(ext, P.E_MALFORMED, match="max_ext_len")
    ts = msgpack.packb({"v": 1, "type": "health", "t": msgpack.Timestamp(1, 0)})
    rejects(ts, P.E_MALFORMED)
    rejects(b"\xd4\x05\x00", P.E_MALFORMED)


def test_rejects_non_string_keys_and_invalid_utf8():
    rejects(msgpack.packb({"v": 1, "type": "health", 5: 1}), P.E_MALFORMED, match="map key")
    rejects(msgpack.packb({b"v": 1}, use_bin_type=True), P.E_MALFORMED, match="not a string")
    rejects(b"\x81\xa2\xff\xfe\x01", P.E_MALFORMED)  # key with invalid UTF-8


def test_rejects_oversized_message_and_long_strings():
    limits = Limits(max_message_bytes=1000, max_str_len=100)
    big = encode(P.make_action_request(1, np.zeros(500, np.float32)))
    rejects(big, P.E_TOO_LARGE, limits=limits, match="max_message_bytes=1000")
    rejects(
        raw(request_raw(request_id="x" * 101)), P.E_MALFORMED, limits=limits, match="max_str_len"
    )


def test_rejects_too_many_arrays_and_rows():
    limits = Limits(max_arrays_per_message=2, max_batch_transitions=3)
    arrays = {k: np.zeros(2, np.float32) for k in "abc"}
    rejects(encode(P.make_transitions(0, 0, [0, 0], 0, arrays)), P.E_TOO_LARGE, limits=limits)
    rows = P.make_transitions(0, 0, [0] * 3 + [1], 0, {"a": np.zeros(4, np.float32)})
    rejects(encode(rows), P.E_TOO_LARGE, limits=limits, match="max_batch_transitions=3")
    empty = P.make_transitions(0, 0, [], 0, {"a": np.zeros(0, np.float32)})
    rejects(encode(empty), P.E_SCHEMA, match="0 rows")


def test_error_addresses_rejected_request():
    err = rejects(raw(request_raw(obs=wire(np.array([np.nan], np.float32)))), P.E_NON_FINITE)
    assert err.request_id == 5
    reply = decode(encode(P.error_from(err)))
    assert (reply["code"], reply["request_id"]) == ("non_finite", 5)


def test_unknown_fields_are_ignored():
    out = decode(raw({"v": 1, "type": "health", "request_id": 1, "future": [1, {"a": 2}]}))
    assert out == {"v": 1, "type": "health", "request_id": 1}


def test_limits_validate_their_values():
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)
