"""torchvision v2 backend: multi-crop augmentation on CPU workers, the semantics of augment.py.

Each sample's augmentation is drawn from a generator seeded by (run seed, stream position), so the
crops of a step are the same whatever the number of workers or ranks, and after a resume.
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from data_pipelines.augment import AugmentSpec, CropGroup, blur_kernel_size
from data_pipelines.batch import Batch
from data_pipelines.sources import ImageSource, RankBatches, SampleStream, UnreadableImage

log = logging.getLogger(__name__)

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}
# Replacement attempts for unreadable images before giving up on the batch.
_MAX_REPLACEMENTS = 64


def crop_transform(group: CropGroup, spec: AugmentSpec) -> v2.Compose:
    """uint8 [3,H,W] image -> one normalised float crop, per the spec."""
    jitter = spec.jitter
    ops = [
        v2.RandomResizedCrop(group.size, scale=tuple(group.scale), ratio=tuple(group.ratio),
                             interpolation=_INTERPOLATION[group.interpolation], antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
        v2.RandomApply([v2.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)],
                       p=jitter.p),
        v2.RandomGrayscale(spec.grayscale_p),
    ]
    if spec.blur_p > 0:
        kernel = blur_kernel_size(spec.blur_sigma[1])
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(spec.blur_sigma))], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(ops)


def eval_transform(resize: int, crop: int, spec: AugmentSpec) -> v2.Compose:
    """The deterministic view used for frozen-feature evaluation."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])


def load_readable(source: ImageSource, index: int) -> tuple[torch.Tensor, int, int]:
    """(image, index actually read, replacements): an unreadable image is replaced by the next one."""
    for attempt in range(_MAX_REPLACEMENTS):
        candidate = (index + attempt) % len(source)
        try:
            return source.load(candidate), candidate, attempt
        except UnreadableImage as error:
            log.warning("skipping unreadable image: %s", error)
    raise RuntimeError(f"{_MAX_REPLACEMENTS} consecutive unreadable images from index {index}; is the data intact?")


class MultiCropDataset(Dataset):
    """Indexed by stream position; returns all crops of one image, large first."""

    def __init__(self, source: ImageSource, crops: list[CropGroup], spec: AugmentSpec, seed: int):
        self.source = source
        self.stream = SampleStream(len(source), seed)
        self.seed = seed
        self.groups = [(crop_transform(g, spec), g.count) for g in crops]

    def __len__(self):
        return len(self.source)

    def __getitem__(self, position: int):
        image, index, replaced = load_readable(self.source, self.stream.index(position))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 0x9E3779B97F4A7C15 + position) % (2**63))
            crops = [transform(image) for transform, count in self.groups for _ in range(count)]
        return crops, int(self.source.labels[index]), index, replaced


def collate_multicrop(samples) -> Batch:
    crops = [torch.stack([s[0][i] for s in samples]) for i in range(len(samples[0][0]))]
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    index = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return Batch(crops, labels, index, sum(s[3] for s in samples))


def multicrop_loader(source: ImageSource, data_cfg, *, seed: int, rank: int, world_size: int,
                     start_step: int, num_steps: int | None) -> DataLoader:
    """Batches of this rank for steps start_step, start_step+1, ... of the global stream."""
    dataset = MultiCropDataset(source, data_cfg.crops, data_cfg.augment, seed)
    sampler = RankBatches(data_cfg.batch_size, rank, world_size, start_step, num_steps)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=data_cfg.num_workers,
                      collate_fn=collate_multicrop, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if data_cfg.num_workers else None)


class EvalDataset(Dataset):
    def __init__(self, source: ImageSource, transform):
        self.source, self.transform = source, transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index: int):
        image, read, _ = load_readable(self.source, index)
        return self.transform(image), int(self.source.labels[read])


def eval_loader(source: ImageSource, data_cfg, batch_size: int) -> DataLoader:
    transform = eval_transform(data_cfg.eval_resize, data_cfg.eval_crop, data_cfg.augment)
    return DataLoader(EvalDataset(source, transform), batch_size=batch_size, shuffle=False,
                      num_workers=data_cfg.num_workers)
