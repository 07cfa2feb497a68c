"""What a config resolves to, before any GPU time is spent: batches, steps, the lr along the run,
the parameters of every module, FLOPs per image and the device memory of weights and optimizer state.

`sslscale plan CONFIG` prints it; `sslscale pretrain` prints the same at its start and writes it to
the run folder as plan.json.
"""
from __future__ import annotations

import math

import torch

from data_pipelines.augment import crop_sizes
from sslscale.config import Config
from sslscale.cost.flops import count_flops
from sslscale.cost.model_state import EMA_MODULES, memory_per_rank, module_parameters
from sslscale.cost.step_memory import estimate_step_memory
from sslscale.objectives.ssl_model import build_model
from sslscale.optim.schedule import build_schedule, peak_lr

# Fractions of training at which the plan shows the lr (the end of the warm-up is added per config).
LR_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def fraction_key(fraction: float) -> str:
    """'0', '0.0125', '0.25', '1': the JSON key of a fraction of training."""
    return f"{fraction:g}"


def default_world_size(cfg: Config) -> int:
    """The job shape of the config's slurm section: nodes x tasks per node."""
    return cfg.slurm.nodes * cfg.slurm.tasks


def flops_key(cfg: Config) -> dict:
    """What the FLOP count depends on: the model's shape and the crops."""
    return {**cfg.shape_signature(), "crops": [[g.size, g.count] for g in cfg.data.crops]}


def make_plan(cfg: Config, *, dataset_size: int, world_size: int | None = None, flops: bool = True,
              previous: dict | None = None) -> dict:
    """The plan of `cfg` on `world_size` ranks with a train split of `dataset_size` images. Builds a model
    of its own on the CPU (never the caller's) and leaves the caller's random number generators as they were.
    `previous`: an earlier plan of the same run; its FLOP count is reused if the model and crops are the same
    (tracing takes seconds, and a requeued job should start training at once)."""
    with torch.random.fork_rng(devices=[]):
        return _make_plan(cfg, dataset_size, world_size, flops, previous or {})


def _make_plan(cfg: Config, dataset_size: int, world_size: int | None, flops: bool, previous: dict) -> dict:
    world_size = world_size or default_world_size(cfg)
    global_batch = cfg.data.batch_size
    total_samples = int(cfg.train.epochs * dataset_size)
    total_steps = math.ceil(total_samples / global_batch)
    steps_per_epoch = dataset_size / global_batch
    schedule = build_schedule(cfg, dataset_size, global_batch)
    warmup_fraction = cfg.optim.warmup_epochs / cfg.train.epochs
    fractions = sorted({*LR_FRACTIONS, warmup_fraction})
    with torch.device("cpu"):
        model = build_model(cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    params = module_parameters(model)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    sizes = crop_sizes(cfg.data.crops)
    plan = {
        "objective": cfg.objective.name,
        "heads": {key: getattr(cfg.objective.selected, key) for key in cfg.objective.selected.HEADS},
        "world_size": world_size,
        "global_batch": global_batch,
        "per_rank_batch": global_batch / world_size if global_batch % world_size else global_batch // world_size,
        "dataset_size": dataset_size,
        "epochs": cfg.train.epochs,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "end_step": total_steps if cfg.train.max_steps is None else min(total_steps, cfg.train.max_steps),
        "warmup_steps": math.ceil(cfg.optim.warmup_epochs * dataset_size / global_batch),
        "peak_lr": peak_lr(cfg.optim, global_batch),
        "cosine_from": cfg.optim.cosine_from,
        "lr_interval": cfg.optim.lr_interval,
        "warmup_end_fraction": warmup_fraction,
        "lr": {fraction_key(f): schedule(int(round(f * total_samples))) for f in fractions},
        "crops": {"per_image": len(sizes), "layout": " + ".join(f"{g.count}x{g.size}" for g in cfg.data.crops)},
        "params": {name: p["params"] for name, p in params.items()},
        "trainable_params": {name: p["trainable"] for name, p in params.items()},
        "ema_modules": list(EMA_MODULES.get(cfg.objective.name, ())),
        "precision": cfg.train.precision,
        "strategy": cfg.dist.strategy,
        "memory_per_rank_bytes": memory_per_rank(params, cfg, world_size, buffers),
    }
    per_rank = math.ceil(global_batch / world_size)
    step_memory = estimate_step_memory(cfg, per_rank, world_size)
    plan["step_memory_bytes"] = {**step_memory.as_dict(), "per_rank_batch": per_rank,
                                 "device": step_memory.on_device("cuda"), "cpu": step_memory.on_device("cpu")}
    plan["flops_key"] = flops_key(cfg)
    if flops:
        same_model = previous.get("flops_key") == plan["flops_key"] and "train_step_flops" in previous.get(
            "flops_per_image", {})
        plan["flops_per_image"] = (previous["flops_per_image"] if same_model
                                   else count_flops(model, sizes, cfg.objective.name))
        if "train_step_flops" in plan["flops_per_image"]:
            plan["run_flops"] = plan["flops_per_image"]["train_step_flops"] * global_batch * plan["end_step"]
    return plan


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(plan: dict, title: str) -> str:
    """The plan as a few aligned lines for the console."""
    per_rank = plan["per_rank_batch"]
    ranks = f"{plan['world_size']} rank" + ("s" if plan["world_size"] > 1 else "")
    split = (f"{ranks} x {per_rank}" if isinstance(per_rank, int)
             else f"does NOT split evenly over {ranks}")
    heads = ", ".join(f"{k} {v}" for k, v in plan["heads"].items())
    lr = ", ".join(f"{k}: {v:.4g}" for k, v in plan["lr"].items())
    warmup_key = fraction_key(plan["warmup_end_fraction"])
    cosine = ("counted from the start of training" if plan["cosine_from"] == "start"
              else "restarted at the end of the warm-up")
    if plan.get("lr_interval") == "epoch":  # plans written before the key existed stepped the lr every step
        cosine += "; the lr changes once per epoch"
    params = "; ".join(f"{name} {_count(n)}" + (" (EMA)" if name in plan["ema_modules"] else "")
                       + (f" ({_count(plan['trainable_params'][name])} trained)"
                          if 0 < plan["trainable_params"][name] < n else "")
                       for name, n in plan["params"].items())
    memory = plan["memory_per_rank_bytes"]
    lines = [
        title,
        f"  objective   {plan['objective']}; heads: {heads}",
        f"  data        {_count(plan['dataset_size'])} train images; {plan['crops']['per_image']} crops per image "
        f"({plan['crops']['layout']})",
        f"  batch       global {plan['global_batch']} = {split}",
        f"  steps       {plan['steps_per_epoch']:.1f} per epoch; {_count(plan['total_steps'])} in all "
        f"({plan['epochs']:g} epochs)" + (f", stopping at {_count(plan['end_step'])} (train.max_steps)"
                                          if plan["end_step"] < plan["total_steps"] else "")
        + f"; warm-up {_count(plan['warmup_steps'])}",
        f"  lr          peak {plan['peak_lr']:.4g}; cosine {cosine}",
        f"              at fraction of training {lr} (warm-up ends at {warmup_key})",
        f"  parameters  {params}; total {_count(sum(plan['params'].values()))}",
    ]
    flops = plan.get("flops_per_image")
    if flops is not None and "error" in flops:
        lines.append(f"  FLOPs       {flops['error']}")
    elif flops is not None:
        step = flops["train_step_flops"] * plan["global_batch"]
        lines.append(f"  FLOPs       per image: forward {flops['forward_macs'] / 1e9:.3g} GMAC = "
                     f"{flops['forward_flops'] / 1e9:.3g} GFLOP; training step {flops['train_step_flops'] / 1e9:.3g} "
                     f"GFLOP ({flops.get('counter', 'fvcore')}, 1 multiply-add = 2 FLOPs); per global step {step / 1e12:.3g} TFLOP; "
                     f"the whole run {plan['run_flops']:.3g} FLOP")
    lines.append(f"  memory      per rank ({plan['strategy']}, {plan['precision']}): weights {_bytes(memory['weights'])}"
                 f" + gradients {_bytes(memory['gradients'])} + optimizer {_bytes(memory['optimizer_state'])} + "
                 f"buffers {_bytes(memory['buffers'])} = {_bytes(memory['total'])}")
    step = plan.get("step_memory_bytes")
    if step is not None:  # plans written before the step estimate existed have none
        lines.append(f"  step memory per rank at {step['per_rank_batch']} images, at least: activations "
                     f"{_bytes(step['activations'])} + crops {_bytes(step['crops'])} + the above = "
                     f"{_bytes(step['device'])}" + (f"; on a CPU also {_bytes(step['loader'])} of loader prefetch"
                                                   if step["loader"] else ""))
    return "\n".join(lines)
