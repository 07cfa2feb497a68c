"""DINO baseline: EMA teacher (encoder + head), centring and sharpening of the teacher output."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from sslscale.models.heads import build_head
from sslscale.models.multicrop import encode_crops
from sslscale.objectives.base import Objective, ObjectiveContext
from sslscale.objectives.dissl import cross_entropy
from sslscale.objectives.gather import or_local


def dino_loss(teacher_out: list[torch.Tensor], student_out: list[torch.Tensor],
              *, center: torch.Tensor | list[torch.Tensor], tau_t: float, tau_s: float):
    """teacher_out: [B, K] per large crop (no gradient); student_out: [B, K] per crop, large first.
    center: one [K] centre for every teacher crop, or a list of one per teacher crop (per-view centring).
    Same-view pairs (teacher crop k, student crop k) are skipped."""
    centers = center if isinstance(center, (list, tuple)) else [center] * len(teacher_out)
    teacher_probs = [F.softmax((t.float() - c) / tau_t, dim=-1).detach() for t, c in zip(teacher_out, centers)]
    student_log_probs = [F.log_softmax(s.float() / tau_s, dim=-1) for s in student_out]
    terms = [cross_entropy(teacher_probs[k], student_log_probs[j])
             for k in range(len(teacher_probs)) for j in range(len(student_log_probs)) if j != k]
    if not terms:
        raise ValueError("DINO needs at least two crops")
    return torch.stack(terms).mean(), {}


def per_view_centers(center: torch.Tensor, batch_centers: list[torch.Tensor], momentum: float
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The authors' centring: one EMA update per teacher view, inside its loss term, so a later term sees the
    centre the earlier ones updated. Their first term pairs the student's view 0 with the teacher's view 1,
    so the teacher views are taken last first. Returns (the centre each teacher view is centred with, the
    centre after all updates)."""
    centers: list[torch.Tensor] = [center] * len(batch_centers)
    for k in reversed(range(len(batch_centers))):
        centers[k] = center
        center = center * momentum + batch_centers[k] * (1 - momentum)
    return centers, center


def epoch_of(step: int, steps_per_epoch: float) -> int:
    """The 0-based epoch of a step (steps_per_epoch = samples per epoch / global batch; the small margin keeps
    a step that starts an epoch exactly in that epoch despite the rounding of the division)."""
    return math.floor(step / steps_per_epoch + 1e-9)


def cosine_momentum(start: float, step: int, total_steps: int) -> float:
    """Teacher EMA momentum: start -> 1 along a half cosine over the run."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1 - (1 - start) * (math.cos(math.pi * progress) + 1) / 2


class DINO(Objective):
    def __init__(self, cfg, ctx: ObjectiveContext):
        super().__init__()
        self.cfg, self.ctx, self.gather = cfg, ctx, or_local(ctx.gather)
        self.student_head = build_head("dino", cfg.head, ctx.feature_dim, cfg.n_prototypes, init=ctx.init,
                                       hidden=cfg.hidden, bottleneck=cfg.bottleneck)
        self.teacher_encoder = copy.deepcopy(ctx.encoder)
        if cfg.teacher_head_init == "random":  # the authors' code: a head of its own, initialised independently
            self.teacher_head = build_head("dino", cfg.head, ctx.feature_dim, cfg.n_prototypes, init=ctx.init,
                                           hidden=cfg.hidden, bottleneck=cfg.bottleneck)
        else:
            self.teacher_head = copy.deepcopy(self.student_head)
        for p in [*self.teacher_encoder.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(cfg.n_prototypes))

    def teacher_temperature(self, step: int) -> float:
        if self.cfg.tau_t_interval == "epoch":
            # The authors' (and DINO's) schedule: a linspace of tau_t_warmup_epochs values, one per epoch, so
            # tau_t_end is reached at epoch tau_t_warmup_epochs - 1.
            epoch, warmup = epoch_of(step, self.ctx.steps_per_epoch), round(self.cfg.tau_t_warmup_epochs)
            if epoch >= warmup:
                return self.cfg.tau_t_end
            return self.cfg.tau_t_start + (self.cfg.tau_t_end - self.cfg.tau_t_start) * epoch / max(warmup - 1, 1)
        warmup_steps = self.cfg.tau_t_warmup_epochs * self.ctx.steps_per_epoch
        if step >= warmup_steps:
            return self.cfg.tau_t_end
        return self.cfg.tau_t_start + (self.cfg.tau_t_end - self.cfg.tau_t_start) * step / warmup_steps

    def forward(self, features, step: int, crops=None):
        n_large = self.ctx.n_large_crops
        with torch.no_grad():
            teacher_features = encode_crops(self.teacher_encoder, crops[:n_large])
            teacher_out = list(self.teacher_head(torch.cat(teacher_features)).chunk(n_large))
        student_out = list(self.student_head(torch.cat(features)).chunk(len(features)))
        tau_t = self.teacher_temperature(step)
        if self.cfg.center_update == "per_view" and self.training:
            with torch.no_grad():
                batch_centers = [self.gather(t.float()).mean(0) for t in teacher_out]
                centers, new_center = per_view_centers(self.center.clone(), batch_centers, self.cfg.center_momentum)
            loss, logs = dino_loss(teacher_out, student_out, center=centers, tau_t=tau_t, tau_s=self.cfg.tau_s)
            self.center.copy_(new_center)
        else:
            loss, logs = dino_loss(teacher_out, student_out, center=self.center, tau_t=tau_t, tau_s=self.cfg.tau_s)
            if self.training:
                with torch.no_grad():
                    batch_center = self.gather(torch.cat(teacher_out).float()).mean(0)
                    self.center.mul_(self.cfg.center_momentum).add_(batch_center,
                                                                    alpha=1 - self.cfg.center_momentum)
        logs["tau_t"] = tau_t  # a Python number: schedule values never leave the host
        return loss, logs

    def after_backward(self, step: int) -> None:
        # The last layer stays fixed at first: DINO is unstable if the prototypes move from step 0.
        if step < self.cfg.freeze_last_layer_epochs * self.ctx.steps_per_epoch:
            for p in self.student_head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, encoder, skip: torch.Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, as one lerp over all tensors; a skipped
        step (skip = 1, on the device) moves nothing, as the student did not move."""
        from sslscale.dist.parallel import local
        momentum = cosine_momentum(self.cfg.momentum_start, step, self.ctx.total_steps)
        teacher = [*self.teacher_encoder.parameters(), *self.teacher_head.parameters()]
        student = [*encoder.parameters(), *self.student_head.parameters()]
        weight = (1 - momentum) * (1 - skip)
        torch._foreach_lerp_([local(t) for t in teacher], [local(s.detach()) for s in student],
                             [weight] * len(teacher))
