"""Checkpoints in a run folder: atomic, marked complete, newest-first fallback, keep-last-k.

ckpt/step_000001000/state.pt + COMPLETE   one checkpoint; written under a temp name in the same
                                          folder, then renamed, so a crash never leaves a
                                          half-written checkpoint under a real name
ckpt/latest                               name of the newest complete checkpoint
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import torch

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "state.pt"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the config it is loaded into."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, run_dir: str, keep: int):
        self.dir = os.path.join(run_dir, "ckpt")
        self.keep = keep

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

    def save(self, step: int, state: dict) -> str:
        name = self.name(step)
        final = os.path.join(self.dir, name)
        if os.path.exists(os.path.join(final, MARKER)):
            return final  # this step is already saved (e.g. a stop signal right after a periodic save)
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, STATE_FILE), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _write_atomic(os.path.join(tmp, MARKER), json.dumps({"step": step, "time": time.time()}))
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of an earlier crash
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        _write_atomic(os.path.join(self.dir, "latest"), name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        names = self.complete()
        for old in names[: max(len(names) - self.keep, 0)]:
            shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)
        for leftover in os.listdir(self.dir):  # temp folders of crashed saves by dead processes
            if leftover.startswith(".tmp-") and not leftover.endswith(f"-{os.getpid()}"):
                shutil.rmtree(os.path.join(self.dir, leftover), ignore_errors=True)

    def load_latest(self, map_location="cpu") -> tuple[dict, str] | None:
        """The newest checkpoint that loads, falling back past corrupt ones (with a warning)."""
        candidates = list(reversed(self.complete()))
        latest_file = os.path.join(self.dir, "latest")
        if os.path.exists(latest_file):
            with open(latest_file) as f:
                named = f.read().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for name in candidates:
            path = os.path.join(self.dir, name, STATE_FILE)
            try:
                return torch.load(path, map_location=map_location, weights_only=False), name
            except Exception as error:  # noqa: BLE001  any unreadable file means: try an older one
                log.warning("checkpoint %s is unreadable (%s); falling back to an older one", path, error)
        return None


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
