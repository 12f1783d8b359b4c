"""The panels and charts of the bsmon screen.

Each panel has a ``show(...)`` method that takes plain values (model types,
numbers) and repaints only when its text changed, so a redraw of an unchanged
screen costs a few string comparisons. Formatting that says what a number
means (the batch regime, the status) lives next to the panel that shows it.
"""

from __future__ import annotations

import itertools
import math
import shlex
import signal
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np
from rich.text import Text
from textual.app import ComposeResult, RenderResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.geometry import Region
from textual.markup import escape
from textual.strip import Strip
from textual.visual import Visual
from textual.widget import Widget
from textual.widgets import Sparkline, Static

from bsmon import fmt
from bsmon.tui import plot
from bsmon.gpu import GpuReading, GpuSnapshot
from bsmon.model import Stats
from bsmon.stats.noise import NoiseScale, statistical_efficiency
from bsmon.stats.optimal import Recommendation
from bsmon.stats.throughput import ThroughputPoint

#: A batch below/above this multiple of B_simple is "well below"/"well above" the noise scale.
REGIME_LOW, REGIME_HIGH = 0.5, 2.0


def unit_label(unit: str) -> str:
    return "tokens" if unit == "tokens" else "samples"


class LinesView(Widget):
    """Named lines of markup, each wrapped to the width and kept as strips.

    A change repaints only the rows of the lines that changed (the whole view when a line's
    height changed, and the screen's layout when the view's did): at 1 kHz most of a panel's
    lines stay the same from one second to the next, and re-rendering whole panels, with the
    screen around them, was most of what the numbers cost. A line whose text became at most
    JITTER_CHARS shorter and now wraps to fewer rows, among the same lines, keeps its rows (blank
    at its end): numbers a digit shorter must not lay the whole screen out again (a long warning
    at 1 kHz did, every few seconds). A line reworded shorter (a narrow terminal's short form) shrinks.
    """

    JITTER_CHARS = 4

    DEFAULT_CSS = "LinesView { height: auto; }"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._markup: dict[str, str] = {}
        self._rows: dict[str, list[Strip]] = {}  # wrapped at self._width
        self._width = 0
        self._strips: list[Strip] = []  # every line's rows, in order

    @property
    def text(self) -> str:
        """The plain text of the lines, unwrapped (what a Static of them would hold)."""
        return "\n".join(Content.from_markup(markup).plain for markup in self._markup.values())

    def set_lines(self, markup: dict[str, str]) -> None:
        old, old_rows = self._markup, self._rows
        self._markup = dict(markup)
        self._rows = {name: rows for name, rows in old_rows.items() if old.get(name) == markup.get(name)}
        if not self._width:
            self.refresh(layout=True)
            return
        dirty: list[Region] = []
        y = 0
        same_names = list(old) == list(markup)
        for name in markup:
            rows = self._wrapped(name)
            if name not in old_rows or old.get(name) != markup[name]:
                if (same_names and name in old_rows and len(rows) < len(old_rows[name])
                        and len(markup[name]) >= len(old[name]) - self.JITTER_CHARS):
                    rows += [Strip.blank(self._width, self.rich_style)] * (len(old_rows[name]) - len(rows))
                dirty.append(Region(0, y, self._width, len(rows)))
            y += len(rows)
        same_rows = same_names and all(len(old_rows[name]) == len(self._rows[name])
                                       for name in markup if name in old_rows)
        self._strips = [strip for name in markup for strip in self._rows[name]]
        if not same_rows:
            self.refresh(layout=len(self._strips) != sum(len(rows) for rows in old_rows.values()))
        elif dirty:
            self.refresh(*dirty)

    def _wrapped(self, name: str) -> list[Strip]:
        rows = self._rows.get(name)
        if rows is None:
            rows = self._rows[name] = Visual.to_strips(self, Content.from_markup(self._markup[name]), self._width,
                                                       None, self.visual_style, pad=True)
        return rows

    def _rewrap(self, width: int) -> None:
        if width != self._width:
            self._width, self._rows = width, {}
        self._strips = [strip for name in self._markup for strip in self._wrapped(name)]

    def get_content_height(self, container: Any, viewport: Any, width: int) -> int:
        self._rewrap(width)
        return len(self._strips)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if width != self._width:
            self._rewrap(width)
        return self._strips[y] if y < len(self._strips) else Strip.blank(width, self.rich_style)

    def notify_style_update(self) -> None:
        """Colours and text styles changed (the theme, a layout class): render the lines again."""
        super().notify_style_update()
        self._rows = {}
        if self._width:
            self._rewrap(self._width)


class Lines(Vertical):
    """A titled panel whose text is one :class:`LinesView` of named lines.

    ``show_lines`` takes every line by name; an empty one is left out, so optional lines (drops,
    warnings) take no room until they have something to say.
    """

    TITLE = ""
    #: line name -> markup style for the whole line (colours come from the theme)
    LINE_STYLES: Mapping[str, str] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = self.TITLE
        self._lines: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield LinesView(classes="lines")

    def show_lines(self, **lines: str | None) -> None:
        lines = {name: text for name, text in lines.items() if text}
        if lines == self._lines:
            return
        self._lines = lines
        self.query_one(LinesView).set_lines({
            name: f"[{self.LINE_STYLES[name]}]{text}[/]" if name in self.LINE_STYLES else text
            for name, text in lines.items()})

    def line(self, name: str) -> str:
        """The plain text of one line ('' when it is not shown)."""
        return Content.from_markup(self._lines.get(name, "")).plain


# -- header --------------------------------------------------------------------------------------

def short_command(command: Sequence[str]) -> str:
    """The command line with the interpreter's directory dropped: '/opt/venv/bin/python t.py' -> 'python t.py'."""
    if not command:
        return ""
    return shlex.join([PurePath(command[0]).name, *command[1:]])


def exit_text(code: int) -> str:
    """'exit 1', or the signal's name for a negative code (subprocess's convention for a killed job)."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            pass
    return f"exit {code}"


STATUS_STYLES = {"running": "$text-success b", "connecting": "dim", "finished": "$text-primary b",
                 "failed": "$text-error b", "lost": "$text-error b", "replay": "$text-accent b"}


def job_status(mode: str, feed_state: str, bye: Mapping[str, Any] | None,
               returncode: int | None) -> tuple[str, str]:
    """(status text, kind) for the header; kind is a key of STATUS_STYLES."""
    if returncode is not None:
        outcome = ("finished" if returncode == 0 else "failed", returncode)
    elif bye is not None:
        outcome = (bye["status"] if bye["status"] in ("finished", "failed") else "failed", bye.get("code"))
    elif feed_state in ("lost", "error", "replay"):  # a replay without a bye: the job vanished
        outcome = ("lost", None)
    else:
        return ("connecting", "connecting") if feed_state == "connecting" else ("running", "running")
    word, code = outcome
    text = word if code is None else f"{word} ({exit_text(code)})"
    if mode == "replay":
        return f"replay: {text}", "replay"
    return text, word


class JobHeader(Lines):
    """Job name, status, pid, elapsed, step, world size; feed and job errors; the command."""

    LINE_STYLES = {"message": "$text-error b"}

    def compose(self) -> ComposeResult:
        yield from super().compose()
        yield FitLine(id="command")

    def show(self, *, name: str, status: str, status_kind: str, pid: int | None, elapsed_s: float | None,
             step: int, world_size: int | None, paused: bool, command: str, message: str | None,
             catching_up: float | None = None) -> None:
        """``catching_up``: the share of a late monitor's backlog read so far (None: caught up)."""
        parts = [f"[b]{escape(name)}[/b]", f"[{STATUS_STYLES[status_kind]}]{escape(status)}[/]"]
        if pid is not None:
            parts.append(f"pid {pid}")
        if elapsed_s is not None:
            parts.append(fmt.duration(elapsed_s))
        parts.append(f"step {step:,}")
        if catching_up is not None:
            parts.append(f"[dim]reading the backlog: {catching_up:.0%}[/]")
        if world_size is not None:
            parts.append(f"world {world_size}")
        if paused:
            parts.append("[reverse b] PAUSED [/]")
        self.show_lines(title="  ".join(parts), message=escape(message) if message else None)
        self.query_one(FitLine).text = command


class FitLine(Widget):
    """One line of plain text shortened at a word boundary (with '…') to the width it gets."""

    DEFAULT_CSS = "FitLine { height: 1; }"

    def __init__(self, text: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._text = text

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if value != self._text:
            self._text = value
            self.refresh()

    def render(self) -> RenderResult:
        return fit(self._text, self.content_size.width)


def fits(text: str, width: int) -> bool:
    """True when ``text`` (markup) takes one line of ``width`` cells (or the width is not known yet)."""
    return not width or Content.from_markup(text).cell_length <= width


def first_fitting(width: int, *forms: str | None) -> str | None:
    """The first of ``forms`` (longest first) that fits one line of ``width``, else the last."""
    return next((form for form in forms[:-1] if form is None or fits(form, width)), forms[-1])


def fit(text: str, width: int) -> str:
    """``text`` on one line of ``width`` cells, cut at a word boundary with '…' when too long."""
    text = " ".join(text.split())
    if width <= 0 or len(text) <= width:
        return text
    return textwrap.shorten(text, width, placeholder=" …") if width > 2 else text[:width]


def show_sparkline(sparkline: Sparkline, values: np.ndarray) -> None:
    """Plot the finite values; the sparkline and its label stay hidden until there are two."""
    data = values[np.isfinite(values)].tolist()
    sparkline.data = data
    sparkline.parent.set_class(len(data) < 2, "-empty")  # a class, so the layout's CSS can hide it too


class Trend(Vertical):
    """A sparkline that fills the rows it is given, its range in its title: the bottom strip of a
    short screen (80x24), where charts do not fit but rows would otherwise stay empty."""

    def __init__(self, name: str, log: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._name = name
        self._log = log
        self.border_title = f"{name}: waiting for data"

    def compose(self) -> ComposeResult:
        yield Sparkline([], classes="trend-spark")

    def show(self, values: np.ndarray, name: str | None = None) -> None:
        """The finite (on a log scale: positive) values; the title gives their range.

        A log scale, because B_simple grows tenfold and more over a run and one early spike
        would flatten everything after it.
        """
        values = values[np.isfinite(values) & ((values > 0) if self._log else True)]
        with np.errstate(divide="ignore"):
            self.query_one(Sparkline).data = (np.log10(values) if self._log else values).tolist()
        self._name = name or self._name
        scale = " (log)" if self._log else ""
        self.border_title = (f"{self._name}{scale}: {fmt.si(values.min())} to {fmt.si(values.max())}"
                             if values.size > 1 else f"{self._name}: waiting for data")


# -- throughput ------------------------------------------------------------------------------------

def flops_text(stats: Stats) -> str:
    """'12.3T FLOP/s, MFU 38.2% of 1 x H100/H200 SXM bf16 peak', or what is not known and why."""
    if stats.flops_per_s is None:
        return escape(f"FLOP/s N/A: {stats.flops_reason}")
    text = f"[b]{fmt.si(stats.flops_per_s)}[/b] FLOP/s, "
    if stats.mfu is None:
        return text + escape(f"MFU N/A ({stats.mfu_reason})")
    return text + f"MFU [b]{stats.mfu:.1%}[/b] of {escape(stats.peak_name)}"


class ThroughputPanel(Lines):
    TITLE = "Throughput"
    LINE_STYLES = {"dropped": "$text-error b", "recording_error": "$text-error b", "seen": "dim"}

    def show(self, stats: Stats) -> None:
        unit = unit_label(stats.unit)
        self.show_lines(
            rate=(f"[b]{fmt.si(stats.samples_per_s)}[/b] {unit}/s now" if stats.samples_per_s is not None
                  else f"{unit}/s: waiting for the first step"),
            step_time=None if stats.step_time_p50_s is None else
            f"step time {fmt.duration(stats.step_time_p50_s)} p50, {fmt.duration(stats.step_time_p95_s)} p95",
            flops=flops_text(stats) if stats.step else None,
            seen=f"{fmt.si(stats.samples_seen)} {unit} in {stats.step:,} steps" if stats.step else None,
            dropped=f"{stats.dropped:,} records dropped: the job outran its buffer; counts and charts miss "
                    "those steps" if stats.dropped else None,
            recording_error=escape(stats.recording_error) if stats.recording_error else None,
        )


# -- ranks of a multi-process job -------------------------------------------------------------------

#: Per-rank step times are listed one by one up to this many ranks; beyond, their spread.
RANKS_LISTED = 8


class RanksPanel(Lines):
    """The straggler view of a multi-process job; hidden for a single process."""

    TITLE = "Ranks"
    LINE_STYLES = {"lost": "$text-error b", "stalled": "$text-warning"}

    def compose(self) -> ComposeResult:
        yield from super().compose()
        with Horizontal(classes="spark -empty"):
            yield Static("skew ", classes="spark-label")
            yield Sparkline([], id="skew-spark")

    def show(self, stats: Stats) -> None:
        self.display = stats.world_size > 1
        if not self.display:
            return
        slowest = None
        if stats.slowest_rank is not None:
            slowest = f"slowest rank [b]{stats.slowest_rank}[/b]"
            if stats.rank_skew is not None:
                slowest += f": {stats.rank_skew:.2f}x the fastest"
            if stats.slowest_rank_lag_steps:
                slowest += f", {stats.slowest_rank_lag_steps:,} steps behind"
        times = [t for t in stats.rank_step_time_s if t is not None]
        if len(stats.rank_step_time_s) <= RANKS_LISTED:
            per_rank = "  ".join(f"r{rank} {fmt.duration(t)}" for rank, t in enumerate(stats.rank_step_time_s))
        else:
            per_rank = (f"step time min {fmt.duration(min(times))}, median {fmt.duration(float(np.median(times)))}, "
                        f"max {fmt.duration(max(times))}") if times else None
        self.show_lines(
            world=f"{stats.world_size} ranks" + (" (uneven local batches)" if stats.uneven_rank_batches else ""),
            slowest=slowest,
            per_rank=per_rank or "waiting for the ranks' first report",
            stalled=f"stalled (no new step): ranks {', '.join(map(str, stats.ranks_stalled))}"
            if stats.ranks_stalled else None,
            lost=f"LOST (no report): ranks {', '.join(map(str, stats.ranks_lost))}" if stats.ranks_lost else None,
        )

    def show_history(self, skew: np.ndarray) -> None:
        show_sparkline(self.query_one("#skew-spark", Sparkline), skew)


# -- batch size and noise scale --------------------------------------------------------------------

def noise_value(noise: Stats | NoiseScale) -> str:
    """'94.3 [49.4, 194]': a value always has its band (without one there is no value)."""
    return fmt.band(noise.b_simple, noise.b_simple_low, noise.b_simple_high)


def geometry_lines(stats: Stats, width: int = 0) -> dict[str, str | None]:
    """B_pre beside B_simple, which of the two the advice uses and why, and why B_pre is missing
    (in short forms where ``width`` is too narrow for the full ones)."""
    optimizer = stats.noise_geometry == "optimizer"
    if stats.b_simple_precond is not None:
        pre = f"B_pre [b]{fmt.band(stats.b_simple_precond, stats.b_simple_precond_low, stats.b_simple_precond_high)}[/b]"
    else:
        pre = "B_pre: no estimate" if stats.optimizer_geometry or optimizer else None
    uses = "B_pre" if optimizer else "B_simple"
    return {
        "b_pre": pre,
        # the choice is worth a line only where there is one: an optimizer with its own geometry
        "geometry": (first_fitting(width, f"advice uses {uses}: {escape(stats.noise_geometry_reason)}",
                                   "advice uses B_pre: the step is g/(√v̂+ε)" if optimizer
                                   else f"advice uses B_simple: {escape(stats.noise_geometry_reason.split(',')[0])}",
                                   f"advice uses {uses} (? for why)")
                     if stats.noise_geometry_reason and pre else None),
        "pre_reason": (first_fitting(width, escape(stats.b_simple_precond_reason),
                                     escape(stats.b_simple_precond_reason.split(":")[0]))
                       if optimizer and stats.b_simple_precond is None and stats.b_simple_precond_reason else None),
    }


#: regime(): (full advice, the few words a narrow panel has room for) below, near and above B_simple.
REGIME_ADVICE = (("larger batches are nearly free statistically", "larger batch ~free"),
                 ("near the critical batch; each extra sample now buys less progress", "near critical batch"),
                 ("most extra samples are wasted; a smaller batch learns more per sample", "most samples wasted"))


def regime(batch: float, b_simple: float, short: bool = False) -> str:
    """What B/B_simple means for this run, in one sentence (``short``: in a few words)."""
    ratio = batch / b_simple
    full, brief = REGIME_ADVICE[0 if ratio < REGIME_LOW else 1 if ratio <= REGIME_HIGH else 2]
    return f"{ratio:.2g}x B_simple: {brief}" if short else f"batch is {ratio:.2g}x the noise scale: {full}"


def noise_source(stats: Stats, short: bool = False) -> str | None:
    """'microbatch estimator, 100% of parameters, 400 steps, |G|²<0 in 12'; the coverage alone
    when per-example norms were refused for covering part of the model. ``short``: 'microbatch,
    400 steps, |G|²<0 in 12' (the coverage only when partial)."""
    fraction = stats.noise_covered_fraction
    partial = fraction is not None and fraction < 1
    if stats.noise_estimator is None:
        return f"per-example norms cover {fraction:.0%} of parameters" if partial else None
    parts = [stats.noise_estimator if short else f"{stats.noise_estimator} estimator"]
    if fraction is not None and (partial or not short):
        parts.append(f"{fraction:.0%} of params" if short else f"{fraction:.0%} of parameters")
    parts.append(f"{stats.noise_steps:,} steps")
    if stats.noise_age_steps is not None:
        parts.append(fmt.measured_ago(stats.noise_age_steps))
    if stats.negative_grad_sq_steps:
        parts.append(f"|G|²<0 in {stats.negative_grad_sq_steps:,}")
    return ", ".join(parts)


class BatchPanel(Lines):
    TITLE = "Batch size & noise scale"
    LINE_STYLES = {"source": "dim", "weak": "$text-warning", "reason": "$text-warning",
                   "stale": "$text-warning", "steps": "$text-warning", "regime": "dim", "geometry": "dim",
                   "pre_reason": "$text-warning"}

    def show(self, stats: Stats) -> None:
        unit = unit_label(stats.unit)
        batch = None
        if stats.batch_size is not None:
            batch = f"batch [b]{fmt.si(stats.batch_size)}[/b] {unit}"
            if stats.micro_batches and stats.micro_batches > 1:
                batch += f" = {stats.micro_batches} x {fmt.si(stats.batch_size / stats.micro_batches)}"
            else:
                batch += ", 1 micro-batch"
        has_value = stats.b_simple is not None
        known = stats.efficiency is not None  # the model sets it only with a batch size and B_simple > 0
        width = self.query_one(".lines").content_size.width  # narrow (80x24): the short forms, no wrapping
        efficiency = f"efficiency {stats.efficiency:.0%} per sample at B={fmt.si(stats.batch_size)}" if known else ""
        measuring = not has_value and (stats.noise_reason or "").startswith("measuring:")
        simple = (f"B_simple [b]{noise_value(stats)}[/b]" if has_value
                  else f"B_simple: {escape(stats.noise_reason.split(',')[0])}" if measuring
                  else "B_simple: no estimate")
        geometry = geometry_lines(stats, width)  # B_pre beside B_simple, and which the advice uses
        pre = geometry.pop("b_pre")
        side_by_side = pre is not None and fits(f"{simple} · {pre}", width)  # else B_pre on the next line
        self.show_lines(
            batch=batch,
            b_simple=f"{simple} · {pre}" if side_by_side else simple,
            b_pre=None if side_by_side else pre,
            **geometry,
            source=first_fitting(width, noise_source(stats), noise_source(stats, short=True)),
            stale=first_fitting(
                width, f"stale: no measured step for {stats.noise_age_steps:,} steps; the estimator stopped measuring",
                f"stale: not measured for {stats.noise_age_steps:,} steps") if stats.noise_stale else None,
            steps="; ".join(filter(None, (
                f"{stats.skipped_steps:,} skipped step{'s' if stats.skipped_steps != 1 else ''} (no optimizer.step())" if stats.skipped_steps else None,
                escape(stats.step_problem) if stats.step_problem and has_value else None))) or None,
            weak="B_big << B_simple: estimate noisy" if stats.noise_weak else None,
            reason=escape(stats.noise_reason) if not has_value and not measuring and stats.noise_reason else None,
            efficiency=first_fitting(width, f"{efficiency}, 1/(1+B/B_simple)", efficiency) if known else None,
            regime=first_fitting(width, regime(stats.batch_size, stats.b_simple),
                                 regime(stats.batch_size, stats.b_simple, short=True)) if known else None,
            groups="\n".join(
                f"{escape(label)}: {noise_value(noise) if noise.b_simple is not None else 'no estimate'}"
                for label, noise in stats.noise_groups),
        )


#: The panel's one line of why; the full reason (the fit, the band, the objective) is behind w.
OPTIMAL_GIST = "most progress per second (w: why)"


def branch_line(stats: Stats) -> str | None:
    """The latest branch check in one line: measured critical batch, B_simple, ratio, cost, calibration."""
    check = stats.branch_check
    if check is None:
        return None
    if check.b_crit is None:
        low = f"> {check.b_crit_low:,.0f}" if check.censored == "above" and check.b_crit_low else "below the batch"
        text = f"measured critical batch now: {low}"
    else:
        text = f"measured critical batch now: [b]{check.b_crit:,.0f}[/b]"
        if check.b_crit_low is not None and check.b_crit_high is not None:
            text += escape(f" [{check.b_crit_low:,.0f}-{fmt.si(check.b_crit_high)}]")
    if check.b_simple is not None:
        text += f" (B_simple: {check.b_simple:,.0f}"
        text += f", ratio {check.ratio:.2f})" if check.ratio is not None else ")"
    text += f", step {check.step:,}, cost {fmt.si(check.cost_samples)} samples {check.cost_s:.1f} s"
    if stats.b_noise_calibration is not None:
        text += f"; advice calibrated: B_noise = B_simple/{stats.b_noise_calibration:.3g}"
    return text + " (b: details)"


class OptimalPanel(Lines):
    """The recommended batch: its numbers and one line of why; the full reason is behind w."""

    TITLE = "Optimal batch size"
    LINE_STYLES = {"input": "$text-warning", "why": "dim"}

    def show(self, recommendation: Recommendation | None, reason: str | None, memory: str | None = None,
             input_hint: str | None = None, ranks: int = 1, branch: str | None = None) -> None:
        """The recommendation, or why there is none yet (``reason``, from the model), the memory limit,
        whether the job waits for its input (``input_hint``), the data-parallel size (``ranks``), and the
        latest branch check (``branch``, from branch_line)."""
        memory = escape(memory) if memory else None
        input_hint = escape(input_hint) if input_hint else None
        if recommendation is None:
            self.show_lines(optimal=escape(reason or "no recommendation yet"), memory=memory, input=input_hint,
                            branch=branch)
            return
        r = recommendation
        width = self.query_one(".lines").content_size.width
        optimal = f"B* [b]{r.batch_size:,}[/b]"
        if r.current_batch is not None:
            optimal += f" (now {r.current_batch:,})"
        if r.split is not None:
            optimal += f": {fmt.accumulate(r.micro_batch, r.accumulation, ranks)}"
            memory = "a larger micro-batch may do better: profile micro-batch sizes to find out"
        elif r.accumulation and r.micro_batch:
            optimal += f" = {r.accumulation} x {r.micro_batch:,} (accumulate)"
        speedup = None
        if r.speedup is not None and r.current_batch is not None:
            speedup = f"predicted speedup [b]{r.speedup:.2f}x[/b]"
            if r.speedup_low is not None and r.speedup_high is not None:
                speedup += f" [{r.speedup_low:.2f}, {r.speedup_high:.2f}]"
                speedup = first_fitting(width, f"{speedup} over the B_noise band", speedup)
        lr = None
        if r.lr_factor_sgd is not None and r.batch_size != r.current_batch:
            lr = f"lr: SGD x{r.lr_factor_sgd:.3g}, Adam x{r.lr_factor_adam:.3g}"
        self.show_lines(optimal=optimal, speedup=speedup, lr=lr, memory=memory, input=input_hint, branch=branch,
                        why=escape(fit(OPTIMAL_GIST, width)))


# -- GPUs --------------------------------------------------------------------------------------------

def _na(value: float | None, pattern: str) -> str:
    return "N/A" if value is None else pattern.format(value)


def _gib(mib: float | None) -> str:
    return _na(None if mib is None else mib / 1024, "{:.1f}")


def gpu_text(gpu: GpuReading) -> str:
    """One GPU as labelled values (N/A where the driver gave nothing); the panel wraps between them."""
    name = " ".join(part for part in (gpu.name or "N/A", gpu.mig) if part)
    text = (f"[b]{gpu.index} {escape(name)}[/b]  util {_na(gpu.util_pct, '{:.0f}%')} "
            f"(job {_na(gpu.job_util_pct, '{:.0f}%')})  mem {_gib(gpu.mem_used_mib)}/{_gib(gpu.mem_total_mib)} GiB "
            f"(job {_gib(gpu.job_mem_mib)} GiB)  {_na(gpu.power_w, '{:.0f}')}/{_na(gpu.power_limit_w, '{:.0f}')} W  "
            f"{_na(gpu.temp_c, '{:.0f}°C')}  SM {_na(gpu.sm_clock_mhz, '{:.0f} MHz')}")
    if gpu.throttle_reasons:
        text += f"\n[$text-warning]throttled: {escape(', '.join(gpu.throttle_reasons))}[/]"
    return text


class GpuPanel(Lines):
    TITLE = "GPU"
    LINE_STYLES = {"banner": "$text-warning", "hint": "dim", "advice": "$text-accent"}

    def show(self, snapshot: GpuSnapshot | None, hints: Sequence[str] = (), *, live: bool) -> None:
        """The latest recorded readings (None when the session has none) and the model's GPU hints."""
        if snapshot is None:
            self.show_lines(banner="waiting for the first GPU sample" if live else
                            "no GPU readings were recorded (no monitor was attached while the job ran)")
            return
        if snapshot.gpus:
            gpus = "\n".join(gpu_text(g) for g in snapshot.gpus)
        else:
            gpus = None if snapshot.banner else "waiting for the first GPU sample"
        self.show_lines(gpus=gpus, banner=escape(snapshot.banner) if snapshot.banner else None,
                        hint=escape(snapshot.hint) if snapshot.hint else None,
                        advice="\n".join(escape(h) for h in hints) or None)


# -- logged scalars and events --------------------------------------------------------------------

class ScalarsPanel(Lines):
    TITLE = "Logged"

    def show(self, scalars: Mapping[str, float]) -> None:
        self.show_lines(scalars="  ".join(f"{escape(name)} [b]{value:.4g}[/b]" for name, value in scalars.items())
                        or "nothing logged: call monitor.log(loss=...) to see it here")


EVENT_MARKS = {"error": ("✖", "$text-error b"), "warning": ("!", "$text-warning")}


class EventsLog(Widget):
    """The latest warning and error events, newest last, one line each, cut at word boundaries.

    Each event is stamped with the session's elapsed time, like the header, so a replay reads the
    same in any time zone.
    """

    DEFAULT_CSS = "EventsLog { height: auto; }"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._events: tuple[Mapping[str, Any], ...] = ()
        self._t0 = 0.0

    def show(self, events: Sequence[Mapping[str, Any]], t0: float) -> None:
        events = tuple(events)
        if (events, t0) != (self._events, self._t0):
            self._events, self._t0 = events, t0
            self.display = bool(events)
            self.refresh(layout=True)

    def get_content_height(self, container: Any, viewport: Any, width: int) -> int:
        return max(1, len(self._events))  # CSS max-height decides how many are shown

    def render(self) -> RenderResult:
        lines = []
        for event in self._events[-(self.content_size.height or 1):]:
            mark, style = EVENT_MARKS.get(event["level"], ("·", "dim"))
            prefix = f"{mark} at {fmt.duration(max(0.0, event['t'] - self._t0))}: "
            message = fit(event["msg"], self.content_size.width - len(prefix))
            lines.append(f"[{style}]{prefix}[/]{escape(message)}")
        return Content.from_markup("\n".join(lines))


# -- charts ----------------------------------------------------------------------------------------

#: Axis tick density: one y tick per this many rows, one x tick per this many columns (at most).
ROWS_PER_Y_TICK, COLUMNS_PER_X_TICK = 3, 10
#: B_simple chart: band edges further than this factor beyond the estimates and batch sizes are
#: clipped to the chart's edge and drawn open (▲ ▼); so is an infinite edge. One early band edge
#: (a few steps' |G|² near 0) would otherwise stretch the axis to millions.
BAND_CLIP_FACTOR = 3.0
OPEN_TOP, OPEN_BOTTOM = "▲", "▼"
#: The GPU chart's utilisation and memory lines (plotext's first two default colours, as before).
GPU_COLORS = ((0, 130, 200), (60, 180, 75))


class Chart(Widget):
    """A chart of the data last given to ``show``, or ``waiting`` in plain words until then.

    New data is drawn at once (:mod:`bsmon.tui.plot`) while the chart is on the screen, and only
    the rows that changed are repainted; a chart that is not shown is drawn when it next is. Axes
    get round 1-2-5 ticks with SI labels (:meth:`axes`).
    """

    DEFAULT_CSS = """
    Chart { width: 1fr; height: 1fr; }
    Chart.-plotted { background: $surface; }
    """

    def __init__(self, title: str, waiting: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = title
        self._waiting = waiting
        self._data: tuple | None = None
        self._lines: list[Strip] | None = None  # drawn at self._lines_size; None: draw when shown
        self._lines_size: tuple[int, int] | None = None
        self._drawing: plot.Drawing | None = None  # the last chart drawn (not the waiting message)
        self.figure: plot.Figure | None = None  # the figure ``draw`` fills

    def render_line(self, y: int) -> Strip:
        size = (self.size.width, self.size.height)
        if self._lines is None or self._lines_size != size:
            self._draw_lines(size)
        return self._lines[y] if y < len(self._lines) else Strip.blank(size[0], self.rich_style)

    def _draw_lines(self, size: tuple[int, int]) -> list[int]:
        """Draw the chart at ``size``; returns the rows that differ from the lines drawn before."""
        width, height = size
        old = self._lines if self._lines_size == size else None
        if self._data is None:  # wrapped like a Static's text
            console, base = self.app.console, self.rich_style
            lines = console.render_lines(Text(self._waiting, style="dim"), console.options.update_width(width))
            self._drawing = None
            self._lines = ([Strip(line, width).apply_style(base) for line in lines[:height]]
                           + [Strip.blank(width, base)] * (height - len(lines)))
        else:
            self.figure = plot.Figure(width, height)
            self.draw(*self._data)
            self._drawing = self.figure.draw(self.rich_style, self._drawing)
            self._lines = self._drawing.strips
        self._lines_size = size
        return [y for y in range(height) if old is None or self._lines[y] is not old[y]]

    def notify_style_update(self) -> None:
        """The colours changed (the theme, or the background once there is data): draw again."""
        super().notify_style_update()
        self._lines = self._drawing = None

    def text(self) -> str:
        """The chart's characters as it is drawn now, a line each (for tests and debugging)."""
        return "\n".join(self.render_line(y).text for y in range(self.size.height))

    def draw(self, *data: Any) -> None:
        """Plot ``data`` (what ``show`` stored) on ``self.figure``, and set its :meth:`axes`."""
        raise NotImplementedError

    def trace(self, xs: Any, ys: Any, color: str | tuple[int, int, int], label: str | None = None) -> None:
        """One series: a line while it is sparse, points once there is one per braille column
        (two per cell), where a line would only join neighbours with vertical strokes."""
        dense = len(xs) >= 2 * self.size.width
        (self.figure.dots if dense else self.figure.line)(xs, ys, color, label)

    def axes(self, x: tuple[float, float], y: tuple[float, float], *, log_x: bool = False,
             log_y: bool = False) -> None:
        """Scale, limits and round ticks of both axes over the ranges ``x`` and ``y``."""
        figure = self.figure
        for axis, (low, high), log, count in (
                ("x", x, log_x, self.size.width // COLUMNS_PER_X_TICK),
                ("y", y, log_y, self.size.height // ROWS_PER_Y_TICK)):
            log = log and low > 0
            if high <= low:  # one value: a range around it, so it gets a tick
                low, high = (low / 2, low * 2) if log else (low - abs(low) / 2 - 1, high + abs(high) / 2 + 1)
            values = (fmt.log_ticks if log else fmt.ticks)(low, high, max(2, min(count, 8)))
            setattr(figure, axis, plot.Axis(low, high, values, [fmt.tick_label(v) for v in values], log))

    def _store(self, data: tuple | None) -> None:
        """Keep what ``draw`` needs, or None for the waiting message, and redraw if it changed.

        Drawing is most of what a chart costs, and the app hands the charts new data whenever the
        feed moved (a GPU sample, a logged value), often with the same points as before."""
        if _same(data, self._data):
            return
        self._data = data
        self.set_class(data is not None, "-plotted")
        size = (self.size.width, self.size.height)
        if self._lines is None or self._lines_size != size or not self.region:  # not shown now
            self._lines = None
            self.refresh()
            return
        changed = self._draw_lines(size)
        for _, run in itertools.groupby(enumerate(changed), key=lambda item: item[1] - item[0]):  # runs of rows
            rows = [y for _, y in run]
            self.refresh(Region(0, rows[0], size[0], len(rows)))


def _same(a: Any, b: Any) -> bool:
    """True if two chart data (tuples and lists of arrays, numbers and strings) hold equal values."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and list(a) == list(b)
                and all(_same(a[key], b[key]) for key in a))
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError):  # an object holding arrays: count it as changed
        return False


def _finite(*columns: np.ndarray) -> tuple[np.ndarray, ...]:
    keep = np.logical_and.reduce([np.isfinite(c) for c in columns])
    return tuple(c[keep] for c in columns)


def _spread(*values: np.ndarray) -> bool:
    """True when the positive values span more than 20x: then a log axis reads better."""
    positive = np.concatenate([v[v > 0] for v in values])
    return positive.size > 1 and positive.max() > 20 * positive.min()


def _range(*values: np.ndarray, log: bool = False) -> tuple[float, float]:
    """(min, max) of the values (the positive ones on a log axis)."""
    joined = np.concatenate([v[v > 0] if log else v for v in values])
    return float(joined.min()), float(joined.max())


def _points(xs: np.ndarray, ys: np.ndarray, log_y: bool, log_x: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The points without those a log axis cannot show."""
    keep = np.ones(xs.shape, dtype=bool)
    if log_y:
        keep &= ys > 0
    if log_x:
        keep &= xs > 0
    return xs[keep], ys[keep]


def _time_axis(figure: plot.Figure, elapsed_s: np.ndarray) -> float:
    """Label the x axis in seconds, or minutes past 3 minutes; returns the divisor for x values."""
    minutes = elapsed_s.size > 0 and elapsed_s.max() > 180
    figure.xlabel = "elapsed min" if minutes else "elapsed s"
    return 60.0 if minutes else 1.0


class ThroughputChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Throughput over time", "throughput: waiting for steps", **kwargs)

    def show(self, elapsed_s: np.ndarray, rate: np.ndarray, unit: str) -> None:
        elapsed_s, rate = _finite(elapsed_s, rate)
        self._store((elapsed_s, rate, unit) if elapsed_s.size > 1 else None)

    def draw(self, elapsed_s: np.ndarray, rate: np.ndarray, unit: str) -> None:
        x = elapsed_s / _time_axis(self.figure, elapsed_s)
        self.trace(x, rate, "cyan")
        # From zero, so jitter does not look like a collapse.
        self.axes((float(x.min()), float(x.max())), (0.0, float(rate.max()) * 1.1))
        self.figure.ylabel = f"{unit_label(unit)}/s"


def band_range(b_simple: np.ndarray, batch: np.ndarray) -> tuple[float, float]:
    """The B_simple chart's y range: the estimates and batch sizes, widened by BAND_CLIP_FACTOR."""
    low, high = _range(b_simple[np.isfinite(b_simple)], batch[np.isfinite(batch)], log=True)
    return low / BAND_CLIP_FACTOR, high * BAND_CLIP_FACTOR


def clip_band(edge: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inside, open above, open below) masks of a band edge against the plotted range; an
    infinite upper edge (|G|² not yet clearly above 0) is open above."""
    above = edge > high  # +inf too; NaN (no band) is in none of the three
    below = edge < low
    return np.isfinite(edge) & ~above & ~below, above, below


class NoiseChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("B_simple and its band vs step", "B_simple: no estimate yet", **kwargs)

    def show(self, step: np.ndarray, b_simple: np.ndarray, low: np.ndarray, high: np.ndarray,
             batch: np.ndarray) -> None:
        """Per bin: the step, B_simple, its band (NaN: none; +inf: open) and the batch size."""
        known = np.isfinite(b_simple)
        self._store((step, b_simple, low, high, batch) if known.sum() > 1 else None)

    def draw(self, step: np.ndarray, b_simple: np.ndarray, low: np.ndarray, high: np.ndarray,
             batch: np.ndarray) -> None:
        figure = self.figure
        bottom, top = band_range(b_simple, batch)
        log = top > 20 * bottom
        band_x, band_y, open_top, open_bottom = [], [], [], []
        for edge in (low, high):
            inside, above, below = clip_band(edge, bottom, top)
            band_x.append(step[inside])
            band_y.append(edge[inside])
            open_top.append(step[above])
            open_bottom.append(step[below])
        band_x, band_y = np.concatenate(band_x), np.concatenate(band_y)
        if band_x.size:
            figure.dots(band_x, band_y, "gray", label="95% band")
        label = "band open beyond"
        for steps, edge_y, marker in ((open_top, top, OPEN_TOP), (open_bottom, bottom, OPEN_BOTTOM)):
            steps = np.concatenate(steps)
            if steps.size:
                figure.marks(steps, np.full(steps.size, edge_y), marker, "gray", label=label)
                label = None
        shown = np.isfinite(b_simple) & (b_simple > 0)
        self.trace(step[shown], b_simple[shown], "magenta", label="B_simple")
        batch_shown = np.isfinite(batch) & (batch > 0)
        if batch_shown.any():
            self.trace(step[batch_shown], batch[batch_shown], "green", label="batch")
        self.axes((float(step.min()), float(step.max())), (bottom, top), log_y=log)
        figure.xlabel = "step"


class NoiseLossChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("B_simple vs loss", "B_simple vs loss: log(loss=...) and wait for an estimate", **kwargs)

    def show(self, loss: np.ndarray, b_simple: np.ndarray) -> None:
        loss, b_simple = _finite(loss, b_simple)
        self._store((loss, b_simple) if loss.size > 1 else None)

    def draw(self, loss: np.ndarray, b_simple: np.ndarray) -> None:
        log_y, log_x = _spread(b_simple), _spread(loss)
        xs, ys = _points(loss, b_simple, log_y, log_x)
        self.figure.dots(xs, ys, "magenta")
        self.axes((float(xs.min()), float(xs.max())), (float(ys.min()), float(ys.max())), log_x=log_x, log_y=log_y)
        self.figure.xlabel = "loss (training moves left)"


class LossChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Loss vs step", "loss: call monitor.log(loss=...) to chart it", **kwargs)

    def show(self, step: np.ndarray, loss: np.ndarray) -> None:
        step, loss = _finite(step, loss)
        self._store((step, loss) if step.size > 1 else None)

    def draw(self, step: np.ndarray, loss: np.ndarray) -> None:
        log = _spread(loss)
        xs, ys = _points(step, loss, log)
        self.trace(xs, ys, "yellow")
        self.axes((float(xs.min()), float(xs.max())), (float(ys.min()), float(ys.max())), log_y=log)
        self.figure.xlabel = "step"


class GpuChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("GPU utilisation and memory", "GPU: no readings", **kwargs)

    def show(self, elapsed_s: np.ndarray, util: np.ndarray, mem: np.ndarray) -> None:
        """Aggregate utilisation % and memory used % over the job's GPUs against elapsed seconds."""
        lines = {"util %": _finite(elapsed_s, util), "mem %": _finite(elapsed_s, mem)}
        lines = {label: line for label, line in lines.items() if line[0].size > 1}
        self._store((lines,) if lines else None)

    def draw(self, lines: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        elapsed = np.concatenate([elapsed for elapsed, _ in lines.values()])
        scale = _time_axis(self.figure, elapsed)
        for (label, (times, values)), color in zip(lines.items(), GPU_COLORS):
            self.trace(times / scale, values, color, label=label)
        self.axes((float(elapsed.min()) / scale, float(elapsed.max()) / scale), (0.0, 100.0))


class BatchSizeChart(Chart):
    """Throughput r(B), efficiency E(B) and goodput r*E against B (log axis), each scaled to its
    maximum, with the measured throughput points, the current batch and the optimum marked."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Throughput, efficiency and goodput vs batch size",
                         "vs batch size: needs a throughput profile and a noise estimate", **kwargs)
        self._shown: tuple | None = None  # what show() drew its curves from

    def show(self, recommendation: Recommendation | None, b_noise: float | None,
             points: Sequence[ThroughputPoint]) -> None:
        shown = (recommendation, b_noise, tuple(points))
        if self._shown is not None and recommendation is self._shown[0] and shown[1:] == self._shown[1:]:
            return  # the same advice object: the same curves (64 goodput evaluations)
        self._shown = shown
        in_run = recommendation is not None and recommendation.split is not None
        if recommendation is None or not b_noise or not (points or in_run):
            self._store(None)
            return
        measured = np.array([p.batch_size for p in points], dtype=float)
        rates = np.array([p.samples_per_s for p in points])
        marks = [recommendation.batch_size] + ([recommendation.current_batch] if recommendation.current_batch else [])
        low, high = min(*measured, *marks) / 2, max(*measured, *marks) * 2
        if in_run:  # the run's own step times cover whole micro-batches only
            micro = recommendation.micro_batch
            sizes = micro * np.unique(np.geomspace(1, max(2.0, high / micro), 64).round())
        else:
            sizes = np.unique(np.geomspace(max(1.0, low), high, 64).round())
        goodput = np.array([recommendation.goodput_at(int(b)) for b in sizes])
        efficiency = statistical_efficiency(sizes, b_noise)
        throughput = goodput / efficiency
        self._store((sizes, throughput / throughput.max(), efficiency, goodput / goodput.max(),
                     measured, rates / throughput.max(), recommendation.current_batch, recommendation.batch_size))

    def draw(self, sizes, throughput, efficiency, goodput, measured, measured_rates, current, optimal) -> None:
        figure = self.figure
        figure.line(sizes, throughput, "cyan", label="throughput")
        figure.line(sizes, efficiency, "yellow", label="efficiency")
        figure.line(sizes, goodput, "green", label="goodput")
        figure.marks(measured, measured_rates, "•", "cyan")
        if current:
            figure.vline(current, "gray")
        figure.vline(optimal, "green")
        self.axes((float(sizes.min()), float(sizes.max())), (0.0, 1.05), log_x=True)
        figure.xlabel = (f"batch size (log); grey: now {current:,}, green: B* {optimal:,}" if current
                         else f"batch size (log); green: B* {optimal:,}")
