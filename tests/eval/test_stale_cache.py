"""A feature cache is reused only for the images it was made of: images replaced under the same names, another
data folder with the same names, blocks copied in from another cache of the same shape and a cache written by
an older version are each extracted again, never reused."""
import glob
import json
import os
import shutil

import pytest

from sslscale.cli import main
from sslscale.config import load_config
from sslscale.eval.run import evaluate
from sslscale.train.loop import pretrain
from tests.conftest import tiny_overrides

EVAL = ["train.max_steps=2", "eval.train_images=200", "eval.val_images=100", "eval.cache.block_rows=64",
        "eval.linear.enabled=false", "eval.knn.k=[5]", "eval.rankme=false", "eval.compare_random_init=false",
        "eval.batch_size=100", "eval.recompute_bn_stats=false"]


@pytest.fixture(scope="module")
def trained_on_a_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("stale_cache")
    data = str(root / "digits")
    assert main(["prepare-data", "digits", data, "--limit", "300"]) == 0
    overrides = tiny_overrides(root / "runs", "data.source=folder", f"data.path={data}", *EVAL)
    pretrain(load_config(None, overrides))
    return overrides, data


@pytest.fixture
def on_a_folder(trained_on_a_folder, tmp_path):
    """The trained run on this test's own copy of the data, with this test's own cache."""
    overrides, data = trained_on_a_folder
    mine = str(tmp_path / "digits")
    shutil.copytree(data, mine)
    cfg = load_config(None, [*overrides, f"data.path={mine}"])
    eval_dir = str(tmp_path / "eval")
    evaluate(cfg, eval_dir=eval_dir)
    return cfg, eval_dir, mine, overrides


def test_images_replaced_under_the_same_names_rebuild_the_cache(on_a_folder, capsys):
    cfg, eval_dir, data, _ = on_a_folder
    files = sorted(glob.glob(os.path.join(data, "train", "*", "*.jpg")))
    for target, other in zip(files, reversed(files)):  # every image now holds another one's pixels
        if target < other:
            a, b = open(target, "rb").read(), open(other, "rb").read()
            open(target, "wb").write(b + b"\0")  # one byte longer: a size that differs even if the mtime would not
            open(other, "wb").write(a + b"\0")
    capsys.readouterr()
    evaluate(cfg, eval_dir=eval_dir)
    out = capsys.readouterr().out
    assert "was made for another data; rebuilding it" in out and "reusing all" not in out


def test_another_folder_with_the_same_names_rebuilds_the_cache(on_a_folder, tmp_path, capsys):
    _, eval_dir, data, overrides = on_a_folder
    other = str(tmp_path / "elsewhere")
    shutil.copytree(data, other)  # same names, same sizes and times (copy2): only the root differs
    capsys.readouterr()
    evaluate(load_config(None, [*overrides, f"data.path={other}"]), eval_dir=eval_dir)
    out = capsys.readouterr().out
    assert "was made for another data; rebuilding it" in out and "reusing all" not in out


def test_a_block_copied_from_another_cache_of_the_same_shape_is_extracted_again(on_a_folder, capsys):
    cfg, eval_dir, data, overrides = on_a_folder
    with_random = load_config(None, [*overrides, f"data.path={data}", "eval.compare_random_init=true"])
    evaluate(with_random, eval_dir=eval_dir)  # a second cache of the same shape: the random trunk's
    features = os.path.join(eval_dir, "features")
    for path in glob.glob(os.path.join(features, "random_init", "train", "block_00001.*")):
        shutil.copy(path, os.path.join(features, "pretrained", "train", os.path.basename(path)))
    capsys.readouterr()
    evaluate(cfg, eval_dir=eval_dir)
    out = capsys.readouterr().out
    assert "train block 1 was made for another cache (its fingerprint differs); extracting it again" in out
    assert "extracting 1 of" in out


def test_a_cache_of_the_previous_format_is_rebuilt(on_a_folder, capsys):
    cfg, eval_dir, _, _ = on_a_folder
    folder = os.path.join(eval_dir, "features", "pretrained")
    path = os.path.join(folder, "fingerprint.json")
    saved = json.load(open(path))
    saved["parts"]["format"] = 1  # as the older version wrote it: names only, blocks without a fingerprint
    del saved["parts"]["data"]["root"]
    saved["fingerprint"] = "0" * 64
    json.dump(saved, open(path, "w"))
    for marker in glob.glob(os.path.join(folder, "*", "block_*.json")):
        block = json.load(open(marker))
        del block["fingerprint"]
        json.dump(block, open(marker, "w"))
    capsys.readouterr()
    evaluate(cfg, eval_dir=eval_dir)
    out = capsys.readouterr().out
    assert "was made for another data, format; rebuilding it" in out and "reusing all" not in out
