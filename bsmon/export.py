"""CSV export and ``bsmon.load()``: one row per optimizer step, streamed from the session file.

The records are read from disk in batches (``store.iter_record_batches``) through a
SessionModel, the same one the views use, which hands over each step's row as it ingests
the step: memory stays bounded however long the session (a 10M-step session exports
like a 10k one). The columns are documented in docs/csv.md; :func:`rows` makes every row,
for the CSV and for the DataFrame alike. Missing values (no estimate yet, a scalar not
logged at that step) are empty cells, never a made-up number.

Two passes over the file: the first collects what the header and the per-step lookups need
(the names logged, the ``ranks`` and ``branch_check`` records, the GPU samples of the
session's gpu file, all small), the second makes the rows.
"""

from __future__ import annotations

import collections
import csv
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TextIO

import numpy as np

from bsmon import store
from bsmon.gpu import CSV_COLUMNS
from bsmon.model import SessionModel, nearest_sample, summarise_ranks
from bsmon.records import STEP_COLUMNS
from bsmon.stats.branch import BranchCheck

if TYPE_CHECKING:
    import pandas

#: The model's per-step columns (bsmon.records.STEP_COLUMNS) up to step_time_s, with elapsed_s
#: after time; then samples_per_s and the logged scalars, loss first; then the rest of the table.
_SPLIT = next(i for i, column in enumerate(STEP_COLUMNS) if column.name == "step_time_s") + 1
_INTEGERS = [i for i, column in enumerate(STEP_COLUMNS) if column.type is int]
_AT = {column.name: i for i, column in enumerate(STEP_COLUMNS)}
BASE_COLUMNS = [header for column in STEP_COLUMNS[:_SPLIT]
                for header in ((column.header, "elapsed_s") if column.name == "time" else (column.header,))]
BASE_COLUMNS += ["samples_per_s", "loss"]
FIGURE_COLUMNS = [column.header for column in STEP_COLUMNS[_SPLIT:]]
#: A branch check's result, on the row of the step it branched from (empty elsewhere).
BRANCH_COLUMNS = ["branch_b_crit", "branch_b_crit_low", "branch_b_crit_high", "branch_b_simple_ratio"]
RANK_COLUMNS = ["world_size", "slowest_rank_step_time_s"]
GPU_COLUMNS = list(CSV_COLUMNS)
#: A step takes the ``ranks`` record nearest in time, if one lies this close (a big job writes
#: one every world_size/64 seconds); else slowest_rank_step_time_s stays empty.
RANKS_MAX_GAP_S = 30.0
#: A step takes the GPU sample nearest in time, if one lies this close; else the GPU cells stay empty.
GPU_MAX_GAP_S = 5.0
#: A step's row waits until a step this many steps later arrives, for the scalars logged for it
#: (``log()`` may run before or after the optimizer step, in several calls).
SCALARS_WAIT_STEPS = 64
#: Rows are made this many at a time (the nearest GPU sample and ranks record, vectorised).
ROW_BLOCK = 4096


@dataclass
class SessionIndex:
    """What the first pass collects: the header's scalar names and the per-step lookups."""

    #: hello, bye, estimator and events, as the views read them (no steps ingested)
    model: SessionModel = field(default_factory=lambda: SessionModel(keep_history=False))
    scalar_names: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    checks: dict[int, BranchCheck] = field(default_factory=dict)  # by step; the latest check of a step wins
    rank_time: list[float] = field(default_factory=list)
    rank_world_size: list[int] = field(default_factory=list)
    slowest_rank_step_time_s: list[float | None] = field(default_factory=list)
    gpu_time: np.ndarray = field(default_factory=lambda: np.empty(0))
    gpu_fields: dict[str, list[float | None]] = field(default_factory=dict)
    steps: int = 0


def _records_path(session: "store.SessionInfo | os.PathLike") -> Path:
    return session.records_path if isinstance(session, store.SessionInfo) else Path(session) / store.RECORDS_FILE


def scan(session: "store.SessionInfo | os.PathLike") -> SessionIndex:
    """The first pass: read the session's records once, keeping only the small parts."""
    path = _records_path(session)
    index = SessionIndex()
    for batch in store.iter_record_batches(path):
        for record in batch:
            kind = record["k"]
            if kind == "step":
                index.steps += 1
            elif kind == "scalars":
                for name in record["values"]:
                    index.scalar_names.setdefault(name)
            elif kind == "ranks":
                summary = summarise_ranks(record)
                index.rank_time.append(record["t"])
                index.rank_world_size.append(summary.world_size)
                index.slowest_rank_step_time_s.append(summary.slowest_step_time_s)
            elif kind == "branch_check":
                check = BranchCheck.from_record(record)
                index.checks[check.step] = check
            elif kind in ("hello", "bye", "estimator", "event"):
                index.model.ingest(record)
    _scan_gpu(path.parent / store.GPU_FILE, index)
    return index


def _scan_gpu(path: Path, index: SessionIndex) -> None:
    """The GPU samples an attached monitor recorded (about one a second), in time order."""
    from bsmon.gpu import GpuSnapshot

    samples: dict[float, dict[str, float | None]] = {}
    for batch in store.iter_record_batches(path):
        for record in batch:
            if record["k"] == "gpu":
                snapshot = GpuSnapshot.from_record(record["snapshot"])
                if snapshot.gpus:
                    samples.setdefault(snapshot.time, snapshot.csv_fields())  # two monitors: keep one
    times = sorted(samples)
    index.gpu_time = np.array(times, dtype=float)
    names = {name for values in samples.values() for name in values}
    index.gpu_fields = {name: [samples[t].get(name) for t in times] for name in names}


def _cell(value: float | int | None) -> str:
    """'' for no value (None, NaN), else the shortest exact form ('inf' for an open bound).

    Row values are Python ints and floats (never numpy scalars, whose repr differs)."""
    if value is None:
        return ""
    text = repr(value)
    return "" if text == "nan" else text


def columns(index: SessionIndex) -> list[str]:
    scalars = [name for name in index.scalar_names if name != "loss"]
    return BASE_COLUMNS + scalars + FIGURE_COLUMNS + BRANCH_COLUMNS + RANK_COLUMNS + GPU_COLUMNS


def rows(session: "store.SessionInfo | os.PathLike", index: SessionIndex | None = None) -> Iterator[list]:
    """One list of values per optimizer step, in the order of :func:`columns` (None or NaN: no value).

    The one place a row is made: the CSV and :func:`bsmon.load`'s DataFrame both come from here.
    ``session`` is a SessionInfo or a session directory; ``index`` its :func:`scan`, if made already.
    """
    index = index or scan(session)
    model = SessionModel(keep_history=False)
    pending: collections.deque[tuple[dict[str, Any], tuple]] = collections.deque()  # (step record, model row)
    logged: dict[int, dict[str, float]] = {}  # step -> scalars, for steps not yet made into rows
    model.on_step_row = lambda record, row: pending.append((record, row))
    maker = _RowMaker(index)
    for batch in store.iter_record_batches(_records_path(session)):
        for record in batch:
            model.ingest(record)
            if record["k"] == "scalars":
                logged.setdefault(record["step"], {}).update((k, float(v)) for k, v in record["values"].items())
        newest = pending[-1][0]["step"] if pending else None
        while pending and pending[0][0]["step"] <= newest - SCALARS_WAIT_STEPS:
            block = [pending.popleft() for _ in range(min(len(pending), ROW_BLOCK))
                     if pending[0][0]["step"] <= newest - SCALARS_WAIT_STEPS]
            yield from maker.rows(block, logged)
    while pending:
        yield from maker.rows([pending.popleft() for _ in range(min(len(pending), ROW_BLOCK))], logged)


class _RowMaker:
    """Turns blocks of (step record, model row) into CSV rows (see docs/csv.md)."""

    def __init__(self, index: SessionIndex) -> None:
        self.index = index
        self.scalar_names = [name for name in index.scalar_names if name != "loss"]
        hello = index.model.hello or {}
        self.t0 = hello.get("t0")
        self.world_size = int(hello.get("world_size") or 1)
        self.rank_time = np.array(index.rank_time, dtype=float)

    def rows(self, block: list[tuple[dict[str, Any], tuple]], logged: dict[int, dict[str, float]]) -> Iterator[list]:
        index = self.index
        times = np.array([row[_AT["time"]] for _, row in block], dtype=float)
        gpu_at = nearest_sample(index.gpu_time, times, GPU_MAX_GAP_S).tolist()
        ranks_at = nearest_sample(self.rank_time, times, RANKS_MAX_GAP_S).tolist()
        gpu = [index.gpu_fields.get(name) for name in GPU_COLUMNS]
        t0 = self.t0 if self.t0 is not None else times[0]
        no_gpu, no_check = [None] * len(GPU_COLUMNS), (None,) * len(BRANCH_COLUMNS)
        at_step, at_time, at_batch, at_dt = _AT["step"], _AT["time"], _AT["batch_size"], _AT["step_time_s"]
        for (record, row), g, r in zip(block, gpu_at, ranks_at):
            step, t, batch, dt_s = row[at_step], row[at_time], row[at_batch], row[at_dt]
            row = list(row)
            for i in _INTEGERS:
                row[i] = None if row[i] != row[i] else int(row[i])  # NaN: no value
            values = logged.pop(step, {})
            check = index.checks.get(step)
            yield [
                *row[:at_time],
                dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds"),
                t - t0,
                *row[at_time + 1:_SPLIT],
                batch / dt_s if dt_s > 0 else None,
                values.get("loss"),
                *(values.get(name) for name in self.scalar_names),
                *row[_SPLIT:],
                *((check.b_crit, check.b_crit_low, check.b_crit_high, check.ratio) if check else no_check),
                index.rank_world_size[r] if r >= 0 else self.world_size,
                index.slowest_rank_step_time_s[r] if r >= 0 else None,
                *([column[g] if column is not None else None for column in gpu] if g >= 0 else no_gpu),
            ]
        oldest = block[-1][1][at_step]
        for step in [s for s in logged if s <= oldest]:  # logged for a step that has no row
            del logged[step]


def write_csv(session: "store.SessionInfo | os.PathLike", out: TextIO) -> int:
    """Write the session as CSV to ``out``; returns the number of step rows."""
    index = scan(session)
    csv.writer(out, lineterminator="\n").writerow(columns(index))  # logged names may need quoting
    count = 0
    lines = []
    for row in rows(session, index):  # numbers and an ISO time: nothing to quote
        lines.append(",".join([value if value.__class__ is str else _cell(value) for value in row]))
        if len(lines) >= ROW_BLOCK:
            out.write("\n".join(lines) + "\n")
            count += len(lines)
            lines.clear()
    if lines:
        out.write("\n".join(lines) + "\n")
    return count + len(lines)


def export_to_file(session: "store.SessionInfo | os.PathLike", path: Path, *, format: str = "csv") -> int:
    """Write the session as CSV (or Parquet: ``format="parquet"``) atomically: a failure (full
    disk) leaves no half-written file behind. Returns the step rows."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if format == "parquet":
            frame = dataframe(session)
            frame.to_parquet(tmp, index=False)
            count = len(frame)
        else:
            with open(tmp, "w", newline="") as handle:
                count = write_csv(session, handle)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("bsmon.load() and Parquet export need pandas: pip install 'bsmon[pandas]'") from None
    return pandas


def dataframe(session: "store.SessionInfo | os.PathLike") -> "pandas.DataFrame":
    """The session as a DataFrame: the CSV's columns and rows, its metadata in ``attrs``.

    Converted ROW_BLOCK rows at a time: the rows as Python lists never exist all at once.
    """
    pd = _pandas()
    index = scan(session)
    names = columns(index)

    def frame_of(block: list[list]) -> "pandas.DataFrame":
        part = pd.DataFrame(block, columns=names)
        for name in names:
            part[name] = (pd.to_datetime(part[name], utc=True, format="ISO8601") if name == "time"
                          else pd.to_numeric(part[name]))
        return part

    parts, block = [], []
    for row in rows(session, index):
        block.append(row)
        if len(block) >= ROW_BLOCK:
            parts.append(frame_of(block))
            block = []
    parts.append(frame_of(block))
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    model, bye = index.model, index.model.bye or {}
    hello = model.hello or {}
    info = session if isinstance(session, store.SessionInfo) else None
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
    directory = Path(session) if session is not None else None
    if directory is not None and (directory / store.RECORDS_FILE).is_file():
        info = store.session_info(directory)
        if info is None:
            raise store.SessionError(f"{directory} holds no session record yet (no hello record).")
    else:
        info = store.resolve_session(None if session is None else str(session), home)
    return dataframe(info)
