"""Small building blocks shared by the encoders and the decoder.

The attribute names (``lin1``/``lin2``, ``weight``/``bias``) are part of the checkpoint format:
they must not change.
"""

from __future__ import annotations

from typing import Tuple, Type, Union

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Two linear layers with an activation in between (``lin1`` -> act -> ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).square().mean(dim=1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth: drops whole residual branches per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """Truncated normal init in [mean - 2, mean + 2] (the usual ViT initialisation)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=mean - 2.0, b=mean + 2.0)


def to_2tuple(x: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected 2 values, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)
