"""GPU telemetry from NVML (nvidia-ml-py), read in the monitor process, never in the training job.

:class:`GpuSampler` polls NVML on a daemon thread and hands out immutable :class:`GpuSnapshot` s.
Every value in a :class:`GpuReading` may be ``None``, which the UI shows as N/A: the driver may
not support a query, forbid it, lack the function altogether (older drivers), or have lost the GPU.
A machine without NVML gets a snapshot whose ``banner`` says why, never an exception.

Driver-version facts this module relies on (the fallbacks are tried in this order):

- memory: ``nvmlDeviceGetMemoryInfo_v2`` (driver >= 515) separates the driver's reserved memory
  from ``used``; the v1 call folds it into ``used`` and gives no ``reserved``.
- running processes: ``..._v3`` (driver >= 510.39), then ``..._v2``. pynvml's first call asks for
  the count and the second reads the list into an oversized buffer; a list that grew past the buffer
  in between raises ``NVMLError_InsufficientSize``, which is retried. R535 drivers write v3 entries
  with an extra ``usedGpuCcProtectedMemory`` field that earlier and later drivers do not; where the
  installed pynvml's v3 struct disagrees with the driver, the v3 list would be misread, so the
  ``_v2`` call is used instead (see :func:`_v3_process_layout_differs`).
- throttle reasons: ``nvmlDeviceGetCurrentClocksEventReasons`` (the newer name), then
  ``...ClocksThrottleReasons``; temperature: ``nvmlDeviceGetTemperatureV``, then the plain call.
- NVML reports host PIDs even inside a container with its own PID namespace, so the job's PIDs
  may never match; bsmon then says so (``hint``) instead of showing a wrong job memory.
- A MIG slice has no utilisation counter (NVML answers NOT_SUPPORTED, nvidia-smi shows N/A).
  Temperature, SM clock and throttle reasons are properties of the whole GPU, so a slice shows
  its parent's; power and PCIe traffic cannot be split between slices, so a slice shows them as
  N/A rather than its parent's total (which csv_fields would otherwise add up once per slice).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["CSV_COLUMNS", "GpuReading", "GpuSampler", "GpuSnapshot"]

_MIB = 1024 * 1024
_SLOW_REFRESH_S = 30.0  # power limit: changes only when an administrator sets it
_PCIE_REFRESH_S = 2.0  # each PCIe counter read blocks ~20 ms inside the driver
_LIST_RETRIES = 3  # re-reads of a process list that outgrew pynvml's buffer

# nvml.h nvmlClocksEventReason* bits (the same bits as the older nvmlClocksThrottleReason*).
# Bit 0x1 (GPU idle) is left out on purpose: low clocks with no work limit nothing.
_LIMITING_REASONS = (
    (0x002, "applications clocks setting"),
    (0x004, "power cap"),
    (0x008, "hw slowdown"),
    (0x010, "sync boost"),
    (0x020, "thermal slowdown (sw)"),
    (0x040, "thermal slowdown (hw)"),
    (0x080, "power brake"),
    (0x100, "display clock setting"),
    (0x200, "board limit"),
    (0x400, "reliability limit"),
)
_IDLE_REASON = 0x001
_KNOWN_REASONS = _IDLE_REASON | sum(bit for bit, _ in _LIMITING_REASONS)


@dataclass(frozen=True)
class GpuReading:
    """One GPU (or MIG slice) at one instant. ``None`` means N/A: unsupported or unreadable.

    ``index`` is the NVML index of the physical GPU; the slices of a MIG GPU share their parent's.
    ``job_mem_mib``/``job_util_pct`` count the job's process tree only (see :class:`GpuSampler`):
    0 when none of its processes uses this GPU, None when no job pid is known, when the job has
    exited, when NVML's PIDs belong to another PID namespace (see the snapshot's ``hint``), or
    when the driver does not attribute memory (or utilisation) to processes.
    ``pcie_*_mib_s`` take NVML's "KB/s" as KiB/s and are refreshed every 2 s, not every sample.
    """

    index: int
    uuid: str | None
    name: str | None
    util_pct: float | None
    mem_util_pct: float | None
    mem_used_mib: float | None
    mem_reserved_mib: float | None
    mem_total_mib: float | None
    job_mem_mib: float | None
    job_util_pct: float | None
    power_w: float | None
    power_limit_w: float | None
    temp_c: float | None
    sm_clock_mhz: float | None
    throttle_reasons: tuple[str, ...]
    pcie_tx_mib_s: float | None
    pcie_rx_mib_s: float | None
    mig: str | None


_TEXT_FIELDS = ("uuid", "name", "mig")
_NUMBER_FIELDS = tuple(f.name for f in dataclasses.fields(GpuReading)
                       if f.name not in (*_TEXT_FIELDS, "index", "throttle_reasons"))

# csv column -> (reading field, how several GPUs combine)
CSV_COLUMNS: dict[str, tuple[str, Callable[[list[float]], float]]] = {
    "gpu_util_pct": ("util_pct", statistics.fmean),
    "gpu_mem_used_mib": ("mem_used_mib", math.fsum),
    "gpu_mem_total_mib": ("mem_total_mib", math.fsum),
    "gpu_job_mem_mib": ("job_mem_mib", math.fsum),
    "gpu_power_w": ("power_w", math.fsum),
    "gpu_temp_c": ("temp_c", max),
    "gpu_sm_clock_mhz": ("sm_clock_mhz", min),
}


@dataclass(frozen=True)
class GpuSnapshot:
    """All watched GPUs at one wall-clock ``time`` (seconds since the epoch).

    ``banner``: one line when NVML is absent or broken (then ``gpus`` is usually empty).
    ``hint``: one line when the readings are incomplete for a reason the user can fix.
    """

    time: float
    gpus: tuple[GpuReading, ...]
    banner: str | None = None
    hint: str | None = None

    def to_record(self) -> dict[str, Any]:
        """A JSON-safe dict for the session file; :meth:`from_record` reverses it."""
        gpus = []
        for reading in self.gpus:
            record = dataclasses.asdict(reading)
            record["throttle_reasons"] = list(reading.throttle_reasons)
            gpus.append(record)
        return {"time": self.time, "gpus": gpus, "banner": self.banner, "hint": self.hint}

    @classmethod
    def from_record(cls, record: Any) -> GpuSnapshot:
        """Rebuild a snapshot from :meth:`to_record` output; keys it does not know are ignored.

        Raises ValueError, naming the offending key, when the record is not such a dict.
        """
        if not isinstance(record, dict):
            raise ValueError(f"a GPU snapshot record must be a dict, got {type(record).__name__}")
        time_s = _require(record, "time", (int, float), "snapshot")
        banner = _require(record, "banner", (str, type(None)), "snapshot")
        hint = _require(record, "hint", (str, type(None)), "snapshot")
        gpus = _require(record, "gpus", (list,), "snapshot")
        return cls(float(time_s), tuple(_reading_from_record(g, i) for i, g in enumerate(gpus)),
                   banner, hint)

    def csv_fields(self) -> dict[str, float | None]:
        """The GPU columns of the CSV export.

        One GPU: its own values. Several GPUs: ``gpu_util_pct`` is the mean, memory
        (used, total, job) and power are sums, ``gpu_temp_c`` is the hottest GPU and
        ``gpu_sm_clock_mhz`` the slowest clock. A column is None when no GPU is watched
        or when any watched GPU lacks that value, so an aggregate never silently covers
        only some of the GPUs.
        """
        fields: dict[str, float | None] = {}
        for column, (name, combine) in CSV_COLUMNS.items():
            values = [getattr(reading, name) for reading in self.gpus]
            fields[column] = None if not values or None in values else float(combine(values))
        return fields


def _require(record: dict, key: str, types: tuple[type, ...], what: str) -> Any:
    if key not in record:
        raise ValueError(f"{what} record has no {key!r}: it was not written by GpuSnapshot.to_record")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"{what} record key {key!r} must be {names}, got {value!r}")
    return value


def _reading_from_record(record: Any, position: int) -> GpuReading:
    what = f"gpus[{position}]"
    if not isinstance(record, dict):
        raise ValueError(f"{what} must be a dict, got {type(record).__name__}")
    values: dict[str, Any] = {"index": _require(record, "index", (int,), what)}
    for name in _TEXT_FIELDS:
        values[name] = _require(record, name, (str, type(None)), what)
    for name in _NUMBER_FIELDS:
        number = _require(record, name, (int, float, type(None)), what)
        values[name] = None if number is None else float(number)
    reasons = _require(record, "throttle_reasons", (list,), what)
    if not all(isinstance(reason, str) for reason in reasons):
        raise ValueError(f"{what} record key 'throttle_reasons' must be a list of strings, got {reasons!r}")
    values["throttle_reasons"] = tuple(reasons)
    return GpuReading(**values)


# --- the job's processes ------------------------------------------------------------------------

def _process_parents() -> dict[int, int]:
    """pid -> parent pid for every process this PID namespace can see (empty without /proc).

    A scan of /proc/<pid>/stat rather than /proc/<pid>/task/*/children: per proc_tid_children(5),
    a child exiting while that file is read can hide living children, unless all are stopped.
    """
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return parents
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:  # the process exited between listdir and open
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so cut at the last ")".
        after_comm = stat[stat.rfind(b")") + 2:].split()
        if len(after_comm) >= 2:
            parents[int(entry)] = int(after_comm[1])
    return parents


def _process_tree(root: int, parents: dict[int, int]) -> frozenset[int]:
    """``root`` and all its descendants; empty when ``root`` is not running."""
    if root not in parents:
        return frozenset()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return frozenset(tree)


@dataclass(frozen=True)
class _Job:
    """The job's process tree and every PID visible here, read once per sample."""

    pid: int
    tree: frozenset[int]
    visible: frozenset[int]

    @classmethod
    def scan(cls, pid: int) -> _Job:
        parents = _process_parents()
        return cls(pid, _process_tree(pid, parents), frozenset(parents))


# --- NVML session ---------------------------------------------------------------------------------

@dataclass(eq=False)
class _Device:
    """A physical GPU or a MIG slice, with what bsmon learnt about it during this NVML session."""

    index: int
    handle: Any
    parent: _Device | None = None
    uuid: str | None = None
    name: str | None = None
    mig: str | None = None
    mig_enabled: bool = False
    slices: list[_Device] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)  # functions answering NOT_SUPPORTED/NO_PERMISSION
    cached: dict[str, tuple[float, Any]] = field(default_factory=dict)  # key -> (read at, value)
    utilization_seen_us: int = 0  # newest per-process utilisation sample already read

    def leaves(self) -> list[_Device]:
        """What CUDA can run on: the GPU itself, or its slices when MIG is enabled."""
        return self.slices if self.mig_enabled else [self]


def _uuid_key(uuid: str) -> str:
    """The comparable part of a GPU or MIG UUID: lower case, without the 'GPU-'/'MIG-' prefix.

    The probe labels every CUDA UUID 'GPU-', MIG slices included, so the prefix cannot be trusted.
    """
    text = uuid.strip().lower()
    return text[4:] if text.startswith(("gpu-", "mig-")) else text


def _resolve_functions(nv: ModuleType) -> dict[str, Callable[..., Any]]:
    """The pynvml functions bsmon uses, keyed by the NVML symbol each needs; absent ones left out."""
    names = (
        "nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetMigMode",
        "nvmlDeviceGetMaxMigDeviceCount",
        "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2",
        "nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v2",
        "nvmlDeviceGetProcessUtilization", "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature", "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetPcieThroughput",
    )
    functions = {name: getattr(nv, name) for name in names if callable(getattr(nv, name, None))}
    if hasattr(nv, "nvmlMemory_v2"):  # nvidia-ml-py >= 11.510 can ask for the v2 struct
        functions["nvmlDeviceGetMemoryInfo_v2"] = functools.partial(
            nv.nvmlDeviceGetMemoryInfo, version=nv.nvmlMemory_v2)
    if _v3_process_layout_differs(nv):
        for kind in ("Compute", "Graphics"):
            functions.pop(f"nvmlDeviceGet{kind}RunningProcesses_v3", None)
    return functions


def _v3_process_layout_differs(nv: ModuleType) -> bool:
    """Whether the driver's v3 process entries and the installed pynvml's struct differ in layout.

    Only R535 drivers, which have confidential computing but not yet
    nvmlDeviceGetRunningProcessDetailList, write the v3 entry with ``usedGpuCcProtectedMemory``
    (as nvitop works out). nvidia-ml-py generates its struct from one driver's header, so the
    two can disagree in either direction; every entry after the first would then be misread.
    """
    find_symbol = getattr(nv, "_nvmlGetFunctionPointer", None)  # private, but the only lookup pynvml has
    if find_symbol is None:
        return False

    def has(symbol: str) -> bool:
        try:
            find_symbol(symbol)
        except nv.NVMLError:
            return False
        return True

    driver_cc_layout = (has("nvmlDeviceGetComputeRunningProcesses_v3")
                        and has("nvmlDeviceGetConfComputeMemSizeInfo")
                        and not has("nvmlDeviceGetRunningProcessDetailList"))
    struct = getattr(nv, "c_nvmlProcessInfo_v3_t", None)
    pynvml_cc_layout = struct is not None and any(
        name == "usedGpuCcProtectedMemory" for name, *_ in struct._fields_)
    return driver_cc_layout != pynvml_cc_layout


_INIT_FAILURES = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": "No NVIDIA driver found (libnvidia-ml.so.1 missing)",
    "NVML_ERROR_DRIVER_NOT_LOADED": "NVIDIA driver not loaded (NVML: Driver Not Loaded)",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH":
        "NVIDIA driver and NVML library versions differ (reboot or reload the nvidia kernel module)",
    "NVML_ERROR_NO_PERMISSION": "No permission to open the NVIDIA driver (NVML: Insufficient Permissions)",
}


class _Session:
    """One nvmlInit .. nvmlShutdown: the device list and the per-function error policy."""

    def __init__(self, nv: ModuleType) -> None:
        self.nv = nv
        self.functions = _resolve_functions(nv)
        self.lost: set[_Device] = set()  # devices that answered GPU_IS_LOST during this sample
        self.devices: list[_Device] = []
        self.problems: list[str] = []  # devices NVML counts but would not hand out
        for index in range(nv.nvmlDeviceGetCount()):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
            except nv.NVMLError as exc:
                self.problems.append(f"GPU {index} unavailable ({exc})")
                continue
            self.devices.append(self._describe(_Device(index, handle)))

    @classmethod
    def open(cls, nv: ModuleType | None) -> tuple[_Session | None, str | None]:
        """Import pynvml if needed and start NVML; (session, None) or (None, banner)."""
        if nv is None:
            try:
                import pynvml as nv
            except ImportError as exc:
                return None, f"nvidia-ml-py is not installed ({exc}): GPU panel disabled"
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            reason = next((text for name, text in _INIT_FAILURES.items()
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

    def _describe(self, device: _Device) -> _Device:
        """Read the values that never change during a session: UUID, name, MIG layout."""
        device.uuid = self.query(device, "nvmlDeviceGetUUID")
        device.name = self.query(device, "nvmlDeviceGetName")
        mode = self.query(device, "nvmlDeviceGetMigMode")  # [current, pending]
        device.mig_enabled = bool(mode) and mode[0] == self.nv.NVML_DEVICE_MIG_ENABLE
        if not device.mig_enabled:
            return device
        for position in range(self.query(device, "nvmlDeviceGetMaxMigDeviceCount") or 0):
            try:
                handle = self.nv.nvmlDeviceGetMigDeviceHandleByIndex(device.handle, position)
            except self.nv.NVMLError:  # an empty slot: MIG device indices can be sparse
                continue
            mig = _Device(device.index, handle, parent=device)
            mig.uuid = self.query(mig, "nvmlDeviceGetUUID")
            full_name = self.query(mig, "nvmlDeviceGetName")  # e.g. "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
            model, _, profile = (full_name or "").partition(" MIG ")
            mig.name = model or device.name
            mig.mig = f"MIG {profile}" if profile else "MIG"
            device.slices.append(mig)
        return device

    def query(self, device: _Device, names: str | tuple[str, ...], *args: Any, not_found: Any = None) -> Any:
        """Call the first of the pynvml variants ``names`` that the driver has, on ``device``.

        Returns None when the value cannot be read, ``not_found`` on NVML_ERROR_NOT_FOUND.
        A missing function is forgotten for the session, and a NOT_SUPPORTED or NO_PERMISSION
        answer for the device, so neither is asked again.
        """
        nv = self.nv
        for name in (names,) if isinstance(names, str) else names:
            function = self.functions.get(name)
            if function is None:
                continue
            if name in device.unsupported:
                return None
            for _ in range(_LIST_RETRIES):
                try:
                    return function(device.handle, *args)
                except nv.NVMLError as exc:
                    if exc.value == nv.NVML_ERROR_INSUFFICIENT_SIZE:
                        continue  # a list grew between pynvml's count and read calls
                    if exc.value == nv.NVML_ERROR_FUNCTION_NOT_FOUND:
                        del self.functions[name]
                        break  # an older driver: try the next variant
                    if exc.value in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_NO_PERMISSION):
                        device.unsupported.add(name)
                    elif exc.value == nv.NVML_ERROR_NOT_FOUND:
                        return not_found
                    elif exc.value == nv.NVML_ERROR_GPU_IS_LOST:
                        self.lost.add(device)
                    return None
            else:
                return None  # the list kept growing faster than it could be read
        return None

    def cached(self, device: _Device, key: str, max_age_s: float, now: float,
               read: Callable[[], Any]) -> Any:
        """``read()``, reused for ``max_age_s`` seconds."""
        read_at, value = device.cached.get(key, (-math.inf, None))
        if now - read_at >= max_age_s:
            value = read()
            device.cached[key] = (now, value)
        return value

    def processes(self, device: _Device) -> dict[int, int | None] | None:
        """pid -> GPU memory in bytes (None when the driver cannot say) for every process with a
        compute or graphics context on ``device``; None when neither list can be read."""
        lists = [self.query(device, (f"nvmlDeviceGet{kind}RunningProcesses_v3",
                                     f"nvmlDeviceGet{kind}RunningProcesses_v2"))
                 for kind in ("Compute", "Graphics")]
        if all(found is None for found in lists):
            return None
        memory: dict[int, int | None] = {}
        for entry in (entry for found in lists if found for entry in found):
            # A process with both kinds of context is in both lists, with the same memory.
            memory.setdefault(entry.pid, entry.usedGpuMemory)
        return memory


# --- sampler ------------------------------------------------------------------------------------

class GpuSampler:
    """NVML readings for the GPUs a job uses, sampled on a background thread.

    Which GPUs (the first rule that yields at least one device wins; see ``selection_rule``):

    1. ``"device_uuids"``: the CUDA device UUIDs the probe reported, matched to NVML devices and
       MIG slices by UUID (with or without the 'GPU-'/'MIG-' prefix), in the probe's order.
    2. ``"visible_devices"``: the job's ``CUDA_VISIBLE_DEVICES``, read as CUDA does: integer
       indices or (prefixes of) 'GPU-'/'MIG-' UUIDs, stopping at the first entry that names no
       device or repeats one. Indices are taken as NVML indices, which is CUDA's order on machines
       whose GPUs are all the same model, or with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    3. ``"job_processes"``: the GPUs (or MIG slices) on which the job's process tree holds a
       context; re-checked every sample, as a job creates its contexts late.
    4. ``"all"``: every GPU, with MIG GPUs represented by their slices.

    The job's processes are ``job_pid`` and all its descendants, read from /proc every sample.
    Pass ``nvml`` to use a stand-in for the ``pynvml`` module (tests); None imports pynvml.
    NVML is initialised once, on the first sample, and shut down by :meth:`stop`.
    """

    def __init__(self, job_pid: int | None, device_uuids: Sequence[str] = (),
                 visible_devices: str | None = None, interval_s: float = 0.5,
                 nvml: ModuleType | None = None) -> None:
        if job_pid is not None and (isinstance(job_pid, bool) or not isinstance(job_pid, int)
                                    or job_pid <= 0):
            raise ValueError(f"job_pid must be a positive process id or None, got {job_pid!r}")
        if isinstance(device_uuids, str) or not all(isinstance(u, str) for u in device_uuids):
            raise TypeError("device_uuids must be a sequence of UUID strings such as ['GPU-5d1f...'], "
                            f"got {device_uuids!r}")
        if visible_devices is not None and not isinstance(visible_devices, str):
            raise TypeError(f"visible_devices must be the CUDA_VISIBLE_DEVICES string or None, "
                            f"got {visible_devices!r}")
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) \
                or not math.isfinite(interval_s) or interval_s <= 0:
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        self._job_pid = job_pid
        self._device_uuids = tuple(device_uuids)
        self._visible_devices = visible_devices
        self._interval_s = float(interval_s)
        self._nvml = nvml
        self._lock = threading.Lock()  # one sample at a time; no shutdown during a sample
        self._session: _Session | None = None
        self._failure: str | None = None  # why NVML could not start; sticks until stop()
        self._fixed: tuple[str, list[_Device]] | None = None  # rule 1 or 2, decided once per session
        self._selection_rule: str | None = None
        self._latest = GpuSnapshot(time.time(), ())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def selection_rule(self) -> str | None:
        """The rule that chose the GPUs of the latest sample (see the class docstring)."""
        return self._selection_rule

    def start(self) -> None:
        """Sample every ``interval_s`` on a daemon thread until :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bsmon-gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and shut NVML down; a later sample or start() opens NVML again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._session is not None:
                self._session.close()
            self._session, self._failure, self._fixed = None, None, None

    def latest(self) -> GpuSnapshot:
        """The newest snapshot (no GPUs before the first sample). Never blocks, never raises."""
        return self._latest

    def sample_once(self) -> GpuSnapshot:
        """Read every watched GPU now, store the snapshot as :meth:`latest` and return it."""
        with self._lock:
            snapshot = self._sample()
            self._latest = snapshot
            return snapshot

    def _run(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as exc:  # noqa: BLE001 - a bug must show in the panel, not freeze it
                self._latest = GpuSnapshot(time.time(), (), f"GPU sampling failed: {exc!r}")
            deadline = max(deadline + self._interval_s, time.monotonic())
            self._stop.wait(deadline - time.monotonic())

    def _sample(self) -> GpuSnapshot:
        now = time.time()
        if self._session is None and self._failure is None:
            self._session, self._failure = _Session.open(self._nvml)
        session = self._session
        if session is None:
            self._selection_rule = None
            return GpuSnapshot(now, (), self._failure)
        session.lost.clear()
        job = _Job.scan(self._job_pid) if self._job_pid is not None else None
        processes: dict[_Device, dict[int, int | None] | None] = {}

        def processes_on(device: _Device) -> dict[int, int | None] | None:
            if device not in processes:
                processes[device] = session.processes(device)
            return processes[device]

        devices = self._select(session, job, processes_on)
        hints: list[str] = []
        if job is not None and not job.tree:
            hints.append(f"Job process {job.pid} is not running: job GPU memory unavailable")
        readings, namespace_mismatch = [], False
        for device in devices:
            reading, mismatch = self._read(session, device, job, processes_on(device), now)
            readings.append(reading)
            namespace_mismatch |= mismatch
        if namespace_mismatch:
            hints.append("NVML lists GPU processes this PID namespace cannot see (a container?): "
                         "job GPU memory unavailable; run the container with --pid=host")
        problems = [*session.problems, *(
            f"GPU {device.index} ({device.uuid or 'unknown UUID'}) is lost: its readings are unavailable"
            for device in devices if device in session.lost or device.parent in session.lost)]
        return GpuSnapshot(now, tuple(readings), "; ".join(problems) or None, "; ".join(hints) or None)

    def _select(self, session: _Session, job: _Job | None,
                processes_on: Callable[[_Device], dict[int, int | None] | None]) -> list[_Device]:
        if self._fixed is None:
            self._fixed = self._fixed_selection(session)
        rule, devices = self._fixed
        if not devices:
            leaves = [leaf for device in session.devices for leaf in device.leaves()]
            used = [leaf for leaf in leaves
                    if job is not None and job.tree & set(processes_on(leaf) or ())]
            rule, devices = ("job_processes", used) if used else ("all", leaves)
        self._selection_rule = rule
        return devices

    def _fixed_selection(self, session: _Session) -> tuple[str, list[_Device]]:
        """Rules 1 and 2, which depend only on what the probe reported."""
        by_key = {_uuid_key(d.uuid): d for physical in session.devices
                  for d in (physical, *physical.slices) if d.uuid}
        from_uuids: list[_Device] = []
        for uuid in self._device_uuids:
            device = by_key.get(_uuid_key(uuid))
            for leaf in device.leaves() if device is not None else ():
                if leaf not in from_uuids:
                    from_uuids.append(leaf)
        if from_uuids:
            return "device_uuids", from_uuids
        return "visible_devices", self._visible_selection(session, by_key)

    def _visible_selection(self, session: _Session, by_key: dict[str, _Device]) -> list[_Device]:
        by_index = {device.index: device for device in session.devices}
        chosen: list[_Device] = []
        for entry in (self._visible_devices or "").split(","):
            entry = entry.strip()
            digits = entry[:len(entry) - len(entry.lstrip("0123456789"))]  # CUDA reads "1abc" as 1
            if digits:
                device = by_index.get(int(digits))
            elif entry.lower().startswith(("gpu-", "mig-")):
                matches = [d for key, d in by_key.items() if key.startswith(_uuid_key(entry))]
                device = matches[0] if len(matches) == 1 else None
            else:
                device = None
            if device is None or device in chosen:
                break  # CUDA ignores everything from the first invalid entry on
            chosen.append(device)
        return [leaf for device in chosen for leaf in device.leaves()]

    def _read(self, session: _Session, device: _Device, job: _Job | None,
              processes: dict[int, int | None] | None, now: float) -> tuple[GpuReading, bool]:
        """One device's reading, and whether NVML's PIDs look like another PID namespace's."""
        nv, query = session.nv, session.query
        whole_gpu = device.parent or device  # temperature, clocks and throttling are per GPU
        is_slice = device.parent is not None
        utilization = query(device, "nvmlDeviceGetUtilizationRates")
        memory = query(device, ("nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetMemoryInfo"))
        temperature = query(whole_gpu, ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"),
                            nv.NVML_TEMPERATURE_GPU)
        sm_clock = query(whole_gpu, "nvmlDeviceGetClockInfo", nv.NVML_CLOCK_SM)
        reasons = query(whole_gpu, ("nvmlDeviceGetCurrentClocksEventReasons",
                                    "nvmlDeviceGetCurrentClocksThrottleReasons"))
        power_mw = limit_mw = tx_kib = rx_kib = None
        if not is_slice:
            power_mw = query(device, "nvmlDeviceGetPowerUsage")
            limit_mw = session.cached(device, "power_limit", _SLOW_REFRESH_S, now, lambda: query(
                device, ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit")))
            tx_kib, rx_kib = session.cached(device, "pcie", _PCIE_REFRESH_S, now, lambda: tuple(
                query(device, "nvmlDeviceGetPcieThroughput", counter)
                for counter in (nv.NVML_PCIE_UTIL_TX_BYTES, nv.NVML_PCIE_UTIL_RX_BYTES)))
        job_pids, namespace_mismatch = _job_pids_on(processes, job)
        job_mem = None
        if job_pids is not None:
            used = [processes[pid] for pid in job_pids]
            job_mem = None if None in used else sum(used) / _MIB
        reading = GpuReading(
            index=device.index, uuid=device.uuid, name=device.name,
            util_pct=_number(getattr(utilization, "gpu", None)),
            mem_util_pct=_number(getattr(utilization, "memory", None)),
            mem_used_mib=_number(getattr(memory, "used", None), _MIB),
            mem_reserved_mib=_number(getattr(memory, "reserved", None), _MIB),  # v2 struct only
            mem_total_mib=_number(getattr(memory, "total", None), _MIB),
            job_mem_mib=job_mem,
            job_util_pct=self._job_utilization(session, device, job_pids),
            power_w=_number(power_mw, 1000), power_limit_w=_number(limit_mw, 1000),
            temp_c=_number(temperature), sm_clock_mhz=_number(sm_clock),
            throttle_reasons=_throttle_names(reasons),
            pcie_tx_mib_s=_number(tx_kib, 1024), pcie_rx_mib_s=_number(rx_kib, 1024),
            mig=device.mig,
        )
        return reading, namespace_mismatch

    @staticmethod
    def _job_utilization(session: _Session, device: _Device, job_pids: list[int] | None) -> float | None:
        """Sum of the job processes' SM utilisation in their newest samples, capped at 100 %."""
        if job_pids is None:
            return None
        since_us = device.utilization_seen_us or (time.time_ns() // 1000 - 1_000_000)
        samples = session.query(device, "nvmlDeviceGetProcessUtilization", since_us, not_found=())
        if samples is None:
            return None
        newest: dict[int, Any] = {}
        for sample in samples:
            if sample.pid not in newest or sample.timeStamp > newest[sample.pid].timeStamp:
                newest[sample.pid] = sample
        if newest:
            device.utilization_seen_us = max(sample.timeStamp for sample in newest.values())
        return float(min(100, sum(newest[pid].smUtil for pid in job_pids if pid in newest)))


def _job_pids_on(processes: dict[int, int | None] | None, job: _Job | None) -> tuple[list[int] | None, bool]:
    """The job's PIDs among a GPU's processes, or None when they cannot be told apart.

    Returns (pids, namespace_mismatch). No match is an honest "the job uses none of this GPU"
    only when every listed process is visible here; NVML listing PIDs that /proc does not have
    means NVML speaks another PID namespace's numbers (a container), and then nothing is known.
    """
    if job is None or not job.tree or processes is None:
        return None, False
    matched = sorted(job.tree.intersection(processes))
    if matched or job.visible.issuperset(processes):
        return matched, False
    return None, True


def _number(value: Any, divisor: float = 1) -> float | None:
    return None if value is None else value / divisor


def _throttle_names(mask: int | None) -> tuple[str, ...]:
    """Names of the active limiting clock-event reasons; unknown bits are named by value."""
    if not mask:
        return ()
    names = [name for bit, name in _LIMITING_REASONS if mask & bit]
    unknown = mask & ~_KNOWN_REASONS
    if unknown:
        names.append(f"unknown reason 0x{unknown:x}")
    return tuple(names)
