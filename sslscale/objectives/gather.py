"""How a loss reaches the other ranks' rows.

A loss takes `gather=None` (one process) or an object with `rank`, `world_size`,
`__call__(x) -> cat of x over ranks` and `sum(x) -> sum of x over ranks`. Both must keep gradients,
and their backward must hand every rank the gradient of the GLOBAL objective: the gather sums the
gradient that every rank computes for a row onto the rank that owns it, the sum all-reduces the
incoming gradients (torch.distributed.nn's all_gather and all_reduce do). Then the usual gradient
averaging over ranks yields what one process computes on the whole global batch.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Gather(Protocol):
    rank: int
    world_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def sum(self, x: torch.Tensor) -> torch.Tensor: ...


class LocalGather:
    """The one-process case: nothing to gather."""

    rank = 0
    world_size = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


def or_local(gather: Gather | None) -> Gather:
    return LocalGather() if gather is None else gather
