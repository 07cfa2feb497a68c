"""The model a run trains: the trunk (encoder) and the objective with its heads and state."""
from __future__ import annotations

import torch
from torch import nn

from sslscale.config import Config
from sslscale.models import build_trunk, encode_crops
from sslscale.objectives import ObjectiveContext, build_objective


class SSLModel(nn.Module):
    """Encoder + objective (heads and state): the one module a data-parallel wrapper wraps."""

    def __init__(self, encoder: nn.Module, objective: nn.Module):
        super().__init__()
        self.encoder, self.objective = encoder, objective

    def forward(self, crops: list[torch.Tensor], step: int):
        return self.objective(encode_crops(self.encoder, crops), step, crops)


def build_model(cfg: Config, *, steps_per_epoch: float, total_steps: int, gather=None) -> SSLModel:
    encoder = build_trunk(cfg.model)
    ctx = ObjectiveContext(feature_dim=encoder.out_dim, n_large_crops=cfg.data.crops[0].count,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps, encoder=encoder, gather=gather,
                           init=cfg.model.init)
    return SSLModel(encoder, build_objective(cfg.objective, ctx))
