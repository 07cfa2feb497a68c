"""Checks that need the file system or the launcher, run before anything is written or any GPU time is spent
(by the trainer, and by launch/submit.py before a job is queued)."""
from __future__ import annotations

import os

from sslscale.checkpoint import disk
from sslscale.config import Config, ConfigError


def preflight(cfg: Config, world_size: int) -> None:
    """Checks that need the file system or the launcher, before anything is written or any GPU time is spent."""
    if cfg.data.batch_size % world_size:
        raise ConfigError([f"data.batch_size: the global batch {cfg.data.batch_size} does not split evenly over "
                           f"{world_size} ranks; choose a multiple of {world_size}"])
    problems = [f"data.{p}" for p in cfg.data.check_machine()]
    if problems:
        raise ConfigError(problems)
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError([f"run folder {cfg.run_dir} cannot be created: {error.strerror}"]) from None
    if not os.access(cfg.run_dir, os.W_OK):
        raise ConfigError([f"run folder {cfg.run_dir} is not writable"])
    # A real write (a DiskError, exit status 74, like a failed save): os.access says yes to root on a read-only
    # mount, and nothing of a full disk.
    disk.probe_folder(os.path.join(cfg.run_dir, "ckpt"), "checkpoint folder")
