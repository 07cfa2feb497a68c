"""The objectives, one file each, behind one registry keyed by `objective.name`."""
from sslscale.objectives.base import Objective, ObjectiveContext
from sslscale.objectives.cissl import CISSL, cissl_loss
from sslscale.objectives.dino import DINO, dino_loss
from sslscale.objectives.dissl import DISSL, dissl_loss
from sslscale.objectives.simclr import SimCLR, simclr_loss

REGISTRY: dict[str, type[Objective]] = {"dissl": DISSL, "cissl": CISSL, "simclr": SimCLR, "dino": DINO}


def build_objective(objective_cfg, ctx: ObjectiveContext) -> Objective:
    if objective_cfg.name not in REGISTRY:
        raise ValueError(f"unknown objective {objective_cfg.name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[objective_cfg.name](objective_cfg.selected, ctx)


__all__ = ["REGISTRY", "build_objective", "Objective", "ObjectiveContext", "dissl_loss", "cissl_loss",
           "simclr_loss", "dino_loss"]
