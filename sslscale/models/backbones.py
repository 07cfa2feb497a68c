"""ResNet trunks: torchvision's blocks and state-dict key names, no fc, optional dimension block.

Keeping torchvision's names (conv1, bn1, layer1..4) plus `resizer` means the published DISSL
checkpoints (docs/method.md section 5) load without renaming.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_LAYOUTS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


INITS = ("torchvision", "authors_imagenet", "authors_small_data")


@torch.no_grad()
def variance_scaling_(weight: torch.Tensor) -> None:
    """The authors' variance scaling (fan_in, scale 1, "truncated normal"), written as their code writes it:
    trunc_normal with std sqrt(1 / fan_in) / 0.8796 and torch's default bounds of -2 and 2 (absolute, so
    nothing is cut at these widths and the std is 1.137 / sqrt(fan_in))."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    nn.init.trunc_normal_(weight, std=math.sqrt(1.0 / fan_in) / .87962566103423978)


class DimensionExpand(nn.Module):
    """Residual bottleneck that raises the width from c_in to d (a multiple of c_in) before pooling:
    out = ReLU(BN(conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv1x1(x)))))))) + [x, x, ...])."""

    def __init__(self, c_in: int, dim: int, hidden: int = 512):
        super().__init__()
        if dim % c_in:
            raise ValueError(f"model.dim {dim} must be a multiple of the trunk width {c_in} to expand it")
        self.repeats = dim // c_in
        self.conv1 = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(dim)

    @torch.no_grad()
    def authors_init(self) -> None:
        """The authors' init of this block: variance scaling for every conv, then the first conv N(0, 1/hidden)
        (a Johnson-Lindenstrauss projection); BatchNorm weight 1, bias 0."""
        for conv in (self.conv1, self.conv2, self.conv3):
            variance_scaling_(conv.weight)
        nn.init.normal_(self.conv1.weight, std=1 / math.sqrt(self.conv1.weight.shape[0]))
        for bn in (self.bn1, self.bn2, self.bn3):
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return torch.relu(h + x.repeat(1, self.repeats, 1, 1))


class DimensionReduce(nn.Module):
    """conv1x1-BN-ReLU for a representation narrower than the trunk."""

    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, dim, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)))


class ResNetTrunk(ResNet):
    """A torchvision ResNet up to global average pooling; `width` scales every stage."""

    def __init__(self, backbone: str, width: int = 64, dim: int | None = None, small_image_stem: bool = False,
                 init: str = "torchvision"):
        if backbone not in _LAYOUTS:
            raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(_LAYOUTS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        block, layers = _LAYOUTS[backbone]
        nn.Module.__init__(self)
        # The attributes ResNet._make_layer reads.
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = width
        if small_image_stem:
            self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        native = width * 8 * block.expansion
        if dim is None or dim == native:
            self.resizer = None
        elif dim > native:
            self.resizer = DimensionExpand(native, dim)
        else:
            self.resizer = DimensionReduce(native, dim)
        self.out_dim = dim or native
        self._init_weights(init, small_image_stem)

    def _init_weights(self, init: str = "torchvision", small_image_stem: bool = False):
        """torchvision (default): torchvision's initialisation of every conv, so a trunk here trains like
        torchvision's. authors_imagenet: the authors' VISSL trunk, whose convs keep torch's default init
        (kaiming_uniform with a = sqrt(5)); authors_small_data: the authors' small-data trunk, torchvision's
        init with the small-image stem's conv variance-scaled. Both give the dimension block its authors' init
        (DimensionExpand.authors_init) and leave the plain conv1x1 of DimensionReduce at torch's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init != "authors_imagenet":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if init == "torchvision":
            return
        if init == "authors_small_data" and small_image_stem:
            variance_scaling_(self.conv1.weight)
        if isinstance(self.resizer, DimensionExpand):
            self.resizer.authors_init()
        elif isinstance(self.resizer, DimensionReduce):
            self.resizer.conv1.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.resizer is not None:
            x = self.resizer(x)
        # Global average pooling as a mean: its backward is deterministic on GPUs, adaptive_avg_pool2d's is not.
        return x.mean(dim=(2, 3))


def build_trunk(model_cfg) -> ResNetTrunk:
    return ResNetTrunk(model_cfg.backbone, model_cfg.width, model_cfg.dim, model_cfg.small_image_stem,
                       model_cfg.init)
