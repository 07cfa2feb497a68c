"""`sslscale bench` on the CPU (a smoke test of every measurement; the figures are not checked), and MFU."""
import glob
import json
import os
import tempfile

import pytest

from sslscale.cli import main
from sslscale.train import loop as train
from sslscale.train.monitor import Monitor
from tests.conftest import tiny_overrides


def test_bench_measures_the_step_the_data_and_both_together(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path / "runs", "train.check_every_steps=2")
    bench_folders = set(glob.glob(os.path.join(tempfile.gettempdir(), "sslscale-bench-*")))
    assert main(["bench", "configs/quickstart.yaml", *overrides, "--steps", "2", "--warmup", "1", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_name = {r["measurement"]: r for r in records}
    assert set(by_name) == {"step", "data", "end_to_end", "summary"}
    for name in ("step", "end_to_end"):
        r = by_name[name]
        assert r["images_per_s"] > 0 and r["crops_per_s"] == pytest.approx(2 * r["images_per_s"])
        assert set(r["host_seconds_per_step"]) == {"data", "forward", "backward", "optimizer", "logging"}
        assert r["train_step_flops_per_image"] > 0
        assert r["mfu"] is None and r["host_syncs_per_step"] is None  # no peak and no sync counter on a CPU
    assert set(by_name["data"]["host_seconds_per_step"]) == {"data"}
    stall = by_name["summary"]["data_stall_fraction"]
    assert stall == pytest.approx(1 - by_name["end_to_end"]["images_per_s"] / by_name["step"]["images_per_s"])
    assert not os.path.exists(tmp_path / "runs")  # the bench trains in a folder of its own
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "sslscale-bench-*"))) == bench_folders  # and removes it


def test_bench_prints_a_table_and_refuses_bad_flags(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path / "runs")
    assert main(["bench", "configs/quickstart.yaml", *overrides, "--steps", "1", "--warmup", "0",
                 "--only", "step"]) == 0
    out = capsys.readouterr().out
    assert "measurement" in out and "\nstep " in out and "data stall" not in out
    assert main(["bench", "configs/quickstart.yaml", "--only", "gpu"]) == 2
    assert "--only: gpu; valid: step, data, end_to_end" in capsys.readouterr().err


def test_mfu_is_the_achieved_share_of_the_devices_peak():
    monitor = Monitor("/nonexistent", end_step=10, samples_per_epoch=100, global_batch=10, log_every=5,
                      enabled=False)
    assert monitor.mfu(100.0) is None
    monitor.measure_mfu(flops_per_image=1e9, peak_flops_per_device=1e12, devices=2)
    assert monitor.mfu(500.0) == pytest.approx(500 * 1e9 / 2e12)


def test_the_training_console_shows_mfu_where_the_device_has_a_peak(tiny_config, capsys, monkeypatch):
    monkeypatch.setattr(train, "peak_flops", lambda device, precision, override=None: 1e9)
    train.pretrain(tiny_config("train.max_steps=2"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 2/2")]
    assert lines and " MFU " in lines[0]


def test_without_tensorboard_a_run_trains_logs_to_the_console_and_says_so_once(tiny_config, capsys, monkeypatch):
    import builtins

    from sslscale.train import monitor
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(monitor, "_warned_no_tensorboard", False)
    cfg = tiny_config("train.max_steps=2")
    train.pretrain(cfg)
    out = capsys.readouterr().out
    assert out.count("warning: no TensorBoard events") == 1
    assert "step 2/2" in out and os.path.exists(os.path.join(cfg.run_dir, "ckpt", "latest"))
    assert not glob.glob(os.path.join(cfg.run_dir, "tb", "events.*"))
