"""Heads that map a representation z to what an objective compares, built exactly as the method's
authors built them for each recipe, and chosen by name in the config.

Each role (the DISSL teacher, the CISSL student, ...) has a small registry of named heads. A name
fixes the shape; the widths default to the authors' and a config may override them (tests and the
CPU quickstart use narrow heads). "nb" below means no bias; BN is BatchNorm1d.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models.backbones import INITS


class Residual(nn.Sequential):
    """body(x) + x: the skip connection of the authors' residual head blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


def linear_bn_relu(in_dim: int, out_dim: int, *, bias: bool = False) -> list[nn.Module]:
    return [nn.Linear(in_dim, out_dim, bias=bias), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True)]


# ------------------------------------------------------------------------------------------------
# DISSL (docs/method.md section 8): the teacher maps z to C logits; the student is linear in z, built low-rank.

def dissl_teacher_imagenet_d2048(in_dim: int, n_classes: int, *, hidden: int, bottleneck: int) -> nn.Sequential:
    """[Lin(d,h,nb)-BN-ReLU-Lin(h,d,nb)-BN-ReLU] + skip, Lin(d,b,nb)-BN-ReLU, Lin(b,C)."""
    return nn.Sequential(Residual(*linear_bn_relu(in_dim, hidden), *linear_bn_relu(hidden, in_dim)),
                         *linear_bn_relu(in_dim, bottleneck), nn.Linear(bottleneck, n_classes))


def dissl_teacher_imagenet_d8192(in_dim: int, n_classes: int, *, hidden: int, bottleneck: int) -> nn.Sequential:
    """Lin(d,b,nb)-BN-ReLU, [Lin(b,h,nb)-BN-ReLU-Lin(h,h,nb)-BN-ReLU-Lin(h,b,nb)-BN-ReLU] + skip, Lin(b,C).
    No bias in the residual block, as in the authors' config (`use_bias: False`): 18,900,992 parameters."""
    block = [*linear_bn_relu(bottleneck, hidden), *linear_bn_relu(hidden, hidden), *linear_bn_relu(hidden, bottleneck)]
    return nn.Sequential(*linear_bn_relu(in_dim, bottleneck), Residual(*block), nn.Linear(bottleneck, n_classes))


def dissl_teacher_small_data(in_dim: int, n_classes: int, *, hidden: int, bottleneck: int) -> nn.Sequential:
    """Lin(d,h,nb)-BN-ReLU-Lin(h,b,nb)-BN, Lin(b,C): the bottleneck is linear (no ReLU after its BN)."""
    return nn.Sequential(*linear_bn_relu(in_dim, hidden), nn.Linear(hidden, bottleneck, bias=False),
                         nn.BatchNorm1d(bottleneck), nn.Linear(bottleneck, n_classes))


def low_rank_linear(in_dim: int, n_classes: int, *, bottleneck: int) -> nn.Sequential:
    """The DISSL student: linear in z, built low-rank (Lin(d,b,nb)-BN-Lin(b,C), no non-linearity)."""
    return nn.Sequential(nn.Linear(in_dim, bottleneck, bias=False), nn.BatchNorm1d(bottleneck),
                         nn.Linear(bottleneck, n_classes))


# ------------------------------------------------------------------------------------------------
# CISSL and SimCLR: heads to a small embedding that the losses L2-normalise.

def contrastive_mlp_imagenet(in_dim: int, out_dim: int, *, hidden: int) -> nn.Sequential:
    """Lin(d,h,nb)-BN-ReLU-Lin(h,h,nb)-BN-ReLU-Lin(h,out,nb)-BN, the last BN's bias frozen at 0 (the
    embedding is only shifted by a learned offset that the normalisation would then mix into every
    direction)."""
    out_norm = nn.BatchNorm1d(out_dim)
    out_norm.bias.requires_grad_(False)  # zero-initialised, and never trained
    return nn.Sequential(*linear_bn_relu(in_dim, hidden), *linear_bn_relu(hidden, hidden),
                         nn.Linear(hidden, out_dim, bias=False), out_norm)


def contrastive_mlp_small_data(in_dim: int, out_dim: int, *, hidden: int) -> nn.Sequential:
    """Lin(d,h,nb)-BN-ReLU-Lin(h,out)-BN."""
    return nn.Sequential(*linear_bn_relu(in_dim, hidden), nn.Linear(hidden, out_dim), nn.BatchNorm1d(out_dim))


def linear_bn(in_dim: int, out_dim: int) -> nn.Sequential:
    """The CISSL student of the ImageNet recipe: Lin(d,out,nb)-BN, the function class of the probe."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))


def linear_with_bias_bn(in_dim: int, out_dim: int) -> nn.Sequential:
    """The CISSL student of the small-data recipe: Lin(d,out)-BN."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim))


# ------------------------------------------------------------------------------------------------
# DINO: the paper's baseline head (docs/method.md section 3), not the original DINO head.

class NormalizedLinear(nn.Module):
    """Weight-normalised linear layer with the norm g fixed at 1 (DINO's last layer)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DinoHead(nn.Module):
    """Lin(d,h,nb)-BN-GELU, L2-normalise the h-d hidden vector, Lin(h,b,nb) (no norm after it), then a
    weight-normed Lin(b,K,nb) with g fixed at 1. The original DINO head normalises the b-d bottleneck
    instead; this is the head of the paper's baseline."""

    def __init__(self, in_dim: int, n_prototypes: int, *, hidden: int, bottleneck: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU())
        self.bottleneck = nn.Linear(hidden, bottleneck, bias=False)
        self.last_layer = NormalizedLinear(bottleneck, n_prototypes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(F.normalize(self.hidden(z), dim=-1)))


# ------------------------------------------------------------------------------------------------
# The registries: role -> name -> head.


@dataclass(frozen=True)
class HeadSpec:
    build: Callable[..., nn.Module]  # build(in_dim, out_dim, **widths)
    widths: dict  # the authors' widths; a config value that is not None replaces one
    recipe: str  # where the authors used it, for errors and `sslscale plan`


HEADS: dict[str, dict[str, HeadSpec]] = {
    "dissl_teacher": {
        "imagenet_d2048": HeadSpec(dissl_teacher_imagenet_d2048, {"hidden": 2048, "bottleneck": 512},
                                   "ImageNet, d = 2048"),
        "imagenet_d8192": HeadSpec(dissl_teacher_imagenet_d8192, {"hidden": 2048, "bottleneck": 512},
                                   "ImageNet, d = 8192"),
        "small_data": HeadSpec(dissl_teacher_small_data, {"hidden": 1024, "bottleneck": 512}, "small data"),
    },
    "dissl_student": {
        "low_rank_linear": HeadSpec(low_rank_linear, {"bottleneck": 512}, "every DISSL recipe"),
    },
    "cissl_teacher": {
        "imagenet": HeadSpec(contrastive_mlp_imagenet, {"hidden": 2048}, "ImageNet"),
        "small_data": HeadSpec(contrastive_mlp_small_data, {"hidden": 1024}, "small data"),
    },
    "cissl_student": {
        "imagenet": HeadSpec(linear_bn, {}, "ImageNet"),
        "small_data": HeadSpec(linear_with_bias_bn, {}, "small data"),
    },
    # SimCLR's one head is the CISSL teacher MLP (docs/method.md section 3).
    "simclr": {
        "imagenet": HeadSpec(contrastive_mlp_imagenet, {"hidden": 2048}, "ImageNet"),
        "small_data": HeadSpec(contrastive_mlp_small_data, {"hidden": 1024}, "small data"),
    },
    "dino": {
        "issl_baseline": HeadSpec(DinoHead, {"hidden": 1024, "bottleneck": 256}, "the paper's DINO baseline"),
    },
}


def head_widths(role: str, name: str, **overrides: int | None) -> dict:
    """The widths a named head is built with: the authors', with the config's non-None values."""
    widths = dict(HEADS[role][name].widths)
    widths.update({k: v for k, v in overrides.items() if v is not None})
    return widths


def build_head(role: str, name: str, in_dim: int, out_dim: int, *, init: str = "torchvision",
               **overrides: int | None) -> nn.Module:
    """The head `name` of `role`, e.g. build_head("dissl_teacher", "imagenet_d8192", 8192, 16384), initialised
    as `init` (model.init) says."""
    if name not in HEADS[role]:
        raise ValueError(f"unknown {role} head {name!r}; valid: {', '.join(HEADS[role])}")
    head = HEADS[role][name].build(in_dim, out_dim, **head_widths(role, name, **overrides))
    init_head(head, role, name, out_dim, init)
    return head


# ------------------------------------------------------------------------------------------------
# Initialisation (model.init; docs/method.md section 8)

# The heads the authors initialised with a Johnson-Lindenstrauss projection (VISSL's is_JL_init, ImageNet
# CISSL): their Linears that map into the embedding from a wider input.
JL_HEADS = (("cissl_teacher", "imagenet"), ("cissl_student", "imagenet"))


@torch.no_grad()
def init_head(head: nn.Module, role: str, name: str, out_dim: int, init: str) -> None:
    """torchvision: leave torch's defaults as built. authors_imagenet (the authors' VISSL heads): torch's
    defaults, except the Linears of the ImageNet CISSL heads into the out_dim embedding from a wider input,
    N(0, 1/out_dim).
    authors_small_data (the authors' small-data code re-initialises every head): each Linear
    trunc_normal(std 0.02) with a zero bias, each BatchNorm weight 1 and bias 0, DINO's last layer
    trunc_normal(std 0.02) (it is already)."""
    if init == "torchvision":
        return
    if init == "authors_imagenet":
        if (role, name) in JL_HEADS:
            for m in head.modules():
                if isinstance(m, nn.Linear) and m.out_features == out_dim and m.out_features < m.in_features:
                    nn.init.normal_(m.weight, std=1 / out_dim ** 0.5)
        return
    if init == "authors_small_data":
        for m in head.modules():
            if isinstance(m, (nn.Linear, NormalizedLinear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        return
    raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
