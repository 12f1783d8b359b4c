"""Headless output (``--headless``, ``--json``): the view of a session in a SLURM log or CI.

A log is read later, by a person scrolling or a script, so it says each thing once:

* one line a second while steps arrive, and only when the step advanced (a stalled job does
  not repeat its last step with whatever it logged since);
* before the first step, one "waiting for the first step" line, then one every
  ``QUIET_REPEAT_S`` (a ``torch.compile`` warm-up can take a minute);
* under a stall, one "no new step" line every ``QUIET_REPEAT_S``;
* once, as soon as it is known, that no GPU is visible and why (the GPU panel's reason);
* the final line once, when the stream ends.

:class:`HeadlessPrinter` decides what to print from the model and the clock and does no I/O;
:func:`follow` is the loop around it. JSON lines carry the same moments as objects with every
``Monitor.stats()`` field, a ``state`` (waiting, running, stalled, ended, lost, error) and the
the status line's ``B*`` part as ``advice``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Protocol

from bsmon import fmt
from bsmon.model import SessionModel, Stats

#: How often the feed is looked at (and the most often a line is printed).
INTERVAL_S = 1.0
#: While no step arrives (before the first one, or in a stall), one line every this long.
QUIET_REPEAT_S = 30.0
class Job(Protocol):
    #: True once a hang-up (SSH drop) detached bsmon from the job, which runs on.
    detached_by_hangup: bool

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the job to exit; True if it has."""


def batch_breakdown(s: Stats) -> str:
    """' = 4x32' (micro-batches x size), or ' = 2x32x8 ranks' under data parallelism; '' if trivial."""
    ranks = s.world_size if s.world_size and s.world_size > 1 else 1
    micro = s.micro_batches or 1
    if micro == 1 and ranks == 1:
        return ""
    size = s.batch_size // (micro * ranks)
    return f" = {micro}x{size}" + (f"x{ranks} ranks" if ranks > 1 else "")


def staleness(s: Stats) -> str | None:
    """'STALE (1,200 steps old)' when the noise estimate is stale, None when fresh."""
    if not s.noise_stale:
        return None
    return "STALE" + (f" ({s.noise_age_steps:,} steps old)" if s.noise_age_steps is not None else "")


def shown_loss(model: SessionModel, step: int) -> float | None:
    """The loss logged for ``step`` or the newest step before it: never a later step's."""
    if model.history is None:
        return model.last_scalars.get("loss")
    return model.history.loss_at(step)


def status_line(model: SessionModel, state: str) -> str:
    s = model.stats()
    unit = "tok" if s.unit == "tokens" else "samples"
    parts = [f"[{fmt.duration(model.elapsed_s):>7}] step {s.step}",
             f"{fmt.si(s.samples_per_s)} {unit}/s",
             f"step {fmt.duration(s.step_time_p50_s)} (p95 {fmt.duration(s.step_time_p95_s)})"]
    if s.mfu is not None:
        parts.append(f"{fmt.si(s.flops_per_s)}FLOP/s MFU {s.mfu:.1%}")
    if s.batch_size is not None:
        parts.append(f"B {s.batch_size}{batch_breakdown(s)}")
    fraction = s.noise_covered_fraction
    coverage = f", coverage {fraction:.0%}" if fraction is not None and fraction < 1 else ""
    if s.b_simple is not None:
        stale = staleness(s)
        parts.append(f"B_simple {fmt.band(s.b_simple, s.b_simple_low, s.b_simple_high)} "
                     f"({s.noise_estimator}{coverage}, {fmt.measured_ago(s.noise_age_steps)})"
                     + (f" {stale}" if stale else ""))
    elif s.noise_reason:
        parts.append(f"B_simple N/A{coverage}: {s.noise_reason}")
    if s.skipped_steps:
        parts.append(f"skipped {s.skipped_steps}")
    if s.step_problem and s.step_problem != s.noise_reason:
        parts.append(s.step_problem)
    parts.append(fmt.optimum(s))
    if s.input_hint:
        parts.append("input-bound?")
    loss = shown_loss(model, s.step)
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if s.dropped:
        parts.append(f"DROPPED {s.dropped}")
    if s.recording_error:
        parts.append("RECORDING FAILED")
    parts.append(state)
    return " | ".join(parts)


def stats_json(model: SessionModel, state: str) -> str:
    current = model.stats()
    stats = dataclasses.asdict(current)
    stats["noise_groups"] = {label: dataclasses.asdict(n) for label, n in current.noise_groups}
    stats.update(state=state, elapsed_s=model.elapsed_s, scalars=model.last_scalars, advice=fmt.optimum(current),
                 time=time.time())
    return json.dumps(stats, default=str)


def no_gpu_reason(model: SessionModel) -> str | None:
    """Why no GPU is visible (the GPU panel's banner), once the sampler has said so; else None."""
    gpu = model.gpu
    if gpu is None or gpu.gpus:
        return None
    return gpu.banner


@dataclasses.dataclass
class Line:
    text: str
    notice: bool = False  # a notice, not a status line: stderr under --json, so stdout stays JSON


class HeadlessPrinter:
    """What to print at each look at the session (see the module docstring); no I/O."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self._printed_step: int | None = None
        self._quiet_line_at: float | None = None  # when the last waiting/stalled line was printed
        self._gpu_checked = False
        self._done = False

    def look(self, model: SessionModel, state: str, now: float, final: bool = False) -> list[Line]:
        """The lines for this look; ``state``: running, ended, lost or error; ``final``: the stream is over.

        Called under the feed's lock (``feed.read``); ``now`` is wall-clock time (``time.time()``).
        """
        if self._done:
            return []
        lines = self._gpu_notice(model)
        step = model.stats().step
        if final:
            self._done = True
            lines.append(self._status(model, state))
        elif step and step != self._printed_step:
            self._printed_step, self._quiet_line_at = step, None
            lines.append(self._status(model, state))
        elif self._quiet_line_at is None or now - self._quiet_line_at >= QUIET_REPEAT_S:
            line = self._quiet(model, now, step)
            if line is not None:
                self._quiet_line_at = now
                lines.append(line)
        return lines

    def _gpu_notice(self, model: SessionModel) -> list[Line]:
        if self._gpu_checked or model.gpu is None:
            return []
        self._gpu_checked = True
        reason = no_gpu_reason(model)
        return [Line(f"bsmon: no GPU visible: {reason}", notice=True)] if reason else []

    def _status(self, model: SessionModel, state: str) -> Line:
        return Line(stats_json(model, state) if self.json_lines else status_line(model, state))

    def _quiet(self, model: SessionModel, now: float, step: int) -> Line | None:
        """The waiting line before the first step, the stalled line after QUIET_REPEAT_S without one."""
        if not step:
            if self.json_lines:
                return Line(stats_json(model, "waiting"))
            started = (model.hello or {}).get("t0")
            since = f" ({fmt.duration(now - started)} since the job started)" if started and now - started >= 1 else ""
            return Line(f"bsmon: waiting for the first step{since}")
        quiet_s = now - model.last_step_time if model.last_step_time is not None else 0.0
        if quiet_s < QUIET_REPEAT_S:
            return None
        if self.json_lines:
            return Line(stats_json(model, "stalled"))
        return Line(f"bsmon: no new step for {fmt.duration(quiet_s)} (last step {step:,})")


def feed_state(feed: Any) -> str:
    if feed.state in ("live", "connecting"):
        return "running"
    if feed.state == "error":
        return "error"
    return "ended" if feed.model.bye is not None else "lost"


def follow(feed: Any, json_lines: bool, job: Job | None = None) -> None:
    """Print the session until its stream ends (the final line), then wait for the job to exit."""
    printer = HeadlessPrinter(json_lines)

    def emit(final: bool) -> None:
        for line in feed.read(lambda m: printer.look(m, feed_state(feed), time.time(), final)):
            print(line.text, file=sys.stderr if line.notice and json_lines else sys.stdout, flush=True)

    while not feed.wait(timeout=INTERVAL_S):
        if job is not None and job.detached_by_hangup:
            return  # the terminal went away: the job runs on, recorded; nobody reads these lines
        emit(final=False)
    emit(final=True)
    while job is not None and not job.wait(timeout=INTERVAL_S):
        if job.detached_by_hangup:
            return
    if feed.message:
        print(f"bsmon: {feed.message}", file=sys.stderr)
