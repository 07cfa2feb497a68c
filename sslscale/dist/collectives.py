"""Collectives that keep gradients: what makes a loss over the global batch differentiable on every rank."""
from __future__ import annotations

import torch
import torch.distributed as dist


class SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over ranks whose backward is the sum of the incoming gradients over ranks: each rank's
    input reaches every rank's output. (torch.distributed.nn.functional.all_reduce did this and is deprecated;
    the functional all_reduce that replaces it carries no gradient.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.contiguous().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


class AllGatherWithGrad:
    """Concatenates (or sums) a tensor over ranks, keeping gradients. The gather's backward sums every
    rank's gradient of the gathered rows onto the rank that owns them (a functional all-gather's
    reduce-scatter); the sum's backward all-reduces the incoming gradients (SumOverRanks). With gradients
    averaged over ranks, each rank then gets the gradient of the global objective."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol
        # all_gather_single_autograd is the current name (torch 2.14); all_gather_tensor_autograd the older one.
        gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
        return gather(x.contiguous(), gather_dim=0, group=dist.group.WORLD)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return SumOverRanks.apply(x)
