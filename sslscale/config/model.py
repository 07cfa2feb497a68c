"""run: and model: sections - what the run is called and which trunk it trains."""
from __future__ import annotations

from dataclasses import dataclass

from sslscale.config.checks import choice, positive

BACKBONES = ("resnet18", "resnet50")


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "checkpoints"  # run folder = <root>/<name>
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    width: int = 64  # channels of the first stage; 64 is torchvision's ResNet
    dim: int | None = None  # representation dimension; None keeps the trunk's own width
    small_image_stem: bool = False  # 3x3 stride-1 conv1 for images of <= 64 px
    # How the trunk, its dimension block and the heads are initialised (docs/method.md section 8). torchvision:
    # torchvision's kaiming init for every conv, torch's defaults for the heads. authors_imagenet /
    # authors_small_data: the authors' code of that recipe (variance-scaled dimension block with a
    # Johnson-Lindenstrauss first conv; ImageNet: torch's default trunk convs, CISSL Linears into the embedding
    # N(0, 1/dim); small data: variance-scaled small-image stem, every head Linear trunc_normal(0.02)).
    init: str = "torchvision"

    SHAPE_FIELDS = ("backbone", "width", "dim", "small_image_stem")



def validate_model(m: ModelConfig) -> list[str]:
    from sslscale.models.backbones import INITS  # one list for the trunk and the heads
    e = choice("model.backbone", m.backbone, BACKBONES)
    e += positive("model.width", m.width)
    e += choice("model.init", m.init, INITS)
    if m.dim is not None:
        e += positive("model.dim", m.dim)
    return e


def validate_run(r: RunConfig) -> list[str]:
    if not r.name or "/" in r.name:
        return [f"run.name: {r.name!r}; give a non-empty name without '/'"]
    return []
