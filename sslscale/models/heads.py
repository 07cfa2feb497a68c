"""Heads that map a representation z to what an objective compares."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, *, out_norm: bool, out_bias: bool = True) -> nn.Sequential:
    """Linear(no bias)-BN-ReLU blocks, then a last Linear (optionally followed by an affine-free BN)."""
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    blocks.append(nn.Linear(width, out_dim, bias=out_bias and not out_norm))
    if out_norm:
        blocks.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*blocks)


def low_rank_linear(in_dim: int, bottleneck: int, out_dim: int) -> nn.Sequential:
    """The DISSL student: linear in z, built low-rank (Linear-BN-Linear: no non-linearity)."""
    return nn.Sequential(nn.Linear(in_dim, bottleneck, bias=False), nn.BatchNorm1d(bottleneck),
                         nn.Linear(bottleneck, out_dim))


class NormalizedLinear(nn.Module):
    """Weight-normalised linear layer with the norm g fixed at 1 (DINO's last layer)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DinoHead(nn.Module):
    """Linear-BN-GELU-Linear to a bottleneck, L2-normalise, weight-normed Linear to K prototypes."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, n_prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = NormalizedLinear(bottleneck, n_prototypes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(z), dim=-1))
