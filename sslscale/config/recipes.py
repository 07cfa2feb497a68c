"""The recipes that ship in configs/, one line each (`sslscale recipes`)."""
from __future__ import annotations

import glob
import os

from sslscale.config import Config, load_config

# configs/ of the checkout: sslscale/config/recipes.py -> the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")


def describe(cfg: Config) -> str:
    """objective, trunk, representation, epochs, crops, global batch and data of a recipe, in one line."""
    dim = cfg.model.dim or "native"
    crops = " + ".join(f"{g.count}x{g.size}" for g in cfg.data.crops)
    data = cfg.data.source + (f" {cfg.data.path}" if cfg.data.path else "")
    return (f"{cfg.objective.name:<6} {cfg.model.backbone} (width {cfg.model.width}, d {dim}), "
            f"{cfg.train.epochs:g} epochs, crops {crops}, batch {cfg.data.batch_size}, {data}")


def list_recipes(folder: str = CONFIGS_DIR) -> list[tuple[str, str]]:
    """(name, one-line description) of every recipe in `folder`."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no recipes folder at {folder}: the recipes ship in configs/ of a source checkout")
    return [(os.path.basename(path)[:-len(".yaml")], describe(load_config(path)))
            for path in sorted(glob.glob(os.path.join(folder, "*.yaml")))]
