"""Bad inputs that once gave a traceback, a kernel kill or silence: each is refused with one clear message."""
import os
import time

import pytest

from sslscale.cli import main
from sslscale.config import ConfigError, load_config, load_yaml
from tests.conftest import REPO

QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")


def refused(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    return err


def test_a_config_path_that_is_a_folder_or_binary_is_refused(tmp_path, capsys):
    refused(capsys, ["plan", str(tmp_path), "--dataset-size", "10"], "is a folder")
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    refused(capsys, ["plan", str(binary), "--dataset-size", "10"], "not a text file")


def test_non_finite_numbers_are_refused(tmp_path):
    for value in (".inf", "-.inf", ".nan", "inf"):
        with pytest.raises(ConfigError, match="not a finite number"):
            load_config(QUICKSTART, [f"train.epochs={value}"])
    (tmp_path / "c.yaml").write_text("optim:\n  base_lr: .nan\n")
    with pytest.raises(ConfigError, match="optim.base_lr: .*not a finite number"):
        load_config(str(tmp_path / "c.yaml"))


def test_a_yaml_alias_bomb_and_a_huge_file_are_refused_at_once(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        load_config(str(tmp_path / "bomb.yaml"))
    assert time.perf_counter() - start < 1
    (tmp_path / "big.yaml").write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="bytes; a config is at most"):
        load_config(str(tmp_path / "big.yaml"))
    assert load_yaml("a: &t {b: 1}\nc: *t\n", "x") == {"a": {"b": 1}, "c": {"b": 1}}  # a few aliases stay allowed


def test_a_run_that_would_train_no_step_is_refused(tmp_path, capsys):
    from tests.conftest import tiny_overrides
    refused(capsys, ["pretrain", QUICKSTART, *tiny_overrides(tmp_path), "train.epochs=1e-9", "optim.warmup_epochs=0"],
            "train.epochs", "at least one step")
    assert not os.path.exists(os.path.join(tmp_path, "tiny", "config.yaml"))


def test_fp16_on_a_cpu_is_refused_with_the_reason(tmp_path, capsys):
    from tests.conftest import tiny_overrides
    refused(capsys, ["pretrain", QUICKSTART, *tiny_overrides(tmp_path), "train.precision=fp16"],
            "train.precision: fp16 on a CPU", "slower")


def test_submit_without_slurm_tools_touches_nothing(tmp_path, monkeypatch, capsys):
    from launch import submit
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("kept: true\n")
    args = [QUICKSTART, f"run.root={tmp_path / 'runs'}", "run.name=tiny", "slurm.cluster=slurm", "--force-new"]
    assert submit.main(args) == 2
    err = capsys.readouterr().err
    assert "sbatch" in err and "not found on PATH" in err and "Traceback" not in err
    assert (run_dir / "config.yaml").read_text() == "kept: true\n"  # not moved away by --force-new


def one_line(capsys, argv, *words):
    err = refused(capsys, argv, *words)
    assert err.strip().count("\n") == 0, err
    return err


def test_an_evaluation_folder_in_use_is_one_line_that_does_not_blame_the_config(tmp_path, capsys):
    import shutil

    from sslscale.checkpoint.lock import FolderLock
    shutil.copytree(os.path.join(REPO, "tests", "fixtures", "checkpoints_1992474", "ddp"), tmp_path / "ddp")
    run_dir = str(tmp_path / "ddp" / "tiny")
    with FolderLock(os.path.join(run_dir, "eval"), "evaluation"):
        err = one_line(capsys, ["linear-eval", run_dir], "in use by another process (evaluation")
    assert "invalid config" not in err and "run.name" not in err


def test_a_pretraining_refused_for_a_step_that_cannot_fit_leaves_no_run_folder(tiny_config):
    from sslscale.cost.step_memory import StepDoesNotFit
    from sslscale.train.loop import pretrain
    cfg = tiny_config("data.crops=[{size: 4000, count: 2}]")
    with pytest.raises(StepDoesNotFit):
        pretrain(cfg)
    assert not os.path.exists(cfg.run_dir)


@pytest.mark.slow  # two short trainings: about 15 s on 2 cores
def test_the_batch_size_guard_holds_without_config_yaml(tiny_config):
    from sslscale.checkpoint.store import CheckpointMismatch
    from sslscale.train.loop import pretrain
    cfg = tiny_config("train.max_steps=2", "eval.after_pretrain=false")
    pretrain(cfg)
    os.remove(os.path.join(cfg.run_dir, "config.yaml"))
    with pytest.raises(CheckpointMismatch, match=r"data.batch_size: 32 -> 16 cannot change when resuming"):
        pretrain(tiny_config("train.max_steps=4", "eval.after_pretrain=false", "data.batch_size=16"))


def test_prepare_data_onto_a_file_or_with_a_negative_limit_is_refused(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line(capsys, ["prepare-data", "digits", str(a_file)], "is a file")
    one_line(capsys, ["prepare-data", "digits", str(tmp_path / "d"), "--limit", "-5"], "--limit -5: must be >= 1")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_preview_with_a_negative_step_or_a_huge_grid_is_refused_at_once(tmp_path, capsys):
    out = str(tmp_path / "crops.png")
    one_line(capsys, ["preview", QUICKSTART, out, "--sample-photos", "--step", "-3"], "--step -3: must be >= 0")
    started = time.monotonic()
    one_line(capsys, ["preview", QUICKSTART, out, "--sample-photos", "--images", "100000000"], "at most 256")
    assert time.monotonic() - started < 5
    assert not os.listdir(tmp_path)
