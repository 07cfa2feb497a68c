"""The points where the paper's recipes follow the authors' code exactly, each against a number computed by
hand or by the authors' own formula (docs/method.md says which recipe sets which option)."""
import glob
import hashlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.augment import AugmentSpec, blur_taps
from data_pipelines.sources import ArraySource
from sslscale.config import ConfigError, load_config
from sslscale.models import ResNetTrunk, encode_crops
from sslscale.models.heads import build_head
from sslscale.objectives import ObjectiveContext, build_objective
from sslscale.objectives.dino import epoch_of, per_view_centers
from sslscale.objectives.dissl import warmed_up_beta
from sslscale.objectives.ssl_model import build_model
from sslscale.optim.schedule import WarmupCosine, build_schedule
from tests.conftest import REPO

C = 16384
CONFIGS = os.path.join(REPO, "configs")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# 1. The d8192 DISSL teacher head: no bias in its residual block (the authors' use_bias: False)


def test_the_d8192_teacher_head_has_the_authors_parameter_count():
    head = build_head("dissl_teacher", "imagenet_d8192", 8192, C)
    # Lin(8192,512,nb)+BN, [Lin(512,2048,nb)+BN, Lin(2048,2048,nb)+BN, Lin(2048,512,nb)+BN], Lin(512,C)+bias
    by_hand = (8192 * 512 + 2 * 512) + (512 * 2048 + 2 * 2048) + (2048 * 2048 + 2 * 2048) \
        + (2048 * 512 + 2 * 512) + (512 * C + C)
    assert by_hand == 18_900_992
    assert n_params(head) == by_hand
    residual = head[3]
    assert [m.bias for m in residual if hasattr(m, "in_features")] == [None, None, None]


# ---------------------------------------------------------------------------------------------
# 6. beta warm-up: the authors' counter is incremented before use, beta_t = lam + (beta - lam) (t + 2) / T_w


def authors_beta(beta: float, lam: float, t: int, warmup: int) -> float:
    """The authors' DstlISSLCriterion: num_iteration += 1, then the factor (1 + num_iteration) / warmup
    while num_iteration < warmup."""
    num_iteration = t + 1
    if num_iteration < warmup:
        return lam + (beta - lam) * (1 + num_iteration) / warmup
    return beta


@pytest.mark.parametrize("t", [0, 1, 500, 997, 998, 999, 1000, 5000])
def test_beta_warmup_follows_the_authors_counter(t):
    assert warmed_up_beta(0.6, 2.3, t, 1000) == pytest.approx(authors_beta(0.6, 2.3, t, 1000), abs=1e-12)


def test_beta_warmup_values_at_the_ends():
    assert warmed_up_beta(0.6, 2.3, 0, 1000) == pytest.approx(2.3 - 1.7 * 2 / 1000)  # 2.2966
    assert warmed_up_beta(0.6, 2.3, 997, 1000) == pytest.approx(2.3 - 1.7 * 999 / 1000)  # 0.6017
    assert warmed_up_beta(0.6, 2.3, 998, 1000) == 0.6  # reached exactly, one step before T_w - 1
    assert warmed_up_beta(0.6, 2.3, 3, 0) == 0.6  # no warm-up


# ---------------------------------------------------------------------------------------------
# 4. The small-data schedule: pl_bolts' LinearWarmupCosineAnnealingLR, stepped once per epoch from lr 0


def pl_bolts_lr(epoch: int, base_lr: float, warmup_epochs: int, max_epochs: int, warmup_start_lr: float = 0.0,
                eta_min: float = 0.0) -> float:
    """pl_bolts' LinearWarmupCosineAnnealingLR._get_closed_form_lr, as the authors' scheduler runs it."""
    if epoch < warmup_epochs:
        return warmup_start_lr + epoch * (base_lr - warmup_start_lr) / max(1, warmup_epochs - 1)
    return eta_min + 0.5 * (base_lr - eta_min) * (
        1 + math.cos(math.pi * (epoch - warmup_epochs) / (max_epochs - warmup_epochs)))


TINYIMAGENET = 100_000


def small_data_schedule(name="dissl_resnet18_tinyimagenet_baseline", *overrides):
    cfg = load_config(os.path.join(CONFIGS, f"{name}.yaml"), list(overrides))
    return cfg, build_schedule(cfg, TINYIMAGENET, cfg.data.batch_size)


def test_the_small_data_lr_at_epochs_0_1_9_10():
    cfg, schedule = small_data_schedule()
    peak = 2e-3  # 2e-3 x 256 / 256
    assert schedule(0) == 0.0  # epoch 0 trains at lr 0
    assert schedule(1 * TINYIMAGENET) == pytest.approx(peak / 9)
    assert schedule(9 * TINYIMAGENET) == pytest.approx(peak)  # the peak comes at epoch 9 ...
    assert schedule(10 * TINYIMAGENET) == pytest.approx(peak)  # ... and the cosine starts from it at epoch 10
    assert schedule(155 * TINYIMAGENET) == pytest.approx(peak / 2)  # half-way through the 290 cosine epochs
    # held through each epoch: the last step of epoch 1 still has epoch 1's lr
    last_step_of_epoch_1 = (2 * TINYIMAGENET - 1) // 256 * 256
    assert schedule(last_step_of_epoch_1) == schedule(TINYIMAGENET)


@pytest.mark.parametrize("name", ["dissl_resnet18_tinyimagenet_baseline", "cissl_resnet18_tinyimagenet_d2048_e1000",
                                  "dino_resnet18_tinyimagenet_d2048_e1000_aug", "simclr_resnet18_tinyimagenet_d2048"])
def test_every_small_data_recipe_steps_the_lr_as_pl_bolts(name):
    cfg, schedule = small_data_schedule(name)
    epochs = int(cfg.train.epochs)
    peak = cfg.optim.base_lr * cfg.data.batch_size / 256
    for epoch in [*range(0, 12), epochs // 2, epochs - 1]:
        assert schedule(epoch * TINYIMAGENET) == pytest.approx(pl_bolts_lr(epoch, peak, 10, epochs), abs=1e-15)


def test_the_per_step_schedule_is_unchanged():
    """The default (the ImageNet recipes, the quickstart): every step, from 0.001 of the peak, peak at epoch 10."""
    schedule = WarmupCosine(3.0, 10 * 1000, 100 * 1000, 0.001, "start")
    assert schedule(0) == pytest.approx(0.003)
    assert schedule(5000) == pytest.approx(3.0 * (0.001 + 0.999 * 0.5))
    assert schedule(10_000) == pytest.approx(3.0 * (1 + math.cos(math.pi * 0.1)) / 2)


def test_lr_interval_is_validated():
    with pytest.raises(ConfigError, match=r"optim.lr_interval: 'epochs' is not valid; choose one of step, epoch"):
        load_config(None, ["optim.lr_interval=epochs"])
    with pytest.raises(ConfigError, match=r"optim.warmup_epochs: 0.5; optim.lr_interval: epoch .* whole epochs"):
        load_config(None, ["optim.lr_interval=epoch", "optim.warmup_epochs=0.5"])
    with pytest.raises(ConfigError, match=r"train.epochs: 1.5; optim.lr_interval: epoch"):
        load_config(None, ["optim.lr_interval=epoch", "train.epochs=1.5", "optim.warmup_epochs=1"])
    with pytest.raises(ConfigError, match=r"optim.warmup_start_factor: -0.1; valid range is \[0, 1\]"):
        load_config(None, ["optim.warmup_start_factor=-0.1"])
    assert load_config(None, ["optim.warmup_start_factor=0"]).optim.warmup_start_factor == 0.0
    with pytest.raises(ValueError, match="interval: 'hour'"):
        WarmupCosine(1.0, 10, 100, 0.0, interval="hour")


def test_the_plan_says_the_lr_changes_once_per_epoch(capsys):
    from sslscale.cli import main
    path = os.path.join(CONFIGS, "dissl_resnet18_tinyimagenet_baseline.yaml")
    assert main(["plan", path, "--dataset-size", str(TINYIMAGENET), "--no-flops"]) == 0
    assert "restarted at the end of the warm-up; the lr changes once per epoch" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 5. The small-data "+ aug." blur: int(0.1 x 64) made odd = 7 taps (the authors' code), in both backends


def effective_blur(taps: int, sigma: float) -> float:
    """The standard deviation of a sampled Gaussian cut to `taps` taps and renormalised."""
    x = torch.arange(taps, dtype=torch.float64) - taps // 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    w = w / w.sum()
    return float((w * x ** 2).sum().sqrt())


def test_blur_windows_by_rule():
    spec = AugmentSpec(blur_kernel="crop_tenth")
    assert [blur_taps(spec, size) for size in (64, 96, 160, 224, 28)] == [7, 9, 17, 23, 3]
    assert blur_taps(AugmentSpec(), 64) == 13  # the default: +-3 sigma_max at sigma_max 2, whatever the size
    assert effective_blur(7, 2.0) == pytest.approx(1.64, abs=0.005)
    assert effective_blur(13, 2.0) == pytest.approx(1.99, abs=0.005)


@pytest.mark.parametrize("objective", ["dissl", "cissl", "dino", "simclr"])
def test_the_aug_recipes_blur_with_7_taps_and_the_other_rows_not_at_all(objective):
    aug = load_config(os.path.join(CONFIGS, f"{objective}_resnet18_tinyimagenet_d2048_e1000_aug.yaml")).data
    assert aug.augment.blur_p == 0.5 and blur_taps(aug.augment, aug.crops[0].size) == 7
    assert load_config(os.path.join(CONFIGS, f"{objective}_resnet18_tinyimagenet_d2048_e1000.yaml")
                       ).data.augment.blur_p == 0


def test_blur_kernel_is_validated():
    with pytest.raises(ConfigError, match=r"data.augment.blur_kernel: 'tenth'; valid: three_sigma, crop_tenth"):
        load_config(None, ["data.augment.blur_kernel=tenth"])


BLUR_64 = ["data.source=digits", "data.num_workers=0", "data.batch_size=4",
           "data.crops=[{size: 64, count: 2, scale: [0.5, 1.0], interpolation: bicubic}]",
           "data.augment.jitter.p=0", "data.augment.grayscale_p=0", "data.augment.flip_p=0",
           "data.augment.blur_p=1", "data.augment.blur_sigma=[1.9, 2.0]", "data.augment.blur_kernel=crop_tenth"]


def photo_source(n: int = 4):
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    images = np.stack([photos[i % 2][40 * i:40 * i + 96, 50 * i:50 * i + 96] for i in range(n)])
    return ArraySource(images, np.zeros(n, np.int64), ["only"])


def test_the_torchvision_backend_blurs_64_px_crops_with_7_taps(monkeypatch):
    from data_pipelines import torchvision as backend
    windows = []
    blur = backend.F.gaussian_blur

    def spy(image, kernel_size, sigma):
        windows.append(tuple(kernel_size))
        return blur(image, kernel_size, sigma)
    monkeypatch.setattr(backend.F, "gaussian_blur", spy)
    data_cfg = load_config(None, BLUR_64).data
    batches = list(backend.multicrop_loader(photo_source(), data_cfg, seed=0, rank=0, world_size=1, start_step=0,
                                            num_steps=1))
    assert len(batches) == 1 and windows == [(7, 7)] * 8  # 4 images x 2 crops, each blurred with 7 x 7 taps


def test_the_dali_backend_blurs_with_the_same_7_taps_as_torchvision(monkeypatch):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from nvidia.dali import fn

    from data_pipelines.dali import MultiCropPipeline
    from data_pipelines.torchvision import multicrop_loader
    windows = []
    blur = fn.gaussian_blur

    def spy(*args, **kwargs):
        windows.append(kwargs["window_size"])
        return blur(*args, **kwargs)
    monkeypatch.setattr(fn, "gaussian_blur", spy)
    kwargs = dict(seed=0, rank=0, world_size=1, start_step=0, num_steps=1)

    def crops(backend, *extra):
        data_cfg = load_config(None, [*BLUR_64, *extra]).data
        return torch.cat(next(iter(backend(photo_source(), data_cfg, **kwargs))).crops) * 0.226 * 255  # grey levels
    dali = crops(MultiCropPipeline)
    assert windows == [7, 7]  # one blur op in the graph per 64-px crop slot, 7 taps each
    same = (dali - crops(multicrop_loader)).abs().mean()
    other = (dali - crops(multicrop_loader, "data.augment.blur_kernel=three_sigma")).abs().mean()
    # The same kernel: decoder-free uint8 crops agree to a fraction of a grey level; 13 taps is visibly wider.
    assert same < 0.25 and other > 0.5, (float(same), float(other))


# ---------------------------------------------------------------------------------------------
# 2 and 3. DINO as the authors ran it: the centre updated once per teacher view inside each loss term, a
# teacher head with its own random init, the teacher temperature a per-epoch linspace


def make_dino(*overrides, steps_per_epoch=10.0, total_steps=100):
    cfg = load_config(None, ["objective.name=dino", "objective.dino.n_prototypes=12", "objective.dino.hidden=8",
                             "objective.dino.bottleneck=4", *overrides])
    encoder = ResNetTrunk("resnet18", width=4, small_image_stem=True)
    ctx = ObjectiveContext(encoder.out_dim, 2, steps_per_epoch, total_steps, encoder)
    return build_objective(cfg.objective, ctx), encoder


def authors_dino_loss(student: list, teacher: list, center: torch.Tensor, *, tau_s: float, tau_t: float,
                      momentum: float):
    """The authors' DINO.loss: (asymmetric(student 0, teacher 1) + asymmetric(student 1, teacher 0)) / 2, each
    asymmetric term centring with the current centre and then updating it with its teacher view's mean."""
    def asymmetric(m_student, m_teacher, center):
        p = F.softmax((m_teacher - center) / tau_t, dim=-1)
        loss = -(p * F.log_softmax(m_student / tau_s, dim=-1)).sum(-1).mean()
        return loss, center * momentum + m_teacher.mean(0) * (1 - momentum)
    loss1, center = asymmetric(student[0], teacher[1], center)
    loss2, center = asymmetric(student[1], teacher[0], center)
    return (loss1 + loss2) / 2, center


def dino_outputs(objective, encoder, crops):
    """The teacher's and the student's head outputs for two crops, as the objective computes them."""
    with torch.no_grad():
        teacher = objective.teacher_head(torch.cat(encode_crops(objective.teacher_encoder, crops))).chunk(2)
        student = objective.student_head(torch.cat(encode_crops(encoder, crops))).chunk(2)
    return [t.float() for t in teacher], [s.float() for s in student]


def test_per_view_centring_matches_the_authors_two_updates():
    torch.manual_seed(0)
    objective, encoder = make_dino("objective.dino.center_update=per_view")
    start = 0.2 * torch.randn(12)  # the scale of the teacher's outputs (cosines): no one-hot softmax
    objective.center.copy_(start)
    crops = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    teacher, student = dino_outputs(objective, encoder, crops)
    tau_t = objective.teacher_temperature(3)
    expected, expected_center = authors_dino_loss(student, teacher, start, tau_s=0.1, tau_t=tau_t, momentum=0.9)
    loss, _ = objective(encode_crops(encoder, crops), 3, crops)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(objective.center, expected_center, atol=1e-6)
    # two EMA updates, by hand: c2 = m^2 c0 + m (1 - m) mean(t1) + (1 - m) mean(t0)
    by_hand = 0.81 * start + 0.09 * teacher[1].mean(0) + 0.1 * teacher[0].mean(0)
    assert torch.allclose(objective.center, by_hand, atol=1e-6)


def test_per_step_centring_is_still_the_default_and_differs():
    torch.manual_seed(0)
    objective, encoder = make_dino()
    assert objective.cfg.center_update == "per_step"
    start = 0.2 * torch.randn(12)  # the scale of the teacher's outputs (cosines): no one-hot softmax
    objective.center.copy_(start)
    crops = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    teacher, student = dino_outputs(objective, encoder, crops)
    tau_t = objective.teacher_temperature(3)
    loss, _ = objective(encode_crops(encoder, crops), 3, crops)
    p = [F.softmax((t - start) / tau_t, -1) for t in teacher]
    q = [F.log_softmax(s / 0.1, -1) for s in student]
    once = (-(p[0] * q[1]).sum(-1).mean() - (p[1] * q[0]).sum(-1).mean()) / 2
    assert loss.item() == pytest.approx(once.item(), rel=1e-5)
    assert torch.allclose(objective.center, 0.9 * start + 0.1 * torch.cat(teacher).mean(0), atol=1e-6)
    authors, _ = authors_dino_loss(student, teacher, start, tau_s=0.1, tau_t=tau_t, momentum=0.9)
    assert abs(authors.item() - loss.item()) > 1e-4  # the second term's centre differs


def test_per_view_centres_by_hand():
    c0, m0, m1 = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([5.0])
    centers, final = per_view_centers(c0, [m0, m1], 0.5)
    # the teacher's view 1 first (with c0), then view 0 (with 0.5 * 1 + 0.5 * 5 = 3); then 0.5 * 3 + 0.5 * 3
    assert [c.item() for c in centers] == [3.0, 1.0] and final.item() == 3.0


def test_the_teacher_head_has_its_own_random_init_and_the_teacher_trunk_is_a_copy():
    torch.manual_seed(0)
    random_head, encoder = make_dino("objective.dino.teacher_head_init=random")
    teacher = dict(random_head.teacher_head.named_parameters())
    student = dict(random_head.student_head.named_parameters())
    assert teacher.keys() == student.keys()
    assert all(not torch.equal(teacher[k], student[k]) for k in teacher if teacher[k].ndim == 2)
    assert all(not p.requires_grad for p in teacher.values())
    for a, b in zip(random_head.teacher_encoder.parameters(), encoder.parameters()):
        assert torch.equal(a, b)
    copied, _ = make_dino()
    assert all(torch.equal(a, b) for a, b in zip(copied.teacher_head.parameters(), copied.student_head.parameters()))


def test_the_teacher_temperature_is_a_per_epoch_linspace_reaching_0_07_at_epoch_49():
    objective, _ = make_dino("objective.dino.tau_t_interval=epoch", steps_per_epoch=10.0)
    linspace = np.linspace(0.04, 0.07, 50)  # the authors' teacher_temp_schedule
    for epoch in (0, 1, 25, 48, 49):
        for step in (10 * epoch, 10 * epoch + 9):  # held through the epoch
            assert objective.teacher_temperature(step) == pytest.approx(linspace[epoch], abs=1e-12)
    assert objective.teacher_temperature(500) == 0.07 and objective.teacher_temperature(10_000) == 0.07
    per_step, _ = make_dino(steps_per_epoch=10.0)
    assert per_step.teacher_temperature(490) < 0.07 and per_step.teacher_temperature(500) == 0.07  # epoch 50


def test_an_epoch_starts_at_its_first_step_despite_rounding():
    assert 1005 / (1005 / 7) < 7  # the division alone would put step 1005 of 143.57 steps per epoch in epoch 6
    assert epoch_of(1005, 1005 / 7) == 7 and epoch_of(1004, 1005 / 7) == 6


def test_the_dino_small_data_recipe_sets_the_authors_options_and_fashion_mnist_keeps_the_defaults():
    recipe = load_config(os.path.join(CONFIGS, "dino_resnet18_tinyimagenet_d2048_e1000_aug.yaml")).objective.dino
    assert (recipe.center_update, recipe.teacher_head_init, recipe.tau_t_interval) == ("per_view", "random", "epoch")
    fashion = load_config(os.path.join(CONFIGS, "fashion_mnist_dino.yaml")).objective.dino
    assert (fashion.center_update, fashion.teacher_head_init, fashion.tau_t_interval) == ("per_step", "copy", "step")


def test_dino_options_are_validated():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["objective.name=dino", "objective.dino.center_update=twice",
                           "objective.dino.teacher_head_init=copied", "objective.dino.tau_t_interval=epochs"])
    assert error.value.problems == [
        "objective.dino.tau_t_interval: 'epochs' is not valid; choose one of step, epoch",
        "objective.dino.center_update: 'twice' is not valid; choose one of per_step, per_view",
        "objective.dino.teacher_head_init: 'copied' is not valid; choose one of copy, random"]
    with pytest.raises(ConfigError, match=r"tau_t_warmup_epochs: 0.167; .*needs whole epochs"):
        load_config(os.path.join(CONFIGS, "fashion_mnist_dino.yaml"), ["objective.dino.tau_t_interval=epoch"])




class TwoRanks:
    """A stand-in for the all-gather of two ranks whose other rank's rows are this rank's plus 1."""
    rank, world_size = 0, 2

    def __call__(self, x):
        return torch.cat([x, x + 1])

    def sum(self, x):
        return 2 * x + 1


def test_per_view_centring_takes_each_views_mean_over_every_rank():
    torch.manual_seed(0)
    cfg = load_config(None, ["objective.name=dino", "objective.dino.n_prototypes=12", "objective.dino.hidden=8",
                             "objective.dino.bottleneck=4", "objective.dino.center_update=per_view"])
    encoder = ResNetTrunk("resnet18", width=4, small_image_stem=True)
    objective = build_objective(cfg.objective, ObjectiveContext(encoder.out_dim, 2, 10.0, 100, encoder,
                                                                gather=TwoRanks()))
    crops = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    teacher, _ = dino_outputs(objective, encoder, crops)
    objective(encode_crops(encoder, crops), 3, crops)
    # the global mean of a view is the local mean + 0.5 here
    expected = 0.09 * (teacher[1].mean(0) + 0.5) + 0.1 * (teacher[0].mean(0) + 0.5)
    assert torch.allclose(objective.center, expected, atol=1e-6)

# ---------------------------------------------------------------------------------------------
# 7. Initialisation: model.init: authors_imagenet / authors_small_data (the recipes), torchvision (default)


def std(t: torch.Tensor) -> float:
    return t.double().std().item()


def fan_in(weight: torch.Tensor) -> int:
    return weight[0].numel()


def fan_out(weight: torch.Tensor) -> int:
    return weight.shape[0] * weight[0, 0].numel()


def test_authors_small_data_init_of_the_trunk_and_its_dimension_block():
    torch.manual_seed(0)
    trunk = ResNetTrunk("resnet18", dim=2048, small_image_stem=True, init="authors_small_data")
    # the small-image stem, variance-scaled: trunc_normal(std sqrt(1 / 27) / 0.8796), bounds +-2 cut nothing
    assert std(trunk.conv1.weight) == pytest.approx(math.sqrt(1 / 27) / 0.87962566103423978, rel=0.05)
    # every other trunk conv: torchvision's kaiming_normal(fan_out)
    w = trunk.layer3[0].conv2.weight
    assert std(w) == pytest.approx(math.sqrt(2 / fan_out(w)), rel=0.02)
    # the dimension block: conv1 N(0, 1/512) (Johnson-Lindenstrauss), conv2 and conv3 variance-scaled
    block = trunk.resizer
    assert std(block.conv1.weight) == pytest.approx(1 / math.sqrt(512), rel=0.02)
    assert block.conv1.weight.mean().item() == pytest.approx(0, abs=1e-3)
    for conv in (block.conv2, block.conv3):
        assert std(conv.weight) == pytest.approx(math.sqrt(1 / fan_in(conv.weight)) / 0.87962566103423978, rel=0.02)
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()
               for bn in (block.bn1, block.bn2, block.bn3))


def test_authors_imagenet_init_keeps_torchs_default_for_the_trunk_convs():
    torch.manual_seed(0)
    trunk = ResNetTrunk("resnet50", dim=8192, init="authors_imagenet")
    for w in (trunk.conv1.weight, trunk.layer2[0].conv2.weight, trunk.layer4[2].conv3.weight,
              trunk.layer3[0].downsample[0].weight):
        bound = 1 / math.sqrt(fan_in(w))  # kaiming_uniform(a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert w.abs().max().item() <= bound
        assert std(w) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert std(trunk.resizer.conv1.weight) == pytest.approx(1 / math.sqrt(512), rel=0.02)
    w = trunk.resizer.conv3.weight  # [8192, 512, 1, 1]
    assert std(w) == pytest.approx(math.sqrt(1 / 512) / 0.87962566103423978, rel=0.02)


def test_the_default_init_is_torchvisions_everywhere():
    torch.manual_seed(0)
    trunk = ResNetTrunk("resnet18", dim=2048, small_image_stem=True)
    for w in (trunk.conv1.weight, trunk.layer3[0].conv2.weight, trunk.resizer.conv1.weight, trunk.resizer.conv3.weight):
        assert std(w) == pytest.approx(math.sqrt(2 / fan_out(w)), rel=0.05)
    head = build_head("dissl_teacher", "small_data", 512, C)
    assert head[0].weight.abs().max().item() <= 1 / math.sqrt(512)  # torch's default Linear init


@pytest.mark.parametrize("role, name, out_dim, widths", [
    ("dissl_teacher", "small_data", C, {}), ("dissl_student", "low_rank_linear", C, {}),
    ("cissl_teacher", "small_data", 128, {}), ("cissl_student", "small_data", 128, {}),
    ("simclr", "small_data", 128, {}), ("dino", "issl_baseline", 1000, {}),
])
def test_authors_small_data_heads_are_trunc_normal_002_with_zero_bias(role, name, out_dim, widths):
    torch.manual_seed(0)
    head = build_head(role, name, 512, out_dim, init="authors_small_data", **widths)
    weights = [m for m in head.modules() if hasattr(m, "weight") and m.weight.ndim == 2]
    assert weights
    for m in weights:
        assert std(m.weight) == pytest.approx(0.02, rel=0.05)
        assert m.weight.mean().item() == pytest.approx(0, abs=2e-3)
        if getattr(m, "bias", None) is not None:
            assert not m.bias.any()


def test_authors_imagenet_cissl_heads_project_into_128_dims_with_n_0_1_over_128():
    torch.manual_seed(0)
    teacher = build_head("cissl_teacher", "imagenet", 2048, 128, init="authors_imagenet")
    student = build_head("cissl_student", "imagenet", 2048, 128, init="authors_imagenet")
    for linear in (teacher[6], student[0]):
        assert (linear.in_features, linear.out_features) == (2048, 128)
        assert std(linear.weight) == pytest.approx(1 / math.sqrt(128), rel=0.02)
    for linear in (teacher[0], teacher[3]):  # the hidden Linears keep torch's default
        assert linear.weight.abs().max().item() <= 1 / math.sqrt(2048)
    dissl = build_head("dissl_teacher", "imagenet_d8192", 8192, C, init="authors_imagenet")
    assert dissl[0].weight.abs().max().item() <= 1 / math.sqrt(8192)  # the DISSL heads: torch's defaults


def test_the_recipes_set_the_authors_init_and_the_model_applies_it():
    for path in glob.glob(os.path.join(CONFIGS, "*.yaml")):
        name, init = os.path.basename(path), load_config(path).model.init
        expected = ("authors_imagenet" if "resnet50" in name else "authors_small_data" if "tinyimagenet" in name
                    else "torchvision")
        assert init == expected, name
    torch.manual_seed(0)
    cfg = load_config(os.path.join(CONFIGS, "dissl_resnet18_tinyimagenet_d2048.yaml"),
                      ["objective.dissl.n_classes=64"])
    model = build_model(cfg, steps_per_epoch=390.625, total_steps=100)
    assert std(model.encoder.resizer.conv1.weight) == pytest.approx(1 / math.sqrt(512), rel=0.02)
    assert std(model.objective.teacher_head[0].weight) == pytest.approx(0.02, rel=0.02)


def test_model_init_is_validated():
    with pytest.raises(ConfigError, match=r"model.init: 'authors' is not valid; choose one of torchvision, "
                                          r"authors_imagenet, authors_small_data"):
        load_config(None, ["model.init=authors"])

# ---------------------------------------------------------------------------------------------
# None of this changes the quickstart and the Fashion-MNIST runs (their figures are in README)

# Recorded before the options above existed: sha256 of the initial state dict (torch.manual_seed(run.seed),
# then build_model) and the loss of one training forward on two seeded random 28-px crops of 8 images at step 5
# (and the DINO centre after it, summed).
BEFORE = {
    "quickstart": ("f5c9eea1c04cbe8a0c8d0402b746a58eb6561c9b03a3b9e36655e44ccb720292", "-0x1.60370c0000000p+1", None),
    "fashion_mnist_dino": ("0ec371420d5bd29efa68842e82cd15383b3e61a52ec4dc47a13ea67f814f4824",
                           "0x1.ba75f40000000p+2", "0x1.651d1e0000000p-6"),
    "fashion_mnist_cissl": ("5d1f1f261e8f7edaae875e28657ec616f5022ef3ad4693a326058d7aa66ddd83",
                            "0x1.d4edec0000000p+1", None),
    "fashion_mnist_simclr": ("bd9a28429fc2caad2f85e4e5623c47c355b7c666e538188235e0568f859e216e",
                             "0x1.1aacba0000000p+2", None),
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_the_fashion_mnist_runs_start_and_step_as_before(name):
    weights_sha256, loss_hex, center_hex = BEFORE[name]
    cfg = load_config(os.path.join(CONFIGS, f"{name}.yaml"))
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, steps_per_epoch=60000 / cfg.data.batch_size, total_steps=118)
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.contiguous().numpy().tobytes())
    assert digest.hexdigest() == weights_sha256  # the same initial weights, bit for bit
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randn(8, 3, 28, 28, generator=generator) for _ in range(2)]
    model.train()
    loss, _ = model(crops, 5)
    # The same loss; bitwise on the machine that recorded it (x86_64, AVX2), within float rounding on others.
    assert loss.item() == pytest.approx(float.fromhex(loss_hex), rel=1e-6, abs=0)
    if center_hex is not None:
        assert model.objective.center.sum().item() == pytest.approx(float.fromhex(center_hex), rel=1e-5)
