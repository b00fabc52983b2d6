"""Import/export of D4RL HDF5, Minari, Diffusion Policy zarr and npz, from real rollouts."""

from __future__ import annotations

import os
import re
import time
import warnings

import gymnasium as gym
import h5py
import numpy as np
import pytest
import zarr

from idql_runtime.datasets import (
    detect_format,
    export_minari,
    export_npz,
    import_d4rl_hdf5,
    import_diffusion_policy_zarr,
    import_minari,
    import_npz,
    open_dataset,
    qlearning_transitions,
)
from idql_runtime.replay import FIELDS, ReplayStore, SchemaError, commit_record_path

MAX_STEPS = 40


@pytest.fixture(scope="module")
def episodes():
    """Hopper-v5 with uniform random actions and a 40-step limit: a mix of terminations
    (the hopper falls) and timeouts. Each episode: obs (T+1, 11), actions (T, 3), ..."""
    env = gym.make("Hopper-v5", max_episode_steps=MAX_STEPS)
    env.action_space.seed(0)
    eps = []
    for k in range(8):
        obs, _ = env.reset(seed=100 + k)
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            act = env.action_space.sample()
            obs, rew, term, trunc, _ = env.step(act)
            o.append(obs)
            a.append(act)
            r.append(rew)
            te.append(term)
            tr.append(trunc)
            if term or trunc:
                break
        eps.append(
            {
                "obs": np.array(o, np.float32),
                "actions": np.array(a, np.float32),
                "rewards": np.array(r, np.float32),
                "terminations": np.array(te, bool),
                "truncations": np.array(tr, bool),
            }
        )
    env.close()
    kinds = {("term" if e["terminations"][-1] else "timeout") for e in eps}
    assert kinds == {"term", "timeout"}, "the fixture needs both kinds of episode end"
    return eps


def d4rl_raw(episodes, with_next=True, with_timeouts=True):
    raw = {
        "observations": np.concatenate([e["obs"][:-1] for e in episodes]),
        "actions": np.concatenate([e["actions"] for e in episodes]),
        "rewards": np.concatenate([e["rewards"] for e in episodes]),
        "terminals": np.concatenate([e["terminations"] for e in episodes]).astype(np.float32),
    }
    if with_timeouts:
        raw["timeouts"] = np.concatenate([e["truncations"] for e in episodes]).astype(np.float32)
    if with_next:
        raw["next_observations"] = np.concatenate([e["obs"][1:] for e in episodes])
    return raw


def d4rl_reference(dataset, max_episode_steps=None):
    """d4rl.qlearning_dataset (Farama-Foundation/D4RL d4rl/__init__.py), transcribed loop."""
    n = dataset["rewards"].shape[0]
    obs_, next_obs_, action_, reward_, done_ = [], [], [], [], []
    use_timeouts = "timeouts" in dataset
    episode_step = 0
    for i in range(n - 1):
        obs = dataset["observations"][i].astype(np.float32)
        new_obs = dataset["observations"][i + 1].astype(np.float32)
        action = dataset["actions"][i].astype(np.float32)
        reward = dataset["rewards"][i].astype(np.float32)
        done_bool = bool(dataset["terminals"][i])
        if use_timeouts:
            final_timestep = dataset["timeouts"][i]
        else:
            final_timestep = episode_step == max_episode_steps - 1
        if final_timestep:
            episode_step = 0
            continue
        if done_bool or final_timestep:
            episode_step = 0
        obs_.append(obs)
        next_obs_.append(new_obs)
        action_.append(action)
        reward_.append(reward)
        done_.append(done_bool)
        episode_step += 1
    return {
        "observations": np.array(obs_),
        "actions": np.array(action_),
        "next_observations": np.array(next_obs_),
        "rewards": np.array(reward_),
        "terminals": np.array(done_),
    }


def expected_d4rl_episode_ends(episodes):
    """Kept rows per episode: a timed-out episode loses its last step, and so does the last
    episode of the file (d4rl drops the final raw row)."""
    lengths = []
    for k, e in enumerate(episodes):
        t = len(e["rewards"])
        if e["truncations"][-1] or k == len(episodes) - 1:
            t -= 1
        lengths.append(t)
    return np.cumsum(lengths)


def write_h5(path, raw):
    with h5py.File(path, "w") as f:
        for k, v in raw.items():
            f.create_dataset(k, data=v)
        f.create_dataset("infos/qpos", data=np.zeros((len(raw["actions"]), 6)))  # ignored


def assert_stores_equal(a: ReplayStore, b: ReplayStore, keys=tuple(FIELDS)):
    assert len(a) == len(b)
    ra, rb = a.read(0, len(a), keys), b.read(0, len(b), keys)
    for k in keys:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
    np.testing.assert_array_equal(a.episode_ends(), b.episode_ends())


# --------------------------------------------------------------------------- D4RL
@pytest.mark.parametrize("with_next", [True, False])
def test_d4rl_hdf5_import_matches_qlearning_dataset(tmp_path, episodes, with_next):
    raw = d4rl_raw(episodes, with_next=with_next)
    write_h5(tmp_path / "d.hdf5", raw)
    store = import_d4rl_hdf5(tmp_path / "d.hdf5", tmp_path / "d.zarr", env_id="Hopper-v5")
    ref = d4rl_reference(raw)
    got = store.read(0, len(store))
    assert len(store) == len(ref["rewards"])
    np.testing.assert_array_equal(got["obs"], ref["observations"])
    np.testing.assert_array_equal(got["action"], ref["actions"])
    np.testing.assert_array_equal(got["reward"], ref["rewards"])
    np.testing.assert_array_equal(got["terminated"], ref["terminals"])
    terminal = ref["terminals"]
    # next_obs is d4rl's obs[i+1] except at terminal rows when the file has the true one
    np.testing.assert_array_equal(got["next_obs"][~terminal], ref["next_observations"][~terminal])
    true_next = np.concatenate([e["obs"][1:] for e in episodes])
    ends = expected_d4rl_episode_ends(episodes)
    np.testing.assert_array_equal(store.episode_ends(), ends)
    if with_next:  # the true successor of every terminal row
        starts = np.concatenate([[0], np.cumsum([len(e["rewards"]) for e in episodes])[:-1]])
        term_raw = [
            s + len(e["rewards"]) - 1
            for s, e in zip(starts, episodes, strict=True)
            if e["terminations"][-1]
        ]
        term_rows = np.flatnonzero(terminal)
        np.testing.assert_array_equal(
            got["next_obs"][term_rows], true_next[term_raw[: len(term_rows)]]
        )
    # rows that end an episode without terminating are the truncated ones
    done = got["terminated"] | got["truncated"]
    np.testing.assert_array_equal(np.flatnonzero(done) + 1, ends)
    assert store.attrs["env_id"] == "Hopper-v5"
    np.testing.assert_array_equal(
        got["episode_id"], np.searchsorted(ends, np.arange(len(store)), side="right")
    )


def test_d4rl_without_timeouts_uses_the_step_counter(tmp_path, episodes):
    raw = d4rl_raw(episodes, with_next=False, with_timeouts=False)
    ref = d4rl_reference(raw, max_episode_steps=MAX_STEPS)
    cols = qlearning_transitions(
        raw["observations"],
        raw["actions"],
        raw["rewards"],
        raw["terminals"],
        max_episode_steps=MAX_STEPS,
    )
    np.testing.assert_array_equal(cols["obs"], ref["observations"])
    np.testing.assert_array_equal(cols["next_obs"], ref["next_observations"])
    np.testing.assert_array_equal(cols["terminated"], ref["terminals"])


def test_d4rl_missing_key_is_named(tmp_path, episodes):
    raw = d4rl_raw(episodes)
    del raw["rewards"]
    write_h5(tmp_path / "bad.hdf5", raw)
    with pytest.raises(SchemaError, match="'rewards'"):
        import_d4rl_hdf5(tmp_path / "bad.hdf5", tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()


# --------------------------------------------------------------------------- Minari
def make_minari(root, dataset_id, episodes, **kwargs):
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [
        EpisodeBuffer(
            id=k,
            observations=e["obs"],
            actions=e["actions"],
            rewards=e["rewards"],
            terminations=e["terminations"],
            truncations=e["truncations"],
        )
        for k, e in enumerate(episodes)
    ]
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            minari.create_dataset_from_buffers(dataset_id, buffers, env="Hopper-v5", **kwargs)
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    return root / dataset_id


def test_minari_import_keeps_every_step_and_reference_scores(tmp_path, episodes):
    ds_dir = make_minari(
        tmp_path / "minari",
        "test/hopper-random-v0",
        episodes,
        ref_min_score=-20.0,
        ref_max_score=3234.3,
    )
    store = import_minari(ds_dir, tmp_path / "m.zarr")
    got = store.read(0, len(store))
    np.testing.assert_array_equal(got["obs"], np.concatenate([e["obs"][:-1] for e in episodes]))
    np.testing.assert_array_equal(got["next_obs"], np.concatenate([e["obs"][1:] for e in episodes]))
    np.testing.assert_array_equal(got["action"], np.concatenate([e["actions"] for e in episodes]))
    np.testing.assert_array_equal(got["reward"], np.concatenate([e["rewards"] for e in episodes]))
    np.testing.assert_array_equal(
        got["terminated"], np.concatenate([e["terminations"] for e in episodes])
    )
    np.testing.assert_array_equal(
        got["truncated"], np.concatenate([e["truncations"] for e in episodes])
    )
    np.testing.assert_array_equal(
        store.episode_ends(), np.cumsum([len(e["rewards"]) for e in episodes])
    )
    np.testing.assert_array_equal(np.unique(got["episode_id"]), np.arange(len(episodes)))
    assert store.attrs["ref_min_score"] == -20.0 and store.attrs["ref_max_score"] == 3234.3
    assert store.attrs["env_id"] == "Hopper-v5"
    assert store.attrs["minari_dataset_id"] == "test/hopper-random-v0"
    # the same dataset by id, resolved under MINARI_DATASETS_PATH
    os.environ["MINARI_DATASETS_PATH"] = str(tmp_path / "minari")
    try:
        by_id = import_minari("test/hopper-random-v0", tmp_path / "m2.zarr")
    finally:
        del os.environ["MINARI_DATASETS_PATH"]
    assert_stores_equal(store, by_id)


def store_from_episodes(path, episodes, attrs=None):
    s = ReplayStore.create(path, 11, 3, chunk_rows=64, attrs=attrs)
    for k, e in enumerate(episodes):
        t = len(e["rewards"])
        s.append(
            {
                "obs": e["obs"][:-1],
                "action": e["actions"],
                "reward": e["rewards"],
                "next_obs": e["obs"][1:],
                "terminated": e["terminations"],
                "truncated": e["truncations"],
                "actor_id": np.full(t, k % 3, np.int32),
                "policy_version": np.arange(t) + 10 * k,
            }
        )
    return s


def test_minari_export_then_import_is_lossless(tmp_path, episodes):
    attrs = {"env_id": "Hopper-v5", "ref_min_score": -18.5, "ref_max_score": 3000.0, "seed": 0}
    store = store_from_episodes(tmp_path / "s.zarr", episodes, attrs)
    out = export_minari(store, "idql/hopper-mixed-v0", tmp_path / "exported", env_id="Hopper-v5")
    assert (out / "data" / "metadata.json").is_file()
    import minari

    ds = minari.MinariDataset(out / "data")  # a real Minari dataset that minari itself reads
    assert ds.total_episodes == len(episodes)
    assert ds.total_steps == sum(len(e["rewards"]) for e in episodes)
    back = import_minari(out, tmp_path / "back.zarr")
    assert_stores_equal(store, back)
    assert back.attrs["ref_min_score"] == -18.5 and back.attrs["ref_max_score"] == 3000.0
    store.close()


def test_minari_export_refuses_discontinuous_episodes(tmp_path, episodes):
    store = store_from_episodes(tmp_path / "s.zarr", episodes[:1])
    b = store.read(0, 2)
    b["next_obs"][0] += 1.0  # breaks next_obs[0] == obs[1]
    b["terminated"][:] = False
    b["truncated"][:] = [False, True]
    store.append(b)
    with pytest.raises(ValueError, match="next_obs"):
        export_minari(store, "idql/bad-v0", tmp_path / "exported", env_id="Hopper-v5")
    store.close()


# --------------------------------------------------------------------------- DP zarr, npz
def test_diffusion_policy_zarr_import(tmp_path, episodes):
    root = zarr.open_group(tmp_path / "dp.zarr", mode="w", zarr_format=2)
    state = np.concatenate([e["obs"][:-1] for e in episodes])
    root.create_array("data/state", data=state, chunks=(100, 11))
    root.create_array("data/action", data=np.concatenate([e["actions"] for e in episodes]))
    lengths = [len(e["rewards"]) for e in episodes]
    root.create_array("meta/episode_ends", data=np.cumsum(lengths).astype(np.int64))
    assert detect_format(tmp_path / "dp.zarr") == "dp-zarr"
    store = import_diffusion_policy_zarr(tmp_path / "dp.zarr", tmp_path / "s.zarr")
    # each episode's last step has no successor in this layout, so it is dropped
    want_obs = np.concatenate([e["obs"][:-2] for e in episodes])
    want_next = np.concatenate([e["obs"][1:-1] for e in episodes])
    got = store.read(0, len(store))
    np.testing.assert_array_equal(got["obs"], want_obs)
    np.testing.assert_array_equal(got["next_obs"], want_next)
    np.testing.assert_array_equal(
        got["action"], np.concatenate([e["actions"][:-1] for e in episodes])
    )
    np.testing.assert_array_equal(store.episode_ends(), np.cumsum([n - 1 for n in lengths]))
    assert not got["terminated"].any() and (got["reward"] == 0).all()


def test_our_store_is_readable_as_diffusion_policy_layout(tmp_path, episodes):
    store = store_from_episodes(tmp_path / "s.zarr", episodes)
    store.close()
    # Diffusion Policy code reads root['data'][key] and root['meta']['episode_ends']
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    np.testing.assert_array_equal(
        root["meta"]["episode_ends"][:], np.cumsum([len(e["rewards"]) for e in episodes])
    )
    np.testing.assert_array_equal(
        root["data"]["obs"][:], np.concatenate([e["obs"][:-1] for e in episodes])
    )


def test_npz_export_then_import_is_lossless(tmp_path, episodes):
    store = store_from_episodes(tmp_path / "s.zarr", episodes, {"env_id": "Hopper-v5", "seed": 7})
    path = export_npz(store, tmp_path / "s.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only, nothing to unpickle
        assert all(z[k].dtype != object for k in z.files)
    back = import_npz(path, tmp_path / "back.zarr")
    assert_stores_equal(store, back)
    assert back.attrs["env_id"] == "Hopper-v5" and back.attrs["seed"] == 7
    store.close()


def test_npz_with_d4rl_keys_gets_qlearning_semantics(tmp_path, episodes):
    raw = d4rl_raw(episodes, with_next=False)
    np.savez(tmp_path / "d.npz", **raw)
    store = import_npz(tmp_path / "d.npz", tmp_path / "d.zarr")
    ref = d4rl_reference(raw)
    got = store.read(0, len(store))
    np.testing.assert_array_equal(got["obs"], ref["observations"])
    np.testing.assert_array_equal(got["next_obs"], ref["next_observations"])
    np.testing.assert_array_equal(store.episode_ends(), expected_d4rl_episode_ends(episodes))


def test_npz_transitions_without_timeouts_split_episodes_at_discontinuities(tmp_path, episodes):
    ref = d4rl_reference(d4rl_raw(episodes, with_next=False))  # what people save from d4rl
    np.savez(tmp_path / "q.npz", **ref)
    store = import_npz(tmp_path / "q.npz", tmp_path / "q.zarr")
    np.testing.assert_array_equal(store.episode_ends(), expected_d4rl_episode_ends(episodes))


# --------------------------------------------------------------------------- open_dataset
def test_open_dataset_detects_imports_once_and_reimports_when_source_changes(tmp_path, episodes):
    write_h5(tmp_path / "d.hdf5", d4rl_raw(episodes))
    store = open_dataset(tmp_path / "d.hdf5")
    cache = store.path  # next to the source: d.hdf5-<8 hex of sha1(resolved path)>.idql.zarr
    assert cache.parent == tmp_path and store.mode == "r"
    assert re.fullmatch(r"d\.hdf5-[0-9a-f]{8}\.idql\.zarr", cache.name)
    stamp = commit_record_path(cache).stat().st_mtime_ns
    again = open_dataset(tmp_path / "d.hdf5")
    assert commit_record_path(cache).stat().st_mtime_ns == stamp  # reused
    assert_stores_equal(store, again)
    future = time.time() + 100
    os.utime(tmp_path / "d.hdf5", (future, future))
    open_dataset(tmp_path / "d.hdf5")
    assert commit_record_path(cache).stat().st_mtime_ns != stamp  # source newer: re-imported
    assert open_dataset(cache).path == cache  # our own store opens directly
    other = open_dataset(tmp_path / "d.hdf5", cache_dir=tmp_path / "cache")
    assert other.path == tmp_path / "cache" / cache.name


def test_open_dataset_handles_minari_and_npz_and_rejects_unknown(tmp_path, episodes):
    ds_dir = make_minari(tmp_path / "minari", "test/hopper-x-v0", episodes)
    assert detect_format(ds_dir) == "minari"
    assert len(open_dataset(ds_dir, cache_dir=tmp_path / "c")) == sum(
        len(e["rewards"]) for e in episodes
    )
    np.savez(tmp_path / "d.npz", **d4rl_raw(episodes))
    assert detect_format(tmp_path / "d.npz") == "npz"
    assert len(open_dataset(tmp_path / "d.npz", cache_dir=tmp_path / "c")) > 0
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_dataset(tmp_path / "junk.txt")


def small_raw(n, obs_value):
    """Raw D4RL steps of one timed-out episode whose observations all equal obs_value."""
    timeouts = np.zeros(n, np.float32)
    timeouts[-1] = 1.0
    return {
        "observations": np.full((n, 3), obs_value, np.float32),
        "actions": np.zeros((n, 2), np.float32),
        "rewards": np.full(n, obs_value, np.float32),
        "terminals": np.zeros(n, np.float32),
        "timeouts": timeouts,
    }


def test_open_dataset_keeps_sources_with_the_same_basename_apart(tmp_path):
    (tmp_path / "walker").mkdir()
    (tmp_path / "hopper").mkdir()
    np.savez(tmp_path / "walker" / "medium.npz", **small_raw(50, 2.0))
    np.savez(tmp_path / "hopper" / "medium.npz", **small_raw(10, 1.0))
    hopper = open_dataset(tmp_path / "hopper" / "medium.npz", cache_dir=tmp_path / "c")
    walker = open_dataset(tmp_path / "walker" / "medium.npz", cache_dir=tmp_path / "c")
    # d4rl semantics: the timeout row (the last) is dropped, so n - 1 rows of obs_value
    assert len(hopper) == 9 and (hopper.read(0, 9)["obs"] == 1.0).all()
    assert len(walker) == 49 and (walker.read(0, 49)["obs"] == 2.0).all()
    assert hopper.path != walker.path
    for store, src in ((hopper, "hopper"), (walker, "walker")):
        assert store.path.parent == tmp_path / "c"
        assert store.path.name.startswith("medium.npz-") and store.path.name.endswith(".idql.zarr")
        assert store.attrs["source"]["path"] == str((tmp_path / src / "medium.npz").resolve())
    # reopening reuses each one's own cache
    again = open_dataset(tmp_path / "hopper" / "medium.npz", cache_dir=tmp_path / "c")
    assert again.path == hopper.path and len(again) == 9


def test_open_dataset_reimports_a_cache_recorded_for_another_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "a" / "d.npz", **small_raw(10, 1.0))
    np.savez(tmp_path / "b" / "d.npz", **small_raw(30, 2.0))
    cache = open_dataset(tmp_path / "a" / "d.npz", cache_dir=tmp_path / "c").path
    # a newer store at a's cache path whose attrs say it came from b (e.g. a copied cache)
    import_npz(tmp_path / "b" / "d.npz", cache, overwrite=True).close()
    got = open_dataset(tmp_path / "a" / "d.npz", cache_dir=tmp_path / "c")
    assert got.attrs["source"]["path"] == str((tmp_path / "a" / "d.npz").resolve())
    assert len(got) == 9 and (got.read(0, 9)["obs"] == 1.0).all()


def test_open_dataset_keeps_minari_datasets_with_the_same_name_apart(
    tmp_path, episodes, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    walker = make_minari(tmp_path / "m", "test/walker2d/medium-v0", episodes[:3])
    hopper = make_minari(tmp_path / "m", "test/hopper/medium-v0", episodes[3:4])
    rows = {
        k: sum(len(e["rewards"]) for e in eps)
        for k, eps in (("w", episodes[:3]), ("h", episodes[3:4]))
    }
    # as dataset dirs, and as their data/ dirs (the basename of every Minari data dir)
    for given in (lambda d: d, lambda d: d / "data"):
        sh, sw = open_dataset(given(hopper)), open_dataset(given(walker))
        assert len(sh) == rows["h"] and len(sw) == rows["w"]
        np.testing.assert_array_equal(sw.read(0, len(sw))["obs"][:5], episodes[0]["obs"][:5])
        np.testing.assert_array_equal(sh.read(0, len(sh))["obs"][:5], episodes[3]["obs"][:5])
        assert sh.path != sw.path
        assert sh.path.parent == tmp_path / "xdg" / "idql-runtime"
        assert sh.path.name.startswith("medium-v0-") and sw.path.name.startswith("medium-v0-")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "m"))
    assert open_dataset("test/hopper/medium-v0").path == sh.path  # by id: the same cache


def test_diffusion_policy_zarr_keeps_terminal_last_steps(tmp_path, episodes):
    """A terminal last step has no successor but needs none (never bootstrapped): it is
    kept with next_obs = obs[t], its reward and terminated; a timed-out episode's last step
    is dropped and the step before it becomes truncated."""
    root = zarr.open_group(tmp_path / "dp.zarr", mode="w")
    root.create_array("data/obs", data=np.concatenate([e["obs"][:-1] for e in episodes]))
    root.create_array("data/action", data=np.concatenate([e["actions"] for e in episodes]))
    root.create_array("data/reward", data=np.concatenate([e["rewards"] for e in episodes]))
    root.create_array("data/terminated", data=np.concatenate([e["terminations"] for e in episodes]))
    lengths = [len(e["rewards"]) for e in episodes]
    root.create_array("meta/episode_ends", data=np.cumsum(lengths).astype(np.int64))
    store = import_diffusion_policy_zarr(tmp_path / "dp.zarr", tmp_path / "s.zarr")
    got = store.read(0, len(store))
    want: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "next_obs", "reward", "term")}
    for e in episodes:
        t = len(e["rewards"])
        k = t if e["terminations"][-1] else t - 1  # steps kept
        want["obs"].append(e["obs"][:k])
        nxt = e["obs"][1 : k + 1].copy()
        if e["terminations"][-1]:
            nxt[-1] = e["obs"][t - 1]  # the placeholder for the terminal row
        want["next_obs"].append(nxt)
        want["reward"].append(e["rewards"][:k])
        want["term"].append(e["terminations"][:k])
    np.testing.assert_array_equal(got["obs"], np.concatenate(want["obs"]))
    np.testing.assert_array_equal(got["next_obs"], np.concatenate(want["next_obs"]))
    np.testing.assert_array_equal(got["reward"], np.concatenate(want["reward"]))
    np.testing.assert_array_equal(got["terminated"], np.concatenate(want["term"]))
    kept = [len(o) for o in want["obs"]]
    ends = np.cumsum(kept)
    np.testing.assert_array_equal(store.episode_ends(), ends)
    n_term = sum(bool(e["terminations"][-1]) for e in episodes)
    assert got["terminated"].sum() == n_term and got["truncated"].sum() == len(episodes) - n_term
    np.testing.assert_array_equal(
        got["truncated"] | got["terminated"], np.isin(np.arange(len(store)), ends - 1)
    )
    # the closed case: one 5-step episode that ends in a fall worth -100
    root = zarr.open_group(tmp_path / "fall.zarr", mode="w")
    root.create_array("data/obs", data=np.arange(10, dtype=np.float32).reshape(5, 2))
    root.create_array("data/action", data=np.zeros((5, 1), np.float32))
    root.create_array("data/reward", data=np.array([1, 1, 1, 1, -100], np.float32))
    root.create_array("data/terminated", data=np.array([0, 0, 0, 0, 1], bool))
    root.create_array("meta/episode_ends", data=np.array([5], np.int64))
    fall = import_diffusion_policy_zarr(tmp_path / "fall.zarr", tmp_path / "fall.s.zarr")
    rows = fall.read(0, len(fall))
    assert len(fall) == 5
    np.testing.assert_array_equal(rows["reward"], [1, 1, 1, 1, -100])
    np.testing.assert_array_equal(rows["terminated"], [False] * 4 + [True])
    assert not rows["truncated"].any()
    np.testing.assert_array_equal(rows["next_obs"][:, 0], [2, 4, 6, 8, 8])


@pytest.mark.parametrize(
    ("ends", "bad"),
    [
        ([-3, 10], r"\[0\] = -3"),
        ([0, 10], r"\[0\] = 0"),
        ([4, 4, 10], r"\[1\] = 4"),
        ([4, 11], r"\[1\] = 11"),
    ],
)
def test_diffusion_policy_zarr_rejects_corrupt_episode_ends(tmp_path, ends, bad):
    root = zarr.open_group(tmp_path / "dp.zarr", mode="w")
    root.create_array("data/obs", data=np.arange(10, dtype=np.float32).reshape(10, 1))
    root.create_array("data/action", data=np.zeros((10, 1), np.float32))
    root.create_array("meta/episode_ends", data=np.array(ends, np.int64))
    with pytest.raises(SchemaError, match="meta/episode_ends" + bad):
        import_diffusion_policy_zarr(tmp_path / "dp.zarr", tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_open_dataset_says_a_missing_path_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    missing = tmp_path / "nope" / "medium.npz"
    with pytest.raises(FileNotFoundError, match=r"does not exist") as info:
        open_dataset(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"'no/such-v0' does not exist"):
        detect_format("no/such-v0")  # relative: not a file, nor a local Minari id
