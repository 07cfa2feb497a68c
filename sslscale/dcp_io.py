"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards of
the model and optimizer state, rank 0 writes the metadata that maps shards to full tensors.

A DCP folder loads on any number of ranks (DCP reshards on load) and, through `read_full`, in one
process with no process group at all (export, evaluation, tests).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

METADATA_FILE = ".metadata"


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
    from torch.distributed.checkpoint import DefaultLoadPlanner
    dcp.load(state, storage_reader=FileSystemReader(folder),
             planner=DefaultLoadPlanner(allow_partial_load=allow_partial))


def saved_keys(folder: str) -> set[str]:
    """The flat keys ('model.conv1.weight', 'optimizer.state.conv1.weight.momentum_buffer', ...) saved."""
    return set(FileSystemReader(folder).read_metadata().state_dict_metadata)


def read_full(folder: str, prefix: str = "") -> dict:
    """Full, unsharded tensors of the entries under `prefix` ("model." for weights only), as nested
    dicts the way they were saved, in this process alone."""
    reader = FileSystemReader(folder)
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
        dcp.load(flat, storage_reader=reader, no_dist=True)
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
