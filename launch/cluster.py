"""What the SLURM cluster offers, asked before submitting: partitions, the default one, GPUs per node,
node counts, and whether a run's earlier job is still queued. Problems come back as messages that
name the setting to change, so a job that cannot run is never queued."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass


class ClusterUnavailable(RuntimeError):
    pass


@dataclass
class Partition:
    name: str
    is_default: bool
    nodes: int
    max_gpus_per_node: int


def _run(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        raise ClusterUnavailable(f"{command[0]} not found: is this a SLURM login node? (--cluster local runs the "
                                 "same job shape on this machine)")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no message"])[-1]  # SLURM's tools end on the reason
        raise ClusterUnavailable(f"{' '.join(command)} failed: {last_line}")
    return result.stdout


def gpus_in_gres(gres: str) -> int:
    """'gpu:a100:8(S:0-1),shard:16' -> 8; '(null)' -> 0."""
    counts = [int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres)]
    return max(counts, default=0)


def partitions() -> dict[str, Partition]:
    found: dict[str, Partition] = {}
    for line in _run(["sinfo", "-h", "-o", "%P|%D|%G"]).splitlines():
        name, nodes, gres = line.strip().split("|")
        is_default = name.endswith("*")
        name = name.rstrip("*")
        entry = found.setdefault(name, Partition(name, is_default, 0, 0))
        entry.nodes += int(nodes)
        entry.max_gpus_per_node = max(entry.max_gpus_per_node, gpus_in_gres(gres))
    return found


def check_job_shape(partition: str | None, nodes: int, gpus_per_node: int) -> list[str]:
    """Messages for a job this cluster cannot run."""
    available = partitions()
    if partition is None:
        defaults = [p for p in available.values() if p.is_default]
        if not defaults:
            return [f"slurm.partition: this cluster has no default partition; choose one of "
                    f"{', '.join(sorted(available))} (--partition)"]
        chosen = defaults[0]
    elif partition not in available:
        return [f"slurm.partition: {partition!r} does not exist here; choose one of {', '.join(sorted(available))}"]
    else:
        chosen = available[partition]
    problems = []
    if gpus_per_node > chosen.max_gpus_per_node:
        problems.append(f"slurm.gpus_per_node: {gpus_per_node}, but the nodes of partition {chosen.name} have at "
                        f"most {chosen.max_gpus_per_node} GPUs (--gpus-per-node)")
    if nodes > chosen.nodes:
        problems.append(f"slurm.nodes: {nodes}, but partition {chosen.name} has {chosen.nodes} nodes (--nodes)")
    return problems


def queued(job_id: str) -> bool:
    """Whether a job is still pending or running (requeued jobs keep their id)."""
    try:
        return bool(_run(["squeue", "-h", "-j", job_id, "-o", "%T"]).strip())
    except ClusterUnavailable:
        return False  # squeue refuses ids it no longer knows
