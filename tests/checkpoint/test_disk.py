"""Full and read-only disks: found by the preflight, or at a save that then cleans up and stops with one line."""
import errno
import os
import subprocess

import pytest
import torch

from sslscale.checkpoint import store as checkpoint_module
from sslscale.checkpoint.disk import EXIT_DISK_ERROR, DiskError, reason
from sslscale.checkpoint.store import Checkpointer
from sslscale.cli import main
from tests.conftest import REPO, tiny_overrides

QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a small tmpfs (a real device that fills up or is read-only); skips where mounting is not allowed."""
    mounted = []

    def mount(path, size_kib, *options):
        os.makedirs(path, exist_ok=True)
        opts = ",".join([f"size={size_kib}k", *options])
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)


def temp_leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp") or ".tmp" in n] if os.path.isdir(folder) else []


def fill(root):
    with open(os.path.join(root, "ballast"), "ab") as f:
        try:
            f.write(b"\0" * (8 << 20))
            f.flush()
        except OSError:
            pass


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_keeps_earlier_checkpoints(tmpfs, tmp_path, capsys):
    root = tmpfs(tmp_path / "disk", 6144)  # a checkpoint of the tiny model is 1.7 MB; keep=2 needs 3 at a time
    args = ["pretrain", QUICKSTART, *tiny_overrides(root), "train.max_steps=6", "eval.after_pretrain=false"]
    ckpt = os.path.join(root, "tiny", "ckpt")
    # Fill the disk once the first checkpoint is saved, so the second one cannot be written.
    original_commit = Checkpointer._commit

    def commit_then_fill(self, tmp, name, step):
        final = original_commit(self, tmp, name, step)
        fill(root)
        return final

    mp = pytest.MonkeyPatch()
    mp.setattr(Checkpointer, "_commit", commit_then_fill)
    try:
        assert main(args) == EXIT_DISK_ERROR
    finally:
        mp.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert "no space left" in err[-1] and "step_000000004" in err[-1] and "Traceback" not in err[-1]
    assert Checkpointer(os.path.join(root, "tiny"), 2).complete() == ["step_000000002"]  # kept, and complete
    assert temp_leftovers(ckpt) == [] and temp_leftovers(os.path.join(root, "tiny")) == []
    fill(root)  # what the failed save had taken is free again: take it too
    # The rerun on the still full disk is refused before any work, and leaves no temp file either.
    assert main(args) == EXIT_DISK_ERROR
    assert "no space left" in capsys.readouterr().err
    assert temp_leftovers(ckpt) == [] and temp_leftovers(os.path.join(root, "tiny")) == []
    os.remove(os.path.join(root, "ballast"))
    assert main(args) == 0  # space again: it resumes
    assert Checkpointer(os.path.join(root, "tiny"), 2).complete()[-1] == "step_000000006"


def test_a_read_only_checkpoint_folder_is_refused_before_any_work(tmpfs, tmp_path, capsys):
    root = tmp_path / "runs"
    tmpfs(root / "tiny" / "ckpt", 64, "ro")
    assert main(["pretrain", QUICKSTART, *tiny_overrides(root), "train.max_steps=2"]) == EXIT_DISK_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint folder" in err and "not writable" in err


def test_a_file_where_the_checkpoint_folder_should_be_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "ckpt").write_text("not a folder")
    assert main(["pretrain", QUICKSTART, *tiny_overrides(tmp_path / "runs"), "train.max_steps=2"]) == EXIT_DISK_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a file" in err and "ckpt" in err


def test_the_preflight_leaves_no_probe_file(tiny_config):
    from sslscale.train.preflight import preflight
    cfg = tiny_config()
    preflight(cfg, 1)
    assert os.listdir(os.path.join(cfg.run_dir, "ckpt")) == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     OSError(errno.EDQUOT, "Disk quota exceeded"),
                                     OSError(errno.EACCES, "Permission denied"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")])
@pytest.mark.parametrize("background", [False, True])
def test_a_failed_save_removes_its_temp_folder_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, failure,
                                                                                 background):
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(1, {"w": torch.zeros(3)})

    def failing_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise failure

    monkeypatch.setattr(checkpoint_module, "_save_file", failing_write)
    with pytest.raises(DiskError) as raised:
        ckpt.save(2, {"w": torch.ones(3)}, background=background)
        ckpt.finish_pending(wait=True)
    assert "step_000000002" in str(raised.value) and "\n" not in str(raised.value)
    assert ckpt.complete() == ["step_000000001"] and temp_leftovers(ckpt.dir) == []
    ckpt.verify("step_000000001")  # every file as its checksum says: the failed save touched none of it
    saved = torch.load(os.path.join(ckpt.path("step_000000001"), "state.pt"), weights_only=True)
    assert torch.equal(saved["w"], torch.zeros(3))


def test_other_failures_are_not_taken_for_the_disk(tmp_path):
    assert reason(ValueError("bad value"), str(tmp_path)) is None
    assert reason(RuntimeError("CUDA error: out of memory"), str(tmp_path)) is None
    assert reason(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path)).startswith("no space left")
