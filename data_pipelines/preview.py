"""A picture of what the pipeline feeds the model: one row per image, one column per crop."""
from __future__ import annotations

import os

import torch
from PIL import Image

from data_pipelines.batch import Batch

PAD = 2  # pixels between cells


def crop_grid(batch: Batch, mean, std, max_images: int = 8) -> torch.Tensor:
    """uint8 [3, H, W]: the first `max_images` images of a batch, every crop un-normalised, each crop
    top-left in a cell the size of the largest crop."""
    crops = [c.detach().float().cpu()[:max_images] for c in batch.crops]
    rows, cell = crops[0].shape[0], max(c.shape[-1] for c in crops)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    grid = torch.full((3, PAD + rows * (cell + PAD), PAD + len(crops) * (cell + PAD)), 255, dtype=torch.uint8)
    for column, crop in enumerate(crops):
        pixels = ((crop * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        size = crop.shape[-1]
        for row in range(rows):
            top, left = PAD + row * (cell + PAD), PAD + column * (cell + PAD)
            grid[:, top:top + size, left:left + size] = pixels[row]
    return grid


def save_png(grid: torch.Tensor, path: str) -> None:
    """Written to a temporary name and renamed, so a reader never sees half a file."""
    tmp = path + ".partial"
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
