"""CSV export and ``bsmon.load()``: one row per optimizer step, streamed from the session file.

The records are read from disk in batches (``store.iter_record_batches``) through a
SessionModel, the same one the views use, which hands over the steps' rows as it ingests
them (a table per block of plain steps, decoded in bulk): memory stays bounded however long
the session (a 10M-step session exports like a 10k one). The columns are documented in
docs/csv.md; :func:`blocks` makes every row, column by column, for the CSV and for the
DataFrame alike. Missing values (no estimate yet, a scalar not
logged at that step) are empty cells, never a made-up number.

Two passes over the file: the first collects what the header and the per-step lookups need
(the names logged, the ``ranks`` and ``branch_check`` records, the GPU samples of the
session's gpu file, all small) and reads past the steps undecoded; the second
makes the rows. The CSV's text is made a block of rows at a time (:func:`_text`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TextIO

import numpy as np
import orjson

from bsmon import store
from bsmon.gpu import CSV_COLUMNS
from bsmon.model import SessionModel, nearest_sample, summarise_ranks
from bsmon.records import STEP_COLUMN_AT, STEP_COLUMNS
from bsmon.stats.branch import BranchCheck
from bsmon.wire import StepBlock

if TYPE_CHECKING:
    import pandas

#: The model's per-step columns (bsmon.records.STEP_COLUMNS) up to step_time_s, with elapsed_s
#: after time; then samples_per_s and the logged scalars, loss first; then the rest of the table.
_SPLIT = STEP_COLUMN_AT["step_time_s"] + 1
BASE_COLUMNS = [header for column in STEP_COLUMNS[:_SPLIT]
                for header in ((column.header, "elapsed_s") if column.name == "time" else (column.header,))]
BASE_COLUMNS += ["samples_per_s", "loss"]
FIGURE_COLUMNS = [column.header for column in STEP_COLUMNS[_SPLIT:]]
#: A branch check's result, on the row of the step it branched from (empty elsewhere).
BRANCH_COLUMNS = ["branch_b_crit", "branch_b_crit_low", "branch_b_crit_high", "branch_b_simple_ratio"]
RANK_COLUMNS = ["world_size", "slowest_rank_step_time_s"]
GPU_COLUMNS = list(CSV_COLUMNS)
#: The columns whose values are whole numbers (written without a decimal point).
INTEGER_COLUMNS = frozenset({column.header for column in STEP_COLUMNS if column.type is int} | {"world_size"})
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

    hello: dict[str, Any] | None = None  # the latest, as the model takes it
    scalar_names: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    checks: dict[int, BranchCheck] = field(default_factory=dict)  # by step; the latest check of a step wins
    rank_time: list[float] = field(default_factory=list)
    rank_world_size: list[int] = field(default_factory=list)
    slowest_rank_step_time_s: list[float | None] = field(default_factory=list)
    gpu_time: np.ndarray = field(default_factory=lambda: np.empty(0))
    gpu_fields: dict[str, list[float | None]] = field(default_factory=dict)


def _records_path(session: "store.SessionInfo | os.PathLike") -> Path:
    return session.records_path if isinstance(session, store.SessionInfo) else Path(session) / store.RECORDS_FILE


def scan(session: "store.SessionInfo | os.PathLike") -> SessionIndex:
    """The first pass: the session's records other than steps (read past undecoded), keeping only the small parts.

    Its summary stands in for it when it covers the whole file and says that no record a row looks
    up is in it: the header's names are then the summary's (the job's publisher keeps them).
    """
    path = _records_path(session)
    index = SessionIndex()
    summary = store.read_summary(path.parent)
    try:
        whole = summary is not None and summary["bytes"] == path.stat().st_size
    except OSError:
        whole = False
    if whole and summary.get("lookups") == 0 and "scalars" in summary:
        index.hello = store.read_hello(path)
        index.scalar_names = dict.fromkeys(summary["scalars"])
        _scan_gpu(path.parent / store.GPU_FILE, index)
        return index
    for record in (record for batch in store.iter_record_batches(path, steps=False) for record in batch):
        kind = record["k"]
        if kind == "scalars":
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
        elif kind == "hello":
            index.hello = record
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


def columns(index: SessionIndex) -> list[str]:
    scalars = [name for name in index.scalar_names if name != "loss"]
    return BASE_COLUMNS + scalars + FIGURE_COLUMNS + BRANCH_COLUMNS + RANK_COLUMNS + GPU_COLUMNS



def blocks(session: "store.SessionInfo | os.PathLike", index: SessionIndex | None = None, *,
           model: SessionModel | None = None) -> Iterator[list[np.ndarray]]:
    """The rows, ROW_BLOCK at a time, column by column in the order of :func:`columns`: each a
    float array (NaN: no value), ``time`` as Unix milliseconds (int64, the CSV's precision).

    The one place a row is made: the CSV and :func:`bsmon.load`'s DataFrame both come from here.
    ``session`` is a SessionInfo or a session directory; ``index`` its :func:`scan`, if made
    already; ``model``, if given, is the (new) SessionModel that takes in every record on the way
    (for the session's metadata afterwards).
    """
    index = index or scan(session)
    model = model or SessionModel(keep_history=False)
    pending: list[np.ndarray] = []  # tables of the model's rows (see SessionModel._rows)
    logged: dict[int, dict[str, float]] = {}  # step -> scalars, for steps not yet made into rows
    model.on_step_rows = pending.append
    maker = _Columns(index)
    at_step = STEP_COLUMN_AT["step"]
    for batch in store.iter_record_batches(_records_path(session), blocks=True):
        for record in batch:
            model.ingest(record)
            if not isinstance(record, StepBlock) and record["k"] == "scalars":
                logged.setdefault(record["step"], {}).update((k, float(v)) for k, v in record["values"].items())
        if not pending:
            continue
        table = np.concatenate(pending) if len(pending) > 1 else pending[0]
        # a step's row waits for the scalars logged for it until a step SCALARS_WAIT_STEPS later came
        ready = int(np.searchsorted(table[:, at_step], table[-1, at_step] - SCALARS_WAIT_STEPS, side="right"))
        pending[:] = [table[ready:]] if ready < len(table) else []
        for start in range(0, ready, ROW_BLOCK):
            yield maker.block(table[start:min(ready, start + ROW_BLOCK)], logged)
    table = np.concatenate(pending) if pending else np.empty((0, len(STEP_COLUMNS)))
    for start in range(0, len(table), ROW_BLOCK):
        yield maker.block(table[start:start + ROW_BLOCK], logged)


class _Columns:
    """Turns tables of the model's step rows into the export's columns (see docs/csv.md)."""

    def __init__(self, index: SessionIndex) -> None:
        self.index = index
        self.scalar_names = ["loss", *(name for name in index.scalar_names if name != "loss")]
        hello = index.hello or {}
        self.t0 = hello.get("t0")
        self.world_size = int(hello.get("world_size") or 1)
        self.rank_time = np.array(index.rank_time, dtype=float)
        self.rank_world_size = np.array(index.rank_world_size, dtype=float)
        self.slowest_rank_step_time_s = _floats(index.slowest_rank_step_time_s)
        self.gpu = {name: _floats(index.gpu_fields[name]) if name in index.gpu_fields else None for name in GPU_COLUMNS}

    def block(self, table: np.ndarray, logged: dict[int, dict[str, float]]) -> list[np.ndarray]:
        """The columns of these rows; takes (and drops) the scalars ``logged`` up to their last step."""
        index = self.index
        times = table[:, STEP_COLUMN_AT["time"]]
        steps = table[:, STEP_COLUMN_AT["step"]]
        t0 = self.t0 if self.t0 is not None else times[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            step_time = table[:, STEP_COLUMN_AT["step_time_s"]]
            samples_per_s = np.where(step_time > 0, table[:, STEP_COLUMN_AT["batch_size"]] / step_time, np.nan)
        out = [table[:, i] for i in range(STEP_COLUMN_AT["time"])]
        out += [unix_ms(times), times - t0]
        out += [table[:, i] for i in range(STEP_COLUMN_AT["time"] + 1, _SPLIT)]
        out.append(samples_per_s)
        out += self._scalars(steps, logged)
        out += [table[:, i] for i in range(_SPLIT, len(STEP_COLUMNS))]
        if index.checks:
            checks = [index.checks.get(step) for step in steps.astype(np.int64).tolist()]
            out += [np.array([np.nan if c is None or getattr(c, name) is None else getattr(c, name) for c in checks],
                             dtype=float) for name in ("b_crit", "b_crit_low", "b_crit_high", "ratio")]
        else:
            out += [np.full(len(table), np.nan) for _ in BRANCH_COLUMNS]
        ranks_at = nearest_sample(self.rank_time, times, RANKS_MAX_GAP_S)
        has_rank = ranks_at >= 0
        out.append(np.where(has_rank, self.rank_world_size[ranks_at] if len(self.rank_time) else 0, self.world_size))
        out.append(np.where(has_rank, self.slowest_rank_step_time_s[ranks_at] if len(self.rank_time) else 0, np.nan))
        gpu_at = nearest_sample(index.gpu_time, times, GPU_MAX_GAP_S)
        has_gpu = gpu_at >= 0
        for name in GPU_COLUMNS:
            column = self.gpu[name]
            out.append(np.where(has_gpu, column[gpu_at], np.nan) if column is not None else np.full(len(table), np.nan))
        return out

    def _scalars(self, steps: np.ndarray, logged: dict[int, dict[str, float]]) -> list[np.ndarray]:
        """The logged scalars' columns for these steps (NaN where not logged). Scalars logged for a
        step up to the last of these that has no row are dropped."""
        columns = {name: np.full(len(steps), np.nan) for name in self.scalar_names}
        due = [step for step in logged if step <= steps[-1]]
        for step, at in zip(due, np.searchsorted(steps, due).tolist()):
            values = logged.pop(step)
            if steps[at] == step:
                for name, value in values.items():
                    if name in columns:  # else first logged after the first pass read the file (a running job)
                        columns[name][at] = value
        return list(columns.values())


def _floats(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def unix_ms(times: np.ndarray) -> np.ndarray:
    """Unix times (s) as whole milliseconds, truncated as datetime's isoformat(timespec="milliseconds")
    truncates the microseconds it rounds the time to."""
    seconds = np.floor(times)
    micros = np.round((times - seconds) * 1e6)
    return seconds.astype(np.int64) * 1000 + (micros // 1000).astype(np.int64)


def _iso(ms: np.ndarray) -> list[str]:
    """Unix ms as ISO 8601 in UTC, to the millisecond: numpy formats each distinct second once
    (a step a millisecond shares its second with a thousand), the milliseconds come from a table."""
    seconds, millis = np.divmod(ms, 1000)
    distinct, at = np.unique(seconds, return_inverse=True)
    whole = np.datetime_as_string((distinct * 1000).astype("datetime64[ms]"), unit="ms")
    prefixes = np.array([text[:-3] for text in whole.tolist()], dtype=object)  # up to the seconds' "."
    return list(map(str.__add__, prefixes[at].tolist(), _MILLIS[millis].tolist()))


#: "000+00:00" to "999+00:00": a time's milliseconds and its zone, for :func:`_iso`.
_MILLIS = np.array([f"{ms:03d}+00:00" for ms in range(1000)], dtype=object)


#: How a column's values become CSV cells (see :func:`_cells`).
_FLOAT, _INTEGER, _TIME = "float", "integer", "time"
#: Columns whose values change at most at this share of the rows (most figures change only when
#: the estimate does) are formatted once per run of equal rows.
_RUNS_SHARE = 0.25


def _text(block: list[np.ndarray], kinds: list[str]) -> str:
    """A block of rows as CSV lines (numbers and an ISO time: nothing to quote).

    Adjacent columns that change together at few rows form a group whose cells are formatted and
    joined once per run of equal rows; the other columns are formatted cell by cell. Each row is
    then one join of its groups' texts.
    """
    n = len(block[0])
    parts: list[list[str]] = []  # a text per row for each column or group of columns, left to right
    group: list[int] = []
    starts = np.zeros(n, dtype=bool)  # the rows where the group's run of equal values starts
    for j, (column, kind) in enumerate(zip(block, kinds)):
        changed = _changes(column)
        merged = starts | changed
        if group and np.count_nonzero(merged) <= n * _RUNS_SHARE:
            group.append(j)
            starts = merged
            continue
        if group:
            parts.append(_runs(block, kinds, group, starts))
            group = []
        if np.count_nonzero(changed) <= n * _RUNS_SHARE:
            group, starts = [j], changed
        else:
            parts.append(_cells(column, kind))
    if group:
        parts.append(_runs(block, kinds, group, starts))
    return "\n".join(map(",".join, zip(*parts))) + "\n"


def _changes(column: np.ndarray) -> np.ndarray:
    """True at the first row and where a value differs from the one above, bit for bit (NaN
    equals NaN; 0.0 and -0.0 differ, as their cells do)."""
    bits = column.view(np.int64)
    changed = np.empty(len(bits), dtype=bool)
    changed[0] = True
    np.not_equal(bits[1:], bits[:-1], out=changed[1:])
    return changed


def _runs(block: list[np.ndarray], kinds: list[str], group: list[int], starts: np.ndarray) -> list[str]:
    """The cells of the ``group``'s columns, joined, for every row: formatted once per run of equal rows."""
    rows = np.flatnonzero(starts)
    cells = [_cells(block[j][rows], kinds[j]) for j in group]
    texts = cells[0] if len(cells) == 1 else list(map(",".join, zip(*cells)))
    if len(rows) == len(starts):
        return texts
    return np.repeat(np.array(texts, dtype=object), np.diff(rows, append=len(starts))).tolist()


def _cells(column: np.ndarray, kind: str) -> list[str]:
    """A column as CSV cells: '' for no value (NaN), else the shortest exact form, as repr writes
    it ('inf' for an open bound); whole numbers in an integer column without a decimal point;
    times (Unix ms) in ISO 8601.

    orjson writes numbers at C speed (repr's ~1 µs a float was most of an export's formatting):
    for a float it writes the shortest digits that read back as the same float, as repr does,
    and in the same form between 1e-4 and 1e16 (tests/test_export.py holds it to repr). Outside
    that range, and for NaN and infinities, the cell is repr's.
    """
    if kind == _TIME:
        return _iso(column)
    missing = np.isnan(column)
    if kind == _INTEGER:
        whole = np.where(missing, 0, column)
        if np.abs(whole).max() < 2.0 ** 63:
            text = _numbers(whole.astype(np.int64))
        else:  # beyond int64 (a count of 2**63 or more): Python's ints
            text = [str(int(v)) for v in whole.tolist()]
        odd = missing
    else:
        text = _numbers(column)
        magnitude = np.abs(column)
        odd = ~(((magnitude >= 1e-4) & (magnitude < 1e16)) | (column == 0))  # NaN and inf too
    for i in np.flatnonzero(odd).tolist():
        text[i] = "" if missing[i] else repr(column[i].item())
    return text


def _numbers(column: np.ndarray) -> list[str]:
    """Each number of a float64 or int64 column as orjson writes it."""
    return orjson.dumps(np.ascontiguousarray(column), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].decode().split(",")


def write_csv(session: "store.SessionInfo | os.PathLike", out: TextIO) -> int:
    """Write the session as CSV to ``out``; returns the number of step rows."""
    index = scan(session)
    names = columns(index)
    csv.writer(out, lineterminator="\n").writerow(names)  # logged names may need quoting
    kinds = [_TIME if name == "time" else _INTEGER if name in INTEGER_COLUMNS else _FLOAT for name in names]
    count = 0
    for block in blocks(session, index):
        out.write(_text(block, kinds))
        count += len(block[0])
    return count


def export_to_file(session: "store.SessionInfo | os.PathLike", path: Path, *, format: str = "csv") -> int:
    """Write the session as CSV (or Parquet: ``format="parquet"``); returns the step rows.

    A new or regular file (through a symlink, the file it names) is written atomically: a
    temporary file beside it, then a rename, so a failure (full disk) leaves no half-written
    file behind. Anything else that exists (``/dev/null``, ``/dev/stdout``, a FIFO) is written
    into, never replaced.
    """
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        return _export(session, path, format)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        count = _export(session, tmp, format)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _export(session: "store.SessionInfo | os.PathLike", path: Path, format: str) -> int:
    if format == "parquet":
        frame = dataframe(session)
        frame.to_parquet(path, index=False)
        return len(frame)
    with open(path, "w", newline="") as handle:
        return write_csv(session, handle)


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("bsmon.load() and Parquet export need pandas: pip install 'bsmon[pandas]'") from None
    return pandas


def dataframe(session: "store.SessionInfo | os.PathLike") -> "pandas.DataFrame":
    """The session as a DataFrame: the CSV's columns and rows, its metadata in ``attrs``."""
    pd = _pandas()
    index = scan(session)
    names = columns(index)
    model = SessionModel(keep_history=False)
    parts = [list(block) for block in blocks(session, index, model=model)]
    data = {}
    for i, name in enumerate(names):
        column = np.concatenate([part[i] for part in parts]) if parts else np.empty(0)
        if name == "time":
            data[name] = pd.to_datetime(column.astype(np.int64), unit="ms", utc=True)
        elif name in INTEGER_COLUMNS and not np.isnan(column).any():
            data[name] = column.astype(np.int64)
        else:
            data[name] = column
    frame = pd.DataFrame(data, columns=names)
    bye = model.bye or {}
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
