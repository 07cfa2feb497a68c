"""The parameters of a model's parts and the memory of its weights, gradients and optimizer state per rank."""
from __future__ import annotations

from torch import nn

from sslscale.config import Config

# A model whose name maps to another in the plan (the rest keep their attribute names).
MODULE_NAMES = {"encoder": "trunk", "teacher_encoder": "teacher_trunk"}
# Modules that are exponential moving averages of others: they run forward only and are never trained.
EMA_MODULES = {"dino": ("teacher_trunk", "teacher_head")}
# Bytes of optimizer state per trainable parameter (fp32): momentum for SGD and LARS, two moments for Adam.
OPTIMIZER_STATE_FLOATS = {"lars": 1, "sgd": 1, "adam": 2, "adamw": 2}


def module_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """{plan name: {"params": n, "trainable": n}} for the trunk and each part of the objective."""
    parts = {"encoder": model.encoder, **dict(model.objective.named_children())}
    counts = {}
    for name, module in parts.items():
        params = list(module.parameters())
        if not params:
            continue
        counts[MODULE_NAMES.get(name, name)] = {
            "params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}
    return counts


def memory_per_rank(params: dict, cfg: Config, world_size: int, buffers: int) -> dict:
    """fp32 weights, gradients and optimizer state per rank (not activations): all of it on every rank under
    DDP, a 1/world_size share under FSDP (plus the one unit gathered at a time, not counted)."""
    total = sum(p["params"] for p in params.values())
    trainable = sum(p["trainable"] for p in params.values())
    share = 1 / world_size if cfg.dist.strategy == "fsdp" and world_size > 1 else 1.0
    parts = {"weights": 4 * total * share, "gradients": 4 * trainable * share,
             "optimizer_state": 4 * OPTIMIZER_STATE_FLOATS[cfg.optim.name] * trainable * share,
             "buffers": 4 * buffers}
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts
