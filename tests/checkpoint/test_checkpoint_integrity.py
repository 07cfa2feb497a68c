"""Damaged, incomplete or planted checkpoints: never loaded silently, never run, always a fallback or one
clear line. Two small runs are made once (an unsharded one, and a sharded one on 2 gloo ranks, each
with checkpoints at steps 2 and 4); every test damages a copy."""
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from sslscale.checkpoint.integrity import MARKER, file_records
from sslscale.checkpoint.store import Checkpointer
from sslscale.cli import main
from sslscale.config import load_config
from sslscale.train.loop import pretrain
from tests.conftest import REPO, tiny_overrides
from tests.dist.test_distributed import run_world

STEP_2, STEP_4 = Checkpointer.name(2), Checkpointer.name(4)
# Every test here reads the checkpoints of one module fixture that trains several runs (~50 s to build).
pytestmark = pytest.mark.slow

COMMON = ["train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=2", "optim.name=sgd",
          "optim.warmup_epochs=0"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("made")
    pretrain(load_config(None, tiny_overrides(root / "ddp", *COMMON)))
    run_world(2, tiny_overrides(root / "fsdp", *COMMON, "dist.strategy=fsdp", "dist.timeout_s=120"))
    return root


def copy_of(made, tmp_path, kind):
    """(a fresh copy of the made run of `kind`, the overrides that resume it)."""
    shutil.copytree(made / kind, tmp_path / kind)
    extra = ["dist.strategy=fsdp"] if kind == "fsdp" else []
    return str(tmp_path / kind / "tiny"), tiny_overrides(tmp_path / kind, *COMMON, *extra)


def ckpt(run_dir, name):
    return os.path.join(run_dir, "ckpt", name)


def flip_bit_in_tensor_data(path):
    """One bit in the middle of the largest tensor of a torch zip file (stored uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def flip_bit(path):
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2)
        byte = f.read(1)[0]
        f.seek(size // 2)
        f.write(bytes([byte ^ 0x10]))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)


def rehash(folder):
    """What someone who can write the folder can do as well: record checksums of the files as they now are."""
    with open(os.path.join(folder, MARKER)) as f:
        marker = json.load(f)
    marker["files"] = file_records(folder)
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(marker, f)


def strip_checksums(folder):
    """A marker as written before checksums were recorded."""
    with open(os.path.join(folder, MARKER)) as f:
        marker = json.load(f)
    marker.pop("files", None)
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(marker, f)


def largest_shard(folder):
    return max((os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".distcp")), key=os.path.getsize)


def resume(overrides, capsys, steps=6):
    pretrain(load_config(None, [*overrides, f"train.max_steps={steps}"]))
    return capsys.readouterr().out


def assert_fell_back(out, run_dir, problem):
    lines = [line for line in out.splitlines() if line.startswith(f"checkpoint {STEP_4} is unusable")]
    assert len(lines) == 1 and problem in lines[0] and "set aside as ckpt/unusable-step_000000004" in lines[0], out
    assert f"resumed {run_dir} from {STEP_2} (step 2)" in out
    assert os.path.isdir(ckpt(run_dir, "unusable-" + STEP_4))
    assert Checkpointer(run_dir, 2).complete() == [STEP_4, Checkpointer.name(6)]  # step 4 redone, set aside kept


def test_a_bit_flip_in_the_tensor_data_of_state_pt_falls_back_and_sets_the_checkpoint_aside(made, tmp_path, capsys):
    run_dir, overrides = copy_of(made, tmp_path, "ddp")
    flip_bit_in_tensor_data(os.path.join(ckpt(run_dir, STEP_4), "state.pt"))
    out = resume(overrides, capsys)
    assert_fell_back(out, run_dir, "state.pt does not match its sha256")


def test_a_checkpoint_that_lacks_a_part_falls_back(made, tmp_path, capsys):
    run_dir, overrides = copy_of(made, tmp_path, "ddp")
    path = os.path.join(ckpt(run_dir, STEP_4), "state.pt")
    state = torch.load(path, weights_only=True)
    del state["progress"]
    torch.save(state, path)
    rehash(ckpt(run_dir, STEP_4))  # written so by a bug, not damaged after: the checksums match
    out = resume(overrides, capsys)
    assert_fell_back(out, run_dir, "it lacks progress")


DAMAGES = {"truncated": truncate, "deleted": os.remove, "flipped": flip_bit}
SHARD_CASES = [("truncated", True, "has"), ("deleted", True, "is missing"), ("flipped", True, "sha256"),
               # an old marker: the DCP loader itself meets the damage, and its error leads to the fallback
               ("truncated", False, "DCP files cannot be read"), ("deleted", False, "DCP files cannot be read")]


@pytest.mark.parametrize("damage, checksums, problem", SHARD_CASES)
def test_a_damaged_shard_falls_back_in_a_one_process_resume(made, tmp_path, capsys, damage, checksums, problem):
    run_dir, overrides = copy_of(made, tmp_path, "fsdp")
    if not checksums:
        strip_checksums(ckpt(run_dir, STEP_4))
    DAMAGES[damage](largest_shard(ckpt(run_dir, STEP_4)))
    out = resume(overrides, capsys)
    assert_fell_back(out, run_dir, problem)


@pytest.mark.parametrize("damage, checksums, problem", SHARD_CASES)
def test_export_of_a_run_with_a_damaged_shard_uses_the_previous_checkpoint(made, tmp_path, capsys, caplog, damage,
                                                                           checksums, problem):
    run_dir, _ = copy_of(made, tmp_path, "fsdp")
    if not checksums:
        strip_checksums(ckpt(run_dir, STEP_4))
    DAMAGES[damage](largest_shard(ckpt(run_dir, STEP_4)))
    with caplog.at_level(logging.WARNING):
        assert main(["export", run_dir, str(tmp_path / "trunk.pt")]) == 0
    assert f"trunk of {STEP_2}" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"checkpoint {STEP_4} is unusable" in warnings[0] and problem in warnings[0]
    assert "\n" not in warnings[0]
    assert os.path.isdir(ckpt(run_dir, STEP_4))  # a reader leaves the folder as it is


@pytest.mark.parametrize("checksums", [True, False])
def test_a_two_rank_fsdp_resume_past_a_damaged_shard(made, tmp_path, checksums):
    """Rank 0 checks the checksums for all; without them, DCP's error on the rank that reads the shard
    must make both ranks fall back to the same checkpoint (else they would hang or diverge)."""
    run_dir, overrides = copy_of(made, tmp_path, "fsdp")
    if not checksums:
        strip_checksums(ckpt(run_dir, STEP_4))
    truncate(os.path.join(ckpt(run_dir, STEP_4), "__1_0.distcp"))  # a shard that rank 1 reads
    run_world(2, [*overrides, "train.max_steps=6", "dist.timeout_s=120"])
    assert os.path.isdir(ckpt(run_dir, "unusable-" + STEP_4))
    # both ranks went on from step 2 together (a rank that diverged would hang or fail the run)
    assert Checkpointer(run_dir, 2).complete() == [STEP_4, Checkpointer.name(6)]
    assert Checkpointer(run_dir, 2).load_latest()[0]["progress"]["step"] == 6


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sslscale.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}, timeout=300)


def test_when_every_checkpoint_is_bad_export_and_pretrain_say_so_in_one_line(made, tmp_path):
    run_dir, overrides = copy_of(made, tmp_path, "ddp")
    for name in (STEP_2, STEP_4):
        flip_bit_in_tensor_data(os.path.join(ckpt(run_dir, name), "state.pt"))
    export = run_cli("export", run_dir, str(tmp_path / "trunk.pt"))
    pretrain_run = run_cli("pretrain", os.path.join(run_dir, "config.yaml"), *overrides,
                           "train.max_steps=6", "eval.after_pretrain=false")
    for result in (export, pretrain_run):
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"no usable checkpoint in {run_dir}/ckpt: 2 tried" in errors[0]
        assert "run.name" in errors[0] and "good copy" in errors[0]
    assert not Checkpointer(run_dir, 2).complete()  # the trainer set both aside
    # A rerun (or a requeue) finds only the set-aside ones: the run was trained, so it must not start over silently.
    again = run_cli("pretrain", os.path.join(run_dir, "config.yaml"), *overrides, "train.max_steps=6",
                    "eval.after_pretrain=false")
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert "set aside as unusable by an earlier attempt (unusable-step_000000002, unusable-step_000000004)" in \
        again.stderr and "run.name" in again.stderr
    assert not Checkpointer(run_dir, 2).complete()


def test_verify_names_each_checkpoint_and_fails_when_the_newest_is_bad(made, tmp_path, capsys):
    run_dir, _ = copy_of(made, tmp_path, "fsdp")
    assert main(["verify", run_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [[STEP_4, "ok"], [STEP_2, "ok"]]
    flip_bit(largest_shard(ckpt(run_dir, STEP_2)))
    assert main(["verify", run_dir]) == 0  # a bad older one is named, but a resume would not reach it
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"{STEP_2}  BAD") and "does not match its sha256" in lines[1]
    os.remove(os.path.join(ckpt(run_dir, STEP_4), "extra.pt"))
    assert main(["verify", run_dir]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"{STEP_4}  BAD  extra.pt is missing"
    strip_checksums(ckpt(run_dir, STEP_2))
    shutil.rmtree(ckpt(run_dir, STEP_4))
    assert main(["verify", run_dir]) == 0
    assert capsys.readouterr().out.startswith(f"{STEP_2}  ok?  files present; written before checksums")


def test_a_checkpoint_from_before_checksums_and_plain_rng_state_still_resumes(made, tmp_path, capsys):
    import numpy as np
    run_dir, overrides = copy_of(made, tmp_path, "ddp")
    path = os.path.join(ckpt(run_dir, STEP_4), "state.pt")
    state = torch.load(path, weights_only=True)
    for rng in state["rng"]:  # NumPy's state as the array older versions stored
        kind, keys, *rest = rng["numpy"]
        rng["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), *rest)
    torch.save(state, path)
    strip_checksums(ckpt(run_dir, STEP_4))
    out = resume(overrides, capsys)
    assert f"resumed {run_dir} from {STEP_4} (step 4)" in out and "unusable" not in out, out


class Payload:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_in_torch_file(path, marker, key="progress"):
    state = torch.load(path, weights_only=True)
    state[key] = {"step": Payload(marker)}
    torch.save(state, path)


@pytest.mark.parametrize("kind, file", [("ddp", "state.pt"), ("fsdp", "extra.pt"), ("fsdp", ".metadata")])
def test_a_planted_pickle_in_a_checkpoint_never_runs_and_the_resume_falls_back(made, tmp_path, capsys, kind, file):
    run_dir, overrides = copy_of(made, tmp_path, kind)
    marker = tmp_path / "payload_ran"
    folder = ckpt(run_dir, STEP_4)
    if file == ".metadata":
        with open(os.path.join(folder, file), "rb") as f:
            metadata = pickle.load(f)  # the test's own, trusted file
        metadata.planner_data["payload"] = Payload(marker)
        with open(os.path.join(folder, file), "wb") as f:
            pickle.dump(metadata, f)
    else:
        plant_in_torch_file(os.path.join(folder, file), marker)
    rehash(folder)  # whoever plants it can rewrite the marker too
    out = resume(overrides, capsys)
    assert not marker.exists()
    assert_fell_back(out, run_dir, "refused")


def test_a_planted_pickle_in_a_checkpoint_never_runs_in_export(made, tmp_path, caplog):
    run_dir, _ = copy_of(made, tmp_path, "fsdp")
    marker = tmp_path / "payload_ran"
    folder = ckpt(run_dir, STEP_4)
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        metadata = pickle.load(f)
    metadata.planner_data["payload"] = Payload(marker)
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    rehash(folder)
    with caplog.at_level(logging.WARNING):
        assert main(["export", run_dir, str(tmp_path / "trunk.pt")]) == 0
    assert not marker.exists()
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_a_planted_pickle_in_a_trunk_file_never_runs(made, tmp_path):
    from sslscale.checkpoint.trunk_file import TrunkFileError, read_trunk_file
    run_dir, _ = copy_of(made, tmp_path, "ddp")
    out = str(tmp_path / "trunk.pt")
    assert main(["export", run_dir, out]) == 0
    marker = tmp_path / "payload_ran"
    plant_in_torch_file(out, marker, key="conv1.weight")
    with pytest.raises(TrunkFileError, match="cannot be loaded: it names .*system, which no trunk file holds; "
                                             r"refused unrun \(it could run code\)$"):
        read_trunk_file(out)
    assert not marker.exists()
