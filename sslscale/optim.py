"""Optimizers and the learning-rate schedule.

The schedule is a function of samples seen, not of steps at the current world size: a run resumed
on a different number of GPUs (same global batch) or with another loader length keeps its lr.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum, each parameter's step scaled by its trust ratio (You et al., 2017).

    ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps), applied to g + wd * w,
    with no clipping of the ratio (the DISSL recipe). Groups with `lars_exclude=True` (biases and
    norms, if asked) take plain SGD steps without weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    weight_norm, grad_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    update = update.add(p, alpha=group["weight_decay"])
                    ratio = group["trust_coefficient"] * weight_norm / (
                        grad_norm + group["weight_decay"] * weight_norm + group["eps"])
                    # A zero weight or gradient (fresh bias, unused head) takes the plain step.
                    ratio = torch.where((weight_norm > 0) & (grad_norm > 0), ratio, torch.ones_like(ratio))
                    update = update.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def is_bias_or_norm(param: nn.Parameter) -> bool:
    # Biases and norm scales are the 1-d parameters of a convnet.
    return param.ndim <= 1


def parameter_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool) -> list[dict]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not exclude_bias_and_norm:
        return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
    decayed = [p for n, p in trainable if not is_bias_or_norm(p)]
    plain = [p for n, p in trainable if is_bias_or_norm(p)]
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0, "lars_exclude": True}]


def peak_lr(optim_cfg, global_batch: int) -> float:
    return optim_cfg.base_lr * global_batch / 256


def build_optimizer(model: nn.Module, optim_cfg, global_batch: int) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim_cfg.weight_decay, optim_cfg.exclude_bias_and_norm)
    lr = peak_lr(optim_cfg, global_batch)
    if optim_cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, trust_coefficient=optim_cfg.trust_coefficient)
    for group in groups:
        group.pop("lars_exclude", None)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum)
    if optim_cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {optim_cfg.name!r}")


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
