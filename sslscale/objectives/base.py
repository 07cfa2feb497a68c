from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslscale.objectives.gather import Gather


@dataclass
class ObjectiveContext:
    """What an objective may know about the run beyond its own config section."""

    feature_dim: int
    n_large_crops: int
    steps_per_epoch: float  # samples per epoch / global batch (schedules are in steps of a fixed global batch)
    total_steps: int
    encoder: nn.Module  # only DINO uses it (to build its EMA teacher)
    gather: Gather | None = None
    init: str = "torchvision"  # model.init: how the heads are initialised (sslscale/models/heads.py, init_head)


class Objective(nn.Module):
    """forward(features_per_crop, step, crops) -> (loss, logs); heads and any state live here, so the
    checkpoint saves them through state_dict()."""

    def after_backward(self, step: int) -> None:
        """Called between backward and the optimizer step (e.g. to cancel gradients)."""

    @torch.no_grad()
    def after_optimizer_step(self, step: int, encoder: nn.Module, skip: torch.Tensor) -> None:
        """Called after each optimizer step (e.g. EMA teachers). skip: 1.0 if the step's update was skipped
        (decided on the device; never read it on the host)."""
