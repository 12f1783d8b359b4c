"""One NVML session through nvidia-ml-py (``pynvml``): the devices and a per-function error policy.

Facts about drivers and nvidia-ml-py releases this module relies on (fallbacks in this order):

- nvidia-ml-py before 11.515 returns ``bytes`` from the string getters (UUID, name, driver
  version); later releases return ``str``. :func:`text` accepts both.
- memory: ``nvmlDeviceGetMemoryInfo`` with the ``nvmlMemory_v2`` struct (nvidia-ml-py >= 11.510,
  driver >= 515) separates the driver's reserved memory from ``used``; the v1 call folds it in.
- running processes are read by calling the C functions with bsmon's own structs, never through
  pynvml's, because pynvml's process struct follows the header of the driver it was generated
  from: nvidia-ml-py 12.535.77 reads every ``_v3`` entry with R535's extra
  ``usedGpuCcProtectedMemory`` field, so on any other driver every entry after the first is
  garbage; and releases before 11.515 have no ``_v3`` call at all. Drivers write ``_v3``
  entries in the R535 layout only where they have confidential computing
  (``nvmlDeviceGetConfComputeMemSizeInfo``) but not yet ``nvmlDeviceGetRunningProcessDetailList``
  (as nvitop works out); otherwise in the ``_v2`` layout. ``_v2`` needs driver >= 450 and the
  plain (v1) call works everywhere. A list that grows between the count and the read answers
  INSUFFICIENT_SIZE and is read again.
- throttle reasons: ``nvmlDeviceGetCurrentClocksEventReasons`` (the newer name), then
  ``...ClocksThrottleReasons``; temperature: ``nvmlDeviceGetTemperatureV``, then the plain call.
- A variant that answers NOT_SUPPORTED or NO_PERMISSION on a device, or that the driver lacks,
  or whose struct version the driver refuses (ARGUMENT_VERSION_MISMATCH), falls through to the
  next variant, and is not asked again.
- A MIG slice has no utilisation counter (NVML answers NOT_SUPPORTED, nvidia-smi shows N/A).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

_LIST_RETRIES = 3  # reads of a process list that outgrew its buffer
# nvml.h return codes that releases before 12.535 do not name.
_ERROR_ARGUMENT_VERSION_MISMATCH = 25

#: pynvml functions bsmon calls, in fallback order where there are several.
FUNCTIONS = (
    "nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMinorNumber", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetProcessUtilization", "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature", "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetPcieThroughput",
)
#: C functions bsmon calls itself, with its own structs, newest first.
PROCESS_SYMBOLS = {kind: (f"nvmlDeviceGet{kind}RunningProcesses_v3", f"nvmlDeviceGet{kind}RunningProcesses_v2",
                          f"nvmlDeviceGet{kind}RunningProcesses") for kind in ("Compute", "Graphics")}
MEMORY_V2 = "nvmlDeviceGetMemoryInfo_v2"  # the memory call with the v2 struct, where pynvml has it


class ProcessInfoV1(ctypes.Structure):
    """nvmlProcessInfo_v1_t: what the unversioned call writes."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


class ProcessInfoV2(ctypes.Structure):
    """nvmlProcessInfo_v2_t: what ``_v2`` writes, and ``_v3`` outside R535."""

    _fields_ = [*ProcessInfoV1._fields_, ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


class ProcessInfoR535(ctypes.Structure):
    """What R535 drivers write from ``_v3``: v2 plus the confidential-computing memory."""

    _fields_ = [*ProcessInfoV2._fields_, ("usedGpuCcProtectedMemory", ctypes.c_ulonglong)]


_NOT_AVAILABLE = ctypes.c_ulonglong(-1).value  # NVML_VALUE_NOT_AVAILABLE in a 64-bit field


def text(value: Any) -> str | None:
    """A pynvml string result as ``str``: older releases return ``bytes``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def uuid_key(uuid: str) -> str:
    """The comparable part of a GPU or MIG UUID: lower case, without the 'GPU-'/'MIG-' prefix.

    The probe labels every CUDA UUID 'GPU-', MIG slices included, so the prefix cannot be trusted.
    """
    key = uuid.strip().lower()
    return key[4:] if key.startswith(("gpu-", "mig-")) else key


@dataclass(eq=False)
class Device:
    """A physical GPU or a MIG slice, with what bsmon learnt about it during this NVML session."""

    index: int
    handle: Any
    parent: Device | None = None
    uuid: str | None = None
    name: str | None = None
    mig: str | None = None
    minor: int | None = None  # /dev/nvidia<minor>; a slice's is its parent's
    mig_enabled: bool = False
    slices: list[Device] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)  # answered NOT_SUPPORTED/NO_PERMISSION here
    cached: dict[str, tuple[float, Any]] = field(default_factory=dict)  # key -> (read at, value)

    def leaves(self) -> list[Device]:
        """What CUDA can run on: the GPU itself, or its slices when MIG is enabled."""
        return self.slices if self.mig_enabled else [self]


_INIT_FAILURES = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": "No NVIDIA driver found (libnvidia-ml.so.1 missing)",
    "NVML_ERROR_DRIVER_NOT_LOADED": "NVIDIA driver not loaded (NVML: Driver Not Loaded)",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH":
        "NVIDIA driver and NVML library versions differ (reboot or reload the nvidia kernel module)",
    "NVML_ERROR_NO_PERMISSION": "No permission to open the NVIDIA driver (NVML: Insufficient Permissions)",
}


class Session:
    """One nvmlInit .. nvmlShutdown: the device list and the per-function error policy."""

    def __init__(self, nv: ModuleType) -> None:
        self.nv = nv
        self.functions = resolve_functions(nv)
        # Answers that hold for the whole session: the driver lacks the function, or refuses its struct.
        self._forget = (nv.NVML_ERROR_FUNCTION_NOT_FOUND,
                        getattr(nv, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", _ERROR_ARGUMENT_VERSION_MISMATCH))
        self.lost: set[Device] = set()  # devices that answered GPU_IS_LOST since the last clear()
        self.devices: list[Device] = []
        self.problems: list[str] = []  # devices NVML counts but would not hand out
        for index in range(nv.nvmlDeviceGetCount()):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
            except nv.NVMLError as exc:
                self.problems.append(f"GPU {index} unavailable ({exc})")
                continue
            self.devices.append(self._describe(Device(index, handle)))

    @classmethod
    def open(cls, nv: ModuleType | None) -> tuple[Session | None, str | None]:
        """Import pynvml if needed and start NVML; (session, None) or (None, banner)."""
        if nv is None:
            try:
                import pynvml as nv
            except ImportError as exc:
                return None, f"nvidia-ml-py is not installed ({exc}): GPU panel disabled"
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            reason = next((message for name, message in _INIT_FAILURES.items()
                           if getattr(nv, name, None) == exc.value), f"NVML failed to start ({exc})")
            return None, f"{reason}: GPU panel disabled"
        try:
            session = cls(nv)
        except nv.NVMLError as exc:
            nv.nvmlShutdown()
            return None, f"NVML could not list the GPUs ({exc}): GPU panel disabled"
        if not session.devices:
            session.close()
            reason = "; ".join(session.problems) or "NVML found no NVIDIA GPU"
            return None, f"{reason}: GPU panel disabled"
        return session, None

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except self.nv.NVMLError:
            pass  # the driver went away; there is nothing left to release

    def _describe(self, device: Device) -> Device:
        """Read the values that never change during a session: UUID, name, minor, MIG layout."""
        device.uuid = text(self.query(device, "nvmlDeviceGetUUID"))
        device.name = text(self.query(device, "nvmlDeviceGetName"))
        device.minor = self.query(device, "nvmlDeviceGetMinorNumber")
        mode = self.query(device, "nvmlDeviceGetMigMode")  # [current, pending]
        device.mig_enabled = bool(mode) and mode[0] == self.nv.NVML_DEVICE_MIG_ENABLE
        if not device.mig_enabled:
            return device
        for position in range(self.query(device, "nvmlDeviceGetMaxMigDeviceCount") or 0):
            try:
                handle = self.nv.nvmlDeviceGetMigDeviceHandleByIndex(device.handle, position)
            except self.nv.NVMLError:  # an empty slot: MIG device indices can be sparse
                continue
            mig = Device(device.index, handle, parent=device, minor=device.minor)
            mig.uuid = text(self.query(mig, "nvmlDeviceGetUUID"))
            full_name = text(self.query(mig, "nvmlDeviceGetName"))  # "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
            model, _, profile = (full_name or "").partition(" MIG ")
            mig.name = model or device.name
            mig.mig = f"MIG {profile}" if profile else "MIG"
            device.slices.append(mig)
        return device

    def query(self, device: Device, names: str | tuple[str, ...], *args: Any) -> Any:
        """Call the first of the variants ``names`` that can answer on ``device``; None if none can.

        A variant the driver lacks, or whose struct version it refuses, is forgotten for the
        session; one that answers NOT_SUPPORTED or NO_PERMISSION, for the device. Either way
        the next variant is tried, now and on later samples.
        """
        nv = self.nv
        for name in (names,) if isinstance(names, str) else names:
            function = self.functions.get(name)
            if function is None or name in device.refused:
                continue
            for _ in range(_LIST_RETRIES):
                try:
                    return function(device.handle, *args)
                except nv.NVMLError as exc:
                    if exc.value == nv.NVML_ERROR_INSUFFICIENT_SIZE:
                        continue  # a list grew between the count and the read
                    if exc.value in self._forget:
                        del self.functions[name]
                    elif exc.value in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_NO_PERMISSION):
                        device.refused.add(name)
                    else:
                        if exc.value == nv.NVML_ERROR_GPU_IS_LOST:
                            self.lost.add(device)
                        return None
                    break  # try the next variant
            else:
                return None  # the list kept growing faster than it could be read
        return None

    def cached(self, device: Device, key: str, max_age_s: float, now: float, read: Callable[[], Any]) -> Any:
        """``read()``, reused for ``max_age_s`` seconds."""
        read_at, value = device.cached.get(key, (-math.inf, None))
        if now - read_at >= max_age_s:
            value = read()
            device.cached[key] = (now, value)
        return value

    def processes(self, device: Device) -> dict[int, int | None] | None:
        """pid -> GPU memory in bytes (None when the driver cannot say) for every process with a
        compute or graphics context on ``device``; None when neither list can be read."""
        lists = [self.query(device, symbols) for symbols in PROCESS_SYMBOLS.values()]
        if all(found is None for found in lists):
            return None
        memory: dict[int, int | None] = {}
        for found in lists:
            for pid, used in (found or {}).items():
                memory.setdefault(pid, used)  # a process with both kinds of context is in both lists
        return memory


def resolve_functions(nv: ModuleType) -> dict[str, Callable[..., Any]]:
    """Every function bsmon may call, keyed by name; ones this pynvml lacks are left out.

    Needs NVML initialised: which process struct the driver writes depends on its symbols.
    """
    functions = {name: getattr(nv, name) for name in FUNCTIONS if callable(getattr(nv, name, None))}
    if hasattr(nv, "nvmlMemory_v2"):
        functions[MEMORY_V2] = functools.partial(nv.nvmlDeviceGetMemoryInfo, version=nv.nvmlMemory_v2)
    find_symbol = getattr(nv, "_nvmlGetFunctionPointer", None)  # private, but in every release
    if find_symbol is None:
        return functions  # no process lists: job memory shows N/A

    def has(symbol: str) -> bool:
        try:
            find_symbol(symbol)
        except nv.NVMLError:
            return False
        return True

    r535_layout = (has("nvmlDeviceGetComputeRunningProcesses_v3") and has("nvmlDeviceGetConfComputeMemSizeInfo")
                   and not has("nvmlDeviceGetRunningProcessDetailList"))
    layouts = (ProcessInfoR535 if r535_layout else ProcessInfoV2, ProcessInfoV2, ProcessInfoV1)
    for symbols in PROCESS_SYMBOLS.values():
        for symbol, layout in zip(symbols, layouts):
            functions[symbol] = functools.partial(_read_processes, nv, symbol, layout)
    return functions


def _read_processes(nv: ModuleType, symbol: str, layout: type[ctypes.Structure], handle: Any) -> dict[int, int | None]:
    """pid -> used bytes (None: not available) from the C function ``symbol`` into ``layout`` entries.

    The protocol pynvml uses: ask for the count with no buffer, then read into a buffer with
    room for processes that start in between. Raises NVMLError as pynvml would.
    """
    function = nv._nvmlGetFunctionPointer(symbol)
    count = ctypes.c_uint(0)
    code = function(handle, ctypes.byref(count), None)
    if code == nv.NVML_SUCCESS:
        return {}
    if code == nv.NVML_ERROR_INSUFFICIENT_SIZE:
        count.value = count.value * 2 + 5
        entries = (layout * count.value)()
        code = function(handle, ctypes.byref(count), entries)
    if code != nv.NVML_SUCCESS:
        raise nv.NVMLError(code)
    return {entry.pid: None if entry.usedGpuMemory == _NOT_AVAILABLE else entry.usedGpuMemory
            for entry in entries[:count.value]}
