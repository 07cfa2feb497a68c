"""slurm: section - the shape of the SLURM job launch/submit.py writes, and the container it runs in."""
from __future__ import annotations

from dataclasses import dataclass, field

from sslscale.config.checks import choice, positive

CLUSTERS = ("slurm", "local", "debug")
CONTAINER_RUNTIMES = ("pyxis", "apptainer")


@dataclass
class SlurmConfig:
    """How launch/submit.py shapes the job (its flags override these). One task per GPU."""
    cluster: str = "slurm"  # slurm | local (this machine, same job shape) | debug (in the submitting process)
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # None: one per GPU (one task if the job has no GPUs)
    cpus_per_task: int = 10
    mem_gb: int | None = None  # per node; None: the partition's default
    time_min: int = 4320
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: enough for one step and a checkpoint
    max_num_timeout: int = 30  # requeues after time limits (pre-emptions do not count)
    max_crash_retries: int = 2  # requeues after a crash (non-zero exit without a signal), then the job fails
    eval_gpus: int = 1  # the evaluation job: extraction on every GPU, then the probes
    eval_tasks: int | None = None  # tasks of the evaluation job; None: one per eval GPU (one without GPUs)
    eval_time_min: int = 240
    # Run every task inside a container image (docs/containers.md). pyxis: an image reference
    # (registry#name:tag) or a squashfs file (.sqsh); apptainer: a .sif file. None: no container.
    container: str | None = None
    container_runtime: str = "pyxis"  # pyxis (srun --container-image) | apptainer (apptainer exec)
    # Mounts beyond those launch/container.py adds (run root, data, SLURM config, munge): SRC[:DST[:ro|rw]].
    container_mounts: list[str] = field(default_factory=list)
    container_python: str = "/opt/sslscale/venv/bin/python"  # the image's Python (the Dockerfile's venv)
    # Shell lines the job script runs before its tasks start, e.g. ["module load cuda/13.0",
    # "source ~/venvs/sslscale/bin/activate"].
    setup: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def eval_task_count(self) -> int:
        return self.eval_tasks or max(self.eval_gpus, 1)


def validate_slurm(s: SlurmConfig) -> list[str]:
    e = choice("slurm.cluster", s.cluster, CLUSTERS)
    for key in ("nodes", "cpus_per_task", "time_min", "eval_time_min"):
        e += positive(f"slurm.{key}", getattr(s, key))
    for key in ("tasks_per_node", "mem_gb", "eval_tasks"):
        if getattr(s, key) is not None:
            e += positive(f"slurm.{key}", getattr(s, key))
    for key in ("gpus_per_node", "eval_gpus", "signal_delay_s", "max_num_timeout", "max_crash_retries"):
        if getattr(s, key) < 0:
            e.append(f"slurm.{key}: {getattr(s, key)} must be >= 0")
    if s.signal_delay_s >= s.time_min * 60:
        e.append(f"slurm.signal_delay_s: {s.signal_delay_s} s is not shorter than slurm.time_min ({s.time_min} min)")
    return e + _validate_container(s)


def _validate_container(s: SlurmConfig) -> list[str]:
    e = choice("slurm.container_runtime", s.container_runtime, CONTAINER_RUNTIMES)
    if s.container is not None:
        if not s.container.strip() or any(c.isspace() for c in s.container):
            e.append(f"slurm.container: {s.container!r}; give an image without spaces, or null for no container")
        elif s.container_runtime == "apptainer" and "://" in s.container:
            e.append(f"slurm.container: {s.container!r}; apptainer would convert it on every task: build a .sif "
                     f"file once (apptainer build sslscale.sif {s.container}) and give its path")
        if s.cluster != "slurm":
            e.append(f"slurm.container: runs tasks through srun or apptainer inside a SLURM job; slurm.cluster "
                     f"is {s.cluster!r} (use slurm, or container: null)")
    for mount in s.container_mounts:
        parts = mount.split(":")
        if "," in mount or len(parts) > 3 or not all(p.startswith("/") for p in parts[:2]) \
                or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            e.append(f"slurm.container_mounts: {mount!r}; expected SRC, SRC:DST or SRC:DST:ro|rw with absolute "
                     "paths and no commas")
    if not s.container_python.startswith("/") or any(c.isspace() for c in s.container_python):
        e.append(f"slurm.container_python: {s.container_python!r}; give the absolute path of Python inside the image")
    return e
