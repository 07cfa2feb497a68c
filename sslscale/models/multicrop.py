from __future__ import annotations

import torch
from torch import nn


def encode_crops(encoder: nn.Module, crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Features of every crop, running the encoder once per run of same-resolution crops.

    Crops come large first, so same-size crops are adjacent; concatenating them keeps BatchNorm
    statistics per resolution and costs one forward per resolution instead of one per crop.
    """
    features: list[torch.Tensor] = []
    start = 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        out = encoder(torch.cat(crops[start:end]))
        features += list(out.chunk(end - start))
        start = end
    return features
