"""objective: section - which objective trains, its hyper-parameters and the heads it is built with."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from sslscale.config.checks import INTERVALS, choice, positive

OBJECTIVES = ("dissl", "cissl", "simclr", "dino")
DINO_CENTER_UPDATES = ("per_step", "per_view")
DINO_TEACHER_HEAD_INITS = ("copy", "random")


# Heads are chosen by name: the authors' heads of each recipe (sslscale/models/heads.py, docs/method.md
# section 8). A width left at None is the named head's own. HEADS maps each head key to its role in the
# registry, WIDTHS lists the keys that override a width.


@dataclass
class DisslConfig:
    n_classes: int = 16384  # C, the number of equivalence classes
    lam: float = 2.3  # weight of the marginal entropy H_M
    beta: float = 0.6  # weight of the teacher invariance term CE_inv
    tau_t: float = 0.5
    tau_s: float = 1.0
    beta_warmup_steps: int = 0  # 0: no warm-up (the 800-epoch recipe uses 1000)
    teacher_head: str = "imagenet_d2048"  # imagenet_d2048 | imagenet_d8192 | small_data
    student_head: str = "low_rank_linear"
    teacher_hidden: int | None = None
    teacher_bottleneck: int | None = None
    student_bottleneck: int | None = None

    SHAPE_FIELDS = ("n_classes", "teacher_head", "student_head", "teacher_hidden", "teacher_bottleneck",
                    "student_bottleneck")
    HEADS = {"teacher_head": "dissl_teacher", "student_head": "dissl_student"}
    WIDTHS = ("teacher_hidden", "teacher_bottleneck", "student_bottleneck")


@dataclass
class CisslConfig:
    tau: float = 0.1
    dim: int = 128
    teacher_head: str = "imagenet"  # imagenet | small_data
    student_head: str = "imagenet"  # imagenet | small_data
    teacher_hidden: int | None = None

    SHAPE_FIELDS = ("dim", "teacher_head", "student_head", "teacher_hidden")
    HEADS = {"teacher_head": "cissl_teacher", "student_head": "cissl_student"}
    WIDTHS = ("teacher_hidden",)


@dataclass
class SimclrConfig:
    tau: float = 0.1
    dim: int = 128
    head: str = "imagenet"  # imagenet | small_data: the CISSL teacher MLP of that recipe
    hidden: int | None = None

    SHAPE_FIELDS = ("dim", "head", "hidden")
    HEADS = {"head": "simclr"}
    WIDTHS = ("hidden",)


@dataclass
class DinoConfig:
    n_prototypes: int = 1000
    head: str = "issl_baseline"
    hidden: int | None = None
    bottleneck: int | None = None
    tau_s: float = 0.1
    tau_t_start: float = 0.04
    tau_t_end: float = 0.07
    tau_t_warmup_epochs: float = 50
    # step: tau_t rises linearly every step, reaching tau_t_end at tau_t_warmup_epochs; epoch: a per-epoch
    # linspace of tau_t_warmup_epochs values (the authors' and DINO's own: tau_t_end from epoch
    # tau_t_warmup_epochs - 1 on; needs a whole tau_t_warmup_epochs).
    tau_t_interval: str = "step"
    momentum_start: float = 0.996  # teacher EMA momentum, cosine to 1 per step
    center_momentum: float = 0.9
    # per_step: one EMA update of the centre per step with the mean of every teacher view, after the loss;
    # per_view: one update per teacher view inside its loss term, the next term centred with the updated
    # centre (the authors' code: two updates per step with two views).
    center_update: str = "per_step"
    # copy: the teacher head starts as a copy of the student's; random: a head of its own with its own random
    # initialisation (the authors' code). The teacher trunk is a copy of the student's either way.
    teacher_head_init: str = "copy"
    freeze_last_layer_epochs: float = 1

    SHAPE_FIELDS = ("n_prototypes", "head", "hidden", "bottleneck")
    HEADS = {"head": "dino"}
    WIDTHS = ("hidden", "bottleneck")


@dataclass
class ObjectiveConfig:
    name: str = "dissl"
    dissl: DisslConfig = field(default_factory=DisslConfig)
    cissl: CisslConfig = field(default_factory=CisslConfig)
    simclr: SimclrConfig = field(default_factory=SimclrConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)

    @property
    def selected(self):
        return getattr(self, self.name)


def _validate_heads(name: str, section) -> list[str]:
    """Head names against the registry of their role, widths > 0 where given."""
    from sslscale.models.heads import HEADS
    e = []
    for key, role in section.HEADS.items():
        e += choice(f"objective.{name}.{key}", getattr(section, key), tuple(HEADS[role]))
    for key in section.WIDTHS:
        if getattr(section, key) is not None:
            e += positive(f"objective.{name}.{key}", getattr(section, key))
    return e


def validate_objective(c) -> list[str]:
    e: list[str] = []
    n_crops = sum(g.count for g in c.data.crops)
    n_large = c.data.crops[0].count if c.data.crops else 0
    name = c.objective.name
    if name in OBJECTIVES:
        e += _validate_heads(name, c.objective.selected)
    if name == "dissl":
        d = c.objective.dissl
        if d.n_classes < 2:
            e.append(f"objective.dissl.n_classes: {d.n_classes}; C must be >= 2")
        for key in ("tau_t", "tau_s"):
            e += positive(f"objective.dissl.{key}", getattr(d, key))
        if d.beta_warmup_steps < 0:
            e.append(f"objective.dissl.beta_warmup_steps: {d.beta_warmup_steps} must be >= 0")
        if d.lam < d.beta + 1:
            warnings.warn(f"objective.dissl: lam ({d.lam}) < beta + 1 ({d.beta + 1}); the DISSL theory asks "
                          f"for lam >= beta + 1 to avoid collapse", stacklevel=2)
    if name in ("dissl", "dino") and n_large < 2:
        e.append(f"data.crops[0].count: {n_large}; {name} needs at least 2 large crops for its teacher")
    if name in ("cissl", "simclr") and (n_crops != 2 or len(c.data.crops) != 1):
        e.append(f"data.crops: {name} uses exactly two views of one size, got "
                 f"{[(g.count, g.size) for g in c.data.crops]} (count, size)")
    if name == "cissl":
        e += positive("objective.cissl.tau", c.objective.cissl.tau)
        e += positive("objective.cissl.dim", c.objective.cissl.dim)
    if name == "simclr":
        e += positive("objective.simclr.tau", c.objective.simclr.tau)
        e += positive("objective.simclr.dim", c.objective.simclr.dim)
    if name == "dino":
        d = c.objective.dino
        for key in ("n_prototypes", "tau_s", "tau_t_start", "tau_t_end"):
            e += positive(f"objective.dino.{key}", getattr(d, key))
        for key in ("momentum_start", "center_momentum"):
            if not 0 <= getattr(d, key) <= 1:
                e.append(f"objective.dino.{key}: {getattr(d, key)}; valid range is [0, 1]")
        e += choice("objective.dino.tau_t_interval", d.tau_t_interval, INTERVALS)
        e += choice("objective.dino.center_update", d.center_update, DINO_CENTER_UPDATES)
        e += choice("objective.dino.teacher_head_init", d.teacher_head_init, DINO_TEACHER_HEAD_INITS)
        if d.tau_t_interval == "epoch" and not float(d.tau_t_warmup_epochs).is_integer():
            e.append(f"objective.dino.tau_t_warmup_epochs: {d.tau_t_warmup_epochs}; objective.dino.tau_t_interval: "
                     f"epoch takes one value per epoch and needs whole epochs (or use tau_t_interval: step)")
    return e
