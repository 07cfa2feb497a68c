"""The heads of every recipe, pinned to the authors' shapes and parameter counts."""
import glob
import os

import pytest
import torch
import torch.nn.functional as F

from sslscale.config import ConfigError, load_config, read_config_file
from sslscale.models.heads import HEADS, Residual, build_head
from tests.conftest import REPO

C = 16384
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def n_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("name, d, expected", [
    ("imagenet_d2048", 2048, 17_851_392),
    # No bias in the residual block (the authors' config: use_bias: False).
    ("imagenet_d8192", 8192, 18_900_992),
    ("small_data", 512, 9_456_640),
])
def test_dissl_teacher_heads_have_the_authors_parameter_counts(name, d, expected):
    head = build_head("dissl_teacher", name, d, C)
    assert n_params(head) == expected
    assert head(torch.randn(4, d)).shape == (4, C)


@pytest.mark.parametrize("d, expected", [(2048, 9_454_592), (8192, 12_600_320), (512, 8_668_160)])
def test_the_dissl_student_is_linear_and_low_rank(d, expected):
    student = build_head("dissl_student", "low_rank_linear", d, C).eval()
    assert n_params(student) == expected
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.GELU)) for m in student.modules())
    x, y = torch.randn(3, d), torch.randn(3, d)
    zero = student(torch.zeros(1, d))
    # Linear in z: f(x + y) - f(0) = (f(x) - f(0)) + (f(y) - f(0))
    assert torch.allclose(student(x + y) - zero, (student(x) - zero) + (student(y) - zero), atol=1e-3)


def test_residual_heads_add_their_input():
    body = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    assert torch.allclose(Residual(body)(x), body(x) + x)
    d8192 = build_head("dissl_teacher", "imagenet_d8192", 8192, C)
    assert isinstance(d8192[3], Residual) and d8192[3][0].in_features == 512 and d8192[3][-3].out_features == 512
    d2048 = build_head("dissl_teacher", "imagenet_d2048", 2048, C)
    assert isinstance(d2048[0], Residual) and d2048[1].out_features == 512


def test_the_small_data_dissl_bottleneck_is_linear():
    head = build_head("dissl_teacher", "small_data", 512, C)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "Linear"]
    assert head[3].out_features == 512 and head[3].bias is None and head[5].bias is not None


def test_cissl_imagenet_teacher_freezes_its_last_batchnorm_bias_at_zero():
    head = build_head("cissl_teacher", "imagenet", 2048, 128)
    assert n_params(head) == 8_659_200 and n_params(head, trainable_only=True) == 8_659_200 - 128
    last = head[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.bias.requires_grad
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(16, 2048)).pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(last.bias, torch.zeros(128))


@pytest.mark.parametrize("role, name, d, out, expected", [
    ("cissl_teacher", "small_data", 512, 128, 657_792),
    ("cissl_student", "imagenet", 2048, 128, 262_400),
    ("cissl_student", "small_data", 512, 128, 65_920),
    ("simclr", "small_data", 512, 128, 657_792),
    ("simclr", "imagenet", 2048, 128, 8_659_200),
    ("dino", "issl_baseline", 512, 1000, 1_044_480),
])
def test_contrastive_and_dino_heads_have_the_recipe_shapes(role, name, d, out, expected):
    head = build_head(role, name, d, out)
    assert n_params(head) == expected
    assert head(torch.randn(4, d)).shape == (4, out)


def test_the_dino_baseline_head_normalises_the_hidden_vector_not_the_bottleneck():
    head = build_head("dino", "issl_baseline", 16, 10, hidden=8, bottleneck=4).eval()
    z = torch.randn(5, 16)
    hidden = F.normalize(head.hidden(z), dim=-1)  # the 8-d hidden vector, normalised
    expected = F.linear(hidden @ head.bottleneck.weight.T, F.normalize(head.last_layer.weight, dim=1))
    assert torch.allclose(head(z), expected, atol=1e-6)
    assert head.bottleneck.bias is None and head.bottleneck.out_features == 4


def test_config_widths_replace_the_heads_own():
    head = build_head("dissl_teacher", "small_data", 32, 16, hidden=8, bottleneck=4)
    assert head[0].out_features == 8 and head[3].out_features == 4
    assert build_head("dissl_teacher", "small_data", 32, 16, hidden=None)[0].out_features == 1024


def test_an_unknown_head_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["objective.dissl.teacher_head=big"])
    assert ("objective.dissl.teacher_head: 'big' is not valid; choose one of imagenet_d2048, imagenet_d8192, "
            "small_data") in str(info.value)
    with pytest.raises(ConfigError, match="objective.cissl.student_head: 'wide' is not valid; choose one of "
                                          "imagenet, small_data"):
        load_config(None, ["objective.name=cissl", "objective.cissl.student_head=wide"])
    with pytest.raises(ConfigError, match="objective.dino.hidden: 0 must be > 0"):
        load_config(None, ["objective.name=dino", "objective.dino.hidden=0"])


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_recipe_names_its_heads(path):
    """Each recipe says which heads it trains (a default would silently change with the code)."""
    raw = read_config_file(path)
    name = raw["objective"]["name"]
    section = load_config(path).objective.selected
    assert set(section.HEADS) <= set(raw["objective"][name]), f"{path} leaves a head to the default"


def test_every_role_has_the_heads_the_recipes_need():
    assert set(HEADS) == {"dissl_teacher", "dissl_student", "cissl_teacher", "cissl_student", "simclr", "dino"}
