import os

import torch

from sslscale.cli import main
from sslscale.models import ResNetTrunk
from tests.conftest import tiny_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")


def test_pretrain_then_linear_eval_then_export(tmp_path, capsys):
    assert main(["pretrain", QUICKSTART, *tiny_overrides(tmp_path), "train.max_steps=2",
                 "eval.after_pretrain=false"]) == 0
    run_dir = str(tmp_path / "tiny")
    assert main(["linear-eval", run_dir, "eval.compare_random_init=false", "eval.knn.enabled=false",
                 "eval.train_images=300"]) == 0
    assert os.path.exists(os.path.join(run_dir, "eval", "linear.json"))
    out = str(tmp_path / "trunk.pt")
    assert main(["export", run_dir, out]) == 0
    trunk = ResNetTrunk("resnet18", width=8, small_image_stem=True)
    trunk.load_state_dict(torch.load(out))  # strict: exactly the trunk, no heads
    assert "wrote" in capsys.readouterr().out


def test_prepare_data_writes_an_image_folder_that_trains(tmp_path, capsys):
    dest = str(tmp_path / "digits")
    assert main(["prepare-data", "digits", dest, "--limit", "64"]) == 0
    assert sorted(os.listdir(dest)) == ["train", "val"]
    assert main(["prepare-data", "digits", dest]) == 2  # refuses to overwrite
    assert main(["pretrain", QUICKSTART, *tiny_overrides(tmp_path / "runs"), "data.source=folder",
                 f"data.path={dest}", "train.max_steps=2", "eval.after_pretrain=false"]) == 0
    assert "step 2/2" in capsys.readouterr().out


def test_linear_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["linear-eval", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
