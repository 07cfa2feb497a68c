"""How much memory one training step needs, estimated before the run starts, and whether this machine has it.

The activations a step keeps for its backward pass are counted by running the model's forward once on the
meta device (shapes, no values, no compute: under a second for ResNet-50 at an ImageNet batch) with a
saved-tensors hook that adds up every storage autograd keeps, parameters excluded. Under fp16 / bf16 autocast
nearly every kept tensor is half-sized, so the fp32 count is halved. Transient tensors of the backward pass
and library workspaces are not counted: the estimate is a lower bound, and a step it says cannot fit
certainly cannot. That is all the check claims; it refuses, it never promises that a step will fit.

Host memory counts what the loader keeps in flight too: the torchvision backend's workers prefetch
`PREFETCH_FACTOR` batches each, in float32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from data_pipelines.augment import crop_sizes
from sslscale.config import Config, ConfigError
from sslscale.cost.model_state import memory_per_rank, module_parameters
from sslscale.dist.batchnorm import sync_batchnorm
from sslscale.objectives.ssl_model import build_model

PREFETCH_FACTOR = 4  # data_pipelines/torchvision.py: batches each DataLoader worker keeps ready
REDUCED_PRECISION = ("fp16", "bf16")


@dataclass
class StepMemory:
    """Bytes per rank of one training step, by part."""
    activations: int  # kept for the backward pass
    crops: int  # one batch of crops on the training device
    loader: int  # batches in flight in the loader's workers (host memory)
    model_state: int  # weights, gradients, optimizer state and buffers (plan's memory_per_rank_bytes)

    def on_device(self, device_type: str) -> int:
        """What the training device must hold; on a CPU that is the host, loader included."""
        device = self.activations + self.crops + self.model_state
        return device + self.loader if device_type == "cpu" else device

    def as_dict(self) -> dict:
        return {"activations": self.activations, "crops": self.crops, "loader": self.loader,
                "model_state": self.model_state}


def count_activations(model: torch.nn.Module, cfg: Config, per_rank_batch: int) -> int:
    """Bytes autograd keeps for the backward pass of one step of `per_rank_batch` images, fp32, for a `model`
    on the meta device."""
    crops = [torch.empty(per_rank_batch, 3, size, size, device="meta") for size in crop_sizes(cfg.data.crops)]
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:  # one storage counts once, however many views autograd keeps of it
            kept[storage._cdata] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(crops, 0)
    return sum(kept.values())


def estimate_step_memory(cfg: Config, per_rank_batch: int, world_size: int) -> StepMemory:
    """One step of `cfg` at `per_rank_batch` images per rank on `world_size` ranks, from a model of its own
    on the meta device (the caller's random number generators are left as they were)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(cfg, steps_per_epoch=1.0, total_steps=1)
    if world_size > 1:  # the BatchNorm that will run: statistics across ranks (dist/parallel.py prepare_batchnorm)
        model = sync_batchnorm(model, collective=True)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    model_state = memory_per_rank(module_parameters(model), cfg, world_size, buffers)["total"]
    activations = count_activations(model, cfg, per_rank_batch)
    if cfg.train.precision in REDUCED_PRECISION:
        activations //= 2
    crop_bytes = per_rank_batch * sum(3 * size * size * 4 for size in crop_sizes(cfg.data.crops))
    in_flight = cfg.data.num_workers * PREFETCH_FACTOR if cfg.data.backend == "torchvision" else 0
    return StepMemory(activations=activations, crops=crop_bytes, loader=in_flight * crop_bytes,
                      model_state=model_state)


def local_processes() -> int:
    """Training processes sharing this host (and its memory): torchrun's and SLURM's count, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]  # SLURM may write "8(x2)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def available_host_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by the cgroup's limit (SLURM and
    containers set one); None where neither can be read."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            maximum = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
        if maximum.isdigit():
            limits.append(int(maximum) - current)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def available_memory(device: torch.device) -> int | None:
    """Bytes one training process may use on `device` (its share of the host on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        host = available_host_memory()
        return None if host is None else host // local_processes()
    return None  # meta and others: nothing to check


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def describe(memory: StepMemory, device_type: str) -> str:
    parts = [f"activations {gib(memory.activations)}", f"crops {gib(memory.crops)}"]
    if device_type == "cpu" and memory.loader:
        parts.append(f"loader prefetch {gib(memory.loader)}")
    parts.append(f"weights, gradients and optimizer {gib(memory.model_state)}")
    return f"{' + '.join(parts)} = {gib(memory.on_device(device_type))}"


class StepDoesNotFit(ConfigError):
    """A config whose training step cannot fit the device: a smaller per-rank batch might (benchmarks that
    search for the largest batch catch this one)."""


def check_fits(memory: StepMemory, device: torch.device, per_rank_batch: int) -> str | None:
    """A one-line problem when the step cannot fit on `device`, else None."""
    have = available_memory(device)
    need = memory.on_device(device.type)
    if have is None or need <= have:
        return None
    where = "GPU memory" if device.type == "cuda" else "available host memory for this process"
    return (f"one training step needs at least {describe(memory, device.type)} per rank at {per_rank_batch} "
            f"images per rank, more than the {gib(have)} of {where}: lower data.batch_size, the crop sizes or "
            f"counts (data.crops), or use more ranks")
