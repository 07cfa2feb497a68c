"""The one description of the multi-crop augmentation.

Every backend (torchvision, DALI) reads these dataclasses and nothing else, so
"the same augmentation" means the same numbers. Recipes (m2 / m6 / m8, the small-data presets)
are YAML configs built from these fields, not code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# The Gaussian blur's window: three_sigma covers +-3 sigma_max (13 taps at sigma_max 2), crop_tenth is
# int(0.1 x crop size) made odd (7 taps at 64 px), as the authors' small-data code sizes it.
BLUR_KERNELS = ("three_sigma", "crop_tenth")
SOLARIZE_THRESHOLD = 128  # on uint8 pixels: values >= 128 are inverted


@dataclass
class CropGroup:
    """`count` crops of `size` x `size` pixels, each a random resized crop of the image."""

    size: int = 224
    count: int = 2
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"

    def validate(self) -> list[str]:
        errors = []
        if self.size < 1:
            errors.append(f"size: {self.size} is impossible; a crop needs at least 1 pixel")
        if self.count < 1:
            errors.append(f"count: {self.count}; a crop group needs at least one crop")
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            errors.append(f"scale: {list(self.scale)}; need 0 < low <= high <= 1 (fractions of the image area)")
        rlo, rhi = self.ratio
        if not (0 < rlo <= rhi):
            errors.append(f"ratio: {list(self.ratio)}; need 0 < low <= high")
        if self.interpolation not in INTERPOLATIONS:
            errors.append(f"interpolation: {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        return errors


@dataclass
class ColorJitter:
    """Multiplicative factors drawn from [max(0, 1-s), 1+s]; hue is a fraction of the hue circle."""

    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    p: float = 0.8

    def validate(self) -> list[str]:
        errors = [f"{name}: {getattr(self, name)} must be >= 0"
                  for name in ("brightness", "contrast", "saturation") if getattr(self, name) < 0]
        if not 0 <= self.hue <= 0.5:
            errors.append(f"hue: {self.hue}; valid range is [0, 0.5]")
        if not 0 <= self.p <= 1:
            errors.append(f"p: {self.p} is not a probability")
        return errors


@dataclass
class AugmentSpec:
    """Per-crop ops, applied independently to every crop of every group."""

    flip_p: float = 0.5
    jitter: ColorJitter = field(default_factory=ColorJitter)
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: str = "three_sigma"  # the window's size: three_sigma or crop_tenth (BLUR_KERNELS)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def validate(self) -> list[str]:
        errors = [f"jitter.{e}" for e in self.jitter.validate()]
        for name in ("flip_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append(f"{name}: {getattr(self, name)} is not a probability")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            errors.append(f"blur_sigma: {list(self.blur_sigma)}; need 0 < low <= high")
        if self.blur_kernel not in BLUR_KERNELS:
            errors.append(f"blur_kernel: {self.blur_kernel!r}; valid: {', '.join(BLUR_KERNELS)}")
        if any(s <= 0 for s in self.std):
            errors.append(f"std: {list(self.std)}; every channel's std must be > 0")
        return errors


def validate_crops(crops: list[CropGroup]) -> list[str]:
    """Crop groups must exist and be ordered large first: objectives rely on crop 0..K_t-1 being the
    large (global) crops."""
    if not crops:
        return ["crops: empty; give at least one crop group"]
    errors = []
    for i, group in enumerate(crops):
        errors += [f"crops[{i}].{e}" for e in group.validate()]
    sizes = [g.size for g in crops]
    if sizes != sorted(sizes, reverse=True):
        errors.append(f"crops: sizes {sizes} must be ordered large first")
    if len(set(sizes)) != len(sizes):
        errors.append(f"crops: sizes {sizes} repeat; merge groups of the same size into one (count)")
    return errors


def crop_sizes(crops: list[CropGroup]) -> list[int]:
    """The size of every crop in output order (large first)."""
    return [g.size for g in crops for _ in range(g.count)]


def blur_kernel_size(sigma_max: float) -> int:
    """An odd window covering +-3 sigma, the same for every backend."""
    radius = max(1, int(3 * sigma_max + 0.5))
    return 2 * radius + 1


def blur_taps(spec: AugmentSpec, crop_size: int) -> int:
    """The blur window (taps per side of the square kernel) for crops of `crop_size` px, the same for every
    backend: +-3 sigma_max (three_sigma), or int(0.1 x crop size) made odd (crop_tenth, the authors'
    small-data code: 7 taps at 64 px, whatever sigma; it cuts a sigma-2 Gaussian at +-1.5 sigma)."""
    if spec.blur_kernel == "crop_tenth":
        taps = int(0.1 * crop_size)
        return taps + 1 if taps % 2 == 0 else taps
    return blur_kernel_size(spec.blur_sigma[1])
