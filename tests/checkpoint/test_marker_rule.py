"""One rule for what a COMPLETE marker must vouch for, shared by `sslscale verify` and the loader: a marker with an
empty or damaged file list, without the parts its format needs, or naming a file outside the checkpoint folder
makes the checkpoint unusable (never "not checked"), and verify refuses what the loader would refuse. On copies
of the small committed checkpoints in tests/fixtures/ (one single-file, one sharded)."""
import json
import os
import shutil

import pytest
import torch

from sslscale.checkpoint import integrity
from sslscale.checkpoint.integrity import MARKER, CheckpointUnusable, file_records, find_problem
from sslscale.checkpoint.store import Checkpointer
from sslscale.cli import main
from tests.conftest import REPO

FIXTURES = os.path.join(REPO, "tests", "fixtures", "checkpoints_1992474")
STEP = Checkpointer.name(2)


@pytest.fixture
def run(tmp_path):
    def copy(kind):
        shutil.copytree(os.path.join(FIXTURES, kind), tmp_path / kind)
        run_dir = str(tmp_path / kind / "tiny")
        return run_dir, os.path.join(run_dir, "ckpt", STEP)
    return copy


def edit_marker(folder, change):
    path = os.path.join(folder, MARKER)
    with open(path) as f:
        marker = json.load(f)
    change(marker)
    with open(path, "w") as f:
        json.dump(marker, f)


def flip_bit(path, at=None):
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        at = size // 2 if at is None else at
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


def verify(run_dir, capsys):
    status = main(["verify", run_dir])
    return status, capsys.readouterr().out.splitlines()[0]


def test_the_fixtures_verify_and_load(run, capsys):
    for kind, files in (("ddp", 1), ("fsdp", 4)):
        run_dir, folder = run(kind)
        assert verify(run_dir, capsys) == (0, f"{STEP}  ok   {files} file(s) match their sha256")


def test_an_empty_file_list_vouches_for_nothing_and_a_flipped_state_pt_is_not_loaded(run, capsys):
    run_dir, folder = run("ddp")
    edit_marker(folder, lambda m: m.update(files={}))
    flip_bit(os.path.join(folder, "state.pt"))
    status, line = verify(run_dir, capsys)
    assert status == 1 and "BAD" in line and "file list is empty or unreadable" in line, line
    with pytest.raises(CheckpointUnusable, match="vouches for nothing"):
        Checkpointer(run_dir, keep=2).load_full(STEP)


def test_one_flipped_bit_in_the_files_key_makes_it_unusable_not_unchecked(run, capsys):
    run_dir, folder = run("ddp")
    path = os.path.join(folder, MARKER)
    text = open(path, "rb").read()
    flip_bit(path, text.index(b'"files"') + 4)  # "files" -> "filds"
    status, line = verify(run_dir, capsys)
    assert status == 1 and "BAD" in line and "unknown key(s) fil" in line and "ok?" not in line, line
    with pytest.raises(CheckpointUnusable, match="unknown key"):
        Checkpointer(run_dir, keep=2).load_full(STEP)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "sub/state.pt"])
def test_a_name_outside_the_folder_is_refused_and_never_opened(run, capsys, monkeypatch, name):
    run_dir, folder = run("ddp")
    opened = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path: opened.append(path) or real(path))
    edit_marker(folder, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
    status, line = verify(run_dir, capsys)
    assert status == 1 and "outside the checkpoint folder" in line, line
    assert not opened


def test_a_marker_without_the_parts_of_its_format_is_refused(run, capsys):
    run_dir, folder = run("fsdp")
    edit_marker(folder, lambda m: [m["files"].pop(n) for n in list(m["files"]) if n.endswith(".distcp")])
    assert "does not list any *.distcp shard" in find_problem(folder)
    run_dir, folder = run("ddp")
    edit_marker(folder, lambda m: m["files"].update({"other.pt": m["files"].pop("state.pt")}))
    assert "does not list state.pt" in find_problem(folder)


def test_a_file_the_marker_does_not_list_is_refused(run):
    _, folder = run("fsdp")
    shutil.copy(os.path.join(folder, "__0_0.distcp"), os.path.join(folder, "__2_0.distcp"))
    assert "__2_0.distcp in the folder but not in its COMPLETE marker" in find_problem(folder)


def test_verify_refuses_what_the_loader_refuses(run, capsys):
    run_dir, folder = run("ddp")
    path = os.path.join(folder, "state.pt")
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)
    edit_marker(folder, lambda m: m.update(files=file_records(folder)))  # checksums that match
    status, line = verify(run_dir, capsys)
    assert status == 1 and line == f"{STEP}  BAD  it lacks optimizer", line
    with pytest.raises(CheckpointUnusable, match="it lacks optimizer"):
        Checkpointer(run_dir, keep=2).load_full(STEP)
