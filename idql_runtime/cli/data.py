"""``idql-data info PATH``: episodes, rows, return statistics, schema and provenance of a
dataset in any supported format (imported into a cache store first if needed)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from idql_runtime.collect import iter_returns
from idql_runtime.datasets import detect_format, open_dataset
from idql_runtime.replay import ReplayStore


def dataset_info(store: ReplayStore) -> dict[str, Any]:
    """A JSON-serialisable summary of a store."""
    ends = store.episode_ends()
    returns = np.array(list(iter_returns(store)), dtype=np.float64)
    lengths = np.diff(np.concatenate([[0], ends])) if len(ends) else np.empty(0)
    info: dict[str, Any] = {
        "path": str(store.path),
        "rows": len(store),
        "episodes": int(len(ends)),
        "rows_in_open_episode": int(len(store) - (ends[-1] if len(ends) else 0)),
        "obs_dim": store.obs_dim,
        "act_dim": store.act_dim,
    }
    if len(returns):
        info["returns"] = {
            "mean": float(returns.mean()),
            "std": float(returns.std()),
            "min": float(returns.min()),
            "max": float(returns.max()),
        }
        info["episode_length"] = {
            "mean": float(lengths.mean()),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
        }
        attrs = store.attrs
        lo, hi = attrs.get("ref_min_score"), attrs.get("ref_max_score")
        if lo is not None and hi is not None and hi != lo:
            info["normalized_return_mean"] = float(100.0 * (returns.mean() - lo) / (hi - lo))
    flags = {"terminated": 0, "truncated": 0}
    prov: dict[str, Any] = {}
    actors: set[int] = set()
    pv_min, pv_max = None, None
    for _first, cols in store.iter_blocks(
        keys=["terminated", "truncated", "actor_id", "policy_version"]
    ):
        flags["terminated"] += int(cols["terminated"].sum())
        flags["truncated"] += int(cols["truncated"].sum())
        actors.update(np.unique(cols["actor_id"]).tolist())
        pv = cols["policy_version"]
        pv_min = int(pv.min()) if pv_min is None else min(pv_min, int(pv.min()))
        pv_max = int(pv.max()) if pv_max is None else max(pv_max, int(pv.max()))
    prov["actor_ids"] = sorted(actors)[:64]
    prov["num_actors"] = len(actors)
    prov["policy_version_range"] = [pv_min, pv_max]
    info["flags"] = flags
    info["provenance"] = prov
    info["schema"] = store.schema()
    info["attrs"] = store.attrs
    return info


def _print_text(info: dict[str, Any], fmt: str) -> None:
    print(f"{info['path']}  (source format: {fmt})")
    print(
        f"  rows {info['rows']}, episodes {info['episodes']}, rows in open episode {info['rows_in_open_episode']}"
    )
    print(f"  obs_dim {info['obs_dim']}, act_dim {info['act_dim']}")
    if "returns" in info:
        r = info["returns"]
        print(
            f"  episode return mean {r['mean']:.2f} std {r['std']:.2f} min {r['min']:.2f} max {r['max']:.2f}"
        )
        if "normalized_return_mean" in info:
            print(f"  normalized return mean {info['normalized_return_mean']:.1f}")
    print(
        f"  terminated rows {info['flags']['terminated']}, truncated rows {info['flags']['truncated']}"
    )
    p = info["provenance"]
    print(
        f"  actors {p['num_actors']} {p['actor_ids']}, policy versions {p['policy_version_range']}"
    )
    print("  schema:")
    for key, s in info["schema"].items():
        print(
            f"    {key:22s} {s['dtype']:8s} shape {tuple(s['shape'])} chunks {tuple(s['chunks'])}"
        )
    print("  attrs:")
    for k, v in info["attrs"].items():
        text = json.dumps(v)
        print(f"    {k}: {text if len(text) < 200 else text[:197] + '...'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="idql-data", description="Inspect replay stores and datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info_p = sub.add_parser("info", help="episodes, rows, return statistics, schema, provenance")
    info_p.add_argument(
        "path", help="replay store, D4RL hdf5, Minari dir/id, Diffusion Policy zarr or npz"
    )
    info_p.add_argument("--json", action="store_true", help="machine-readable output")
    info_p.add_argument("--cache-dir", default=None, help="where imports of other formats go")
    args = parser.parse_args(argv)
    try:
        fmt = detect_format(args.path)
        store = open_dataset(args.path, cache_dir=args.cache_dir)
    except (ValueError, OSError) as e:
        print(f"idql-data: {e}", file=sys.stderr)
        return 2
    with store:
        info = dataset_info(store)
    info["format"] = fmt
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_text(info, fmt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
