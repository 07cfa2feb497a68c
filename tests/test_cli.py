import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.preview import HEADER, PAD
from sslscale.cli import main
from sslscale.models import ResNetTrunk
from tests.conftest import REPO, tiny_overrides

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


def test_preview_of_an_imagenet_recipe_on_the_sample_photos_needs_no_data(tmp_path, capsys):
    out = tmp_path / "crops.png"
    assert main(["preview", os.path.join(REPO, "configs", "dissl_resnet50_d8192_e800_m8.yaml"), str(out),
                 "--images", "2", "--sample-photos"]) == 0
    assert "sample photos" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape == (HEADER + PAD + 2 * (224 + PAD), PAD + 9 * (224 + PAD), 3)  # source + 2x224 + 6x96 (x2)
    small = grid[HEADER + PAD:HEADER + PAD + 192, PAD + 3 * (224 + PAD):PAD + 3 * (224 + PAD) + 192]
    assert (small[::2, ::2] == small[1::2, 1::2]).all()  # a 96-px crop shown at twice its size, pixel by pixel


def test_version_and_the_list_of_recipes(capsys):
    import sslscale
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and f"sslscale {sslscale.__version__} (torch " in capsys.readouterr().out
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    recipes = {line.split()[0]: line for line in lines[:-1]}
    assert len(recipes) == len(os.listdir(os.path.join(REPO, "configs")))
    assert "crops 2x224 + 6x96, batch 2560" in recipes["dissl_resnet50_d8192_e800_m8"]
    assert recipes["quickstart"].split()[1] == "dissl" and lines[-1].startswith(f"({len(recipes)} recipes")


def test_a_run_starts_with_a_banner_says_its_first_step_at_once_and_keeps_its_console(tmp_path, capsys):
    assert main(["pretrain", QUICKSTART, *tiny_overrides(tmp_path), "train.max_steps=3", "train.log_every_steps=50",
                 "eval.after_pretrain=false"]) == 0
    out = capsys.readouterr().out
    run_dir = os.path.join(tmp_path, "tiny")
    assert f"pretraining {run_dir}, a new run; steps 0 -> 3" in out
    assert "TensorBoard: tensorboard --logdir" in out and "1,497 images" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1/3", "3/3"]  # first, last
    with open(os.path.join(run_dir, "console.log")) as f:
        log = f.read()
    assert log.startswith("=== ") and "plan of" in log and "step 3/3" in log
    assert main(["pretrain", QUICKSTART, *tiny_overrides(tmp_path), "train.max_steps=4", "eval.after_pretrain=false",
                 "model.width=16"]) == 2  # a second start appends to the log, with the error that ended it
    with open(os.path.join(run_dir, "console.log")) as f:
        log = f.read()
    assert log.count("=== ") == 2 and "ended: CheckpointMismatch" in log and "model.width" in log


def test_under_a_launcher_only_rank_0_reports_a_bad_config(tmp_path, capsys, monkeypatch):
    bad = ["pretrain", QUICKSTART, *tiny_overrides(tmp_path), "optim.base_lrr=1"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(bad) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(bad) == 2
    assert capsys.readouterr().err.count("unknown key optim.base_lrr") == 1


def test_imagenet_val_is_sorted_into_the_class_folders_of_train(tmp_path, capsys):
    val, train = tmp_path / "val", tmp_path / "train"
    val.mkdir()
    for wnid in ("n01440764", "n01443537"):
        (train / wnid).mkdir(parents=True)
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3)]
    for name in names:
        (val / name).write_bytes(b"jpeg")
    solution = tmp_path / "LOC_val_solution.csv"
    solution.write_text("ImageId,PredictionString\n" + "".join(
        f"{name[:-5]},{wnid} 1 2 3 4 {wnid} 5 6 7 8\n" for name, wnid in zip(names, ["n01440764", "n01443537",
                                                                                     "n01440764"])))
    args = ["imagenet-val", str(val), str(solution), "--train-dir", str(train)]
    assert main([*args, "--dry-run"]) == 0 and "would move 3 images" in capsys.readouterr().out
    assert sorted(os.listdir(val)) == names  # nothing moved
    assert main(args) == 0 and "moved 3 images" in capsys.readouterr().out
    assert sorted(os.listdir(val / "n01440764")) == [names[0], names[2]] and os.listdir(val / "n01443537") == [names[1]]
    assert main(args) == 0 and "moved 0 images into class folders" in capsys.readouterr().out  # again: all in place
    listing = tmp_path / "labels.txt"
    listing.write_text(f"{names[0]} n99999999\n")
    (val / "n01440764" / names[0]).rename(val / names[0])
    assert main(["imagenet-val", str(val), str(listing), "--train-dir", str(train)]) == 2
    assert "classes of the label file are not class folders of train" in capsys.readouterr().err
