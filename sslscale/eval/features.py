"""Frozen trunks and what is read from them: the trunk output and, through forward hooks, other layers."""
from __future__ import annotations

import torch
from torch import nn

from sslscale.eval.cache import TRUNK

# Clean images used to re-estimate BatchNorm statistics: enough for stable means and variances.
BN_RECALIBRATION_IMAGES = 10_000


@torch.no_grad()
def recompute_bn_statistics(trunk: nn.Module, loader, device, max_images: int = BN_RECALIBRATION_IMAGES,
                            memory_format: torch.memory_format = torch.contiguous_format) -> None:
    """Replace running statistics gathered on augmented crops by plain averages over clean images:
    those of augmented crops do not describe the images the probe sees."""
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    trunk.train()
    seen = 0
    for images, _ in loader:
        trunk(images.to(device, memory_format=memory_format))
        seen += len(images)
        if seen >= max_images:
            break
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    trunk.eval()


class LayerTaps(nn.Module):
    """images -> {"trunk": z, path: that module's output, ...} for the module paths `layers` of `model`.

    `model` holds the trunk as `encoder` (a whole SSLModel) or is the trunk itself (then only
    `encoder.*` paths exist). A path under `encoder.` is read during the trunk's forward; any other
    path lies inside a head, named by its first two parts (objective.teacher_head), which is run on z
    to reach it. Feature maps [B, C, H, W] are average-pooled to [B, C]; other outputs are flattened.
    """

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        self.model = model
        self.trunk = model.encoder if hasattr(model, "encoder") else model
        self.layers = list(layers)
        self.heads: dict[str, nn.Module] = {}
        self.captured: dict[str, torch.Tensor] = {}
        for path in self.layers:
            parts = path.split(".")
            if parts[0] == "encoder":
                target = self._find(self.trunk, ".".join(parts[1:]), path)
            else:
                if self.trunk is model:
                    raise ValueError(f"eval.layers: {path!r} lies in a head, and a trunk file has no heads; "
                                     "probe encoder.* layers, or give the run folder")
                head = ".".join(parts[:2])
                self.heads[head] = self._find(model, head, path)
                target = self._find(model, path, path)
            target.register_forward_hook(self._hook(path))

    @staticmethod
    def _find(root: nn.Module, path: str, asked: str) -> nn.Module:
        try:
            return root.get_submodule(path) if path else root
        except AttributeError:
            names = [n for n, _ in root.named_modules() if n][:12]
            raise ValueError(f"eval.layers: {asked!r} is not a module of the saved model; some that are: "
                             f"{', '.join(names)}") from None

    def _hook(self, path: str):
        def capture(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.captured[path] = output.mean(dim=tuple(range(2, output.dim()))) if output.dim() > 2 else output
        return capture

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.captured = {}
        z = self.trunk(images)
        for head in self.heads.values():
            head(z)
        missing = [p for p in self.layers if p not in self.captured]
        if missing:
            raise ValueError(f"eval.layers: {', '.join(missing)} did not run when the trunk and its heads did")
        return {TRUNK: z, **{p: self.captured[p].flatten(1) for p in self.layers}}
