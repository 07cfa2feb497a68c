"""Peak dense throughput of the accelerators MFU is measured against.

Model FLOPs utilisation = the FLOPs a step needs (fvcore's count, a multiply-add as two FLOPs) per
second achieved, over the device's peak for the step's precision. The peaks are the vendors' dense
(no sparsity) figures for the SXM parts; fp32 runs are measured against TF32, the tensor-core format
PyTorch uses for fp32 convolutions by default.
"""
from __future__ import annotations

import torch

# TFLOP/s, dense: (substring of torch.cuda.get_device_name(), {precision: peak}).
PEAKS_TFLOPS = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """FLOP/s of one device of this kind at this precision; None where the table has none (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, peaks in PEAKS_TFLOPS:
        if part in name:
            return peaks[precision] * 1e12
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
