"""Config files, overrides, v1/v2 switches and error messages that name the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from idql_runtime.config import (
    V1_DEFAULTS,
    ConfigError,
    config_from_dict,
    describe_fields,
    load_config,
    parse_overrides,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load_with_reference_values() -> None:
    loco = load_config(CONFIGS / "locomotion.yaml")
    ant = load_config(CONFIGS / "antmaze.yaml")
    assert (loco.critic.tau, ant.critic.tau) == (0.7, 0.9)
    assert (loco.train.reward_transform, ant.train.reward_transform) == ("locomotion", "antmaze")
    assert loco.train.batch_size == 512 and loco.train.iterations == 3_000_000
    assert loco.train.actor_weight_decay == 1e-4 and loco.network.activation == "swish"
    assert load_config(CONFIGS / "demo.yaml").train.iterations < 10_000


def test_v1_switch_sets_every_difference_unless_named() -> None:
    cfg = load_config(overrides={"version": "v1", "train.batch_size": 1024})
    assert cfg.network.activation == "mish" and cfg.network.time_dim == 64
    assert cfg.network.cond_hidden == [128, 128] and not cfg.critic.value_layer_norm
    assert cfg.train.actor_weight_decay == 0.0 and cfg.train.critic_batch_rows == 256
    assert cfg.train.batch_size == 1024  # explicit override wins over the v1 preset
    assert len(V1_DEFAULTS) >= 8


def test_overrides_are_typed_and_round_trip() -> None:
    cfg = load_config(
        CONFIGS / "locomotion.yaml",
        parse_overrides(
            [
                "train.seed=7",
                "policy.mode=implicit",
                "critic.exp_clip=6",
                "train.eval_samples=[8, 16]",
            ]
        ),
    )
    assert cfg.train.seed == 7 and cfg.policy.mode == "implicit" and cfg.critic.exp_clip == 6.0
    assert cfg.train.eval_samples == [8, 16]
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"critic.tau": 1.5}, "critic.tau must be in (0, 1), got 1.5"),
        ({"policy.mode": "greedy"}, "'greedy'"),
        ({"train.batch_size": "many"}, "train.batch_size must be an integer, got 'many'"),
        ({"train.nonsense": 1}, "unknown config field TrainConfig.nonsense"),
        ({"diffusion.beta_schedule": "sigmoid"}, "'sigmoid'"),
    ],
)
def test_bad_values_are_named(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=override)
    assert needle in str(e.value)


def test_every_field_has_help() -> None:
    text = describe_fields()
    for line in text.splitlines():
        if " = " in line:
            assert len(line.split("    ", 1)[-1].strip()) > 5, line


@pytest.mark.parametrize(
    "item,needle",
    [
        # batch_size -5 used to fail later with numpy's "negative dimensions are not
        # allowed", 0 to train on empty batches with NaN losses; a poll cap of 0 or a
        # NaN update ratio never trained, silently
        ("online.batch_size=-5", "online.batch_size must be a positive integer, got -5"),
        ("online.batch_size=0", "online.batch_size must be a positive integer, got 0"),
        ("online.max_updates_per_poll=0", "online.max_updates_per_poll must be a positive"),
        ("online.warmup_transitions=-1", "online.warmup_transitions must be an integer >= 0"),
        ("online.checkpoint_interval_s=-1", "checkpoint_interval_s must be a finite number >= 0"),
        ("online.checkpoint_interval_s=nan", "online.checkpoint_interval_s must be a finite"),
        ("online.updates_per_transition=.nan", "got nan"),
        ("online.updates_per_transition=inf", "online.updates_per_transition must be a finite"),
        ("online.max_update_burst_s=0", "online.max_update_burst_s must be a finite number > 0"),
        ("online.max_update_burst_s=inf", "online.max_update_burst_s must be a finite number"),
        ("online.publish_every=0", "online.publish_every must be a positive integer, got 0"),
        # the same gap in the other sections: NaN slipped past `x < 0` / `x <= 0` tests
        ("diffusion.temperature=nan", "diffusion.temperature must be a finite number >= 0"),
        ("critic.alpha=nan", "critic.alpha must be a finite number > 0, got nan"),
        ("critic.target_ema=0", "critic.target_ema must be a finite number > 0 and <= 1"),
        ("train.critic_batch_rows=0", "train.critic_batch_rows must be a positive integer"),
        ("train.actor_ema=1.5", "train.actor_ema must be a finite number > 0 and <= 1, got 1.5"),
        ("train.seed=-1", "train.seed must be an integer >= 0, got -1"),
        ("train.eval_samples=[16, 0]", "train.eval_samples must be a list of positive integers"),
        ("network.cond_hidden=[0, 16]", "network.cond_hidden must be a list of positive"),
    ],
)
def test_bad_counts_and_rates_are_refused_naming_the_value(item: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=parse_overrides([item]))
    assert needle in str(e.value)


def test_zeros_with_a_documented_meaning_are_accepted() -> None:
    """0 rows of warm-up (train once rows arrive), a 0 s checkpoint interval (after every
    loop that ran updates, as the crash tests use), an update ratio of 0 (collect only),
    keep 0 checkpoints (keep all), temperature 0 (deterministic reverse process)."""
    zeros = {
        "online.warmup_transitions": 0,
        "online.checkpoint_interval_s": 0,
        "online.updates_per_transition": 0,
        "train.keep_checkpoints": 0,
        "train.eval_interval": 0,
        "diffusion.temperature": 0,
    }
    cfg = load_config(overrides=zeros)
    got = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in zeros}
    assert got == zeros


@pytest.mark.parametrize("item", ["train=3", "online=null", "network=[1, 2]"])
def test_a_scalar_in_place_of_a_section_names_the_key(item: str) -> None:
    """`--set train=3` used to end in AttributeError: 'int' object has no attribute
    'validate'."""
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{key} is a config section, not a field"):
        load_config(overrides=parse_overrides([item]))


def test_yaml_section_scalar_is_refused_and_empty_section_means_defaults(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train is a config section.*got train=3"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"  # every field of the section commented out
    empty.write_text("online:\n  # batch_size: 128\ntrain:\n  seed: 4\n")
    cfg = load_config(empty)
    assert cfg.online.batch_size == 256 and cfg.train.seed == 4
