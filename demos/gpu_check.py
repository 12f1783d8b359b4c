"""Real-hardware check of bsmon.gpu: train on CUDA device 0 while a GpuSampler watches this
process, then check the NVML readings against what torch knows about the same GPU.

Run from the repository root on a machine with an NVIDIA GPU:

    .venv/bin/python demos/gpu_check.py

Prints every reading and one line per check; exits 1 if any check fails, and 0 with
"SKIP: no CUDA device" where torch sees no GPU.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from bsmon.gpu import GpuReading, GpuSampler, GpuSnapshot

MIB = 1024 * 1024
TRAIN_SECONDS = 4.0


def train_while_sampling(sampler: GpuSampler, device: torch.device) -> tuple[list[GpuSnapshot], int]:
    """Train a wide MLP for TRAIN_SECONDS, collecting the sampler's snapshots as they appear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 8192), nn.ReLU(), nn.Linear(8192, 4096)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    inputs = torch.randn(8192, 4096, device=device)
    snapshots: dict[float, GpuSnapshot] = {}
    steps = 0
    deadline = time.monotonic() + TRAIN_SECONDS
    while time.monotonic() < deadline:
        loss = model(inputs).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        torch.cuda.synchronize()  # a check script: keep the clock honest, the queue short
        latest = sampler.latest()
        if latest.gpus:  # not the empty snapshot from before the first sample
            snapshots[latest.time] = latest
    return list(snapshots.values()), steps


def describe(reading: GpuReading) -> str:
    def show(value: float | None, unit: str) -> str:
        return "N/A" if value is None else f"{value:.1f}{unit}"
    return (f"GPU {reading.index} {reading.name} {reading.mig or ''} {reading.uuid}\n"
            f"  util {show(reading.util_pct, '%')}  mem util {show(reading.mem_util_pct, '%')}  "
            f"mem {show(reading.mem_used_mib, ' MiB')} used / {show(reading.mem_reserved_mib, ' MiB')} "
            f"reserved / {show(reading.mem_total_mib, ' MiB')} total\n"
            f"  job mem {show(reading.job_mem_mib, ' MiB')}  job util {show(reading.job_util_pct, '%')}  "
            f"power {show(reading.power_w, ' W')} / {show(reading.power_limit_w, ' W')}  "
            f"temp {show(reading.temp_c, ' C')}  SM clock {show(reading.sm_clock_mhz, ' MHz')}\n"
            f"  throttle {', '.join(reading.throttle_reasons) or 'none'}  "
            f"PCIe tx {show(reading.pcie_tx_mib_s, ' MiB/s')} rx {show(reading.pcie_rx_mib_s, ' MiB/s')}")


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    device = torch.device("cuda", 0)
    properties = torch.cuda.get_device_properties(device)
    cuda_uuid = str(properties.uuid)
    probe_uuid = cuda_uuid if cuda_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{cuda_uuid}"
    sampler = GpuSampler(os.getpid(), device_uuids=[probe_uuid],
                         visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    sampler.start()
    try:
        during, steps = train_while_sampling(sampler, device)
        final = sampler.sample_once()  # the training tensors are still allocated
    finally:
        sampler.stop()
    torch_reserved_mib = torch.cuda.memory_reserved(device) / MIB

    print(f"{steps} training steps in {TRAIN_SECONDS:.0f} s; {len(during)} distinct snapshots seen")
    print(f"torch: {properties.name}, UUID {cuda_uuid}, {properties.total_memory / MIB:.0f} MiB total, "
          f"{torch_reserved_mib:.0f} MiB reserved by the caching allocator")
    print(f"banner: {final.banner}\nhint: {final.hint}\nselection rule: {sampler.selection_rule}")
    for reading in final.gpus:
        print(describe(reading))

    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
        if not ok:
            failures.append(what)

    check(final.banner is None, "NVML started without a banner")
    check(sampler.selection_rule == "device_uuids" and len(final.gpus) == 1,
          "torch's device UUID selected exactly one NVML device")
    if final.banner is not None or len(final.gpus) != 1:
        print(f"{len(failures)} check(s) failed")
        return 1
    gpu = final.gpus[0]
    check(gpu.uuid is not None and gpu.uuid[4:].lower() == probe_uuid[4:].lower(),
          "the reading is the GPU torch trained on")
    check(gpu.job_mem_mib is not None and gpu.job_mem_mib > 0, "job memory > 0")
    check(gpu.job_mem_mib is not None and gpu.job_mem_mib >= torch_reserved_mib,
          "job memory covers torch's reserved memory (NVML adds the CUDA context)")
    check(gpu.mem_total_mib is not None and gpu.mem_used_mib is not None
          and gpu.mem_total_mib >= gpu.mem_used_mib, "total memory >= used memory")
    check(gpu.mem_used_mib is not None and gpu.job_mem_mib is not None
          and gpu.mem_used_mib + (gpu.mem_reserved_mib or 0) >= gpu.job_mem_mib,
          "the GPU's used memory includes the job's")
    check(gpu.mem_total_mib is not None
          and abs(gpu.mem_total_mib - properties.total_memory / MIB) <= 0.1 * gpu.mem_total_mib,
          "NVML's total memory agrees with torch's within 10 %")
    utils = [r.util_pct for s in during for r in s.gpus if r.util_pct is not None]
    check(bool(utils) and all(0 <= u <= 100 for u in utils), "utilisation within 0-100 %")
    check(bool(utils) and max(utils) >= 10,
          f"utilisation while training reached 10 % (max {max(utils, default=0):.0f} %)")
    job_utils = [r.job_util_pct for s in during for r in s.gpus if r.job_util_pct is not None]
    check(all(0 <= u <= 100 for u in job_utils),
          f"job utilisation within 0-100 % ({len(job_utils)} readings)")
    check(gpu.temp_c is not None and 5 <= gpu.temp_c <= 105, "temperature plausible (5-105 C)")
    check(gpu.sm_clock_mhz is not None and gpu.sm_clock_mhz > 0, "SM clock > 0")
    check(gpu.power_w is None or (gpu.power_w > 0 and (gpu.power_limit_w is None
                                                       or gpu.power_w <= 1.5 * gpu.power_limit_w)),
          "power positive and not far above the limit")
    check(len(during) >= 2 * TRAIN_SECONDS - 1,
          f"sampler ran at >= 2 Hz ({len(during)} snapshots in {TRAIN_SECONDS:.0f} s)")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
