"""The `data:` section of a run config. Lives here so data_pipelines needs nothing from sslscale."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from data_pipelines.augment import AugmentSpec, CropGroup, blur_taps, validate_crops

SOURCES = ("fashion_mnist", "digits", "synthetic", "folder", "filelist")
BACKENDS = ("torchvision", "dali")
DEVICES = ("cpu", "gpu")


@dataclass
class DataConfig:
    source: str = "fashion_mnist"
    # fashion_mnist: folder of the idx .gz files (Debian's dataset-fashion-mnist by default);
    # folder: root holding train/ and val/ class folders; filelist: folder holding train.txt and val.txt.
    path: str | None = None
    # torchvision: DataLoader workers augment on CPU. dali: NVIDIA DALI, on the GPU (device: gpu, decode
    # included) or on its CPU backend (device: cpu). Both give the same crops (params.py).
    backend: str = "torchvision"
    device: str = "cpu"
    batch_size: int = 256  # GLOBAL batch, split evenly over ranks
    num_workers: int = 2  # DataLoader workers (torchvision) or DALI's CPU threads, per rank
    # dali: processes per rank that read the files and draw the crop parameters of upcoming steps, so the
    # training thread does not; 0 does that work on the training thread.
    feeder_workers: int = 2
    crops: list[CropGroup] = field(default_factory=lambda: [CropGroup()])
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    # Frozen-feature evaluation: resize the short side to eval_resize, centre-crop eval_crop.
    eval_resize: int = 256
    eval_crop: int = 224
    # Images with more pixels are skipped and counted like unreadable ones, from their header before any
    # decode: one 13000x13000 PNG takes gigabytes per worker to decode.
    max_image_pixels: int = 8192 * 8192

    def validate(self) -> list[str]:
        errors = []
        if self.source not in SOURCES:
            errors.append(f"source: {self.source!r}; valid: {', '.join(SOURCES)}")
        if self.source in ("folder", "filelist") and not self.path:
            errors.append(f"path: required for source {self.source!r}")
        if self.backend not in BACKENDS:
            errors.append(f"backend: {self.backend!r}; valid here: {', '.join(BACKENDS)}")
        if self.device not in DEVICES:
            errors.append(f"device: {self.device!r}; valid: {', '.join(DEVICES)}")
        elif self.backend == "torchvision" and self.device != "cpu":
            errors.append(f"device: {self.device!r}; the torchvision backend augments on CPU workers; "
                          "use backend: dali for GPU augmentation")
        if self.batch_size < 1:
            errors.append(f"batch_size: {self.batch_size}; must be >= 1")
        if self.num_workers < 0:
            errors.append(f"num_workers: {self.num_workers}; must be >= 0")
        if self.max_image_pixels < 1:
            errors.append(f"max_image_pixels: {self.max_image_pixels}; must be >= 1")
        if self.feeder_workers < 0:
            errors.append(f"feeder_workers: {self.feeder_workers}; must be >= 0")
        if not 1 <= self.eval_crop <= self.eval_resize:
            errors.append(f"eval_crop: {self.eval_crop}; need 1 <= eval_crop <= eval_resize ({self.eval_resize})")
        errors += validate_crops(self.crops)
        errors += [f"augment.{e}" for e in self.augment.validate()]
        if self.augment.blur_p > 0 and self.crops and not errors:
            smallest = min(g.size for g in self.crops)
            kernel = blur_taps(self.augment, smallest)
            if kernel // 2 >= smallest:
                errors.append(f"augment.blur_sigma: a blur window of {kernel} px (+-3 sigma) does not fit the "
                              f"{smallest}-px crops; lower blur_sigma or set blur_p: 0")
        return errors

    def check_machine(self) -> list[str]:
        """Everything about this machine a run needs from the data section: files and backend."""
        return self.check_paths() + self.check_backend()

    def check_backend(self) -> list[str]:
        """Is the backend (and device) the config asks for on this machine? Run before a job starts."""
        if self.backend != "dali":
            return []
        from data_pipelines.dali import BackendUnavailable, require_dali
        try:
            require_dali(self.device)
        except BackendUnavailable as error:
            return [str(error).removeprefix("data.")]
        return []

    def check_paths(self) -> list[str]:
        """File-system checks, run before a job starts (not at config load, so configs validate anywhere)."""
        if self.source == "folder":
            needed = [os.path.join(self.path, "train"), os.path.join(self.path, "val")]
        elif self.source == "filelist":
            needed = [os.path.join(self.path, "train.txt"), os.path.join(self.path, "val.txt")]
        elif self.source == "fashion_mnist":
            from data_pipelines.sources import fashion_mnist_files
            needed = list(fashion_mnist_files(self.path).values())
        else:
            needed = []
        return [f"path: {p} does not exist" + (" (install Debian's dataset-fashion-mnist, or set data.path)"
                                               if self.source == "fashion_mnist" else "")
                for p in needed if not os.path.exists(p)]
