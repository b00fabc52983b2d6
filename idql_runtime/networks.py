"""Networks of IDQL: the LN-ResNet noise predictor, the Q ensemble and V.

Sizes, activations, LayerNorm epsilon and initialisations follow idql-reference.md s1
and s3 (the jaxrl5 modules): xavier-uniform kernels with zero bias everywhere except the
two Dense layers inside each residual block, which use flax's default lecun-normal
(truncated normal, fan-in). Parameter counts for hopper (obs 11, act 3) are 1,747,267
(score network, v2), 139,778 (Q ensemble) and 69,143 (V, v2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idql_runtime import onednn
from idql_runtime.config import CriticConfig, ScoreNetConfig

# flax's lecun_normal: truncated normal on [-2, 2] scaled so the std is sqrt(1/fan_in);
# 0.87962566 is the std of a standard normal truncated to [-2, 2].
_TRUNC_STD = 0.87962566103423978


def lecun_truncated_(weight: Tensor) -> Tensor:
    """In-place flax ``lecun_normal`` init of a torch (out, in) weight."""
    fan_in = weight.shape[-1]
    std = math.sqrt(1.0 / fan_in) / _TRUNC_STD
    with torch.no_grad():
        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    return weight


def xavier_linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def activation(name: str) -> nn.Module:
    return {"swish": nn.SiLU, "mish": nn.Mish, "relu": nn.ReLU}[name]()


class FourierFeatures(nn.Module):
    """Learnable Fourier time features: t (..., 1) -> [cos 2*pi*t*W^T, sin 2*pi*t*W^T]."""

    def __init__(self, time_dim: int, std: float = 0.2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(time_dim // 2, 1) * std)

    def forward(self, t: Tensor) -> Tensor:
        f = 2.0 * math.pi * t @ self.weight.T
        return torch.cat([torch.cos(f), torch.sin(f)], dim=-1)


class BlockLinear(nn.Linear):
    """nn.Linear whose products run on oneDNN while training on the CPU in float32
    (onednn.py: ~2x MKL's rate for these 256 x 1024 shapes on AMD). Everywhere else
    (inference, float64, CUDA, inside torch.compile) it is exactly nn.Linear."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.training  # first: inference (the eager decision) stops at one attribute
            and not torch.compiler.is_compiling()  # dynamo folds it and stops here
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and torch.is_grad_enabled()
            and onednn.training_enabled()
        ):
            return onednn.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class ResidualBlock(nn.Module):
    """Pre-norm block: x + Dense(act(Dense_4h(LN(Dropout(x)))))."""

    def __init__(self, dim: int, cfg: ScoreNetConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm: nn.Module = (
            nn.LayerNorm(dim, eps=cfg.ln_eps) if cfg.layer_norm else nn.Identity()
        )
        self.fc1 = BlockLinear(dim, dim * cfg.expansion)
        self.fc2 = BlockLinear(dim * cfg.expansion, dim)
        for fc in (self.fc1, self.fc2):
            lecun_truncated_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.act = activation(cfg.activation)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(self.dropout(x)))))


class ScoreNetwork(nn.Module):
    """eps_theta(s, a_t, t): the noise predictor.

    Input order is [a_t, s, cond(t)] (reference s1.1); ``t`` is the integer step index
    as a float, shape (B, 1). Shapes: obs (B, obs_dim), x (B, act_dim) -> (B, act_dim).
    """

    def __init__(self, obs_dim: int, act_dim: int, cfg: ScoreNetConfig) -> None:
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.time = FourierFeatures(cfg.time_dim, cfg.fourier_std)
        widths = [cfg.time_dim, *cfg.cond_hidden]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(xavier_linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(activation(cfg.activation))
        self.cond = nn.Sequential(*layers)
        self.cond_dim = widths[-1]
        self.inp = xavier_linear(act_dim + obs_dim + self.cond_dim, cfg.hidden_dim)
        self.blocks = nn.ModuleList(
            ResidualBlock(cfg.hidden_dim, cfg) for _ in range(cfg.num_blocks)
        )
        self.act = activation(cfg.activation)
        self.out = xavier_linear(cfg.hidden_dim, act_dim)

    def time_embedding(self, t: Tensor) -> Tensor:
        return self.cond(self.time(t))

    def trunk(self, h: Tensor) -> Tensor:
        """Everything after the input projection: blocks, activation, output layer."""
        for block in self.blocks:
            h = block(h)
        return self.out(self.act(h))

    def forward(self, obs: Tensor, x: Tensor, t: Tensor) -> Tensor:
        h = self.inp(torch.cat([x, obs, self.time_embedding(t)], dim=-1))
        return self.trunk(h)

    def split_input_weight(self) -> tuple[Tensor, Tensor, Tensor]:
        """The input projection's kernel split by input: (W_action, W_obs, W_cond).

        Lets a decision compute the observation's and the time step's share of the first
        layer once instead of N*T times (design.md, "The decision").
        """
        w = self.inp.weight
        a, o = self.act_dim, self.obs_dim
        return w[:, :a], w[:, a : a + o], w[:, a + o :]


class EnsembleLinear(nn.Module):
    """E independent dense layers applied in one batched matmul: (E, B, in) -> (E, B, out)."""

    def __init__(self, ensemble: int, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(ensemble, 1, n_out))
        for e in range(ensemble):
            # xavier on the (out, in) view of each head, as flax's vmap-ed Dense does per head
            nn.init.xavier_uniform_(self.weight.data[e].T)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class QEnsemble(nn.Module):
    """Q_i(s, a) for i in 1..E: concat[s, a] -> (Dense 256, ReLU) x2 -> Dense 1.

    Shapes: obs (B, obs_dim), action (B, act_dim) -> (E, B).
    """

    def __init__(self, obs_dim: int, act_dim: int, cfg: CriticConfig) -> None:
        super().__init__()
        self.obs_dim, self.act_dim, self.num_qs = obs_dim, act_dim, cfg.num_qs
        widths = [obs_dim + act_dim, *cfg.hidden, 1]
        self.layers = nn.ModuleList(
            EnsembleLinear(cfg.num_qs, widths[i], widths[i + 1]) for i in range(len(widths) - 1)
        )

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.forward_hidden0(self.first_obs_share(obs), action)

    def first_obs_share(self, obs: Tensor) -> Tensor:
        """The observation's share of layer 0 incl. bias: (E, B, hidden0)."""
        first: EnsembleLinear = self.layers[0]  # type: ignore[assignment]
        return torch.matmul(obs.unsqueeze(0), first.weight[:, : self.obs_dim]) + first.bias

    def forward_hidden0(self, obs_share: Tensor, action: Tensor) -> Tensor:
        """Q from a precomputed observation share (E, B, h0) and actions (B, act_dim) -> (E, B)."""
        w_a = self.layers[0].weight[:, self.obs_dim :]  # type: ignore[index]
        h = torch.relu(obs_share + torch.matmul(action.unsqueeze(0), w_a))
        for layer in self.layers[1:-1]:
            h = torch.relu(layer(h))
        return self.layers[-1](h).squeeze(-1)


class ValueNetwork(nn.Module):
    """V(s): [LayerNorm on the input (v2)] -> (Dense 256, ReLU) x2 -> Dense 1. (B, obs) -> (B,)."""

    def __init__(self, obs_dim: int, cfg: CriticConfig) -> None:
        super().__init__()
        self.norm: nn.Module = (
            nn.LayerNorm(obs_dim, eps=1e-6) if cfg.value_layer_norm else nn.Identity()
        )
        widths = [obs_dim, *cfg.hidden, 1]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(xavier_linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, obs: Tensor) -> Tensor:
        return self.mlp(self.norm(obs)).squeeze(-1)


class GaussianPolicy(nn.Module):
    """Baseline policy for IQL-AWR and BC: tanh-squashed mean, state-independent log std.

    As in IQL's reference: MLP(256, 256, ReLU) -> mean; log_std a free parameter clipped to
    [-5, 2]. Shapes: obs (B, obs_dim) -> mean (B, act_dim), log_std (act_dim,).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int]) -> None:
        super().__init__()
        widths = [obs_dim, *hidden]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers += [xavier_linear(widths[i], widths[i + 1]), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.mean = xavier_linear(widths[-1], act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(self.mean(self.body(obs))), self.log_std.clamp(-5.0, 2.0)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        mean, log_std = self(obs)
        var = torch.exp(2 * log_std)
        return (-0.5 * (action - mean) ** 2 / var - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
