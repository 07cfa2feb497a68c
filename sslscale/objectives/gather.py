"""How a loss reaches the other ranks' rows.

A loss takes `gather=None` (one process) or an object with `rank` and `__call__(x) -> cat of x over
ranks`. The gather must keep gradients and its backward must sum the gradient that every rank
computes for a row onto the rank that owns it (torch.distributed.nn's all_gather does); then the
usual gradient averaging over ranks yields the gradient of the global objective.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Gather(Protocol):
    rank: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class LocalGather:
    """The one-process case: nothing to gather."""

    rank = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def or_local(gather: Gather | None) -> Gather:
    return LocalGather() if gather is None else gather
