import math
import os

import pytest
import torch

from sslscale.config import load_config
from sslscale.optim import optimizers as optim
from sslscale.optim.optimizers import LARS, MomentumSGD, build_optimizer, parameter_groups
from sslscale.optim.schedule import WarmupCosine, peak_lr
from tests.conftest import REPO


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


def reference_lars_step(params, grads, buffers, lr, momentum, weight_decay, trust):
    """The per-parameter loop the foreach LARS replaced."""
    for p, g in zip(params, grads):
        update = g + weight_decay * p
        w, gn = p.norm(), g.norm()
        ratio = trust * w / (gn + weight_decay * w + 1e-8) if w > 0 and gn > 0 else torch.tensor(1.0)
        buffers[id(p)] = update * ratio if id(p) not in buffers else momentum * buffers[id(p)] + update * ratio
        p -= lr * buffers[id(p)]


def test_foreach_lars_matches_the_per_parameter_loop_over_many_tensors():
    torch.manual_seed(5)
    shapes = [(64, 3, 3, 3), (64,), (64,), (128, 64, 1, 1), (10,), (7, 5), (16384, 32)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params[4].data.zero_()  # a zero weight takes the plain step
    reference = [p.detach().clone() for p in params]
    opt = LARS(params, lr=0.7, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001)
    buffers = {}
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        reference_lars_step(reference, grads, buffers, 0.7, 0.9, 1e-6, 0.001)
    for p, r in zip(params, reference):
        assert torch.allclose(p, r, rtol=1e-6, atol=1e-7)


def test_momentum_sgd_matches_pytorch_sgd():
    torch.manual_seed(6)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = MomentumSGD(ours, lr=0.1, momentum=0.9, weight_decay=0.01)
    b = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["lars", "sgd", "adam", "adamw"])
def test_a_step_with_found_inf_changes_nothing_even_with_nan_gradients(name):
    """The skip is decided on the device: found_inf = 1 leaves weights and state untouched."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    cfg = load_config(None, [f"optim.name={name}", "optim.base_lr=0.1"])
    opt = build_optimizer(model, cfg.optim, 256)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.found_inf = torch.zeros(())
    opt.step()  # a real step first, so that there is state to protect
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    after = {k: v for p in model.parameters() for k, v in opt.state[p].items()}
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_the_masked_update_equals_the_fused_kernel(monkeypatch):
    """Devices without PyTorch's fused SGD (the meta device of the device-handling test) take the masked path:
    the same numbers, and the same skip."""
    torch.manual_seed(8)
    results = []
    for fused_devices in (optim.FUSED_DEVICES, ()):
        monkeypatch.setattr(optim, "FUSED_DEVICES", fused_devices)
        torch.manual_seed(8)
        params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
        opt = LARS(params, lr=0.5, weight_decay=1e-4)
        for found_inf in (0.0, 1.0, 0.0):
            for p in params:
                p.grad = torch.randn_like(p) if not found_inf else torch.full_like(p, float("inf"))
            opt.found_inf = torch.tensor(found_inf)
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(*results))


@pytest.mark.parametrize("name", ["lars", "sgd", "adam"])
def test_state_loaded_in_another_memory_layout_updates_the_right_elements(name):
    """A contiguous momentum buffer (saved by an FSDP run) loaded for channels_last weights: fused kernels pair
    elements by memory position, so the state must take its parameter's layout first."""
    torch.manual_seed(9)
    cfg = load_config(None, [f"optim.name={name}", "optim.base_lr=0.1"]).optim
    weight, grads = torch.randn(4, 3, 5, 5), [torch.randn(4, 3, 5, 5) for _ in range(2)]
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        conv = torch.nn.Conv2d(3, 4, 5, bias=False)
        conv.weight.data = weight.clone().contiguous(memory_format=layout)
        opt = build_optimizer(conv, cfg, 256)
        conv.weight.grad = grads[0].clone().contiguous(memory_format=layout)
        opt.step()
        saved = opt.state_dict()
        for value in saved["state"][0].values():
            if isinstance(value, torch.Tensor) and value.ndim:
                assert value.is_contiguous(memory_format=layout)
        contiguous = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in saved["state"][0].items()}
        opt = build_optimizer(conv, cfg, 256)
        opt.load_state_dict({**saved, "state": {0: contiguous}})
        optim.match_state_layout(opt)
        conv.weight.grad = grads[1].clone().contiguous(memory_format=layout)
        opt.step()
        results.append(conv.weight.detach().contiguous())
    assert torch.allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize("name, cls", [("lars", LARS), ("sgd", MomentumSGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_every_optimizer_builds(name, cls):
    cfg = load_config(None, [f"optim.name={name}"])
    assert isinstance(build_optimizer(torch.nn.Linear(2, 2), cfg.optim, 256), cls)


def test_cosine_counted_from_the_start_of_training_is_the_imagenet_recipe():
    """100 epochs, 10 of warm-up, peak 3 (0.3 x 2560 / 256), in epochs of 1000 samples: the lr steps down from
    3 to 2.93 at the end of the warm-up and is exactly peak / 2 at half of training."""
    schedule = WarmupCosine(peak=3.0, warmup_samples=10_000, total_samples=100_000, start_factor=0.001 / 3,
                            cosine_from="start")
    assert schedule(0) == pytest.approx(0.001)
    assert schedule(5_000) == pytest.approx(0.001 + (3.0 - 0.001) * 0.5)
    assert schedule(9_999) == pytest.approx(3.0, rel=1e-3)
    assert schedule(10_000) == pytest.approx(3.0 * (1 + math.cos(math.pi * 0.1)) / 2) == pytest.approx(2.9266, abs=1e-4)
    assert schedule(50_000) == pytest.approx(1.5)
    assert schedule(75_000) == pytest.approx(3.0 * (1 + math.cos(math.pi * 0.75)) / 2)
    assert schedule(100_000) == pytest.approx(0.0, abs=1e-12)
    assert schedule(200_000) == pytest.approx(0.0, abs=1e-12)


def test_cosine_restarted_after_the_warm_up_is_the_small_data_recipe():
    """300 epochs, 10 of warm-up: lr = peak (1 + cos(pi (e - 10) / 290)) / 2, continuous at the end of the
    warm-up; the same 100-epoch run as above would be at 1.76 at half of training, not 1.5."""
    schedule = WarmupCosine(peak=2e-3, warmup_samples=10, total_samples=300, start_factor=0.001,
                            cosine_from="warmup_end")
    assert schedule(0) == pytest.approx(2e-6)
    assert schedule(10) == pytest.approx(2e-3)
    assert schedule(155) == pytest.approx(1e-3)
    assert schedule(82.5) == pytest.approx(2e-3 * (1 + math.cos(math.pi * 0.25)) / 2)
    assert schedule(300) == pytest.approx(0.0, abs=1e-12)
    imagenet_restarted = WarmupCosine(3.0, 10, 100, 0.001 / 3, cosine_from="warmup_end")
    assert imagenet_restarted(50) == pytest.approx(1.76, abs=5e-3)


@pytest.mark.parametrize("cosine_from", ["start", "warmup_end"])
def test_the_schedule_depends_on_samples_not_on_how_they_are_split_into_steps(cosine_from):
    schedule = WarmupCosine(peak=2.0, warmup_samples=1000, total_samples=11000, start_factor=0.001,
                            cosine_from=cosine_from)
    assert schedule(3 * 512) == schedule(6 * 256)
    assert schedule(7 * 1024) == schedule(28 * 256)


def test_the_recipes_choose_their_cosine():
    configs = os.path.join(REPO, "configs")
    assert load_config(os.path.join(configs, "dissl_resnet50_d8192_e100_m2.yaml")).optim.cosine_from == "start"
    assert load_config(os.path.join(configs, "cissl_resnet50_e100_m2.yaml")).optim.cosine_from == "start"
    for objective in ("dissl", "dino", "cissl", "simclr"):
        path = os.path.join(configs, f"{objective}_resnet18_tinyimagenet_baseline.yaml")
        assert load_config(path).optim.cosine_from == "warmup_end"
