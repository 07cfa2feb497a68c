"""BatchNorm whose statistics span every rank's rows (SyncBN), on any device."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, on every device.

    Each rank computes the mean and variance of its own rows (two passes, in fp32 whatever the input's
    dtype), the ranks all-gather [mean, variance, count] of every channel in one collective, and every
    rank combines them exactly (the parallel form of the variance: the mean of the variances plus the
    variance of the means). The gather keeps gradients (functional collectives, which torch.compile
    traces), so outputs and gradients match one process on the whole batch.

    Why not torch's SyncBatchNorm on GPUs: it reads the gathered counts on the host, one device-host
    synchronisation per BatchNorm layer (114 per step of the m8 recipe), which keeps the host from
    queueing work ahead of the GPU and blocks CUDA graphs; and it has no CPU kernels (gloo tests)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def spans_ranks(self) -> bool:
        """Whether training statistics need the other ranks (one process needs nothing but BatchNorm)."""
        return dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.spans_ranks()):
            return super().forward(x)
        from torch.distributed import _functional_collectives as funcol
        # all_gather_single_autograd is the current name (torch 2.14); all_gather_tensor_autograd the older one.
        gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
        dims = [0] + list(range(2, x.dim()))
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        local_mean = x.mean(dims, dtype=torch.float32)
        local_var = (x - local_mean.view(shape)).square().mean(dims, dtype=torch.float32)
        count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        stats = gather(torch.cat([local_mean, local_var, count]).unsqueeze(0), gather_dim=0, group=dist.group.WORLD)
        means, variances, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, 2 * channels:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).square())).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * total / (total - 1)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        # x * scale + shift computed in fp32 (bf16 x promotes), rounded to the input's dtype once, as cuDNN does.
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)


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


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of the model, on any device, becomes a CrossRankBatchNorm."""
    return convert_to_cross_rank_batchnorm(module)
