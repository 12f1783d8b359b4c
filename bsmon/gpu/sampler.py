"""The GPU sampler: which GPUs a job uses, their readings, and the thread that takes them.

MIG: temperature, SM clock and throttle reasons are properties of the whole GPU, so a slice
shows its parent's; power and PCIe traffic cannot be split between slices, so a slice shows
them as N/A rather than its parent's total (which csv_fields would otherwise add up once per
slice). A slice has no utilisation counter at all.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from bsmon.gpu import processes
from bsmon.gpu.nvml import Device, Session, uuid_key
from bsmon.gpu.records import GpuReading, GpuSnapshot

_MIB = 1024 * 1024
_SLOW_REFRESH_S = 30.0  # power limit: changes only when an administrator sets it
_PCIE_REFRESH_S = 2.0  # each PCIe counter read blocks ~20 ms inside the driver
_UTILIZATION_WINDOW_US = 1_000_000  # per-process utilisation: the driver's samples of the last second
_RETRY_FIRST_S = 1.0  # NVML failed to start, or a GPU was lost: look again after this,
_RETRY_MAX_S = 60.0  # doubling up to this
_STOP_TIMEOUT_S = 2.0  # stop() waits this long for a sample stuck in an NVML call
_retry_clock = time.monotonic  # the back-off's clock (tests move it by hand)

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

# Why job memory cannot be matched to NVML's processes (see _Attribution).
REASON_JOB_ELSEWHERE = ("Job GPU memory N/A: the job runs in another PID namespace ({job}) than this monitor "
                        "({monitor}); run bsmon in the job's container")
REASON_CONTAINER = ("Job GPU memory N/A: NVML reports host PIDs and this PID namespace ({monitor}) is not the "
                    "host's (a container?); run the container with --pid=host")
REASON_NAMESPACE_UNKNOWN = "Job GPU memory N/A: /proc/self/ns/pid is unreadable, so NVML's PIDs cannot be matched"
REASON_BY_ELIMINATION = ("GPU {index}: job memory is the one process NVML lists that this PID namespace cannot see, "
                         "taken as the job's because the job holds {node} open (PIDs cannot be matched here)")
REASON_UNSAFE_INDICES = ("CUDA_VISIBLE_DEVICES names GPUs by index, but with CUDA_DEVICE_ORDER={order} CUDA may "
                         "number these different GPUs otherwise than NVML: set CUDA_DEVICE_ORDER=PCI_BUS_ID")


@dataclass(frozen=True)
class _Attribution:
    """How this sample tells the job's processes among NVML's: one of three cases.

    ``job`` set and ``blocked`` None: by PID. ``blocked`` set: not at all, and it says why.
    ``by_elimination``: NVML's PIDs are the host's, so a GPU where exactly one listed PID is
    invisible here and whose device node the job holds open is taken as the job's, labelled.
    """

    job: processes.JobProcesses | None
    blocked: str | None = None
    by_elimination: bool = False


class GpuSampler:
    """NVML readings for the GPUs a job uses, sampled on a background thread.

    Which GPUs (the first rule that yields at least one device wins; see ``selection_rule``):

    1. ``"device_uuids"``: the CUDA device UUIDs the probe reported, matched to NVML devices and
       MIG slices by UUID (with or without the 'GPU-'/'MIG-' prefix), in the probe's order.
    2. ``"visible_devices"``: the job's ``CUDA_VISIBLE_DEVICES``, read as CUDA does: integer
       indices or (prefixes of) 'GPU-'/'MIG-' UUIDs, stopping at the first entry that names no
       device or repeats one. Indices are NVML indices (PCI bus order), which CUDA shares only
       with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, or with its default FASTEST_FIRST on a machine whose
       GPUs are one model without MIG; elsewhere an index entry makes this rule choose nothing.
    3. ``"job_processes"``: the GPUs (or MIG slices) on which the job's process tree holds a
       context; re-checked every sample, as a job creates its contexts late.
    4. ``"all"``: every GPU, with MIG GPUs represented by their slices.

    The job's processes are ``job_pid`` and its descendants (see :mod:`bsmon.gpu.processes`).
    ``job_pid_namespace`` is the job's PID namespace from its hello (None: unknown, taken to be
    this process's); ``nvml_pid_namespace`` is the one NVML's PIDs belong to, the host's.
    Pass ``nvml`` to use a stand-in for the ``pynvml`` module (tests); None imports pynvml.
    NVML starts on the first sample and stops in :meth:`stop`. A failed start, or a lost GPU,
    is looked at again after 1 s, then 2, 4 ... up to 60 s.
    """

    def __init__(self, job_pid: int | None, device_uuids: Sequence[str] = (),
                 visible_devices: str | None = None, interval_s: float = 0.5,
                 nvml: ModuleType | None = None, *, cuda_device_order: str | None = None,
                 job_pid_namespace: str | None = None,
                 nvml_pid_namespace: str = processes.ROOT_PID_NAMESPACE) -> None:
        if job_pid is not None and (isinstance(job_pid, bool) or not isinstance(job_pid, int)
                                    or job_pid <= 0):
            raise ValueError(f"job_pid must be a positive process id or None, got {job_pid!r}")
        if isinstance(device_uuids, str) or not all(isinstance(u, str) for u in device_uuids):
            raise TypeError("device_uuids must be a sequence of UUID strings such as ['GPU-5d1f...'], "
                            f"got {device_uuids!r}")
        for name, value in (("visible_devices", visible_devices), ("cuda_device_order", cuda_device_order),
                            ("job_pid_namespace", job_pid_namespace)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string (as the job's hello gives it) or None, got {value!r}")
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) \
                or not math.isfinite(interval_s) or interval_s <= 0:
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        self._job_pid = job_pid
        self._device_uuids = tuple(device_uuids)
        self._visible_devices = visible_devices
        self._device_order = (cuda_device_order or "FASTEST_FIRST").strip().upper()
        self._job_namespace = job_pid_namespace
        self._nvml_namespace = nvml_pid_namespace
        self._interval_s = float(interval_s)
        self._nvml = nvml
        self._lock = threading.Lock()  # one sample at a time; no shutdown during a sample
        self._session: Session | None = None
        self._failure: str | None = None  # why NVML could not start, until it does
        self._retry_at = -math.inf  # monotonic time of the next start (or re-enumeration) attempt
        self._retry_delay_s = _RETRY_FIRST_S
        self._fixed: tuple[str, list[Device], str | None] | None = None  # rules 1-2: once per session
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
        """Stop the thread and shut NVML down; a later sample or start() opens NVML again.

        Waits at most about 2 s: a sample stuck inside an NVML call (a wedged driver) is left
        behind on its daemon thread, with NVML still open, rather than hang the caller.
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                return  # wedged in NVML, holding the lock
        if not self._lock.acquire(timeout=_STOP_TIMEOUT_S):
            return
        try:
            if self._session is not None:
                self._session.close()
            self._session, self._failure, self._fixed = None, None, None
            self._retry_at, self._retry_delay_s = -math.inf, _RETRY_FIRST_S
        finally:
            self._lock.release()

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

    # -- NVML session -------------------------------------------------------------------------

    def _open_session(self) -> Session | None:
        """The session to sample with: started, or restarted to look for lost GPUs, when due."""
        due = _retry_clock() >= self._retry_at
        session = self._session
        if session is not None and due and (session.lost or session.problems):
            session.close()  # a reset GPU comes back with a new handle; a new session finds it
            self._session = session = None
        if session is None and due:
            session, self._failure = Session.open(self._nvml)
            self._session, self._fixed = session, None
            if session is None:
                self._retry_later()
        return session

    def _retry_later(self) -> None:
        self._retry_at = _retry_clock() + self._retry_delay_s
        self._retry_delay_s = min(2 * self._retry_delay_s, _RETRY_MAX_S)

    def _sample(self) -> GpuSnapshot:
        now = time.time()
        session = self._open_session()
        if session is None:
            self._selection_rule = None
            return GpuSnapshot(now, (), self._failure)
        session.lost.clear()
        attribution = self._attribution()
        processes_seen: dict[Device, dict[int, int | None] | None] = {}
        job_pids_seen: dict[Device, list[int] | None] = {}

        def job_pids_on(device: Device) -> list[int] | None:
            if device not in job_pids_seen:
                processes_seen[device] = session.processes(device)
                job_pids_seen[device] = _job_pids(attribution, device, processes_seen[device])
            return job_pids_seen[device]

        devices, selection_hint = self._select(session, job_pids_on)
        readings = [self._read(session, device, job_pids_on(device), processes_seen[device], now)
                    for device in devices]
        hints = [selection_hint] if selection_hint else []
        job = attribution.job
        if job is not None and not job.alive:
            hints.append(f"Job process {job.pid} is not running: job GPU memory unavailable")
        elif attribution.blocked and any(job_pids_seen[d] is None and processes_seen[d] is not None
                                         for d in devices):
            hints.append(attribution.blocked)
        if attribution.by_elimination:
            hints.extend(REASON_BY_ELIMINATION.format(index=d.index, node=processes.DEVICE_NODE.format(minor=d.minor))
                         for d in devices if job_pids_seen[d])
        lost = [device for device in devices if device in session.lost or device.parent in session.lost]
        if lost or session.problems:
            if _retry_clock() >= self._retry_at:  # not already due to look again
                self._retry_later()
        else:
            self._retry_delay_s = _RETRY_FIRST_S
        problems = [*session.problems, *(
            f"GPU {device.index} ({device.uuid or 'unknown UUID'}) is lost: its readings are unavailable"
            for device in lost)]
        return GpuSnapshot(now, tuple(readings), "; ".join(problems) or None, "; ".join(hints) or None)

    def _attribution(self) -> _Attribution:
        if self._job_pid is None:
            return _Attribution(None)
        monitor = processes.pid_namespace()
        if monitor is None:
            return _Attribution(None, REASON_NAMESPACE_UNKNOWN)
        if self._job_namespace is not None and self._job_namespace != monitor:
            return _Attribution(None, REASON_JOB_ELSEWHERE.format(job=self._job_namespace, monitor=monitor))
        job = processes.JobProcesses(self._job_pid)
        if monitor != self._nvml_namespace:
            return _Attribution(job, REASON_CONTAINER.format(monitor=monitor), by_elimination=True)
        return _Attribution(job)

    # -- which GPUs ---------------------------------------------------------------------------

    def _select(self, session: Session,
                job_pids_on: Callable[[Device], list[int] | None]) -> tuple[list[Device], str | None]:
        if self._fixed is None:
            self._fixed = self._fixed_selection(session)
        rule, devices, hint = self._fixed
        if not devices:
            leaves = [leaf for device in session.devices for leaf in device.leaves()]
            used = [leaf for leaf in leaves if job_pids_on(leaf)]
            rule, devices = ("job_processes", used) if used else ("all", leaves)
        self._selection_rule = rule
        return devices, hint if rule != "device_uuids" else None

    def _fixed_selection(self, session: Session) -> tuple[str, list[Device], str | None]:
        """Rules 1 and 2, which depend only on what the probe reported."""
        by_key = {uuid_key(d.uuid): d for physical in session.devices
                  for d in (physical, *physical.slices) if d.uuid}
        from_uuids: list[Device] = []
        for uuid in self._device_uuids:
            device = by_key.get(uuid_key(uuid))
            for leaf in device.leaves() if device is not None else ():
                if leaf not in from_uuids:
                    from_uuids.append(leaf)
        if from_uuids:
            return "device_uuids", from_uuids, None
        return "visible_devices", *self._visible_selection(session, by_key)

    def _indices_are_cuda_order(self, session: Session) -> bool:
        """Whether CUDA numbers the GPUs as NVML does (PCI bus order)."""
        if self._device_order == "PCI_BUS_ID":
            return True
        one_model = len({device.name for device in session.devices}) == 1
        return one_model and not any(device.mig_enabled for device in session.devices)

    def _visible_selection(self, session: Session, by_key: dict[str, Device]) -> tuple[list[Device], str | None]:
        by_index = {device.index: device for device in session.devices}
        chosen: list[Device] = []
        for entry in (self._visible_devices or "").split(","):
            entry = entry.strip()
            digits = entry[:len(entry) - len(entry.lstrip("0123456789"))]  # CUDA reads "1abc" as 1
            if digits and not self._indices_are_cuda_order(session):
                return [], REASON_UNSAFE_INDICES.format(order=self._device_order)
            if digits:
                device = by_index.get(int(digits))
            elif entry.lower().startswith(("gpu-", "mig-")):
                matches = [d for key, d in by_key.items() if key.startswith(uuid_key(entry))]
                device = matches[0] if len(matches) == 1 else None
            else:
                device = None
            if device is None or device in chosen:
                break  # CUDA ignores everything from the first invalid entry on
            chosen.append(device)
        return [leaf for device in chosen for leaf in device.leaves()], None

    # -- readings -----------------------------------------------------------------------------

    def _read(self, session: Session, device: Device, job_pids: list[int] | None,
              listed: dict[int, int | None] | None, now: float) -> GpuReading:
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
        if not is_slice:  # power and PCIe traffic cannot be split between MIG slices
            power_mw = query(device, "nvmlDeviceGetPowerUsage")
            limit_mw = session.cached(device, "power_limit", _SLOW_REFRESH_S, now, lambda: query(
                device, ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit")))
            tx_kib, rx_kib = session.cached(device, "pcie", _PCIE_REFRESH_S, now, lambda: tuple(
                query(device, "nvmlDeviceGetPcieThroughput", counter)
                for counter in (nv.NVML_PCIE_UTIL_TX_BYTES, nv.NVML_PCIE_UTIL_RX_BYTES)))
        job_mem = None
        if job_pids is not None and listed is not None:
            used = [listed[pid] for pid in job_pids]
            job_mem = None if None in used else sum(used) / _MIB
        return GpuReading(
            index=device.index, uuid=device.uuid, name=device.name,
            util_pct=_number(getattr(utilization, "gpu", None)),
            mem_util_pct=_number(getattr(utilization, "memory", None)),
            mem_used_mib=_number(getattr(memory, "used", None), _MIB),
            mem_reserved_mib=_number(getattr(memory, "reserved", None), _MIB),  # v2 struct only
            mem_total_mib=_number(getattr(memory, "total", None), _MIB),
            job_mem_mib=job_mem,
            job_util_pct=_job_utilization(session, device, job_pids),
            power_w=_number(power_mw, 1000), power_limit_w=_number(limit_mw, 1000),
            temp_c=_number(temperature), sm_clock_mhz=_number(sm_clock),
            throttle_reasons=_throttle_names(reasons),
            pcie_tx_mib_s=_number(tx_kib, 1024), pcie_rx_mib_s=_number(rx_kib, 1024),
            mig=device.mig,
        )


def _job_pids(attribution: _Attribution, device: Device,
              listed: dict[int, int | None] | None) -> list[int] | None:
    """The job's PIDs among ``device``'s processes ([] when none), or None when unknown."""
    job = attribution.job
    if job is None or not job.alive or listed is None:
        return None
    if not attribution.by_elimination:
        return sorted(pid for pid in listed if job.owns(pid))
    invisible = [pid for pid in listed if not job.visible(pid)]
    if len(invisible) == 1 and device.minor is not None and device.minor in job.open_device_minors():
        return invisible
    return None


def _job_utilization(session: Session, device: Device, job_pids: list[int] | None) -> float | None:
    """Sum of the job processes' SM utilisation in the driver's newest samples, capped at 100 %.

    Asks for the last second's samples every time: asking only for samples newer than the last
    one seen gets NOT_FOUND between driver samples. No answer is None (N/A), never 0.
    """
    if job_pids is None:
        return None
    since_us = time.time_ns() // 1000 - _UTILIZATION_WINDOW_US
    samples = session.query(device, "nvmlDeviceGetProcessUtilization", since_us)
    if samples is None:
        return None
    newest: dict[int, Any] = {}
    for sample in samples:
        if sample.pid not in newest or sample.timeStamp > newest[sample.pid].timeStamp:
            newest[sample.pid] = sample
    return float(min(100, sum(newest[pid].smUtil for pid in job_pids if pid in newest)))


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
