"""A run folder is the run: its config, its checkpoints, its lock.

- The folder given on the command line is the run, wherever it now lives: a run folder that was moved or
  copied is evaluated, exported and resumed where it is, never where its saved `run.root` points.
- One live process per folder and stage: see lock.py.
- Resuming checks what changed since the run was saved: settings that would make the resumed run a different
  run (batch size, seed) are refused with the reason, every other change is printed, and the config it
  replaces is kept beside the new one.
"""
from __future__ import annotations

import os
import time

import yaml

from sslscale.checkpoint import disk
from sslscale.checkpoint.atomic import write_text_atomic
from sslscale.checkpoint.store import CheckpointMismatch, check_signature
from sslscale.config import Config, ConfigError, load_config

CONFIG_FILE = "config.yaml"
PATH_KEYS = ("run.root", "data.path")

# Settings a run cannot change once it has started, and why: the checkpoint's step counter, the lr schedule
# and the position in the data stream are counted in steps of the global batch, and the data order and crops
# come from the seed. A run resumed with either would silently be another run.
FIXED_ON_RESUME = {
    "data.batch_size": "the schedule, the step counter and the position in the data stream are counted in "
                       "steps of this global batch",
    "run.seed": "the data order and the augmentations of the rest of the run come from the seed",
}


def fixed_on_resume(cfg: Config) -> dict:
    """The FIXED_ON_RESUME settings of a config, as every checkpoint records them (config.yaml may be lost)."""
    return {"data.batch_size": cfg.data.batch_size, "run.seed": cfg.run.seed}


def check_fixed_on_resume(saved: dict | None, cfg_fixed: dict, where: str) -> None:
    """The guard of FIXED_ON_RESUME against what a checkpoint recorded (None: written before it recorded them)."""
    if not isinstance(saved, dict):
        return
    problems = [f"{key}: {saved[key]!r} -> {new!r} cannot change when resuming ({FIXED_ON_RESUME[key]})"
                for key, new in cfg_fixed.items() if key in saved and saved[key] != new]
    if problems:
        raise CheckpointMismatch(f"{where}: {'; '.join(problems)}; keep the checkpoint's value, or start a new run "
                                 "(another run.name, or launch/submit.py --force-new)")


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


def dump_config(config: Config, path: str) -> None:
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def check_run_folder(cfg: Config) -> dict[str, tuple]:
    """Rerunning a command on an existing run folder resumes it, if the shapes still fit and nothing that
    makes it another run changed. Returns every setting that differs from the saved config."""
    saved_path = os.path.join(cfg.run_dir, CONFIG_FILE)
    if not os.path.exists(saved_path):
        return {}
    saved = load_config(saved_path, check=False)
    check_signature(saved.shape_signature(), cfg.shape_signature(), f"run folder {cfg.run_dir}")
    return check_resume(saved, cfg)


def save_config(cfg: Config, changes: dict[str, tuple], stream) -> None:
    """The run's config.yaml; a changed one is announced setting by setting and the one it replaces is kept."""
    path = os.path.join(cfg.run_dir, CONFIG_FILE)
    if changes and os.path.exists(path):
        kept = keep_previous_config(cfg.run_dir)
        print("\n".join([f"resuming {cfg.run_dir} with {len(changes)} changed setting(s) (the previous config is "
                         f"kept as {os.path.basename(kept)}):", *describe_changes(changes)]), file=stream, flush=True)
    try:
        dump_config(cfg, path)  # write_text_atomic removes its temp file when the write fails
    except OSError as error:
        failure = disk.as_disk_error(error, cfg.run_dir, "the run's config.yaml")
        if failure is None:
            raise
        raise failure from error
