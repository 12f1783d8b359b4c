"""A stand-in for libnvidia-ml.so.1 that replays NVIDIA driver behaviour under the real pynvml.

bsmon talks to NVML through the ``pynvml`` module of nvidia-ml-py. Faking that module would also
fake pynvml's own logic: its struct versions, the count-then-read protocol of the process lists,
the NVML_VALUE_NOT_AVAILABLE conversion and the mapping of return codes to exception classes.
So this fake sits one level lower. :meth:`FakeDriver.nvml` loads a private copy of the installed
pynvml and gives it a fake *library* whose functions take the same ctypes arguments as the C
symbols and answer with NVML return codes. Everything above the C boundary is the real code.

Older nvidia-ml-py releases are replayed on that copy by :class:`PynvmlRelease`: the functions,
constants and structs a release lacks are removed, its process-list calls read into its own
struct (vendored here from its pynvml.py), and releases before 11.515 return ``bytes`` from the
string getters. :data:`RELEASES` holds the oldest supported release, the one whose struct
misreads current drivers, and the installed (newest) one; tests run against each.

Driver behaviour replayed here (facts from nvml.h, nvidia-ml-py, nvitop and gpustat):

- A symbol the driver does not export is an AttributeError on the library, which pynvml turns
  into NVMLError_FunctionNotFound (``missing=``; see :data:`R470_MISSING`).
- Process lists: a call with a NULL buffer returns SUCCESS for an empty list and otherwise
  INSUFFICIENT_SIZE with the count; a read into a buffer smaller than the current list returns
  INSUFFICIENT_SIZE with the new count. ``FakeGpu.churn`` swaps the list right after a count
  query, replaying processes that start or exit between pynvml's two calls.
- R535 drivers (confidential computing, no nvmlDeviceGetRunningProcessDetailList) write v3 process
  entries with an extra ``usedGpuCcProtectedMemory`` field; others write the v2 layout. The fake
  writes raw entries in the driver's layout, whatever struct pynvml passed (``missing=R535_MISSING``).
- ``usedGpuMemory`` is NVML_VALUE_NOT_AVAILABLE (all ones) when the driver cannot attribute memory.
- Memory v1 folds the driver's reserved memory into ``used``; v2 reports it apart and checks the
  struct version.
- Per-process utilisation: the driver samples every ``util_sample_period_s`` (None: at every
  call) and returns NOT_FOUND when no sample is newer than ``lastSeenTimeStamp``.
- A GPU that comes back after a reset (:meth:`FakeDriver.reset`) has new handles; the old ones
  keep answering GPU_IS_LOST.
- NVML's PIDs are those of this test's own PID namespace (``FakeDriver.pid_namespace``).
- MIG: a slice's handle answers NOT_SUPPORTED for utilisation (nvidia-smi shows N/A); the parent
  GPU answers NO_PERMISSION for memory and process lists (nvml.h: the aggregate view needs
  privileges) and NOT_SUPPORTED for utilisation. That a slice also refuses power, temperature,
  clocks, clock reasons, PCIe, per-process utilisation and the minor number is this fake's
  assumption; it makes any reading of those from the slice instead of its parent show up as a
  missing value.
- A lost GPU answers GPU_IS_LOST to everything; any call before nvmlInit answers UNINITIALIZED.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import count
from types import ModuleType

import pynvml as _installed_pynvml

from bsmon.gpu import GpuSampler

MIB = 1024 * 1024

# Symbols an R470-era driver (before R510/R515/R535) lacks.
R470_MISSING = frozenset({
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetConfComputeMemSizeInfo",
    "nvmlDeviceGetRunningProcessDetailList",
})
# An R535 driver has confidential computing but not yet the process detail list (R550).
R535_MISSING = frozenset({"nvmlDeviceGetRunningProcessDetailList"})


class _ProcessInfoCcLayout(ctypes.Structure):
    """The v3 process entry as R535 drivers write it; also c_nvmlProcessInfo_t of nvidia-ml-py 12.535.77."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint),
                ("usedGpuCcProtectedMemory", ctypes.c_ulonglong)]


class _ProcessInfoV2Layout(ctypes.Structure):
    """The process entry as every other driver writes it (v2, and v3 outside R535); c_nvmlProcessInfo_t
    of nvidia-ml-py 11.495.46 and 11.515.x, c_nvmlProcessInfo_v2_t (and _v3_t) from 12.535.108."""

    _fields_ = _ProcessInfoCcLayout._fields_[:4]


class _ProcessInfoV1Layout(ctypes.Structure):
    """The entry of the unversioned call; c_nvmlProcessInfo_t of nvidia-ml-py 11.450.x."""

    _fields_ = _ProcessInfoCcLayout._fields_[:2]


@dataclass(frozen=True)
class PynvmlRelease:
    """What one nvidia-ml-py release has, for the calls bsmon makes (read from its pynvml.py).

    ``process_calls``: pynvml function -> (C symbol it calls, struct it reads the entries into),
    for the releases whose process lists differ from the installed one's.
    """

    version: str
    absent: frozenset[str] = frozenset()
    process_calls: dict[str, tuple[str, type[ctypes.Structure]]] = field(default_factory=dict)
    bytes_strings: bool = False  # no convertStrBytes yet: string getters return bytes
    memory_version_argument: bool = True  # nvmlDeviceGetMemoryInfo(handle, version=None)


def _calls(struct: type[ctypes.Structure], *names: tuple[str, str]) -> dict[str, tuple[str, type]]:
    return {name: (symbol, struct) for name, symbol in names}


_V2_NAMES = ("nvmlDeviceGetComputeRunningProcesses_v2", "nvmlDeviceGetGraphicsRunningProcesses_v2")
_V3_NAMES = ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v3")
_NO_TEMPERATURE_V = ("nvmlDeviceGetTemperatureV", "nvmlTemperature_v1", "c_nvmlTemperature_v1_t")  # to 12.550 at least
_BEFORE_11_515 = ("nvmlMemory_v2", "c_nvmlMemory_v2_t",  # the v2 memory struct came in 11.510
                  "convertStrBytes", "nvmlDeviceGetCurrentClocksEventReasons", "NVML_ERROR_ARGUMENT_VERSION_MISMATCH")

OLDEST = PynvmlRelease(  # the lower bound in pyproject.toml
    "11.450.51",
    absent=frozenset({*_V2_NAMES, *_V3_NAMES, *_NO_TEMPERATURE_V, *_BEFORE_11_515,
                      "c_nvmlProcessInfo_v2_t", "c_nvmlProcessInfo_v3_t"}),
    process_calls=_calls(_ProcessInfoV1Layout,
                         ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses"),
                         ("nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses")),
    bytes_strings=True, memory_version_argument=False)
R11_495 = PynvmlRelease(  # the bytes reproduction
    "11.495.46",
    absent=frozenset({*_V3_NAMES, *_NO_TEMPERATURE_V, *_BEFORE_11_515,
                      "c_nvmlProcessInfo_v2_t", "c_nvmlProcessInfo_v3_t"}),
    process_calls=_calls(_ProcessInfoV2Layout, *((n, n) for n in _V2_NAMES),
                         ("nvmlDeviceGetComputeRunningProcesses", _V2_NAMES[0]),
                         ("nvmlDeviceGetGraphicsRunningProcesses", _V2_NAMES[1])),
    bytes_strings=True, memory_version_argument=False)
R12_535_77 = PynvmlRelease(  # its only process struct has R535's extra field
    "12.535.77",
    absent=frozenset({*_V2_NAMES, *_NO_TEMPERATURE_V, "c_nvmlProcessInfo_v2_t", "c_nvmlProcessInfo_v3_t"}),
    process_calls=_calls(_ProcessInfoCcLayout, *((n, n) for n in _V3_NAMES),
                         ("nvmlDeviceGetComputeRunningProcesses", _V3_NAMES[0]),
                         ("nvmlDeviceGetGraphicsRunningProcesses", _V3_NAMES[1])))
NEWEST = PynvmlRelease(importlib.metadata.version("nvidia-ml-py"))  # the installed one, as it is
RELEASES = (OLDEST, R11_495, R12_535_77, NEWEST)
RELEASE = NEWEST  # what FakeDriver replays unless told otherwise (tests/test_gpu.py sets it)

_MIG_SLICE_NOT_SUPPORTED = frozenset({
    "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetPowerManagementLimit", "nvmlDeviceGetTemperature", "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons", "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetProcessUtilization", "nvmlDeviceGetMigMode", "nvmlDeviceGetMinorNumber",
})
_MIG_PARENT_NO_PERMISSION = frozenset({
    "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetComputeRunningProcesses_v2", "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses_v2", "nvmlDeviceGetGraphicsRunningProcesses_v3",
})

_NOT_AVAILABLE = ctypes.c_ulonglong(-1).value
_NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId/computeInstanceId outside MIG
_STRING_GETTERS = ("nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlSystemGetDriverVersion",
                   "nvmlSystemGetNVMLVersion", "nvmlErrorString")
_nv = _installed_pynvml  # the driver's return codes and struct versions (nvml.h), whatever the release


@dataclass
class FakeProcess:
    pid: int
    used_mib: float | None  # None: the driver reports NVML_VALUE_NOT_AVAILABLE
    sm_util: int | None = None  # None: no utilisation sample for this process


@dataclass
class FakeGpu:
    """One GPU (or MIG slice, inside ``mig_slices``) as the driver would describe it."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total_mib: int = 81559
    used_mib: int = 30000
    reserved_mib: int = 527
    util_gpu: int = 97
    util_memory: int = 41
    power_mw: int = 612_345
    power_limit_mw: int = 700_000
    temp_c: int = 63
    sm_clock_mhz: int = 1755
    clock_reasons: int = 0
    pcie_tx_kib_s: int = 20480
    pcie_rx_kib_s: int = 5120
    compute: list[FakeProcess] = field(default_factory=list)
    graphics: list[FakeProcess] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # symbol -> NVML return code
    lost: bool = False
    mig_slices: list[FakeGpu] = field(default_factory=list)  # non-empty: MIG mode enabled
    churn: list[list[FakeProcess]] = field(default_factory=list)  # compute lists after count queries
    util_sample_period_s: float | None = None  # per-process utilisation samples; None: one per call
    minor: int | None = None  # /dev/nvidia<minor>; None: its position in the driver's list


class FakeDriver:
    """The driver and its GPUs; ``nvml`` is the pynvml module to hand to bsmon.

    ``calls`` counts calls per symbol; ``missing_lookups`` counts lookups of absent symbols.
    """

    def __init__(self, gpus: Sequence[FakeGpu] = (), *, missing: Collection[str] = (),
                 init_error: int | None = None, library_present: bool = True,
                 release: PynvmlRelease | None = None) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.driver_version = "550.54.15"
        self.initialized = False
        self.calls: Counter[str] = Counter()
        self.missing_lookups: Counter[str] = Counter()
        self.release = release or RELEASE
        self.nvml = _private_pynvml(self.release)
        self.pid_namespace = os.readlink("/proc/self/ns/pid")  # the PIDs listed are this namespace's
        self._missing = frozenset(missing)
        self._v3_layout = (_ProcessInfoCcLayout if "nvmlDeviceGetRunningProcessDetailList" in self._missing
                           and "nvmlDeviceGetConfComputeMemSizeInfo" not in self._missing
                           else _ProcessInfoV2Layout)
        self._handles: dict[int, tuple[FakeGpu, FakeGpu | None]] = {}  # address -> (gpu, parent)
        self._addresses: dict[int, int] = {}  # id(gpu) -> address
        self._stale: set[int] = set()  # handles from before a reset
        self._next_address = count(0x1000, 0x10)
        self._blocked: dict[str, tuple[threading.Event, threading.Event]] = {}  # name -> (entered, release)
        for gpu in self.gpus:
            self._address(gpu)
        if library_present:
            self.nvml.nvmlLib = _FakeLibrary(self)
        else:  # what CDLL("libnvidia-ml.so.1") does on a machine without the driver
            def no_library(name: str, *args: object, **kwargs: object) -> None:
                raise OSError(f"{name}: cannot open shared object file: No such file or directory")
            self.nvml.CDLL = no_library

    def sampler(self, job_pid: int | None = None, **kwargs: object) -> GpuSampler:
        """A GpuSampler reading this driver, whose PIDs are this namespace's (not the host's)."""
        return GpuSampler(job_pid, nvml=self.nvml, nvml_pid_namespace=self.pid_namespace, **kwargs)

    def reset(self, gpu: FakeGpu) -> None:
        """``gpu`` comes back from being lost, as after a GPU reset: with new handles."""
        for member in (gpu, *gpu.mig_slices):
            self._stale.add(self._addresses[id(member)])
        gpu.lost = False
        self._address(gpu)

    def block(self, name: str) -> tuple[threading.Event, threading.Event]:
        """Make calls of ``name`` hang, as a wedged driver does: (entered, release) events."""
        self._blocked[name] = (threading.Event(), threading.Event())
        return self._blocked[name]

    # -- plumbing ----------------------------------------------------------------------------

    def _address(self, gpu: FakeGpu) -> None:
        for member, parent in ((gpu, None), *((s, gpu) for s in gpu.mig_slices)):
            address = next(self._next_address)
            self._handles[address] = (member, parent)
            self._addresses[id(member)] = address

    def symbol(self, name: str) -> Callable[..., int]:
        if name in self._missing or not hasattr(self, f"_{name}"):
            self.missing_lookups[name] += 1
            raise AttributeError(name)
        implementation = getattr(self, f"_{name}")

        def c_function(*args: object) -> int:
            self.calls[name] += 1
            if name in self._blocked:
                entered, release = self._blocked[name]
                entered.set()
                release.wait(60)
            return implementation(*args)
        return c_function

    def _gpu(self, name: str, handle: object) -> tuple[FakeGpu | None, int]:
        """The GPU behind ``handle``, or the error code the driver answers ``name`` with."""
        nv = _nv
        if not self.initialized:
            return None, nv.NVML_ERROR_UNINITIALIZED
        address = ctypes.cast(handle, ctypes.c_void_p).value
        if address not in self._handles:
            return None, nv.NVML_ERROR_INVALID_ARGUMENT
        gpu, parent = self._handles[address]
        if gpu.lost or (parent is not None and parent.lost) or address in self._stale:
            return None, nv.NVML_ERROR_GPU_IS_LOST
        if name in gpu.errors:
            return None, gpu.errors[name]
        if parent is not None and name in _MIG_SLICE_NOT_SUPPORTED:
            return None, nv.NVML_ERROR_NOT_SUPPORTED
        if gpu.mig_slices and name in _MIG_PARENT_NO_PERMISSION:
            return None, nv.NVML_ERROR_NO_PERMISSION
        if gpu.mig_slices and name == "nvmlDeviceGetUtilizationRates":
            return None, nv.NVML_ERROR_NOT_SUPPORTED
        return gpu, nv.NVML_SUCCESS

    def _set_handle(self, out: ctypes._CArgObject, gpu: FakeGpu) -> None:
        ctypes.c_void_p.from_buffer(out._obj).value = self._addresses[id(gpu)]

    def _write_value(self, name: str, handle: object, out: ctypes._CArgObject,
                     value: Callable[[FakeGpu], int]) -> int:
        gpu, code = self._gpu(name, handle)
        if gpu is not None:
            out._obj.value = value(gpu)
        return code

    # -- library and devices ---------------------------------------------------------------------

    def _nvmlInitWithFlags(self, flags: int) -> int:
        if self.init_error is not None:
            return self.init_error
        self.initialized = True
        return _nv.NVML_SUCCESS

    def _nvmlShutdown(self) -> int:
        if not self.initialized:
            return _nv.NVML_ERROR_UNINITIALIZED
        self.initialized = False
        return _nv.NVML_SUCCESS

    def _nvmlErrorString(self, code: int) -> bytes:
        return f"NVML error {code}".encode()

    def _nvmlSystemGetDriverVersion(self, buffer: ctypes.Array, size: ctypes.c_uint) -> int:
        if not self.initialized:
            return _nv.NVML_ERROR_UNINITIALIZED
        buffer.value = self.driver_version.encode()
        return _nv.NVML_SUCCESS

    def _nvmlDeviceGetCount_v2(self, out: ctypes._CArgObject) -> int:
        if not self.initialized:
            return _nv.NVML_ERROR_UNINITIALIZED
        out._obj.value = len(self.gpus)
        return _nv.NVML_SUCCESS

    def _nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, out: ctypes._CArgObject) -> int:
        if not self.initialized:
            return _nv.NVML_ERROR_UNINITIALIZED
        if index.value >= len(self.gpus):
            return _nv.NVML_ERROR_INVALID_ARGUMENT
        if self.gpus[index.value].lost:
            return _nv.NVML_ERROR_GPU_IS_LOST
        self._set_handle(out, self.gpus[index.value])
        return _nv.NVML_SUCCESS

    def _nvmlDeviceGetUUID(self, handle: object, buffer: ctypes.Array, size: ctypes.c_uint) -> int:
        gpu, code = self._gpu("nvmlDeviceGetUUID", handle)
        if gpu is not None:
            buffer.value = gpu.uuid.encode()
        return code

    def _nvmlDeviceGetName(self, handle: object, buffer: ctypes.Array, size: ctypes.c_uint) -> int:
        gpu, code = self._gpu("nvmlDeviceGetName", handle)
        if gpu is not None:
            buffer.value = gpu.name.encode()
        return code

    def _nvmlDeviceGetMigMode(self, handle: object, current: ctypes._CArgObject,
                              pending: ctypes._CArgObject) -> int:
        gpu, code = self._gpu("nvmlDeviceGetMigMode", handle)
        if gpu is not None:
            current._obj.value = pending._obj.value = int(bool(gpu.mig_slices))
        return code

    def _nvmlDeviceGetMinorNumber(self, handle: object, out: ctypes._CArgObject) -> int:
        return self._write_value("nvmlDeviceGetMinorNumber", handle, out,
                                 lambda gpu: self.gpus.index(gpu) if gpu.minor is None else gpu.minor)

    def _nvmlDeviceGetMaxMigDeviceCount(self, handle: object, out: ctypes._CArgObject) -> int:
        return self._write_value("nvmlDeviceGetMaxMigDeviceCount", handle, out, lambda gpu: 7)

    def _nvmlDeviceGetMigDeviceHandleByIndex(self, handle: object, index: ctypes.c_uint,
                                             out: ctypes._CArgObject) -> int:
        gpu, code = self._gpu("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if gpu is None:
            return code
        if index.value >= len(gpu.mig_slices):
            return _nv.NVML_ERROR_NOT_FOUND
        self._set_handle(out, gpu.mig_slices[index.value])
        return code

    # -- readings --------------------------------------------------------------------------------

    def _nvmlDeviceGetUtilizationRates(self, handle: object, out: ctypes._CArgObject) -> int:
        gpu, code = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        if gpu is not None:
            out._obj.gpu, out._obj.memory = gpu.util_gpu, gpu.util_memory
        return code

    def _nvmlDeviceGetMemoryInfo(self, handle: object, out: ctypes._CArgObject) -> int:
        gpu, code = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        if gpu is not None:
            used = gpu.used_mib + gpu.reserved_mib
            out._obj.total, out._obj.used, out._obj.free = (
                gpu.total_mib * MIB, used * MIB, (gpu.total_mib - used) * MIB)
        return code

    def _nvmlDeviceGetMemoryInfo_v2(self, handle: object, out: ctypes._CArgObject) -> int:
        gpu, code = self._gpu("nvmlDeviceGetMemoryInfo_v2", handle)
        if gpu is None:
            return code
        if out._obj.version != _nv.nvmlMemory_v2:
            return _nv.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        memory = out._obj
        memory.total, memory.reserved, memory.used = (
            gpu.total_mib * MIB, gpu.reserved_mib * MIB, gpu.used_mib * MIB)
        memory.free = (gpu.total_mib - gpu.reserved_mib - gpu.used_mib) * MIB
        return code

    def _running_processes(self, name: str, handle: object, count_out: ctypes._CArgObject,
                           buffer: ctypes.Array | None, kind: str) -> int:
        """Fill ``buffer`` with raw entries in the layout this driver version writes."""
        gpu, code = self._gpu(name, handle)
        if gpu is None:
            return code
        processes = getattr(gpu, kind)
        capacity = count_out._obj
        if buffer is None:  # the size query
            if not processes:
                capacity.value = 0
                return _nv.NVML_SUCCESS
            capacity.value = len(processes)
            if kind == "compute" and gpu.churn:
                gpu.compute = gpu.churn.pop(0)
            return _nv.NVML_ERROR_INSUFFICIENT_SIZE
        if capacity.value < len(processes):
            capacity.value = len(processes)
            return _nv.NVML_ERROR_INSUFFICIENT_SIZE
        in_slice = self._handles[ctypes.cast(handle, ctypes.c_void_p).value][1] is not None
        instance = 1 if in_slice else _NO_INSTANCE
        layout = (self._v3_layout if name.endswith("_v3") else _ProcessInfoV2Layout if name.endswith("_v2")
                  else _ProcessInfoV1Layout)
        entries = (layout * len(processes))()
        for entry, process in zip(entries, processes):
            entry.pid = process.pid
            entry.usedGpuMemory = _NOT_AVAILABLE if process.used_mib is None else int(process.used_mib * MIB)
            if layout is not _ProcessInfoV1Layout:
                entry.gpuInstanceId = entry.computeInstanceId = instance
        assert ctypes.sizeof(entries) <= ctypes.sizeof(buffer), "the driver would overrun pynvml's buffer"
        ctypes.memmove(buffer, entries, ctypes.sizeof(entries))
        capacity.value = len(processes)
        return _nv.NVML_SUCCESS

    def _nvmlDeviceGetComputeRunningProcesses_v3(self, handle, count_out, buffer) -> int:
        return self._running_processes("nvmlDeviceGetComputeRunningProcesses_v3", handle, count_out,
                                       buffer, "compute")

    def _nvmlDeviceGetComputeRunningProcesses_v2(self, handle, count_out, buffer) -> int:
        return self._running_processes("nvmlDeviceGetComputeRunningProcesses_v2", handle, count_out,
                                       buffer, "compute")

    def _nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle, count_out, buffer) -> int:
        return self._running_processes("nvmlDeviceGetGraphicsRunningProcesses_v3", handle, count_out,
                                       buffer, "graphics")

    def _nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle, count_out, buffer) -> int:
        return self._running_processes("nvmlDeviceGetGraphicsRunningProcesses_v2", handle, count_out,
                                       buffer, "graphics")

    def _nvmlDeviceGetComputeRunningProcesses(self, handle, count_out, buffer) -> int:
        return self._running_processes("nvmlDeviceGetComputeRunningProcesses", handle, count_out,
                                       buffer, "compute")

    def _nvmlDeviceGetGraphicsRunningProcesses(self, handle, count_out, buffer) -> int:
        return self._running_processes("nvmlDeviceGetGraphicsRunningProcesses", handle, count_out,
                                       buffer, "graphics")

    def _nvmlDeviceGetConfComputeMemSizeInfo(self, handle: object, out: ctypes._CArgObject) -> int:
        gpu, code = self._gpu("nvmlDeviceGetConfComputeMemSizeInfo", handle)
        return code if gpu is None else _nv.NVML_ERROR_NOT_SUPPORTED  # no CC mode on these GPUs

    def _nvmlDeviceGetRunningProcessDetailList(self, handle: object, out: ctypes._CArgObject) -> int:
        gpu, code = self._gpu("nvmlDeviceGetRunningProcessDetailList", handle)
        return code if gpu is None else _nv.NVML_ERROR_NOT_SUPPORTED  # bsmon only checks it exists

    def _nvmlDeviceGetProcessUtilization(self, handle: object, buffer: ctypes.Array | None,
                                         count_out: ctypes._CArgObject,
                                         last_seen_us: ctypes.c_ulonglong) -> int:
        gpu, code = self._gpu("nvmlDeviceGetProcessUtilization", handle)
        if gpu is None:
            return code
        now_us = time.time_ns() // 1000
        period_us = None if gpu.util_sample_period_s is None else int(gpu.util_sample_period_s * 1e6)
        sampled_us = now_us if period_us is None else now_us // period_us * period_us
        active = {p.pid: p for p in (*gpu.compute, *gpu.graphics) if p.sm_util is not None}
        if not active or last_seen_us.value >= sampled_us:
            return _nv.NVML_ERROR_NOT_FOUND
        capacity = count_out._obj
        if buffer is None or capacity.value < len(active):
            capacity.value = len(active)
            return _nv.NVML_ERROR_INSUFFICIENT_SIZE
        for slot, process in zip(buffer, active.values()):
            slot.pid, slot.timeStamp, slot.smUtil = process.pid, sampled_us, process.sm_util
            slot.memUtil = slot.encUtil = slot.decUtil = 0
        capacity.value = len(active)
        return code

    def _nvmlDeviceGetPowerUsage(self, handle, out) -> int:
        return self._write_value("nvmlDeviceGetPowerUsage", handle, out, lambda gpu: gpu.power_mw)

    def _nvmlDeviceGetEnforcedPowerLimit(self, handle, out) -> int:
        return self._write_value("nvmlDeviceGetEnforcedPowerLimit", handle, out,
                                 lambda gpu: gpu.power_limit_mw)

    def _nvmlDeviceGetPowerManagementLimit(self, handle, out) -> int:
        return self._write_value("nvmlDeviceGetPowerManagementLimit", handle, out,
                                 lambda gpu: gpu.power_limit_mw)

    def _nvmlDeviceGetTemperature(self, handle, sensor: ctypes.c_uint, out) -> int:
        if sensor.value != _nv.NVML_TEMPERATURE_GPU:
            return _nv.NVML_ERROR_INVALID_ARGUMENT
        return self._write_value("nvmlDeviceGetTemperature", handle, out, lambda gpu: gpu.temp_c)

    def _nvmlDeviceGetTemperatureV(self, handle: object, out: ctypes._CArgObject) -> int:
        gpu, code = self._gpu("nvmlDeviceGetTemperatureV", handle)
        if gpu is None:
            return code
        if out._obj.version != _nv.nvmlTemperature_v1:
            return _nv.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        if out._obj.sensorType != _nv.NVML_TEMPERATURE_GPU:
            return _nv.NVML_ERROR_INVALID_ARGUMENT
        out._obj.temperature = gpu.temp_c
        return code

    def _nvmlDeviceGetClockInfo(self, handle, clock: ctypes.c_uint, out) -> int:
        if clock.value != _nv.NVML_CLOCK_SM:
            return _nv.NVML_ERROR_NOT_SUPPORTED  # this fake only knows the SM clock
        return self._write_value("nvmlDeviceGetClockInfo", handle, out, lambda gpu: gpu.sm_clock_mhz)

    def _nvmlDeviceGetCurrentClocksEventReasons(self, handle, out) -> int:
        return self._write_value("nvmlDeviceGetCurrentClocksEventReasons", handle, out,
                                 lambda gpu: gpu.clock_reasons)

    def _nvmlDeviceGetCurrentClocksThrottleReasons(self, handle, out) -> int:
        return self._write_value("nvmlDeviceGetCurrentClocksThrottleReasons", handle, out,
                                 lambda gpu: gpu.clock_reasons)

    def _nvmlDeviceGetPcieThroughput(self, handle, counter: ctypes.c_uint, out) -> int:
        tx = counter.value == _nv.NVML_PCIE_UTIL_TX_BYTES
        return self._write_value("nvmlDeviceGetPcieThroughput", handle, out,
                                 lambda gpu: gpu.pcie_tx_kib_s if tx else gpu.pcie_rx_kib_s)


class _FakeLibrary:
    """What pynvml keeps in ``nvmlLib``: symbols looked up by attribute, as on a CDLL."""

    def __init__(self, driver: FakeDriver) -> None:
        self._driver = driver

    def __getattr__(self, name: str) -> Callable[..., int]:
        return self._driver.symbol(name)


_copies = count()


def _private_pynvml(release: PynvmlRelease) -> ModuleType:
    """A fresh copy of the installed pynvml as ``release`` has it, with its own library and caches."""
    name = f"_fake_pynvml_{next(_copies)}"
    spec = importlib.util.spec_from_file_location(name, _installed_pynvml.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pynvml looks itself up there while it builds its error classes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    for attribute in release.absent:
        delattr(module, attribute)
    for function, (symbol, struct) in release.process_calls.items():
        setattr(module, function, functools.partial(_release_process_list, module, symbol, struct))
        module.c_nvmlProcessInfo_t = struct
    if release.bytes_strings:
        for getter in _STRING_GETTERS:
            setattr(module, getter, _returning_bytes(getattr(module, getter)))
    if not release.memory_version_argument:
        installed = module.nvmlDeviceGetMemoryInfo
        module.nvmlDeviceGetMemoryInfo = lambda handle: installed(handle)
    return module


def _returning_bytes(getter: Callable[..., str]) -> Callable[..., bytes]:
    return lambda *args: getter(*args).encode()


def _release_process_list(nv: ModuleType, symbol: str, struct: type[ctypes.Structure], handle: object) -> list:
    """What every release's process-list function does, with that release's symbol and struct."""
    c_count = ctypes.c_uint(0)
    fn = nv._nvmlGetFunctionPointer(symbol)
    ret = fn(handle, ctypes.byref(c_count), None)
    if ret == nv.NVML_SUCCESS:
        return []
    if ret != nv.NVML_ERROR_INSUFFICIENT_SIZE:
        raise nv.NVMLError(ret)
    c_count.value = c_count.value * 2 + 5
    c_procs = (struct * c_count.value)()
    nv._nvmlCheckReturn(fn(handle, ctypes.byref(c_count), c_procs))
    procs = []
    for entry in c_procs[:c_count.value]:
        obj = nv.nvmlStructToFriendlyObject(entry)
        if obj.usedGpuMemory == _NOT_AVAILABLE:
            obj.usedGpuMemory = None
        procs.append(obj)
    return procs
