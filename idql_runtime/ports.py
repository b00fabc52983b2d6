"""Free loopback ports for the demo, benchmarks and tests (no zmq needed)."""

from __future__ import annotations

import socket


def free_port_pair(host: str = "127.0.0.1", attempts: int = 100) -> int:
    """A port P such that P and P + 1 are both free on ``host`` right now (ingest and
    weights endpoints of one learner). Racy by nature: bind soon after."""
    for _ in range(attempts):
        with socket.socket() as a:
            a.bind((host, 0))
            port = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind((host, port + 1))
            except OSError:
                continue
        return int(port)
    raise RuntimeError(f"no free pair of ports on {host} after {attempts} attempts")
