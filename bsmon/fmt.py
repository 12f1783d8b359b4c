"""Number formatting shared by the TUI and headless output."""

from __future__ import annotations

import math


def si(value: float | None, digits: int = 3) -> str:
    """Compact human number: 85213 -> '85.2k', 0.00153 -> '0.00153'; None -> 'N/A'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "N/A"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    magnitude = abs(value)
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            return f"{value / threshold:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def duration(seconds: float | None) -> str:
    """Step times and elapsed times: '850 µs', '12.3 ms', '4.20 s', '1:02:03'."""
    if seconds is None or math.isnan(seconds):
        return "N/A"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def band(value: float | None, low: float | None, high: float | None) -> str:
    """'42 [30, 63]' for an estimate and its interval; 'N/A' without a value."""
    if value is None:
        return "N/A"
    if low is None or high is None:
        return si(value)
    return f"{si(value)} [{si(low)}, {si(high)}]"


def data_parallel(stats) -> int:
    """The data-parallel size of a ``bsmon.model.Stats``: its global batch over rank 0's."""
    if stats.batch_size and stats.local_batch_size:
        return max(1, stats.batch_size // stats.local_batch_size)
    return 1


def accumulate(micro_batch: int, accumulation: int, ranks: int = 1) -> str:
    """'at micro-batch 16: accumulate 4', per rank under data parallelism (micro_batch is global)."""
    if ranks > 1:
        return f"at micro-batch {micro_batch // ranks:,} per rank x {ranks} ranks: accumulate {accumulation}"
    return f"at micro-batch {micro_batch:,}: accumulate {accumulation}"


def optimum(stats) -> str:
    """The optimal batch in one line (a ``bsmon.model.Stats``), or why there is none and what to do."""
    if stats.b_opt is None:
        return f"B* N/A: {stats.b_opt_reason or 'no recommendation yet'}"
    text = f"B* {stats.b_opt}"
    if stats.b_opt_source == "in-run":
        text += f" ({accumulate(stats.b_opt_micro_batch, stats.b_opt_accumulation, data_parallel(stats))})"
    elif stats.b_opt_accumulation:
        text += f" = {stats.b_opt_accumulation}x{stats.b_opt_micro_batch} (accumulate)"
    if stats.b_opt_speedup is not None:
        text += f" {band(stats.b_opt_speedup, stats.b_opt_speedup_low, stats.b_opt_speedup_high)}x speedup"
    return text


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` (at most one more) round axis ticks in [low, high], a 1-2-5 step apart:
    (0, 9.3e4) -> 0, 20k, 40k, 60k, 80k."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low or count < 2:
        return [low] if math.isfinite(low) else []
    base = 10 ** math.floor(math.log10((high - low) / count))
    for step in (m * base for m in (1, 2, 5, 10, 20, 50)):
        first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
        if last - first + 1 <= count + 1:
            return [round(i * step, 12) for i in range(first, last + 1)]  # 0.30000000000000004 -> 0.3
    return [low, high]


def log_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round ticks for a log axis over [low, high] (both > 0): 1-2-5 within a decade while they fit,
    else powers of ten (every k-th when there are more than ``count`` decades)."""
    if not (0 < low < high) or not math.isfinite(high):
        return ticks(low, high, count)
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for mantissas in ((1, 2, 5), (1, 3), (1,)):
        values = [m * 10.0 ** d for d in range(first, last + 1) for m in mantissas]
        values = [v for v in values if low * (1 - 1e-9) <= v <= high * (1 + 1e-9)]
        if 2 <= len(values) <= count:
            return values
        if len(values) > count and mantissas == (1,):
            stride = math.ceil(len(values) / count)
            return values[::stride]
    return ticks(low, high, count)  # less than a decade: round linear steps, placed on the log axis


def tick_label(value: float) -> str:
    """An axis tick: '0', '250', '2.5k', '100k', '5M', '0.02'."""
    return "0" if value == 0 else si(value)


def measured_ago(age_steps: int | None) -> str:
    """'measured this step', 'measured 12 steps ago': the age of a noise estimate."""
    if age_steps is None:
        return "not measured"
    if age_steps == 0:
        return "measured this step"
    return f"measured {age_steps:,} step{'s' if age_steps != 1 else ''} ago"
