"""BatchNorm whose statistics span every rank's rows (SyncBN), on any device."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def communicates(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "meta" and dist.is_initialized() and dist.get_world_size() > 1


def gather_over_ranks(stats: torch.Tensor) -> torch.Tensor:
    """[1, K] -> [world size, K]: every rank's row, through a functional collective (traceable by
    torch.compile); without a process group (one process), or on the meta device (the memory estimate, which one
    rank runs on its own), the row."""
    if not communicates(stats):
        return stats
    from torch.distributed import _functional_collectives as funcol
    # all_gather_single is the current name (torch 2.14); all_gather_tensor the older one.
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return gather(stats, gather_dim=0, group=dist.group.WORLD)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if not communicates(values):
        return values
    from torch.distributed import _functional_collectives as funcol
    return funcol.all_reduce(values, "sum", group=dist.group.WORLD)


class CrossRankBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the rows of every rank, with the backward written out: it keeps for the backward pass what
    torch's BatchNorm keeps (the input, the weight and two per-channel vectors), where autograd through the
    statistics would also keep fp32 tensors of the input's size (twice the activation memory of a ResNet step).

    Forward: each rank's per-channel mean and variance (in fp32), all-gathered with its row count in one
    collective and combined exactly (the mean of the variances plus the variance of the means). Backward: each
    rank's sums of dy and dy * (x - mean), all-reduced in one collective, give the global terms of BatchNorm's
    gradient. Both collectives are functional (torch.compile traces them); weight and bias get this rank's
    gradient, which DDP and FSDP then reduce like every other parameter's."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float | None, eps: float,
                num_batches_tracked):
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        local_mean = x.mean(dims, dtype=torch.float32)
        local_var = (x - local_mean.view(shape)).square().mean(dims, dtype=torch.float32)
        count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        stats = gather_over_ranks(torch.cat([local_mean, local_var, count]).unsqueeze(0))
        means, variances, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, 2 * channels:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).square())).sum(0) / total
        if running_mean is not None:
            num_batches_tracked.add_(1)
            rate = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
            running_mean.mul_(1 - rate).add_(mean, alpha=rate)
            running_var.mul_(1 - rate).add_(var * total / (total - 1), alpha=rate)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        ctx.save_for_backward(x, weight, mean, invstd, total)
        # x * scale + shift computed in fp32 (bf16 x promotes), rounded to the input's dtype once, as cuDNN does.
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, total = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)  # fp32
        sum_dy = grad_out.sum(dims, dtype=torch.float32)
        sum_dy_xmu = (grad_out * centred).sum(dims, dtype=torch.float32)
        grad_weight = sum_dy_xmu * invstd if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            reduced = sum_over_ranks(torch.cat([sum_dy, sum_dy_xmu]))
            mean_dy, mean_dy_xmu = reduced[:channels] / total, reduced[channels:] / total
            scale = invstd if weight is None else invstd * weight
            grad_input = ((grad_out - mean_dy.view(shape) - centred * (invstd.square() * mean_dy_xmu).view(shape))
                          * scale.view(shape)).to(x.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, on every device (CrossRankBatchNormFunction):
    outputs and gradients match one process on the whole batch, and the backward pass keeps what a plain
    BatchNorm keeps.

    Why not torch's SyncBatchNorm: it reads the gathered counts on the host, one device-host synchronisation
    per BatchNorm layer (114 per step of the m8 recipe), which keeps the host from queueing work ahead of the
    GPU and blocks CUDA graphs; it has no CPU kernels (gloo tests); and its fused kernels (batch_norm_stats and
    the rest) have no meta or fake implementations, so torch.compile cannot trace them and the memory estimate
    cannot count them. `collective = True` takes the cross-rank path on one rank too (the memory estimate on the
    meta device, the GPU check)."""

    collective = False

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def spans_ranks(self) -> bool:
        """Whether training statistics need the other ranks (one process needs nothing but BatchNorm)."""
        return self.collective or (dist.is_initialized() and dist.get_world_size() > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.spans_ranks()):
            return super().forward(x)
        tracked = self.track_running_stats
        return CrossRankBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean if tracked else None, self.running_var if tracked else None,
            self.momentum, self.eps, self.num_batches_tracked if tracked else None)


def convert_to_cross_rank_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm{1,2,3}d -> CrossRankBatchNorm. The parameter and buffer objects themselves move
    over (not copies), so requires_grad (e.g. of a frozen EMA teacher) and any references stay intact."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        converted = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_cross_rank_batchnorm(child))
    return module


def sync_batchnorm(module: nn.Module, collective: bool = False) -> nn.Module:
    """Every BatchNorm of the model, on any device, becomes a CrossRankBatchNorm; `collective`: one that takes
    the cross-rank path without other ranks (what the memory estimate counts for a multi-rank run)."""
    module = convert_to_cross_rank_batchnorm(module)
    for child in module.modules():
        if isinstance(child, CrossRankBatchNorm):
            child.collective = collective
    return module
