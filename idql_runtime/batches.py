"""Training batches: from the host sampler, or drawn on the device from resident rows.

Why the device source exists: on a GPU one learner iteration is one CUDA-graph replay
(0.6-1.2 ms on an H200), but a host batch costs a numpy draw and gather and five
pageable host -> device copies, and a pageable copy waits for the stream to drain. So
with host batches the GPU idles while the host prepares every next batch. With
``train.batch_source=device`` the training rows (reward transform and action clip
already applied) are copied to the device once; a batch is one ``randint`` from a device
generator and one ``index_select`` per field, written straight into the learner step's
static inputs. No host work and no sync per iteration: the host queues iterations ahead
of the GPU.

The two sources draw different (equally uniform) index streams, so a run's numbers
depend on which one it used; each is exactly resumable (the trainer checkpoints both
the numpy sampler's state and the device generator's).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from idql_runtime.agent import to_tensors
from idql_runtime.config import BATCH_SOURCES
from idql_runtime.envs import RewardTransform

log = logging.getLogger(__name__)

BATCH_FIELDS = ("obs", "action", "reward", "next_obs", "terminated")
# auto keeps the rows on a GPU only while they take at most this share of its memory.
AUTO_DEVICE_SHARE = 0.25
_CHUNK_ROWS = 1 << 16


def prepare_batch(
    batch: dict[str, np.ndarray],
    transform: RewardTransform,
    action_clip: float,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Reward transform, D4RL action clip, numpy -> tensors."""
    b = dict(batch)
    b["reward"] = transform(np.asarray(b["reward"], dtype=np.float32))
    b["action"] = np.clip(b["action"], -action_clip, action_clip)
    return to_tensors(b, device)


def resident_bytes(rows: int, obs_dim: int, act_dim: int) -> int:
    """Device bytes of ``rows`` training rows: obs, next_obs, action, reward (float32),
    terminated (bool)."""
    return rows * ((2 * obs_dim + act_dim + 1) * 4 + 1)


def resolve_batch_source(source: str, device: torch.device, nbytes: int) -> tuple[str, str]:
    """(``host`` or ``device``, why) for ``train.batch_source``; ``nbytes`` is what the
    resident rows would take."""
    if source not in BATCH_SOURCES:
        raise ValueError(f"train.batch_source must be one of {BATCH_SOURCES}, got {source!r}")
    size = f"{nbytes / 2**20:.0f} MiB of rows"
    if source != "auto":
        return source, f"train.batch_source={source} ({size})"
    if device.type != "cuda":
        return "host", f"auto on {device.type}: host batches (nothing to copy on a CPU)"
    total = torch.cuda.get_device_properties(device).total_memory
    if nbytes > AUTO_DEVICE_SHARE * total:
        return "host", (
            f"auto: {size}, more than {AUTO_DEVICE_SHARE:.0%} of the "
            f"GPU's {total / 2**30:.0f} GiB; host batches (train.batch_source=device forces it)"
        )
    return "device", f"auto on cuda: {size} resident on the GPU"


class DeviceBatches:
    """Every row of ``sampler`` resident on ``device``, batches drawn there.

    Rows go through ``prepare_batch`` (the same transform and clip as host batches, so a
    row's values are bit-identical either way), in chunks of 65536 so that host memory
    stays small. ``sample`` draws indices uniformly with replacement from ``generator``
    (which must live on ``device``; the caller checkpoints it).
    """

    def __init__(
        self,
        sampler: Any,
        transform: RewardTransform,
        action_clip: float,
        device: torch.device | str,
        generator: torch.Generator,
    ) -> None:
        self.device = torch.device(device)
        if generator.device.type != self.device.type:
            raise ValueError(
                f"the batch generator is on {generator.device}, the rows go to {self.device}"
            )
        self.rows = len(sampler)
        if self.rows == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.generator = generator
        parts: dict[str, list[Tensor]] = {k: [] for k in BATCH_FIELDS}
        for start in range(0, self.rows, _CHUNK_ROWS):
            pos = np.arange(start, min(self.rows, start + _CHUNK_ROWS))
            chunk = prepare_batch(sampler.take(pos), transform, action_clip, self.device)
            for k in BATCH_FIELDS:
                parts[k].append(chunk[k])
        self.data = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}
        self.nbytes = sum(t.numel() * t.element_size() for t in self.data.values())

    def draw_indices(self, batch_size: int) -> Tensor:
        return torch.randint(
            0, self.rows, (batch_size,), generator=self.generator, device=self.device
        )

    def sample(self, batch_size: int, out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """A batch of ``batch_size`` rows; with ``out`` (e.g. a captured learner step's
        static inputs, of that batch size) the rows are gathered into those tensors."""
        idx = self.draw_indices(batch_size)
        if out is None:
            return {k: v.index_select(0, idx) for k, v in self.data.items()}
        for k, v in self.data.items():
            dst = out[k]
            if dst.shape[:1] != (batch_size,) or dst.shape[1:] != v.shape[1:]:
                # index_select would resize it: a captured graph would read freed memory
                raise ValueError(
                    f"out[{k!r}] has shape {tuple(dst.shape)}, a batch of {batch_size} rows "
                    f"needs {(batch_size, *v.shape[1:])}"
                )
            torch.index_select(v, 0, idx, out=dst)
        return out
