"""Export to a place it cannot write, and trunks that must not be used (NaN or Inf weights, a planted pickle):
one line, exit status 2, nothing left behind. On a copy of the small committed run in tests/fixtures/."""
import json
import os
import shutil

import pytest
import torch

from sslscale.checkpoint.integrity import MARKER, file_records
from sslscale.checkpoint.trunk_file import TrunkFileError, read_trunk_file, save_trunk_file
from sslscale.cli import main
from tests.checkpoint.test_trunk_file import hub, published_layout
from tests.conftest import REPO

FIXTURE = os.path.join(REPO, "tests", "fixtures", "checkpoints_1992474", "ddp")
PROBE = ["eval.compare_random_init=false", "eval.train_images=100", "eval.val_images=50", "eval.linear.epochs=1"]


@pytest.fixture
def run_dir(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "ddp")
    return str(tmp_path / "ddp" / "tiny")


def one_line_refusal(capsys, *needles):
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_export_to_a_missing_folder_or_onto_a_directory_is_refused_and_leaves_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", run_dir, str(tmp_path / "nowhere" / "trunk.pt")]) == 2
    one_line_refusal(capsys, "nowhere does not exist")
    assert main(["export", run_dir, str(out)]) == 2
    one_line_refusal(capsys, f"{out} is a directory")
    assert not os.listdir(out) and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert main(["export", run_dir, str(out / "trunk.pt")]) == 0
    assert os.listdir(out) == ["trunk.pt"]


def with_nan(state):
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    return state


@pytest.mark.slow  # a linear-eval through the CLI: about 10 s on 2 cores
def test_a_trunk_file_with_nan_weights_is_refused_by_linear_eval(run_dir, tmp_path, capsys):
    path = str(tmp_path / "trunk.pt")
    assert main(["export", run_dir, path]) == 0
    state, shape = read_trunk_file(path)
    save_trunk_file(with_nan(dict(state)), path, shape)
    assert main(["linear-eval", path, "--config", os.path.join(run_dir, "config.yaml"), *PROBE]) == 2
    one_line_refusal(capsys, "holds NaN or Inf weights in 1 tensor(s)")


@pytest.mark.slow  # two ResNet-50s on 2 cores: about 15 s
def test_the_hub_refuses_a_published_file_with_inf_weights(tmp_path):
    published = str(tmp_path / "published.pt")
    layout = published_layout(False)
    layout["layer1.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    torch.save(layout, published)
    with pytest.raises(TrunkFileError, match=r"NaN or Inf weights in 1 tensor\(s\) \(layer1\.0\.conv1\.weight\)"):
        hub("dissl_resnet50_dNone_e100_m2", weights=published)


def test_a_run_whose_checkpoint_holds_nan_weights_is_refused_by_linear_eval(run_dir, capsys):
    folder = os.path.join(run_dir, "ckpt", "step_000000002")
    path = os.path.join(folder, "state.pt")
    state = torch.load(path, weights_only=True)
    name = next(k for k in state["model"] if k.startswith("encoder.") and state["model"][k].is_floating_point())
    state["model"][name] = state["model"][name].contiguous()
    state["model"][name].view(-1)[0] = float("inf")
    torch.save(state, path)
    marker = json.load(open(os.path.join(folder, MARKER)))
    marker["files"] = file_records(folder)
    json.dump(marker, open(os.path.join(folder, MARKER), "w"))
    assert main(["linear-eval", run_dir, *PROBE]) == 2
    one_line_refusal(capsys, "holds NaN or Inf weights")


class Planted:
    def __reduce__(self):
        return (print, ("planted",))


def test_a_planted_pickle_in_a_trunk_file_is_named_without_torchs_advice(tmp_path):
    path = str(tmp_path / "planted.pt")
    torch.save({"conv1.weight": torch.zeros(1), "x": Planted()}, path)
    with pytest.raises(TrunkFileError) as refused:
        read_trunk_file(path)
    message = str(refused.value)
    assert "refused unrun" in message and "print" in message, message
    assert "weights_only" not in message and "\n" not in message
