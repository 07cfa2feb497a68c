"""Checksums of a checkpoint's files, recorded in its COMPLETE marker when it is committed and checked
before it is loaded.

Why: the loaders do not notice every kind of damage. A flipped bit inside the tensor data of `state.pt`
or of a `.distcp` shard loads without error and silently changes the weights; a truncated file may or
may not fail. A sha256 per file, written once the files are on disk, turns each of those into a clear
"this checkpoint is unusable" before anything is loaded from it.

The marker is JSON: {"step": N, "time": T, "files": {"state.pt": {"sha256": "...", "bytes": B}, ...}}.
Markers written before checksums existed hold exactly "step" and "time": such checkpoints still load, with
only the presence of their files checked here (the loaders' own errors still lead to a fallback). Any other
marker must vouch for the checkpoint (`marker_problem`, the one rule verify and the loader share): its file
list readable, the parts its format needs listed, every file of the folder listed and every listed name a file
inside the folder. A marker that does not is a reason the checkpoint is unusable, never "not checked".
"""
from __future__ import annotations

import hashlib
import json
import os
import re

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


MARKER_KEYS = {"step", "time", "files"}
SHARD_SUFFIX = ".distcp"


def _is_plain_name(name) -> bool:
    """A file directly inside the checkpoint folder: no separator, no '..', not absolute, not the marker."""
    return (isinstance(name, str) and name not in ("", ".", "..", MARKER) and "/" not in name and "\\" not in name
            and os.sep not in name and "\0" not in name)


def _is_record(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64
            and isinstance(record.get("bytes"), int) and not isinstance(record.get("bytes"), bool)
            and record["bytes"] >= 0)


def marker_problem(folder: str, marker: dict) -> str | None:
    """The one rule of what a checksummed marker must vouch for, per format: a single-file checkpoint lists
    state.pt; a sharded (DCP) one lists .metadata, extra.pt and its *.distcp shards; every file in the folder is
    listed, and every listed name is a plain file name inside the folder. None: the marker is sound."""
    unknown = sorted(str(k) for k in set(marker) - MARKER_KEYS)
    if unknown:
        return f"its {MARKER} marker has unknown key(s) {', '.join(unknown)} (damaged); its file list cannot be trusted"
    files = marker["files"]
    if not isinstance(files, dict) or not files:
        return f"its {MARKER} marker's file list is empty or unreadable, so it vouches for nothing"
    outside = [repr(name) for name in files if not _is_plain_name(name)]
    if outside:
        return f"its {MARKER} marker names {', '.join(sorted(outside))}, outside the checkpoint folder"
    bad = sorted(name for name, record in files.items() if not _is_record(record))
    if bad:
        return f"its {MARKER} marker's records of {', '.join(bad)} are unreadable (no sha256 or size)"
    sharded = METADATA_FILE in files or os.path.exists(os.path.join(folder, METADATA_FILE))
    expected = [METADATA_FILE, SMALL_PARTS_FILE] if sharded else [STATE_FILE]
    unlisted = [name for name in expected if name not in files]
    if sharded and not any(name.endswith(SHARD_SUFFIX) for name in files):
        unlisted.append(f"any *{SHARD_SUFFIX} shard")
    if unlisted:
        return f"its {MARKER} marker does not list {', '.join(unlisted)}, which a checkpoint of its kind needs"
    try:
        on_disk = {n for n in os.listdir(folder) if n != MARKER and os.path.isfile(os.path.join(folder, n))}
    except OSError as error:
        return f"its folder cannot be listed ({describe_error(error)})"
    stray = sorted(on_disk - set(files))
    if stray:
        return f"{', '.join(stray)} in the folder but not in its {MARKER} marker (nothing vouches for it)"
    return None


def find_problem(folder: str) -> str | None:
    """What is wrong with the files of a checkpoint folder, in a few words, or None if nothing is.
    Every recorded file is read whole: the cost is one sequential read of the checkpoint. A marker written
    before checksums existed has exactly the keys step and time; any other marker must pass `marker_problem`,
    so a damaged marker makes the checkpoint unusable, never unchecked."""
    try:
        marker = read_marker(folder)
    except ValueError as error:
        return str(error)
    if set(marker) == {"step", "time"}:  # a marker written before checksums: only presence can be checked
        for name in required_files(folder):
            if not os.path.isfile(os.path.join(folder, name)):
                return f"{name} is missing"
        return None
    if "files" not in marker:
        marker = {"files": None, **marker}  # reported as an unknown key or an unreadable file list
    problem = marker_problem(folder, marker)
    if problem is not None:
        return problem
    for name, record in sorted(marker["files"].items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != record["bytes"]:
            return f"{name} has {size} bytes, {record['bytes']} when it was written (truncated or replaced)"
        try:
            digest = sha256_file(path)
        except OSError as error:
            return f"{name} cannot be read ({describe_error(error)})"
        if digest != record["sha256"]:
            return f"{name} does not match its sha256 (changed on disk since it was written)"
    return None


def has_checksums(folder: str) -> bool:
    """Whether the marker is anything but one written before checksums (exactly step and time)."""
    try:
        return set(read_marker(folder)) != {"step", "time"}
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


_REFUSED_GLOBAL = re.compile(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)|but got (<[^>]+>)")


def weights_only_refusal(error: BaseException) -> str | None:
    """What torch.load(weights_only=True) refused to unpickle (a name), or None if it refused nothing. torch's
    own message is a page that ends by advising weights_only=False: never show it, name the global instead."""
    refused = _REFUSED_GLOBAL.search(str(error))
    return (refused.group(1) or refused.group(2)) if refused else None
