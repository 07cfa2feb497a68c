"""The data-parallel wrap of the model: DDP (every rank holds all weights) or FSDP2 (weights,
gradients and optimizer state sharded over ranks, gathered one unit at a time).

Heads and objectives are the same under both: the objective gathers what it needs across ranks
itself (ObjectiveContext.gather), and either wrap averages gradients over ranks.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from sslscale.config import ConfigError
from sslscale.dist.batchnorm import sync_batchnorm
from sslscale.dist.process_group import DistEnv
from sslscale.models.backbones import ResNetTrunk


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of an FSDP2 (DTensor) parameter, else the tensor itself.
    Element-wise updates need nothing else; only norms must cover the whole tensor."""
    from torch.distributed.tensor import DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def residual_stages(model: nn.Module) -> list[nn.Module]:
    """FSDP units: the residual stages of every trunk in the model (the encoder and, for DINO, its
    EMA teacher). A stage is the natural unit: large enough that its all-gather hides behind the
    previous stage's compute, small enough that only one or two are unsharded at a time."""
    return [getattr(trunk, f"layer{i}") for trunk in model.modules() if isinstance(trunk, ResNetTrunk)
            for i in range(1, 5)]


def mixed_precision_policy(precision: str):
    """bf16 / fp16 weights in forward and backward, gradients reduced in fp32. fp32 runs keep fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision == "fp32":
        return MixedPrecisionPolicy()
    compute = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, precision: str) -> nn.Module:
    """fully_shard every residual stage, then the root (stem, heads, objective state).

    In mixed precision each BatchNorm becomes its own fp32 unit first (as FSDP1 did by default):
    batch statistics of bf16 activations in bf16 arithmetic lose too much, and cuDNN's batch norm
    expects fp32 weights next to fp32 running statistics. Their inputs are cast up to fp32 and the
    following convolution takes them back down under autocast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    stages = residual_stages(model)
    if not stages:
        raise ConfigError(["dist.strategy: fsdp needs residual stages to shard, and this model has none; "
                           "use dist.strategy=ddp"])
    policy = mixed_precision_policy(precision)
    if policy.param_dtype is not None:
        full_precision = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                fully_shard(module, mp_policy=full_precision)
    for stage in stages:
        fully_shard(stage, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def uses_fsdp(strategy: str, env: DistEnv) -> bool:
    """One process shards nothing: it trains the plain model whatever the strategy."""
    return env.is_distributed and strategy == "fsdp"


def weight_layout(strategy: str, env: DistEnv, layout: torch.memory_format) -> torch.memory_format:
    """FSDP shards only contiguous parameters; its convolutions still run channels_last, following
    the inputs' layout."""
    return torch.contiguous_format if uses_fsdp(strategy, env) else layout


def wrap_for_training(core: nn.Module, strategy: str, env: DistEnv, device: torch.device,
                      precision: str) -> nn.Module:
    """Returns the module that runs the training step. `core` must already be on `device`; under FSDP
    it is sharded in place (its parameters become DTensors) and is itself the returned module."""
    if not env.is_distributed:
        return core
    if uses_fsdp(strategy, env):
        return apply_fsdp(core, precision)
    # SyncBN keeps buffers equal on all ranks, so DDP need not broadcast them every step. Gradients are views
    # into DDP's all-reduce buckets: no copy in or out of the buckets, and one gradient-sized buffer less.
    return nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None,
                                               gradient_as_bucket_view=True, **no_buffer_sync_per_step())


def no_buffer_sync_per_step() -> dict:
    """DDP's option for not broadcasting buffers before every forward: forward_sync_buffers since torch 2.14
    (broadcast_buffers is deprecated there), broadcast_buffers before. Buffers are still synced once when DDP
    is built, which changes nothing here: every rank starts from the same seed."""
    options = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in options else {"broadcast_buffers": False}


def prepare_batchnorm(core: nn.Module, env: DistEnv) -> nn.Module:
    """Batch statistics over the global batch, as one process would compute them."""
    return sync_batchnorm(core) if env.is_distributed else core


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)
