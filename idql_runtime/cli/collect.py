"""``idql-collect``: build D4RL-recipe datasets on a gymnasium MuJoCo v5 task.

    idql-collect --env Hopper-v5 --out data --size 1000000 --seed 0 \
        [--datasets random,medium,medium-replay,expert,medium-expert] [--ars-iters K]

Every flag is a field of ``CollectConfig`` (its help is the field's); a rerun with the
same flags skips the stages whose outputs exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from idql_runtime.collect import CollectConfig, make_env, run_collect


def _arg_type(tp: typing.Any) -> typing.Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idql-collect",
        description="Train ARS behaviour policies and write D4RL-recipe replay stores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(CollectConfig)
    for f in dataclasses.fields(CollectConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_arg_type(hints[f.name]),
            default=f.default,
            help=f.metadata.get("help", ""),
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = CollectConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(CollectConfig)}
    )
    try:
        cfg.validate()
        make_env(cfg.env).close()  # an unknown id or a discrete task: refused before any work
    except ValueError as e:
        print(f"idql-collect: {e}", file=sys.stderr)
        return 2
    summary = run_collect(cfg, progress=not args.quiet)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
