"""Checksums of a checkpoint's files, recorded in its COMPLETE marker when it is committed and checked
before it is loaded.

Why: the loaders do not notice every kind of damage. A flipped bit inside the tensor data of `state.pt`
or of a `.distcp` shard loads without error and silently changes the weights; a truncated file may or
may not fail. A sha256 per file, written once the files are on disk, turns each of those into a clear
"this checkpoint is unusable" before anything is loaded from it.

The marker is JSON: {"step": N, "time": T, "files": {"state.pt": {"sha256": "...", "bytes": B}, ...}}.
Markers written before checksums existed have no "files": such checkpoints still load, with only the
presence of their files checked here (the loaders' own errors still lead to a fallback).
"""
from __future__ import annotations

import hashlib
import json
import os

MARKER = "COMPLETE"
STATE_FILE = "state.pt"  # an unsharded checkpoint
METADATA_FILE = ".metadata"  # a sharded (DCP) checkpoint: its metadata, its shards (*.distcp) and ...
SMALL_PARTS_FILE = "extra.pt"  # ... its unsharded parts (progress, RNG, monitor, ...)
CHUNK_BYTES = 1 << 20  # checkpoints are GBs: hash them a MiB at a time, never whole in memory


class CheckpointUnusable(Exception):
    """One checkpoint that cannot be used (damaged, incomplete, unreadable); an older one may be."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"checkpoint {name} is unusable: {problem}")
        self.name, self.problem = name, problem


class NoUsableCheckpoint(Exception):
    """A run folder has checkpoints and none of them can be used."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(folder: str) -> dict[str, dict]:
    """{file name: {"sha256", "bytes"}} of every file of a checkpoint folder but the marker."""
    records = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name != MARKER and os.path.isfile(path):
            records[name] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    return records


def marker_text(step: int, time: float, files: dict[str, dict]) -> str:
    return json.dumps({"step": step, "time": time, "files": files}, indent=1)


def read_marker(folder: str) -> dict:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"its {MARKER} marker cannot be read ({describe_error(error)})") from None
    if not isinstance(marker, dict):
        raise ValueError(f"its {MARKER} marker is not a JSON object")
    return marker


def required_files(folder: str) -> list[str]:
    """The files a checkpoint of its kind cannot do without (the shards are named by the metadata)."""
    if os.path.exists(os.path.join(folder, METADATA_FILE)):
        return [METADATA_FILE, SMALL_PARTS_FILE]
    return [STATE_FILE]


def find_problem(folder: str) -> str | None:
    """What is wrong with the files of a checkpoint folder, in a few words, or None if nothing is.
    Every recorded file is read whole: the cost is one sequential read of the checkpoint."""
    try:
        marker = read_marker(folder)
    except ValueError as error:
        return str(error)
    for name in required_files(folder):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} is missing"
    files = marker.get("files")
    if files is None:
        return None  # a marker written before checksums were recorded: nothing more to check against
    for name, record in sorted(files.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != record.get("bytes"):
            return f"{name} has {size} bytes, {record.get('bytes')} when it was written (truncated or replaced)"
        try:
            digest = sha256_file(path)
        except OSError as error:
            return f"{name} cannot be read ({describe_error(error)})"
        if digest != record.get("sha256"):
            return f"{name} does not match its sha256 (changed on disk since it was written)"
    return None


def has_checksums(folder: str) -> bool:
    try:
        return "files" in read_marker(folder)
    except ValueError:
        return False


def describe_error(error: BaseException) -> str:
    """One line for any loader error. DCP's CheckpointException holds each failed rank's own exception
    with its traceback in its text; name the first one instead."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items(), key=lambda item: item[0])[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return f"rank {rank}: {describe_error(inner)}"
    text = str(error)
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror + (f": {os.path.basename(str(error.filename))}" if error.filename else "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")
