"""torchvision v2 backend: multi-crop augmentation on CPU workers, the semantics of augment.py.

The random numbers of every crop come from params.py (seeded by run seed and stream position),
so the crops of a step are the same whatever the number of workers or ranks, after a resume,
and in the DALI backend.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from data_pipelines import params as draws
from data_pipelines.augment import SOLARIZE_THRESHOLD, AugmentSpec, CropGroup, blur_taps
from data_pipelines.batch import Batch
from data_pipelines.params import CropParams, jitter_ranges
from data_pipelines.sources import ImageSource, RankBatches, SampleStream, first_readable

# Workers ignore the stop signals that SLURM, systemd and Ctrl-C send to every process: one dying of
# SIGTERM would fail the step the trainer wants to finish and save (data_pipelines/worker_signals.py).
from data_pipelines.worker_signals import WorkerInit

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}
_JITTERS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)  # params.py's op numbers


def augment_crop(image: torch.Tensor, window, params: CropParams, i: int, group: CropGroup,
                 spec: AugmentSpec) -> torch.Tensor:
    """uint8 [3,H,W] image -> sample i's crop of one slot, normalised float [3, size, size].

    The ops and their uint8 arithmetic are torchvision v2's own (the functional forms of
    RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandomGrayscale, GaussianBlur,
    RandomSolarize); only the random numbers come from params.py.
    """
    top, left, height, width = (int(v) for v in window)
    crop = F.resized_crop(image, top, left, height, width, [group.size, group.size],
                          interpolation=_INTERPOLATION[group.interpolation], antialias=True)
    if params.flip[i]:
        crop = F.horizontal_flip(crop)
    if params.jitter[i]:
        enabled = [bounds is not None for bounds in jitter_ranges(spec)]
        for op in params.order[i]:
            if enabled[op]:
                crop = _JITTERS[op](crop, float(params.factors[i, op]))
    if params.grayscale[i]:
        crop = F.rgb_to_grayscale(crop, num_output_channels=3)
    if params.blur[i]:
        kernel = blur_taps(spec, group.size)
        sigma = float(params.sigma[i])
        crop = F.gaussian_blur(crop, [kernel, kernel], [sigma, sigma])
    if params.solarize[i]:
        crop = F.solarize(crop, SOLARIZE_THRESHOLD)
    return F.normalize(F.to_dtype(crop, torch.float32, scale=True), list(spec.mean), list(spec.std))


def eval_transform(resize: int, crop: int, spec: AugmentSpec) -> v2.Compose:
    """The deterministic view used for frozen-feature evaluation."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])


def load_readable(source: ImageSource, index: int) -> tuple[torch.Tensor, int, int]:
    """(image, index actually read, replacements): an unreadable image is replaced by the next one."""
    return first_readable(source.load, len(source), index)


class MultiCropDataset(Dataset):
    """Indexed by stream position; returns all crops of one image, large first.

    DataLoader hands a whole batch of consecutive positions to __getitems__, which draws the
    parameters of the batch in one go.
    """

    def __init__(self, source: ImageSource, crops: list[CropGroup], spec: AugmentSpec, seed: int):
        self.source, self.crops, self.spec, self.seed = source, crops, spec, seed
        self.stream = SampleStream(len(source), seed)
        self.groups = [group for group in crops for _ in range(group.count)]  # the group of each crop slot

    def __len__(self):
        return len(self.source)

    def __getitem__(self, position: int):
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: list[int]) -> list:
        first = positions[0]
        if list(positions) != list(range(first, first + len(positions))):
            raise ValueError("MultiCropDataset reads runs of consecutive stream positions (see RankBatches)")
        loaded = [load_readable(self.source, self.stream.index(p)) for p in positions]
        heights = np.array([image.shape[1] for image, _, _ in loaded])
        widths = np.array([image.shape[2] for image, _, _ in loaded])
        slots = draws.draw(self.crops, self.spec, self.seed, first, len(positions))
        windows = [params.window(heights, widths, group) for params, group in zip(slots, self.groups)]
        samples = []
        for i, (image, index, replaced) in enumerate(loaded):
            crops = [augment_crop(image, window[i], params, i, group, self.spec)
                     for params, window, group in zip(slots, windows, self.groups)]
            samples.append((crops, int(self.source.labels[index]), index, replaced))
        return samples


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
                      persistent_workers=False, prefetch_factor=4 if data_cfg.num_workers else None,
                      worker_init_fn=WorkerInit() if data_cfg.num_workers else None)


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
                      num_workers=data_cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=WorkerInit() if data_cfg.num_workers else None)
