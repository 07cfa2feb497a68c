import math

import pytest
import torch
import torch.nn.functional as F

from sslscale.config import load_config
from sslscale.models import ResNetTrunk, encode_crops
from sslscale.objectives import (
    REGISTRY,
    ObjectiveContext,
    build_objective,
    cissl_loss,
    dino_loss,
    dissl_loss,
    simclr_loss,
)
from sslscale.objectives.dino import cosine_momentum
from sslscale.objectives.dissl import warmed_up_beta


def softmax_rows(rows):
    out = []
    for row in rows:
        exps = [math.exp(v) for v in row]
        out.append([e / sum(exps) for e in exps])
    return out


# ---------------------------------------------------------------- DISSL

def reference_dissl(teacher, student, lam, beta, tau_t, tau_s):
    """docs/method.md section 1 written with plain Python loops."""
    p = [softmax_rows([[v / tau_t for v in row] for row in t]) for t in teacher]
    q = [softmax_rows([[v / tau_s for v in row] for row in s]) for s in student]
    B, C = len(teacher[0]), len(teacher[0][0])

    def ce(pk, ql):
        return sum(-sum(pk[b][c] * math.log(ql[b][c]) for c in range(C)) for b in range(B)) / B

    h_m = 0.0
    for pk in p:
        marginal = [sum(pk[b][c] for b in range(B)) / B for c in range(C)]
        h_m += -sum(m * math.log(m) for m in marginal)
    h_m /= len(p)
    inv = [ce(p[k], p[m]) for k in range(len(p)) for m in range(len(p)) if k != m]
    dst = [ce(p[k], q[j]) for k in range(len(p)) for j in range(len(q)) if j != k]
    return sum(dst) / len(dst) - lam * h_m + beta * sum(inv) / len(inv)


def test_dissl_loss_matches_a_hand_computed_case():
    teacher = [[[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]], [[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]]]
    student = teacher + [[[0.3, 0.3, 0.3], [1.0, -2.0, 0.5]]]  # 2 large + 1 small crop
    expected = reference_dissl(teacher, student, lam=2.3, beta=0.6, tau_t=0.5, tau_s=1.0)
    loss, logs = dissl_loss([torch.tensor(t) for t in teacher], [torch.tensor(s) for s in student],
                            lam=2.3, beta=0.6, tau_t=0.5, tau_s=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(logs) == {"H_M", "H_M_given_Z", "CE_inv", "CE_dst"}


def test_dissl_gradients_reach_the_teacher_no_stop_gradient():
    teacher = [torch.randn(4, 5, requires_grad=True) for _ in range(2)]
    student = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    loss, _ = dissl_loss(teacher, student, lam=2.3, beta=0.6, tau_t=0.5, tau_s=1.0)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in teacher)
    assert all(s.grad.abs().sum() > 0 for s in student)


def test_dissl_pairs_skip_same_view_and_include_small_crops():
    teacher = [torch.randn(4, 5) for _ in range(2)]
    student = [torch.randn(4, 5) for _ in range(4)]
    _, logs = dissl_loss(teacher, student, lam=0.0, beta=0.0, tau_t=0.5, tau_s=1.0)
    p = [F.softmax(t / 0.5, -1) for t in teacher]
    log_q = [F.log_softmax(s, -1) for s in student]
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    expected = sum(-(p[k] * log_q[j]).sum(-1).mean() for k, j in pairs) / len(pairs)
    assert logs["CE_dst"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_marginal_entropy_is_zero_under_collapse_and_log_c_when_spread():
    C = 8
    collapsed = torch.full((6, C), -30.0)
    collapsed[:, 3] = 30.0
    _, logs = dissl_loss([collapsed, collapsed], [collapsed, collapsed], lam=1, beta=0, tau_t=1, tau_s=1)
    assert logs["H_M"].item() == pytest.approx(0.0, abs=1e-6)
    spread = torch.full((C, C), -30.0)
    spread[torch.arange(C), torch.arange(C)] = 30.0  # sample b sure of class b: the batch covers all classes
    _, logs = dissl_loss([spread, spread], [spread, spread], lam=1, beta=0, tau_t=1, tau_s=1)
    assert logs["H_M"].item() == pytest.approx(math.log(C), rel=1e-6)
    assert logs["H_M_given_Z"].item() == pytest.approx(0.0, abs=1e-6)


def test_beta_warmup_starts_at_lambda_and_reaches_beta():
    assert warmed_up_beta(0.6, 2.3, 0, 1000) == pytest.approx(2.3 + (0.6 - 2.3) * 2 / 1000)
    assert warmed_up_beta(0.6, 2.3, 999, 1000) == pytest.approx(0.6)
    assert warmed_up_beta(0.6, 2.3, 5000, 1000) == 0.6
    assert warmed_up_beta(0.6, 2.3, 0, 0) == 0.6


def test_dissl_module_feeds_the_teacher_only_large_crops():
    cfg = load_config(None, ["objective.dissl.n_classes=10", "objective.dissl.teacher_hidden=8"])
    encoder = ResNetTrunk("resnet18", width=4, small_image_stem=True)
    objective = build_objective(cfg.objective, ObjectiveContext(encoder.out_dim, 2, 10.0, 100, encoder))
    seen = {}

    def recorder(name):
        def hook(module, inputs, output):  # returns None, so the output is left alone
            seen[name] = inputs[0].shape[0]
        return hook

    objective.teacher_head.register_forward_hook(recorder("teacher"))
    objective.student_head.register_forward_hook(recorder("student"))
    crops = [torch.randn(3, 3, 16, 16)] * 2 + [torch.randn(3, 3, 8, 8)] * 4
    objective(encode_crops(encoder, crops), step=0, crops=crops)
    assert seen == {"teacher": 2 * 3, "student": 6 * 3}


# ---------------------------------------------------------------- CISSL / SimCLR

def test_cissl_loss_matches_the_method_formula():
    torch.manual_seed(0)
    B, D, tau = 3, 4, 0.1
    student = [torch.randn(B, D) for _ in range(2)]
    teacher = [torch.randn(B, D) for _ in range(2)]
    u = F.normalize(torch.cat(student), dim=1)
    w = F.normalize(torch.cat(teacher), dim=1)
    log_q = F.log_softmax(u @ w.T / tau, dim=1)  # diagonal not masked
    expected = 0.0
    for i in range(2 * B):
        other = (i + B) % (2 * B)
        expected += -(log_q[i, i] + log_q[i, other]) / 2
    loss, _ = cissl_loss(student, teacher, tau=tau)
    assert loss.item() == pytest.approx(expected.item() / (2 * B), rel=1e-5)


def test_simclr_loss_matches_nt_xent():
    torch.manual_seed(1)
    B, tau = 4, 0.5
    views = [torch.randn(B, 6) for _ in range(2)]
    z = F.normalize(torch.cat(views), dim=1)
    expected = 0.0
    for i in range(2 * B):
        positive = (i + B) % (2 * B)
        denominator = sum(math.exp(z[i] @ z[j] / tau) for j in range(2 * B) if j != i)
        expected += -math.log(math.exp(z[i] @ z[positive] / tau) / denominator)
    loss, _ = simclr_loss(views, tau=tau)
    assert loss.item() == pytest.approx(expected / (2 * B), rel=1e-5)


class SimulatedGather:
    """Rank `rank` of a world whose per-rank rows are known: returns all ranks' rows."""

    def __init__(self, rank, all_rows):
        self.rank, self.all_rows = rank, all_rows

    def __call__(self, x):
        rows = list(self.all_rows)
        rows[self.rank] = x
        return torch.cat(rows)


@pytest.mark.parametrize("which", ["cissl", "simclr"])
def test_two_rank_losses_average_to_the_one_rank_loss(which):
    """Gathered columns are laid out rank by rank; each rank must find its own positives among them."""
    torch.manual_seed(2)
    B = 4
    student = [torch.randn(2 * B, 5) for _ in range(2)]
    teacher = [torch.randn(2 * B, 5) for _ in range(2)]
    halves = lambda views, r: [v[r * B:(r + 1) * B] for v in views]  # noqa: E731
    normalize_cat = lambda views: F.normalize(torch.cat(views).float(), dim=-1)  # noqa: E731
    if which == "cissl":
        full, _ = cissl_loss(student, teacher, tau=0.2)
        keys = [normalize_cat(halves(teacher, r)) for r in range(2)]
        per_rank = [cissl_loss(halves(student, r), halves(teacher, r), tau=0.2, gather=SimulatedGather(r, keys))[0]
                    for r in range(2)]
    else:
        full, _ = simclr_loss(student, tau=0.2)
        rows = [normalize_cat(halves(student, r)) for r in range(2)]
        per_rank = [simclr_loss(halves(student, r), tau=0.2, gather=SimulatedGather(r, rows))[0] for r in range(2)]
    assert ((per_rank[0] + per_rank[1]) / 2).item() == pytest.approx(full.item(), rel=1e-5)


def test_dissl_marginal_sums_the_local_sums_of_every_rank():
    """Each rank contributes only its [K_t, C] sum of teacher probabilities; the marginal is their sum over
    ranks divided by the global batch, so two half-batch ranks average to the full-batch loss."""
    torch.manual_seed(3)
    teacher = [torch.randn(8, 5) for _ in range(2)]
    student = [t.clone() for t in teacher]
    full, _ = dissl_loss(teacher, student, lam=2.3, beta=0.6, tau_t=0.5, tau_s=1.0)
    local_sums = [torch.stack([F.softmax(t[r * 4:(r + 1) * 4] / 0.5, -1).sum(0) for t in teacher]) for r in range(2)]

    class SimulatedSum:
        world_size = 2

        def __init__(self, rank):
            self.rank, self.shapes = rank, []

        def sum(self, x):
            self.shapes.append(tuple(x.shape))
            parts = list(local_sums)
            parts[self.rank] = x
            return parts[0] + parts[1]

    gathers = [SimulatedSum(r) for r in range(2)]
    halves = [dissl_loss([t[r * 4:(r + 1) * 4] for t in teacher], [s[r * 4:(r + 1) * 4] for s in student],
                         lam=2.3, beta=0.6, tau_t=0.5, tau_s=1.0, gather=gathers[r])[0] for r in range(2)]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), rel=1e-5)
    assert gathers[0].shapes == [(2, 5)]  # one collective of K_t x C numbers, not of B x C per crop


# ---------------------------------------------------------------- DINO

def test_dino_loss_skips_same_view_pairs_and_centres_the_teacher():
    torch.manual_seed(4)
    teacher = [torch.randn(3, 6) for _ in range(2)]
    student = [torch.randn(3, 6) for _ in range(3)]
    center = torch.randn(6)
    loss, _ = dino_loss(teacher, student, center=center, tau_t=0.04, tau_s=0.1)
    p = [F.softmax((t - center) / 0.04, -1) for t in teacher]
    log_q = [F.log_softmax(s / 0.1, -1) for s in student]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(-(p[k] * log_q[j]).sum(-1).mean() for k, j in pairs) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def make_dino(steps_per_epoch=10.0, total_steps=100):
    cfg = load_config(None, ["objective.name=dino", "objective.dino.n_prototypes=12", "objective.dino.hidden=8",
                             "objective.dino.bottleneck=4"])
    encoder = ResNetTrunk("resnet18", width=4, small_image_stem=True)
    return build_objective(cfg.objective, ObjectiveContext(encoder.out_dim, 2, steps_per_epoch, total_steps,
                                                           encoder)), encoder


def test_dino_teacher_is_an_ema_of_the_student_and_centre_moves():
    objective, encoder = make_dino()
    crops = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    loss, logs = objective(encode_crops(encoder, crops), 0, crops)
    assert objective.center.abs().sum() > 0  # centre moved towards the batch mean
    teacher_before = [p.clone() for p in objective.teacher_encoder.parameters()]
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    objective.after_optimizer_step(0, encoder, skip=torch.ones(()))  # a skipped step: the teacher holds still
    assert all(torch.equal(b, a) for b, a in zip(teacher_before, objective.teacher_encoder.parameters()))
    objective.after_optimizer_step(0, encoder, skip=torch.zeros(()))
    m = cosine_momentum(0.996, 0, 100)
    assert m == pytest.approx(0.996)
    for before, after, student in zip(teacher_before, objective.teacher_encoder.parameters(), encoder.parameters()):
        assert torch.allclose(after, m * before + (1 - m) * student)
    assert all(not p.requires_grad for p in objective.teacher_encoder.parameters())
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)


def test_dino_last_layer_is_frozen_in_the_first_epoch_and_teacher_temperature_warms_up():
    objective, encoder = make_dino(steps_per_epoch=10.0)
    crops = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    loss, _ = objective(encode_crops(encoder, crops), 0, crops)
    loss.backward()
    objective.after_backward(step=5)
    assert objective.student_head.last_layer.weight.grad is None
    loss, _ = objective(encode_crops(encoder, crops), 0, crops)
    loss.backward()
    objective.after_backward(step=10)
    assert objective.student_head.last_layer.weight.grad is not None
    assert objective.teacher_temperature(0) == pytest.approx(0.04)
    assert objective.teacher_temperature(250) == pytest.approx(0.055)
    assert objective.teacher_temperature(10_000) == pytest.approx(0.07)


def test_registry_builds_every_objective():
    assert set(REGISTRY) == {"dissl", "cissl", "simclr", "dino"}
