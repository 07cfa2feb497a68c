"""CISSL: contrastive ISSL (docs/method.md section 2).

The student (query) embeds the local rows; the teacher (key) embeddings of ALL ranks are the
candidates. Each row's two positives are the teacher embeddings of its own view and of its other
view; every other teacher embedding is a negative, and the diagonal is not masked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslscale.models.heads import build_head
from sslscale.objectives.base import Objective, ObjectiveContext
from sslscale.objectives.gather import Gather, or_local


def two_view_columns(batch: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For local rows [view1; view2] (2B of them), the column of each row's own view and of its
    other view among the gathered [rank 0 rows; rank 1 rows; ...]."""
    rows = torch.arange(2 * batch, device=device)
    own = rank * 2 * batch + rows
    other = rank * 2 * batch + (rows + batch) % (2 * batch)
    return own, other


def cissl_loss(student_emb: list[torch.Tensor], teacher_emb: list[torch.Tensor], *, tau: float,
               gather: Gather | None = None):
    """student_emb, teacher_emb: two [B, D] tensors each (one per view)."""
    gather = or_local(gather)
    if len(student_emb) != 2 or len(teacher_emb) != 2:
        raise ValueError(f"CISSL uses two views, got {len(student_emb)} student and {len(teacher_emb)} teacher")
    batch = student_emb[0].shape[0]
    queries = F.normalize(torch.cat(student_emb).float(), dim=-1)
    keys = gather(F.normalize(torch.cat(teacher_emb).float(), dim=-1))
    log_q = F.log_softmax(queries @ keys.T / tau, dim=-1)
    own, other = two_view_columns(batch, gather.rank, queries.device)
    rows = torch.arange(2 * batch, device=queries.device)
    loss = -(log_q[rows, own] + log_q[rows, other]).mean() / 2
    with torch.no_grad():
        top = log_q.argmax(-1)
        accuracy = ((top == own) | (top == other)).float().mean()
    return loss, {"positive_top1": accuracy}


class CISSL(Objective):
    def __init__(self, cfg, ctx: ObjectiveContext):
        super().__init__()
        self.cfg, self.gather = cfg, ctx.gather
        # Student: the same function class as the linear probe (linear + BN); teacher: the recipe's MLP.
        self.student_head = build_head("cissl_student", cfg.student_head, ctx.feature_dim, cfg.dim, init=ctx.init)
        self.teacher_head = build_head("cissl_teacher", cfg.teacher_head, ctx.feature_dim, cfg.dim, init=ctx.init,
                                       hidden=cfg.teacher_hidden)

    def forward(self, features: list[torch.Tensor], step: int, crops=None):
        both = torch.cat(features)
        student = list(self.student_head(both).chunk(2))
        teacher = list(self.teacher_head(both).chunk(2))
        return cissl_loss(student, teacher, tau=self.cfg.tau, gather=self.gather)
