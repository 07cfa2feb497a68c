"""The random parameters of every crop, drawn once and applied by either backend.

Both backends (torchvision, DALI) take their randomness from here, never from their own
generators, so "the same augmentation" is the same numbers: the same seed and stream position
give the same crop window, flip, jitter factors and order, grayscale, blur and solarize decisions
in both, on any number of ranks and workers, and again after a resume.

Draws come in blocks of DRAW_BLOCK stream positions, each block from a generator seeded by
(seed, block). A rank draws only the blocks that hold its positions, and all draws are
vectorised over the samples of a block. The draws do not depend on image sizes; the crop window
is computed from them and the sizes afterwards (`CropParams.window`), so an unreadable image
replaced by another one does not shift anyone else's randomness.

Semantics follow torchvision v2 exactly: RandomResizedCrop's ten tries then the centre-crop
fallback, RandomHorizontalFlip, RandomApply(ColorJitter) with a random order of the four
jitters, RandomGrayscale, RandomApply(GaussianBlur), RandomSolarize.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_pipelines.augment import AugmentSpec, CropGroup

DRAW_BLOCK = 64
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries ten windows before its fallback
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def jitter_ranges(spec: AugmentSpec) -> list[tuple[float, float] | None]:
    """(low, high) of each jitter factor, None where the strength is 0 (the op is skipped)."""
    j = spec.jitter
    ranges = [(max(0.0, 1 - s), 1 + s) if s > 0 else None for s in (j.brightness, j.contrast, j.saturation)]
    return ranges + [(-j.hue, j.hue) if j.hue > 0 else None]


@dataclass
class CropParams:
    """One crop slot's parameters for n consecutive samples (arrays of length n)."""

    scale_u: np.ndarray      # [n, CROP_TRIES] fraction of the image area, uniform in group.scale
    log_ratio_u: np.ndarray  # [n, CROP_TRIES] log aspect ratio, uniform in log(group.ratio)
    top_u: np.ndarray        # [n, CROP_TRIES] uniform [0, 1): position of the window, rows
    left_u: np.ndarray       # [n, CROP_TRIES] same, columns
    flip: np.ndarray         # [n] bool
    jitter: np.ndarray       # [n] bool: colour jitter applied at all
    factors: np.ndarray      # [n, 4] float32: brightness, contrast, saturation, hue factor
    order: np.ndarray        # [n, 4] int32: the order the four jitters run in (a permutation)
    grayscale: np.ndarray    # [n] bool
    blur: np.ndarray         # [n] bool
    sigma: np.ndarray        # [n] float32
    solarize: np.ndarray     # [n] bool

    def take(self, rows: slice) -> "CropParams":
        return CropParams(**{name: value[rows] for name, value in vars(self).items()})

    def window(self, heights: np.ndarray, widths: np.ndarray, group: CropGroup) -> np.ndarray:
        """[n, 4] int (top, left, height, width) of each crop, as torchvision's RandomResizedCrop picks it."""
        heights = np.asarray(heights, np.int64)[:, None]
        widths = np.asarray(widths, np.int64)[:, None]
        area = heights * widths * self.scale_u
        ratio = np.exp(self.log_ratio_u)
        w = np.round(np.sqrt(area * ratio)).astype(np.int64)   # np.round and Python's round both round half to even
        h = np.round(np.sqrt(area / ratio)).astype(np.int64)
        fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
        first = fits.argmax(axis=1)
        rows = np.arange(len(first))
        h, w = h[rows, first], w[rows, first]
        heights, widths = heights[:, 0], widths[:, 0]
        top = np.floor(self.top_u[rows, first] * (heights - h + 1)).astype(np.int64)
        left = np.floor(self.left_u[rows, first] * (widths - w + 1)).astype(np.int64)
        fallback = ~fits.any(axis=1)
        if fallback.any():
            fh, fw = heights[fallback], widths[fallback]
            lo, hi = min(group.ratio), max(group.ratio)
            in_ratio = fw / fh
            crop_w = np.where(in_ratio < lo, fw, np.where(in_ratio > hi, np.round(fh * hi), fw)).astype(np.int64)
            crop_h = np.where(in_ratio < lo, np.round(fw / lo), fh).astype(np.int64)
            h[fallback], w[fallback] = crop_h, crop_w
            top[fallback], left[fallback] = (fh - crop_h) // 2, (fw - crop_w) // 2
        return np.stack([top, left, h, w], axis=1)


def draw_block(groups: list[CropGroup], spec: AugmentSpec, seed: int, block: int) -> list[CropParams]:
    """The parameters of every crop slot for stream positions [block * DRAW_BLOCK, (block + 1) * DRAW_BLOCK)."""
    rng = np.random.default_rng([seed, block])
    n, tries = DRAW_BLOCK, CROP_TRIES
    ranges = jitter_ranges(spec)
    slots = []
    for group in groups:
        log_lo, log_hi = math.log(group.ratio[0]), math.log(group.ratio[1])
        for _ in range(group.count):
            factors = np.empty((n, 4), np.float32)
            for k, bounds in enumerate(ranges):
                factors[:, k] = rng.uniform(*bounds, n) if bounds else (0.0 if k == HUE else 1.0)
            slots.append(CropParams(
                scale_u=rng.uniform(group.scale[0], group.scale[1], (n, tries)),
                log_ratio_u=rng.uniform(log_lo, log_hi, (n, tries)),
                top_u=rng.random((n, tries)), left_u=rng.random((n, tries)),
                flip=rng.random(n) < spec.flip_p,
                jitter=rng.random(n) < spec.jitter.p,
                factors=factors,
                order=np.argsort(rng.random((n, 4)), axis=1).astype(np.int32),
                grayscale=rng.random(n) < spec.grayscale_p,
                blur=rng.random(n) < spec.blur_p,
                sigma=rng.uniform(spec.blur_sigma[0], spec.blur_sigma[1], n).astype(np.float32),
                solarize=rng.random(n) < spec.solarize_p,
            ))
    return slots


def draw(groups: list[CropGroup], spec: AugmentSpec, seed: int, first: int, count: int) -> list[CropParams]:
    """Parameters of every crop slot (output order) for stream positions [first, first + count)."""
    blocks = range(first // DRAW_BLOCK, (first + count - 1) // DRAW_BLOCK + 1)
    drawn = [draw_block(groups, spec, seed, b) for b in blocks]
    offset = first - blocks[0] * DRAW_BLOCK
    rows = slice(offset, offset + count)
    return [CropParams(**{name: np.concatenate([vars(block[slot])[name] for block in drawn])
                          for name in vars(drawn[0][slot])}).take(rows)
            for slot in range(len(drawn[0]))]
