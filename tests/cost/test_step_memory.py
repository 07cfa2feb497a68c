"""The memory of one training step, estimated on the meta device before the run starts, and the refusal of a
step that cannot fit."""
import json
import os

import pytest
import torch

from sslscale.cli import main
from sslscale.cost import step_memory
from sslscale.cost.step_memory import StepDoesNotFit, StepMemory, check_fits, count_activations, estimate_step_memory
from sslscale.train.loop import pretrain
from tests.conftest import REPO


def test_the_meta_count_is_what_autograd_keeps_on_a_real_forward(tiny_config):
    """The same hook on real CPU tensors: the meta device keeps the same storages of the same sizes."""
    from sslscale.objectives.ssl_model import build_model
    cfg = tiny_config()
    with torch.device("meta"):
        on_meta = count_activations(build_model(cfg, steps_per_epoch=1.0, total_steps=1), cfg, 16)
    model = build_model(cfg, steps_per_epoch=1.0, total_steps=1)
    weights = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    crops = [torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(crops, 0)
    assert on_meta == sum(kept.values()) > 0


def test_activations_grow_with_the_batch_and_the_crop_area(tiny_config):
    small = estimate_step_memory(tiny_config(), 16, 1)
    double_batch = estimate_step_memory(tiny_config(), 32, 1)
    ten_times_the_crop = estimate_step_memory(tiny_config("data.crops=[{size: 80, count: 2}]"), 16, 1)
    assert 1.9 < double_batch.activations / small.activations < 2.1
    assert ten_times_the_crop.activations > 50 * small.activations  # 100x the pixels, whatever the stem keeps
    assert ten_times_the_crop.crops == 100 * small.crops
    half = estimate_step_memory(tiny_config("train.precision=bf16"), 16, 1)
    assert half.activations == small.activations // 2


def test_a_crop_far_larger_than_the_images_is_refused_before_the_run_starts(tiny_config):
    """The digits are 8 px; crops of 4,000 px need terabytes of activations: refused with the numbers, before
    the data, the process group or the run's config.yaml."""
    cfg = tiny_config("data.crops=[{size: 4000, count: 2}]")
    with pytest.raises(StepDoesNotFit, match=r"one training step needs at least activations .* per rank at 32 "
                                          r"images per rank, more than the .* of available host memory"):
        pretrain(cfg)
    assert not os.path.exists(os.path.join(cfg.run_dir, "config.yaml"))


def test_the_share_of_the_host_is_divided_between_local_ranks(monkeypatch):
    monkeypatch.setattr(step_memory, "available_host_memory", lambda: 8 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    need = StepMemory(activations=3 * 2**30, crops=0, loader=0, model_state=0)
    assert check_fits(need, torch.device("cpu"), 8) is not None  # 3 GiB > 8 GiB / 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert check_fits(need, torch.device("cpu"), 8) is None
    assert check_fits(need, torch.device("meta"), 8) is None  # nothing to compare with


@pytest.mark.slow
def test_plan_prints_and_stores_the_step_memory(capsys):
    main(["plan", "configs/dissl_resnet50_d8192_e800_m8.yaml", "--dataset-size", "1281167", "--no-flops"])
    assert "step memory per rank at 320 images, at least: activations" in capsys.readouterr().out
    main(["plan", "configs/dissl_resnet50_d8192_e800_m8.yaml", "--dataset-size", "1281167", "--no-flops",
          "--json"])
    step = json.loads(capsys.readouterr().out)["step_memory_bytes"]
    # ResNet-50 keeps about 85 MB per 224-px image in fp32 for its backward pass (2 large + 6 small crops are
    # about 3 such images); bf16 halves it.
    assert 30 * 2**30 < step["activations"] < 60 * 2**30
    assert step["crops"] == 320 * 3 * 4 * (2 * 224**2 + 6 * 96**2)


def test_cross_rank_batchnorm_keeps_what_plain_batchnorm_keeps_at_the_m8_recipes_shapes():
    """At 320 images per rank (m8: 2x224 + 6x96, d8192 heads), on the meta device: the activations a multi-rank
    step keeps for backward with the cross-rank BatchNorm are within 5% of plain BatchNorm's (they were twice
    as many when autograd ran through the statistics), and the estimate counts the BatchNorm that will run."""
    from sslscale.config import load_config
    from sslscale.dist.batchnorm import CrossRankBatchNorm, sync_batchnorm
    from sslscale.objectives.ssl_model import build_model
    cfg = load_config(os.path.join(REPO, "configs", "dissl_resnet50_d8192_e800_m8.yaml"))
    with torch.device("meta"):
        plain = build_model(cfg, steps_per_epoch=1.0, total_steps=1)
        cross = sync_batchnorm(build_model(cfg, steps_per_epoch=1.0, total_steps=1), collective=True)
    assert sum(isinstance(m, CrossRankBatchNorm) for m in cross.modules()) > 50
    plain_bytes, cross_bytes = count_activations(plain, cfg, 320), count_activations(cross, cfg, 320)
    assert abs(cross_bytes / plain_bytes - 1) < 0.05
    one, eight = estimate_step_memory(cfg, 320, 1), estimate_step_memory(cfg, 320, 8)
    assert abs(eight.activations / one.activations - 1) < 0.05
