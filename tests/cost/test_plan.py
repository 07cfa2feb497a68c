"""`sslscale plan`: what a config resolves to, before a run starts."""
import glob
import json
import os

import pytest

from sslscale.cli import main
from sslscale.config import load_config
from sslscale.cost.plan import make_plan
from sslscale.train.loop import pretrain
from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
IMAGENET_TRAIN = 1_281_167
TINYIMAGENET_TRAIN = 100_000


def plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def dataset_size_flag(path):
    source = load_config(path).data.source
    if source != "folder":
        return []  # the embedded data set is here: plan counts it
    return ["--dataset-size", str(TINYIMAGENET_TRAIN if "tinyimagenet" in path else IMAGENET_TRAIN)]


# The fast tier plans the quickstart; the full suite every recipe (seconds each).
@pytest.mark.parametrize("path", [path if path.endswith("quickstart.yaml") else pytest.param(path, marks=pytest.mark.slow)
                                  for path in CONFIGS], ids=os.path.basename)
def test_plan_runs_for_every_config(capsys, path):
    # ResNet-50 FLOP counts take seconds each: two ImageNet recipes are counted in the tests below.
    imagenet = "resnet50" in path
    plan = plan_json(capsys, path, *dataset_size_flag(path), *(["--no-flops"] if imagenet else []))
    cfg = load_config(path)
    assert plan["global_batch"] == cfg.data.batch_size
    assert plan["per_rank_batch"] * plan["world_size"] == cfg.data.batch_size
    heads = {"dissl": {"teacher_head", "student_head"}, "cissl": {"teacher_head", "student_head"},
             "simclr": {"head"}, "dino": {"student_head", "teacher_head", "teacher_trunk"}}[cfg.objective.name]
    assert {"trunk", *heads} == set(plan["params"])
    assert plan["lr"]["0"] == pytest.approx(cfg.optim.base_lr * cfg.data.batch_size / 256
                                            * cfg.optim.warmup_start_factor)
    assert plan["lr"]["1"] == pytest.approx(0.0, abs=1e-12)
    if not imagenet:
        assert plan["flops_per_image"]["train_step_flops"] >= 2 * plan["flops_per_image"]["forward_flops"]


def test_the_d8192_m8_plan_has_the_recipes_numbers(capsys):
    path = os.path.join(REPO, "configs", "dissl_resnet50_d8192_e800_m8.yaml")
    plan = plan_json(capsys, path, "--dataset-size", str(IMAGENET_TRAIN))
    assert plan["world_size"] == 8 and plan["per_rank_batch"] == 320  # the recipe's 8 GPUs x 320
    assert plan["params"]["trunk"] == 31_128_640
    assert plan["params"]["teacher_head"] == 18_900_992
    assert plan["params"]["student_head"] == 12_600_320
    assert plan["peak_lr"] == pytest.approx(3.0)
    assert plan["lr"]["0.5"] == pytest.approx(1.5)  # cosine at global progress: exactly peak / 2 at half
    assert plan["warmup_steps"] == 5005 and plan["total_steps"] == 400_365
    assert plan["crops"] == {"per_image": 8, "layout": "2x224 + 6x96"}
    # ResNet-50 with the d8192 block: 4.11 GMAC at 224 px, 0.75 at 96, the block 0.37 at 7x7; heads on top.
    assert 13.9e9 < plan["flops_per_image"]["forward_macs"] < 14.3e9
    assert plan["flops_per_image"]["forward_flops"] == pytest.approx(2 * plan["flops_per_image"]["forward_macs"])
    memory = plan["memory_per_rank_bytes"]
    total = sum(plan["params"].values())
    assert memory["weights"] == 4 * total and memory["optimizer_state"] == 4 * total  # LARS: one momentum


def test_the_100_epoch_plan_steps_down_at_the_end_of_the_warm_up(capsys):
    path = os.path.join(REPO, "configs", "dissl_resnet50_dNone_e100_m2.yaml")
    plan = plan_json(capsys, path, "--dataset-size", str(IMAGENET_TRAIN))
    assert plan["lr"]["0.1"] == pytest.approx(2.93, abs=5e-3)
    assert plan["lr"]["0.5"] == pytest.approx(1.5)
    assert plan["params"]["teacher_head"] == 17_851_392
    # two 224-px crops of a ResNet-50: 2 x 4.11 GMAC, plus the heads
    assert 8.2e9 < plan["flops_per_image"]["forward_macs"] < 8.4e9


def test_dino_counts_its_ema_teacher_forward_only(tiny_config):
    cfg = tiny_config("objective.name=dino")
    plan = make_plan(cfg, dataset_size=1000, world_size=1)
    assert plan["ema_modules"] == ["teacher_trunk", "teacher_head"]
    assert plan["trainable_params"]["teacher_trunk"] == 0 and plan["params"]["teacher_trunk"] > 0
    flops = plan["flops_per_image"]
    # With two crops the EMA teacher's forward costs what the student's does (S = T); a step is the forward of
    # both plus the backward (2 S) of the student only: 4 S = 2 x the forward, not 3 x.
    assert flops["train_step_flops"] == pytest.approx(2 * flops["forward_flops"], rel=1e-6)
    dissl = make_plan(tiny_config(), dataset_size=1000, world_size=1)["flops_per_image"]
    assert dissl["train_step_flops"] == pytest.approx(3 * dissl["forward_flops"], rel=1e-6)


def test_world_size_splits_the_global_batch_and_fsdp_shards_the_memory(tiny_config):
    ddp = make_plan(tiny_config(), dataset_size=1000, world_size=4, flops=False)
    fsdp = make_plan(tiny_config("dist.strategy=fsdp"), dataset_size=1000, world_size=4, flops=False)
    assert ddp["per_rank_batch"] == 8
    assert fsdp["memory_per_rank_bytes"]["weights"] == ddp["memory_per_rank_bytes"]["weights"] // 4
    uneven = make_plan(tiny_config(), dataset_size=1000, world_size=3, flops=False)
    assert uneven["per_rank_batch"] == pytest.approx(32 / 3)


def test_plan_of_a_broken_config_is_one_line_per_problem(capsys):
    assert main(["plan", "configs/quickstart.yaml", "optim.base_lrr=1", "objective.dissl.teacher_head=big"]) == 2
    err = capsys.readouterr().err
    assert "unknown key optim.base_lrr (did you mean optim.base_lr?)" in err
    assert "Traceback" not in err


def test_plan_without_the_data_asks_for_its_size(capsys):
    path = os.path.join(REPO, "configs", "cissl_resnet50_e100_m2.yaml")
    assert main(["plan", path, "data.path=/nonexistent/imagenet"]) == 2
    assert "--dataset-size" in capsys.readouterr().err


def test_pretrain_prints_the_plan_and_writes_it_to_the_run_folder(tiny_config, capsys):
    cfg = tiny_config("train.max_steps=1")
    pretrain(cfg)
    out = capsys.readouterr().out
    assert f"plan of {cfg.run_dir}" in out and "parameters  trunk" in out
    with open(os.path.join(cfg.run_dir, "plan.json")) as f:
        saved = json.load(f)
    assert saved["params"] == make_plan(cfg, dataset_size=1497, world_size=1)["params"]
    assert saved["end_step"] == 1


@pytest.mark.slow
def test_a_resumed_run_reuses_the_flop_count_of_its_plan_unless_the_model_changed(tiny_config, monkeypatch):
    from sslscale.cost import plan as plan_module
    calls = []
    original = plan_module.count_flops
    monkeypatch.setattr(plan_module, "count_flops", lambda *a: calls.append(a) or original(*a))
    pretrain(tiny_config("train.max_steps=1"))
    pretrain(tiny_config("train.max_steps=2"))  # resumed: the same model and crops
    assert len(calls) == 1
    cfg = tiny_config("train.max_steps=3", "data.crops=[{size: 8, count: 2}, {size: 4, count: 2}]")
    pretrain(cfg)  # other crops: counted again (the shapes are the same, so the run resumes)
    assert len(calls) == 2
    with open(os.path.join(cfg.run_dir, "plan.json")) as f:
        assert json.load(f)["flops_key"]["crops"] == [[8, 2], [4, 2]]
