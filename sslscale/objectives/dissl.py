"""DISSL: distillation ISSL (docs/method.md section 1). No EMA, no stop-gradient, no centring.

loss = CE_dst - lam * H_M + beta * CE_inv, where
  p_k    = softmax(T(z_k) / tau_t)   teacher probabilities of the large crops k (gradients flow)
  H_M    = mean_k H(mean of p_k over the GLOBAL batch)        -> spread mass over all C classes
           (one all-reduce of the local sums, a [K_t, C] tensor, never the [B, C] probabilities)
  CE_inv = mean over ordered large-crop pairs k != l of CE(p_k, p_l)  -> teacher invariant to views
  CE_dst = mean over (k large, j any crop, j != k) of CE(p_k, q_j)    -> student predicts teacher
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslscale.models.heads import build_head
from sslscale.objectives.base import Objective, ObjectiveContext
from sslscale.objectives.gather import Gather, or_local


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) along the last dimension, with 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def cross_entropy(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -sum_c p_c log q_c."""
    return -(p * log_q).sum(-1).mean()


def dissl_loss(teacher_logits: list[torch.Tensor], student_logits: list[torch.Tensor], *, lam: float,
               beta: float, tau_t: float, tau_s: float, gather: Gather | None = None):
    """teacher_logits: one [B, C] tensor per large crop; student_logits: one per crop, large first."""
    gather = or_local(gather)
    n_large = len(teacher_logits)
    if n_large < 2 or len(student_logits) < n_large:
        raise ValueError(f"DISSL needs >= 2 teacher crops and at least as many student crops, got "
                         f"{n_large} and {len(student_logits)}")
    teacher = [t.float() / tau_t for t in teacher_logits]
    probs = [F.softmax(t, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(t, dim=-1) for t in teacher]
    log_q = [F.log_softmax(s.float() / tau_s, dim=-1) for s in student_logits]

    # The global marginal needs only each rank's sum over its rows: all-reduce a [K_t, C] tensor (with
    # gradients) instead of gathering the [B, C] probabilities of every rank.
    local_sums = torch.stack([p.sum(0) for p in probs])
    marginals = gather.sum(local_sums) / (probs[0].shape[0] * gather.world_size)
    h_marginal = entropy(marginals).mean()
    ce_inv = torch.stack([cross_entropy(probs[k], log_probs[other])
                          for k in range(n_large) for other in range(n_large) if other != k]).mean()
    ce_dst = torch.stack([cross_entropy(probs[k], log_q[j])
                          for k in range(n_large) for j in range(len(log_q)) if j != k]).mean()
    loss = ce_dst - lam * h_marginal + beta * ce_inv
    with torch.no_grad():
        h_conditional = torch.stack([entropy(p).mean() for p in probs]).mean()
    logs = {"H_M": h_marginal.detach(), "H_M_given_Z": h_conditional, "CE_inv": ce_inv.detach(),
            "CE_dst": ce_dst.detach()}
    return loss, logs


def warmed_up_beta(beta: float, lam: float, step: int, warmup_steps: int) -> float:
    """beta_t = lam + (beta - lam) * (t + 2) / T_w for the 0-based step t: start invariance near lam, ease to
    beta, reached at t = T_w - 2. The authors' loss increments its step counter before it uses it, so their
    first step already sees (1 + 1) / T_w (docs/method.md section 1)."""
    if step + 2 >= warmup_steps:
        return beta
    return lam + (beta - lam) * (step + 2) / warmup_steps


class DISSL(Objective):
    """Teacher head (large crops; the recipe's MLP, docs/method.md section 8) and low-rank linear student head
    (all crops)."""

    def __init__(self, cfg, ctx: ObjectiveContext):
        super().__init__()
        self.cfg, self.n_large, self.gather = cfg, ctx.n_large_crops, ctx.gather
        self.teacher_head = build_head("dissl_teacher", cfg.teacher_head, ctx.feature_dim, cfg.n_classes,
                                       init=ctx.init, hidden=cfg.teacher_hidden, bottleneck=cfg.teacher_bottleneck)
        self.student_head = build_head("dissl_student", cfg.student_head, ctx.feature_dim, cfg.n_classes,
                                       init=ctx.init, bottleneck=cfg.student_bottleneck)

    def forward(self, features: list[torch.Tensor], step: int, crops=None):
        large = torch.cat(features[: self.n_large])
        teacher_logits = list(self.teacher_head(large).chunk(self.n_large))
        student_logits = list(self.student_head(torch.cat(features)).chunk(len(features)))
        beta = warmed_up_beta(self.cfg.beta, self.cfg.lam, step, self.cfg.beta_warmup_steps)
        loss, logs = dissl_loss(teacher_logits, student_logits, lam=self.cfg.lam, beta=beta,
                                tau_t=self.cfg.tau_t, tau_s=self.cfg.tau_s, gather=self.gather)
        logs["beta"] = beta  # a Python number: schedule values never leave the host
        return loss, logs
