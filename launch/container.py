"""Jobs inside a container image (`slurm.container`): what launch/submit.py hands submitit so that
every task of a job runs in the image, through pyxis (`srun --container-image`) or Apptainer
(`apptainer exec`, as the command that starts Python).

Paths are the same inside as outside: the run root (run folders, submitit's pickles and logs) and the
data folder are mounted where they are on the host, so the saved config and the job's pickle need no
translation.

Requeueing from inside: on a time limit, rank 0 asks SLURM to requeue the job (`scontrol requeue`, run
by submitit) from inside the container. The image has SLURM's client tools, which also need the
cluster's config and munge's socket (the credential that says who asks); neither is visible in a
container unless mounted (enroot even puts a fresh tmpfs on /run), so both are mounted as well.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from sslscale.config import Config

DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"
MUNGE_SOCKET_DIRS = ("/run/munge", "/var/run/munge")
MUNGE_SOCKET_DIR_INSIDE = "/run/munge"  # where libmunge looks in the image (Ubuntu's build)
SQUASHFS_SUFFIXES = (".sqsh", ".squashfs")  # enroot's image files


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False

    @classmethod
    def parse(cls, spec: str) -> Mount:
        """'SRC[:DST[:ro|rw]]' (checked by the config)."""
        source, _, rest = spec.partition(":")
        target, _, flag = rest.partition(":")
        return cls(source, target or source, flag == "ro")

    def __str__(self) -> str:  # the form both pyxis and Apptainer take
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


def image_is_path(cfg: Config) -> bool:
    """Apptainer runs an image file. pyxis takes a path when it starts with '/' or '.' and imports anything
    else from a registry; a name ending in .sqsh is a file too (submit.py makes it absolute for pyxis)."""
    s = cfg.slurm
    return s.container is not None and (s.container_runtime == "apptainer" or s.container.startswith(("/", "."))
                                        or s.container.endswith(SQUASHFS_SUFFIXES))


def requeue_mounts(environ=os.environ) -> list[Mount]:
    """The SLURM config folder and munge's socket folder of this machine (the submitting one: on a
    cluster, login and compute nodes share these paths). A configless cluster has no config file; its
    clients find the controller through DNS, which containers see."""
    mounts = []
    conf = environ.get("SLURM_CONF") or DEFAULT_SLURM_CONF
    if os.path.isfile(conf):
        folder = os.path.dirname(os.path.abspath(conf))
        mounts.append(Mount(folder, folder, read_only=True))
    for folder in MUNGE_SOCKET_DIRS:
        if os.path.isdir(folder):
            mounts.append(Mount(os.path.realpath(folder), MUNGE_SOCKET_DIR_INSIDE))
            break
    return mounts


def mounts(cfg: Config, environ=os.environ) -> list[Mount]:
    """Run root (read-write), data folder (read-only), what requeueing needs, then slurm.container_mounts."""
    found = [Mount(cfg.run.root, cfg.run.root)]
    path = cfg.data.path
    if path is not None and "://" not in path:
        found.append(Mount(path, path, read_only=True))
    found += requeue_mounts(environ)
    found += [Mount.parse(spec) for spec in cfg.slurm.container_mounts]
    return list(dict.fromkeys(found))  # the same mount twice would make pyxis fail


def srun_args(cfg: Config, environ=os.environ) -> list[str]:
    """pyxis reads its options from srun's command line."""
    s = cfg.slurm
    if s.container is None or s.container_runtime != "pyxis":
        return []
    return [f"--container-image={s.container}", f"--container-mounts={','.join(map(str, mounts(cfg, environ)))}"]


def python_command(cfg: Config, gpus: int, environ=os.environ) -> str | None:
    """The shell command submitit starts the job's Python with, inside srun (None: this Python)."""
    s = cfg.slurm
    if s.container is None:
        return None
    if s.container_runtime == "pyxis":  # srun has already entered the container
        return shlex.quote(s.container_python)
    binds = [f"--bind={mount}" for mount in mounts(cfg, environ)]
    nv = ["--nv"] if gpus else []  # the host's driver libraries and GPUs
    return shlex.join(["apptainer", "exec", *nv, *binds, s.container, s.container_python])


def check(cfg: Config) -> list[str]:
    """File-system checks before submission: the image file, and the sources of extra mounts."""
    s = cfg.slurm
    if s.container is None:
        return []
    problems = []
    if image_is_path(cfg) and not os.path.exists(s.container):
        hint = ("apptainer build sslscale.sif docker-daemon://sslscale:TAG" if s.container_runtime == "apptainer"
                else "enroot import dockerd://sslscale:TAG")
        problems.append(f"slurm.container: image file {os.path.abspath(s.container)} does not exist "
                        f"(make one with: {hint})")
    for key, path in (("run.root", cfg.run.root), ("data.path", cfg.data.path)):
        if path is not None and "://" not in path and any(c in path for c in ":,"):
            problems.append(f"{key}: {path} has ':' or ',', which a container's mount list cannot carry; "
                            "move or link it elsewhere")
    for spec in s.container_mounts:
        if not os.path.exists(Mount.parse(spec).source):
            problems.append(f"slurm.container_mounts: {spec!r}: {Mount.parse(spec).source} does not exist")
    return problems
