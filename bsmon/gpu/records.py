"""The GPU readings bsmon records and shows: :class:`GpuReading`, :class:`GpuSnapshot` and the CSV columns.

Pure data and its JSON codec (for the session's gpu file); :mod:`bsmon.gpu.sampler` produces them.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CSV_COLUMNS", "GpuReading", "GpuSnapshot"]


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
