"""Typed configuration: YAML files in ``configs/`` map onto these dataclasses.

Every field carries a one-line ``help`` that the CLIs print (``--help-config``), and any
field can be overridden with ``--set section.field=value``. Defaults are the v2
reference code (idql-reference.md s6); ``version: v1`` switches every v1/v2 difference
to the paper-time values unless the file or ``--set`` names that field explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)  # type: ignore[misc]
    return field(default=default, metadata={"help": help}, **kw)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


@dataclass
class ScoreNetConfig:
    """LN-ResNet noise-prediction network (idql-reference.md s1)."""

    activation: str = _f("swish", "actor activation: swish (v2) or mish (v1)")
    time_dim: int = _f(128, "learnable Fourier time-feature width (v2 128, v1 64)")
    cond_hidden: list[int] = _f([256, 256], "cond-MLP widths (v2 (256,256), v1 (128,128))")
    hidden_dim: int = _f(256, "ResNet width")
    num_blocks: int = _f(3, "number of pre-LayerNorm residual blocks")
    expansion: int = _f(4, "inner width multiplier of each block")
    dropout: float = _f(0.1, "dropout inside blocks (training only)")
    layer_norm: bool = _f(True, "LayerNorm inside blocks")
    ln_eps: float = _f(1e-6, "LayerNorm epsilon (flax default 1e-6)")
    fourier_std: float = _f(0.2, "init std of the Fourier frequencies")

    def validate(self) -> None:
        _choice("network.activation", self.activation, ("swish", "mish", "relu"))
        _positive("network.time_dim", self.time_dim)
        if self.time_dim % 2:
            raise ConfigError(f"network.time_dim must be even, got {self.time_dim}")
        _positive("network.hidden_dim", self.hidden_dim)
        _positive_list("network.cond_hidden", self.cond_hidden)
        _integer("network.num_blocks", self.num_blocks, minimum=0)
        _positive("network.expansion", self.expansion)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"network.dropout must be in [0, 1), got {self.dropout}")
        _real("network.ln_eps", self.ln_eps, gt=0.0)
        _real("network.fourier_std", self.fourier_std, ge=0.0)


@dataclass
class DiffusionConfig:
    """Forward process and reverse sampler (idql-reference.md s2)."""

    steps: int = _f(5, "number of diffusion steps T")
    beta_schedule: str = _f("vp", "beta schedule: vp, cosine or linear")
    clip_sampler: bool = _f(True, "clip x_t to [-1, 1] after every reverse step")
    temperature: float = _f(1.0, "scale of the noise added at each reverse step t > 0")
    extra_final_steps: int = _f(0, "M: repeat the t=0 update this many more times")

    def validate(self) -> None:
        _positive("diffusion.steps", self.steps)
        _choice("diffusion.beta_schedule", self.beta_schedule, ("vp", "cosine", "linear"))
        # 0 is the deterministic reverse process (no noise added)
        _real("diffusion.temperature", self.temperature, ge=0.0)
        _integer("diffusion.extra_final_steps", self.extra_final_steps, minimum=0)


@dataclass
class CriticConfig:
    """Generalised IQL critic (paper Eq. 1, Sec. 4.1; idql-reference.md s3)."""

    num_qs: int = _f(2, "Q ensemble heads (target = min over heads)")
    hidden: list[int] = _f([256, 256], "Q and V hidden widths (ReLU)")
    value_loss: str = _f("expectile", "V loss: expectile, quantile or exponential")
    tau: float = _f(0.7, "expectile / quantile level (0.7 locomotion, 0.9 antmaze)")
    alpha: float = _f(1.0, "temperature of the exponential value loss (paper Eq. 11)")
    exp_clip: float | None = _f(
        None, "clip exp(alpha*u) in the exponential loss gradient (reference: 6.0); null = exact"
    )
    value_layer_norm: bool = _f(True, "LayerNorm on V's input (v2 True, v1 False)")
    discount: float = _f(0.99, "discount gamma")
    target_ema: float = _f(0.005, "target-Q EMA rate per critic step")

    def validate(self) -> None:
        _choice("critic.value_loss", self.value_loss, ("expectile", "quantile", "exponential"))
        if not 0.0 < self.tau < 1.0:
            raise ConfigError(f"critic.tau must be in (0, 1), got {self.tau}")
        _real("critic.alpha", self.alpha, gt=0.0)
        if self.num_qs < 1:
            raise ConfigError(f"critic.num_qs must be >= 1, got {self.num_qs}")
        _positive_list("critic.hidden", self.hidden)
        if self.exp_clip is not None:
            _real("critic.exp_clip", self.exp_clip, gt=0.0)
        if not 0.0 <= self.discount <= 1.0:
            raise ConfigError(f"critic.discount must be in [0, 1], got {self.discount}")
        # a rate of 0 would leave the target Q at its initial weights for the whole run
        _real("critic.target_ema", self.target_ema, gt=0.0, le=1.0)


@dataclass
class PolicyConfig:
    """How a decision extracts one action from the candidates (design.md)."""

    samples: int = _f(64, "N candidate actions per decision")
    mode: str = _f("argmax", "argmax (paper Eq. 13) or implicit (Algorithm 2, Thm 4.1 weights)")

    def validate(self) -> None:
        _positive("policy.samples", self.samples)
        _choice("policy.mode", self.mode, ("argmax", "implicit"))


# train.batch_source: where offline batches come from (idql_runtime/batches.py)
BATCH_SOURCES = ("auto", "host", "device")


@dataclass
class TrainConfig:
    """Offline pretraining (idql-reference.md s5, s6)."""

    algo: str = _f("idql", "idql, iql_awr (Gaussian AWR extraction, paper Eq. 3) or bc")
    iterations: int = _f(3_000_000, "training iterations (v2 3M, v1 1.5M)")
    batch_size: int = _f(512, "batch rows per iteration (v2 512, v1 2048)")
    critic_batch_rows: int | None = _f(
        None, "critic uses only the first rows of the batch (v1: 256); null = whole batch"
    )
    v1_double_actor_step: bool = _f(
        False, "replicate v1's bug: extra zero-gradient actor step + second EMA (s10.1)"
    )
    actor_lr: float = _f(3e-4, "actor AdamW peak learning rate")
    actor_weight_decay: float = _f(1e-4, "actor AdamW weight decay (v2 1e-4, v1 0)")
    lr_decay_steps: int = _f(3_000_000, "cosine decay of the actor LR to 0 over this many steps")
    critic_lr: float = _f(3e-4, "Q and V Adam learning rate (constant)")
    actor_ema: float = _f(0.001, "EMA rate of the sampling (target) score network")
    awr_temperature: float = _f(3.0, "beta of AWR weights exp(beta*A) (iql_awr)")
    awr_max_weight: float = _f(100.0, "clip of the AWR weights")
    reward_transform: str = _f(
        "locomotion", "locomotion (x1000/(max-min episode return)), antmaze (r-1) or none"
    )
    action_clip: float = _f(1.0 - 1e-5, "dataset actions clipped to +-this (D4RL)")
    val_fraction: float = _f(0.05, "held-out fraction of the dataset (reference 5 %)")
    seed: int = _f(0, "seed for every RNG (torch, sampling, split, envs)")
    threads: int = _f(0, "torch intra-op threads; 0 = leave torch's default")
    log_interval: int = _f(1000, "iterations between logged scalars")
    eval_interval: int = _f(250_000, "iterations between evaluation rounds (0 = never)")
    eval_episodes: int = _f(50, "episodes per evaluation round")
    eval_samples: list[int] = _f([16, 64, 256], "N values evaluated each round")
    checkpoint_interval: int = _f(50_000, "iterations between checkpoints")
    keep_checkpoints: int = _f(3, "newest checkpoints kept on disk (0 = keep all)")
    learner_backend: str = _f(
        "auto",
        "update step of idql-learner (offline and online): reference (Agent.update), "
        "eager, compile, cuda_graph or compile_cuda_graph (LearnerStep); auto = cuda_graph "
        "on a GPU for IDQL, reference otherwise",
    )
    tf32: bool = _f(False, "TF32 matmuls in the learner step on a GPU (faster, ~1e-3 rel.)")
    batch_source: str = _f(
        "auto",
        "where offline batches come from: host (numpy sampler, copied each iteration) or "
        "device (the training rows resident on the device, drawn there); auto = device on "
        "a GPU when the rows take <= 25 % of its memory, host otherwise",
    )

    def validate(self) -> None:
        _choice("train.algo", self.algo, ("idql", "iql_awr", "bc"))
        _choice("train.batch_source", self.batch_source, BATCH_SOURCES)
        _choice(
            "train.learner_backend",
            self.learner_backend,
            ("auto", "reference", "eager", "compile", "cuda_graph", "compile_cuda_graph"),
        )
        _choice("train.reward_transform", self.reward_transform, ("locomotion", "antmaze", "none"))
        _positive("train.batch_size", self.batch_size)
        if self.iterations < 0:
            raise ConfigError(f"train.iterations must be >= 0, got {self.iterations}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"train.val_fraction must be in [0, 1), got {self.val_fraction}")
        _positive("train.checkpoint_interval", self.checkpoint_interval)
        _positive("train.log_interval", self.log_interval)
        if self.critic_batch_rows is not None:
            _positive("train.critic_batch_rows", self.critic_batch_rows)
        _integer("train.lr_decay_steps", self.lr_decay_steps, minimum=0)
        _real("train.actor_lr", self.actor_lr, ge=0.0)
        _real("train.actor_weight_decay", self.actor_weight_decay, ge=0.0)
        _real("train.critic_lr", self.critic_lr, ge=0.0)
        _real("train.actor_ema", self.actor_ema, gt=0.0, le=1.0)
        _real("train.awr_temperature", self.awr_temperature, ge=0.0)
        _real("train.awr_max_weight", self.awr_max_weight, gt=0.0)
        # the sampler's actions live in [-1, 1]: a wider clip trains on unreachable actions
        _real("train.action_clip", self.action_clip, gt=0.0, le=1.0)
        _integer("train.seed", self.seed, minimum=0)  # numpy's generators refuse negatives
        _integer("train.threads", self.threads, minimum=0)
        _integer("train.eval_interval", self.eval_interval, minimum=0)
        _positive("train.eval_episodes", self.eval_episodes)
        _positive_list("train.eval_samples", self.eval_samples)
        _integer("train.keep_checkpoints", self.keep_checkpoints, minimum=0)


@dataclass
class OnlineConfig:
    """Online finetuning by the learner process (idql-reference.md s7)."""

    warmup_transitions: int = _f(
        5000, "online transitions stored before updates start (0 = from the first batch)"
    )
    batch_size: int = _f(256, "critic batch (reference: 128 online + 128 offline)")
    online_fraction: float = _f(0.5, "share of each batch drawn from the online store")
    updates_per_transition: float = _f(
        1.0, "update-to-data ratio (0 = only collect transitions, never update)"
    )
    finetune_actor: bool = _f(False, "also update the behaviour model (paper variant 2)")
    publish_every: int = _f(100, "updates between weight broadcasts")
    checkpoint_interval_s: float = _f(
        60.0, "seconds between periodic checkpoints (0 = after every loop that ran updates)"
    )
    max_updates_per_poll: int = _f(32, "cap on updates between two network polls")
    max_update_burst_s: float = _f(
        0.1, "cap on seconds of updates between two network polls (acks wait for a poll)"
    )

    def validate(self) -> None:
        # 0 is meaningful (train once rows arrive: updates are owed only by ingested rows,
        # so the store is never empty when the first batch is sampled); < 0 is not
        _integer("online.warmup_transitions", self.warmup_transitions, minimum=0)
        # 0 rows give NaN losses silently, < 0 fails deep inside the sampler
        _positive("online.batch_size", self.batch_size)
        if not 0.0 <= self.online_fraction <= 1.0:
            raise ConfigError(
                f"online.online_fraction must be in [0, 1], got {self.online_fraction}"
            )
        # inf would overflow int(owed_updates); NaN would never train, silently
        _real("online.updates_per_transition", self.updates_per_transition, ge=0.0)
        _positive("online.publish_every", self.publish_every)
        _real("online.checkpoint_interval_s", self.checkpoint_interval_s, ge=0.0)
        # 0 would cap every burst at no updates: the learner would never train
        _positive("online.max_updates_per_poll", self.max_updates_per_poll)
        _real("online.max_update_burst_s", self.max_update_burst_s, gt=0.0)


@dataclass
class Config:
    """Everything an IDQL run needs."""

    version: str = _f("v2", "reference-code version whose defaults apply: v2 (HEAD) or v1 (paper)")
    env_id: str | None = _f(None, "gymnasium env for evaluation (default: the dataset's env_id)")
    network: ScoreNetConfig = field(default_factory=ScoreNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def validate(self) -> Config:
        _choice("version", self.version, ("v1", "v2"))
        for sub in (
            self.network,
            self.diffusion,
            self.critic,
            self.policy,
            self.train,
            self.online,
        ):
            sub.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# Paper-time (v1) values of every field that differs from v2 (idql-reference.md s0, s1.2, s6).
V1_DEFAULTS: dict[str, Any] = {
    "network.activation": "mish",
    "network.time_dim": 64,
    "network.cond_hidden": [128, 128],
    "critic.value_layer_norm": False,
    "train.iterations": 1_500_001,
    "train.batch_size": 2048,
    "train.critic_batch_rows": 256,
    "train.v1_double_actor_step": True,
    "train.actor_weight_decay": 0.0,
    "train.eval_samples": [16, 32, 64, 128, 256],
}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _integer(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive_list(name: str, values: Any) -> None:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ConfigError(f"{name} must be a list of positive integers, got {values!r}")


def _real(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> None:
    """A finite number within the bounds given. Written as "ok unless", so that NaN (which
    fails every comparison) is refused instead of slipping past a ``value < 0`` test."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (gt is None or value > gt)
        and (ge is None or value >= ge)
        and (le is None or value <= le)
    )
    if not ok:
        bounds = [f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<=", le)) if b is not None]
        raise ConfigError(f"{name} must be a finite number {' and '.join(bounds)}, got {value!r}")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if v is None and key in _SECTIONS:
            continue  # an empty YAML section (every field commented out): the defaults
        if isinstance(v, dict) and key in _SECTIONS:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_SECTIONS = {f.name for f in fields(Config) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore[arg-type]


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ConfigError(f"unknown config field {cls.__name__}.{name}")
    return hints[name]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML/CLI value to the field's declared type, naming the field on error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value) if isinstance(value, int) else int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if value is None:
            raise ConfigError(f"{key} must be a string, got None")
        return str(value)
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    obj: Any = cfg
    for p in parts[:-1]:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise ConfigError(f"unknown config section {p!r} in {key!r}")
        obj = getattr(obj, p)
    name = parts[-1]
    tp = _field_type(type(obj), name)
    if dataclasses.is_dataclass(tp):
        # a scalar in place of a whole section would only fail later, in validate()
        raise ConfigError(
            f"{key} is a config section, not a field: set its fields one by one "
            f"({key}.FIELD=VALUE), got {key}={value!r}"
        )
    setattr(obj, name, _coerce(key, value, tp))


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.seed=3", "policy.mode=implicit"]`` -> dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config from an optional YAML file and ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = _flatten(loaded)
    raw.update(overrides or {})
    return config_from_flat(raw)


def config_from_flat(raw: dict[str, Any]) -> Config:
    cfg = Config()
    version = raw.get("version", "v2")
    if version == "v1":
        for k, v in V1_DEFAULTS.items():
            if k not in raw:
                _set(cfg, k, v)
    for k, v in raw.items():
        _set(cfg, k, v)
    return cfg.validate()


def config_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of ``Config.to_dict`` (used by checkpoints)."""
    return config_from_flat(_flatten(d))


# Fields a checkpoint's weights were built or trained with, and the fields that fix its
# data split and reward scale: once a run has a checkpoint, a resume (offline --resume, the
# online learner) may change anything else but not these. network.*: the score network's
# shapes and the module settings it was built with (dropout and LayerNorm epsilon live
# in the modules); diffusion.steps / beta_schedule: the schedule the network was trained
# to denoise (other values load the weights and give wrong actions); critic sizes;
# train.algo: which modules exist; seed / val_fraction: which rows were held out;
# reward_transform: fitted once and kept in the checkpoint's metadata.
FIXED_BY_CHECKPOINT: tuple[str, ...] = (
    "version",
    *(f"network.{f.name}" for f in fields(ScoreNetConfig)),
    "diffusion.steps",
    "diffusion.beta_schedule",
    "critic.num_qs",
    "critic.hidden",
    "critic.value_layer_norm",
    "train.algo",
    "train.seed",
    "train.val_fraction",
    "train.reward_transform",
)


def changed_fields(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every field that differs, in field order."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return [(k, a[k], b[k]) for k in a if a[k] != b.get(k)]


ONLINE_FIXED: tuple[str, ...] = tuple(
    f for f in FIXED_BY_CHECKPOINT if f not in ("train.seed", "train.val_fraction")
)
"""What the online learner keeps from its checkpoint. A finetuning run may take another
seed (several seeds of finetuning from one pretrained checkpoint) or another
``val_fraction`` (0: mix every ``--offline`` row in); either changes which offline rows
are held out of the mix, which only pretraining's validation loss depended on."""


def check_fixed_by_checkpoint(
    saved: Config, new: Config, *, what: str, fixed: tuple[str, ...] = FIXED_BY_CHECKPOINT
) -> None:
    """ConfigError naming each field of ``fixed`` that ``new`` changes.

    ``what`` says where ``new`` came from (e.g. "--set"), for the message."""
    bad = [(k, o, n) for k, o, n in changed_fields(saved, new) if k in fixed]
    if bad:
        diffs = ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in bad)
        raise ConfigError(
            f"{what} changes fields the checkpoint was trained with: {diffs}. These are "
            "fixed once a run has weights (they shape the networks, the diffusion schedule "
            "the score network denoises, the held-out rows or the reward scale); start a "
            "new run to change them"
        )


def resume_config(
    saved: Config, path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """The config a resumed run continues on: ``path``'s (the first run's YAML, if given
    again) or else the saved one, with ``overrides`` on top; refused (ConfigError) when it
    changes a ``FIXED_BY_CHECKPOINT`` field."""
    if path is not None:
        cfg = load_config(path, overrides)
    else:
        cfg = config_from_flat({**_flatten(saved.to_dict()), **(overrides or {})})
    check_fixed_by_checkpoint(saved, cfg, what="--config / --set" if path else "--set")
    return cfg


def describe_fields() -> str:
    """Every field with its type, default and help line (printed by ``--help-config``)."""
    lines = []
    defaults = Config()
    for f in fields(Config):
        val = getattr(defaults, f.name)
        if dataclasses.is_dataclass(val):
            lines.append(
                f"{f.name}:  # {(type(val).__doc__ or '').splitlines()[0] if type(val).__doc__ else ''}"
            )
            for g in fields(val):
                lines.append(
                    f"  {f.name}.{g.name} = {getattr(val, g.name)!r}    {g.metadata.get('help', '')}"
                )
        else:
            lines.append(f"{f.name} = {val!r}    {f.metadata.get('help', '')}")
    return "\n".join(lines)
