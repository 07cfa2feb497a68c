"""A run folder is the run: its config, its checkpoints, its lock.

- The folder given on the command line is the run, wherever it now lives: a run folder that was moved or
  copied is evaluated, exported and resumed where it is, never where its saved `run.root` points.
- One live process per folder and stage: an exclusive flock on `<folder>/.lock` (pretraining) or
  `<eval folder>/.lock` (evaluation). The kernel drops it when its process dies, however it dies, so a
  crashed or killed run never leaves a stale lock behind.
- Resuming checks what changed since the run was saved: settings that would make the resumed run a different
  run (batch size, seed) are refused with the reason, every other change is printed, and the config it
  replaces is kept beside the new one.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from sslscale.config import Config, ConfigError, load_config

CONFIG_FILE = "config.yaml"
PATH_KEYS = ("run.root", "data.path")
LOCK_FILE = ".lock"

# Settings a run cannot change once it has started, and why: the checkpoint's step counter, the lr schedule
# and the position in the data stream are counted in steps of the global batch, and the data order and crops
# come from the seed. A run resumed with either would silently be another run.
FIXED_ON_RESUME = {
    "data.batch_size": "the schedule, the step counter and the position in the data stream are counted in "
                       "steps of this global batch",
    "run.seed": "the data order and the augmentations of the rest of the run come from the seed",
}


def load_run_config(run_dir: str, overrides: list[str] = ()) -> Config:
    """The saved config of the run folder `run_dir`, with `run.root` and `run.name` taken from where the folder
    is now (a moved or copied run is its own run), then `overrides`."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError([f"{run_dir} is not a run folder (no {CONFIG_FILE})"])
    cfg = load_config(path, overrides)
    cfg.run.root, cfg.run.name = os.path.split(os.path.abspath(run_dir).rstrip(os.sep))
    return cfg


def flat(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def changed_settings(saved: Config, cfg: Config) -> dict[str, tuple]:
    """key -> (saved value, new value) for every setting that differs."""
    before, after = flat(saved.to_dict()), flat(cfg.to_dict())
    keys = [k for k in after if k not in before] + list(before)
    return {k: (before.get(k), after.get(k)) for k in dict.fromkeys(keys)
            if before.get(k) != after.get(k) and not same_path(k, before.get(k), after.get(k))}


def same_path(key: str, old, new) -> bool:
    """The launcher saves paths absolute: a relative path naming the same folder is no change."""
    return (key in PATH_KEYS and isinstance(old, str) and isinstance(new, str)
            and os.path.abspath(old) == os.path.abspath(new))


def check_resume(saved: Config, cfg: Config) -> dict[str, tuple]:
    """Refuses a resume that changes a setting of FIXED_ON_RESUME; returns every change."""
    changes = changed_settings(saved, cfg)
    problems = [f"{key}: {old!r} -> {new!r} cannot change when resuming ({FIXED_ON_RESUME[key]}); keep "
                f"{old!r}, or start a new run (another run.name, or launch/submit.py --force-new)"
                for key, (old, new) in changes.items() if key in FIXED_ON_RESUME]
    if problems:
        raise ConfigError([f"run folder {cfg.run_dir}: {p}" for p in problems])
    return changes


def describe_changes(changes: dict[str, tuple]) -> list[str]:
    return [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]


def keep_previous_config(run_dir: str) -> str:
    """Renames the run's config.yaml to config.replaced-<UTC time>.yaml (before a changed one is written);
    returns the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    kept = os.path.join(run_dir, f"config.replaced-{stamp}.yaml")
    suffix = 1
    while os.path.exists(kept):  # two resumes within a second
        kept = os.path.join(run_dir, f"config.replaced-{stamp}-{suffix}.yaml")
        suffix += 1
    os.replace(os.path.join(run_dir, CONFIG_FILE), kept)
    return kept


class FolderInUse(ConfigError):
    pass


class FolderLock:
    """An exclusive, non-blocking flock on `<folder>/.lock`, held while the stage runs. The file keeps who holds
    it (host, pid, what, since) for the message the next process gets; the lock itself is the flock, which
    the kernel releases when the holder exits or is killed."""

    def __init__(self, folder: str, what: str):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise FolderInUse([f"{self.folder} is in use by another process ({describe_holder(holder)}); wait for "
                               f"it to end, or stop it, or choose another run.name"]) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"{holder['what']}, pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
