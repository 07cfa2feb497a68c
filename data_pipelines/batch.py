from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """What every pipeline yields, whatever its backend.

    crops: one [B, 3, H, W] float tensor per crop, large crops first, normalised.
    labels: [B] class labels (used only by evaluation, never by the objectives).
    index: [B] true global sample index in the source.
    n_unreadable: images that failed to decode and were replaced in this batch.
    """

    crops: list[torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    n_unreadable: int = 0

    def to(self, device: torch.device, non_blocking: bool = True,
           memory_format: torch.memory_format = torch.contiguous_format) -> "Batch":
        return Batch([c.to(device, non_blocking=non_blocking, memory_format=memory_format) for c in self.crops],
                     self.labels.to(device, non_blocking=non_blocking),
                     self.index.to(device, non_blocking=non_blocking), self.n_unreadable)
