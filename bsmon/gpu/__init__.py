"""GPU telemetry from NVML (nvidia-ml-py), read in the monitor process, never in the training job.

:class:`GpuSampler` polls NVML on a daemon thread and hands out immutable :class:`GpuSnapshot` s.
Every value in a :class:`GpuReading` may be ``None``, which the UI shows as N/A: the driver may
not support a query, forbid it, lack the function altogether (older drivers), or have lost the GPU.
A machine without NVML gets a snapshot whose ``banner`` says why, never an exception.

The parts, each in its own module:

- :mod:`~bsmon.gpu.records`: the readings, their JSON records and CSV columns (pure data).
- :mod:`~bsmon.gpu.processes`: which processes NVML lists are the job's (PID namespaces, parents).
- :mod:`~bsmon.gpu.nvml`: one NVML session, the fallbacks between driver and nvidia-ml-py
  versions, and the process lists read with bsmon's own structs.
- :mod:`~bsmon.gpu.sampler`: which GPUs to watch, the readings, and the sampling thread.

What has been checked on real hardware, and what only against the fake driver of the tests,
is in docs/gpu.md; ``demos/gpu_check.py`` is the check to run on a GPU machine.
"""

from bsmon.gpu.records import CSV_COLUMNS, GpuReading, GpuSnapshot
from bsmon.gpu.sampler import GpuSampler

__all__ = ["CSV_COLUMNS", "GpuReading", "GpuSampler", "GpuSnapshot"]
