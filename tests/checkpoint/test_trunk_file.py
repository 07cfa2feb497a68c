"""Trunk files in the published layout (METHOD section 5): export, the loader and the torch.hub entries."""
import os
from collections import OrderedDict

import pytest
import torch
import torchvision

from sslscale.checkpoint.trunk_file import TrunkFileError, load_trunk_file, save_trunk_file, trunk_shape
from sslscale.cli import main
from tests.conftest import REPO, tiny_overrides

QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")


def published_layout(dim8192: bool) -> OrderedDict:
    """A state dict built to METHOD section 5 from its text, not from this project's model: torchvision's
    ResNet-50 keys without fc.* (318), and for d8192 the 18 resizer entries with the stated shapes."""
    state = OrderedDict((k, v) for k, v in torchvision.models.resnet50().state_dict().items()
                        if not k.startswith("fc."))
    assert len(state) == 318
    if dim8192:
        for name, shape in (("conv1", [512, 2048, 1, 1]), ("conv2", [512, 512, 3, 3]), ("conv3", [8192, 512, 1, 1])):
            state[f"resizer.{name}.weight"] = torch.randn(shape) * 0.01
        for name, width in (("bn1", 512), ("bn2", 512), ("bn3", 8192)):
            state.update({f"resizer.{name}.weight": torch.ones(width), f"resizer.{name}.bias": torch.zeros(width),
                          f"resizer.{name}.running_mean": torch.zeros(width),
                          f"resizer.{name}.running_var": torch.ones(width),
                          f"resizer.{name}.num_batches_tracked": torch.tensor(0)})
        assert len(state) == 318 + 18
    return state


def hub(name, **kwargs):
    return torch.hub.load(REPO, name, source="local", trust_repo=True, **kwargs)


def test_published_files_load_through_the_hub_entries_without_metadata(tmp_path):
    for dim8192, entry in ((True, "dissl_resnet50_d8192_e800_m8"), (False, "dissl_resnet50_dNone_e100_m2")):
        state = published_layout(dim8192)
        path = str(tmp_path / f"{entry}.pt")
        torch.save(state, path)
        assert trunk_shape(state) == {"backbone": "resnet50", "width": 64, "dim": 8192 if dim8192 else None,
                                      "small_image_stem": False}
        trunk = hub(entry, weights=path)
        loaded = trunk.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()) and len(loaded) == len(state)
        with torch.no_grad():
            assert trunk(torch.randn(1, 3, 64, 64)).shape == (1, 8192 if dim8192 else 2048)
        rebuilt, metadata = load_trunk_file(path)  # the loader alone: the shape comes from the tensors
        assert rebuilt.out_dim == (8192 if dim8192 else 2048) and metadata["dim"] == (8192 if dim8192 else None)


def test_a_file_that_does_not_fit_the_entry_is_refused_naming_the_tensors(tmp_path):
    path = str(tmp_path / "d2048.pt")
    torch.save(published_layout(False), path)
    with pytest.raises(TrunkFileError, match=r"missing: resizer\.conv1\.weight.*\(18\)"):
        hub("dissl_resnet50_d8192_e400_m6", weights=path)
    torch.save({"student_head.0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(TrunkFileError, match="no ResNet trunk in it"):
        load_trunk_file(path)
    with open(path, "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(TrunkFileError, match="not a readable torch file"):
        load_trunk_file(path)


def test_every_hub_entry_matches_its_recipe():
    import hubconf
    from sslscale.config import load_config
    for name, dim in hubconf.RELEASED.items():
        model = load_config(os.path.join(REPO, "configs", f"{name}.yaml")).model
        assert (model.backbone, model.width, model.dim, model.small_image_stem) == ("resnet50", 64, dim, False), name


def test_export_writes_the_published_layout_with_the_shape_as_metadata(tmp_path, capsys):
    assert main(["pretrain", QUICKSTART, *tiny_overrides(tmp_path), "train.max_steps=2", "model.dim=128",
                 "eval.after_pretrain=false"]) == 0
    out = str(tmp_path / "trunk.pt")
    assert main(["export", str(tmp_path / "tiny"), out]) == 0
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # no extra keys: strict loads stay strict
    trunk, metadata = load_trunk_file(out)
    assert metadata == {"backbone": "resnet18", "width": 8, "dim": 128, "small_image_stem": True, "run": "tiny",
                        "objective": "dissl", "checkpoint": "step_000000002", "step": 2}
    assert trunk.out_dim == 128 and all(torch.equal(trunk.state_dict()[k], v) for k, v in state.items())
    # Metadata that disagrees with the tensors is caught, not trusted.
    save_trunk_file(state, out, {**{k: metadata[k] for k in ("backbone", "width", "small_image_stem")}, "dim": 256})
    with pytest.raises(TrunkFileError, match="dim: metadata 256, tensors 128"):
        load_trunk_file(out)


def test_an_exported_resnet50_loads_strictly_into_torchvision(tmp_path):
    from sslscale.models import ResNetTrunk
    path = str(tmp_path / "r50.pt")
    trunk = ResNetTrunk("resnet50")
    save_trunk_file(trunk.state_dict(), path, {"backbone": "resnet50", "width": 64, "dim": None,
                                               "small_image_stem": False})
    reference = torchvision.models.resnet50()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(torch.load(path, weights_only=True))  # strict
    assert len(torch.load(path, weights_only=True)) == 318
