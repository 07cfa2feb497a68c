"""The processes of a run: their ranks and devices from torchrun or SLURM variables, and the process group.

One process per GPU (or per CPU "device" for gloo tests). The global batch of a recipe is split
evenly over ranks; the collectives of this package are what make W ranks compute what one process
would on the whole global batch.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


class HostUnreachable(DistributedSetupError):
    """A host of the process group whose name does not resolve here: said on every rank, in one line."""


_HOSTLIST_PART = re.compile(r"([^\[\],]*)(?:\[([^\]]*)\])?")


def _bracket_numbers(body: str, nodelist: str) -> list[str]:
    numbers = []
    for item in body.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise DistributedSetupError(f"cannot read SLURM node list {nodelist!r}: [{body}]")
        if not hi:
            numbers.append(lo)
            continue
        if int(hi) < int(lo):
            raise DistributedSetupError(f"cannot read SLURM node list {nodelist!r}: range {item} runs backwards")
        width = len(lo) if lo.startswith("0") else 0  # zero padding is kept: [098-101] -> 098 ... 101
        numbers += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return numbers


def expand_hostlist(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list, in SLURM's order, as `scontrol show hostnames` writes them:
    'gpu[001-003,007],cpu[1-2]' -> gpu001 gpu002 gpu003 gpu007 cpu1 cpu2; several brackets in one name
    expand as a product, the last fastest ('a[1-2]b[3-4]' -> a1b3 a1b4 a2b3 a2b4)."""
    hosts, text = [], nodelist.strip()
    position = 0
    while position < len(text):
        names = [""]
        while position < len(text) and text[position] != ",":
            match = _HOSTLIST_PART.match(text, position)
            prefix, body = match.groups()
            if match.end() == position:  # a stray ']' or '['
                raise DistributedSetupError(f"cannot read SLURM node list {nodelist!r}")
            position = match.end()
            names = [n + prefix for n in names]
            if body is not None:
                names = [n + number for n in names for number in _bracket_numbers(body, nodelist)]
        if names == [""]:
            raise DistributedSetupError(f"cannot read SLURM node list {nodelist!r}: an empty host name")
        hosts += names
        position += 1  # the comma
    if not hosts:
        raise DistributedSetupError(f"cannot read a host from SLURM node list {nodelist!r}")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[007-009,012],cpu1' -> 'gpu007', 'a[1-2]b[3-4]' -> 'a1b3'."""
    return expand_hostlist(nodelist)[0]


def bounded(call, timeout_s: float, what: str):
    """call() in a helper thread, waiting at most timeout_s: a store whose server vanished without closing its
    connections (a lost node) answers no read or write, and no timeout of TCPStore's bounds that (measured:
    set_timeout does not). Raises TimeoutError naming `what`; the helper thread is left behind, a daemon."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001  handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name="sslscale-bounded-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not answer within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def check_resolves(host: str, role: str, timeout_s: float = 10.0) -> None:
    """Raises HostUnreachable, in one line naming the host, when `host` does not resolve here: gloo and the
    TCPStore would otherwise retry for about a minute per try, without saying which name failed."""
    here = socket.gethostname()
    try:
        bounded(lambda: socket.getaddrinfo(host, None), timeout_s, f"resolving {host!r}")
    except (OSError, TimeoutError) as error:
        raise HostUnreachable(f"{role} {host!r} does not resolve on {here} ({error}); every host of the job must "
                              "resolve the others' names (DNS or /etc/hosts)") from None


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
    check_resolves(env.master_addr, "the rendezvous host (rank 0's, MASTER_ADDR or the first of the node list)")
    if device.type != "cuda":  # gloo binds to the address its own host name resolves to
        check_resolves(socket.gethostname(), f"rank {env.rank}'s own host name")
    # Under torchrun the agent already serves the store on MASTER_PORT (and outlives its workers);
    # otherwise (srun, plain processes) rank 0 serves it.
    serve = env.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=serve, timeout=timeout,
                          wait_for_workers=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
    return store


def hosts_of_ranks(env: DistEnv) -> list[str]:
    """Every rank's host name, by rank (a collective: every rank calls it)."""
    hosts = [None] * env.world_size
    if env.is_distributed:
        dist.all_gather_object(hosts, socket.gethostname())
    else:
        hosts = [socket.gethostname()]
    return hosts


def describe_hosts(hosts: list[str]) -> str:
    """'2 nodes: node1 ranks 0-1, node3 ranks 2-3', the nodes in the order of their first rank."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)

    def spans(numbers: list[int]) -> str:
        parts, start = [], numbers[0]
        for previous, number in zip(numbers, numbers[1:] + [None]):
            if number != previous + 1:
                parts.append(str(start) if start == previous else f"{start}-{previous}")
                start = number
        return ",".join(parts)

    listed = ", ".join(f"{host} rank{'s' if len(r) > 1 else ''} {spans(r)}" for host, r in ranks.items())
    return f"{len(ranks)} node{'s' if len(ranks) > 1 else ''}: {listed}"


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
