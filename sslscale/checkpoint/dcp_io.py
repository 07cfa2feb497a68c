"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards of
the model and optimizer state, rank 0 writes the metadata that maps shards to full tensors.

A DCP folder loads on any number of ranks (DCP reshards on load) and, through `read_full`, in one
process with no process group at all (export, evaluation, tests).

Reading never runs code from the folder: DCP's own reader unpickles `.metadata` with plain pickle and
its planner loads non-tensor entries with torch.load(weights_only=False), either of which runs whatever
a planted pickle asks. Every read here goes through SafeReader (an unpickler that knows only DCP's
metadata classes and the torch types they hold) and SafeLoadPlanner (weights_only loads).
"""
from __future__ import annotations

import io
import pathlib
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from sslscale.checkpoint.integrity import METADATA_FILE

# What a DCP .metadata pickle may name: DCP's own dataclasses and enum, torch.Size, the dtypes and
# layouts of the tensors, and the path it was saved to. Nothing that can run a command or import code.
_METADATA_GLOBALS = {
    **{("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
       for name in ("Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata", "TensorProperties",
                    "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
       if hasattr(dcp_metadata, name)},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return _METADATA_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{METADATA_FILE} names {module}.{name}, which a DCP checkpoint never "
                                     "holds; refused (it could run code)")


def load_metadata(stream) -> dcp_metadata.Metadata:
    metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f"{METADATA_FILE} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled with the restricted unpickler above."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank) if hasattr(self, "_get_metadata_path") else self.path / METADATA_FILE
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries (optimizer hyper-parameters) load weights_only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def save(state: dict, folder: str) -> None:
    """Collective: every rank calls it with its own shards. Returns when all shards and the metadata
    are written (DCP gathers every rank's write result before rank 0 writes the metadata)."""
    dcp.save(state, storage_writer=FileSystemWriter(folder))


def async_save(state: dict, folder: str, process_group):
    """Copies this rank's shards to host memory, then writes them in a background thread; returns a
    Future. `process_group` must be a gloo group of its own: the background thread's collectives
    must never interleave with the training step's."""
    return dcp.async_save(state, storage_writer=FileSystemWriter(folder), process_group=process_group)


def load_into(state: dict, folder: str, allow_partial: bool = False) -> None:
    """Collective: fills `state` (this rank's shards, or full tensors) in place from `folder`, whatever
    the number of ranks that wrote it. A failure on any rank raises on every rank. allow_partial leaves
    entries the checkpoint does not have as they are (the caller checks which may be absent)."""
    dcp.load(state, storage_reader=SafeReader(folder), planner=SafeLoadPlanner(allow_partial_load=allow_partial))


def saved_keys(folder: str) -> set[str]:
    """The flat keys ('model.conv1.weight', 'optimizer.state.conv1.weight.momentum_buffer', ...) saved."""
    return set(SafeReader(folder).read_metadata().state_dict_metadata)


def read_full(folder: str, prefix: str = "") -> dict:
    """Full, unsharded tensors of the entries under `prefix` ("model." for weights only), as nested
    dicts the way they were saved, in this process alone."""
    reader = SafeReader(folder)
    metadata = reader.read_metadata()
    flat = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        if isinstance(entry, TensorStorageMetadata):
            flat[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
        elif isinstance(entry, BytesStorageMetadata):
            flat[key] = None  # any placeholder: DCP replaces it with the stored object
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return unflatten(flat, metadata.planner_data)


def unflatten(flat: dict, paths: dict) -> dict:
    """DCP stores nested state under flat keys and records each key's path ('model', 'conv1.weight')."""
    nested: dict = {}
    for key, value in flat.items():
        path = paths.get(key, (key,))
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _lists_from_int_keys(nested)


def _lists_from_int_keys(node):
    """Optimizer param_groups are saved as a list; the flat paths give their indices as ints."""
    if not isinstance(node, dict):
        return node
    children = {k: _lists_from_int_keys(v) for k, v in node.items()}
    if children and all(isinstance(k, int) for k in children):
        return [children[i] for i in sorted(children)]
    return children
