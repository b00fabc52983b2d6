"""``idql-eval``: evaluate a checkpoint in a gymnasium env; JSON to stdout, PNG of returns,
optional rollout video (headless: MUJOCO_GL=egl or osmesa). SIGINT / SIGTERM ends the
run at the next step and still reports the completed episodes ("interrupted": true,
exit 128 + the signal); a second one stops at once."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idql-eval",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir (newest valid)")
    p.add_argument("--env", help="gymnasium env id (default: the checkpoint's)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to run")
    p.add_argument("--samples", type=int, help="N candidates per decision (default: config)")
    p.add_argument("--mode", choices=["argmax", "implicit"], help="extraction (default: config)")
    p.add_argument("--seed", type=int, default=0, help="env and sampling seed")
    p.add_argument("--out", default="eval_out", help="directory for returns.png / video")
    p.add_argument("--video", action="store_true", help="record the first episode to video.mp4")
    p.add_argument("--device", default="cpu", help="torch device")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # --episodes 0 printed NaN means (not JSON); --samples 0 silently used the config's N
    if args.episodes < 1:
        print(f"idql-eval: --episodes must be >= 1, got {args.episodes}", file=sys.stderr)
        return 2
    if args.samples is not None and args.samples < 1:
        print(f"idql-eval: --samples must be >= 1, got {args.samples}", file=sys.stderr)
        return 2
    if args.video:
        os.environ.setdefault("MUJOCO_GL", "egl")
    from idql_runtime.checkpoint import CheckpointError, load_checkpoint, restore_agent
    from idql_runtime.envs import check_env_id_fits, reference_scores
    from idql_runtime.evaluation import Policy, evaluate, plot_returns
    from idql_runtime.signals import stop_on_signals

    try:
        ckpt = load_checkpoint(args.checkpoint, with_train_state=False)
    except CheckpointError as e:
        print(f"idql-eval: {e}", file=sys.stderr)
        return 2
    agent = restore_agent(ckpt, args.device, optimisers=False)
    env_id = args.env or ckpt.meta.get("env_id")
    if not env_id:
        print("idql-eval: the checkpoint names no env; pass --env", file=sys.stderr)
        return 2
    try:  # an unknown id, or another task's env: refused before any episode runs
        check_env_id_fits(env_id, agent.obs_dim, agent.act_dim)
    except ValueError as e:
        print(f"idql-eval: --env: {e}", file=sys.stderr)
        return 2
    ref = (
        tuple(ckpt.meta["ref_scores"]) if ckpt.meta.get("ref_scores") else reference_scores(env_id)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = Policy(agent, samples=args.samples, mode=args.mode, seed=args.seed)
    video = out / "video.mp4" if args.video else None
    stop: list[int] = []
    with stop_on_signals(
        stop.append, process="idql-eval", what="reporting the episodes completed so far"
    ):
        res = evaluate(
            policy,
            env_id,
            args.episodes,
            seed=args.seed,
            ref=ref,
            video_path=video,
            should_stop=lambda: bool(stop),
            on_episode=lambda i, ret, n: print(
                f"episode {i + 1}/{args.episodes}: return {ret:.1f}, {n} steps",
                file=sys.stderr,
                flush=True,
            ),
        )
    summary = res.summary()
    summary.update(
        checkpoint=str(ckpt.path),
        iteration=ckpt.iteration,
        env_id=env_id,
        samples=policy.samples,
        mode=args.mode or agent.cfg.policy.mode,
        returns_png=str(out / "returns.png") if res.returns else None,
        video=str(video) if video else None,
    )
    if res.returns:
        plot_returns(res.returns, out / "returns.png", title=f"{env_id} @ it {ckpt.iteration}")
    print(json.dumps(summary))
    if stop:  # the shell's code for "ended by this signal", after the partial report
        print(
            f"idql-eval: stopped by {signal.Signals(stop[0]).name} after {len(res.returns)} "
            f"of {args.episodes} episodes",
            file=sys.stderr,
        )
        return 128 + stop[0]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
