"""The bsmon Textual app: one session model, redrawn on a timer.

A :class:`~bsmon.client.Feed` ingests records on its own thread. The app never
waits for it: on a 4 Hz tick it takes one snapshot of the numbers under the
feed's lock, at most once a second while only the data moves (at once when the
state changes: the job ended, a key), and at most every 2 s (less when plotting
is expensive) copies the binned history for the charts. Both are skipped when
``feed.version`` did not change; when only the clock moved, only the header's
elapsed time is redrawn. Formatting and plotting happen after the lock is
released, and only the rows of text and charts that changed are repainted.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer

from bsmon import fmt, store, terminal
from bsmon.client import Feed
from bsmon.gpu import GpuSnapshot
from bsmon.model import SessionModel, Stats
from bsmon.stats.optimal import Recommendation
from bsmon.stats.throughput import ThroughputPoint
from bsmon.tui.screens import BranchScreen, HelpScreen, LayersScreen, WhyScreen, why_text
from bsmon.tui.widgets import (
    BatchPanel, BatchSizeChart, EventsLog, GpuChart, GpuPanel, JobHeader, LossChart, NoiseChart,
    NoiseLossChart, OptimalPanel, RanksPanel, ScalarsPanel, ThroughputChart, ThroughputPanel, Trend, branch_line,
    exit_text, job_status, short_command, unit_label,
)

MODES = ("run", "attach", "replay")
#: One redraw tick for numbers and charts, so a change costs one screen update, not two. A change
#: of state (the job ended, a message, a key) shows at the next tick.
REDRAW_INTERVAL_S = 0.25
#: When nothing has moved (no record, no change of state) for QUIET_AFTER_S, the tick slows to
#: QUIET_INTERVAL_S (the header's clock still ticks each second), and speeds up at the next change.
QUIET_AFTER_S = 5.0
QUIET_INTERVAL_S = 1.0
#: While only the data moves (steps, GPU samples), the numbers redraw at most this often, like
#: nvitop's default: with a 1 kHz job every tick had new numbers, and repainting the panels 4 times
#: a second took ~30% of a core at 200x60; once a second, half of the TUI's 5% at 1 kHz. The
#: header's clock still ticks each second.
NUMBERS_INTERVAL_S = 2.0
#: Charts redraw at most this often, and less often when drawing them is expensive (a big
#: terminal, a slow or busy CPU): they get at most CHARTS_CPU_SHARE of a core, measured over the
#: whole redraw, screen update included (at 200x60 a redraw of all six takes 40-50 ms here, so
#: with a 1 kHz job they redraw about every 8 s there, and every 2 s in smaller terminals).
CHARTS_INTERVAL_S = 2.0
CHARTS_CPU_SHARE = 0.005
#: Charts draw at most this many points per series (the history's bins, merged).
CHART_BINS = 160
#: The events line shows the newest of these warning/error events (the last EVENTS_SCANNED records).
EVENTS_KEPT = 8
EVENTS_SCANNED = 256


class JobControl(Protocol):
    """The job started by ``bsmon run`` (only in that mode)."""

    pid: int
    #: The terminal went away (SIGHUP): the view leaves at once.
    hung_up: bool

    def returncode(self) -> int | None:
        """The exit code, or None while the job runs."""

    def interrupt(self) -> None:
        """Forward SIGINT to the job."""


@dataclass(frozen=True)
class Numbers:
    """Everything one numbers redraw shows, copied from the model under the feed's lock."""

    stats: Stats
    hello: Mapping[str, Any] | None
    bye: Mapping[str, Any] | None
    elapsed_s: float
    scalars: dict[str, float]
    events: tuple[Mapping[str, Any], ...]
    gpu: GpuSnapshot | None
    recommendation: Recommendation | None
    points: tuple[ThroughputPoint, ...]
    memory_limit: str | None

    @classmethod
    def capture(cls, model: SessionModel) -> Numbers:
        recent = model.events[-EVENTS_SCANNED:]
        stats = model.stats()
        return cls(stats=stats, hello=model.hello, bye=model.bye, elapsed_s=model.elapsed_s,
                   scalars=dict(model.last_scalars),
                   events=tuple(e for e in recent if e["level"] in ("warning", "error"))[-EVENTS_KEPT:],
                   gpu=model.gpu, recommendation=model.recommendation if stats.b_opt is not None else None,
                   points=tuple(model.throughput_points()), memory_limit=model.memory_limit())


@dataclass(frozen=True)
class ChartData:
    """What the charts show, copied from the model's binned history under the feed's lock: at
    most CHART_BINS points a series, however long the run."""

    t0: float
    steps: dict[str, np.ndarray]  # History.steps columns and count, per bin
    loss: dict[str, np.ndarray]  # step, loss (summed) and count, per bin
    gpu: dict[str, np.ndarray]  # History.gpu columns (summed) and count, per bin
    rank_skew: np.ndarray

    @classmethod
    def capture(cls, model: SessionModel, final: bool) -> ChartData:
        """Under the lock. The newest step's loss only when ``final``: while the job runs, more
        of that step's scalars may come."""
        history = model.history
        return cls(t0=model.hello["t0"] if model.hello else 0.0, steps=history.steps.arrays(CHART_BINS),
                   loss=history.loss_arrays(CHART_BINS, final), gpu=history.gpu.arrays(CHART_BINS),
                   rank_skew=history.ranks.column("rank_skew"))

    def gpu_series(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seconds since t0, utilisation %, memory used %) per bin: means of the recorded GPU samples
        (the aggregate over the job's GPUs, as in the CSV)."""
        gpu, count = self.gpu, self.gpu["count"]
        with np.errstate(divide="ignore", invalid="ignore"):
            return (gpu["gpu_time"] / count - self.t0, gpu["gpu_util_pct"] / count,
                    100 * gpu["gpu_mem_used_mib"] / gpu["gpu_mem_total_mib"])


class BsmonApp(App):
    """The live (or replayed) view of one training session.

    ``feed``: where the records arrive (the app only reads its model under ``feed.lock``).
    ``mode``: "run" (the app's job is ``job``; q detaches, or with ``quit_ends_job`` (``bsmon
    demo``, bsmon's own job) interrupts the job and quits; ctrl+c interrupts the job),
    "attach" (q and ctrl+c detach) or "replay" (q and ctrl+c quit). GPU readings come from the model (an attached
    monitor records NVML samples into it; replay reads them back). ``export``: writes the CSV and returns its
    path (called on a worker thread; an OSError is shown to the user).
    """

    CSS_PATH = Path(__file__).with_name("bsmon.tcss")  # absolute: subclasses elsewhere still find it
    TITLE = "bsmon"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (150, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall"), (56, "-taller")]
    ENABLE_COMMAND_PALETTE = False
    #: One q binding per mode; the footer says what q does in this one (check_action picks it).
    BINDINGS = [
        Binding("q", "detach", "Detach"),  # the job runs on; ? and the detach message say so
        Binding("q", "end_job", "Quit, ends demo"),
        Binding("q", "leave('detach')", "Detach"),
        Binding("q", "leave('quit')", "Quit"),
        Binding("e", "export", "Export"),
        Binding("p", "pause", "Pause"),
        Binding("p", "resume", "Resume"),
        Binding("b", "branch", "Branches"),
        Binding("w", "why", "Why B*"),
        Binding("l", "layers", "Layers"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+c", "interrupt_job", "Interrupt", priority=True),
        Binding("ctrl+c", "leave", "Quit", show=False, priority=True),
    ]

    def __init__(self, feed: Feed, *, mode: str, job: JobControl | None = None,
                 export: Callable[[], Path] | None = None, quit_ends_job: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(MODES)}")
        if job is not None and mode != "run":
            raise ValueError(f"a job to control is only meaningful in mode='run', not mode={mode!r}")
        if quit_ends_job and job is None:
            raise ValueError("quit_ends_job=True needs the job to end (job=..., mode='run')")
        if feed.model.history is None:
            raise ValueError("the feed's SessionModel keeps no history (keep_history=False); "
                             "the TUI needs it for its charts: use SessionModel()")
        super().__init__()
        self.feed = feed
        self.mode = mode
        self.job = job
        self.export_csv = export
        self.quit_ends_job = quit_ends_job
        self.paused = False
        self.series: ChartData | None = None  # what the charts show now
        self._numbers_key: tuple | None = None
        self._charts_key: tuple | None = None
        self._numbers_due = 0.0  # time.monotonic() before which new data alone does not redraw the numbers
        self._charts_due = 0.0  # time.monotonic() before which the charts are not redrawn
        self._numbers: Numbers | None = None  # the last numbers drawn
        self._moved: tuple | None = None  # what _pace saw last, and when it last changed
        self._moved_at = 0.0

    def compose(self) -> ComposeResult:
        yield JobHeader(id="header")
        with VerticalScroll(id="panels"):
            with Horizontal(id="columns"):
                with Vertical(id="col-a", classes="column"):
                    yield ThroughputPanel(id="throughput-panel", classes="panel")
                    yield RanksPanel(id="ranks-panel", classes="panel")
                    yield BatchPanel(id="batch-panel", classes="panel")
                with Vertical(id="col-b", classes="column"):
                    yield OptimalPanel(id="optimal-panel", classes="panel")
                    yield GpuPanel(id="gpu-panel", classes="panel")
                    yield ScalarsPanel(id="scalars-panel", classes="panel")
        with Horizontal(id="trends"):
            yield Trend("rate", id="rate-trend", classes="trend")
            yield Trend("B_simple", log=True, id="noise-trend", classes="trend")
        with Grid(id="charts"):
            yield ThroughputChart(id="throughput-chart", classes="chart primary")
            yield NoiseChart(id="noise-chart", classes="chart primary")
            yield BatchSizeChart(id="batch-size-chart", classes="chart secondary")
            yield NoiseLossChart(id="noise-loss-chart", classes="chart")
            yield LossChart(id="loss-chart", classes="chart")
            yield GpuChart(id="gpu-chart", classes="chart")
        yield EventsLog(id="events")
        yield Footer(compact=True)  # every key fits 80 columns

    def on_mount(self) -> None:
        self._ticker, self._tick_interval = self.set_interval(REDRAW_INTERVAL_S, self._redraw), REDRAW_INTERVAL_S
        self._redraw()

    def on_resize(self) -> None:
        """The layout class (-short/-tall) decides what a panel shows: draw again at the new size."""
        self.call_after_refresh(self.refresh_numbers, force=True)

    # -- redraws -----------------------------------------------------------------------------------
    def _redraw(self) -> None:
        if self._terminal_lost():
            self.exit()  # in run mode a detach: the CLI decides what happens to the job
            return
        with self.batch_update():
            self.refresh_numbers()
            self.refresh_charts()
        self._pace()

    def _pace(self) -> None:
        """Tick at REDRAW_INTERVAL_S while anything moves, at QUIET_INTERVAL_S once it has not
        for QUIET_AFTER_S (an idle job, a finished replay: the screen then costs nearly nothing)."""
        now = time.monotonic()
        feed = self.feed
        moved = (feed.version, feed.state, feed.message, self.paused)
        if moved != self._moved:
            self._moved, self._moved_at = moved, now
        interval = REDRAW_INTERVAL_S if now - self._moved_at < QUIET_AFTER_S else QUIET_INTERVAL_S
        if interval != self._tick_interval:
            self._ticker.stop()
            self._ticker, self._tick_interval = self.set_interval(interval, self._redraw), interval

    def _terminal_lost(self) -> bool:
        """SIGHUP reached ``bsmon run``, or the terminal hung up under any view (then output is
        silenced first, so the screen's last writes cannot fail)."""
        if self.job is not None and self.job.hung_up:
            return True
        if self.is_headless or not terminal.hung_up(sys.__stdin__.fileno()):
            return False
        terminal.silence_output()
        return True

    def _live(self, returncode: int | None, bye: Mapping[str, Any] | None) -> bool:
        return self.feed.state in ("connecting", "live") and returncode is None and bye is None

    def refresh_numbers(self, *, force: bool = False) -> bool:
        """Redraw the panels if anything they show changed; True if it redrew.

        When only the clock moved (a job between steps, or idle), only the header's elapsed time
        is redrawn, from the numbers drawn last: nothing is read from the model."""
        if self.paused and not force:
            return False
        feed = self.feed
        returncode = self.job.returncode() if self.job is not None else None
        clock = int(time.time()) if self._live(returncode, feed.model.bye) else None  # elapsed ticks while live
        backlog = feed.catching_up()
        state = (feed.state, feed.message, returncode, self.paused, backlog is None)
        data = (feed.version, backlog)
        key = (state, data, clock)
        now = time.monotonic()
        last = self._numbers_key
        if not force and last is not None and key == last:
            return False
        if not force and last is not None and state == last[0] and now < self._numbers_due:
            if clock == last[2]:
                return False
            key = (state, last[1], clock)  # the clock only, the data as last drawn
        self._numbers_key = key
        if not force and self._numbers is not None and key[:2] == last[:2]:
            self._draw_header(self._numbers, returncode)
            return True
        self._numbers_due = now + NUMBERS_INTERVAL_S
        numbers = feed.read(Numbers.capture)
        self._draw_numbers(numbers, returncode)
        return True

    def _draw_header(self, numbers: Numbers, returncode: int | None) -> None:
        hello = numbers.hello or {}
        status, status_kind = job_status(self.mode, self.feed.state, numbers.bye, returncode)
        if not hello:
            elapsed = None
        elif self._live(returncode, numbers.bye):
            elapsed = time.time() - hello["t0"]  # ticks between steps while the job runs
        else:
            elapsed = numbers.elapsed_s
        error = (numbers.bye or {}).get("error")
        messages = [self.feed.message, f"job error: {error.rstrip(': ')}" if error else None]
        self.query_one(JobHeader).show(
            name=hello.get("name", "waiting for the job"), status=status, status_kind=status_kind,
            pid=hello.get("pid", self.job.pid if self.job else None), elapsed_s=elapsed,
            step=numbers.stats.step, world_size=hello.get("world_size"), paused=self.paused,
            catching_up=self.feed.catching_up(), command=short_command(hello.get("command", ())),
            message=" | ".join(m for m in messages if m) or None)

    def _draw_numbers(self, numbers: Numbers, returncode: int | None) -> None:
        self._numbers = numbers
        self._draw_header(numbers, returncode)
        self.query_one(ThroughputPanel).show(numbers.stats)
        self.query_one(RanksPanel).show(numbers.stats)
        self.query_one(BatchPanel).show(numbers.stats)
        self.query_one(OptimalPanel).show(numbers.recommendation, numbers.stats.b_opt_reason, numbers.memory_limit,
                                          numbers.stats.input_hint, fmt.data_parallel(numbers.stats),
                                          branch_line(numbers.stats))
        self.query_one(GpuPanel).show(numbers.gpu, numbers.stats.gpu_hints, live=self._live(returncode, numbers.bye))
        self.query_one(ScalarsPanel).show(numbers.scalars)
        self.query_one(EventsLog).show(numbers.events, numbers.hello.get("t0", 0.0) if numbers.hello else 0.0)

    def refresh_charts(self, *, force: bool = False) -> bool:
        """Add the new history rows to the charts and redraw those whose data changed.

        After a redraw the next one waits until the charts have cost at most CHARTS_CPU_SHARE of
        the time. The cost is measured over the whole redraw: this thread's CPU from here until the
        screen has been updated (which includes a numbers redraw of the same tick: it errs high).
        """
        now = time.monotonic()
        feed = self.feed
        final = feed.state not in ("connecting", "live")
        ended = self._charts_key is not None and final != self._charts_key[1]  # shown at once
        if (self.paused or (now < self._charts_due and not ended)) and not force:
            return False
        key = (feed.version, final)
        if key == self._charts_key and not force:
            return False
        started = time.thread_time()
        self._charts_key = key
        self.series = series = feed.read(lambda model: ChartData.capture(model, final))
        if self._numbers is not None:  # the advice, from the numbers drawn just before
            rec = self._numbers.recommendation
            # the efficiency curve must use the B_noise the advice used (B_pre, or calibrated), not B_simple
            self.query_one(BatchSizeChart).show(rec, rec.b_noise if rec is not None else None,
                                                self._numbers.points)
        self.query_one(GpuChart).show(*series.gpu_series())
        self.query_one(RanksPanel).show_history(series.rank_skew)
        self._draw_run_charts(series)
        self._charts_due = now + CHARTS_INTERVAL_S
        self.call_after_refresh(self._charts_drawn, now, started)
        return True

    def _charts_drawn(self, now: float, started: float) -> None:
        """The screen shows the charts drawn at ``now``: wait for the next redraw in proportion
        to what this one cost."""
        cost = time.thread_time() - started
        self._charts_due = max(self._charts_due, now + cost / CHARTS_CPU_SHARE)

    def _draw_run_charts(self, series: ChartData) -> None:
        steps, loss = series.steps, series.loss
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_loss = loss["loss"] / loss["count"]
            rate = steps["batch_size"] / steps["step_time_s"]
            batch = steps["batch_size"] / steps["count"]
        elapsed = steps["time"] - series.t0
        b_at_loss = (np.interp(loss["step"], steps["step"], steps["b_simple"], left=np.nan)
                     if len(steps["step"]) else np.full_like(mean_loss, np.nan))
        unit = self.feed.model.unit
        self.query_one(ThroughputChart).show(elapsed, rate, unit)
        self.query_one(NoiseChart).show(steps["step"], steps["b_simple"], steps["b_simple_low"],
                                        steps["b_simple_high"], batch)
        self.query_one(NoiseLossChart).show(mean_loss, b_at_loss)
        self.query_one(LossChart).show(loss["step"], mean_loss)
        self.query_one("#rate-trend", Trend).show(rate, f"{unit_label(unit)}/s")
        self.query_one("#noise-trend", Trend).show(steps["b_simple"])

    # -- actions -----------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "detach":
            return self.mode == "run" and not self.quit_ends_job
        if action == "end_job":
            return self.quit_ends_job
        if action == "interrupt_job":
            return self.job is not None
        if action == "leave":
            if parameters == ("detach",):
                return self.mode == "attach"
            if parameters == ("quit",):
                return self.mode == "replay"
            return self.mode != "run"  # ctrl+c: leaves an attached or replayed session
        if action == "pause":
            return not self.paused
        if action == "resume":
            return self.paused
        if action == "export":
            return self.export_csv is not None
        return True

    def action_detach(self) -> None:
        """Leave the job running; the CLI says where its output goes."""
        self.exit()

    def action_end_job(self) -> None:
        """bsmon's own job (the demo): interrupt it and quit; the CLI waits for it to end."""
        self.job.interrupt()
        self.exit()

    def action_leave(self, how: str = "quit") -> None:
        self.exit()

    def action_pause(self) -> None:
        self._set_paused(True)

    def action_resume(self) -> None:
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.refresh_bindings()
        self.refresh_numbers(force=True)
        if not paused:
            self.refresh_charts(force=True)

    def action_branch(self) -> None:
        if not isinstance(self.screen, BranchScreen):
            checks, calibration = self.feed.read(lambda model: (list(model.branch_checks),
                                                                model.stats().b_noise_calibration))
            self.push_screen(BranchScreen(checks, calibration))

    def action_why(self) -> None:
        if isinstance(self.screen, WhyScreen) or self._numbers is None:
            return
        rec, stats = self._numbers.recommendation, self._numbers.stats
        self.push_screen(WhyScreen(why_text(rec.reason if rec else stats.b_opt_reason,
                                            rec.lr_advice if rec else None, self._numbers.memory_limit)))

    def action_layers(self) -> None:
        if not isinstance(self.screen, LayersScreen):
            self.push_screen(LayersScreen(self.feed.read(lambda model: model.stats())))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.mode, self.output_log, self.quit_ends_job))

    @property
    def output_log(self) -> Path | None:
        """Where ``bsmon run`` sends the job's output while the TUI is open."""
        return self.feed.session_dir / store.OUTPUT_FILE if self.feed.session_dir else None

    def action_interrupt_job(self) -> None:
        code = self.job.returncode()
        if code is not None:
            self.notify(f"the job has already ended ({exit_text(code)}); press q to quit")
            return
        self.job.interrupt()
        self.notify(f"sent SIGINT to the job (pid {self.job.pid}); this view stays open to show how it ends",
                    title="Interrupt")

    def action_export(self) -> None:
        self.run_worker(self._export, thread=True, exclusive=True, group="export")

    def _export(self) -> None:
        """Worker thread: writing the CSV takes the feed's lock and must not stall the screen."""
        try:
            path = self.export_csv()
        except OSError as exc:
            self.call_from_thread(self.notify, f"could not write the CSV: {exc}", title="Export failed",
                                  severity="error", timeout=10, markup=False)
            return
        self.call_from_thread(self.notify, f"CSV written to {path}", title="Export", timeout=10, markup=False)
