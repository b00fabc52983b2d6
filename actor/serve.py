"""``idql-serve`` (= ``idql-actor --serve``): answer action requests from ZeroMQ clients.

Requests arriving within ``--batch-window-s`` are stacked into one engine call of up to
``--max-batch`` rows (padded to the engine's static batch); each reply carries the
action, the policy version and the server-side latency.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any

import numpy as np


def make_decide_batch(engine: Any, policy_version: list[int]) -> Any:
    """Wrap a static-batch engine as ``decide_batch(obs (b, obs_dim)) -> (actions, version)``."""
    static_b = engine.spec.batch

    def decide_batch(obs: np.ndarray) -> tuple[np.ndarray, int]:
        b = obs.shape[0]
        out = []
        for start in range(0, b, static_b):
            chunk = obs[start : start + static_b]
            pad = static_b - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(engine.decide(np.ascontiguousarray(chunk, np.float32))[: static_b - pad])
        return np.concatenate(out), policy_version[0]

    return decide_batch


def start_server(args: argparse.Namespace, agent: Any, engine: Any) -> Any:
    """The bound ActionServer of these arguments, or ``StartupRefused`` saying why (a bad
    endpoint or window, an address in use, an exposed bind, a missing or readable key),
    with nothing left open."""
    from actor.cli import StartupRefused
    from idql_runtime.transport import (
        ActionServer,
        BindError,
        InsecureBindError,
        InsecureKeyFileError,
    )

    version = [0]
    try:
        return ActionServer(
            args.serve,
            make_decide_batch(engine, version),
            obs_dim=agent.obs_dim,
            max_batch=args.max_batch,
            batch_window_s=args.batch_window_s,
            curve=_curve(args.curve_dir, "server"),
            insecure=args.insecure,
            max_request_age_s=args.max_request_age_s,
            mode=args.mode or agent.cfg.policy.mode,
        )
    except (ValueError, BindError, InsecureBindError, InsecureKeyFileError, FileNotFoundError) as e:
        raise StartupRefused(str(e)) from e


def run_server(args: argparse.Namespace, server: Any, engine: Any) -> int:
    """Serve until SIGINT/SIGTERM or ``--max-seconds``; the server is closed however it
    ends. An error here is a failure of the run (traceback, exit 1), not a refusal."""
    from idql_runtime.signals import stop_on_signals

    stop = threading.Event()
    # the caller's handlers come back when the block ends (idql_runtime.signals); they
    # are in place before "serving" is printed, which callers wait for
    with stop_on_signals(lambda _signum: stop.set()):
        log = logging.getLogger("idql-serve")
        log.info("serving %s with engine %s", server.endpoint, engine.name)
        print(f"serving {server.endpoint}", flush=True)
        try:
            if args.max_seconds > 0:
                timer = threading.Timer(args.max_seconds, stop.set)
                timer.daemon = True
                timer.start()
            server.serve_forever(stop)
        finally:
            server.close()
    return 0


def serve(args: argparse.Namespace, agent: Any, engine: Any) -> int:
    """``start_server`` then ``run_server`` (StartupRefused propagates)."""
    return run_server(args, start_server(args, agent, engine), engine)


def main(argv: list[str] | None = None) -> int:
    from actor.cli import build_parser
    from actor.cli import main as actor_main

    argv = list(sys.argv[1:]) if argv is None else list(argv)
    parser = build_parser()
    parser.prog = "idql-serve"
    if not parser.parse_args(argv).serve:
        argv += ["--serve", "tcp://127.0.0.1:5560"]
    return actor_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())


def _curve(directory: str | None, role: str) -> Any:
    if not directory:
        return None
    from idql_runtime.transport import curve_from_dir

    return curve_from_dir(directory, role)
