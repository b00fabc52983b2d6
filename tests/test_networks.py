"""Network sizes and initialisations against idql-reference.md s1.2, s3 and s12."""

from __future__ import annotations

import math

import pytest
import torch

from idql_runtime.config import Config, load_config
from idql_runtime.networks import (
    FourierFeatures,
    QEnsemble,
    ScoreNetwork,
    ValueNetwork,
    count_parameters,
)

# (obs, act) -> (actor v2, actor v1, Q ensemble, V v2): reference s1.2, from the repo modules.
REFERENCE_COUNTS = {
    (11, 3): (1_747_267, 1_640_483, 139_778, 69_143),
    (17, 6): (1_750_342, 1_643_558, 144_386, 70_691),
    (29, 8): (1_754_440, 1_647_656, 151_554, 73_787),
}


@pytest.mark.parametrize("dims", list(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(dims: tuple[int, int]) -> None:
    obs, act = dims
    v2, v1 = Config(), load_config(overrides={"version": "v1"})
    actor_v2, actor_v1, q_count, v_count = REFERENCE_COUNTS[dims]
    assert count_parameters(ScoreNetwork(obs, act, v2.network)) == actor_v2
    assert count_parameters(ScoreNetwork(obs, act, v1.network)) == actor_v1
    assert count_parameters(QEnsemble(obs, act, v2.critic)) == q_count
    assert count_parameters(ValueNetwork(obs, v2.critic)) == v_count
    # v1's V has no input LayerNorm: 2 * obs_dim fewer parameters
    assert count_parameters(ValueNetwork(obs, v1.critic)) == v_count - 2 * obs


def test_layernorm_eps_and_activations_per_version() -> None:
    v2 = ScoreNetwork(11, 3, Config().network)
    v1 = ScoreNetwork(11, 3, load_config(overrides={"version": "v1"}).network)
    assert v2.blocks[0].norm.eps == 1e-6
    assert isinstance(v2.act, torch.nn.SiLU) and isinstance(v1.act, torch.nn.Mish)
    assert v2.time.weight.shape == (64, 1) and v1.time.weight.shape == (32, 1)


def test_initialisations_have_reference_statistics() -> None:
    torch.manual_seed(0)
    net = ScoreNetwork(17, 6, Config().network)
    # Fourier W ~ N(0, 0.2^2)
    assert abs(net.time.weight.std().item() - 0.2) < 0.04
    # block Dense: lecun truncated normal, std sqrt(1/fan_in), bounded by 2 * sigma / 0.8796
    w = net.blocks[0].fc1.weight
    assert abs(w.std().item() - math.sqrt(1 / 256)) < 0.05 * math.sqrt(1 / 256)
    assert w.abs().max().item() <= 2 * math.sqrt(1 / 256) / 0.87962566 + 1e-6
    # xavier uniform on the input projection: bound sqrt(6 / (fan_in + fan_out)), zero bias
    bound = math.sqrt(6 / (net.inp.in_features + net.inp.out_features))
    assert net.inp.weight.abs().max().item() <= bound
    assert net.inp.weight.abs().max().item() > 0.9 * bound
    assert torch.count_nonzero(net.inp.bias) == 0
    assert all(torch.count_nonzero(b.fc1.bias) == 0 for b in net.blocks)


def test_fourier_features_formula() -> None:
    ff = FourierFeatures(8)
    t = torch.tensor([[3.0]])
    f = 2 * math.pi * 3.0 * ff.weight[:, 0]
    expected = torch.cat([torch.cos(f), torch.sin(f)])
    torch.testing.assert_close(ff(t)[0], expected)


def test_q_ensemble_heads_are_independent_mlps() -> None:
    torch.manual_seed(1)
    q = QEnsemble(5, 2, Config().critic)
    obs, act = torch.randn(7, 5), torch.randn(7, 2)
    out = q(obs, act)
    assert out.shape == (2, 7)
    for e in range(2):
        x = torch.cat([obs, act], -1)
        for i, layer in enumerate(q.layers):
            x = x @ layer.weight[e] + layer.bias[e]
            if i < len(q.layers) - 1:
                x = torch.relu(x)
        torch.testing.assert_close(out[e], x.squeeze(-1))
    assert not torch.allclose(out[0], out[1])
