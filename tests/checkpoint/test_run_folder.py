"""The folder is the run: moved and copied run folders, one live process per folder, what a resume may change."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from sslscale.checkpoint.lock import FolderInUse, FolderLock
from sslscale.checkpoint.run_folder import load_run_config
from sslscale.config import ConfigError, load_config
from sslscale.train.loop import pretrain
from tests.conftest import REPO, tiny_overrides

EVAL = ["eval.compare_random_init=false", "eval.knn.enabled=false", "eval.train_images=200", "eval.linear.epochs=1"]


def cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sslscale.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_a_moved_or_copied_run_folder_is_evaluated_and_exported_where_it_is(tiny_config, tmp_path):
    original = tiny_config("train.max_steps=2")
    pretrain(original)
    copy = tmp_path / "elsewhere" / "my-copy"
    shutil.copytree(original.run_dir, copy)
    # From another working folder, by a relative path: the copy is the run, not what its config.yaml names.
    done = cli("linear-eval", os.path.relpath(copy, tmp_path), *EVAL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (copy / "eval" / "linear.json").exists()
    assert not os.path.exists(os.path.join(original.run_dir, "eval"))
    done = cli("export", str(copy), str(tmp_path / "trunk.pt"))
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = load_run_config(str(copy))
    assert cfg.run_dir == str(copy) and cfg.run.name == "my-copy"


@pytest.mark.slow
def test_one_live_process_per_run_folder(tiny_config):
    cfg = tiny_config("train.max_steps=2")
    os.makedirs(cfg.run_dir)
    with FolderLock(cfg.run_dir, "pretraining"):
        with pytest.raises(FolderInUse, match=r"is in use by another process \(pretraining, pid \d+"):
            pretrain(cfg)
        with pytest.raises(FolderInUse, match="in use"):
            with FolderLock(cfg.run_dir, "pretraining"):
                pass
    assert pretrain(cfg) is not None  # released: the run goes ahead
    eval_dir = os.path.join(cfg.run_dir, "eval")
    with FolderLock(eval_dir, "evaluation"):
        done = cli("linear-eval", cfg.run_dir, *EVAL)
    assert done.returncode == 2 and "in use by another process (evaluation" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from sslscale.checkpoint.lock import FolderLock;"
                               "lock = FolderLock(sys.argv[2], 'pretraining').__enter__(); print('held', flush=True);"
                               "time.sleep(60)", REPO, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
            FolderLock(str(tmp_path), "pretraining").__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(str(tmp_path), "pretraining"):  # the kernel dropped the dead holder's lock
        pass


@pytest.mark.parametrize("change, reason", [("data.batch_size=16", "counted in steps of this global batch"),
                                            ("run.seed=1", "data order")])
def test_resuming_with_another_batch_size_or_seed_is_refused_with_the_reason(tiny_config, change, reason):
    pretrain(tiny_config("train.max_steps=2"))
    with pytest.raises(ConfigError, match=reason) as refused:
        pretrain(tiny_config("train.max_steps=4", change))
    assert change.split("=")[0] in str(refused.value) and "cannot change when resuming" in str(refused.value)


def test_a_resume_names_every_changed_setting_and_keeps_the_config_it_replaces(tiny_config, capsys):
    first = tiny_config("train.max_steps=2")
    pretrain(first)
    capsys.readouterr()
    pretrain(tiny_config("train.max_steps=4", "train.log_every_steps=2"))
    out = capsys.readouterr().out
    assert "2 changed setting(s)" in out
    assert "train.max_steps: 2 -> 4" in out and "train.log_every_steps: 1 -> 2" in out
    kept = [f for f in os.listdir(first.run_dir) if f.startswith("config.replaced-")]
    assert len(kept) == 1
    with open(os.path.join(first.run_dir, kept[0])) as f:
        assert yaml.safe_load(f)["train"]["max_steps"] == 2
    assert load_config(os.path.join(first.run_dir, "config.yaml")).train.max_steps == 4
    capsys.readouterr()
    pretrain(tiny_config("train.max_steps=4", "train.log_every_steps=2"))  # the same again: nothing to report
    assert "changed setting" not in capsys.readouterr().out
    assert len([f for f in os.listdir(first.run_dir) if f.startswith("config.replaced-")]) == 1


def test_the_same_folder_given_by_a_relative_root_is_no_change(tiny_config, tmp_path, monkeypatch, capsys):
    pretrain(tiny_config("train.max_steps=2"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    pretrain(load_config(None, tiny_overrides("runs", "train.max_steps=2")))
    assert "changed setting" not in capsys.readouterr().out


def test_submitting_a_resume_with_another_batch_size_is_refused_before_anything_is_queued(tmp_path, capsys):
    from launch.submit import main as submit_main
    from sslscale.checkpoint.run_folder import dump_config
    quickstart = os.path.join(REPO, "configs", "quickstart.yaml")
    saved = load_config(quickstart, tiny_overrides(tmp_path))
    os.makedirs(saved.run_dir)
    dump_config(saved, os.path.join(saved.run_dir, "config.yaml"))
    assert submit_main([quickstart, *tiny_overrides(tmp_path), "data.batch_size=16", "--cluster", "local",
                        "--dry-run"]) == 2
    assert "data.batch_size: 32 -> 16 cannot change when resuming" in capsys.readouterr().err
