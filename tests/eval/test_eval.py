import json
import os

import pytest
import torch

from sslscale.eval.cache import CachedSplit
from sslscale.eval.features import recompute_bn_statistics
from sslscale.eval.knn import knn_accuracy, nearest_neighbours
from sslscale.eval.linear import (
    EpochBatches,
    FeatureSource,
    HeadGroup,
    cosine,
    per_class_subset,
    split_validation,
    train_groups,
)
from sslscale.eval.probes import probe_features
from sslscale.eval.run import evaluate_run
from sslscale.train.loop import pretrain


def clustered(n_per_class, classes=4, dim=16, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def as_split(x, y, block_rows=64):
    """An in-memory CachedSplit (fp16 blocks, as the cache holds them)."""
    array = x.to(torch.float16).numpy()
    blocks = [array[i:i + block_rows] for i in range(0, len(array), block_rows)]
    return CachedSplit(y.clone(), {"trunk": blocks}, list(range(0, len(array), block_rows)))


def probe_cfg(tiny_config, *extra):
    return tiny_config("eval.linear.epochs=20", "eval.linear.base_lrs=[0.1, 1.0]", *extra)


def test_linear_probe_separates_clusters_and_reports_every_sweep_point(tiny_config):
    cfg = probe_cfg(tiny_config, "eval.linear.weight_decays=[0, 0.001]", "eval.labels_per_class=[5]")
    result = probe_features(as_split(*clustered(100)), as_split(*clustered(50, seed=1)), ["trunk"], 4, cfg, "cpu")
    linear = result["linear"]
    assert len(linear["points"]) == 4 and linear["best"] in linear["points"]
    assert linear["best"]["test"]["top1"] > 95
    assert linear["n_train"] + linear["n_val"] == 400 and linear["n_test"] == 200
    assert result["linear_5_per_class"]["n_train"] == 20
    assert set(result["knn"]["by_k"]) == {"10", "20", "100", "200"}
    assert result["knn"]["by_k"]["20"]["top1"] > 95
    assert 1 <= result["rankme"]["value"] <= 16


def test_linear_probe_is_at_chance_on_random_labels(tiny_config):
    cfg = probe_cfg(tiny_config)
    x, _ = clustered(200)
    noise = torch.randint(0, 4, (800,), generator=torch.Generator().manual_seed(1))
    test_x, _ = clustered(100, seed=2)
    test_y = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(2))
    result = probe_features(as_split(x, noise), as_split(test_x, test_y), ["trunk"], 4, cfg, "cpu")
    assert result["linear"]["best"]["test"]["top1"] < 40  # chance is 25


def test_validation_split_and_per_class_subsets():
    labels = torch.arange(5).repeat(20)
    fit, val = split_validation(labels, 0.1, seed=0)
    assert len(val) == 10 and len(fit) == 90 and not set(fit.tolist()) & set(val.tolist())
    subset = per_class_subset(labels, fit, 3, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [3] * 5
    assert set(subset.tolist()) <= set(fit.tolist())


def reference_sgd(x, y, fit, *, base_lr, weight_decay, epochs, batch_size, seed, num_classes):
    """One point alone, the textbook way: nn.Linear + torch.optim.SGD on standardised features."""
    fit_x = x[fit].float()
    mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-6)
    fit_x = (fit_x - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], num_classes)
    batches = EpochBatches(len(fit), batch_size, epochs, seed)
    lr = base_lr * batches.batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    for step, positions in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine(step, batches.total)
        loss = torch.nn.functional.cross_entropy(probe(fit_x[positions]), y[fit][positions])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe


def test_heads_trained_together_equal_each_point_trained_alone():
    """12 sweep points in one pass end where each point ends trained alone with torch.optim.SGD (same seed,
    same batches): the vectorised update is SGD's, and the heads do not interact."""
    x, y = clustered(60, classes=5, dim=12, spread=2.0)
    split = as_split(x, y)
    fit = split_validation(y, 0.1, 0)[0]
    lrs, wds = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0] * 2, [0.0] * 6 + [1e-3] * 6
    source = FeatureSource(split, "trunk", torch.device("cpu"), resident=True, chunk_rows=1000)
    group = HeadGroup(source, "linear", fit, lrs, wds, "standardize", 5)
    train_groups([group], y, epochs=4, batch_size=64, seed=3)
    cached = split.rows("trunk", torch.arange(len(y))).float()  # what the heads saw: fp16 features
    for p, (lr, wd) in enumerate(zip(lrs, wds)):
        alone = reference_sgd(cached, y, fit, base_lr=lr, weight_decay=wd, epochs=4, batch_size=64, seed=3,
                              num_classes=5)
        assert torch.allclose(group.weight[:, p, :].detach().T, alone.weight, atol=2e-5, rtol=1e-4), (lr, wd)
        assert torch.allclose(group.bias[p].detach(), alone.bias, atol=2e-5, rtol=1e-4), (lr, wd)


def test_label_budgets_and_layers_share_one_pass_without_changing_any_result(tiny_config):
    cfg = probe_cfg(tiny_config, "eval.labels_per_class=[3]", "eval.linear.norm=batchnorm")
    x, y = clustered(40, dim=8, spread=2.0)
    tx, ty = clustered(20, dim=8, spread=2.0, seed=5)
    two = as_split(x, y)
    two.blocks["head.0"] = [b[:, ::-1].copy() * 2 for b in two.blocks["trunk"]]  # another feature set
    test = as_split(tx, ty)
    test.blocks["head.0"] = [b[:, ::-1].copy() * 2 for b in test.blocks["trunk"]]
    together = probe_features(two, test, ["trunk", "head.0"], 4, cfg, "cpu")
    alone = probe_features(as_split(x, y), as_split(tx, ty), ["trunk"], 4, cfg, "cpu")
    assert together["linear"] == alone["linear"]
    assert together["linear_3_per_class"] == alone["linear_3_per_class"]
    assert set(together["layers"]["head.0"]) == {"linear", "linear_3_per_class", "knn", "rankme"}


def test_probe_tensors_stay_on_the_probe_device():
    """On the meta device any tensor left on the CPU (a mixed-device op) raises: what a GPU would do."""
    x, y = clustered(20, dim=8)
    split = as_split(x, y)
    meta = torch.device("meta")
    source = FeatureSource(split, "trunk", meta, resident=False, chunk_rows=16)
    fit = split_validation(y, 0.1, 0)[0]
    for norm in ("none", "batchnorm"):
        group = HeadGroup(source, "linear", fit, [0.1, 1.0], [0.0, 0.0], norm, 4)
        train_groups([group], y, epochs=1, batch_size=16, seed=0)
        assert group.weight.device.type == "meta" and group.momentum[0].device.type == "meta"
    similarity, neighbours = nearest_neighbours([(0, torch.randn(30, 8)), (30, torch.randn(30, 8))],
                                                torch.randn(10, 8, device=meta), 5)
    assert similarity.device.type == neighbours.device.type == "meta"


def test_streamed_knn_equals_one_dense_similarity_matrix():
    """Bank in chunks of 7 rows, k up to 200 (more than a chunk, more than the bank): the running lists
    give exactly the votes of one [test, bank] similarity matrix."""
    bank, bank_y = clustered(30, classes=4, dim=6, spread=2.0)
    test, test_y = clustered(10, classes=4, dim=6, spread=2.0, seed=4)
    chunks = [(start, bank[start:start + 7]) for start in range(0, len(bank), 7)]
    similarity, neighbours = nearest_neighbours(chunks, test, 200)
    assert similarity.shape == (40, 120)  # k is capped at the bank size
    dense = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    expected = dense.topk(120, dim=1)
    assert torch.allclose(similarity, expected.values, atol=1e-6)
    for k in (1, 10, 20, 100, 200):
        k_used = min(k, 120)
        votes = torch.zeros(40, 4).scatter_add_(1, bank_y[expected.indices[:, :k_used]],
                                                (expected.values[:, :k_used] / 0.07).exp())
        top1 = 100 * float((votes.argmax(1) == test_y).float().mean())
        result = knn_accuracy(similarity, neighbours, bank_y, test_y, 4, [k], 0.07)[str(k)]
        assert result["top1"] == pytest.approx(top1) and result["k_used"] == k_used


def test_bn_recomputation_uses_clean_image_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    images = torch.randn(64, 3, 4, 4) * 5 + 2
    loader = [(images[i:i + 16], torch.zeros(16)) for i in range(0, 64, 16)]
    recompute_bn_statistics(net, loader, "cpu")
    with torch.no_grad():
        expected = net[0](images).mean(dim=(0, 2, 3))
    assert torch.allclose(net[1].running_mean, expected, atol=1e-4)
    assert net[1].momentum == 0.1 and not net.training


def test_cached_rows_come_back_in_any_order():
    x, y = clustered(50, dim=5)
    split = as_split(x, y, block_rows=16)
    index = torch.tensor([199, 0, 17, 16, 15, 150, 3])
    assert torch.equal(split.rows("trunk", index), x.to(torch.float16)[index])
    assert torch.equal(torch.cat([c for _, c in split.chunks("trunk", 5)]), x.to(torch.float16))


def test_evaluation_of_a_run_compares_with_random_init_and_writes_json(tiny_config, capsys):
    cfg = tiny_config("train.max_steps=3", "eval.labels_per_class=[5]", "eval.train_images=600",
                      "eval.linear.base_lrs=[0.1, 1.0]", "eval.cache.block_rows=256")
    pretrain(cfg)
    report = evaluate_run(cfg)
    path = os.path.join(cfg.run_dir, "eval", "linear.json")
    assert json.load(open(path)) == json.loads(json.dumps(report))
    assert set(report["results"]) == {"pretrained", "random_init"}
    for trunk in report["results"].values():
        assert set(trunk) == {"linear", "linear_5_per_class", "knn", "rankme"}
        assert trunk["linear"]["n_train"] + trunk["linear"]["n_val"] == 600
        assert trunk["linear_5_per_class"]["n_train"] == 50
        assert trunk["linear"]["n_test"] == 300 and len(trunk["linear"]["points"]) == 2
        assert trunk["knn"]["n_bank"] == 600 and set(trunk["knn"]["by_k"]) == {"10", "20", "100", "200"}
        assert 1 <= trunk["rankme"]["value"] <= 64 and trunk["rankme"]["n"] == 600
    assert "never on the test split" in report["protocol"]
    assert report["checkpoint"] == "step_000000003"
    out = capsys.readouterr().out
    assert "pretrained" in out and "random_init" in out and "label-free signals" in out and "RankMe" in out
    with open(os.path.join(cfg.run_dir, "eval", "linear.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(cfg.run_dir, "tb"))
    events.Reload()
    linear = events.Scalars("eval/pretrained/linear_top1")
    assert [(e.step, e.value) for e in linear] == [(3, pytest.approx(report["results"]["pretrained"]["linear"]["best"]
                                                                     ["test"]["top1"]))]
    assert events.Scalars("eval/random_init/rankme")[0].value == pytest.approx(
        report["results"]["random_init"]["rankme"]["value"])
    assert "eval/pretrained/knn_k20_top1" in events.Tags()["scalars"]


def test_evaluating_a_run_without_checkpoints_is_a_clear_error(tiny_config):
    from sslscale.config import ConfigError
    with pytest.raises(ConfigError, match="has no complete checkpoint"):
        evaluate_run(tiny_config())


def test_eval_settings_are_checked(tiny_config):
    from sslscale.config import ConfigError
    with pytest.raises(ConfigError) as error:
        tiny_config("eval.layers=[teacher_head]", "eval.knn.k=[]", "eval.linear.norm=layernorm",
                    "eval.cache.block_rows=0", "eval.labels_per_class=[5, 5]")
    text = str(error.value)
    for needle in ("eval.layers: 'teacher_head'", "eval.knn.k: give at least one k", "eval.linear.norm: 'layernorm'",
                   "eval.cache.block_rows: 0", "names a budget twice"):
        assert needle in text


def test_a_12_point_sweep_on_fashion_mnist_equals_the_points_trained_one_by_one(tiny_config):
    """Fashion-MNIST pixels (784-d) as the cached features: every point of a 12-point sweep, trained together,
    gets the accuracies it gets alone (same seed), to one image of the 1,000 test images (0.1 point): the
    12-head matmul sums in another order than the 1-head one, so weights agree to float32 rounding only."""
    from data_pipelines.sources import fashion_mnist
    train, test = fashion_mnist("train"), fashion_mnist("val")
    x, y = train.images[:1500].reshape(1500, -1).float() / 255, train.labels[:1500]
    tx, ty = test.images[:1000].reshape(1000, -1).float() / 255, test.labels[:1000]
    lrs, wds = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], [0.0, 1e-3]
    common = ["eval.linear.epochs=4", "eval.linear.batch_size=256", "eval.knn.enabled=false", "eval.rankme=false"]
    together = probe_features(as_split(x, y, 1024), as_split(tx, ty, 1024), ["trunk"], 10,
                              tiny_config(*common, f"eval.linear.base_lrs={lrs}", f"eval.linear.weight_decays={wds}"),
                              "cpu")["linear"]["points"]
    assert len(together) == 12
    differences = []
    for point in together:
        alone = probe_features(as_split(x, y, 1024), as_split(tx, ty, 1024), ["trunk"], 10,
                               tiny_config(*common, f"eval.linear.base_lrs=[{point['base_lr']}]",
                                           f"eval.linear.weight_decays=[{point['weight_decay']}]"), "cpu")
        (single,) = alone["linear"]["points"]
        for split in ("val", "test"):
            for k in ("top1", "top5"):
                differences.append(abs(single[split][k] - point[split][k]))
                assert single[split][k] == pytest.approx(point[split][k], abs=0.11), (point, split, k)
    print(f"largest difference, together vs alone: {max(differences):.3f} points")
    assert max(p["test"]["top1"] for p in together) > 70  # the probe learns: chance is 10
