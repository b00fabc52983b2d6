"""Training batches drawn on the device (idql_runtime/batches.py), here with the CPU as
the device: the resident rows equal host batches bit for bit, draws are uniform over the
training rows only, a batch can be gathered into given tensors, and a trainer on device
batches resumes exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import idql_runtime.batches as batches
from idql_runtime.batches import DeviceBatches, prepare_batch, resident_bytes, resolve_batch_source
from idql_runtime.config import ConfigError, load_config
from idql_runtime.replay import ReplaySampler, ReplayStore
from idql_runtime.trainer import OfflineTrainer, fit_reward_transform
from tests.conftest import TINY


@pytest.fixture()
def split(hopper_store_path: Path):
    store = ReplayStore.open(hopper_store_path)
    train, val = ReplaySampler(store, seed=0).split(0.9, seed=3)
    transform = fit_reward_transform(store, "locomotion")
    yield store, train, val, transform
    store.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resident_rows_equal_host_batches_across_chunks(split, monkeypatch, device) -> None:
    """Rows go through prepare_batch in chunks (7 rows here, so several) in the sampler's
    own order: row i on the device is the host batch of position i, bit for bit."""
    store, train, _, transform = split
    monkeypatch.setattr(batches, "_CHUNK_ROWS", 7)
    gen = torch.Generator(device=device).manual_seed(0)
    db = DeviceBatches(train, transform, 0.9, device, gen)
    assert db.rows == len(train) and db.rows > 3 * 7
    host = prepare_batch(train.take(np.arange(len(train))), transform, 0.9)
    for k in batches.BATCH_FIELDS:
        assert db.data[k].device.type == device, k
        assert db.data[k].dtype == host[k].dtype, k
        assert torch.equal(db.data[k].cpu(), host[k]), k
    assert db.data["action"].abs().max() <= 0.9  # the clip was applied
    assert db.nbytes == resident_bytes(db.rows, store.obs_dim, store.act_dim)


def test_draws_are_uniform_over_training_rows_and_gather_into_given_tensors(split) -> None:
    store, train, val, transform = split
    gen = torch.Generator().manual_seed(1)
    db = DeviceBatches(train, transform, 1.0, "cpu", gen)
    # Position i of the sampler holds its row indices[i]: every drawn row is a training row.
    g2 = torch.Generator().manual_seed(1)
    idx = torch.randint(0, db.rows, (4096,), generator=g2)
    b = db.sample(4096)
    assert torch.equal(b["obs"], db.data["obs"][idx])
    val_obs = {tuple(r) for r in val.take(np.arange(len(val)))["obs"].tolist()}
    assert not any(tuple(r) in val_obs for r in b["obs"].tolist())
    # Uniform: Pearson chi-square of 200 000 draws over the rows, against the 1e-6 tail of
    # chi-square with rows - 1 degrees of freedom (Wilson-Hilferty), so a biased draw
    # (e.g. one that never reaches the last rows) fails.
    counts = np.bincount(db.draw_indices(200_000).numpy(), minlength=db.rows)
    expected = 200_000 / db.rows
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    k = db.rows - 1
    z = 4.753  # one-sided 1e-6 normal quantile
    limit = k * (1 - 2 / (9 * k) + z * np.sqrt(2 / (9 * k))) ** 3
    assert counts.min() > 0 and chi2 < limit, (chi2, limit)
    # Gathered into the given tensors (a captured learner step's static inputs).
    out = {k: torch.empty_like(v[:64]) for k, v in db.data.items()}
    got = db.sample(64, out=out)
    assert got is out and all(got[k].data_ptr() == out[k].data_ptr() for k in out)
    assert out["terminated"].dtype == torch.bool
    with pytest.raises(ValueError, match=r"out\['obs'\] has shape \(64, 11\), a batch of 32"):
        db.sample(32, out=out)  # never resized behind a captured graph's back


def test_batch_source_resolution_and_bad_values() -> None:
    cpu = torch.device("cpu")
    assert resolve_batch_source("auto", cpu, 10)[0] == "host"
    assert resolve_batch_source("device", cpu, 10)[0] == "device"
    assert resolve_batch_source("host", cpu, 10)[0] == "host"
    with pytest.raises(ValueError, match="'gpu'"):
        resolve_batch_source("gpu", cpu, 10)
    with pytest.raises(ConfigError, match="train.batch_source.*'ram'"):
        load_config(overrides={"train.batch_source": "ram"})
    with pytest.raises(IndexError, match="outside this sampler's 5 rows"):
        ReplaySampler.take(type("S", (), {"__len__": lambda self: 5})(), np.array([5]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generator is on cpu"):
        DeviceBatches(None, None, 1.0, "meta", torch.Generator())  # type: ignore[arg-type]


def _trainer(store_path: Path, run_dir: Path, source: str) -> OfflineTrainer:
    cfg = load_config(
        overrides={
            **TINY,
            "train.checkpoint_interval": 1000,
            "train.log_interval": 1000,
            "train.lr_decay_steps": 400,
            "train.batch_source": source,
        }
    )
    return OfflineTrainer(
        cfg, ReplayStore.open(store_path), run_dir, progress=False, tensorboard=False
    )


def test_trainer_on_device_batches_resumes_exactly(hopper_store_path: Path, tmp_path: Path):
    """train.batch_source=device: 12 iterations, save, then 10 more straight on and 10
    after --resume give the same losses bit for bit (the device generator's state is in the
    checkpoint); and the batches are a different stream from the host sampler's."""
    a = _trainer(hopper_store_path, tmp_path / "a", "device")
    assert a.batch_source == "device"
    for _ in range(12):
        a.step()
    assert a.device_batches is not None and a.device_batches.rows == len(a.train_sampler)
    a.save()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    straight = [a.step() for _ in range(10)]
    b = _trainer(hopper_store_path, tmp_path / "b", "device")
    assert b.resume() and b.iteration == 12
    resumed = [b.step() for _ in range(10)]
    for x, y in zip(straight, resumed, strict=True):
        for k in ("actor_loss", "v_loss", "q_loss"):
            assert x[k] == y[k], (k, x[k], y[k])

    host = _trainer(hopper_store_path, tmp_path / "h", "auto")
    assert host.batch_source == "host"  # auto on a CPU
    dev = _trainer(hopper_store_path, tmp_path / "d", "device")
    assert [host.step()["q_loss"] for _ in range(3)] != [dev.step()["q_loss"] for _ in range(3)]


def test_auto_falls_back_to_host_batches_when_the_rows_do_not_fit(
    hopper_store_path: Path, tmp_path: Path, monkeypatch
) -> None:
    """auto chose device batches (as on a GPU) but the copy runs out of memory: the run
    goes on with host batches; an explicit train.batch_source=device raises instead."""
    import idql_runtime.trainer as trainer_mod

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer_mod, "DeviceBatches", no_room)
    auto = _trainer(hopper_store_path, tmp_path / "auto", "auto")
    auto.batch_source = "device"  # what auto resolves to on a GPU with room to spare
    m = auto.step()
    assert auto.batch_source == "host" and auto.device_batches is None
    assert np.isfinite(m["q_loss"])
    forced = _trainer(hopper_store_path, tmp_path / "forced", "device")
    with pytest.raises(torch.OutOfMemoryError):
        forced.step()
