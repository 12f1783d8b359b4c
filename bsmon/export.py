"""CSV export: one row per optimizer step, from the same SessionModel the views use.

The columns are documented in docs/csv.md. Missing values (no estimate yet, a
scalar not logged at that step) are empty cells, never a made-up number.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from pathlib import Path
from typing import TextIO

import numpy as np

from bsmon.gpu import CSV_COLUMNS
from bsmon.model import SessionModel

BASE_COLUMNS = ["step", "time", "elapsed_s", "batch_size", "micro_batches", "skipped_steps", "step_time_s",
                "samples_per_s", "loss"]
NOISE_COLUMNS = ["b_simple", "b_simple_low", "b_simple_high", "noise_age_steps", "grad_sq", "trace_sigma",
                 "noise_coverage"]
OPTIMAL_COLUMNS = ["b_noise", "b_opt", "b_opt_speedup"]
#: A branch check's result, on the row of the step it branched from (empty elsewhere).
BRANCH_COLUMNS = ["branch_b_crit", "branch_b_crit_low", "branch_b_crit_high", "branch_b_simple_ratio"]
RANK_COLUMNS = ["world_size", "slowest_rank_step_time_s"]
GPU_COLUMNS = list(CSV_COLUMNS)
#: A step takes the ``ranks`` record nearest in time, if one lies this close (a big job writes
#: one every world_size/64 seconds); else slowest_rank_step_time_s stays empty.
RANKS_MAX_GAP_S = 30.0
#: A step takes the GPU sample nearest in time, if one lies this close; else the GPU cells stay empty.
GPU_MAX_GAP_S = 5.0


def _cell(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "" if value is None or math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _integral(value: float) -> int | None:
    return None if math.isnan(value) else int(value)


def columns(model: SessionModel) -> list[str]:
    scalars = [name for name in model.history.scalar_names if name != "loss"]
    return BASE_COLUMNS + scalars + NOISE_COLUMNS + OPTIMAL_COLUMNS + BRANCH_COLUMNS + RANK_COLUMNS + GPU_COLUMNS


def write_csv(model: SessionModel, out: TextIO) -> int:
    """Write the session as CSV to ``out``; returns the number of step rows."""
    history = model.history
    if history is None:
        raise ValueError("this SessionModel keeps no history (keep_history=False); nothing to export")
    names = columns(model)
    scalar_names = [name for name in history.scalar_names if name != "loss"]
    t0 = model.hello["t0"] if model.hello else (history.time[0] if len(history) else 0.0)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    step_times = np.frombuffer(history.time, dtype=float) if len(history) else np.empty(0)
    gpu_index = history.nearest_gpu_sample(step_times, GPU_MAX_GAP_S)
    ranks_index = history.nearest_ranks_record(step_times, RANKS_MAX_GAP_S)
    world_size = int((model.hello or {}).get("world_size") or 1)
    checks = {check.step: check for check in model.branch_checks}  # the latest check of a step wins
    for i in range(len(history)):
        step = history.step[i]
        t = history.time[i]
        dt_s = history.step_time_s[i]
        batch = history.batch_size[i]
        logged = history.scalars.get(step, {})
        check = checks.get(step)
        row = [
            step,
            dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds"),
            t - t0,
            int(batch),
            history.micro_batches[i],
            history.skipped_steps[i],
            dt_s,
            batch / dt_s if dt_s > 0 else None,
            logged.get("loss"),
            *(logged.get(name) for name in scalar_names),
            history.b_simple[i], history.b_simple_low[i], history.b_simple_high[i],
            _integral(history.noise_age_steps[i]), history.grad_sq[i], history.trace_sigma[i],
            history.noise_coverage[i],
            history.b_noise[i], _integral(history.b_opt[i]), history.b_opt_speedup[i],
            *((check.b_crit, check.b_crit_low, check.b_crit_high, check.ratio) if check else (None,) * 4),
            history.rank_world_size[ranks_index[i]] if ranks_index[i] >= 0 else world_size,
            history.slowest_rank_step_time_s[ranks_index[i]] if ranks_index[i] >= 0 else None,
            *(history.gpu_fields[name][gpu_index[i]] if gpu_index[i] >= 0 and name in history.gpu_fields
              else None for name in GPU_COLUMNS),
        ]
        writer.writerow([value if isinstance(value, str) else _cell(value) for value in row])
    return len(history)


def export_to_file(model: SessionModel, path: Path) -> int:
    """Write the CSV atomically: a failure (full disk) leaves no half-written file behind."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "w", newline="") as handle:
            rows = write_csv(model, handle)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows
