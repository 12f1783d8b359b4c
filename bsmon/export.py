"""CSV export and ``bsmon.load()``: one row per optimizer step, from the same SessionModel
the views use.

The columns are documented in docs/csv.md; ``rows()`` makes every row, for the CSV and
for the DataFrame alike. Missing values (no estimate yet, a
scalar not logged at that step) are empty cells, never a made-up number.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TextIO

import numpy as np

from bsmon import store
from bsmon.gpu import CSV_COLUMNS
from bsmon.model import History, SessionModel

if TYPE_CHECKING:
    import pandas

BASE_COLUMNS = ["step", "time", "elapsed_s", "batch_size", "micro_batches", "skipped_steps", "step_time_s",
                "samples_per_s", "loss"]
NOISE_COLUMNS = ["b_simple", "b_simple_low", "b_simple_high", "noise_age_steps", "grad_sq", "trace_sigma",
                 "noise_coverage", "b_simple_precond", "b_simple_precond_low", "b_simple_precond_high"]
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


def rows(model: SessionModel) -> Iterator[list]:
    """One list of values per optimizer step, in the order of :func:`columns` (None: no value).

    The one place a row is made: the CSV and :func:`bsmon.load`'s DataFrame both come from here.
    """
    if model.history is None:
        raise ValueError("this SessionModel keeps no history (keep_history=False); nothing to export")
    return _rows(model, model.history)


def _rows(model: SessionModel, history: History) -> Iterator[list]:
    scalar_names = [name for name in history.scalar_names if name != "loss"]
    t0 = model.hello["t0"] if model.hello else (history.time[0] if len(history) else 0.0)
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
        yield [
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
            history.b_simple_precond[i], history.b_simple_precond_low[i], history.b_simple_precond_high[i],
            history.b_noise[i], _integral(history.b_opt[i]), history.b_opt_speedup[i],
            *((check.b_crit, check.b_crit_low, check.b_crit_high, check.ratio) if check else (None,) * 4),
            history.rank_world_size[ranks_index[i]] if ranks_index[i] >= 0 else world_size,
            history.slowest_rank_step_time_s[ranks_index[i]] if ranks_index[i] >= 0 else None,
            *(history.gpu_fields[name][gpu_index[i]] if gpu_index[i] >= 0 and name in history.gpu_fields
              else None for name in GPU_COLUMNS),
        ]


def write_csv(model: SessionModel, out: TextIO) -> int:
    """Write the session as CSV to ``out``; returns the number of step rows."""
    values = rows(model)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns(model))
    count = 0
    for row in values:
        writer.writerow([value if isinstance(value, str) else _cell(value) for value in row])
        count += 1
    return count


def export_to_file(model: SessionModel, path: Path, *, info: "store.SessionInfo | None" = None,
                   format: str = "csv") -> int:
    """Write the session as CSV (or Parquet: ``format="parquet"``, with ``info`` for its metadata)
    atomically: a failure (full disk) leaves no half-written file behind. Returns the step rows."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if format == "parquet":
            frame = dataframe(model, info)
            frame.to_parquet(tmp, index=False)
            rows = len(frame)
        else:
            with open(tmp, "w", newline="") as handle:
                rows = write_csv(model, handle)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("bsmon.load() and Parquet export need pandas: pip install 'bsmon[pandas]'") from None
    return pandas


def dataframe(model: SessionModel, info: "store.SessionInfo | None" = None) -> "pandas.DataFrame":
    """The session as a DataFrame: the CSV's columns and rows, its metadata in ``attrs``."""
    pd = _pandas()
    names = columns(model)
    frame = pd.DataFrame(list(rows(model)), columns=names)
    for name in names:
        frame[name] = (pd.to_datetime(frame[name], utc=True, format="ISO8601") if name == "time"
                       else pd.to_numeric(frame[name]))
    hello, bye = model.hello or {}, model.bye or {}
    frame.attrs = {
        "session": hello.get("session"), "name": hello.get("name"), "unit": model.unit,
        "status": info.status if info is not None else bye.get("status"), "exit_code": bye.get("code"),
        "command": list(hello.get("command") or []), "hello": dict(hello),
        "estimator": dict(model.estimator or {}), "events": [dict(e) for e in model.events],
    }
    return frame


def load(session: str | os.PathLike | None = None, *, home: Path | None = None) -> "pandas.DataFrame":
    """A recorded session as a pandas DataFrame: one row per optimizer step, the CSV's columns.

    ``session`` is an id, unique id prefix or name (as for ``bsmon export``), or a session
    directory; None means the newest session. ``time`` is a UTC timestamp, missing values
    are NaN, and ``df.attrs`` holds the session's metadata: ``session``, ``name``,
    ``unit``, ``status``, ``exit_code``, ``command``, ``hello`` (the job's first record),
    ``estimator`` (the noise estimator in use and its caveats) and ``events``.
    Needs pandas (``pip install 'bsmon[pandas]'``).
    """
    _pandas()
    from bsmon.client import Feed

    directory = Path(session) if session is not None else None
    if directory is not None and (directory / store.RECORDS_FILE).is_file():
        info = store.session_info(directory)
        if info is None:
            raise store.SessionError(f"{directory} holds no session record yet (no hello record).")
    else:
        info = store.resolve_session(None if session is None else str(session), home)
    return dataframe(Feed().replay(info).model, info)
