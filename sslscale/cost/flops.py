"""FLOPs of one training step per image, counted by fvcore on a small batch."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from sslscale.cost.model_state import EMA_MODULES, MODULE_NAMES

# Images per crop size in the FLOP count: BatchNorm in training mode needs more than one.
FLOP_COUNT_BATCH = 2


def count_flops(model: nn.Module, crop_sizes: list[int], objective: str) -> dict:
    """fvcore's count of one training step, per image. fvcore counts a multiply-add as ONE flop; the
    FLOPs here count it as two, as hardware peaks do. Backward costs twice the forward of the modules
    that are trained; EMA teachers run forward only."""
    try:
        with warnings.catch_warnings():  # fvcore's import scripts a function: torch warns of jit.script
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return {"error": "fvcore is not installed (pip install fvcore): no FLOP count"}

    class Step(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *crops):
            return self.model(list(crops), 0)[0]

    crops = [torch.randn(FLOP_COUNT_BATCH, 3, size, size) for size in crop_sizes]
    model.train()
    with warnings.catch_warnings():  # tracing warnings about Python values in the graph
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(Step(model), tuple(crops))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = analysis.by_module()
        total = analysis.total()
    reverse = {plan: attr for attr, plan in MODULE_NAMES.items()}
    forward_only = 0
    for name in EMA_MODULES.get(objective, ()):
        attr = reverse.get(name, name)
        prefix = "model.encoder" if attr == "encoder" else f"model.objective.{attr}"
        forward_only += by_module.get(prefix, 0)
    forward_macs = total / FLOP_COUNT_BATCH
    trained_macs = (total - forward_only) / FLOP_COUNT_BATCH
    return {"forward_macs": forward_macs, "forward_flops": 2 * forward_macs,
            "train_step_flops": 2 * (3 * trained_macs + forward_only / FLOP_COUNT_BATCH),
            "counting": "fvcore counts a multiply-add as one; FLOPs here count it as two (as hardware peaks "
                        "do); backward = 2 x the forward of trained modules; EMA teachers forward only"}
