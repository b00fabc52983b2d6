"""``idql-learner``: offline pretraining (``--dataset``) or online finetuning (``--pretrained``).

A thin process: it parses arguments, builds library objects and runs their loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from idql_runtime.config import (
    Config,
    ConfigError,
    describe_fields,
    load_config,
    parse_overrides,
    resume_config,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idql-learner",
        description="Pretrain IDQL offline on a dataset, or finetune a pretrained checkpoint "
        "online from actors' transitions. Config fields: --help-config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("offline pretraining")
    src.add_argument("--dataset", help="replay store, D4RL hdf5, Minari dir, DP zarr or npz")
    on = p.add_argument_group("online finetuning")
    on.add_argument("--pretrained", help="checkpoint (dir) to finetune")
    on.add_argument("--replay", help="online replay store (created if missing)")
    on.add_argument("--offline", help="offline dataset mixed into every batch")
    on.add_argument(
        "--bind-ingest",
        default="tcp://127.0.0.1:5555",
        help="ROUTER endpoint actors send transitions to",
    )
    on.add_argument(
        "--bind-weights",
        default="tcp://127.0.0.1:5556",
        help="PUB endpoint weights are broadcast on",
    )
    on.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback bind without CURVE keys"
    )
    on.add_argument(
        "--curve-dir", help="directory with server.key_secret and authorized client keys"
    )
    on.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="stop after this many seconds (0 = run until SIGINT/SIGTERM)",
    )
    on.add_argument(
        "--heartbeat-liveness-s",
        type=float,
        default=3.0,
        help="an actor silent this long is declared dead; its open episode is then "
        "recorded as truncated (the replay commit record's truncated_episodes)",
    )
    on.add_argument(
        "--status-interval-s",
        type=float,
        default=5.0,
        help="seconds between the JSON status lines on stdout",
    )
    p.add_argument(
        "--config",
        help="YAML config (configs/*.yaml); offline only: --pretrained runs on the "
        "checkpoint's config, changed with --set",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.iterations=1000",
    )
    p.add_argument("--run-dir", default="runs/learner", help="checkpoints, logs, TensorBoard")
    p.add_argument(
        "--resume",
        action="store_true",
        help="offline only: continue from the run's newest checkpoint, on its config (or "
        "--config's) with --set on top, e.g. --set train.iterations=N to extend it "
        "(--pretrained always resumes from --run-dir's newest checkpoint when it has one)",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this process's CPU priority by this much (0-19) so that actors on the "
        "same machine keep their control rate; 0 = unchanged",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.help_config:
        print(describe_fields())
        return 0
    if not 0 <= args.nice <= 19:
        print(f"idql-learner: --nice must be in 0..19, got {args.nice}", file=sys.stderr)
        return 2
    if args.nice:
        # A learner sharing cores with actors must lose to them, not tie: at equal
        # priority on 2 cores the demo's actors missed 31-46 % of their decision
        # deadlines, niced 3-7 % (docs/decisions.md).
        niceness = os.nice(args.nice)
        logging.getLogger("idql-learner").info("CPU priority lowered: nice %d", niceness)
    refused = _refuse_combination(args)
    if refused:
        print(f"idql-learner: {refused}", file=sys.stderr)
        return 2
    if args.pretrained:
        return _run_online(args)
    return _run_offline(args)


def _refuse_combination(args: argparse.Namespace) -> str | None:
    """Why these arguments cannot go together, or None: a flag the chosen mode would
    ignore is refused, not dropped."""
    if args.pretrained:
        if args.config:
            # The checkpoint's config is the one its weights were built with; a YAML
            # file (the shipped ones set network.* too) could contradict them, and the
            # merged config would be written into every online checkpoint.
            return (
                f"--config {args.config} applies to offline pretraining only; with "
                "--pretrained the config is the checkpoint's: change its fields with "
                "--set section.field=value"
            )
        if args.dataset:
            # the online learner trains on offline rows only when told to mix them in
            return (
                f"--dataset {args.dataset} is for offline pretraining; with --pretrained, "
                "pass offline rows to mix into every batch as --offline"
            )
        return None
    if not args.dataset:
        return "give --dataset PATH (offline) or --pretrained CKPT (online)"
    for flag in ("replay", "offline"):
        if getattr(args, flag):
            return (
                f"--{flag} is for online finetuning (--pretrained); offline pretraining "
                "reads --dataset only"
            )
    return None


def _run_offline(args: argparse.Namespace) -> int:
    from idql_runtime.checkpoint import CheckpointError
    from idql_runtime.datasets import open_dataset
    from idql_runtime.signals import stop_on_signals
    from idql_runtime.trainer import OfflineTrainer, TrainingDiverged

    try:
        cfg = _offline_config(args)
    except ConfigError as e:
        print(f"idql-learner: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # --resume on a run dir whose checkpoints are all bad
        print(f"idql-learner: --resume: {e}", file=sys.stderr)
        return 2
    try:
        store = open_dataset(args.dataset)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # unreadable
        print(f"idql-learner: --dataset {args.dataset}: {e}", file=sys.stderr)
        return 2
    try:
        trainer = OfflineTrainer(
            cfg, store, Path(args.run_dir), device=args.device, progress=not args.no_progress
        )
    except ValueError as e:  # too few rows, an evaluation env that cannot evaluate
        print(f"idql-learner: {e}", file=sys.stderr)
        return 2
    if args.resume and trainer.resume():
        print(f"resumed at iteration {trainer.iteration}", file=sys.stderr)

    def _stop(_signum: int) -> None:
        # finish the iteration, checkpoint it, return: a cluster's preemption SIGTERM
        # (or Ctrl-C) used to lose everything since the last checkpoint_interval
        trainer.stop_requested = True

    with stop_on_signals(
        _stop, process="idql-learner", what="stopping after this iteration, with a checkpoint"
    ) as received:
        try:
            result = trainer.run()
        except TrainingDiverged as e:
            print(f"idql-learner: training diverged: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # a second Ctrl-C: stopped now, no new checkpoint
            print(
                f"idql-learner: interrupted at iteration {trainer.iteration}; the newest "
                f"checkpoint in {trainer.run_dir / 'checkpoints'} is where --resume goes on",
                file=sys.stderr,
            )
            return 128 + signal.SIGINT
    ckpt = trainer.run_dir / "checkpoints"
    if result["stopped_early"]:
        name = signal.Signals(received[0]).name
        print(
            f"idql-learner: stopped by {name} at iteration {result['iteration']} of "
            f"{cfg.train.iterations}, checkpointed in {ckpt}; continue with --resume",
            file=sys.stderr,
        )
        return 128 + received[0]  # the shell's code for "ended by this signal"
    print(f"done: {result['iteration']} iterations; checkpoints in {ckpt}")
    return 0


def _offline_config(args: argparse.Namespace) -> Config:
    """The offline run's config. With --resume and a checkpoint in --run-dir: the
    checkpoint's (or --config's, when given again) with --set on top, refused where it
    changes what the checkpoint was trained with (config.FIXED_BY_CHECKPOINT)."""
    from idql_runtime.checkpoint import list_checkpoints, load_checkpoint

    overrides = parse_overrides(args.set)
    root = Path(args.run_dir) / "checkpoints"
    if args.resume and list_checkpoints(root):
        saved = load_checkpoint(root, with_train_state=False).config
        return resume_config(saved, args.config, overrides)
    return load_config(args.config, overrides)


def _run_online(args: argparse.Namespace) -> int:
    from idql_runtime.checkpoint import CheckpointError
    from idql_runtime.online import LearnerStartupError, run_started_learner, start_online_learner
    from idql_runtime.replay import StoreLockedError, is_replay_store
    from idql_runtime.transport import InsecureBindError, InsecureKeyFileError

    if args.replay and Path(args.replay).exists() and not is_replay_store(args.replay):
        # Otherwise the store's create() refuses it with a hint meant for library callers
        # (exist_ok=True), after the checkpoint has been loaded.
        print(
            f"idql-learner: --replay {args.replay} exists but is not an idql replay store; "
            "give the store of an earlier run or a new path",
            file=sys.stderr,
        )
        return 2
    try:
        learner = start_online_learner(args)
    except ConfigError as e:
        print(f"idql-learner: config error: {e}", file=sys.stderr)
        return 2
    except (
        InsecureBindError,
        InsecureKeyFileError,
        CheckpointError,
        StoreLockedError,
        FileNotFoundError,
        LearnerStartupError,
    ) as e:  # refused at start-up: say why, no traceback
        print(f"idql-learner: {e}", file=sys.stderr)
        return 2
    # Only start-up is caught above: a CheckpointError or FileNotFoundError of the
    # running loop is a failure of the run (exit 1, traceback), not a refusal.
    return run_started_learner(learner, args)


if __name__ == "__main__":
    raise SystemExit(main())
