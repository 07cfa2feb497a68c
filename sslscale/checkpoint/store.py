"""Checkpoints in a run folder: atomic, marked complete, newest-first fallback, keep-last-k.

ckpt/step_000001000/state.pt + COMPLETE   one checkpoint of an unsharded run (rank 0 writes it)
ckpt/step_000001000/*.distcp, .metadata,  one checkpoint of a sharded (FSDP) run: each rank writes
                    extra.pt + COMPLETE   its shards, rank 0 the metadata and the small parts
ckpt/latest                               name of the newest complete checkpoint

Either kind is written under a temp name in the same folder, then renamed and marked, so a crash
never leaves a half-written checkpoint under a real name. Both kinds hold the same state: "model"
and "optimizer" (keyed by parameter names, as torch.distributed.checkpoint.state_dict gives them)
and small parts (progress, RNG, ...); `load_full` reads either kind in one process.

Every file's sha256 goes into the COMPLETE marker at commit time and is checked before a checkpoint is
loaded (sslscale/checkpoint/integrity.py). Files are read weights_only, and DCP metadata through a
restricted unpickler (sslscale/checkpoint/dcp_io.py): a run folder may be shared, and loading it must never run
code that someone put there. A checkpoint found unusable by the trainer is renamed `unusable-<name>`:
never tried again, and never counted (or pruned) as one of the `keep` good ones.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.utils._pytree import tree_map

from sslscale.checkpoint import dcp_io, disk
from sslscale.checkpoint.atomic import write_text_atomic
from sslscale.checkpoint.integrity import (
    MARKER,
    SMALL_PARTS_FILE,
    STATE_FILE,
    CheckpointUnusable,
    NoUsableCheckpoint,
    describe_error,
    file_records,
    find_problem,
    marker_text,
    weights_only_refusal,
)

log = logging.getLogger(__name__)

UNUSABLE_PREFIX = "unusable-"
# The parts every checkpoint holds besides "model" and "optimizer"; one without them cannot resume.
SMALL_PARTS = ("scaler", "progress", "monitor", "rng", "shape_signature")
# Checkpoints written before the RNG state was stored as plain data hold NumPy's state as an array:
# these (and only these) NumPy globals are allowed while loading, which build arrays and run nothing.
_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                  getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the config it is loaded into."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, run_dir: str, keep: int):
        self.dir = os.path.join(run_dir, "ckpt")
        self.keep = keep
        self.pending: PendingWrite | None = None
        self._writer: ThreadPoolExecutor | None = None  # the thread of background single-file writes

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:09d}"

    def complete(self) -> list[str]:
        """Names of complete checkpoints, oldest first."""
        if not os.path.isdir(self.dir):
            return []
        names = [n for n in os.listdir(self.dir)
                 if n.startswith("step_") and os.path.exists(os.path.join(self.dir, n, MARKER))]
        return sorted(names)

    def save(self, step: int, state: dict, *, background: bool = False) -> None:
        """One file, written by one process (rank 0 of an unsharded run). With `background` the state is
        first copied to host memory (training may change the originals right after), then written and
        committed by a thread while training goes on (finish_pending); at most one write is in flight."""
        name = self.name(step)
        if os.path.exists(os.path.join(self.dir, name, MARKER)):
            return  # this step is already saved (e.g. a stop signal right after a periodic save)
        self.finish_pending(wait=True)
        tmp = self._temp_path(name, os.getpid())
        path = os.path.join(tmp, STATE_FILE)
        if not background:
            with self._cleaned_up_on_failure(tmp, name):
                self._fresh_temp(name, os.getpid())
                _save_file(state, path)
                self._commit(tmp, name, step)
            return
        with self._cleaned_up_on_failure(tmp, name):
            self._fresh_temp(name, os.getpid())
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sslscale-checkpoint")
        self.pending = PendingWrite(self._writer.submit(_save_and_hash, host_copy(state), path), tmp, name, step,
                                    True, hashed=True)

    def save_sharded(self, step: int, shards: dict, small: dict, *, is_main: bool, async_group=None) -> None:
        """Collective: every rank passes its shards of "model" and "optimizer"; rank 0's `small` parts
        are kept. With `async_group` the shards are written in the background and the checkpoint is
        committed later (finish_pending); at most one such write is in flight."""
        self.finish_pending(wait=True)
        name = self.name(step)
        # Rank 0 decides and tells the others, so all take the same branch and the same temp name.
        decision = [None if os.path.exists(os.path.join(self.dir, name, MARKER)) else os.getpid()] \
            if is_main else [None]
        dist.broadcast_object_list(decision, src=0)
        if decision[0] is None:
            return
        tmp = self._temp_path(name, decision[0])
        if is_main:
            with self._cleaned_up_on_failure(tmp, name):
                self._fresh_temp(name, decision[0])
                _save_file(small, os.path.join(tmp, SMALL_PARTS_FILE))
        dist.barrier()  # the temp folder exists and holds no leftovers before anyone writes into it
        if async_group is None:
            with self._cleaned_up_on_failure(tmp, name, remove=is_main):
                dcp_io.save(shards, tmp)
                if is_main:
                    self._commit(tmp, name, step)
            dist.barrier()
        else:
            self.pending = PendingWrite(dcp_io.async_save(shards, tmp, async_group), tmp, name, step, is_main)

    def finish_pending(self, wait: bool) -> None:
        """Commits a background write once it is done (rank 0's write finishes last: DCP writes the
        metadata after every rank's shards). With wait=False, returns at once if it is still running."""
        pending = self.pending
        if pending is None or not (wait or pending.future.done()):
            return
        self.pending = None
        with self._cleaned_up_on_failure(pending.tmp, pending.name, remove=pending.is_main):
            result = pending.future.result()  # a failed write raises here
            if pending.is_main:
                self._commit(pending.tmp, pending.name, pending.step, result if pending.hashed else None)

    @contextlib.contextmanager
    def _cleaned_up_on_failure(self, tmp: str, name: str, remove: bool = True):
        """A write that fails leaves no temp folder behind (on a full disk it holds the space a rerun needs)
        and touches no earlier checkpoint; a failure of the disk itself becomes a DiskError saying which."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            if remove:
                shutil.rmtree(tmp, ignore_errors=True)
            failure = disk.as_disk_error(error, self.dir, f"checkpoint {name}")
            if failure is None:
                raise
            raise failure from error

    def _temp_path(self, name: str, token: int) -> str:
        return os.path.join(self.dir, f".tmp-{name}-{token}")

    def _fresh_temp(self, name: str, token: int) -> str:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._temp_path(name, token)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def _commit(self, tmp: str, name: str, step: int, files: dict | None = None) -> str:
        """Marks a fully written temp folder complete, with the checksum of each of its files (every rank's
        shards are on disk by now), and gives it its real name."""
        final = os.path.join(self.dir, name)
        if files is None:
            files = file_records(tmp)
        write_text_atomic(os.path.join(tmp, MARKER), marker_text(step, time.time(), files))
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of an earlier crash
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        write_text_atomic(os.path.join(self.dir, "latest"), name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        names = self.complete()
        for old in names[: max(len(names) - self.keep, 0)]:
            shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)
        for leftover in os.listdir(self.dir):  # temp folders of crashed saves by dead processes
            if leftover.startswith(".tmp-") and not leftover.endswith(f"-{os.getpid()}"):
                shutil.rmtree(os.path.join(self.dir, leftover), ignore_errors=True)

    def newest_first(self) -> list[str]:
        """Complete checkpoints to try, newest first. Not led by the `latest` pointer: a kill between a
        checkpoint's commit and the pointer's update leaves the pointer one checkpoint behind."""
        return list(reversed(self.complete()))

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def is_sharded(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.dir, name, dcp_io.METADATA_FILE))

    def verify(self, name: str) -> None:
        """Raises CheckpointUnusable if a file of the checkpoint is missing or differs from its checksum."""
        problem = find_problem(self.path(name))
        if problem is not None:
            raise CheckpointUnusable(name, problem)

    def check_loadable(self, name: str) -> None:
        """What the loader refuses beyond the checksums, without reading the tensors: a single file is opened
        memory-mapped and its parts checked; a sharded one's small parts are loaded and its metadata read.
        Raises CheckpointUnusable."""
        if not self.is_sharded(name):
            state = _load_file(name, os.path.join(self.dir, name, STATE_FILE), mmap=True)
            check_parts(state, ("model", "optimizer", *SMALL_PARTS), name)
            return
        self.load_small_parts(name)
        try:
            keys = dcp_io.saved_keys(self.path(name))
        except (Exception, CheckpointException) as error:  # noqa: BLE001  any unreadable metadata
            raise CheckpointUnusable(name, f"its DCP metadata cannot be read ({describe_error(error)})") from None
        missing = [part for part in ("model", "optimizer") if not any(k.startswith(part + ".") for k in keys)]
        if missing:
            raise CheckpointUnusable(name, f"it lacks {', '.join(missing)}")

    def set_aside_names(self) -> list[str]:
        """Checkpoints an earlier resume found unusable and renamed out of the way."""
        if not os.path.isdir(self.dir):
            return []
        return sorted(n for n in os.listdir(self.dir) if n.startswith(UNUSABLE_PREFIX))

    def set_aside(self, name: str) -> str:
        """Renames an unusable checkpoint out of the way (kept for a look, not deleted); returns the new name."""
        target = UNUSABLE_PREFIX + name
        if os.path.exists(os.path.join(self.dir, target)):
            target += f"-{int(time.time())}"
        os.rename(self.path(name), os.path.join(self.dir, target))
        _fsync_dir(self.dir)
        return target

    def load_small_parts(self, name: str) -> dict:
        small = _load_file(name, os.path.join(self.dir, name, SMALL_PARTS_FILE))
        check_parts(small, SMALL_PARTS, name)
        return small

    def load_full(self, name: str, model_only: bool = False, verify: bool = True) -> dict:
        """The whole state of a checkpoint of either kind, full tensors on the CPU, in this process.
        Raises CheckpointUnusable for any damage (checksums first, unless the caller checked them)."""
        if verify:
            self.verify(name)
        if not self.is_sharded(name):
            state = _load_file(name, os.path.join(self.dir, name, STATE_FILE))
            check_parts(state, ("model", *(() if model_only else ("optimizer",)), *SMALL_PARTS), name)
            return state
        state = self.load_small_parts(name)
        try:
            state.update(dcp_io.read_full(self.path(name), prefix="model." if model_only else ""))
        except (Exception, CheckpointException) as error:  # noqa: BLE001  a missing, truncated or refused shard
            raise CheckpointUnusable(name, f"its DCP files cannot be read ({describe_error(error)})") from None
        check_parts(state, ("model", *(() if model_only else ("optimizer",))), name)
        return state

    def load_latest(self, model_only: bool = False) -> tuple[dict, str] | None:
        """The newest usable checkpoint, falling back past unusable ones with one line each. For readers
        (export, evaluation): the folder is left as it is, the trainer sets bad checkpoints aside. None if
        there is no checkpoint; NoUsableCheckpoint if there are some and none is usable."""
        names = self.newest_first()
        problems = []
        for name in names:
            try:
                return self.load_full(name, model_only), name
            except CheckpointUnusable as error:
                log.warning("%s (in %s); falling back to an older one", error, self.dir)
                problems.append(error)
        if names:
            raise no_usable_checkpoint(self.dir, problems)
        return None


@dataclass
class PendingWrite:
    """A sharded checkpoint being written in the background, committed when `future` is done."""
    future: object
    tmp: str
    name: str
    step: int
    is_main: bool
    hashed: bool = False  # whether the future's result is the file records (a single file, hashed by the writer)


def host_copy(state):
    """Every tensor of a (nested) state copied to CPU memory, so that a background write sees the values
    of this moment. Device tensors go through pinned memory without a stop per tensor, then one sync."""
    on_device = False

    def copy(value):
        nonlocal on_device
        if not isinstance(value, torch.Tensor):
            return value
        if value.device.type == "cpu":
            return value.detach().clone()
        on_device = True
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
        return host.copy_(value.detach(), non_blocking=True)

    copied = tree_map(copy, state)
    if on_device and torch.cuda.is_available():
        torch.cuda.synchronize()
    return copied


def _save_file(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_and_hash(obj, path: str) -> dict:
    """A background single-file write: the writer thread also hashes it, not the training loop."""
    _save_file(obj, path)
    return file_records(os.path.dirname(path))


def _load_file(name: str, path: str, mmap: bool = False):
    """weights_only: tensors and plain data only; a pickle that names anything else is refused, unrun."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001  any load error: this checkpoint cannot be used
        refused = weights_only_refusal(error)
        if refused:  # torch's weights_only refusal is a page of advice; the name it refused is the news
            raise CheckpointUnusable(name, f"{os.path.basename(path)} cannot be loaded: it names "
                                     f"{refused}, which no checkpoint holds; refused unrun (it could run code)") from None
        raise CheckpointUnusable(name, f"{os.path.basename(path)} cannot be loaded ({describe_error(error)})") \
            from None


def check_parts(state, parts, name: str) -> None:
    """A checkpoint that loads but lacks a part would fail (or resume wrongly) half-way through restoring."""
    missing = [part for part in parts if not isinstance(state, dict) or part not in state]
    if missing:
        raise CheckpointUnusable(name, f"it lacks {', '.join(missing)}")


def no_usable_checkpoint(ckpt_dir: str, problems: list, set_aside: list[str] = ()) -> NoUsableCheckpoint:
    if problems:
        found = f"{len(problems)} tried, all unusable (newest: {problems[0].problem})"
    else:
        found = f"the only ones were set aside as unusable by an earlier attempt ({', '.join(set_aside)})"
    return NoUsableCheckpoint(
        f"no usable checkpoint in {ckpt_dir}: {found}. Put back a good copy of a checkpoint, or start over: "
        "another run.name (or launch/submit.py --force-new)")


def trunk_state(model_state: dict) -> dict:
    """The encoder's weights from a full model state, under torchvision key names."""
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}


def check_signature(saved: dict, expected: dict, where: str) -> None:
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, config has {v!r}"
             for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointMismatch(f"{where} was made with a differently shaped config:\n  " + "\n  ".join(diffs)
                                 + "\n(use another run.name to start a new run)")
