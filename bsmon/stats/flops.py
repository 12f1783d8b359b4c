"""Achieved FLOP/s and model FLOPs utilisation (MFU) from a step's FLOP count and a GPU's peak.

MFU = achieved FLOP/s / (peak FLOP/s per GPU x GPUs). The peak is the dense (no 2:4 sparsity)
tensor-core figure from NVIDIA's data sheets for the dtype the step computes in; a float32 step
uses the TF32 peak when PyTorch lets matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32``
or ``torch.set_float32_matmul_precision("high")``) on GPUs that have it. Devices not in the table,
and dtypes a GPU has no peak for, get no MFU and say so.
"""

from __future__ import annotations

import re

#: Dense peak TFLOP/s by dtype, from NVIDIA's data sheets (the sparse figures halved). Patterns are
#: tried in order against the device name PyTorch reports (e.g. "NVIDIA H100 80GB HBM3").
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"H100 NVL|H200 NVL", "H100/H200 NVL", {"fp64": 60, "fp32": 60, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H100.*PCIe", "H100 PCIe", {"fp64": 51, "fp32": 51, "tf32": 378, "bf16": 756, "fp16": 756}),
    (r"H100|H200|GH200", "H100/H200 SXM", {"fp64": 67, "fp32": 67, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    (r"A100", "A100", {"fp64": 19.5, "fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}),
    (r"\bA30\b", "A30", {"fp64": 10.3, "fp32": 10.3, "tf32": 82, "bf16": 165, "fp16": 165}),
    (r"\bA10\b", "A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125, "fp16": 125}),
    (r"L40S", "L40S", {"fp32": 91.6, "tf32": 183, "bf16": 362, "fp16": 362}),
    (r"\bL40\b", "L40", {"fp32": 90.5, "tf32": 90.5, "bf16": 181, "fp16": 181}),
    (r"\bL4\b", "L4", {"fp32": 30.3, "tf32": 60, "bf16": 121, "fp16": 121}),
    (r"V100S", "V100S", {"fp64": 8.2, "fp32": 16.4, "fp16": 130}),
    (r"V100.*PCIE", "V100 PCIe", {"fp64": 7, "fp32": 14, "fp16": 112}),
    (r"V100", "V100 SXM2", {"fp64": 7.8, "fp32": 15.7, "fp16": 125}),
    (r"\bT4\b", "T4", {"fp32": 8.1, "fp16": 65}),
)

#: torch dtype names (as the probe records them) -> the table's columns.
DTYPES = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

REASON_CPU = "CPU job"


def peak_flops(device: str | None, dtype: str | None, tf32: bool = False) -> tuple[float | None, str]:
    """(peak FLOP/s of one GPU, what it is) or (None, why there is none).

    ``device``: the name PyTorch reports (None for the CPU); ``dtype``: the step's compute dtype
    ("bfloat16", "float32", ...); ``tf32``: float32 matmuls may use TF32 tensor cores.
    """
    if device is None:
        return None, REASON_CPU
    column = DTYPES.get(dtype or "")
    if column is None:
        return None, f"no peak for dtype {dtype}"
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, device, re.IGNORECASE):
            if column == "fp32" and tf32 and "tf32" in peaks:
                column = "tf32"
            if column not in peaks:
                return None, f"the {label} has no {dtype} tensor-core peak in bsmon's table"
            return peaks[column] * 1e12, f"{label} {column} peak"
    return None, f"the peak FLOP/s of {device} is not in bsmon's table (bsmon/stats/flops.py)"


def mfu(flops_per_s: float, peak_per_gpu: float, gpus: int) -> float:
    """Achieved FLOP/s over the peak of ``gpus`` GPUs."""
    return flops_per_s / (peak_per_gpu * gpus)
