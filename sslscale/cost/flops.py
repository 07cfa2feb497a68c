"""FLOPs of one training step per image, counted on a small batch: by fvcore where it is installed, else by
torch's own FlopCounterMode on the meta device (a bare GPU node has torch but not fvcore). The two agree within
a few percent on the recipes (fvcore also counts the elementwise work of BatchNorm and pooling; torch counts
matrix products and convolutions only); the plan names the counter that gave its figure."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from sslscale.cost.model_state import EMA_MODULES, MODULE_NAMES

# Images per crop size in the FLOP count: BatchNorm in training mode needs more than one.
FLOP_COUNT_BATCH = 2


COUNTING = ("a multiply-add counts as two FLOPs (as hardware peaks do); backward = 2 x the forward of trained "
            "modules; EMA teachers forward only")


class Step(nn.Module):
    """The model's forward on a tuple of crops, as the counters call a module."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *crops):
        return self.model(list(crops), 0)[0]


def per_image(forward_flops: float, forward_only_flops: float, counter: str) -> dict:
    """Counts of FLOP_COUNT_BATCH images -> one training image: forward, and forward + backward of what trains."""
    forward = forward_flops / FLOP_COUNT_BATCH
    trained = (forward_flops - forward_only_flops) / FLOP_COUNT_BATCH
    return {"forward_macs": forward / 2, "forward_flops": forward,
            "train_step_flops": 3 * trained + forward_only_flops / FLOP_COUNT_BATCH,
            "counter": counter, "counting": COUNTING}


def ema_prefixes(objective: str, root: str) -> list[str]:
    """Module paths (under `root`, the Step's model) of the modules that run forward only."""
    reverse = {plan: attr for attr, plan in MODULE_NAMES.items()}
    attrs = [reverse.get(name, name) for name in EMA_MODULES.get(objective, ())]
    return [f"{root}.encoder" if attr == "encoder" else f"{root}.objective.{attr}" for attr in attrs]


def count_flops(model: nn.Module, crop_sizes: list[int], objective: str) -> dict:
    """One training step per image: fvcore's count where fvcore is installed, else torch's FlopCounterMode."""
    try:
        with warnings.catch_warnings():  # fvcore's import scripts a function: torch warns of jit.script
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis  # noqa: F401
    except ImportError:
        return count_flops_with_torch(model, crop_sizes, objective)
    return count_flops_with_fvcore(model, crop_sizes, objective)


def count_flops_with_torch(model: nn.Module, crop_sizes: list[int], objective: str) -> dict:
    """torch.utils.flop_counter on a copy of the model on the meta device (shapes only: seconds for a
    ResNet-50 with 8 crops, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = copy.deepcopy(model).to("meta").train()
    crops = [torch.empty(FLOP_COUNT_BATCH, 3, size, size, device="meta") for size in crop_sizes]
    with FlopCounterMode(display=False) as counter:
        Step(meta)(*crops)
    counts = {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}
    forward_only = sum(counts.get(prefix, 0) for prefix in ema_prefixes(objective, "Step.model"))
    return per_image(counts["Global"], forward_only, "torch.utils.flop_counter")


def count_flops_with_fvcore(model: nn.Module, crop_sizes: list[int], objective: str) -> dict:
    """fvcore counts a multiply-add as ONE flop: doubled here."""
    from fvcore.nn import FlopCountAnalysis
    crops = [torch.randn(FLOP_COUNT_BATCH, 3, size, size) for size in crop_sizes]
    model.train()
    with warnings.catch_warnings():  # tracing warnings about Python values in the graph
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(Step(model), tuple(crops))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = analysis.by_module()
        total = analysis.total()
    forward_only = sum(by_module.get(prefix, 0) for prefix in ema_prefixes(objective, "model"))
    return per_image(2 * total, 2 * forward_only, "fvcore")
