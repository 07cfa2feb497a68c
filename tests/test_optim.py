import math

import pytest
import torch

from sslscale.config import load_config
from sslscale.optim import LARS, WarmupCosine, build_optimizer, parameter_groups, peak_lr


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    p = torch.nn.Parameter(w0.clone())
    g = torch.randn(5, 3)
    p.grad = g.clone()
    opt = LARS([p], lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001)
    opt.step()
    ratio = 0.001 * w0.norm() / (g.norm() + 0.01 * w0.norm() + 1e-8)
    first = (g + 0.01 * w0) * ratio
    assert torch.allclose(p, w0 - 0.5 * first, atol=1e-7)
    # second step: momentum accumulates the scaled update
    w1 = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    ratio = 0.001 * w1.norm() / (g.norm() + 0.01 * w1.norm() + 1e-8)
    assert torch.allclose(p, w1 - 0.5 * (0.9 * first + (g + 0.01 * w1) * ratio), atol=1e-7)


def test_lars_excluded_groups_take_plain_sgd_steps():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    LARS([{"params": [p], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1, weight_decay=0.5).step()
    assert torch.allclose(p, torch.full((4,), 1 - 0.1 * 2.0))


def test_bias_and_norm_exclusion_builds_two_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    groups = parameter_groups(model, 1e-6, exclude_bias_and_norm=True)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]
    assert len(parameter_groups(model, 1e-6, exclude_bias_and_norm=False)) == 1


def test_peak_lr_scales_with_global_batch():
    cfg = load_config(None, ["optim.base_lr=0.3"])
    assert peak_lr(cfg.optim, 2560) == pytest.approx(3.0)


@pytest.mark.parametrize("name, cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_every_optimizer_builds(name, cls):
    cfg = load_config(None, [f"optim.name={name}"])
    assert isinstance(build_optimizer(torch.nn.Linear(2, 2), cfg.optim, 256), cls)


def test_warmup_then_cosine_in_samples():
    schedule = WarmupCosine(peak=2.0, warmup_samples=1000, total_samples=11000, start_factor=0.001)
    assert schedule(0) == pytest.approx(0.002)
    assert schedule(500) == pytest.approx(0.002 + (2.0 - 0.002) * 0.5)
    assert schedule(1000) == pytest.approx(2.0)
    assert schedule(6000) == pytest.approx(1.0)
    assert schedule(11000) == pytest.approx(0.0, abs=1e-12)
    assert schedule(20000) == pytest.approx(0.0, abs=1e-12)
    # same samples, same lr: independent of how the global batch is split into steps
    assert schedule(3 * 512) == schedule(6 * 256)
    assert schedule(3500) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.25)))
