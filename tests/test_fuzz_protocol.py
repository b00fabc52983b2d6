"""Fuzzing the protocol: hypothesis properties plus the mutation fuzzer of benchmarks/.

The default run sends a few thousand malformed messages (decode in-process, and a live
ActionServer and LearnerLink in child processes). The ``slow`` test sends
``IDQL_FUZZ_COUNT`` (default 100k) to each target.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from idql_runtime import protocol as P

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "fuzz_protocol", ROOT / "benchmarks" / "fuzz_protocol.py"
)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

FAST = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.sampled_from(["v", "type", "obs", "float32", "bool", *P.MESSAGE_TYPES]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["v", "type", "dtype", "shape", "data", "obs", "request_id", "arrays"])
            | st.text(max_size=5),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


def decode_or_reject(data: bytes) -> dict | None:
    """decode must return a message or raise ProtocolError; nothing else."""
    try:
        return P.decode(data)
    except P.ProtocolError as exc:
        assert exc.code in P.ERROR_CODES
        return None


@FAST
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_protocol_error(data):
    decode_or_reject(data)


@FAST
@given(msgpack_values, st.sampled_from(P.MESSAGE_TYPES), st.booleans())
def test_random_msgpack_only_raise_protocol_error(value, mtype, wrap):
    obj = {"v": 1, "type": mtype, "x": value, "obs": value, "arrays": value} if wrap else value
    decode_or_reject(msgpack.packb(obj, use_bin_type=True))


@FAST
@given(st.sampled_from(P.MESSAGE_TYPES), st.data())
def test_mutated_valid_messages_only_raise_protocol_error(mtype, data):
    valid = fuzz.valid_messages(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))))[mtype]
    pos = data.draw(st.integers(0, len(valid)))
    mutated = (
        valid[:pos] + data.draw(st.binary(max_size=8)) + valid[pos + data.draw(st.integers(0, 8)) :]
    )
    decode_or_reject(mutated)


wire_dtypes = st.sampled_from(list(P.DTYPES))


@FAST
@given(st.data(), wire_dtypes, st.integers(1, 6))
def test_transitions_round_trip_bit_exact(data, dtype_name, rows):
    dtype = P.DTYPES[dtype_name]
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    shape = (rows, *data.draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)))
    array = data.draw(hnp.arrays(dtype, shape, elements=elements))
    ids = data.draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=rows, max_size=rows))
    msg = P.make_transitions(2, 2**62, ids, 1, {"a": array})
    out = P.decode(P.encode(msg))
    assert out["arrays"]["a"].dtype == dtype and out["arrays"]["a"].shape == shape
    assert out["arrays"]["a"].tobytes() == np.ascontiguousarray(array).tobytes()
    assert out["episode_ids"].tolist() == ids


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda s: "\0" not in s),
                       hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=3),
                                  elements=st.floats(-1e6, 1e6, width=32)),
                       min_size=1, max_size=4))  # fmt: skip
def test_weights_round_trip_and_verify(tensors):
    out = P.decode(P.encode(P.make_weights(3, tensors)))
    verified = P.verify_weights(out)
    assert set(verified) == set(tensors)
    for name, array in tensors.items():
        assert verified[name].tobytes() == array.tobytes()


def test_mutation_fuzzer_against_decode_every_type():
    result = fuzz.fuzz_decode(6000, seed=11)
    assert result["crashes"] == 0, result["crash_examples"]
    assert result["rejected"] + result["accepted"] == 6000
    assert result["rejected"] > 0.9 * 6000  # the fuzzer mostly makes malformed messages
    # Every rejection class of reliability.md #5 is exercised.
    for code in ("malformed", "schema", "bad_array", "too_large", "non_finite", "version"):
        assert result["rejected_by_code"].get(code, 0) > 0, code


def test_mutation_fuzzer_against_live_servers():
    result = fuzz.run(2000, seed=5, targets="action,learner", rss_limit_mib=50.0)
    for target in ("action_server", "learner"):
        r = result[target]
        assert r["problems"] == [] and r["alive_after"], r
        assert r["server_received"] == 2000
        assert r["child_exit_code"] == 0
    assert (
        result["action_server"]["server_rejected"]
        == result["action_server"]["replies_by_type"]["error"]
    )
    assert result["learner"]["server_rejected"] == result["learner"]["expected_rejected"]
    assert result["ok"], result


@pytest.mark.slow
def test_fuzz_100k_messages_per_target():
    count = int(os.environ.get("IDQL_FUZZ_COUNT", "100000"))
    result = fuzz.run(count, seed=2024, rss_limit_mib=50.0)
    print(result)
    assert result["decode"]["crashes"] == 0
    for target in ("action_server", "learner"):
        r = result[target]
        assert r["server_received"] == count and r["alive_after"], r
        assert r["rss_growth_mib"] < 50.0, r
    assert result["ok"], result
