"""The two FLOP counters: fvcore (where installed) and torch's FlopCounterMode (a bare GPU node has no fvcore)
agree within 3% on the recipes, and both count an EMA teacher forward only."""
import os

import pytest

from data_pipelines.augment import crop_sizes
from sslscale.config import load_config
from sslscale.cost.flops import count_flops, count_flops_with_fvcore, count_flops_with_torch
from sslscale.objectives.ssl_model import build_model
from tests.conftest import REPO

pytest.importorskip("fvcore")


def both_counts(config: str) -> tuple[dict, dict]:
    cfg = load_config(os.path.join(REPO, "configs", config))
    model = build_model(cfg, steps_per_epoch=1.0, total_steps=1)
    sizes = crop_sizes(cfg.data.crops)
    return (count_flops_with_torch(model, sizes, cfg.objective.name),
            count_flops_with_fvcore(model, sizes, cfg.objective.name))


@pytest.mark.parametrize("config", ["quickstart.yaml", "fashion_mnist_dino.yaml", "fashion_mnist_cissl.yaml",
                                    pytest.param("dissl_resnet50_d8192_e800_m8.yaml", marks=pytest.mark.slow)])
def test_torch_and_fvcore_counts_agree_within_3_percent(config):
    torch_count, fvcore_count = both_counts(config)
    assert torch_count["counter"] == "torch.utils.flop_counter" and fvcore_count["counter"] == "fvcore"
    for key in ("forward_flops", "train_step_flops"):
        assert torch_count[key] == pytest.approx(fvcore_count[key], rel=0.03), key


def test_an_ema_teacher_is_counted_forward_only_by_both():
    for count in both_counts("fashion_mnist_dino.yaml"):
        # Trained modules cost 3x their forward; a teacher that only runs forward costs 1x: less than 3x all.
        assert count["train_step_flops"] < 3 * count["forward_flops"] * 0.95


def test_without_fvcore_the_plan_counts_with_torch(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_fvcore(name, *args, **kwargs):
        if name == "fvcore" or name.startswith("fvcore."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fvcore)
    cfg = load_config(os.path.join(REPO, "configs", "quickstart.yaml"))
    count = count_flops(build_model(cfg, steps_per_epoch=1.0, total_steps=1), crop_sizes(cfg.data.crops), "dissl")
    assert count["counter"] == "torch.utils.flop_counter" and count["train_step_flops"] > 0
