"""Measure training throughput at several batch sizes (runs in the training process).

``profile(step_fn)`` times full training steps, doubling the batch size until memory runs out, a
size limit is reached, or throughput stops growing. ``profile_training`` does the same on the
job's own model and optimizer, before or during training, and then puts every piece of training
state back exactly, so training goes on as if the sweep had not run. torch is imported only when
profiling runs, so ``Profile`` can be read back (``Profile.from_dict``) in a process without torch.
"""

from __future__ import annotations

import contextlib
import gc
import numbers
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bsmon.stats.throughput import ThroughputFit, ThroughputPoint, fit_step_time
from bsmon.stats.units import ProfileUnits

#: Plateau: stop doubling once PLATEAU_PATIENCE doublings in a row each raised throughput by
#: less than PLATEAU_MIN_GAIN. On t = alpha + beta*B a doubling from B gains B_half/(B_half + 2B),
#: under 5% once B > 9.5*B_half, so the sweep ends near 20-40x B_half: well into saturation.
PLATEAU_MIN_GAIN = 0.05
PLATEAU_PATIENCE = 2
#: Doubling stops here (stop_reason "max_batch") when no max_batch is given: no real micro-batch is
#: this large, and it keeps a step_fn that ignores its batch size from doubling forever.
SIZE_CEILING = 1 << 20

STOP_REASONS = ("out_of_memory", "max_batch", "plateau", "all_sizes")
_CPU_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


@dataclass
class Profile:
    """The result of a throughput sweep.

    ``fit`` (the step-time line, None with fewer than two sizes) and ``memory_limit_batch`` (the
    largest size that ran, i.e. known to fit; None if none did) are derived from ``points``.
    ``oom_batch`` is the size that ran out of memory, if any. ``stop_reason`` is one of
    STOP_REASONS. ``peak_memory_bytes`` of each point is CUDA peak allocation on a GPU, and on the
    CPU the growth of the process's peak RSS since the sweep began (see ``profile``).

    Sizes (and ``samples_per_s``) are in ``unit`` ("samples", or "tokens" with
    ``tokens_per_sample``), of one rank's batch when ``per_rank`` (what ``step_fn(batch_size)``
    receives) or of the whole job's, measured on ``world_size`` ranks. A job converts them into
    its own unit and data-parallel size (bsmon.stats.units).
    """

    points: list[ThroughputPoint]
    oom_batch: int | None
    device: str
    stop_reason: str
    unit: str = "samples"
    tokens_per_sample: int | None = None
    world_size: int = 1
    per_rank: bool = True
    fit: ThroughputFit | None = field(init=False)
    memory_limit_batch: int | None = field(init=False)

    def __post_init__(self) -> None:
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(f"stop_reason must be one of {STOP_REASONS}, got {self.stop_reason!r}")
        self.units  # checks the unit fields
        sizes = {p.batch_size for p in self.points}
        self.fit = fit_step_time(self.points) if len(sizes) >= 2 else None
        self.memory_limit_batch = max(sizes) if sizes else None

    @property
    def units(self) -> ProfileUnits:
        return ProfileUnits(self.unit, self.tokens_per_sample, self.world_size, self.per_rank)

    def to_dict(self) -> dict:
        """JSON-safe. The fit and memory limit are left out: from_dict derives them again."""
        return {
            "points": [asdict(p) for p in self.points],
            "oom_batch": self.oom_batch,
            "device": self.device,
            "stop_reason": self.stop_reason,
            "unit": self.unit,
            "tokens_per_sample": self.tokens_per_sample,
            "world_size": self.world_size,
            "per_rank": self.per_rank,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        """A Profile from to_dict's output. Profiles saved before the unit fields existed were
        all in samples per rank, on one rank: those are the defaults."""
        try:
            points = [ThroughputPoint(**p) for p in d["points"]]
            return cls(points, d["oom_batch"], d["device"], d["stop_reason"], unit=d.get("unit", "samples"),
                       tokens_per_sample=d.get("tokens_per_sample"), world_size=d.get("world_size", 1),
                       per_rank=d.get("per_rank", True))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a Profile dict ({exc}); expected the output of Profile.to_dict") from exc


def plateau_reached(samples_per_s: Sequence[float]) -> bool:
    """Whether the last PLATEAU_PATIENCE doublings each gained less than PLATEAU_MIN_GAIN."""
    if len(samples_per_s) <= PLATEAU_PATIENCE:
        return False
    recent = samples_per_s[-PLATEAU_PATIENCE - 1:]
    return all(after < before * (1 + PLATEAU_MIN_GAIN) for before, after in zip(recent, recent[1:]))


def profile(
    step_fn: Callable[[int], object],
    batch_sizes: Sequence[int] | None = None,
    *,
    max_batch: int | None = None,
    warmup: int = 2,
    steps: int = 5,
    start: int = 1,
    device=None,
    on_point: Callable[[ThroughputPoint], object] | None = None,
    unit: str = "samples",
    tokens_per_sample: int | None = None,
) -> Profile:
    """Time ``step_fn(batch_size)``, one full training step, at several batch sizes.

    With ``batch_sizes`` every listed size up to ``max_batch`` is measured, smallest first. Without,
    sizes double from ``start`` until out of memory, ``max_batch`` (measured last even if not on the
    doubling sequence), or a throughput plateau (see PLATEAU_MIN_GAIN). Each size runs ``warmup``
    untimed steps and ``steps`` timed ones; on CUDA the device is synchronised once before and once
    after the timed steps, never between them. ``on_point`` receives each point as it is measured.

    Sizes are what ``step_fn`` receives: one rank's batch, in ``unit`` ("samples" by default;
    "tokens" with ``tokens_per_sample``). In a multi-process job every rank profiles its own
    share at the same time; the profile records the world size, and a job scales it to its own.

    Out of memory (torch.OutOfMemoryError, or the CPU allocator's RuntimeError) at a size ends the
    sweep there and is recorded as ``oom_batch``; memory is released before returning. Any other
    exception from ``step_fn`` propagates unchanged.

    Memory: on CUDA, torch.cuda.max_memory_allocated after a reset per size (tensors only, not the
    caching allocator's reserve). On the CPU, how far the process's peak resident set size has risen
    since the sweep began: a high-water mark, so it counts only memory beyond the earlier peak
    (zero if the process peaked higher before profiling), includes everything the process allocated
    meanwhile, and is None where the resource module is missing (Windows).
    """
    import torch

    for name, value, low in (("warmup", warmup, 0), ("steps", steps, 1), ("start", start, 1)):
        _check_int(name, value, low)
    if max_batch is not None:
        _check_int("max_batch", max_batch, 1)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"profile supports cpu and cuda devices, got {device}")
    units = ProfileUnits(unit, tokens_per_sample, _world_size(), per_rank=True)  # refuses bad units early
    limit = max_batch if max_batch is not None else SIZE_CEILING
    if batch_sizes is not None:
        for size in batch_sizes:
            _check_int("each batch size", size, 1)
        planned = sorted({int(s) for s in batch_sizes if s <= limit})
        if not planned:
            raise ValueError(f"no batch size in {list(batch_sizes)} is within max_batch={max_batch}")
    else:
        planned = None

    from bsmon.probe.monitor import active_monitor

    monitor = active_monitor()  # a watched job streams the points and keeps the profile in its session
    meter = _MemoryMeter(device)
    points: list[ThroughputPoint] = []
    oom_batch = stop_reason = None
    size = planned[0] if planned is not None else min(start, limit)
    while stop_reason is None:
        try:
            point = _measure(step_fn, size, warmup, steps, device, meter)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            oom_batch, stop_reason = size, "out_of_memory"
            continue
        points.append(point)
        if monitor is not None:
            monitor.record_profile_point({**asdict(point), **_units_dict(units)})
        if on_point is not None:
            on_point(point)
        if planned is not None:
            if len(points) == len(planned):
                stop_reason = "all_sizes"
            else:
                size = planned[len(points)]
        elif size >= limit:
            stop_reason = "max_batch"
        elif plateau_reached([p.samples_per_s for p in points]):
            stop_reason = "plateau"
        else:
            size = min(2 * size, limit)
    if oom_batch is not None:  # out of the except block, so the failed step's frames are released
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = Profile(points, oom_batch, str(device), stop_reason, **_units_dict(units))
    if monitor is not None:
        monitor.record_profile(result.to_dict())
    return result


def _units_dict(units: ProfileUnits) -> dict:
    return {"unit": units.unit, "tokens_per_sample": units.tokens_per_sample,
            "world_size": units.world_size, "per_rank": units.per_rank}


def _world_size() -> int:
    """Ranks profiling together: torch.distributed's world, else $WORLD_SIZE (torchrun), else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _measure(step_fn, batch_size: int, warmup: int, steps: int, device, meter: _MemoryMeter
             ) -> ThroughputPoint:
    meter.reset()
    for _ in range(warmup):
        step_fn(batch_size)
    _synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        step_fn(batch_size)
    _synchronize(device)
    step_time = (time.perf_counter() - began) / steps
    return ThroughputPoint(batch_size, step_time, batch_size / step_time, meter.peak())


def _synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


class _MemoryMeter:
    """Peak memory of one batch size (CUDA) or peak-RSS growth since construction (CPU)."""

    def __init__(self, device):
        self.device = device
        self.baseline = _peak_rss_bytes() if device.type == "cpu" else None

    def reset(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        if self.baseline is None:
            return None
        return _peak_rss_bytes() - self.baseline


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5
    if isinstance(exc, out_of_memory):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CPU_OOM_MESSAGES)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def profile_training(
    model,
    optimizer,
    make_batch: Callable[[int], Any],
    step: Callable[[Any], object],
    *,
    scaler=None,
    batch_sizes: Sequence[int] | None = None,
    max_batch: int | None = None,
    warmup: int = 1,
    steps: int = 3,
    start: int = 1,
    device=None,
    on_point: Callable[[ThroughputPoint], object] | None = None,
) -> Profile:
    """Profile micro-batch sizes on the job's own training step, then restore all training state.

    ``make_batch(size)`` returns a batch of ``size`` samples (build it from the job's dataset and
    collate function; it must not advance the training data stream). ``step(batch)`` runs one
    full training step on it: forward, backward, ``optimizer.step()``, zero_grad (through
    ``scaler`` if the job uses a GradScaler). Sizes are chosen and timed by :func:`profile` (one
    batch is built per size, during its untimed warm-up); out of memory ends the sweep there.

    Before the sweep, the model's parameters, gradients, buffers and train/eval modes, the
    optimizer's state and hyperparameters, the GradScaler's scale, and the Python, NumPy, torch CPU
    and CUDA random generators are copied to host memory; afterwards, whatever happened (out of
    memory, another exception), they are put back bit for bit. A watched job is paused meanwhile:
    the sweep's steps are not training steps and are neither counted nor measured, while the profile
    itself is recorded in the session and drives the optimal batch size.
    """
    _check_int("warmup", warmup, 1)  # the warm-up builds each size's batch
    from bsmon.probe.monitor import active_monitor

    monitor = active_monitor()
    batches: dict[int, Any] = {}

    def step_fn(size: int) -> None:
        if size not in batches:
            batches.clear()  # the previous size's batch goes before the next is built
            batches[size] = make_batch(size)
        step(batches[size])

    began = time.perf_counter()
    from bsmon.snapshot import Snapshot

    # Host memory, not the device: a copy on the GPU would take the memory the sweep is measuring.
    saved = Snapshot(model, optimizer, scaler=scaler, to_host=True)
    with monitor.paused() if monitor is not None else contextlib.nullcontext():
        try:
            result = profile(step_fn, batch_sizes, max_batch=max_batch, warmup=warmup, steps=steps,
                             start=start, device=device, on_point=on_point)
        finally:
            batches.clear()
            saved.restore()
    if monitor is not None:
        sizes = ", ".join(str(p.batch_size) for p in result.points) or "none"
        monitor.record_event("info", (
            f"throughput profile of micro-batch sizes {sizes} took {time.perf_counter() - began:.1f} s "
            f"(stopped: {result.stop_reason.replace('_', ' ')}); training state restored"))
    return result
