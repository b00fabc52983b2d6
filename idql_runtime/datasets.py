"""Import and export of standard offline-RL dataset formats, and ``open_dataset``.

Every importer writes a replay store (``replay.ReplayStore``) and returns it opened
read-only. Imports are built under a temporary name and renamed into place, so a crash
never leaves a half import that looks complete.

Formats:
    D4RL HDF5     observations, actions, rewards, terminals, [timeouts], [next_observations]
                  with d4rl.qlearning_dataset semantics (see ``qlearning_transitions``)
    Minari        a local dataset directory or id (minari package, no downloads)
    DP zarr       Diffusion Policy ReplayBuffer: data/{obs|state, action, ...}, meta/episode_ends
    npz           obs/observations, action(s), reward(s), [next_obs], terminated/terminals,
                  truncated/timeouts (+ provenance and attrs when written by ``export_npz``)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from idql_runtime import __version__
from idql_runtime.replay import (
    FIELDS,
    ReplayStore,
    SchemaError,
    commit_record_path,
    is_replay_store,
    list_zarr_arrays,
    read_zarr_arrays,
)

IMPORT_BLOCK_ROWS = 1 << 16
_ALIASES = {
    "obs": ("obs", "observations"),
    "action": ("action", "actions"),
    "reward": ("reward", "rewards"),
    "next_obs": ("next_obs", "next_observations"),
    "terminated": ("terminated", "terminals"),
    "truncated": ("truncated", "timeouts"),
}
_IDQL_INFO_KEYS = ("idql_actor_id", "idql_policy_version", "idql_episode_id")


# --------------------------------------------------------------------------- D4RL semantics
def qlearning_transitions(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminals: np.ndarray,
    timeouts: np.ndarray | None = None,
    next_observations: np.ndarray | None = None,
    *,
    max_episode_steps: int | None = None,
) -> dict[str, np.ndarray]:
    """Raw D4RL step arrays (N rows) -> transitions, as ``d4rl.qlearning_dataset`` does.

    - Row i becomes (obs[i], a[i], r[i], obs[i+1], terminals[i]) for i < N-1; the last raw
      row is always dropped (it has no successor).
    - A row flagged by ``timeouts`` (or, without timeouts, the ``max_episode_steps``-th
      step counted as d4rl does) is dropped: its successor is the next episode's start.
    - ``next_observations``, when given, replaces obs[i+1] (they differ only at terminal
      rows, where d4rl's obs[i+1] is already the next episode's reset).
    - Episode boundaries: d4rl's output has none; the kept row before a dropped timeout row
      and the last kept row get ``truncated`` (unless terminal), so episode_ends matches
      the ``dones`` IDQL's jaxrl5 D4RLDataset derives from observation discontinuities.

    Returns float32 obs/action/reward/next_obs and bool terminated/truncated.
    """
    n = len(rewards)
    term = np.asarray(terminals).astype(bool).reshape(n)
    if timeouts is not None:
        final = np.asarray(timeouts).astype(bool).reshape(n)
    elif max_episode_steps is not None:
        final = np.zeros(n, dtype=bool)
        step = 0
        for i in range(n - 1):  # d4rl's counter: reset on done or final, advance on kept rows
            if step == max_episode_steps - 1:
                final[i] = True
                step = 0
                continue
            step = (0 if term[i] else step) + 1  # d4rl's order: a done row leaves step 1
    else:
        final = np.zeros(n, dtype=bool)
    keep = np.zeros(n, dtype=bool)
    keep[: n - 1] = ~final[: n - 1]
    idx = np.flatnonzero(keep)
    obs = np.asarray(observations, dtype=np.float32)
    if next_observations is not None:
        nxt = np.asarray(next_observations, dtype=np.float32)[idx]
    else:
        nxt = obs[idx + 1]
    terminated = term[idx]
    # the episode continues past row i unless its successor row was dropped or is the end
    successor_dropped = np.ones(n, dtype=bool)
    successor_dropped[: n - 2] = final[1 : n - 1]
    truncated = ~terminated & successor_dropped[idx]
    return {
        "obs": obs[idx],
        "action": np.asarray(actions, dtype=np.float32)[idx],
        "reward": np.asarray(rewards, dtype=np.float32).reshape(n)[idx],
        "next_obs": nxt,
        "terminated": terminated,
        "truncated": truncated,
    }


def dones_from_discontinuity(
    obs: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray
) -> np.ndarray:
    """Rows after which the next row does not continue the episode (jaxrl5's D4RLDataset:
    ``|obs[i+1] - next_obs[i]| > 1e-6`` or terminal; the last row always ends one)."""
    n = len(obs)
    out = np.ones(n, dtype=bool)
    if n > 1:
        gap = np.linalg.norm(obs[1:] - next_obs[:-1], axis=-1) > 1e-6
        out[:-1] = gap | terminated[:-1].astype(bool)
    return out


# --------------------------------------------------------------------------- writing stores
def _episode_ids(terminated: np.ndarray, truncated: np.ndarray) -> np.ndarray:
    done = terminated | truncated
    return (np.cumsum(done) - done).astype(np.int64)


@contextlib.contextmanager
def building_path(store_path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path next to ``store_path``; rename it into place on success, so
    that ``store_path`` exists only once it is complete."""
    dest = Path(store_path)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists (pass overwrite=True to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.importing")
    try:
        yield tmp
        if dest.exists():
            trash = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.old")
            os.rename(dest, trash)
            os.rename(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_store(
    store_path: str | os.PathLike,
    columns: Mapping[str, np.ndarray] | Iterator[Mapping[str, np.ndarray]],
    obs_dim: int,
    act_dim: int,
    attrs: dict[str, Any],
    *,
    overwrite: bool,
    chunk_rows: int,
) -> ReplayStore:
    blocks = [columns] if isinstance(columns, Mapping) else columns
    with building_path(store_path, overwrite) as tmp:
        with ReplayStore.create(tmp, obs_dim, act_dim, chunk_rows=chunk_rows, attrs=attrs) as store:
            for cols in blocks:
                n = len(cols["obs"])
                for s in range(0, n, IMPORT_BLOCK_ROWS):
                    store.append({k: v[s : s + IMPORT_BLOCK_ROWS] for k, v in cols.items()})
    return ReplayStore.open(store_path, "r")


def _source_attrs(path: Path, fmt: str) -> dict[str, Any]:
    return {
        "source": {"path": str(path.resolve()), "format": fmt},
        "idql_runtime_version": __version__,
    }


# --------------------------------------------------------------------------- D4RL hdf5
def import_d4rl_hdf5(
    h5_path: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    env_id: str | None = None,
    max_episode_steps: int | None = None,
    use_next_observations: bool = True,
    overwrite: bool = False,
    chunk_rows: int = 16384,
) -> ReplayStore:
    """Import a D4RL-style HDF5 file with ``qlearning_transitions`` semantics.

    Actions are stored raw (the learner clips them to +-(1 - 1e-5)). Without a
    ``timeouts`` array the time limit is ``max_episode_steps`` or, failing that, the
    gymnasium registry's for ``env_id``. ``use_next_observations=False`` reproduces d4rl's
    obs[i+1] exactly even where the file has next_observations.
    """
    import h5py

    h5_path = Path(h5_path)
    with h5py.File(h5_path, "r") as f:
        for key in ("observations", "actions", "rewards", "terminals"):
            if key not in f:
                raise SchemaError(f"{h5_path}: missing D4RL key {key!r}")
        raw = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals")}
        timeouts = f["timeouts"][()] if "timeouts" in f else None
        next_obs = (
            f["next_observations"][()]
            if use_next_observations and "next_observations" in f
            else None
        )
        file_env = f.attrs.get("env_id") or f.attrs.get("env_name")
    env_id = env_id or (file_env.decode() if isinstance(file_env, bytes) else file_env)
    if timeouts is None and max_episode_steps is None and env_id:
        max_episode_steps = _registry_max_steps(env_id)
    cols = qlearning_transitions(
        raw["observations"],
        raw["actions"],
        raw["rewards"],
        raw["terminals"],
        timeouts,
        next_obs,
        max_episode_steps=max_episode_steps,
    )
    cols["episode_id"] = _episode_ids(cols["terminated"], cols["truncated"])
    attrs = {
        **_source_attrs(h5_path, "d4rl-hdf5"),
        "env_id": env_id,
        "semantics": "d4rl.qlearning_dataset (timeout rows and the last row dropped)",
        "raw_rows": int(len(raw["rewards"])),
    }
    return _write_store(
        store_path,
        cols,
        cols["obs"].shape[1],
        cols["action"].shape[1],
        attrs,
        overwrite=overwrite,
        chunk_rows=chunk_rows,
    )


def _registry_max_steps(env_id: str) -> int | None:
    try:
        import gymnasium as gym

        return gym.spec(env_id).max_episode_steps
    except Exception:  # an id gymnasium does not know (e.g. "hopper-medium-v2")
        return None


# --------------------------------------------------------------------------- Minari
def _minari_data_path(dataset_dir_or_id: str | os.PathLike) -> Path:
    p = Path(dataset_dir_or_id)
    for candidate in (p / "data", p):
        if (candidate / "metadata.json").is_file():
            return candidate
    from minari.storage.datasets_root_dir import get_dataset_path

    root = get_dataset_path(str(dataset_dir_or_id))
    if (root / "data" / "metadata.json").is_file():
        return root / "data"
    raise FileNotFoundError(
        f"no local Minari dataset at {dataset_dir_or_id!r} (looked for data/metadata.json there"
        " and under MINARI_DATASETS_PATH); downloads are not attempted"
    )


def import_minari(
    dataset_dir_or_id: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunk_rows: int = 16384,
) -> ReplayStore:
    """Import a local Minari dataset (a directory, or an id under MINARI_DATASETS_PATH).

    Every step of every episode becomes a row (next_obs = observations[t + 1]); the last
    step of an episode with neither flag gets ``truncated``. ref_min_score, ref_max_score
    and the env id are kept in attrs. Provenance written by ``export_minari`` (in infos)
    comes back; otherwise actor_id/policy_version are -1 and episode_id the Minari id.
    """
    import minari

    data_path = _minari_data_path(dataset_dir_or_id)
    ds = minari.MinariDataset(data_path)
    meta = ds.storage.metadata
    obs_space, act_space = ds.observation_space, ds.action_space
    if getattr(obs_space, "shape", None) is None or len(obs_space.shape) != 1:
        raise SchemaError(f"{data_path}: only flat Box observations are supported, got {obs_space}")
    if getattr(act_space, "shape", None) is None or len(act_space.shape) != 1:
        raise SchemaError(f"{data_path}: only flat Box actions are supported, got {act_space}")
    env_id = ds.env_spec.id if ds.env_spec is not None else None
    attrs = {
        **_source_attrs(data_path, "minari"),
        "env_id": env_id,
        "minari_dataset_id": ds.id,
        "minari_version": meta.get("minari_version"),
    }
    for key in ("ref_min_score", "ref_max_score", "num_episodes_average_score", "description"):
        if meta.get(key) is not None:
            attrs[key] = meta[key]

    def blocks() -> Iterator[dict[str, np.ndarray]]:
        buf: list[dict[str, np.ndarray]] = []
        rows = 0
        for ep in ds.iterate_episodes():
            cols = _minari_episode_rows(ep)
            buf.append(cols)
            rows += len(cols["obs"])
            if rows >= IMPORT_BLOCK_ROWS:
                yield {k: np.concatenate([b[k] for b in buf]) for k in buf[0]}
                buf, rows = [], 0
        if buf:
            yield {k: np.concatenate([b[k] for b in buf]) for k in buf[0]}

    return _write_store(
        store_path,
        blocks(),
        int(obs_space.shape[0]),
        int(act_space.shape[0]),
        attrs,
        overwrite=overwrite,
        chunk_rows=chunk_rows,
    )


def _minari_episode_rows(ep: Any) -> dict[str, np.ndarray]:
    observations = np.asarray(ep.observations, dtype=np.float32)
    if observations.ndim != 2:
        raise SchemaError(
            f"episode {ep.id}: observations must be (T+1, obs_dim), got {observations.shape}"
        )
    t = len(ep.rewards)
    terminated = np.asarray(ep.terminations, dtype=bool).reshape(t)
    truncated = np.asarray(ep.truncations, dtype=bool).reshape(t).copy()
    if t and not (terminated[-1] or truncated[-1]):
        truncated[-1] = True
    cols = {
        "obs": observations[:-1],
        "action": np.asarray(ep.actions, dtype=np.float32).reshape(t, -1),
        "reward": np.asarray(ep.rewards, dtype=np.float32).reshape(t),
        "next_obs": observations[1:],
        "terminated": terminated,
        "truncated": truncated,
        "actor_id": np.full(t, -1, np.int32),
        "policy_version": np.full(t, -1, np.int64),
        "episode_id": np.full(t, int(ep.id), np.int64),
    }
    infos = ep.infos if isinstance(ep.infos, dict) else {}
    if all(k in infos for k in _IDQL_INFO_KEYS):
        for k in _IDQL_INFO_KEYS:
            v = np.asarray(infos[k])
            v = v[1:] if len(v) == t + 1 else v  # step infos follow the reset info
            cols[k[len("idql_") :]] = v.astype(FIELDS[k[len("idql_") :]].dtype)
    return cols


@contextlib.contextmanager
def _minari_root(path: Path) -> Iterator[None]:
    # minari resolves dataset ids against this variable; scope it to the call
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def export_minari(
    store: ReplayStore,
    dataset_id: str,
    out_dir: str | os.PathLike,
    env_id: str | None = None,
    *,
    author: str | None = None,
    algorithm_name: str | None = None,
) -> Path:
    """Write the store's committed episodes as a Minari dataset ``out_dir/dataset_id``.

    Uses minari's own writer (``create_dataset_from_buffers``). Rows after the last
    episode end (an open episode) are left out. Provenance travels in infos
    (idql_actor_id, idql_policy_version, idql_episode_id, length T+1 like Minari's infos),
    so ``import_minari`` restores the store exactly. Raises ValueError if an episode's
    next_obs[t] differs from obs[t+1] (a Minari episode cannot express that).
    """
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env_id = env_id or store.attrs.get("env_id")
    attrs = store.attrs
    ends = store.episode_ends()
    if len(store) > (ends[-1] if len(ends) else 0):
        warnings.warn(
            f"{len(store) - (ends[-1] if len(ends) else 0)} rows after the last episode end are"
            " not exported (open episode)",
            stacklevel=2,
        )
    kwargs: dict[str, Any] = {}
    if env_id is not None:
        kwargs["env"] = env_id
    else:
        kwargs["observation_space"] = gym.spaces.Box(-np.inf, np.inf, (store.obs_dim,), np.float32)
        kwargs["action_space"] = gym.spaces.Box(-np.inf, np.inf, (store.act_dim,), np.float32)
    if attrs.get("ref_min_score") is not None and attrs.get("ref_max_score") is not None:
        kwargs["ref_min_score"] = float(attrs["ref_min_score"])
        kwargs["ref_max_score"] = float(attrs["ref_max_score"])
        kwargs["num_episodes_average_score"] = int(attrs.get("num_episodes_average_score", 100))

    def buffers(first: int, last: int) -> list[EpisodeBuffer]:
        starts = np.concatenate([[0], ends[:-1]])
        lo, hi = int(starts[first]), int(ends[last - 1])
        cols = store.read(lo, hi)
        out = []
        for e in range(first, last):
            s, t = int(starts[e]) - lo, int(ends[e]) - lo
            obs, nxt = cols["obs"][s:t], cols["next_obs"][s:t]
            if t - s > 1 and not np.array_equal(obs[1:], nxt[:-1]):
                bad = int(np.flatnonzero((obs[1:] != nxt[:-1]).any(axis=1))[0])
                raise ValueError(
                    f"episode {e} (rows {s + lo}..{t + lo}): next_obs[{bad}] != obs[{bad + 1}];"
                    " a Minari episode stores one observation sequence, so this is not exportable"
                )
            infos = {}
            for k in _IDQL_INFO_KEYS:
                v = cols[k[len("idql_") :]][s:t]
                infos[k] = np.concatenate([v[:1], v])
            out.append(
                EpisodeBuffer(
                    id=e,
                    observations=np.concatenate([obs, nxt[-1:]]),
                    actions=cols["action"][s:t],
                    rewards=cols["reward"][s:t],
                    terminations=cols["terminated"][s:t],
                    truncations=cols["truncated"][s:t],
                    infos=infos,
                )
            )
        return out

    # episodes go in groups of about IMPORT_BLOCK_ROWS rows to bound memory
    groups, first = [], 0
    starts_all = np.concatenate([[0], ends[:-1]]) if len(ends) else np.empty(0, np.int64)
    while first < len(ends):
        last = int(np.searchsorted(ends, starts_all[first] + IMPORT_BLOCK_ROWS, side="right"))
        last = max(last, first + 1)
        groups.append((first, last))
        first = last
    if not groups:
        raise ValueError(f"{store.path} has no complete episode to export")
    description = (
        f"Exported by idql-runtime {__version__} from {store.path}. attrs: "
        + json.dumps(attrs)[:2000]
    )
    with _minari_root(out_dir), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # minari nags about author/permalink
        ds = minari.create_dataset_from_buffers(
            dataset_id,
            buffers(*groups[0]),
            algorithm_name=algorithm_name or attrs.get("algorithm", "idql-runtime export"),
            author=author,
            description=description,
            **kwargs,
        )
        for g in groups[1:]:
            ds.update_dataset_from_buffer(buffers(*g))
    return out_dir / dataset_id


# --------------------------------------------------------------------------- Diffusion Policy zarr
def import_diffusion_policy_zarr(
    path: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    obs_key: str | None = None,
    overwrite: bool = False,
    chunk_rows: int = 16384,
) -> ReplayStore:
    """Import a Diffusion Policy ReplayBuffer zarr (data/*, meta/episode_ends).

    obs comes from data/obs or data/state (or ``obs_key``), action from data/action,
    reward from data/reward (zeros if absent), terminated from data/terminated or
    data/terminals (False if absent). Without data/next_obs, step t of an episode becomes
    (obs[t], a[t], r[t], obs[t+1]), and an episode's last step, which has no successor:
    - is kept when it is terminal, with next_obs = obs[t] as a placeholder (a terminal
      row's next_obs is never bootstrapped), so its reward and ``terminated`` survive;
    - is dropped otherwise, and the row before it becomes ``truncated``.
    d4rl's qlearning_dataset likewise keeps terminal rows (with obs[i+1], there the next
    episode's reset) and drops timeout rows and the file's final row. With data/next_obs
    every step is kept and a non-terminal last step becomes ``truncated``.

    meta/episode_ends must be strictly increasing, from >= 1 to <= the number of rows;
    rows after its last value (an open episode) are left out.
    """
    path = Path(path)
    arrays = list_zarr_arrays(path)
    if "meta/episode_ends" not in arrays:
        raise SchemaError(f"{path}: missing 'meta/episode_ends' (not a Diffusion Policy zarr)")
    candidates = [obs_key] if obs_key else ["data/obs", "data/state", "data/observations"]
    okey = next((k for k in candidates if k in arrays), None)
    if okey is None:
        raise SchemaError(f"{path}: no observation array (looked for {candidates})")
    if "data/action" not in arrays:
        raise SchemaError(f"{path}: missing 'data/action'")
    for key in (okey, "data/action"):
        if len(arrays[key]["shape"]) != 2:
            raise SchemaError(
                f"{path}: {key!r} has shape {arrays[key]['shape']}; only flat vectors are supported"
            )
    wanted = [okey, "data/action", "meta/episode_ends"]
    optional = {
        "reward": ["data/reward", "data/rewards"],
        "next_obs": ["data/next_obs", "data/next_state"],
        "terminated": ["data/terminated", "data/terminals", "data/done"],
        "truncated": ["data/truncated", "data/timeouts"],
    }
    found = {k: next((c for c in cs if c in arrays), None) for k, cs in optional.items()}
    raw = read_zarr_arrays(path, wanted + [v for v in found.values() if v])
    obs = raw[okey].astype(np.float32)
    n = len(obs)
    ends = raw["meta/episode_ends"].astype(np.int64).reshape(-1)
    _check_episode_ends(path, ends, n)
    reward = (
        raw[found["reward"]].astype(np.float32).reshape(n)
        if found["reward"]
        else np.zeros(n, np.float32)
    )
    term = (
        raw[found["terminated"]].astype(bool).reshape(n)
        if found["terminated"]
        else np.zeros(n, bool)
    )
    action = raw["data/action"].astype(np.float32)
    last_row = np.zeros(n, dtype=bool)
    last_row[ends - 1] = True
    if found["next_obs"]:
        keep = np.arange(int(ends[-1]) if len(ends) else 0)
        nxt = raw[found["next_obs"]].astype(np.float32)[keep]
        trunc = (
            raw[found["truncated"]].astype(bool).reshape(n)[keep]
            if found["truncated"]
            else np.zeros(len(keep), bool)
        )
        trunc = trunc | (last_row[keep] & ~term[keep])
    else:
        covered = int(ends[-1]) if len(ends) else 0
        dropped = last_row & ~term  # last steps with no successor and no need of one
        keep = np.flatnonzero(~dropped[:covered])
        # obs[t + 1] within an episode; the placeholder obs[t] at a kept (terminal) last step
        nxt = obs[np.where(last_row[keep], keep, keep + 1)]
        starts = np.concatenate([[0], ends[:-1]])
        cut = ends[~term[ends - 1] & (ends - starts >= 2)] - 2  # rows before a dropped one
        before_dropped = np.zeros(n, dtype=bool)
        before_dropped[cut] = True
        trunc = before_dropped[keep] & ~term[keep]
    cols = {
        "obs": obs[keep],
        "action": action[keep],
        "reward": reward[keep],
        "next_obs": nxt,
        "terminated": term[keep],
        "truncated": trunc,
    }
    cols["episode_id"] = _episode_ids(cols["terminated"], cols["truncated"])
    attrs = {**_source_attrs(path, "diffusion-policy-zarr"), "obs_key": okey}
    return _write_store(
        store_path,
        cols,
        obs.shape[1],
        action.shape[1],
        attrs,
        overwrite=overwrite,
        chunk_rows=chunk_rows,
    )


def _check_episode_ends(path: Path, ends: np.ndarray, n: int) -> None:
    """Exclusive episode ends must be strictly increasing within 1..n (a value < 1 would
    index from the array's end)."""
    if not len(ends):
        return
    if ends[0] < 1:
        raise SchemaError(f"{path}: meta/episode_ends[0] = {ends[0]} (must be >= 1)")
    step = np.diff(ends)
    if np.any(step <= 0):
        i = int(np.flatnonzero(step <= 0)[0]) + 1
        raise SchemaError(
            f"{path}: meta/episode_ends[{i}] = {ends[i]} after {ends[i - 1]}"
            " (must be strictly increasing)"
        )
    if ends[-1] > n:
        i = len(ends) - 1
        raise SchemaError(f"{path}: meta/episode_ends[{i}] = {ends[i]} exceeds the {n} rows")


# --------------------------------------------------------------------------- npz
def import_npz(
    path: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    max_episode_steps: int | None = None,
    overwrite: bool = False,
    chunk_rows: int = 16384,
) -> ReplayStore:
    """Import an npz of transitions (never unpickles: ``allow_pickle=False``).

    With next_obs/next_observations the rows are taken as they are; missing
    truncated/timeouts flags are derived from observation discontinuities
    (``dones_from_discontinuity``). Without next observations the arrays are raw D4RL
    steps and go through ``qlearning_transitions``.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    attrs = {**_source_attrs(path, "npz")}
    if "__attrs__" in data:
        attrs = {**json.loads(str(data.pop("__attrs__"))), **attrs}

    def pick(field: str, required: bool = True) -> np.ndarray | None:
        for k in _ALIASES[field]:
            if k in data:
                return data[k]
        if required:
            raise SchemaError(
                f"{path}: missing key {field!r} (or {' / '.join(_ALIASES[field][1:])})"
            )
        return None

    obs, action, reward, term = pick("obs"), pick("action"), pick("reward"), pick("terminated")
    nxt, trunc = pick("next_obs", False), pick("truncated", False)
    assert obs is not None and action is not None and reward is not None and term is not None
    if nxt is None:
        cols = qlearning_transitions(
            obs, action, reward, term, trunc, max_episode_steps=max_episode_steps
        )
        cols["episode_id"] = _episode_ids(cols["terminated"], cols["truncated"])
    else:
        cols = {
            "obs": obs,
            "action": action,
            "reward": reward,
            "next_obs": nxt,
            "terminated": term.astype(bool),
        }
        if trunc is not None:
            cols["truncated"] = trunc.astype(bool)
        else:
            dones = dones_from_discontinuity(obs, nxt, cols["terminated"])
            cols["truncated"] = dones & ~cols["terminated"]
        for k in ("actor_id", "policy_version", "episode_id"):
            if k in data:
                cols[k] = data[k]
    obs_arr = np.asarray(cols["obs"])
    if obs_arr.ndim != 2 or np.asarray(cols["action"]).ndim != 2:
        raise SchemaError(f"{path}: obs and action must be 2-d (rows, dim)")
    return _write_store(
        store_path,
        cols,
        obs_arr.shape[1],
        np.asarray(cols["action"]).shape[1],
        attrs,
        overwrite=overwrite,
        chunk_rows=chunk_rows,
    )


def export_npz(store: ReplayStore, path: str | os.PathLike, *, compressed: bool = True) -> Path:
    """Write every committed row (all FIELDS), ``episode_ends`` and the attrs (as a JSON
    string under ``__attrs__``) to an npz; ``import_npz`` reads it back exactly."""
    path = Path(path)
    cols = store.read(0, len(store))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial.npz")
    save: Any = np.savez_compressed if compressed else np.savez
    try:
        save(
            tmp,
            **cols,
            episode_ends=store.episode_ends(),
            __attrs__=np.array(json.dumps(store.attrs)),
        )
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


# --------------------------------------------------------------------------- open_dataset
def detect_format(path: str | os.PathLike) -> str:
    """One of "idql", "d4rl-hdf5", "minari", "dp-zarr", "npz"; FileNotFoundError when
    ``path`` is neither a file, a directory nor a local Minari id, ValueError otherwise."""
    p = Path(path)
    if p.is_dir():
        if is_replay_store(p):
            return "idql"
        if (p / "data" / "metadata.json").is_file() or (p / "metadata.json").is_file():
            return "minari"
        if ((p / "zarr.json").is_file() or (p / ".zgroup").is_file()) and (
            p / "meta" / "episode_ends"
        ).is_dir():
            return "dp-zarr"
    elif p.is_file():
        with open(p, "rb") as f:
            head = f.read(8)
        if head == b"\x89HDF\r\n\x1a\n":
            return "d4rl-hdf5"
        if head[:4] == b"PK\x03\x04" or p.suffix == ".npz":
            return "npz"
    else:
        if not p.is_absolute():
            with contextlib.suppress(FileNotFoundError):
                _minari_data_path(str(path))
                return "minari"
        raise FileNotFoundError(
            f"{str(path)!r} does not exist"
            + ("" if p.is_absolute() else " (and is not a local Minari dataset id)")
        )
    raise ValueError(
        f"cannot tell the format of {path!r}: expected an idql replay store, a D4RL HDF5 file,"
        " a Minari dataset (dir or local id), a Diffusion Policy zarr or an npz"
    )


def _source_mtime_ns(p: Path) -> int:
    if p.is_file():
        return p.stat().st_mtime_ns
    newest = p.stat().st_mtime_ns
    for dirpath, _dirs, files in os.walk(p):
        for name in files:
            newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime_ns)
    return newest


def open_dataset(
    path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> ReplayStore:
    """Open any supported dataset as a read-only replay store.

    An idql store opens directly; anything else is imported once into
    ``cache_dir/<name>-<key>.idql.zarr``: name is the source's basename (for Minari, the
    dataset directory's, whether given by id or by path) and key the first 8 hex digits of
    the sha1 of the resolved source path (for Minari, its data/ directory), so sources
    that share a basename get separate caches. The default cache_dir is the directory the
    source is in; for Minari datasets it is ``$XDG_CACHE_HOME/idql-runtime``, outside
    minari's root. The import is reused while it is newer than the source and its
    attrs["source"]["path"] is that resolved path; otherwise it is imported again.
    """
    fmt = detect_format(path)
    if fmt == "idql":
        return ReplayStore.open(path, "r")
    if fmt == "minari":
        # what import_minari records as its source: the dataset's data/ directory
        source = _minari_data_path(str(path)).resolve()
        name = source.parent.name  # one cache per dataset, given by id or by directory
        if cache_dir is None:
            # not next to the dataset: minari lists every directory under its root
            xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            cache_dir = Path(xdg) / "idql-runtime"
    else:
        source = Path(path).resolve()
        name = Path(path).name
    key = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    cache = Path(cache_dir if cache_dir is not None else Path(path).parent)
    cache = cache / f"{name}-{key}.idql.zarr"
    if is_replay_store(cache):
        built = commit_record_path(cache).stat().st_mtime_ns
        if built > _source_mtime_ns(source):
            store = ReplayStore.open(cache, "r")
            if (store.attrs.get("source") or {}).get("path") == str(source):
                return store
            store.close()  # a cache of another source under this name (copied, or a hash clash)
    importers: dict[str, Callable[..., ReplayStore]] = {
        "d4rl-hdf5": import_d4rl_hdf5,
        "minari": import_minari,
        "dp-zarr": import_diffusion_policy_zarr,
        "npz": import_npz,
    }
    return importers[fmt](source, cache, overwrite=True)
