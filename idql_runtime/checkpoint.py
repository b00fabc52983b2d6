"""Checkpoints: safetensors weights + JSON metadata, written atomically, content-hashed.

Layout of one checkpoint directory ``ckpt_<iteration:09d>/``:
    weights.safetensors      every network (online and EMA/target), float tensors
    train_state.safetensors  optimiser moments and RNG byte states (for exact resume)
    meta.json                config, spaces, reward transform, versions, iteration,
                             optimiser scalars, numpy RNG states, sha256 of both files
The directory is assembled under a temporary name, fsync'd and renamed into place, so a
crash never leaves a half checkpoint under a final name (reliability.md #11); loaders
take the newest directory whose files match the hashes in meta.json. Nothing is ever
unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import idql_runtime
from idql_runtime.config import Config, config_from_dict

FORMAT_VERSION = 1
_PREFIX = "ckpt_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its hash."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def versions() -> dict[str, str]:
    return {
        "idql_runtime": idql_runtime.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "format": str(FORMAT_VERSION),
    }


def _flatten_optimiser(
    name: str, sd: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into tensors (safetensors) and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd.get("param_groups"), "state": {}}
    for pid, st in sd.get("state", {}).items():
        scalars["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars["state"][str(pid)][k] = v
    return tensors, scalars


def _unflatten_optimiser(
    name: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(p): dict(v) for p, v in scalars["state"].items()}
    prefix = name + "."
    for key, t in tensors.items():
        if key.startswith(prefix):
            pid, k = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[k] = t
    return {"state": state, "param_groups": scalars["param_groups"]}


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights, training state and metadata."""

    path: Path
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    train_tensors: dict[str, torch.Tensor]

    @property
    def config(self) -> Config:
        return config_from_dict(self.meta["config"])

    @property
    def iteration(self) -> int:
        return int(self.meta["iteration"])


def save_checkpoint(
    root: str | os.PathLike[str],
    iteration: int,
    agent: Any,
    *,
    meta: dict[str, Any],
    train_tensors: dict[str, torch.Tensor] | None = None,
    train_json: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write ``root/ckpt_<iteration>`` atomically; prune to the newest ``keep``.

    ``agent`` is an ``idql_runtime.agent.Agent``; ``meta`` holds spaces, reward transform,
    env id and anything the caller wants to keep (JSON-serialisable).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{iteration:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in agent.state_dict().items()}
        save_file(weights, str(tmp / "weights.safetensors"))
        tensors: dict[str, torch.Tensor] = dict(train_tensors or {})
        opt_json: dict[str, Any] = {}
        for name, opt in agent.optimisers().items():
            sd = opt.state_dict()
            if isinstance(opt, torch.optim.Optimizer):
                t, s = _flatten_optimiser(f"opt.{name}", sd)
                tensors.update(t)
                opt_json[name] = s
            else:  # LR scheduler: plain numbers
                opt_json[name] = {k: v for k, v in sd.items() if k != "lr_lambdas"}
        save_file(tensors, str(tmp / "train_state.safetensors"))
        full_meta = {
            **meta,
            "format": FORMAT_VERSION,
            "iteration": int(iteration),
            "config": agent.cfg.to_dict(),
            "obs_dim": agent.obs_dim,
            "act_dim": agent.act_dim,
            "versions": versions(),
            "optimisers": opt_json,
            "train_json": train_json or {},
            "sha256": {
                "weights.safetensors": sha256_file(tmp / "weights.safetensors"),
                "train_state.safetensors": sha256_file(tmp / "train_state.safetensors"),
            },
            "created_unix_s": time.time(),
        }
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, sort_keys=True))
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        old = None
        if final.exists():  # same iteration saved twice: move the old one aside first, so
            # a crash in between leaves either it or the new one under a loadable name
            old = _aside(final)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_path(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _verified[final] = _signature(final)  # just written and hashed: valid
    prune(root, keep)
    return final


# checkpoint dir -> the (name, size, mtime) of its files when it last passed ``verify``:
# prune re-hashes a checkpoint only when its files changed (load_checkpoint always does)
_verified: dict[Path, tuple[tuple[str, int, int], ...]] = {}


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    stats = ((f.name, f.stat()) for f in sorted(path.iterdir()) if f.is_file())
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def _valid(path: Path) -> bool:
    try:
        sig = _signature(path)
        if _verified.get(path) != sig:
            verify(path)
            _verified[path] = sig
        return True
    except (CheckpointError, OSError, ValueError):
        _verified.pop(path, None)
        return False


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` valid checkpoints (and stale temp dirs).

    Only checkpoints that pass ``verify`` count towards ``keep``: corrupt ones newer than
    the oldest kept are left alone (``load_checkpoint`` skips them), and never make a
    valid one be deleted. A learner restarted from ``--pretrained`` next to corrupt
    checkpoints of higher iteration writes ``ckpt_`` names that sort below them; counting
    the corrupt ones would delete each new checkpoint as soon as it was written.
    """
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        if stale.is_dir() and not _owned_by_live_writer(stale):
            shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    complete = [p for p in list_checkpoints(root) if (p / "meta.json").exists()]
    kept = 0
    doomed: list[Path] = []
    for cand in reversed(complete):  # newest first
        if kept >= keep:
            doomed.append(cand)
        elif _valid(cand):
            kept += 1
    for old in doomed:
        _verified.pop(old, None)
        # Out of the checkpoint names first, then deleted: a process killed inside the
        # delete leaves a .old-* directory (removed by a later prune), never a half-deleted
        # ckpt_* that nothing prunes because it is no longer complete.
        trash = _aside(old)
        try:
            os.rename(old, trash)
        except FileNotFoundError:  # pruned meanwhile by another process
            continue
        shutil.rmtree(trash, ignore_errors=True)


def _aside(path: Path) -> Path:
    """A name beside ``path`` for moving it out of the way; ``prune`` removes it unless
    the process named in it is alive."""
    return path.parent / f".old-{path.name}-{os.getpid()}-{time.monotonic_ns()}"


def _owned_by_live_writer(tmp: Path) -> bool:
    try:
        pid = int(tmp.name.split("-")[-2])
    except (IndexError, ValueError):
        return False
    return pid != os.getpid() and Path(f"/proc/{pid}").exists()


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """``root`` itself if it is a checkpoint; else its ``ckpt_*`` directories, oldest
    first; else, for a run directory as the learners lay it out
    (``<run-dir>/checkpoints/ckpt_*``), those of its ``checkpoints`` directory."""
    root = Path(root)
    if root.name.startswith(_PREFIX) and root.is_dir():
        return [root]
    found = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir())
    if not found and (root / "checkpoints").is_dir():
        # every CLI's help says "checkpoint dir or run dir": the run dir used to be
        # refused with "no checkpoint found", only <run-dir>/checkpoints was taken
        return list_checkpoints(root / "checkpoints")
    return found


def verify(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"{path}: no meta.json (incomplete checkpoint)")
    meta = json.loads(meta_path.read_text())
    for fname, digest in meta.get("sha256", {}).items():
        f = path / fname
        if not f.exists():
            raise CheckpointError(f"{path}: {fname} is missing")
        got = sha256_file(f)
        if got != digest:
            raise CheckpointError(
                f"{path}: {fname} has sha256 {got[:12]}…, meta says {digest[:12]}…"
            )
    return meta


def load_checkpoint(path: str | os.PathLike[str], *, with_train_state: bool = True) -> Checkpoint:
    """Load a checkpoint directory, or the newest valid one under a run directory.

    Incomplete or corrupt candidates are skipped (newest first); raises CheckpointError
    if none is valid.
    """
    candidates = list_checkpoints(path)
    if not candidates:
        raise CheckpointError(
            f"no checkpoint found at {path} (looked for {_PREFIX}* directories in it and "
            "in its checkpoints/)"
        )
    errors = []
    for cand in reversed(candidates):
        try:
            meta = verify(cand)
        except (CheckpointError, json.JSONDecodeError) as e:
            errors.append(str(e))
            continue
        try:
            weights = load_file(str(cand / "weights.safetensors"))
            train = load_file(str(cand / "train_state.safetensors")) if with_train_state else {}
        except Exception as e:  # not safetensors (e.g. a pickle): skipped, never unpickled
            errors.append(f"{cand}: unreadable weights ({type(e).__name__}: {e})")
            continue
        return Checkpoint(cand, meta, weights, train)
    raise CheckpointError(f"no valid checkpoint at {path}: " + "; ".join(errors))


def restore_agent(
    ckpt: Checkpoint, device: str | torch.device = "cpu", *, optimisers: bool = True
) -> Any:
    """Rebuild the Agent of a checkpoint (weights, and optimiser state for resuming)."""
    from idql_runtime.agent import Agent

    agent = Agent(ckpt.config, ckpt.meta["obs_dim"], ckpt.meta["act_dim"], device=device)
    agent.load_state_dict(ckpt.weights)
    if optimisers and ckpt.train_tensors:
        for name, opt in agent.optimisers().items():
            saved = ckpt.meta["optimisers"][name]
            if isinstance(opt, torch.optim.Optimizer):
                sd = _unflatten_optimiser(f"opt.{name}", ckpt.train_tensors, saved)
                opt.load_state_dict(sd)
            else:
                opt.load_state_dict({**opt.state_dict(), **saved})
    return agent
