"""Optimizers and the learning-rate schedule.

The schedule is a function of samples seen, not of steps at the current world size: a run resumed
on a different number of GPUs (same global batch) or with another loader length keeps its lr.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of an FSDP2 (DTensor) parameter, else the tensor itself.
    Element-wise updates need nothing else; only norms must cover the whole tensor."""
    from torch.distributed.tensor import DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each whole tensor, as one [P] tensor on their device. Sharded (DTensor) tensors
    all-reduce their shards' sums of squares in one collective over their mesh."""
    from torch.distributed.tensor import DTensor
    norms = torch.stack(torch._foreach_norm([local(t) for t in tensors]))
    if tensors and isinstance(tensors[0], DTensor):
        squares = norms.square()
        torch.distributed.all_reduce(squares, group=tensors[0].device_mesh.get_group())
        norms = squares.sqrt()
    return norms


# Device types with PyTorch's fused SGD kernel, which skips a whole step on the device (found_inf).
FUSED_DEVICES = ("cpu", "cuda")


def momentum_update(params: list[torch.Tensor], updates: list[torch.Tensor], buffers: list[torch.Tensor], *,
                    momentum: float, lr: float, found_inf: torch.Tensor | None) -> None:
    """buf = momentum * buf + update; param -= lr * buf, on local tensors, in a few kernels. When found_inf
    is 1 nothing changes, decided on the device: PyTorch's fused SGD kernel where it exists, else a
    masked update (the same numbers, one kernel per tensor)."""
    if params[0].device.type in FUSED_DEVICES:
        from torch.optim.sgd import sgd
        sgd(params, updates, buffers, fused=True, found_inf=found_inf, weight_decay=0.0, momentum=momentum,
            lr=lr, dampening=0.0, nesterov=False, maximize=False)
        return
    keep = None if found_inf is None else found_inf == 0
    for param, update, buffer in zip(params, updates, buffers):
        new_buffer = buffer * momentum + update
        new_param = param - lr * new_buffer
        buffer.copy_(new_buffer if keep is None else torch.where(keep, new_buffer, buffer))
        param.copy_(new_param if keep is None else torch.where(keep, new_param, param))


class MomentumSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay, PyTorch's formula (buf = m buf + g + wd w; w -= lr buf), whose
    step can be skipped on the device: set `found_inf` (a 0-d float tensor on the parameters' device, 1 =
    skip) before step(), as GradScaler does for fused optimizers, and parameters and momentum stay as they
    were without the host reading a value. Works on FSDP2 shards (DTensor parameters) in place.

    Momentum buffers start at zero, so the first step's buffer is the update itself, as in PyTorch."""

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale and found_inf instead of reading them

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, **extra_defaults):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, **extra_defaults))

    def updates(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the momentum accumulates for these parameters (this rank's parts of them): the gradient plus
        weight decay."""
        local_grads = [local(g) for g in grads]
        if group["weight_decay"] == 0:
            return local_grads
        return torch._foreach_add(local_grads, [local(p) for p in params], alpha=group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler when it did not unscale yet
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale)
            updates = self.updates(group, params, grads)
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            for i, (p, buffer) in enumerate(zip(params, buffers)):
                if buffer is None:
                    buffers[i] = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            momentum_update([local(p) for p in params], updates, [local(b) for b in buffers],
                            momentum=group["momentum"], lr=group["lr"], found_inf=found_inf)
        return loss


class LARS(MomentumSGD):
    """SGD with momentum, each parameter's update scaled by its trust ratio (You et al., 2017).

    ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps), applied to g + wd * w,
    with no clipping of the ratio (the DISSL recipe). Groups with `lars_exclude=True` (biases and
    norms, if asked) take plain SGD steps without weight decay. Norms of all parameters come from one
    foreach kernel (and, for FSDP shards, one all-reduce); the step never reads a value on the host.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        super().__init__(params, lr, momentum, weight_decay, trust_coefficient=trust_coefficient, eps=eps,
                         lars_exclude=False)

    def updates(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if group["lars_exclude"]:
            return [local(g) for g in grads]
        weight_norms, grad_norms = full_norms(params), full_norms(grads)
        decay = group["weight_decay"]
        ratios = group["trust_coefficient"] * weight_norms / (grad_norms + decay * weight_norms + group["eps"])
        # A zero weight or gradient (fresh bias, unused head) takes the plain step.
        ratios = torch.where((weight_norms > 0) & (grad_norms > 0), ratios, torch.ones_like(ratios))
        local_grads = [local(g) for g in grads]
        updates = (torch._foreach_add(local_grads, [local(p) for p in params], alpha=decay) if decay
                   else torch._foreach_mul(local_grads, 1.0))  # a copy: the gradients stay as they were
        torch._foreach_mul_(updates, list(ratios.unbind()))
        return updates


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Gives every tensor of the optimizer's state the memory layout of its parameter. Fused kernels (ours and
    PyTorch's fused Adam) pair elements by their place in memory: a momentum buffer saved contiguous (by an
    FSDP run, or with train.channels_last off) and loaded for channels_last weights would otherwise update
    the wrong elements, silently. Call it after loading a state dict."""
    from torch.distributed.tensor import DTensor
    for param, state in optimizer.state.items():
        if isinstance(param, DTensor):
            continue  # FSDP shards are always contiguous, as DCP loads their state
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


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
    """Every optimizer honours `found_inf` (set before step()): a step the run decides to skip is skipped
    on the device. Adam and AdamW are PyTorch's fused kernels; SGD and LARS are MomentumSGD and LARS above."""
    groups = parameter_groups(model, optim_cfg.weight_decay, optim_cfg.exclude_bias_and_norm)
    lr = peak_lr(optim_cfg, global_batch)
    if optim_cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, trust_coefficient=optim_cfg.trust_coefficient)
    for group in groups:
        group.pop("lars_exclude", None)
    if optim_cfg.name == "sgd":
        return MomentumSGD(groups, lr=lr, momentum=optim_cfg.momentum)
    if optim_cfg.name in ("adam", "adamw"):
        device = next(p for g in groups for p in g["params"]).device
        if device.type not in FUSED_DEVICES:
            raise ValueError(f"optim.name: {optim_cfg.name} runs PyTorch's fused kernel, which needs a CPU or CUDA "
                             f"device, not {device.type}")
        cls = torch.optim.Adam if optim_cfg.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr, fused=True)
    raise ValueError(f"unknown optimizer {optim_cfg.name!r}")


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
