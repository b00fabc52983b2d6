"""Checkpoints: safetensors + JSON, atomic, hashed, newest valid one loaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from idql_runtime.agent import Agent
from idql_runtime.checkpoint import CheckpointError, load_checkpoint, restore_agent, save_checkpoint
from idql_runtime.config import load_config

SMALL = {
    "network.hidden_dim": 32,
    "network.num_blocks": 1,
    "network.time_dim": 8,
    "network.cond_hidden": [16, 16],
    "critic.hidden": [32, 32],
}


def _agent(seed: int = 0) -> Agent:
    torch.manual_seed(seed)
    return Agent(load_config(overrides=SMALL), obs_dim=5, act_dim=2)


def test_round_trip_restores_weights_and_optimiser(tmp_path: Path) -> None:
    a = _agent()
    batch = {
        "obs": torch.randn(8, 5),
        "action": torch.rand(8, 2) * 2 - 1,
        "reward": torch.randn(8),
        "next_obs": torch.randn(8, 5),
        "terminated": torch.zeros(8, dtype=torch.bool),
    }
    a.update(batch)
    path = save_checkpoint(tmp_path, 1, a, meta={"env_id": "Hopper-v5"})
    assert (path / "meta.json").exists() and path.name == "ckpt_000000001"
    ck = load_checkpoint(tmp_path)
    b = restore_agent(ck)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    sa, sb = a.actor_opt.state_dict(), b.actor_opt.state_dict()
    assert torch.equal(sa["state"][0]["exp_avg"], sb["state"][0]["exp_avg"])
    assert b.actor_sched.last_epoch == a.actor_sched.last_epoch
    assert ck.meta["env_id"] == "Hopper-v5" and ck.meta["versions"]["torch"] == torch.__version__


def test_corrupt_newest_falls_back_to_previous(tmp_path: Path) -> None:
    a = _agent()
    save_checkpoint(tmp_path, 1, a, meta={})
    newest = save_checkpoint(tmp_path, 2, a, meta={})
    with open(newest / "weights.safetensors", "r+b") as f:  # flip bytes: hash mismatch
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    assert load_checkpoint(tmp_path).iteration == 1
    (tmp_path / "ckpt_000000001" / "meta.json").unlink()  # incomplete: no meta
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_checkpoint(tmp_path)


def test_a_run_dir_is_read_through_its_checkpoints_dir(tmp_path: Path) -> None:
    """Every CLI's --checkpoint help says "checkpoint dir or run dir", and the learners
    write <run-dir>/checkpoints/ckpt_*: the run dir itself was refused."""
    a = _agent()
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, a, meta={})
    newest = save_checkpoint(tmp_path / "run" / "checkpoints", 2, a, meta={})
    assert load_checkpoint(tmp_path / "run").path == newest
    assert load_checkpoint(tmp_path / "run" / "checkpoints").path == newest
    assert load_checkpoint(newest).path == newest
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no checkpoint found at .*empty \(looked for"):
        load_checkpoint(tmp_path / "empty")


def test_half_written_temp_dir_is_ignored_and_cleaned(tmp_path: Path) -> None:
    a = _agent()
    save_checkpoint(tmp_path, 5, a, meta={})
    stale = tmp_path / ".tmp-ckpt_000000006-999999-1"  # a crashed writer's leftovers
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"partial")
    assert load_checkpoint(tmp_path).iteration == 5
    save_checkpoint(tmp_path, 7, a, meta={}, keep=2)
    assert not stale.exists()
    assert [p.name for p in sorted(tmp_path.glob("ckpt_*"))] == ["ckpt_000000005", "ckpt_000000007"]


def test_meta_is_plain_json_and_files_are_not_pickles(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 3, _agent(), meta={"note": "x"})
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"]["network"]["hidden_dim"] == 32
    for f in path.glob("*.safetensors"):
        assert not f.read_bytes().startswith(b"\x80")  # pickle protocol header
    shutil.rmtree(path)


def test_pickle_in_place_of_safetensors_is_rejected_never_unpickled(tmp_path: Path) -> None:
    """A checkpoint whose weights file is a pickle (with a consistent hash in meta.json)
    is skipped as unreadable; the payload's side effect never happens."""
    import hashlib
    import pickle  # test-only: builds the malicious payload that must be rejected

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "ckpt_000000009"
    bad.mkdir()
    blob = pickle.dumps(Payload())
    (bad / "weights.safetensors").write_bytes(blob)
    (bad / "train_state.safetensors").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    (bad / "meta.json").write_text(
        json.dumps(
            {
                "iteration": 9,
                "sha256": {"weights.safetensors": digest, "train_state.safetensors": digest},
            }
        )
    )
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
    save_checkpoint(tmp_path / "good", 1, _agent(), meta={})
    shutil.copytree(bad, tmp_path / "good" / "ckpt_000000009")
    assert load_checkpoint(tmp_path / "good").iteration == 1  # falls back past the bad one
    assert not marker.exists()


def test_resaving_an_iteration_replaces_it_atomically(tmp_path: Path) -> None:
    a = _agent()
    first = save_checkpoint(tmp_path, 4, a, meta={"n": 1})
    second = save_checkpoint(tmp_path, 4, a, meta={"n": 2})
    assert first == second and load_checkpoint(tmp_path).meta["n"] == 2
    assert not list(tmp_path.glob(".old-*")) and not list(tmp_path.glob(".tmp-*"))


def test_kill_inside_pruning_leaves_no_half_deleted_checkpoint(tmp_path: Path) -> None:
    """A process SIGKILLed while pruning an old checkpoint (the delete has begun: its
    meta.json is gone) leaves only complete ckpt_* directories, and the debris under its
    .old-* name is removed by the next save's prune. Deleting in place left a ckpt_*
    without meta.json that no prune ever removed (seen in the crash-while-checkpointing
    fault test)."""
    import signal
    import subprocess
    import sys

    a = _agent()
    for it in (1, 2, 3):
        save_checkpoint(tmp_path, it, a, meta={}, keep=10)
    script = (
        "import os, shutil, signal, sys\n"
        "from pathlib import Path\n"
        "from idql_runtime import checkpoint\n"
        "def dying_rmtree(path, *args, **kwargs):\n"
        "    (Path(path) / 'meta.json').unlink()  # the delete has begun ...\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies inside it\n"
        "shutil.rmtree = dying_rmtree\n"
        "checkpoint.prune(Path(sys.argv[1]), keep=2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in tmp_path.glob("ckpt_*"))
    assert ckpts == ["ckpt_000000002", "ckpt_000000003"]
    assert all((tmp_path / c / "meta.json").exists() for c in ckpts)
    assert len(list(tmp_path.glob(".old-*"))) == 1  # the dead process's debris
    save_checkpoint(tmp_path, 4, a, meta={}, keep=2)
    assert not list(tmp_path.glob(".old-*"))
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000000003", "ckpt_000000004"]


def _flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_prune_keeps_new_checkpoints_below_corrupt_ones_of_higher_iteration(
    tmp_path: Path,
) -> None:
    """Only checkpoints that pass verify() count towards keep. A learner restarted from
    --pretrained beside corrupt checkpoints of iterations 5000-7000 saves ckpt_000000100,
    which sorts below them: counting the corrupt ones deleted every new checkpoint as it
    was written, and the next restart lost the progress again."""
    a = _agent()
    for it in (5000, 6000, 7000):
        _flip_a_byte(save_checkpoint(tmp_path, it, a, meta={}, keep=10) / "weights.safetensors")
    save_checkpoint(tmp_path, 100, a, meta={"n": 100}, keep=3)
    save_checkpoint(tmp_path, 200, a, meta={"n": 200}, keep=3)
    names = sorted(p.name for p in tmp_path.glob("ckpt_*"))
    assert names == [f"ckpt_{i:09d}" for i in (100, 200, 5000, 6000, 7000)]
    assert load_checkpoint(tmp_path).meta["n"] == 200  # the corrupt ones are skipped
    for it in (300, 400):
        save_checkpoint(tmp_path, it, a, meta={"n": it}, keep=3)
    names = sorted(p.name for p in tmp_path.glob("ckpt_*"))  # 3 valid ones, corrupt ones aside
    assert names == [f"ckpt_{i:09d}" for i in (200, 300, 400, 5000, 6000, 7000)]


def test_prune_rehashes_a_checkpoint_whose_files_changed(tmp_path: Path) -> None:
    """prune caches a verified checkpoint by its files' sizes and mtimes; a file rewritten
    since is hashed again, so a checkpoint corrupted after it was saved stops counting."""
    a = _agent()
    save_checkpoint(tmp_path, 1, a, meta={}, keep=2)
    save_checkpoint(tmp_path, 2, a, meta={}, keep=2)
    weights = tmp_path / "ckpt_000000002" / "weights.safetensors"
    mtime_ns = weights.stat().st_mtime_ns
    _flip_a_byte(weights)
    os.utime(weights, ns=(mtime_ns + 10**9, mtime_ns + 10**9))  # a later write, whatever
    # the file system's timestamp granularity
    save_checkpoint(tmp_path, 3, a, meta={}, keep=2)  # 2 is corrupt now: 1 and 3 are kept
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == [
        "ckpt_000000001",
        "ckpt_000000002",
        "ckpt_000000003",
    ]
