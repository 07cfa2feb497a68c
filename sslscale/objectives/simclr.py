"""SimCLR baseline: one head on both views, NT-Xent with negatives from every rank."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslscale.models.heads import build_head
from sslscale.objectives.base import Objective, ObjectiveContext
from sslscale.objectives.cissl import two_view_columns
from sslscale.objectives.gather import Gather, or_local


def simclr_loss(emb: list[torch.Tensor], *, tau: float, gather: Gather | None = None):
    """emb: two [B, D] tensors (one per view). Self-similarity is masked; the positive is the other view."""
    gather = or_local(gather)
    if len(emb) != 2:
        raise ValueError(f"SimCLR uses two views, got {len(emb)}")
    batch = emb[0].shape[0]
    local = F.normalize(torch.cat(emb).float(), dim=-1)
    logits = local @ gather(local).T / tau
    own, other = two_view_columns(batch, gather.rank, local.device)
    self_similarity = torch.zeros_like(logits, dtype=torch.bool)
    self_similarity[torch.arange(2 * batch, device=local.device), own] = True
    logits = logits.masked_fill(self_similarity, float("-inf"))
    loss = F.cross_entropy(logits, other)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == other).float().mean()
    return loss, {"positive_top1": accuracy}


class SimCLR(Objective):
    def __init__(self, cfg, ctx: ObjectiveContext):
        super().__init__()
        self.cfg, self.gather = cfg, ctx.gather
        self.head = build_head("simclr", cfg.head, ctx.feature_dim, cfg.dim, init=ctx.init, hidden=cfg.hidden)

    def forward(self, features: list[torch.Tensor], step: int, crops=None):
        return simclr_loss(list(self.head(torch.cat(features)).chunk(2)), tau=self.cfg.tau, gather=self.gather)
