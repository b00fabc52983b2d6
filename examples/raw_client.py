"""An action client written with raw pyzmq + msgpack + numpy only (no idql_runtime import).

It proves that docs/protocol.md is enough to talk to an idql action server: a REQ socket,
one msgpack map per request, arrays as {"dtype", "shape", "data"} with little-endian bytes.

    python examples/raw_client.py tcp://127.0.0.1:5555 --obs-dim 11 --requests 5
    python examples/raw_client.py tcp://127.0.0.1:5555 --health

Prints one JSON line per reply. Exits 1 on a timeout or an error reply.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import msgpack
import numpy as np
import zmq

PROTOCOL_VERSION = 1
WIRE_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}


def to_wire(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": list(array.shape), "data": array.tobytes()}


def from_wire(obj: dict) -> np.ndarray:
    dtype = np.dtype(WIRE_DTYPES[obj["dtype"]])  # KeyError for anything not a float
    return np.frombuffer(obj["data"], dtype=dtype).reshape(obj["shape"])


def request(sock: zmq.Socket, msg: dict, timeout_s: float) -> dict:
    sock.send(msgpack.packb(msg, use_bin_type=True))
    if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        raise TimeoutError(f"no reply within {timeout_s} s")
    return msgpack.unpackb(sock.recv(), raw=False, max_bin_len=64 * 2**20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("endpoint", help="server endpoint, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--obs-dim", type=int, default=11, help="observation size")
    parser.add_argument("--requests", type=int, default=3, help="action requests to send")
    parser.add_argument("--batch", type=int, default=0, help="rows per request (0: one 1-D obs)")
    parser.add_argument("--health", action="store_true", help="send one health request only")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="wait per reply, seconds")
    args = parser.parse_args(argv)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 64 * 2**20)
    sock.connect(args.endpoint)
    rng = np.random.default_rng(0)
    try:
        if args.health:
            reply = request(sock, {"v": PROTOCOL_VERSION, "type": "health"}, args.timeout_s)
            print(json.dumps({k: reply[k] for k in ("type", "status", "server", "counters")}))
            return 0 if reply["type"] == "health_reply" else 1
        for i in range(args.requests):
            shape = (args.batch, args.obs_dim) if args.batch else (args.obs_dim,)
            msg = {
                "v": PROTOCOL_VERSION,
                "type": "action_request",
                "request_id": i,
                "obs": to_wire(rng.standard_normal(shape)),
                "sent_at_ns": time.time_ns(),
            }
            started = time.perf_counter()
            reply = request(sock, msg, args.timeout_s)
            if reply["type"] == "error":
                print(json.dumps({"error": reply["code"], "message": reply["message"]}))
                return 1
            action = from_wire(reply["action"])
            print(
                json.dumps(
                    {
                        "request_id": reply["request_id"],
                        "action": action.tolist(),
                        "policy_version": reply["policy_version"],
                        "server_latency_us": reply["server_latency_us"],
                        "batch_size": reply["batch_size"],
                        "round_trip_us": int((time.perf_counter() - started) * 1e6),
                    }
                )
            )
        return 0
    except TimeoutError as exc:
        print(json.dumps({"error": "timeout", "message": str(exc)}))
        return 1
    finally:
        sock.close()
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
