"""A small braille plotter that draws a chart straight into Textual strips.

The charts used to go through plotext: its build wrote an ANSI string, which Rich parsed back into
text and Textual cut into lines again, 20 to 50 ms a chart at 200x60. Here the data is placed on a
grid of cells with numpy (two by four braille dots a cell) and each row becomes one strip of a few
segments, a couple of milliseconds a chart. The layout is plotext's: y tick labels, a frame with
tick marks, x tick labels, the y label at the left of the x label's row, and a legend at the top left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

#: Braille dot bits by (row, column) of the dot within its cell (Unicode's 2x4 pattern).
DOT_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.uint8)
BRAILLE = np.array([chr(0x2800 + code) for code in range(256)])
#: The legend's mark for dots (a braille pattern, as plotext draws it).
LEGEND_DOTS = "⢕"
#: Cap on the dots one line segment is drawn with (a segment far outside the limits is clipped).
MAX_SEGMENT_DOTS = 4096


def color(name: str | tuple[int, int, int]) -> Color:
    """A named ANSI colour ('cyan', 'gray': the theme's ANSI palette applies) or an RGB triple."""
    if isinstance(name, tuple):
        return Color.from_rgb(*name)
    return Color.from_ansi(8) if name == "gray" else Color.parse(name)


@dataclass(frozen=True)
class Axis:
    """Limits and ticks of one axis, in data units (the log is taken here when ``log``)."""

    low: float
    high: float
    ticks: Sequence[float] = ()
    labels: Sequence[str] = ()
    log: bool = False

    def position(self, values: np.ndarray, size: int) -> np.ndarray:
        """Positions in [0, size - 1] (floats; outside for values beyond the limits, NaN for none)."""
        values = np.asarray(values, dtype=float)
        low, high = self.low, self.high
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(values > 0, np.log10(values), np.nan)
            low, high = math.log10(low), math.log10(high)
        span = high - low
        if not span > 0:
            return np.full(values.shape, (size - 1) / 2)
        return (values - low) / span * (size - 1)


@dataclass
class _Series:
    xs: np.ndarray
    ys: np.ndarray
    style: Style
    kind: str  # "line" or "dots": braille; anything else: that character in whole cells
    label: str | None


@dataclass
class Figure:
    """One chart: series, vertical lines, axes and labels, drawn by :meth:`strips`.

    Later series draw over earlier ones; vertical lines lie under all series.
    """

    width: int
    height: int
    x: Axis = field(default_factory=lambda: Axis(0.0, 1.0))
    y: Axis = field(default_factory=lambda: Axis(0.0, 1.0))
    xlabel: str = ""
    ylabel: str = ""
    series: list[_Series] = field(default_factory=list)
    vlines: list[tuple[float, Style]] = field(default_factory=list)

    def line(self, xs, ys, color_name, label: str | None = None) -> None:
        """Points joined by braille lines."""
        self._add(xs, ys, color_name, "line", label)

    def dots(self, xs, ys, color_name, label: str | None = None) -> None:
        """Points as single braille dots."""
        self._add(xs, ys, color_name, "dots", label)

    def marks(self, xs, ys, char: str, color_name, label: str | None = None) -> None:
        """Points as one character each, in whole cells (▲, •)."""
        self._add(xs, ys, color_name, char, label)

    def vline(self, x: float, color_name) -> None:
        self.vlines.append((x, Style(color=color(color_name))))

    def _add(self, xs, ys, color_name, kind: str, label: str | None) -> None:
        self.series.append(_Series(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float),
                                   Style(color=color(color_name)), kind, label))

    # -- drawing ----------------------------------------------------------------------------------
    def draw(self, base: Style, previous: Drawing | None = None) -> Drawing:
        """``height`` strips of ``width`` cells: the frame, the data, ticks, labels and legend, over
        ``base`` (the widget's colours). Rows the same as in ``previous`` keep its strips."""
        width, height = self.width, self.height
        margin = max((len(label) for label in self.y.labels), default=0)
        plot_w, plot_h = width - margin - 2, height - 4  # inside the frame; 2 rows of x labels below it
        if plot_w < 2 or plot_h < 1:
            return Drawing(np.full((height, width), " ", dtype="<U1"), np.zeros((height, width), dtype=np.int16),
                           [base], [Strip.blank(width, base)] * height)
        chars = np.full((height, width), " ", dtype="<U1")
        # index into palette. 0: blank cells; 1: frame, ticks and labels, the same colours but a style
        # of their own, so that an SVG screenshot does not join them and the blanks into one text
        # element (which SVG renderers space unevenly)
        styles = np.ones((height, width), dtype=np.int16)
        palette: list[Style] = [base, base + Style(bold=False)]
        left, right, top, bottom = margin, margin + plot_w + 1, 0, plot_h + 1

        def style_index(style: Style) -> int:
            palette.append(base + style)
            return len(palette) - 1

        chars[top, left + 1:right] = chars[bottom, left + 1:right] = "─"
        chars[top + 1:bottom, left] = chars[top + 1:bottom, right] = "│"
        chars[top, left], chars[top, right], chars[bottom, left], chars[bottom, right] = "┌", "┐", "└", "┘"
        cell_x = self.x.position(np.asarray(self.x.ticks, dtype=float), plot_w)
        cell_y = self.y.position(np.asarray(self.y.ticks, dtype=float), plot_h)
        for row, label in zip(cell_y, self.y.labels):
            if np.isfinite(row) and -0.5 <= row <= plot_h - 0.5:
                r = bottom - 1 - int(round(row))
                chars[r, left] = "┤"
                chars[r, left - len(label):left] = list(label)
        label_end = -1  # the x tick labels: centred under their tick, none overlapping the last
        for column, label in zip(cell_x, self.x.labels):
            if np.isfinite(column) and -0.5 <= column <= plot_w - 0.5:
                c = left + 1 + int(round(column))
                chars[bottom, c] = "┬"
                start = min(max(0, c - (len(label) - 1) // 2), width - len(label))
                if start > label_end:
                    chars[bottom + 1, start:start + len(label)] = list(label)
                    label_end = start + len(label)
        for x, style in self.vlines:
            column = float(self.x.position(np.array([x]), plot_w)[0])
            if np.isfinite(column) and -0.5 <= column <= plot_w - 0.5:
                c = left + 1 + int(round(column))
                chars[top + 1:bottom, c] = "│"
                styles[top + 1:bottom, c] = style_index(style)
                chars[top, c], chars[bottom, c] = "┬", "┴" if chars[bottom, c] == "─" else "┼"
        area_chars = chars[top + 1:bottom, left + 1:right]  # views: drawing here draws on the grid
        area_styles = styles[top + 1:bottom, left + 1:right]
        for series in self.series:
            index = style_index(series.style)
            if series.kind in ("line", "dots"):
                codes = self._braille(series, plot_w, plot_h)
                drawn = codes > 0
                area_chars[drawn] = BRAILLE[codes[drawn]]
            else:
                column = np.round(self.x.position(series.xs, plot_w))
                row = np.round(self.y.position(series.ys, plot_h))
                keep = (column >= 0) & (column < plot_w) & (row >= 0) & (row < plot_h)
                drawn = np.zeros((plot_h, plot_w), dtype=bool)
                drawn[plot_h - 1 - row[keep].astype(int), column[keep].astype(int)] = True
                area_chars[drawn] = series.kind
            area_styles[drawn] = index
        self._legend(area_chars, area_styles, style_index)
        chars[bottom + 2, :min(len(self.ylabel), width)] = list(self.ylabel[:width])
        if self.xlabel:
            start = max(len(self.ylabel) + 1, left + 1 + (plot_w - len(self.xlabel)) // 2)
            text = self.xlabel[:max(0, width - start)]
            chars[bottom + 2, start:start + len(text)] = list(text)
        styles[chars == " "] = 0
        same = previous.same_rows(chars, styles, palette) if previous is not None else np.zeros(height, dtype=bool)
        return Drawing(chars, styles, palette, [
            previous.strips[y] if same[y] else _strip(chars[y], styles[y], palette, width) for y in range(height)])

    def _braille(self, series: _Series, plot_w: int, plot_h: int) -> np.ndarray:
        """The series' braille codes per cell of the plot area (0: no dot)."""
        dot_x = self.x.position(series.xs, 2 * plot_w)
        dot_y = (4 * plot_h - 1) - self.y.position(series.ys, 4 * plot_h)  # row 0 at the top
        finite = np.isfinite(dot_x) & np.isfinite(dot_y)
        dot_x, dot_y = dot_x[finite], dot_y[finite]
        if series.kind == "line" and dot_x.size > 1:
            dot_x, dot_y = _join(dot_x, dot_y)
        column, row = np.round(dot_x), np.round(dot_y)
        keep = (column >= 0) & (column < 2 * plot_w) & (row >= 0) & (row < 4 * plot_h)
        column, row = column[keep].astype(np.intp), row[keep].astype(np.intp)
        codes = np.zeros((plot_h, plot_w), dtype=np.uint8)
        np.bitwise_or.at(codes, (row // 4, column // 2), DOT_BITS[row % 4, column % 2])
        return codes

    def _legend(self, area_chars: np.ndarray, area_styles: np.ndarray, style_index) -> None:
        """' ⢕⢕ label' a row each, over the data at the top left (plotext's legend)."""
        entries = [s for s in self.series if s.label]
        if not entries:
            return
        size = max(len(s.label) for s in entries)
        for row, series in enumerate(entries[:area_chars.shape[0]]):
            mark = LEGEND_DOTS if series.kind in ("line", "dots") else series.kind
            text = f" {mark * 2} {series.label.ljust(size)} "[:area_chars.shape[1]]
            area_chars[row, :len(text)] = list(text)
            area_styles[row, :len(text)] = 1
            area_styles[row, 1:3] = style_index(series.style)


@dataclass
class Drawing:
    """A drawn chart: the character and palette index of every cell, and a strip a row."""

    chars: np.ndarray
    styles: np.ndarray
    palette: list[Style]
    strips: list[Strip]

    def same_rows(self, chars: np.ndarray, styles: np.ndarray, palette: list[Style]) -> np.ndarray:
        """Per row: True where this drawing's row shows the same cells."""
        if chars.shape != self.chars.shape or palette != self.palette:
            return np.zeros(chars.shape[0], dtype=bool)
        return (chars == self.chars).all(axis=1) & (styles == self.styles).all(axis=1)


def _join(dot_x: np.ndarray, dot_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dots of straight segments between consecutive points (about one per dot of length)."""
    dx, dy = np.diff(dot_x), np.diff(dot_y)
    steps = np.minimum(np.ceil(np.maximum(np.abs(dx), np.abs(dy))), MAX_SEGMENT_DOTS).astype(np.intp) + 1
    segment = np.repeat(np.arange(dx.size), steps)
    start = np.cumsum(steps) - steps
    t = (np.arange(segment.size) - np.repeat(start, steps)) / np.repeat(np.maximum(steps - 1, 1), steps)
    return dot_x[segment] + t * dx[segment], dot_y[segment] + t * dy[segment]


def _strip(chars: np.ndarray, styles: np.ndarray, palette: list[Style], width: int) -> Strip:
    """One row: a segment per run of one style."""
    text = "".join(chars.tolist())
    bounds = [0, *(np.flatnonzero(styles[1:] != styles[:-1]) + 1).tolist(), len(text)]
    return Strip([Segment(text[start:end], palette[styles[start]]) for start, end in zip(bounds, bounds[1:])], width)
