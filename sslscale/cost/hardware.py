"""Peak dense throughput of the accelerators MFU is measured against.

Model FLOPs utilisation = the FLOPs a step needs (a multiply-add as two FLOPs) per second achieved, over the
device's peak for the step's precision. The peaks are the vendors' dense figures (half of the "with sparsity"
numbers of their datasheets), per form factor: an H100 NVL or PCIe card has a lower peak than the SXM part
of the same name, and taking the SXM figure for it would understate its MFU by a sixth or more. fp32 runs
are measured against TF32, the tensor-core format PyTorch uses for fp32 convolutions by default. A device the
table does not know gets no MFU and the message says so; `train.peak_tflops` supplies its peak.
"""
from __future__ import annotations

import torch

# (family, form factor or None for the part without a suffix (SXM), {precision: dense TFLOP/s}). Matched on
# torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe". Rows with a form factor come before the family's
# part without one, and GB200 before B200, whose name it contains.
PEAKS_TFLOPS = (
    ("GB200", None, {"bf16": 2500.0, "fp16": 2500.0, "fp32": 1250.0}),
    ("B200", None, {"bf16": 2250.0, "fp16": 2250.0, "fp32": 1100.0}),
    ("H200", "NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5}),
    ("H200", None, {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100", "NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5}),
    ("H100", "PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", None, {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", None, {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),  # SXM and PCIe: the same peak
)


def known_peak_tflops(name: str, precision: str) -> float | None:
    """The table's dense peak of a device called `name` (torch.cuda.get_device_name), or None. The first row
    whose family (and form factor, where the row names one) the name contains: form factors come first."""
    upper = name.upper()
    for family, form_factor, peaks in PEAKS_TFLOPS:
        if family in upper and (form_factor is None or form_factor.upper() in upper):
            return peaks[precision]
    return None


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """FLOP/s of one device of this kind at this precision: `override_tflops` (train.peak_tflops) where given,
    else the table's; None for CPUs and GPUs the table does not know (see peak_problem)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    peak = known_peak_tflops(torch.cuda.get_device_name(device), precision)
    return None if peak is None else peak * 1e12


def peak_problem(device: torch.device, precision: str, override_tflops: float | None = None) -> str | None:
    """Why there is no MFU for this device, in words; None when there is a peak."""
    if peak_flops(device, precision, override_tflops) is not None:
        return None
    if device.type != "cuda":
        return f"no MFU on a {device.type} device (set train.peak_tflops to measure against a peak)"
    return (f"no peak known for {torch.cuda.get_device_name(device)}: set train.peak_tflops to its dense "
            f"{precision} TFLOP/s")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
