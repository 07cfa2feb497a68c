"""The one entry point the trainer uses: the configured backend's multi-crop batches."""
from __future__ import annotations

from data_pipelines.sources import ImageSource


def multicrop_batches(source: ImageSource, data_cfg, *, seed: int, rank: int, world_size: int, start_step: int,
                      num_steps: int | None):
    """An iterable of this rank's Batches for steps start_step, start_step + 1, ... of the global stream.
    Both backends yield the same crops of the same images, so a run may switch backend on resume."""
    if data_cfg.backend == "dali":
        from data_pipelines.dali import MultiCropPipeline
        return MultiCropPipeline(source, data_cfg, seed=seed, rank=rank, world_size=world_size,
                                 start_step=start_step, num_steps=num_steps)
    from data_pipelines.torchvision import multicrop_loader
    return multicrop_loader(source, data_cfg, seed=seed, rank=rank, world_size=world_size,
                            start_step=start_step, num_steps=num_steps)
