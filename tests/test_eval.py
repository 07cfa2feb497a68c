import json
import os

import pytest
import torch

from sslscale.eval.features import recompute_bn_statistics
from sslscale.eval.knn import knn_probe
from sslscale.eval.linear import linear_probe, per_class_subset, split_validation
from sslscale.eval.run import evaluate_run
from sslscale.train import pretrain


def clustered(n_per_class, classes=4, dim=16, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def probe_cfg(tiny_config):
    return tiny_config("eval.linear.epochs=20", "eval.linear.base_lrs=[0.1, 1.0]").eval


def test_linear_probe_separates_clusters_and_reports_every_sweep_point(tiny_config):
    cfg = probe_cfg(tiny_config)
    result = linear_probe(clustered(100), clustered(50, seed=0), 4, cfg.linear, seed=0)
    assert len(result["points"]) == 2
    assert result["best"]["test"]["top1"] > 95
    assert result["best"] in result["points"]
    assert result["n_train"] + result["n_val"] == 400


def test_linear_probe_is_at_chance_on_random_labels(tiny_config):
    cfg = probe_cfg(tiny_config)
    x, _ = clustered(200)
    noise = torch.randint(0, 4, (800,), generator=torch.Generator().manual_seed(1))
    test_x, _ = clustered(100, seed=2)
    result = linear_probe((x, noise), (test_x, torch.randint(0, 4, (400,))), 4, cfg.linear, seed=0)
    assert result["best"]["test"]["top1"] < 40  # chance is 25


def test_validation_split_and_per_class_subsets():
    labels = torch.arange(5).repeat(20)
    fit, val = split_validation(labels, 0.1, seed=0)
    assert len(val) == 10 and len(fit) == 90 and not set(fit.tolist()) & set(val.tolist())
    subset = per_class_subset(labels, fit, 3, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [3] * 5
    assert set(subset.tolist()) <= set(fit.tolist())


def test_knn_on_clusters(tiny_config):
    result = knn_probe(clustered(50), clustered(20, seed=0), 4, tiny_config().eval.knn)
    assert result["test"]["top1"] > 95


def test_bn_recomputation_uses_clean_image_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    images = torch.randn(64, 3, 4, 4) * 5 + 2
    loader = [(images[i:i + 16], torch.zeros(16)) for i in range(0, 64, 16)]
    recompute_bn_statistics(net, loader, "cpu")
    with torch.no_grad():
        expected = net[0](images).mean(dim=(0, 2, 3))
    assert torch.allclose(net[1].running_mean, expected, atol=1e-4)
    assert net[1].momentum == 0.1 and not net.training


def test_evaluation_of_a_run_compares_with_random_init_and_writes_json(tiny_config, capsys):
    cfg = tiny_config("train.max_steps=3", "eval.labels_per_class=[5]", "eval.train_images=600")
    pretrain(cfg)
    report = evaluate_run(cfg)
    path = os.path.join(cfg.run_dir, "eval", "linear.json")
    assert json.load(open(path)) == json.loads(json.dumps(report))
    assert set(report["results"]) == {"pretrained", "random_init"}
    for trunk in report["results"].values():
        assert set(trunk) == {"linear", "linear_5_per_class", "knn"}
        assert trunk["linear"]["n_train"] + trunk["linear"]["n_val"] == 600
        assert trunk["linear_5_per_class"]["n_train"] == 50
        assert trunk["linear"]["n_test"] == 300
    assert "never on the test split" in report["protocol"]
    assert report["checkpoint"] == "step_000000003"
    out = capsys.readouterr().out
    assert "pretrained" in out and "random_init" in out and "label-free signals" in out


def test_evaluating_a_run_without_checkpoints_is_a_clear_error(tiny_config):
    from sslscale.config import ConfigError
    with pytest.raises(ConfigError, match="has no complete checkpoint"):
        evaluate_run(tiny_config())
