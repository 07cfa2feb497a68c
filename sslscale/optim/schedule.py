"""The learning-rate schedule: linear warm-up, then a cosine.

The schedule is a function of samples seen, not of steps at the current world size: a run resumed
on a different number of GPUs (same global batch) or with another loader length keeps its lr.
"""
from __future__ import annotations

import math

import torch


def peak_lr(optim_cfg, global_batch: int) -> float:
    return optim_cfg.base_lr * global_batch / 256


class WarmupCosine:
    """lr(samples) = linear warm-up from start_factor * peak to peak over warmup_samples, then a cosine
    that reaches 0 at total_samples. Two recipes differ in where the cosine counts from:

    cosine_from="start" (the ImageNet recipe): lr = peak (1 + cos(pi s / S)) / 2 with s and S counted from
        the start of training, so the lr steps down from peak at the end of the warm-up and is exactly
        peak / 2 at half of training;
    cosine_from="warmup_end" (the small-data recipe): the cosine restarts at the end of the warm-up,
        lr = peak (1 + cos(pi (s - W) / (S - W))) / 2, and is continuous there.

    and in how often the lr changes:

    interval="step": every step, from the samples seen (the ImageNet recipe);
    interval="epoch" (the small-data recipe: the authors' pl_bolts LinearWarmupCosineAnnealingLR, stepped once
        per epoch): the lr is held through each epoch e = samples // samples_per_epoch at
        peak (f + (1 - f) e / max(1, W - 1)) for e < W (the peak comes at epoch W - 1), then the cosine above
        with e, W and the epochs E in place of s, W and S. W and E are whole epochs.
    """

    def __init__(self, peak: float, warmup_samples: int, total_samples: int, start_factor: float,
                 cosine_from: str = "start", interval: str = "step", samples_per_epoch: int | None = None):
        if cosine_from not in ("start", "warmup_end"):
            raise ValueError(f"cosine_from: {cosine_from!r}; valid: start, warmup_end")
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval: {interval!r}; valid: step, epoch")
        if interval == "epoch" and not samples_per_epoch:
            raise ValueError("interval: epoch needs samples_per_epoch")
        self.peak, self.warmup, self.total, self.start_factor = peak, warmup_samples, total_samples, start_factor
        self.cosine_from, self.interval, self.samples_per_epoch = cosine_from, interval, samples_per_epoch

    def __call__(self, samples_seen: int) -> float:
        if self.interval == "epoch":
            return self.at_epoch(samples_seen // self.samples_per_epoch)
        if samples_seen < self.warmup:
            fraction = samples_seen / self.warmup
            return self.peak * (self.start_factor + (1 - self.start_factor) * fraction)
        origin = self.warmup if self.cosine_from == "warmup_end" else 0
        progress = min((samples_seen - origin) / max(self.total - origin, 1), 1.0)
        return self.peak * 0.5 * (1 + math.cos(math.pi * progress))

    def at_epoch(self, epoch: int) -> float:
        """The lr of a whole epoch (interval="epoch"), pl_bolts' closed form."""
        warmup, total = round(self.warmup / self.samples_per_epoch), round(self.total / self.samples_per_epoch)
        if epoch < warmup:
            return self.peak * (self.start_factor + (1 - self.start_factor) * epoch / max(1, warmup - 1))
        origin = warmup if self.cosine_from == "warmup_end" else 0
        progress = min((epoch - origin) / max(total - origin, 1), 1.0)
        return self.peak * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, samples_seen: int) -> float:
        lr = self(samples_seen)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def build_schedule(cfg, samples_per_epoch: int, global_batch: int) -> WarmupCosine:
    """The lr schedule of a run, in samples: warm-up and length come from epochs of the data set."""
    return WarmupCosine(peak_lr(cfg.optim, global_batch), int(cfg.optim.warmup_epochs * samples_per_epoch),
                        int(cfg.train.epochs * samples_per_epoch), cfg.optim.warmup_start_factor,
                        cfg.optim.cosine_from, cfg.optim.lr_interval, samples_per_epoch)
