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
    """

    def __init__(self, peak: float, warmup_samples: int, total_samples: int, start_factor: float,
                 cosine_from: str = "start"):
        if cosine_from not in ("start", "warmup_end"):
            raise ValueError(f"cosine_from: {cosine_from!r}; valid: start, warmup_end")
        self.peak, self.warmup, self.total, self.start_factor = peak, warmup_samples, total_samples, start_factor
        self.cosine_from = cosine_from

    def __call__(self, samples_seen: int) -> float:
        if samples_seen < self.warmup:
            fraction = samples_seen / self.warmup
            return self.peak * (self.start_factor + (1 - self.start_factor) * fraction)
        origin = self.warmup if self.cosine_from == "warmup_end" else 0
        progress = min((samples_seen - origin) / max(self.total - origin, 1), 1.0)
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
                        cfg.optim.cosine_from)
