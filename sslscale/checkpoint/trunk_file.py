"""Trunk files: the published checkpoint layout (METHOD section 5), written by `sslscale export` and
read back, with no config, by evaluation, the kNN command and the torch.hub entries.

The file is a plain state dict under torchvision's key names, without fc.* and without heads: a
ResNet-50 has 318 entries, a d8192 trunk 18 more `resizer.*` ones. It loads strictly into torchvision's
resnet50 with `fc = nn.Identity()` (d2048 files), exactly as the authors' files do.

How the shape travels: in the tensors themselves. Block type and count give the backbone, conv1 the
width and the stem, `resizer.*` the representation dimension, so a file published without any
metadata rebuilds its trunk. `export` also writes the shape as state-dict metadata (the `_metadata`
attribute every state dict carries, which torch.save keeps and load_state_dict ignores for names it
does not know); the reader checks it against the tensors, and it records provenance (recipe, step).
Neither adds a key, so strict loading into torchvision stays intact.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict

import torch

from sslscale.checkpoint.integrity import weights_only_refusal
from sslscale.models.backbones import ResNetTrunk

METADATA_KEY = "sslscale"  # in state_dict._metadata, beside the per-module version entries
_BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet50": [3, 4, 6, 3]}


class TrunkFileError(ValueError):
    """A file that is not a trunk this project can rebuild."""


def trunk_shape(state: dict) -> dict:
    """{backbone, width, dim, small_image_stem} from the tensors of a trunk state dict."""
    if "conv1.weight" not in state or "layer4.0.conv1.weight" not in state:
        heads = sorted({k.split(".")[0] for k in state})[:6]
        raise TrunkFileError(f"no ResNet trunk in it (no conv1.weight / layer4.*; top-level names: {heads}); "
                             "give a trunk exported by `sslscale export` or a published DISSL file")
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = [len({int(m.group(1)) for k in state for m in [re.match(rf"layer{i}\.(\d+)\.", k)] if m})
              for i in range(1, 5)]
    backbone = {True: "resnet50", False: "resnet18"}[bottleneck]
    if blocks != _BLOCKS[backbone]:
        raise TrunkFileError(f"a ResNet with {blocks} blocks per stage and {'bottleneck' if bottleneck else 'basic'} "
                             f"blocks; only resnet18 {_BLOCKS['resnet18']} and resnet50 {_BLOCKS['resnet50']} are "
                             "supported")
    stem = state["conv1.weight"]
    dim = None
    if "resizer.conv3.weight" in state:
        dim = int(state["resizer.conv3.weight"].shape[0])
    elif "resizer.conv1.weight" in state:
        dim = int(state["resizer.conv1.weight"].shape[0])
    return {"backbone": backbone, "width": int(stem.shape[0]), "dim": dim, "small_image_stem": stem.shape[-1] == 3}


def build_from_shape(shape: dict) -> ResNetTrunk:
    return ResNetTrunk(shape["backbone"], shape["width"], shape["dim"], shape["small_image_stem"])


def load_state(trunk: ResNetTrunk, state: dict, where: str) -> None:
    """Strict: every trunk tensor present with its shape, nothing else; one line naming what differs."""
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong))
                 if items]
        raise TrunkFileError(f"{where} does not fit a {describe(trunk)}: " + "; ".join(parts))
    check_finite(state, where)
    trunk.load_state_dict(state)


def check_finite(state: dict, where: str) -> None:
    """Weights with NaN or Inf give NaN features and meaningless probes: refused by name, in one line."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrunkFileError(f"{where} holds NaN or Inf weights in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}); the run diverged or the file is damaged")


def describe(trunk: ResNetTrunk) -> str:
    return f"{type(trunk).__name__}(out_dim={trunk.out_dim})"


def save_trunk_file(trunk_state: dict, path: str, shape: dict, provenance: dict | None = None) -> None:
    """The published layout, plus the shape (and provenance) as state-dict metadata. Atomic."""
    state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in trunk_state.items())
    state._metadata = OrderedDict({METADATA_KEY: {**shape, **(provenance or {})}})
    check_output_path(path)
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # a whole trunk's size: never left behind
            os.remove(tmp)
        raise


def check_output_path(path: str) -> None:
    """Where a trunk file can be written, checked before anything is loaded or written."""
    if os.path.isdir(path):
        raise TrunkFileError(f"{path} is a directory; give the trunk file's path, e.g. {os.path.join(path, 'trunk.pt')}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise TrunkFileError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TrunkFileError(f"cannot write {path}: folder {parent} is not writable")


def read_trunk_file(path: str) -> tuple[dict, dict]:
    """(state dict, shape) of a trunk file; the shape from its tensors, checked against its metadata."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"trunk file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  any unreadable file gets the same one-line answer
        refused = weights_only_refusal(error)
        if refused:
            raise TrunkFileError(f"{path} cannot be loaded: it names {refused}, which no trunk file holds; refused "
                                 "unrun (it could run code)") from None
        first = str(error).splitlines()[0][:200] if str(error).strip() else ""
        if "weights_only" in str(error) or "Weights only load failed" in first:  # never torch's advice to retry
            first = "weights-only unpickling refused its contents"
        raise TrunkFileError(f"{path} is not a readable torch file ({type(error).__name__}: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a Lightning-style wrapper around the published layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrunkFileError(f"{path} does not hold a state dict of tensors")
    try:
        shape = trunk_shape(state)
    except TrunkFileError as error:
        raise TrunkFileError(f"{path}: {error}") from None
    recorded = (getattr(state, "_metadata", None) or {}).get(METADATA_KEY)
    if recorded is not None:
        differs = [f"{k}: metadata {recorded.get(k)!r}, tensors {v!r}" for k, v in shape.items() if recorded.get(k) != v]
        if differs:
            raise TrunkFileError(f"{path}: its recorded shape disagrees with its tensors ({'; '.join(differs)})")
    return state, shape


def load_trunk_file(path: str) -> tuple[ResNetTrunk, dict]:
    """The trunk a file describes, with its weights, and its metadata ({} for published files)."""
    state, shape = read_trunk_file(path)
    trunk = build_from_shape(shape)
    load_state(trunk, state, path)
    recorded = (getattr(state, "_metadata", None) or {}).get(METADATA_KEY) or {}
    return trunk, {**shape, **recorded}
