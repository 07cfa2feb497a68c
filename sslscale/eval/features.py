"""Frozen trunks and their features."""
from __future__ import annotations

import torch
from torch import nn

# Clean images used to re-estimate BatchNorm statistics: enough for stable means and variances.
BN_RECALIBRATION_IMAGES = 10_000


@torch.no_grad()
def recompute_bn_statistics(trunk: nn.Module, loader, device, max_images: int = BN_RECALIBRATION_IMAGES,
                            memory_format: torch.memory_format = torch.contiguous_format) -> None:
    """Replace running statistics gathered on augmented crops by plain averages over clean images:
    those of augmented crops do not describe the images the probe sees."""
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    trunk.train()
    seen = 0
    for images, _ in loader:
        trunk(images.to(device, memory_format=memory_format))
        seen += len(images)
        if seen >= max_images:
            break
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    trunk.eval()


@torch.no_grad()
def extract_features(trunk: nn.Module, loader, device,
                     memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    trunk.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(trunk(images.to(device, memory_format=memory_format)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)
