"""The points where the paper's recipes follow the authors' code exactly, each against a number computed by
hand or by the authors' own formula (docs/method.md says which recipe sets which option)."""
import pytest

from sslscale.models.heads import build_head
from sslscale.objectives.dissl import warmed_up_beta

C = 16384


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
