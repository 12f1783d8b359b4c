"""Shared machinery of the overhead benchmarks: interleaved rounds, paired ratios, the table.

Method (the same for every benchmark here):

* Variants of one training loop (without bsmon, with ``bsmon.watch``, ...) share one model,
  one optimizer and one batch stream, in one process, so memory layout and allocator state
  cannot favour a variant.
* They run interleaved: every round runs each variant in turn, in an order that rotates from
  round to round; the first ``warmup_rounds`` rounds are discarded. A variant's context (e.g.
  ``watch()`` ... ``close()``) is entered and left around its turn in every round, outside the
  timed region, and each turn starts with untimed steps: STARTUP_STEPS (past the noise
  estimator's start-up, which measures its first steps whatever they cost), then ``warmup_s``.
* A turn is timed as ``chunks`` chunks of whole steps lasting at least ``chunk_s`` each; a
  chunk's figure is its mean step time (elapsed / steps). ``chunk_s`` is longer than the
  probe's flush interval, so every chunk carries a flush (encoding the records of the last
  0.25 s, waking the background thread), which a median of single steps would skip. The
  turn's figure is the median of its chunk means, which drops chunks hit by a burst of load
  from other processes on this shared machine.
* The ratio is paired: variant / baseline within the same round, which cancels load that
  changes over seconds. The point estimate is the median of those per-round ratios, the
  interval a 95% percentile bootstrap over rounds.
* Two clocks: wall time (what a job feels; the verdict uses it) and the CPU time of the whole
  process, every thread included (bsmon's background threads too). Other processes' load
  stretches wall time but barely CPU time, so when the machine is busy the CPU-time ratio is
  the steadier figure. It counts background work even when it ran on the idle core, so it
  is, if anything, pessimistic.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ContextManager

import numpy as np

from bsmon.probe.noise import WARMUP_MEASUREMENTS
from bsmon.probe.publisher import FLUSH_INTERVAL_S
import torch

BOOTSTRAP_RESAMPLES = 4000
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to measure: ``rounds`` kept rounds; per variant and round, ``chunks`` of ``chunk_s``."""

    rounds: int
    chunks: int
    chunk_s: float
    warmup_s: float
    warmup_rounds: int = 1

    def __post_init__(self) -> None:
        if self.chunk_s <= FLUSH_INTERVAL_S:
            raise ValueError(f"chunk_s={self.chunk_s} must exceed the probe's flush interval "
                             f"({FLUSH_INTERVAL_S} s), or a chunk could miss a flush")

    def describe(self) -> str:
        return (f"{self.rounds} rounds (+{self.warmup_rounds} discarded); per variant and round "
                f"{self.warmup_s:g} s warm-up, {self.chunks} x {self.chunk_s:g} s timed")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the loop; ``context()`` is entered around each of its turns."""

    name: str
    context: Callable[[], ContextManager[Any]] = contextlib.nullcontext


@dataclasses.dataclass
class Rounds:
    """Seconds per step of each variant in each kept round, on both clocks."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


@dataclasses.dataclass(frozen=True)
class Interval:
    """Median over rounds of a paired ratio, with its bootstrap interval."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the final table: a variant against the loop without bsmon."""

    case: str
    baseline_s: float
    variant_s: float
    wall: Interval
    cpu: Interval
    target: float

    @property
    def verdict(self) -> str:
        return "PASS" if self.wall.median <= self.target else "MISS"

    @property
    def conclusive(self) -> bool:
        """False when the wall-time interval straddles the target: this run cannot tell."""
        return not self.wall.low <= self.target <= self.wall.high


def parse_budget(description: str, *, quick: Budget, full: Budget) -> Budget:
    """The command line of a benchmark script: ``--quick`` or the full default."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (well under a minute); the figures are rough")
    parser.add_argument("--rounds", type=int, help="override the number of kept rounds")
    args = parser.parse_args()
    budget = quick if args.quick else full
    if args.rounds is not None:
        if args.rounds < 2:
            parser.error("--rounds needs at least 2 rounds for an interval")
        budget = dataclasses.replace(budget, rounds=args.rounds)
    return budget


@contextlib.contextmanager
def benchmark_process() -> Iterator[None]:
    """One training thread (a monitor process gets the other core) and a throw-away BSMON_HOME."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bsmon-bench-") as home:
        previous = os.environ.get("BSMON_HOME")
        os.environ["BSMON_HOME"] = home
        try:
            yield
        finally:
            if previous is None:
                del os.environ["BSMON_HOME"]
            else:
                os.environ["BSMON_HOME"] = previous


def print_environment() -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, load average {load}")


def timed_chunk(step: Callable[[], None], duration_s: float) -> tuple[float, float]:
    """Run whole steps for at least ``duration_s``; mean wall and process-CPU seconds per step."""
    steps = 0
    cpu_start = time.process_time()
    start = now = time.perf_counter()
    while now - start < duration_s:
        step()
        steps += 1
        now = time.perf_counter()
    return (now - start) / steps, (time.process_time() - cpu_start) / steps


#: Steps every turn runs before its warm-up: past the noise estimator's start-up, which measures
#: its first steps whatever they cost (a one-off in a real job, but each turn here is a new watch).
STARTUP_STEPS = WARMUP_MEASUREMENTS + 5


def run_rounds(step: Callable[[], None], variants: Sequence[Variant], budget: Budget,
               label: str = "") -> Rounds:
    """Seconds per step of every variant in every kept round (see the module docstring)."""
    rounds = Rounds(wall={v.name: [] for v in variants}, cpu={v.name: [] for v in variants})
    total = budget.warmup_rounds + budget.rounds
    for index in range(total):
        shift = index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            with variant.context():
                for _ in range(STARTUP_STEPS):
                    step()
                timed_chunk(step, budget.warmup_s)
                gc.collect()
                chunks = np.array([timed_chunk(step, budget.chunk_s) for _ in range(budget.chunks)])
            if index >= budget.warmup_rounds:
                wall, cpu = np.median(chunks, axis=0)
                rounds.wall[variant.name].append(float(wall))
                rounds.cpu[variant.name].append(float(cpu))
        print(f"\r  {label} round {index + 1}/{total}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rounds


def paired_ratio(baseline: Sequence[float], variant: Sequence[float], *, seed: int = 0) -> Interval:
    """Median over rounds of variant/baseline, and a percentile bootstrap interval over rounds."""
    base = np.asarray(baseline, dtype=float)
    other = np.asarray(variant, dtype=float)
    if base.shape != other.shape or base.size < 2:
        raise ValueError("paired_ratio needs the same number (>= 2) of rounds for both variants")
    ratios = other / base
    picks = np.random.default_rng(seed).integers(0, ratios.size, (BOOTSTRAP_RESAMPLES, ratios.size))
    medians = np.median(ratios[picks], axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return Interval(float(np.median(ratios)), float(low), float(high))


def compare(rounds: Rounds, baseline: str, variant: str, target: float, case: str | None = None) -> Row:
    """The table row of ``variant`` against ``baseline`` (variant names as in ``run_rounds``)."""
    return Row(case=case or variant,
               baseline_s=float(np.median(rounds.wall[baseline])),
               variant_s=float(np.median(rounds.wall[variant])),
               wall=paired_ratio(rounds.wall[baseline], rounds.wall[variant]),
               cpu=paired_ratio(rounds.cpu[baseline], rounds.cpu[variant]),
               target=target)


def print_table(title: str, rows: Sequence[Row]) -> None:
    """The final table: case, wall step times, both ratios with intervals, target, verdict."""
    header = ("case", "baseline ms/step", "bsmon ms/step", "ratio [95% interval]",
              "CPU-time ratio [95%]", "target", "verdict")
    cells = [header] + [
        (r.case, f"{r.baseline_s * 1e3:.2f}", f"{r.variant_s * 1e3:.2f}", str(r.wall), str(r.cpu),
         f"<= {r.target:.2f}", r.verdict + ("" if r.conclusive else " *"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("ms/step: medians over rounds, wall clock. ratio: median over rounds of the paired per-round "
          "ratio (so not the quotient of the two medians); the verdict compares it with the target. "
          "CPU-time ratio: the same on the process's CPU time, which other load moves less.")
    if not all(r.conclusive for r in rows):
        print("* the wall-time interval straddles the target: this run cannot tell PASS from MISS; "
              "run again on a quieter machine or with more --rounds")
    print(f"load average now: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


@contextlib.contextmanager
def watching(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
             watch_seconds: list[float] | None = None, close_seconds: list[float] | None = None,
             **watch_kwargs: Any) -> Iterator[Any]:
    """``bsmon.watch(model, optimizer, **watch_kwargs)`` for one turn, closed afterwards.

    The durations of ``watch()`` and ``close()`` are appended to the given lists.
    """
    import bsmon

    watch = bsmon.watch  # the first access imports bsmon.probe; keep that out of the timing
    start = time.perf_counter()
    monitor = watch(model, optimizer, **watch_kwargs)
    if watch_seconds is not None:
        watch_seconds.append(time.perf_counter() - start)
    try:
        yield monitor
    finally:
        start = time.perf_counter()
        monitor.close()
        if close_seconds is not None:
            close_seconds.append(time.perf_counter() - start)


def estimator_summary(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      step: Callable[[], None], *, steps: int = 6, **watch_kwargs: Any) -> str:
    """Which noise estimator ``watch(**watch_kwargs)`` picks on this loop, and what it covers.

    Runs ``steps`` steps under a fresh watch, waits for the background flush, reads
    ``Monitor.stats()``, and closes the watch again.
    """
    with watching(model, optimizer, **watch_kwargs) as monitor:
        for _ in range(steps):
            step()
        deadline = time.monotonic() + 5.0
        while monitor.stats().step < steps and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = monitor.stats()
    if stats.noise_estimator is None:
        return f"no noise estimator ({stats.noise_reason})"
    covered = stats.noise_covered_fraction
    coverage = "" if covered is None else f", covers {covered:.1%} of the trainable parameters"
    return f"{stats.noise_estimator} estimator{coverage}, {stats.noise_steps} of {steps} steps measured"


def median_ms(samples: Sequence[float]) -> str:
    return f"{float(np.median(samples)) * 1e3:.1f} ms"
