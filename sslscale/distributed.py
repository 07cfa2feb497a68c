"""Process groups from torchrun or SLURM variables, gathers that keep gradients, cross-rank
BatchNorm, and the data-parallel wrap.

One process per GPU (or per CPU "device" for gloo tests). The global batch of a recipe is split
evenly over ranks; every collective here is what makes W ranks compute what one process would on
the whole global batch.
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


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank died or hangs."""


def is_collective_failure(error: BaseException) -> bool:
    """torch raises DistError subclasses for NCCL and store failures, but gloo's are plain RuntimeErrors
    that name gloo's transport ("[.../gloo/transport/tcp/pair.cc:545] Read error ...")."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and re.search(r"gloo|NCCL|[Tt]imed out", str(error)) is not None


class PeerWatch:
    """Names the rank that broke a collective. Every rank bumps a counter in the rendezvous store from
    a background thread; when a collective fails, the survivors look at whose counter stopped moving
    (a dead process) and at which ranks did not finish the current step (a hung one).

    The store outlives a dead rank under torchrun (the agent serves it); under srun rank 0 serves it,
    so if rank 0 dies the store goes with it, and that is what the message then says."""

    def __init__(self, env: DistEnv, store: dist.Store, interval_s: float = 1.0):
        self.env, self.interval_s = env, interval_s
        self.store = dist.PrefixStore("sslscale/peers", store)
        self.step = 0
        self._stop = threading.Event()
        self._beats = 0
        self._thread = threading.Thread(target=self._beat, name="sslscale-peer-watch", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._beats += 1
            try:
                self.store.set(f"beat/{self.env.rank}", str(self._beats))
                self.store.set(f"step/{self.env.rank}", str(self.step))
            except Exception:  # noqa: BLE001  the store is gone; the failing collective reports it
                return
            self._stop.wait(self.interval_s)

    def finished_step(self, step: int) -> None:
        self.step = step

    def _read(self, kind: str) -> dict[int, int]:
        keys = [f"{kind}/{r}" for r in range(self.env.world_size)]
        return {r: int(v) for r, v in enumerate(self.store.multi_get(keys))}

    def diagnose(self) -> str:
        """Which ranks stopped (dead) or lag behind this one (hung); blocks about 3 beat intervals."""
        others = [r for r in range(self.env.world_size) if r != self.env.rank]
        try:
            self.store.set_timeout(datetime.timedelta(seconds=10 * self.interval_s))
            before = self._read("beat")
            time.sleep(3 * self.interval_s)
            after, steps = self._read("beat"), self._read("step")
        except Exception:  # noqa: BLE001
            return (f"the rendezvous store at {self.env.master_addr}:{self.env.master_port} is unreachable too, so "
                    "the process serving it (rank 0, unless torchrun serves it) probably died")
        dead = [r for r in others if after[r] == before[r]]
        if dead:
            return "; ".join(f"rank {r} stopped responding (dead?); it last reported step {steps[r]}" for r in dead)
        behind = [r for r in others if steps[r] < self.step]
        if behind:
            return "; ".join(f"rank {r} is alive but still at step {steps[r]} (hung?)" for r in behind)
        return "every rank is alive and at this step; see the error above"

    def close(self) -> None:
        """Stop beating and wait for the thread: a thread left inside a store call while the process exits
        (or while rank 0, which may serve the store, exits) can abort the process at teardown."""
        self._stop.set()
        self._thread.join(timeout=10 * self.interval_s)


class AllGatherWithGrad:
    """Concatenates (or sums) a tensor over ranks, keeping gradients. The gather's backward sums every
    rank's gradient of the gathered rows onto the rank that owns them (torch.distributed.nn's
    all_gather); the sum's backward all-reduces the incoming gradients (its all_reduce). With gradients
    averaged over ranks, each rank then gets the gradient of the global objective."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(x.contiguous()))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(x.contiguous())


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, on every device.

    Each rank computes the mean and variance of its own rows (two passes, in fp32 whatever the input's
    dtype), the ranks all-gather [mean, variance, count] of every channel in one collective, and every
    rank combines them exactly (the parallel form of the variance: the mean of the variances plus the
    variance of the means). The gather keeps gradients (functional collectives, which torch.compile
    traces), so outputs and gradients match one process on the whole batch.

    Why not torch's SyncBatchNorm on GPUs: it reads the gathered counts on the host, one device-host
    synchronisation per BatchNorm layer (114 per step of the m8 recipe), which keeps the host from
    queueing work ahead of the GPU and blocks CUDA graphs; and it has no CPU kernels (gloo tests)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def spans_ranks(self) -> bool:
        """Whether training statistics need the other ranks (one process needs nothing but BatchNorm)."""
        return dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.spans_ranks()):
            return super().forward(x)
        from torch.distributed._functional_collectives import all_gather_tensor_autograd
        dims = [0] + list(range(2, x.dim()))
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        local_mean = x.mean(dims, dtype=torch.float32)
        local_var = (x - local_mean.view(shape)).square().mean(dims, dtype=torch.float32)
        count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        stats = all_gather_tensor_autograd(torch.cat([local_mean, local_var, count]).unsqueeze(0), gather_dim=0,
                                           group=dist.group.WORLD)
        means, variances, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, 2 * channels:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).square())).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * total / (total - 1)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        # x * scale + shift computed in fp32 (bf16 x promotes), rounded to the input's dtype once, as cuDNN does.
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)


def convert_to_cross_rank_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm{1,2,3}d -> CrossRankBatchNorm. The parameter and buffer objects themselves move
    over (not copies), so requires_grad (e.g. of a frozen EMA teacher) and any references stay intact."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        converted = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_cross_rank_batchnorm(child))
    return module


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of the model, on any device, becomes a CrossRankBatchNorm."""
    return convert_to_cross_rank_batchnorm(module)
