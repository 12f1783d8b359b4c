"""The panels and charts of the bsmon screen.

Each panel has a ``show(...)`` method that takes plain values (model types,
numbers) and repaints only when its text changed, so a redraw of an unchanged
screen costs a few string comparisons. Formatting that says what a number
means (the batch regime, the status) lives next to the panel that shows it.
"""

from __future__ import annotations

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
from textual.markup import escape
from textual.widget import Widget
from textual.widgets import Sparkline, Static
from textual_plotext import PlotextPlot

from bsmon import fmt
from bsmon.gpu import GpuReading, GpuSnapshot
from bsmon.model import Stats
from bsmon.stats.noise import NoiseScale, statistical_efficiency
from bsmon.stats.optimal import Recommendation
from bsmon.stats.throughput import ThroughputPoint

#: A batch below/above this multiple of B_simple is "well below"/"well above" the noise scale.
REGIME_LOW, REGIME_HIGH = 0.5, 2.0


def unit_label(unit: str) -> str:
    return "tokens" if unit == "tokens" else "samples"


class Lines(Vertical):
    """A titled panel whose text is one Static of named lines, redrawn only when a line changes.

    ``show_lines`` takes every line by name; an empty one is left out, so optional lines (drops,
    warnings) take no room until they have something to say. One Static per panel keeps the
    screen cheap to composite, and a change that keeps the text's height repaints only this
    panel: a layout pass of the whole screen costs far more than the text.
    """

    TITLE = ""
    #: line name -> markup style for the whole line (colours come from the theme)
    LINE_STYLES: Mapping[str, str] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = self.TITLE
        self._lines: dict[str, str] = {}
        self._shape: tuple[int, int] | None = None  # (width, height) of the text

    def compose(self) -> ComposeResult:
        yield Static("", classes="lines")

    def show_lines(self, **lines: str | None) -> None:
        lines = {name: text for name, text in lines.items() if text}
        if lines == self._lines:
            return
        self._lines = lines
        content = Content.from_markup("\n".join(
            f"[{self.LINE_STYLES[name]}]{text}[/]" if name in self.LINE_STYLES else text
            for name, text in lines.items()))
        widget = self.query_one(".lines", Static)
        width = widget.content_size.width
        shape = (width, content.get_height(widget.styles, width)) if width else None
        widget.update(content, layout=shape is None or shape != self._shape)
        self._shape = shape

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
             step: int, world_size: int | None, paused: bool, command: str, message: str | None) -> None:
        parts = [f"[b]{escape(name)}[/b]", f"[{STATUS_STYLES[status_kind]}]{escape(status)}[/]"]
        if pid is not None:
            parts.append(f"pid {pid}")
        if elapsed_s is not None:
            parts.append(fmt.duration(elapsed_s))
        parts.append(f"step {step:,}")
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


# -- throughput ------------------------------------------------------------------------------------

class ThroughputPanel(Lines):
    TITLE = "Throughput"
    LINE_STYLES = {"dropped": "$text-error b", "recording_error": "$text-error b", "seen": "dim"}

    def compose(self) -> ComposeResult:
        yield from super().compose()
        with Horizontal(classes="spark -empty"):
            yield Static("rate ", classes="spark-label")
            yield Sparkline([], id="rate-spark")

    def show(self, stats: Stats) -> None:
        unit = unit_label(stats.unit)
        self.show_lines(
            rate=(f"[b]{fmt.si(stats.samples_per_s)}[/b] {unit}/s now" if stats.samples_per_s is not None
                  else f"{unit}/s: waiting for the first step"),
            step_time=None if stats.step_time_p50_s is None else
            f"step time {fmt.duration(stats.step_time_p50_s)} p50, {fmt.duration(stats.step_time_p95_s)} p95",
            seen=f"{fmt.si(stats.samples_seen)} {unit} in {stats.step:,} steps" if stats.step else None,
            dropped=f"{stats.dropped:,} records dropped: the job outran its buffer; counts and charts miss "
                    "those steps" if stats.dropped else None,
            recording_error=escape(stats.recording_error) if stats.recording_error else None,
        )

    def show_history(self, rates: np.ndarray) -> None:
        show_sparkline(self.query_one("#rate-spark", Sparkline), rates)


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


def regime(batch: float, b_simple: float) -> str:
    """What B/B_simple means for this run, in one sentence."""
    ratio = batch / b_simple
    if ratio < REGIME_LOW:
        advice = "larger batches are nearly free statistically"
    elif ratio <= REGIME_HIGH:
        advice = "near the critical batch; each extra sample now buys less progress"
    else:
        advice = "most extra samples are wasted; a smaller batch learns more per sample"
    return f"batch is {ratio:.2g}x the noise scale: {advice}"


def noise_source(stats: Stats) -> str | None:
    """'microbatch estimator, 100% of parameters, 400 steps, |G|²<0 in 12'; the coverage alone
    when per-example norms were refused for covering part of the model."""
    fraction = stats.noise_covered_fraction
    if stats.noise_estimator is None:
        return f"per-example norms cover {fraction:.0%} of parameters" if fraction is not None and fraction < 1 else None
    parts = [f"{stats.noise_estimator} estimator"]
    if stats.noise_covered_fraction is not None:
        parts.append(f"{stats.noise_covered_fraction:.0%} of parameters")
    parts.append(f"{stats.noise_steps:,} steps")
    if stats.noise_age_steps is not None:
        parts.append(fmt.measured_ago(stats.noise_age_steps))
    if stats.negative_grad_sq_steps:
        parts.append(f"|G|²<0 in {stats.negative_grad_sq_steps:,}")
    return ", ".join(parts)


class BatchPanel(Lines):
    TITLE = "Batch size & noise scale"
    LINE_STYLES = {"source": "dim", "weak": "$text-warning", "reason": "$text-warning",
                   "stale": "$text-warning", "steps": "$text-warning", "regime": "dim"}

    def compose(self) -> ComposeResult:
        yield from super().compose()
        with Horizontal(classes="spark -empty"):
            yield Static("B_simple ", classes="spark-label")
            yield Sparkline([], id="noise-spark")

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
        measuring = not has_value and (stats.noise_reason or "").startswith("measuring:")
        self.show_lines(
            batch=batch,
            b_simple=(f"B_simple [b]{noise_value(stats)}[/b]" if has_value
                      else f"B_simple: {escape(stats.noise_reason.split(',')[0])}" if measuring
                      else "B_simple: no estimate"),
            source=noise_source(stats),
            stale=(f"stale: no measured step for {stats.noise_age_steps:,} steps; the estimator stopped measuring"
                   if stats.noise_stale else None),
            steps="; ".join(filter(None, (
                f"{stats.skipped_steps:,} skipped step{'s' if stats.skipped_steps != 1 else ''} (no optimizer.step())" if stats.skipped_steps else None,
                escape(stats.step_problem) if stats.step_problem and has_value else None))) or None,
            weak="B_big << B_simple: estimate noisy" if stats.noise_weak else None,
            reason=escape(stats.noise_reason) if not has_value and not measuring and stats.noise_reason else None,
            efficiency=f"efficiency {stats.efficiency:.0%} per sample at B={fmt.si(stats.batch_size)}, "
                       "1/(1+B/B_simple)" if known else None,
            regime=regime(stats.batch_size, stats.b_simple) if known else None,
            groups="\n".join(
                f"{escape(label)}: {noise_value(noise) if noise.b_simple is not None else 'no estimate'}"
                for label, noise in stats.noise_groups),
        )

    def show_history(self, b_simple: np.ndarray) -> None:
        show_sparkline(self.query_one("#noise-spark", Sparkline), b_simple)


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
    TITLE = "Optimal batch size"
    LINE_STYLES = {"input": "$text-warning"}

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
                speedup += f" [{r.speedup_low:.2f}, {r.speedup_high:.2f}] over the B_simple band"
        lr = None
        if r.lr_factor_sgd is not None and r.batch_size != r.current_batch:
            lr = f"lr: SGD x{r.lr_factor_sgd:.3g}, Adam x{r.lr_factor_adam:.3g}"
        roomy = not self.screen.has_class("-short")  # at 80x24 the reason would push the GPU panel away
        self.show_lines(optimal=optimal, speedup=speedup, lr=lr, memory=memory, input=input_hint, branch=branch,
                        why=escape(r.reason) if roomy else None)


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

class Chart(PlotextPlot):
    """A plotext chart of the data last given to ``show``, or ``waiting`` in plain words until then.

    Plotting happens in ``render``, from the stored data, because plotext's build rescales its
    data in place (a second build of a log-scale plot would take the log twice). ``render_cost_s``
    is how long the last render took, so the app can slow chart redraws down on a big terminal.
    """

    def __init__(self, title: str, waiting: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = title
        self._waiting = waiting
        self._data: tuple | None = None
        self.render_cost_s = 0.0

    def render(self) -> RenderResult:
        if self._data is None:
            return Text(self._waiting, style="dim")
        start = time.perf_counter()
        try:
            self.plt.clear_data()
            self.draw(*self._data)
            return super().render()
        finally:
            self.render_cost_s = time.perf_counter() - start

    def draw(self, *data: Any) -> None:
        """Plot ``data`` (what ``show`` stored) on the cleared ``self.plt``."""
        raise NotImplementedError

    def trace(self, xs: list, ys: list, **style: Any) -> None:
        """One series: a line while it is sparse, points once there is one per braille column
        (two per cell), where they look the same and plotext builds them in half the time."""
        dense = len(xs) >= 2 * self.size.width
        (self.plt.scatter if dense else self.plt.plot)(xs, ys, marker="braille", **style)

    def _store(self, data: tuple | None) -> None:
        """Keep what ``draw`` needs, or None for the waiting message, and redraw."""
        self._data = data
        self.refresh()


def _finite(*columns: np.ndarray) -> tuple[np.ndarray, ...]:
    keep = np.logical_and.reduce([np.isfinite(c) for c in columns])
    return tuple(c[keep] for c in columns)


def _y_scale(plt: Any, *ys: np.ndarray) -> bool:
    """A log y axis when the positive values span more than 20x; True if it chose log."""
    log = _spread(*ys)
    plt.yscale("log" if log else "linear")
    return log


def _spread(*values: np.ndarray) -> bool:
    positive = np.concatenate([v[v > 0] for v in values])
    return positive.size > 1 and positive.max() > 20 * positive.min()


def _points(xs: np.ndarray, ys: np.ndarray, log_y: bool, log_x: bool = False) -> tuple[list, list]:
    """Plain lists for plotext, without the points a log axis cannot show."""
    keep = np.ones(xs.shape, dtype=bool)
    if log_y:
        keep &= ys > 0
    if log_x:
        keep &= xs > 0
    return xs[keep].tolist(), ys[keep].tolist()


def _time_axis(plt: Any, elapsed_s: np.ndarray) -> float:
    """Label the x axis in seconds, or minutes past 3 minutes; returns the divisor for x values."""
    minutes = elapsed_s.size > 0 and elapsed_s.max() > 180
    plt.xlabel("elapsed min" if minutes else "elapsed s")
    return 60.0 if minutes else 1.0


class ThroughputChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Throughput over time", "throughput: waiting for steps", **kwargs)

    def show(self, elapsed_s: np.ndarray, rate: np.ndarray, unit: str) -> None:
        elapsed_s, rate = _finite(elapsed_s, rate)
        self._store((elapsed_s, rate, unit) if elapsed_s.size > 1 else None)

    def draw(self, elapsed_s: np.ndarray, rate: np.ndarray, unit: str) -> None:
        plt = self.plt
        plt.yscale("linear")
        scale = _time_axis(plt, elapsed_s)
        self.trace((elapsed_s / scale).tolist(), rate.tolist(), color="cyan")
        plt.ylim(0, float(rate.max()) * 1.1)  # from zero, so jitter does not look like a collapse
        plt.ylabel(f"{unit_label(unit)}/s")


class NoiseChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("B_simple and its band vs step", "B_simple: no estimate yet", **kwargs)

    def show(self, step: np.ndarray, b_simple: np.ndarray, low: np.ndarray, high: np.ndarray,
             batch: np.ndarray) -> None:
        series = [_finite(step, values) for values in (b_simple, low, high, batch)]
        self._store(tuple(series) if series[0][0].size > 1 else None)

    def draw(self, *series: tuple[np.ndarray, np.ndarray]) -> None:
        plt = self.plt
        log = _y_scale(plt, *(ys for _, ys in series))
        (b_x, b_y), low, high, batch = series
        band_low, band_high = _points(*low, log), _points(*high, log)
        if band_low[0]:  # plotext cannot draw a labelled series without points
            plt.scatter(*band_low, marker="braille", color="gray", label="95% band")
            plt.scatter(*band_high, marker="braille", color="gray")
        self.trace(*_points(b_x, b_y, log), color="magenta", label="B_simple")
        batch_points = _points(*batch, log)
        if batch_points[0]:
            self.trace(*batch_points, color="green", label="batch")
        plt.xlabel("step")


class NoiseLossChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("B_simple vs loss", "B_simple vs loss: log(loss=...) and wait for an estimate", **kwargs)

    def show(self, loss: np.ndarray, b_simple: np.ndarray) -> None:
        loss, b_simple = _finite(loss, b_simple)
        self._store((loss, b_simple) if loss.size > 1 else None)

    def draw(self, loss: np.ndarray, b_simple: np.ndarray) -> None:
        log_y = _y_scale(self.plt, b_simple)
        log_x = _spread(loss)
        self.plt.xscale("log" if log_x else "linear")
        self.plt.scatter(*_points(loss, b_simple, log_y, log_x), marker="braille", color="magenta")
        self.plt.xlabel("loss (training moves left)")


class LossChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Loss vs step", "loss: call monitor.log(loss=...) to chart it", **kwargs)

    def show(self, step: np.ndarray, loss: np.ndarray) -> None:
        step, loss = _finite(step, loss)
        self._store((step, loss) if step.size > 1 else None)

    def draw(self, step: np.ndarray, loss: np.ndarray) -> None:
        log = _y_scale(self.plt, loss)
        self.trace(*_points(step, loss, log), color="yellow")
        self.plt.xlabel("step")


class GpuChart(Chart):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("GPU utilisation and memory", "GPU: no readings", **kwargs)

    def show(self, elapsed_s: np.ndarray, util: np.ndarray, mem: np.ndarray) -> None:
        """Aggregate utilisation % and memory used % over the job's GPUs against elapsed seconds."""
        lines = {"util %": _finite(elapsed_s, util), "mem %": _finite(elapsed_s, mem)}
        lines = {label: line for label, line in lines.items() if line[0].size > 1}
        self._store((lines,) if lines else None)

    def draw(self, lines: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        plt = self.plt
        plt.yscale("linear")
        scale = _time_axis(plt, np.concatenate([elapsed for elapsed, _ in lines.values()]))
        for label, (elapsed, values) in lines.items():
            self.trace((elapsed / scale).tolist(), values.tolist(), label=label)
        plt.ylim(0, 100)


class BatchSizeChart(Chart):
    """Throughput r(B), efficiency E(B) and goodput r*E against B (log axis), each scaled to its
    maximum, with the measured throughput points, the current batch and the optimum marked."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("Throughput, efficiency and goodput vs batch size",
                         "vs batch size: needs a throughput profile and a noise estimate", **kwargs)

    def show(self, recommendation: Recommendation | None, b_noise: float | None,
             points: Sequence[ThroughputPoint]) -> None:
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
        plt = self.plt
        plt.xscale("log")
        plt.yscale("linear")
        plt.plot(sizes.tolist(), throughput.tolist(), marker="braille", color="cyan", label="throughput")
        plt.plot(sizes.tolist(), efficiency.tolist(), marker="braille", color="yellow", label="efficiency")
        plt.plot(sizes.tolist(), goodput.tolist(), marker="braille", color="green", label="goodput")
        plt.scatter(measured.tolist(), measured_rates.tolist(), marker="dot", color="cyan")
        if current:
            plt.vline(current, "gray")
        plt.vline(optimal, "green")
        plt.ylim(0, 1.05)
        plt.xlabel(f"batch size (log); grey: now {current:,}, green: B* {optimal:,}" if current
                   else f"batch size (log); green: B* {optimal:,}")
