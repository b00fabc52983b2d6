"""Protocol fuzzer: malformed messages against decode, a live ActionServer and a live LearnerLink.

    python benchmarks/fuzz_protocol.py --count 100000            # all three targets
    IDQL_FUZZ_COUNT=20000 python benchmarks/fuzz_protocol.py --targets decode,action

Messages are valid messages of every type put through byte-level mutations (bit flips,
byte sets, truncations, insertions, deletions, duplications, splices), structural
mutations (a field replaced by a random msgpack object, deleted, or an array's dtype,
shape or data made inconsistent, ext types and timestamps planted, nesting deepened), and
random msgpack objects, random bytes and pickle streams. Some mutations stay valid (a
flipped bit inside float data); they are counted as ``accepted``.

Targets:
- ``decode``: in-process ``protocol.decode`` (and ``verify_weights`` for weights); anything
  but a ProtocolError is a crash.
- ``action``: an ActionServer in a child process over loopback, one message at a time from
  a DEALER; every message must get exactly one reply, with the code that decode gives
  locally for malformed ones, and the server's counters must match what was sent.
- ``learner``: a LearnerLink in a child process that acks every valid batch; every
  message but a valid heartbeat must be answered, and ``rejected`` must equal the count
  predicted locally.
For both live targets the child must still answer a valid request afterwards, and its
RSS growth from after a warm-up to the end must stay under ``--rss-limit-mib``.

Prints one JSON object; exit status 0 iff every target is ok. Nothing here unpickles: the
pickle streams are literal bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from idql_runtime import protocol as P  # noqa: E402

PICKLES = (  # pickle.dumps({"v": 1, "type": "health"}) at protocols 4 and 0, and a RCE stub
    b"\x80\x04\x95\x1b\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01v\x94K\x01\x8c\x04type"
    b"\x94\x8c\x06health\x94u.",
    b"(dp0\nVv\np1\nI1\nsVtype\np2\nVhealth\np3\ns.",
    b"cos\nsystem\n(S'echo owned'\ntR.",
)
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xC4, 0xC6, 0xC7, 0xCA, 0xCB, 0xCF,
                     0xD4, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF)  # fmt: skip
INTERESTING_VALUES = (0, -1, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), True,
                      None, 0.5, math.nan, math.inf, -math.inf, "", "x" * 300, b"", b"\x00" * 9,
                      [], {}, [2**40], [-1], [0] * 20, "float32", "object", "<f4")  # fmt: skip
OBS_DIM, ACT_DIM = 6, 2


def valid_messages(rng: np.random.Generator) -> dict[str, bytes]:
    """One valid encoded message of every type, with random small contents."""
    rows = int(rng.integers(1, 5))
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    msgs = {
        "transitions": P.make_transitions(
            int(rng.integers(0, 8)),
            int(rng.integers(0, 2**40)),
            rng.integers(0, 9, rows),
            3,
            {
                "obs": f32(rows, OBS_DIM),
                "action": f32(rows, ACT_DIM),
                "reward": f32(rows),
                "terminated": rng.random(rows) < 0.5,
                "step": np.arange(rows, dtype=np.int32),
            },
        ),  # fmt: skip
        "ack": P.make_ack(1, int(rng.integers(0, 100)), rows),
        "weights": P.make_weights(int(rng.integers(0, 50)), {"w": f32(3, 2), "b": f32(2)}),
        "action_request": P.make_action_request(
            int(rng.integers(0, 2**40)), f32(OBS_DIM) if rng.random() < 0.5 else f32(rows, OBS_DIM)
        ),
        "action_reply": P.make_action_reply(7, f32(ACT_DIM), 3, 120, 4),
        "health": P.make_health(int(rng.integers(0, 1000))),
        "health_reply": P.make_health_reply(server="fuzz", uptime_s=1.0, counters={"a": 1}),
        "heartbeat": P.make_heartbeat(1, {"sent": 3, "lag_s": 0.1, "ok": True}),
        "error": P.make_error("schema", "bad", request_id=3),
    }
    return {name: P.encode(msg) for name, msg in msgs.items()}


def random_object(rng: np.random.Generator, depth: int = 0) -> object:
    kind = int(rng.integers(0, 12 if depth < 4 else 8))
    if kind == 0:
        return INTERESTING_VALUES[int(rng.integers(len(INTERESTING_VALUES)))]
    if kind == 1:
        return int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64))
    if kind == 2:
        return float(rng.standard_normal() * 10 ** int(rng.integers(-5, 300)))
    if kind == 3:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, int(rng.integers(0, 20))))
    if kind == 4:
        return rng.bytes(int(rng.integers(0, 40)))
    if kind == 5:
        return msgpack.ExtType(int(rng.integers(0, 127)), rng.bytes(int(rng.integers(0, 9))))
    if kind == 6:
        return msgpack.Timestamp(int(rng.integers(0, 2**32)), 0)
    if kind == 7:
        return str(rng.choice(P.MESSAGE_TYPES + tuple(P.DTYPES)))
    if kind in (8, 9):
        return [random_object(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))]
    keys = ["v", "type", "dtype", "shape", "data", "obs", "request_id", "seq", "arrays", "x"]
    return {
        str(rng.choice(keys)): random_object(rng, depth + 1) for _ in range(int(rng.integers(0, 6)))
    }


def _slots(obj: object) -> list[tuple[object, object]]:
    """Every (container, key) slot of a raw msgpack tree."""
    out, stack = [], [obj]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            out.append((node, key))
            if isinstance(value, dict | list):
                stack.append(value)
    return out


def break_array(rng: np.random.Generator, array: dict) -> None:
    """Make one wire array inconsistent: dtype, shape, data length, or a NaN/inf inside."""
    what = int(rng.integers(0, 4))
    if what == 0:
        array["dtype"] = str(rng.choice(["float32", "int64", "bool", "object", "<f8", "uint16"]))
    elif what == 1:
        array["shape"] = [int(d) for d in rng.integers(-2, 2**20, int(rng.integers(0, 10)))]
    elif what == 2 or array.get("dtype") not in P.FLOAT_DTYPES:
        array["data"] = bytes(array["data"])[: int(rng.integers(0, 64))] + rng.bytes(3)
    else:
        values = np.frombuffer(bytes(array["data"]), P.DTYPES[array["dtype"]]).copy()
        values[int(rng.integers(values.size))] = rng.choice([np.nan, np.inf, -np.inf])
        array["data"] = values.tobytes()


def mutate_structure(rng: np.random.Generator, data: bytes) -> bytes:
    tree = msgpack.unpackb(data, raw=False)
    slots = _slots(tree)
    container, key = slots[int(rng.integers(len(slots)))]
    op = int(rng.integers(0, 7))
    if op == 0 and isinstance(container, dict):
        del container[key]
    elif op == 1:
        value = container[key]
        for _ in range(int(rng.integers(1, 40))):
            value = [value] if rng.random() < 0.5 else {"n": value}
        container[key] = value
    elif op == 2:
        arrays = [c for c, k in slots if isinstance(c, dict) and k == "dtype"]
        if arrays:
            break_array(rng, arrays[int(rng.integers(len(arrays)))])
        else:
            container[key] = random_object(rng)
    elif op == 3:
        tree["type"] = str(rng.choice(P.MESSAGE_TYPES))
    else:
        container[key] = random_object(rng)
    return msgpack.packb(tree, use_bin_type=True)


def mutate_bytes(rng: np.random.Generator, data: bytes, other: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 8))
        pos = int(rng.integers(0, len(buf) + 1))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = INTERESTING_BYTES[
                int(rng.integers(len(INTERESTING_BYTES)))
            ]
        elif op == 2:
            del buf[pos:]
        elif op == 3:
            buf[pos:pos] = rng.bytes(int(rng.integers(1, 16)))
        elif op == 4:
            del buf[pos : pos + int(rng.integers(1, 16))]
        elif op == 5:
            buf[pos:pos] = buf[pos : pos + int(rng.integers(1, 32))]
        elif op == 6:
            cut = int(rng.integers(0, len(other) + 1))
            buf = buf[:pos] + bytearray(other[cut:])
        else:
            buf += rng.bytes(int(rng.integers(1, 8)))
    return bytes(buf)


def messages(count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``count`` fuzz messages as (how it was made, bytes)."""
    rng = np.random.default_rng(seed)
    seeds = valid_messages(rng)
    names = list(seeds)
    for i in range(count):
        if i % 64 == 0:
            seeds = valid_messages(rng)
        name = names[int(rng.integers(len(names)))]
        roll = rng.random()
        if roll < 0.45:
            other = seeds[names[int(rng.integers(len(names)))]]
            yield f"bytes:{name}", mutate_bytes(rng, seeds[name], other)
        elif roll < 0.85:
            yield f"struct:{name}", mutate_structure(rng, seeds[name])
        elif roll < 0.93:
            try:
                yield "random_object", msgpack.packb(random_object(rng), use_bin_type=True)
            except (OverflowError, ValueError, TypeError):
                yield "random_bytes", rng.bytes(17)
        elif roll < 0.98:
            yield "random_bytes", rng.bytes(int(rng.integers(0, 256)))
        else:
            yield "pickle", PICKLES[int(rng.integers(len(PICKLES)))]


def classify(data: bytes, verify: bool = False) -> tuple[str | None, dict | None]:
    """(error code or None, decoded message or None) as decode (and verify_weights) see it."""
    try:
        msg = P.decode(data)
        if verify and msg["type"] == "weights":  # actors verify the hash before use
            P.verify_weights(msg)
        return None, msg
    except P.ProtocolError as exc:
        return exc.code, None


def fuzz_decode(count: int, seed: int) -> dict:
    started = time.perf_counter()
    codes: Counter[str] = Counter()
    accepted: Counter[str] = Counter()
    crashes: list[str] = []
    for how, data in messages(count, seed):
        try:
            code, msg = classify(data, verify=True)
        except Exception as exc:  # a crash: decode must only ever raise ProtocolError
            crashes.append(f"{how}: {type(exc).__name__}: {exc}"[:200])
            continue
        if code is None:
            accepted[msg["type"]] += 1
        else:
            codes[code] += 1
    return {
        "sent": count,
        "rejected": sum(codes.values()),
        "accepted": sum(accepted.values()),
        "rejected_by_code": dict(codes),
        "accepted_by_type": dict(accepted),
        "crashes": len(crashes),
        "crash_examples": crashes[:5],
        "seconds": round(time.perf_counter() - started, 2),
        "ok": not crashes,
    }


# --------------------------------------------------------------------------- live targets


def serve(role: str) -> int:
    """Child process: run one server on loopback, print its endpoint, stop on SIGTERM."""
    from idql_runtime.transport import ActionServer, LearnerLink

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if role == "action":
        decide = lambda obs: (np.tanh(obs[:, :ACT_DIM]), 3)  # noqa: E731
        server = ActionServer("tcp://127.0.0.1:*", decide, obs_dim=OBS_DIM, batch_window_s=0.0)
        print(server.endpoint, flush=True)
        server.serve_forever(stop, 0.05)
        server.close()
    else:
        link = LearnerLink("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", weights_republish_s=None)
        print(link.ingest_endpoint, flush=True)
        while not stop.is_set():
            for batch in link.poll(50):
                link.ack(batch.actor_id, batch.seq, len(batch.msg["episode_ids"]))
        link.close()
    return 0


def _request(sock, payload: bytes, timeout_ms: int = 2000) -> dict | None:
    sock.send(payload)
    if not sock.poll(timeout_ms):
        return None
    return P.decode(sock.recv())


def fuzz_live(role: str, count: int, seed: int, rss_limit_mib: float) -> dict:
    import psutil
    import zmq

    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", role], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    problems: list[str] = []
    replies: Counter[str] = Counter()
    expected_rejected = 0
    local_rejected = 0
    rss_start = rss_end = 0
    try:
        endpoint = child.stdout.readline().strip()
        sock.connect(endpoint)
        proc = psutil.Process(child.pid)
        before = _request(sock, P.encode(P.make_health(0)))["counters"]
        warmup = min(1000, count // 10)
        for i, (how, data) in enumerate(messages(count, seed)):
            if i == warmup:
                rss_start = proc.memory_info().rss
            code, msg = classify(data)
            local_rejected += code is not None
            if role == "learner":
                served = msg is not None and msg["type"] in ("transitions", "heartbeat", "health")
                expected_rejected += not served
                if msg is not None and msg["type"] == "heartbeat":
                    sock.send(data)  # no reply for heartbeats
                    continue
            reply = _request(sock, data)
            if reply is None:
                problems.append(f"message {i} ({how}): no reply within 2 s")
                break
            replies[reply["type"]] += 1
            if code is not None and (reply["type"] != "error" or reply["code"] != code):
                problems.append(f"message {i} ({how}): local {code}, server {reply}"[:300])
            if len(problems) > 20:
                break
        rss_end = proc.memory_info().rss
        # Still serving: a valid request is answered properly.
        if role == "action":
            ok = _request(sock, P.encode(P.make_action_request(1, np.ones(OBS_DIM))))
            alive = ok is not None and ok["type"] == "action_reply"
        else:
            batch = P.make_transitions(1, 2**50, [0], 0, {"r": np.ones(1)})
            ok = _request(sock, P.encode(batch))
            alive = ok is not None and ok["type"] == "ack"
        after = _request(sock, P.encode(P.make_health(1)))["counters"]
    finally:
        sock.close()
        ctx.term()
        child.send_signal(signal.SIGTERM)
        try:
            exit_code = child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            exit_code = child.wait()
    delta = {k: after[k] - before[k] for k in after if k in before}
    # The final valid request, and the "before" health request, are not fuzz messages.
    fuzz_received = delta["received"] - 2
    fuzz_rejected = delta["rejected"]
    growth_mib = (rss_end - rss_start) / 2**20
    result = {
        "sent": count,
        "server_received": fuzz_received,
        "server_rejected": fuzz_rejected,
        "locally_rejected": local_rejected,
        "replies_by_type": dict(replies),
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_growth_mib": round(growth_mib, 2),
        "alive_after": alive,
        "child_exit_code": exit_code,
        "problems": problems[:5],
        "seconds": round(time.perf_counter() - started, 2),
    }
    if role == "action":
        counted = fuzz_rejected == replies["error"]
    else:
        counted = fuzz_rejected == expected_rejected
        result["expected_rejected"] = expected_rejected
    result["ok"] = bool(
        not problems
        and fuzz_received == count
        and counted
        and alive
        and exit_code == 0
        and growth_mib < rss_limit_mib
    )
    return result


def run(count: int, seed: int = 0, targets: str = "decode,action,learner", rss_limit_mib=50.0):
    """Fuzz every named target with ``count`` messages; a JSON-able summary."""
    out: dict = {"count": count, "seed": seed}
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if "decode" in names:
        out["decode"] = fuzz_decode(count, seed)
    if "action" in names:
        out["action_server"] = fuzz_live("action", count, seed + 1, rss_limit_mib)
    if "learner" in names:
        out["learner"] = fuzz_live("learner", count, seed + 2, rss_limit_mib)
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=int(os.environ.get("IDQL_FUZZ_COUNT", 10000)),
                        help="messages per target (env IDQL_FUZZ_COUNT)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--targets", default="decode,action,learner", help="comma-separated")
    parser.add_argument("--rss-limit-mib", type=float, default=50.0, help="max child RSS growth")
    parser.add_argument("--serve", choices=["action", "learner"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    result = run(args.count, args.seed, args.targets, args.rss_limit_mib)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
