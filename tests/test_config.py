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
