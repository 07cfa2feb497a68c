"""The processes of a run: their ranks and devices from torchrun or SLURM variables, and the process group.

One process per GPU (or per CPU "device" for gloo tests). The global batch of a recipe is split
evenly over ranks; the collectives of this package are what make W ranks compute what one process
would on the whole global batch.
"""
from __future__ import annotations

import datetime
import os
import re
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DistributedSetupError(RuntimeError):
    """Launcher variables that cannot describe a valid process group."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun | slurm | none

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[007-009,012],cpu1' -> 'gpu007'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise DistributedSetupError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int(environ, name: str) -> int:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        raise DistributedSetupError(f"environment variable {name}={environ.get(name)!r} is not an integer") from None


def read_env(environ=None) -> DistEnv:
    """Where this process sits: torchrun's variables first, then SLURM's (one task per GPU)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = DistEnv(rank=_int(environ, "RANK"), world_size=_int(environ, "WORLD_SIZE"),
                      local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
                      master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                      master_port=int(environ.get("MASTER_PORT", 29500)), launcher="torchrun")
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and _int(environ, "SLURM_NTASKS") > 1:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistributedSetupError("SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST "
                                        "is set")
        job = _int(environ, "SLURM_JOB_ID") if "SLURM_JOB_ID" in environ else 0
        env = DistEnv(rank=_int(environ, "SLURM_PROCID"), world_size=_int(environ, "SLURM_NTASKS"),
                      local_rank=_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
                      master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
                      # A port per job, so two jobs sharing a node do not collide.
                      master_port=int(environ.get("MASTER_PORT") or 20000 + job % 20000), launcher="slurm")
    else:
        return DistEnv()
    if not 0 <= env.rank < env.world_size:
        raise DistributedSetupError(f"{env.launcher}: rank {env.rank} is outside world size {env.world_size}")
    if env.local_rank < 0 or env.local_rank > env.rank:
        raise DistributedSetupError(f"{env.launcher}: local rank {env.local_rank} is impossible for rank {env.rank}")
    return env


def local_gpu_index(local_rank: int) -> int:
    """This process's GPU: the only one it sees (SLURM's --gpus-per-task=1 binding), else its local rank."""
    visible = torch.cuda.device_count()
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise DistributedSetupError(f"local rank {local_rank} but only {visible} GPUs are visible to this process")
    return local_rank


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float) -> dist.Store | None:
    """NCCL for GPUs, gloo for CPUs; collectives time out instead of blocking forever. Returns the
    rendezvous store (PeerWatch uses it), or None without a process group."""
    if not env.is_distributed:
        return None
    timeout = datetime.timedelta(seconds=timeout_s)
    # Under torchrun the agent already serves the store on MASTER_PORT (and outlives its workers);
    # otherwise (srun, plain processes) rank 0 serves it.
    serve = env.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=serve, timeout=timeout,
                          wait_for_workers=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
    return store


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
