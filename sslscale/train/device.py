"""How a process computes: its device (its own GPU by local rank, or the CPU), the precision of autocast,
the memory layout of the convnet's tensors, and deterministic kernels when asked."""
from __future__ import annotations

import contextlib
import os

import torch

from sslscale.config import ConfigError
from sslscale.dist.process_group import local_gpu_index


def memory_format(train_cfg) -> torch.memory_format:
    return torch.channels_last if train_cfg.channels_last else torch.contiguous_format


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of this process: its own GPU (by local rank) or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(["train.device: 'cuda' but no CUDA device is available; use auto or cpu"])
        index = local_gpu_index(local_rank)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def use_deterministic_kernels() -> None:
    """The same numbers from the same inputs on a GPU: no cuDNN autotuning, deterministic algorithms only
    (a warning names any op without one), and cuBLAS with a fixed workspace (read when cuBLAS starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the model computes in (autocast's), which the input pipeline delivers crops for."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision(precision: str, device: torch.device, stream) -> None:
    """fp16 autocast on a CPU is refused: it runs several times slower than fp32 there (measured ~7x) and
    needs loss scaling for nothing. bf16 runs, with a warning: CPUs with AMX/AVX512-BF16 do gain from it."""
    if device.type != "cpu" or precision == "fp32":
        return
    if precision == "fp16":
        raise ConfigError(["train.precision: fp16 on a CPU device runs several times slower than fp32 (no fp16 "
                           "kernels there); use fp32 (or bf16), or a GPU"])
    if stream is not None:
        print("warning: train.precision bf16 on a CPU is only faster on CPUs with bf16 units (AMX, AVX512-BF16); "
              "fp32 may be faster here", file=stream, flush=True)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(precision))
