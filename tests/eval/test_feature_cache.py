"""The feature cache: reuse, rebuild on another fingerprint, corrupt blocks, a stop mid-extraction that a
rerun finishes, and a 2-rank extraction equal to a 1-rank one (reuse and ranks on Fashion-MNIST, the rest on
the smaller digits)."""
import glob
import os
import signal

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data_pipelines.sources import ClassMismatch
from sslscale.cli import main
from sslscale.config import load_config
from sslscale.eval import extract
from sslscale.eval.run import evaluate, evaluate_run
from sslscale.train.loop import pretrain
from sslscale.train.stop_signals import StoppedForRequeue
from tests.conftest import fail_on_our_deprecations, tiny_overrides
from tests.dist.test_distributed import free_port

# 600 train + 300 val digits in blocks of 128 rows: 5 + 3 blocks per trunk.
EVAL = ["train.max_steps=2", "eval.train_images=600", "eval.cache.block_rows=128", "eval.linear.epochs=2",
        "eval.compare_random_init=false", "eval.batch_size=100"]


@pytest.fixture
def trained(tmp_path):
    overrides = tiny_overrides(tmp_path / "runs", *EVAL)
    cfg = load_config(None, overrides)
    pretrain(cfg)
    return cfg, overrides


# The same on Fashion-MNIST: 600 train and 300 val (test) images in blocks of 128 rows.
FASHION_MNIST = ["data.source=fashion_mnist", "eval.val_images=300"]


@pytest.fixture
def trained_on_fashion_mnist(tmp_path):
    overrides = tiny_overrides(tmp_path / "runs", *EVAL, *FASHION_MNIST)
    cfg = load_config(None, overrides)
    pretrain(cfg)
    return cfg, overrides


def block_files(eval_dir, name="pretrained"):
    return sorted(glob.glob(os.path.join(eval_dir, "features", name, "*", "block_*.trunk.npy")))


def cached(eval_dir, split, name="pretrained"):
    files = sorted(glob.glob(os.path.join(eval_dir, "features", name, split, "block_*.trunk.npy")))
    return np.concatenate([np.load(f) for f in files])


def test_a_second_evaluation_reuses_the_cache_and_a_changed_input_rebuilds_it(trained_on_fashion_mnist, capsys,
                                                                              monkeypatch):
    cfg, overrides = trained_on_fashion_mnist
    images_through_the_trunk = []
    real_extract_blocks = extract.extract_blocks

    def counting_extract_blocks(taps, source, split, split_dir, blocks, *args, **kwargs):
        images_through_the_trunk.append(len(blocks))
        return real_extract_blocks(taps, source, split, split_dir, blocks, *args, **kwargs)
    monkeypatch.setattr(extract, "extract_blocks", counting_extract_blocks)

    first = evaluate_run(cfg)
    assert "extracting 8 of 8 blocks" in capsys.readouterr().out
    files = block_files(os.path.join(cfg.run_dir, "eval"))
    assert len(files) == 8 and images_through_the_trunk
    stamps = [os.stat(f).st_mtime_ns for f in files]
    images_through_the_trunk.clear()
    second = evaluate_run(cfg)
    assert "reusing all 8 blocks" in capsys.readouterr().out
    # Faster by construction: no image is loaded or goes through the trunk, and nothing is written again.
    assert not images_through_the_trunk
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
    assert second["results"] == first["results"]
    evaluate_run(load_config(None, [*overrides, "eval.train_images=500"]))
    out = capsys.readouterr().out
    assert "was made for another data; rebuilding it" in out and "extracting 7 of 7 blocks" in out
    evaluate_run(load_config(None, [*overrides, "eval.train_images=500", "eval.recompute_bn_stats=false"]))
    assert "was made for another transform; rebuilding it" in capsys.readouterr().out


def test_corrupt_and_truncated_blocks_are_extracted_again(trained, capsys):
    cfg, _ = trained
    evaluate_run(cfg)
    eval_dir = os.path.join(cfg.run_dir, "eval")
    good = cached(eval_dir, "train")
    files = block_files(eval_dir)
    with open(files[1], "r+b") as f:  # same size, other bytes: only the checksum can tell
        f.seek(-64, os.SEEK_END)
        f.write(bytes(64))
    with open(files[2], "r+b") as f:
        f.truncate(os.path.getsize(files[2]) // 2)
    capsys.readouterr()
    evaluate_run(cfg)
    out = capsys.readouterr().out
    assert "train block 1 trunk: checksum differs (corrupt file); extracting it again" in out
    assert "train block 2 trunk: unreadable" in out and "extracting 2 of 8 blocks" in out
    assert np.array_equal(cached(eval_dir, "train"), good)


class StopAfterFirstBatches:
    """StopSignals stand-in: a SIGUSR2 'arrives' after the extraction's second batch."""

    def __init__(self, *args, **kwargs):
        self.checks, self.all_received = 0, {signal.SIGUSR2}

    @property
    def received(self):
        self.checks += 1
        return signal.SIGUSR2 if self.checks >= 2 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_stop_during_extraction_keeps_finished_blocks_and_the_rerun_does_the_rest(trained, capsys, monkeypatch):
    cfg, _ = trained
    monkeypatch.setattr("sslscale.eval.run.StopSignals", StopAfterFirstBatches)
    with pytest.raises(StoppedForRequeue, match="1 of 5 train blocks of this rank are saved"):
        evaluate_run(cfg)
    eval_dir = os.path.join(cfg.run_dir, "eval")
    assert len(block_files(eval_dir)) == 1  # 200 rows read: block 0 complete, block 1 abandoned
    assert not glob.glob(os.path.join(eval_dir, "features", "*", "*", "*.tmp*"))
    monkeypatch.undo()
    capsys.readouterr()
    evaluate_run(cfg)
    assert "extracting 7 of 8 blocks on 1 rank(s), reusing 1" in capsys.readouterr().out


def _rank_eval(rank, world, port, overrides, eval_dir):
    fail_on_our_deprecations()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    report = evaluate(load_config(None, overrides), eval_dir=eval_dir)
    assert (report is None) == (rank != 0)


@pytest.mark.slow
def test_two_rank_extraction_equals_one_rank(trained_on_fashion_mnist):
    cfg, overrides = trained_on_fashion_mnist
    overrides = [*overrides, "eval.compare_random_init=true"]
    one, two = str(cfg.run_dir) + "/eval-1", str(cfg.run_dir) + "/eval-2"
    torch.set_num_threads(1)
    evaluate(load_config(None, overrides), eval_dir=one)
    mp.start_processes(_rank_eval, args=(2, free_port(), overrides, two), nprocs=2, join=True, start_method="spawn")
    assert os.path.exists(os.path.join(two, "linear.json"))
    for name in ("pretrained", "random_init"):
        for split in ("train", "val"):
            a, b = cached(one, split, name).astype(np.float32), cached(two, split, name).astype(np.float32)
            assert a.shape == b.shape == (600 if split == "train" else 300, 64)
            # Up to fp16 rounding: one unit in the last place of an fp16 value.
            assert np.all(np.abs(a - b) <= np.maximum(np.abs(a), 2 ** -14) * 2 ** -10), (name, split)
            print(f"{name} {split}: {np.count_nonzero(a != b)} of {a.size} values differ, by at most "
                  f"{np.abs(a - b).max():.2g}")
            labels = [np.concatenate([np.load(f) for f in sorted(glob.glob(os.path.join(d, "features", name, split,
                                                                                     "block_*.labels.npy")))])
                      for d in (one, two)]
            assert np.array_equal(*labels)


def test_val_classes_that_differ_from_train_are_refused(tmp_path):
    dest = str(tmp_path / "digits")
    assert main(["prepare-data", "digits", dest, "--limit", "40"]) == 0
    os.rename(os.path.join(dest, "val", "9"), os.path.join(dest, "val", "nine"))
    cfg = load_config(None, tiny_overrides(tmp_path, "data.source=folder", f"data.path={dest}"))
    with pytest.raises(ClassMismatch, match=r"val does not have the train split's class folders \(missing 9; "
                                            r"extra nine\)"):
        evaluate_run(cfg)


def test_linear_eval_and_knn_of_an_exported_trunk_file(trained, tmp_path, capsys):
    cfg, overrides = trained
    out = str(tmp_path / "trunk.pt")
    assert main(["export", cfg.run_dir, out]) == 0
    assert main(["linear-eval", out, *EVAL]) == 2
    assert "give --config CONFIG" in capsys.readouterr().err
    config = os.path.join(cfg.run_dir, "config.yaml")
    assert main(["knn", out, "--config", config, "eval.compare_random_init=false"]) == 0
    printed = capsys.readouterr().out
    assert "knn (k = 200)" in printed and "linear " not in printed
    assert os.path.exists(str(tmp_path / "trunk_eval" / "knn.json"))
    assert main(["linear-eval", out, "--config", config]) == 0
    assert "reusing all 8 blocks" in capsys.readouterr().out  # the kNN run's cache serves the linear probe
    # The file's features are the run's own.
    evaluate_run(cfg)
    assert np.array_equal(cached(str(tmp_path / "trunk_eval"), "train", "trunk_file"),
                          cached(os.path.join(cfg.run_dir, "eval"), "train"))


@pytest.mark.slow
def test_an_fsdp_checkpoint_is_evaluated_like_a_ddp_one(tmp_path):
    """Sharded (DCP) checkpoints consolidate in the evaluating process: the cached features are those of the
    trunk `export` writes from the same shards."""
    from tests.dist.test_distributed import run_world
    overrides = tiny_overrides(tmp_path, *EVAL, "dist.strategy=fsdp")
    run_world(2, overrides)
    cfg = load_config(None, overrides)
    report = evaluate_run(cfg)
    assert report["checkpoint"] == "step_000000002" and report["results"]["pretrained"]["rankme"]["n"] == 600
    out = str(tmp_path / "trunk.pt")
    assert main(["export", cfg.run_dir, out]) == 0
    assert main(["knn", out, "--config", os.path.join(cfg.run_dir, "config.yaml")]) == 0
    assert np.array_equal(cached(str(tmp_path / "trunk_eval"), "train", "trunk_file"),
                          cached(os.path.join(cfg.run_dir, "eval"), "train"))


def test_a_checkpoint_without_a_trunk_is_a_clear_error(trained):
    from sslscale.checkpoint.store import Checkpointer
    from sslscale.checkpoint.trunk_file import TrunkFileError
    cfg, _ = trained
    from sslscale.checkpoint.integrity import MARKER, file_records, marker_text
    folder = Checkpointer(cfg.run_dir, 2).path("step_000000002")
    path = os.path.join(folder, "state.pt")
    state = torch.load(path, weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("encoder.")}
    torch.save(state, path)
    with open(os.path.join(folder, MARKER), "w") as f:  # written so, not damaged: its checksums agree
        f.write(marker_text(2, 0.0, file_records(folder)))
    with pytest.raises(TrunkFileError, match="checkpoint step_000000002 of .* has no trunk"):
        evaluate_run(cfg)
    assert main(["export", cfg.run_dir, os.path.join(cfg.run_dir, "t.pt")]) == 2
