"""The session's history for the charts, in bounded memory.

A run of 10M steps must chart as cheaply as one of 100: every series is kept in at most
``HISTORY_BINS`` bins whose width doubles as the run grows (:class:`Binned`). A short session
(up to ``HISTORY_BINS`` steps) is kept exactly, one bin a step. The exact per-step values of a
long session are on disk: export streams them from there (bsmon/export.py).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from bsmon import records

#: Bins per series. Charts draw at most a few hundred points; 2048 keeps every step of a
#: short session, and costs ~20 columns x 2048 x 8 bytes.
HISTORY_BINS = 2048
#: Rows wait in a list and are folded into the bins this many at a time (vectorised).
FOLD_EVERY = 1024
#: How a column aggregates over a bin: "last" value, "sum" (divide by ``count`` for a mean),
#: "min", "max" (NaN-ignoring).
KINDS = ("last", "sum", "min", "max")


class Binned:
    """An append-only table kept in at most ``max_bins`` bins of ``width`` rows each.

    ``columns`` maps each column name to its kind (:data:`KINDS`); every bin also has a
    ``count`` of its rows. All bins but the last hold exactly ``width`` rows; when the
    bins are full, neighbours merge pairwise and the width doubles. Memory is
    O(max_bins) and appending costs O(1) amortised, vectorised in blocks of FOLD_EVERY.
    """

    def __init__(self, columns: Mapping[str, str], max_bins: int = HISTORY_BINS) -> None:
        if max_bins < 2 or max_bins % 2:
            raise ValueError(f"max_bins must be an even number >= 2, got {max_bins}")
        unknown = {kind for kind in columns.values()} - set(KINDS)
        if unknown:
            raise ValueError(f"unknown column kinds {sorted(unknown)}: use {', '.join(KINDS)}")
        self.columns = tuple(columns)
        self._kinds = tuple(columns.values())
        self._max_bins = max_bins
        self._bins = np.zeros((max_bins, len(self.columns) + 1))  # the last column: count
        self._n = 0
        self._width = 1
        self._rows = 0
        self._pending: list[Sequence[float]] = []  # rows
        self._pending_tables: list[np.ndarray] = []  # tables of rows, before the rows
        self._pending_rows = 0

    # -- writing ----------------------------------------------------------------------------------
    def append(self, row: Sequence[float]) -> None:
        """One row, its values in the order of ``columns`` (None or NaN: no value)."""
        self._pending.append(row)
        self._pending_rows += 1
        if self._pending_rows >= FOLD_EVERY:
            self._fold_pending()

    def extend(self, rows: Iterable[Sequence[float]]) -> None:
        for row in rows:
            self.append(row)

    def append_table(self, table: np.ndarray) -> None:
        """Rows at once: a table with a column per ``columns``."""
        if self._pending:  # the rows before it first
            self._pending_tables.append(np.array(self._pending, dtype=float).reshape(-1, len(self.columns)))
            self._pending.clear()
        self._pending_tables.append(table)
        self._pending_rows += len(table)
        if self._pending_rows >= FOLD_EVERY:
            self._fold_pending()

    def _fold_pending(self) -> None:
        if not self._pending_rows:
            return
        if self._pending:
            self._pending_tables.append(np.array(self._pending, dtype=float).reshape(-1, len(self.columns)))
            self._pending.clear()
        table = np.concatenate(self._pending_tables) if len(self._pending_tables) > 1 else self._pending_tables[0]
        self._pending_tables.clear()
        self._pending_rows = 0
        self._rows += len(table)
        table = np.column_stack([table, np.ones(len(table))])
        while len(table):
            if self._n and self._bins[self._n - 1, -1] < self._width:  # the open bin first
                take = int(self._width - self._bins[self._n - 1, -1])
                block = self._reduce(table[:take], np.array([0]))
                self._bins[self._n - 1] = self._merge(self._bins[self._n - 1:self._n], block)[0]
                table = table[take:]
                continue
            if self._n == self._max_bins:
                self._halve()
                continue
            take = min(len(table), (self._max_bins - self._n) * self._width)
            blocks = self._reduce(table[:take], np.arange(0, take, self._width))
            self._bins[self._n:self._n + len(blocks)] = blocks
            self._n += len(blocks)
            table = table[take:]

    def _reduce(self, rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Rows aggregated into one bin per run starting at ``starts`` (count included)."""
        ends = np.append(starts[1:], len(rows)) - 1
        out = np.empty((len(starts), rows.shape[1]))
        for i, kind in enumerate((*self._kinds, "sum")):
            column = rows[:, i]
            if kind == "last":
                out[:, i] = column[ends]
            elif kind == "sum":
                out[:, i] = np.add.reduceat(column, starts)
            else:
                out[:, i] = (np.fmin if kind == "min" else np.fmax).reduceat(column, starts)
        return out

    def _merge(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Bins ``a`` followed by bins ``b``, merged row by row."""
        out = np.empty_like(a)
        for i, kind in enumerate((*self._kinds, "sum")):
            out[:, i] = (b[:, i] if kind == "last" else a[:, i] + b[:, i] if kind == "sum"
                         else (np.fmin if kind == "min" else np.fmax)(a[:, i], b[:, i]))
        return out

    def _halve(self) -> None:
        half = self._n // 2
        self._bins[:half] = self._merge(self._bins[0:self._n:2], self._bins[1:self._n:2])
        self._n = half
        self._width *= 2

    # -- reading ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Rows appended (not bins)."""
        return self._rows + self._pending_rows

    @property
    def bins(self) -> int:
        self._fold_pending()
        return self._n

    def column(self, name: str) -> np.ndarray:
        """One column, a value per bin (a copy)."""
        self._fold_pending()
        return self._bins[:self._n, self._index(name)].copy()

    def _index(self, name: str) -> int:
        return len(self.columns) if name == "count" else self.columns.index(name)

    def arrays(self, max_bins: int | None = None) -> dict[str, np.ndarray]:
        """Every column and ``count``, a value per bin; with ``max_bins``, runs of a power of two
        neighbouring bins merged (as their kinds say) into at most that many."""
        self._fold_pending()
        table = self._bins[:self._n]
        if max_bins is not None and self._n > max_bins:
            # a power of two, so a bin's edges stay put as the run grows (no jitter between redraws)
            group = 1 << (-(-self._n // max_bins) - 1).bit_length()
            table = self._reduce(table, np.arange(0, self._n, group))
        return {name: table[:, i].copy() for i, name in enumerate((*self.columns, "count"))}


#: The per-step columns of the history and how they bin (bsmon.records.STEP_COLUMNS). batch_size
#: and step_time_s add up within a bin: their ratio is the bin's throughput, batch_size / count
#: its mean batch.
STEP_COLUMNS = {column.name: column.bins for column in records.STEP_COLUMNS if column.bins}
_BINNED = [i for i, column in enumerate(records.STEP_COLUMNS) if column.bins]
#: A model row (all of records.STEP_COLUMNS) -> the history's row.


#: The ``ranks`` records over time (multi-process jobs): the straggler, NaN where none.
RANK_COLUMNS = {"rank_time": "last", "rank_world_size": "last", "slowest_rank": "last",
                "slowest_rank_step_time_s": "last", "slowest_rank_lag_steps": "last", "rank_skew": "last"}
#: NVML samples: time, and the sums of utilisation and memory for the chart's means.
GPU_COLUMNS = {"gpu_time": "sum", "gpu_util_pct": "sum", "gpu_mem_used_mib": "sum", "gpu_mem_total_mib": "sum"}
#: Recent losses kept exactly (the headless line shows the loss of the shown step or before).
RECENT_LOSSES = 64


class History:
    """The binned series of a session: steps, losses, GPU samples and ``ranks`` records.

    ``history.b_simple`` (any name of STEP_COLUMNS, RANK_COLUMNS or GPU_COLUMNS) is that
    column, a value per bin; ``len(history)`` counts steps.
    """

    def __init__(self, max_bins: int = HISTORY_BINS) -> None:
        self.steps = Binned(STEP_COLUMNS, max_bins)
        self.losses = Binned({"step": "last", "loss": "sum"}, max_bins)  # of steps whose logging is complete
        self.ranks = Binned(RANK_COLUMNS, max_bins)
        self.gpu = Binned(GPU_COLUMNS, max_bins)
        self.recent_gpu_util: collections.deque[float] = collections.deque(maxlen=RECENT_LOSSES)
        self.last_gpu_time: float | None = None
        self.scalar_names: dict[str, None] = {}  # insertion-ordered set
        self._newest: tuple[int, dict[str, float]] | None = None  # the newest step's scalars, may still grow
        self._recent_losses: collections.deque[tuple[int, float]] = collections.deque(maxlen=RECENT_LOSSES)

    def __len__(self) -> int:
        return len(self.steps)

    def __getattr__(self, name: str) -> np.ndarray:
        for table in ("steps", "ranks", "gpu"):
            binned = self.__dict__.get(table)
            if binned is not None and name in binned.columns:
                return binned.column(name)
        raise AttributeError(f"History has no column {name!r}")

    def add_steps(self, table: np.ndarray) -> None:
        """Steps' rows from the model, a table (a column per records.STEP_COLUMNS)."""
        self.steps.append_table(table[:, _BINNED])

    def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """A ``scalars`` record. A step's values may come in several records; a step counts as
        complete (and its loss goes into the bins) once a later step logs."""
        for name in values:
            self.scalar_names.setdefault(name)
        if "loss" in values:
            if self._recent_losses and self._recent_losses[-1][0] == step:
                self._recent_losses[-1] = (step, values["loss"])
            else:
                self._recent_losses.append((step, values["loss"]))
        if self._newest is not None and step == self._newest[0]:
            self._newest[1].update(values)
            return
        if self._newest is not None and step < self._newest[0]:  # a late log() of an earlier step
            if "loss" in values:
                self.losses.append((step, values["loss"]))
            return
        self._complete_newest()
        self._newest = (step, dict(values))

    def _complete_newest(self) -> None:
        if self._newest is not None and "loss" in self._newest[1]:
            self.losses.append((self._newest[0], self._newest[1]["loss"]))
        self._newest = None

    def loss_arrays(self, max_bins: int, final: bool) -> dict[str, np.ndarray]:
        """The binned losses (``step``, ``loss`` summed, ``count``); the newest step's only when
        ``final`` (while the job runs, more of its scalars may come)."""
        if final:
            self._complete_newest()
        return self.losses.arrays(max_bins)

    def loss_at(self, step: int) -> float | None:
        """The loss logged for ``step`` or the newest recent step before it: never a later step's."""
        return next((loss for logged, loss in reversed(self._recent_losses) if logged <= step), None)

    def scalar_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(step, mean value) per bin; only the loss is binned."""
        if name != "loss":
            raise KeyError(f"only the loss is kept over time, not {name!r}")
        arrays = self.loss_arrays(HISTORY_BINS, final=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return arrays["step"], arrays["loss"] / arrays["count"]
