"""The one entry point the trainer uses: the configured backend's multi-crop batches."""
from __future__ import annotations

import torch

from data_pipelines.sources import ImageSource


def multicrop_batches(source: ImageSource, data_cfg, *, seed: int, rank: int, world_size: int, start_step: int,
                      num_steps: int | None, layout: torch.memory_format = torch.contiguous_format,
                      compute_dtype: torch.dtype = torch.float32):
    """An iterable of this rank's Batches for steps start_step, start_step + 1, ... of the global stream.
    Both backends yield the same crops of the same images, so a run may switch backend on resume.

    `layout` and `compute_dtype` are the model's memory format and autocast dtype: the DALI backend delivers
    its crops in them where it can (see crop_dtype), the torchvision backend as float32 NCHW."""
    if data_cfg.backend == "dali":
        from data_pipelines.dali import MultiCropPipeline
        return MultiCropPipeline(source, data_cfg, seed=seed, rank=rank, world_size=world_size,
                                 start_step=start_step, num_steps=num_steps, layout=layout,
                                 dtype=crop_dtype(compute_dtype))
    from data_pipelines.torchvision import multicrop_loader
    return multicrop_loader(source, data_cfg, seed=seed, rank=rank, world_size=world_size,
                            start_step=start_step, num_steps=num_steps)


def crop_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype DALI writes the crops in for a model computing in `compute_dtype`.

    float32 and float16 as they are. DALI has no bfloat16, so a bf16 run gets float16: autocast casts the
    input to bf16 in the first convolution either way, and from float16 it reads half the bytes, while the
    crops, DALI's prefetched batches and any host-to-device copy take half the memory. The cost is a double
    rounding: of the 768 values a normalised channel can take (256 grey levels x 3 channels, ImageNet mean
    and std), 49 reach bf16 one step (at most 0.9 grey levels) away from where float32 would have rounded.
    """
    if compute_dtype in (torch.float16, torch.bfloat16):
        return torch.float16
    if compute_dtype == torch.float32:
        return torch.float32
    raise ValueError(f"compute dtype {compute_dtype}; valid: torch.float32, torch.float16, torch.bfloat16")
