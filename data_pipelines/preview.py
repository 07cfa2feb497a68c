"""A picture of what the pipeline feeds the model: one row per image, its source image first, then every
crop, enlarged so that small crops can be seen, with the rows and columns labelled."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_pipelines.batch import Batch
from data_pipelines.sources import ImageSource

PAD = 4  # pixels between cells
HEADER = 16  # pixels of the column labels
MIN_CELL = 160  # the smallest cell: crops are enlarged by a whole factor to fill it


def to_uint8(crops: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised float crops [N, 3, H, W] back to uint8 [N, H, W, 3]."""
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    pixels = ((crops.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def enlarged(image: Image.Image, cell: int) -> Image.Image:
    """The image as large as fits a cell: a whole factor up (nearest neighbour: its pixels stay visible), or
    down to fit (bilinear)."""
    factor = cell // max(image.width, image.height)
    if factor >= 1:
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    image = image.copy()
    image.thumbnail((cell, cell), Image.BILINEAR)
    return image


def crop_grid(batch: Batch, mean, std, max_images: int = 8, sources: list[torch.Tensor] | None = None,
              class_names: list[str] | None = None) -> torch.Tensor:
    """uint8 [3, H, W]: the first `max_images` images of a batch, a row each. With `sources` (uint8 [3, H, W]
    per image) the first column shows the image the crops came from. Each crop is enlarged by the largest whole
    factor that fits a cell (at least MIN_CELL px), and the column says its size and factor."""
    crops = [to_uint8(c[:max_images], mean, std) for c in batch.crops]
    rows = crops[0].shape[0]
    cell = max(MIN_CELL, max(c.shape[2] for c in crops))
    titles = [f"{i + 1}: {c.shape[2]} px" + (f" x{cell // c.shape[2]}" if cell // c.shape[2] > 1 else "")
              for i, c in enumerate(crops)]
    columns = (["source"] if sources is not None else []) + titles
    canvas = Image.new("RGB", (PAD + len(columns) * (cell + PAD), HEADER + PAD + rows * (cell + PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(columns):
        draw.text((PAD + column * (cell + PAD), 2), title, fill="black")
    first_crop_column = 1 if sources is not None else 0
    for row in range(rows):
        top = HEADER + PAD + row * (cell + PAD)
        if sources is not None:
            canvas.paste(enlarged(Image.fromarray(sources[row].permute(1, 2, 0).numpy()), cell), (PAD, top))
        for i, crop in enumerate(crops):
            canvas.paste(enlarged(Image.fromarray(crop[row]), cell), (PAD + (first_crop_column + i) * (cell + PAD), top))
        label = f"#{int(batch.index[row])}"
        if class_names is not None:
            label += f" {class_names[int(batch.labels[row])]}"
        box = draw.textbbox((PAD + 2, top + 2), label)
        draw.rectangle(box, fill="white")
        draw.text((PAD + 2, top + 2), label, fill="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


class SamplePhotos(ImageSource):
    """`count` images that alternate between scikit-learn's two photos, loaded on demand: two photos in memory
    whatever the count."""

    def __init__(self, photos: list[np.ndarray], names: list[str], count: int):
        self.photos = [torch.from_numpy(np.array(p, copy=True)).permute(2, 0, 1) for p in photos]
        self.labels = torch.arange(count, dtype=torch.int64) % len(photos)
        self.classes = names

    def load(self, index: int) -> torch.Tensor:
        return self.photos[int(self.labels[index])]

    def _index_bytes(self) -> bytes:
        return b"".join(p.numpy().tobytes() for p in self.photos)


def sample_photos(count: int) -> ImageSource:
    """`count` images from the two colour photos that ship with scikit-learn, for previewing any recipe
    without its data set."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise FileNotFoundError("the sample photos come with scikit-learn: pip install scikit-learn") from None
    photos = load_sample_images()
    names = [os.path.splitext(os.path.basename(f))[0] for f in photos.filenames]
    return SamplePhotos(list(photos.images[:2]), names, count)


def save_png(grid: torch.Tensor, path: str) -> None:
    """Written to a temporary name and renamed, so a reader never sees half a file."""
    tmp = path + ".partial"
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
