"""``idql-actor``: act in a gymnasium env at a fixed control rate with a compiled engine,
optionally streaming transitions to a learner; or ``--serve`` actions to ZeroMQ clients.

A thin process: it builds library objects (checkpoint -> agent -> engine -> Actor or
ActionServer) and runs their loop. SIGINT/SIGTERM stop it cleanly: the control loop
stops (a robot would hold), the link flushes with a bounded wait for acks, exit 0; a
second signal ends the wait at once.
Exit status: 0 done or stopped by a signal; 1 the control loop failed (the decision
engine raised, or another error; logged with its traceback, after the link was still
flushed and the final status line printed); 2 refused at start-up (bad checkpoint, env
id, --rate-hz, --safe-action, link option or endpoint; an exposed bind without
--curve-dir or --insecure, an unsafe key file); 3 stopped by --overrun-limit late
decisions in a row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idql-actor",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, or a run dir (newest valid)"
    )
    p.add_argument("--env", help="gymnasium env id (default: the checkpoint's)")
    p.add_argument(
        "--learner",
        help="learner ingest endpoint, e.g. tcp://127.0.0.1:5555; "
        "without it the actor only acts (deployment, evaluation)",
    )
    p.add_argument("--weights", help="learner weights endpoint (default: ingest port + 1)")
    p.add_argument("--serve", help="serve actions on this endpoint instead of running an env")
    p.add_argument("--actor-id", type=int, default=0, help="this actor's id (provenance, dedup)")
    p.add_argument(
        "--rate-hz",
        type=float,
        help="control rate; default: the env's own; 0 = as fast as possible",
    )
    p.add_argument("--mode", choices=["argmax", "implicit"], help="extraction (default: config)")
    p.add_argument("--samples", type=int, help="N candidates per decision (default: config)")
    p.add_argument(
        "--engine",
        default="auto",
        help="auto (cpu on a CPU; on a GPU triton for B*N <= 256 candidates, else "
        "cuda_graph, the next one if a build fails), eager, cpu, compiled, cuda_graph, "
        "tensorrt, triton",
    )
    p.add_argument("--device", default="cpu", help="torch device for the engine")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="engine precision; auto: bfloat16 where the engine and hardware support it and"
        " it passes the precision check on these weights and states the float32 policy"
        " visits (engines/precision.py), else float32",
    )
    p.add_argument(
        "--calibration-states",
        type=int,
        default=256,
        help="--dtype auto: states (float32 policy rollout) the precision check runs on",
    )
    p.add_argument(
        "--episodes", type=int, default=0, help="stop after this many episodes (0 = no limit)"
    )
    p.add_argument(
        "--max-seconds", type=float, default=0.0, help="stop after this long (0 = no limit)"
    )
    p.add_argument("--seed", type=int, default=0, help="env and sampling seed")
    p.add_argument(
        "--overrun-limit",
        type=int,
        default=50,
        help="late decisions in a row that stop the actor safely (exit status 3)",
    )
    p.add_argument(
        "--safe-action", help="comma-separated fallback action (default: hold the last action)"
    )
    p.add_argument(
        "--buffer-capacity",
        type=int,
        default=100_000,
        help="max transitions held (unsent + unacknowledged); oldest dropped and counted beyond",
    )
    p.add_argument("--send-batch", type=int, default=64, help="transitions per message")
    p.add_argument(
        "--resend-timeout-s", type=float, default=2.0, help="resend an unacked batch after this"
    )
    p.add_argument(
        "--flush-timeout-s", type=float, default=5.0, help="bounded wait for acks at shutdown"
    )
    p.add_argument("--max-batch", type=int, default=16, help="--serve: rows per engine call")
    p.add_argument("--batch-window-s", type=float, default=0.001, help="--serve: gather window")
    p.add_argument(
        "--max-request-age-s", type=float, help="--serve: refuse requests older than this"
    )
    p.add_argument(
        "--curve-dir",
        help="CURVE keys: client.key_secret + server.key (actor), "
        "server.key_secret + authorized/ (server)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="--serve: allow a non-loopback bind without CURVE"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument(
        "--status-interval-s", type=float, default=5.0, help="seconds between status lines"
    )
    return p


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], Any, Any]:
    """(agent, engine, checkpoint meta, the float32 engine to fall back to or None, the
    precision check's calibration states or None)."""
    import torch

    from idql_runtime.checkpoint import load_checkpoint, restore_agent
    from idql_runtime.engines import build_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint, with_train_state=False)
    agent = restore_agent(ckpt, args.device, optimisers=False)
    batch = args.max_batch if args.serve else 1

    def build(dtype: str) -> Any:
        return build_engine(
            agent,
            kind=args.engine,
            batch=batch,
            samples=args.samples or agent.cfg.policy.samples,
            mode=args.mode or agent.cfg.policy.mode,
            dtype=dtype,
            device=args.device,
            seed=args.seed,
        )

    log = logging.getLogger("idql-actor")
    fallback = states = None
    if args.dtype != "auto":
        engine = build(args.dtype)
    else:
        engine, fallback, states = _auto_precision(args, build, ckpt.meta)
    log.info("engine: %s (%s)", engine.name, engine.describe()["dtype"])
    if engine.info.get("bf16") == "emulated":
        log.warning(
            "bfloat16 is emulated on this CPU (oneDNN has no bf16 kernels here): bf16's "
            "numbers at float32's speed; --dtype float32 is as fast"
        )
    return agent, engine, ckpt.meta, fallback, states


def _auto_precision(
    args: argparse.Namespace, build: Any, meta: dict[str, Any]
) -> tuple[Any, Any, Any]:
    """--dtype auto: try the reduced precision on states the float32 policy visits.

    Returns the engine and, when that is the reduced one, the float32 engine and the
    calibration states: the actor switches to float32 when an update changes the score
    network the check was run on, and re-checks the new one on the same states."""
    from idql_runtime.engines.precision import reduced_dtype_for, rollout_states, select_precision

    log = logging.getLogger("idql-actor")
    engine32 = build("float32")
    reduced = reduced_dtype_for(engine32.name, args.device)  # the kind auto built
    env_id = args.env or meta.get("env_id")
    states = None
    if reduced is not None and env_id:
        b = engine32.spec.batch

        def policy(obs: Any) -> Any:
            return engine32.decide(np.repeat(obs[None], b, axis=0))[0]

        states = rollout_states(env_id, policy, args.calibration_states, seed=args.seed)
    engine = select_precision(build, reduced, states, fallback=engine32, seed=args.seed)
    record = engine.info["precision_check"]
    tried = record.get("tried", {})
    measured = (
        f"; {reduced} on {tried['states']} states: regret p99 {tried['regret_p99']:.4f},"
        f" action error p99 {tried['action_err_p99']:.4f}, same pick {tried['same_pick']:.3f}"
        if tried
        else ""
    )
    log.info("--dtype auto: %s (%s)%s", record["chosen"], record["why"], measured)
    if engine is engine32:
        return engine, None, None
    return engine, engine32, states


class StartupRefused(Exception):
    """The actor cannot start with these arguments (exit status 2); nothing is left open."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.serve and args.max_batch < 1:  # before the checkpoint is read
        print(f"idql-actor: --max-batch must be >= 1, got {args.max_batch}", file=sys.stderr)
        return 2
    try:
        agent, engine, meta, fallback, states = _load(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"idql-actor: {e}", file=sys.stderr)
        return 2
    if args.serve:
        from actor.serve import run_server, start_server

        try:
            server = start_server(args, agent, engine)
        except StartupRefused as e:
            print(f"idql-actor: {e}", file=sys.stderr)
            return 2
        return run_server(args, server, engine)
    try:
        actor, link = start_actor(args, agent, engine, meta, fallback, states)
    except StartupRefused as e:
        print(f"idql-actor: {e}", file=sys.stderr)
        return 2
    return run_actor(args, actor, link)


def start_actor(
    args: argparse.Namespace,
    agent: Any,
    engine: Any,
    meta: dict[str, Any],
    fallback: Any = None,
    states: Any = None,
) -> tuple[Any, Any]:
    """(Actor, ActorLink or None), or StartupRefused saying why, with nothing left open.

    Only start-up errors become StartupRefused (exit 2): ``run_actor`` handles failures
    of the run itself, so that a control loop that fails is never reported as refused."""
    from idql_runtime.actor_runtime import Actor
    from idql_runtime.transport import ActorLink, InsecureBindError, InsecureKeyFileError

    env_id = args.env or meta.get("env_id")
    if not env_id:
        raise StartupRefused("the checkpoint names no env; pass --env")
    refused = (ValueError, FileNotFoundError, InsecureBindError, InsecureKeyFileError)
    try:
        safe = _parse_safe_action(args.safe_action)
        weights = (args.weights or _next_port(args.learner)) if args.learner else None
        curve = _curve(args.curve_dir, "client") if args.learner else None
    except refused as e:
        raise StartupRefused(str(e)) from e
    link = None
    if args.learner:
        try:
            link = ActorLink(
                args.learner,
                weights,
                args.actor_id,
                buffer_capacity=args.buffer_capacity,
                batch_size=args.send_batch,
                resend_timeout_s=args.resend_timeout_s,
                curve=curve,
            )
        # Anything the constructor raises (its checks, or zmq refusing a malformed
        # endpoint) means no link; zmq's error type stays inside the transport package.
        except Exception as e:
            raise StartupRefused(
                f"cannot open the learner link (--learner {args.learner!r}, weights "
                f"{weights!r}): {type(e).__name__}: {e}"
            ) from e
    try:
        actor = Actor(
            agent,
            engine,
            env_id,
            actor_id=args.actor_id,
            rate_hz=args.rate_hz,
            link=link,
            seed=args.seed,
            overrun_limit=args.overrun_limit,
            safe_action=safe,
            status_interval_s=args.status_interval_s,
            float32_fallback=fallback,
            precision_states=states,
        )
    except BaseException as e:
        if link is not None:
            link.close()  # nothing was submitted: no flush to wait for
        if isinstance(e, ValueError):
            raise StartupRefused(str(e)) from e
        raise
    return actor, link


def run_actor(args: argparse.Namespace, actor: Any, link: Any) -> int:
    """Run the control loop, then flush the link and print the final status line; the
    link is flushed and the actor closed whether the loop ends or fails (exit status 1,
    logged with the traceback: transitions executed before a failure are still data)."""
    from idql_runtime.signals import stop_on_signals

    log = logging.getLogger("idql-actor")

    def _stop(_signum: int) -> None:
        actor.stop_requested = True

    failure = ""
    link_closed = False
    # the caller's handlers come back when the block ends (idql_runtime.signals)
    with stop_on_signals(_stop, process="idql-actor", what="stopping the loop, flushing"):
        try:
            try:
                report = actor.run(episodes=args.episodes, max_seconds=args.max_seconds)
            except Exception as e:
                log.exception("the control loop failed; flushing the link and stopping")
                failure = f"{type(e).__name__}: {e}"
                if e.__cause__ is not None:  # DecisionEngineFailed chains the engine's error
                    failure += f" (from {type(e.__cause__).__name__}: {e.__cause__})"
                report = actor.report
                report.stop_reason = f"failed: {failure}"
            flushed = link.close(flush_timeout_s=args.flush_timeout_s) if link else True
            link_closed = True
            final = {
                "actor_final": {
                    **actor.status(),
                    "stop_reason": report.stop_reason,
                    "returns": [round(r, 2) for r in report.returns],
                    "policy_versions": report.policy_versions,
                    "weight_swaps": report.weight_swaps,
                    "weights_refused": report.weights_refused,
                    "precision_fallback_version": report.precision_fallback_version,
                    "precision_return_version": report.precision_return_version,
                    "precision_events": report.precision_events,
                    "flushed": flushed,
                    "engine": actor.engine.name,
                    "dtype": actor.engine.describe()["dtype"],
                    "bf16": actor.engine.info.get("bf16"),  # "native" / "emulated" / None
                    "precision_check": actor.engine.info.get("precision_check"),
                }
            }
            if link:
                final["actor_final"]["link_final"] = link.stats()
            print(json.dumps(final, default=float), flush=True)
        finally:
            if link is not None and not link_closed:  # interrupted before or in the flush
                link.close()
            actor.close()
    if failure:
        print(f"idql-actor: the control loop failed: {failure}", file=sys.stderr)
        return 1
    return 0 if not report.stop_reason.startswith("overrun_limit") else 3


def _parse_safe_action(text: str | None) -> np.ndarray | None:
    """--safe-action "a,b,c" as an array (its length and range the Actor checks)."""
    if not text:
        return None
    try:
        return np.array([float(x) for x in text.split(",")], np.float32)
    except ValueError:
        raise ValueError(
            f"--safe-action must be comma-separated numbers, one per action dimension, got {text!r}"
        ) from None


def _next_port(endpoint: str) -> str:
    head, _, port = endpoint.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"cannot derive the weights endpoint from {endpoint!r}; pass --weights")
    return f"{head}:{int(port) + 1}"


def _curve(directory: str | None, role: str) -> Any:
    if not directory:
        return None
    from idql_runtime.transport import curve_from_dir

    return curve_from_dir(directory, role)


if __name__ == "__main__":
    raise SystemExit(main())
