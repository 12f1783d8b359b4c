"""The session model: every number bsmon shows, derived from the records.

The live TUI, ``bsmon replay``, ``bsmon export``, headless output and
``Monitor.stats()`` all feed records into a :class:`SessionModel` and read
from it, so one record stream always gives the same numbers.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from bsmon.history import History
from bsmon.records import STEP_COLUMN_AT, STEP_COLUMNS
from bsmon.stats.branch import BranchCheck, calibrated_factor
from bsmon.stats.flops import mfu, peak_flops
from bsmon.stats.optimal import Recommendation, StableRecommendation, optimal_accumulation, optimal_batch_size
from bsmon.stats.throughput import StepSplit, ThroughputPoint, split_step_time
from bsmon.stats.noise import (
    DEFAULT_HORIZON_SAMPLES,
    MEASURE_GAP_STEPS,
    GradNormPoints,
    NoiseScale,
    NoiseScaleTracker,
    ddp_points,
    microbatch_points,
    partial_coverage_reason,
    per_example_points,
    statistical_efficiency,
    step_estimate,
)
from bsmon.stats.units import ProfileUnits, SessionUnits
from bsmon.wire import StepBlock

#: Step-time percentiles and "now" throughput use this many recent steps.
RECENT_STEPS = 200
#: "Now" throughput covers at least this much wall time (or RECENT_STEPS steps).
THROUGHPUT_WINDOW_S = 2.0
#: Live throughput points: steps skipped after a batch size change (warm-up), and the
#: steady steps a size needs before it counts as a point.
LIVE_WARMUP_STEPS = 5
LIVE_MIN_STEPS = 10
#: Step-time splits are kept for this many (samples, micro-batches) configurations, the latest.
MAX_PHASE_CONFIGS = 8
#: The optimal batch size is re-evaluated every this many steps (and when the points change),
#: when read (``stats()``); the exported rows re-evaluate it every RECOMMEND_EVERY steps until
#: there is one, then every RECOMMEND_INTERVAL_S of the job's time, so a 1 kHz job costs as
#: little as a 10 Hz one.
RECOMMEND_EVERY = 10
RECOMMEND_INTERVAL_S = 1.0
#: A rank is stalled when its step has not advanced, and lost when it has not reported at all,
#: for this long, or for this many of the ranks' median step time if that is longer.
RANK_SILENCE_S = 30.0
RANK_SILENCE_STEPS = 20
#: Mean GPU utilisation below this over the last LOW_UTIL_SAMPLES readings of a running job
#: suggests the GPU waits for its input.
LOW_GPU_UTIL_PCT = 50.0
LOW_UTIL_SAMPLES = 10
#: Steps in a row with attempts cleared before their optimizer step, before bsmon reads them as
#: zero_grad() between micro-batches. A loop with that mistake clears in every step; GradScaler
#: overflows come alone or in a burst before one step (the scale drops after each), rarely in
#: 3 steps in a row.
CLEARS_IN_A_ROW = 3
CLEARED_BETWEEN_MICRO_BATCHES = (
    "gradients are cleared between micro-batches: zero_grad() runs inside the accumulation loop, so "
    "each optimizer step uses only the micro-batch after the last clear ({n:,} {unit}, the batch shown). "
    "Call zero_grad() once per optimizer step, after optimizer.step()")
NO_PROFILE_REASON = ("no throughput profile yet: call bsmon.profile(step_fn) in the job, run "
                     "`bsmon sweep -- python script.py` and pass --profile, or change the batch size during the run")
#: Advice shared by every input-bound hint (GPU utilisation, the wait before each step's forward).
DATA_LOADER_ADVICE = "Check the data loader (num_workers, pin_memory, prefetching) before raising the batch size"
#: The one next action when nothing else gives an optimum, worded for the training library the job
#: imported (the hello's "frameworks"; None: a plain loop).
MEASURE_NOISE_ACTION = {
    "lightning": "set Trainer(accumulate_grad_batches=2) to measure the noise scale",
    "transformers": "set gradient_accumulation_steps=2 to measure the noise scale",
    None: "accumulate 2 micro-batches per optimizer step to measure the noise scale",
}
PROFILE_ACTION = {
    "lightning": "add BsmonCallback(profile=True) (bsmon.integrations.lightning) to measure micro-batch sizes",
    "transformers": "add BsmonCallback(profile=True) (bsmon.integrations.transformers) to measure micro-batch sizes",
    None: NO_PROFILE_REASON,
}


@dataclass(frozen=True)
class Stats:
    """The latest numbers of a session (``Monitor.stats()``)."""

    step: int = 0
    samples_seen: int = 0
    step_time_s: float | None = None
    step_time_p50_s: float | None = None
    step_time_p95_s: float | None = None
    samples_per_s: float | None = None
    batch_size: int | None = None
    micro_batches: int | None = None
    dropped: int = 0
    unit: str = "samples"
    noise_estimator: str | None = None
    noise_reason: str | None = None
    noise_covered_fraction: float | None = None
    b_simple: float | None = None
    b_simple_low: float | None = None
    b_simple_high: float | None = None
    grad_sq: float | None = None
    trace_sigma: float | None = None
    noise_steps: int = 0
    noise_age_steps: int | None = None  # optimizer steps since the estimate last took in a measured step
    noise_stale: bool = False  # no measured step for more than MEASURE_GAP_STEPS: the estimator stopped
    noise_weak: bool = False
    negative_grad_sq_steps: int = 0
    efficiency: float | None = None
    skipped_steps: int = 0  # iterations abandoned without an optimizer step (GradScaler overflow, exception)
    step_problem: str | None = None  # a training-loop mistake that changes what a step is
    noise_groups: tuple[tuple[str, NoiseScale], ...] = ()
    #: The micro-batch or per-example estimator's per-module breakdown: (label, share of the trainable parameters,
    #: NoiseScale) per row; its grad_sq and trace_sigma add up to the whole model's.
    noise_modules: tuple[tuple[str, float, NoiseScale], ...] = ()
    # B_pre: the noise scale of the gradient rescaled by an Adam-family optimizer's 1/(sqrt(v_hat)+eps);
    # None with b_simple_precond_reason where the optimizer or the estimator gives none.
    b_simple_precond: float | None = None
    b_simple_precond_low: float | None = None
    b_simple_precond_high: float | None = None
    b_simple_precond_reason: str | None = None
    #: Which noise scale the advice (b_opt, its speedup, the LR advice) uses: "sgd" (B_simple) or
    #: "optimizer" (B_pre), and why.
    noise_geometry: str = "sgd"
    noise_geometry_reason: str | None = None
    optimizer_geometry: bool = False  # the optimizer keeps a per-element second moment (B_pre applies)
    recording_error: str | None = None
    gpu_hints: tuple[str, ...] = ()
    b_opt: int | None = None
    b_opt_speedup: float | None = None
    b_opt_speedup_low: float | None = None
    b_opt_speedup_high: float | None = None
    b_opt_reason: str | None = None
    lr_advice: str | None = None
    lr_factor_sgd: float | None = None
    lr_factor_adam: float | None = None
    b_opt_micro_batch: int | None = None
    b_opt_accumulation: int | None = None
    #: Where b_opt comes from: "profile" (a throughput sweep), "live" (batch sizes the run changed
    #: through) or "in-run" (the step-time split: accumulation at the job's micro-batch size).
    b_opt_source: str | None = None
    step_split: StepSplit | None = None  # the job's step time, alpha + k*beta_mb, at its micro-batch
    input_hint: str | None = None  # the wait before each step's first forward rivals a micro-batch
    # The latest branch check (bsmon.branch_check), and the factor B_simple is divided by for the
    # advice when that check calibrates it (None: the advice uses B_simple as it is).
    branch_check: BranchCheck | None = None
    b_noise_calibration: float | None = None
    # Multi-process jobs. batch_size, samples_per_s and samples_seen above are global: rank 0's
    # local figures times the data-parallel size (equal shards assumed; uneven_rank_batches
    # says when the ranks' last local batches differ).
    world_size: int = 1
    local_batch_size: int | None = None
    rank_step_time_s: tuple[float | None, ...] = ()  # median step time of each rank, by rank
    rank_busy_s: tuple[float | None, ...] = ()  # median time until each rank's gradients were ready
    slowest_rank: int | None = None
    slowest_rank_step_time_s: float | None = None
    slowest_rank_lag_steps: int | None = None
    rank_skew: float | None = None  # slowest rank's busy (else step) time over the fastest's
    ranks_stalled: tuple[int, ...] = ()  # reporting, but no new step for RANK_SILENCE_*
    ranks_lost: tuple[int, ...] = ()  # no report at all for RANK_SILENCE_*
    uneven_rank_batches: bool = False
    # Achieved FLOP/s and MFU (bsmon.stats.flops): the step's FLOPs per sample (counted on one step
    # per batch size, or given) times samples/s; None with a reason where they cannot be known.
    flops_per_sample: float | None = None
    flops_per_s: float | None = None
    flops_reason: str | None = None
    mfu: float | None = None
    mfu_reason: str | None = None
    peak_flops: float | None = None  # of all the job's GPUs together
    peak_name: str | None = None  # which peak: '8 x H100/H200 SXM bf16 peak'


@dataclass(frozen=True)
class RankSummary:
    """What one ``ranks`` record says about the job's ranks (see :func:`summarise_ranks`)."""

    world_size: int
    step_time_s: tuple[float | None, ...]
    busy_s: tuple[float | None, ...]
    slowest: int | None
    slowest_step_time_s: float | None
    slowest_lag_steps: int | None
    skew: float | None
    stalled: tuple[int, ...]
    lost: tuple[int, ...]
    uneven_batches: bool


def _runs(*columns: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of rows equal in every one of ``columns`` (of one length)."""
    if not len(columns[0]):
        return []
    starts = np.flatnonzero(np.logical_or.reduce([c[1:] != c[:-1] for c in columns])) + 1
    return list(zip([0, *starts.tolist()], [*starts.tolist(), len(columns[0])]))


def _column(values: list) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def summarise_ranks(record: dict[str, Any]) -> RankSummary:
    """The straggler, the silent ranks and the skew, from one ``ranks`` record.

    DDP ranks step in lockstep (each waits in the all-reduce for the last), so their step
    times agree; the straggler shows in ``busy``, the time until a rank's gradients were
    ready. The slowest rank is the one with the longest busy time (step time where a rank
    has none), among ranks not lost; skew is its time over the fastest rank's.
    """
    dt, busy, step = _column(record["dt"]), _column(record["busy"]), _column(record["step"])
    since_step, since_report = _column(record["since_step"]), _column(record["since_report"])
    median_dt = float(np.median(dt[np.isfinite(dt)])) if np.isfinite(dt).any() else 0.0
    silence = max(RANK_SILENCE_S, RANK_SILENCE_STEPS * median_dt)
    lost = since_report > silence
    stalled = ~lost & (since_step > silence)
    alive = ~lost
    metric = busy if np.isfinite(busy[alive]).all() and alive.any() else dt
    candidates = np.where(alive & np.isfinite(metric))[0]
    slowest = fastest = None
    if len(candidates):
        slowest = int(candidates[np.argmax(metric[candidates])])
        fastest = float(metric[candidates].min())
    steps = step[np.isfinite(step)]
    batches = {n for n in record["n"] if n is not None}
    return RankSummary(
        world_size=record["world_size"],
        step_time_s=tuple(record["dt"]),
        busy_s=tuple(record["busy"]),
        slowest=slowest,
        slowest_step_time_s=None if slowest is None else record["dt"][slowest],
        slowest_lag_steps=(int(steps.max() - step[slowest]) if slowest is not None and np.isfinite(step[slowest])
                           else None),
        skew=float(metric[slowest] / fastest) if slowest is not None and fastest > 0 else None,
        stalled=tuple(int(r) for r in np.where(stalled)[0]),
        lost=tuple(int(r) for r in np.where(lost)[0]),
        uneven_batches=len(batches) > 1,
    )


def nearest_sample(sample_times: np.ndarray, times: np.ndarray, max_gap_s: float) -> np.ndarray:
    """Index of the sample (in time order) nearest to each of ``times``; -1 if none within ``max_gap_s``."""
    if not len(sample_times):
        return np.full(len(times), -1)
    samples = np.asarray(sample_times, dtype=float)
    right = np.clip(np.searchsorted(samples, times), 0, len(samples) - 1)
    left = np.clip(right - 1, 0, len(samples) - 1)
    nearest = np.where(np.abs(samples[left] - times) <= np.abs(samples[right] - times), left, right)
    return np.where(np.abs(samples[nearest] - times) <= max_gap_s, nearest, -1)


@dataclass
class EstimatorHistory:
    """One estimator's averages. Kept while the job uses another estimator, and resumed when it
    returns: a flip (a single-pass step in an accumulating job) discards nothing."""

    total: NoiseScaleTracker
    groups: list[NoiseScaleTracker]
    precond: NoiseScaleTracker  # B_pre, in the optimizer's geometry
    modules: list[NoiseScaleTracker]  # per module row (the micro-batch and per-example breakdowns)
    samples_at_update: float  # the session's samples trained when it last took a step (or began)
    measured_step: int | None = None  # the last step it took in


def _usable(noise: NoiseScale) -> bool:
    """A noise scale the advice can use: measured, and positive."""
    return noise.b_simple is not None and noise.b_simple > 0


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


#: The figures of a step row (bsmon.records.STEP_COLUMNS) are those after step_time_s.
_FIRST_FIGURE = STEP_COLUMN_AT["step_time_s"] + 1
_FIGURE_COLUMNS = STEP_COLUMNS[_FIRST_FIGURE:]


class SessionModel:
    """Ingests records in order and keeps the derived state."""

    def __init__(self, *, keep_history: bool = True, horizon_samples: float | None = None) -> None:
        self.hello: dict[str, Any] | None = None
        self.bye: dict[str, Any] | None = None
        self.estimator: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self.profile: dict[str, Any] | None = None
        self.profile_points: list[dict[str, Any]] = []
        self.history: History | None = History() if keep_history else None
        #: Called with the rows of the steps as they are ingested (a table, a row per step and a
        #: column per bsmon.records.STEP_COLUMNS; see _rows): the streaming export's hook.
        #: Rows are made only when history or this wants them.
        self.on_step_rows: Callable[[np.ndarray], None] | None = None
        #: The rows' figures (by column name) until something they depend on changes
        self._figures: dict[str, float] | None = None
        self._advice_b: float | None = None
        self._horizon_override = horizon_samples
        self._horizon = horizon_samples or DEFAULT_HORIZON_SAMPLES
        self._units = SessionUnits()
        self._histories: dict[str, EstimatorHistory] = {}  # by estimator name
        self._last_estimator: str | None = None  # of the last noise payload
        self._recent = collections.deque(maxlen=RECENT_STEPS)  # (t, dt, n)
        self._step = 0
        self._samples = 0  # samples trained, all ranks
        self._skipped_steps = 0
        # cleared chunks of each of the last steps in a row that had some (at most CLEARS_IN_A_ROW)
        self._clear_run: collections.deque[int] = collections.deque(maxlen=CLEARS_IN_A_ROW)
        self._clearing_micro_batches = False  # gradients cleared between the micro-batches of a step
        self._last: dict[str, Any] | None = None
        self._dropped = 0
        self._recording_error: str | None = None
        self.last_scalars: dict[str, float] = {}
        self.gpu = None  # the latest bsmon.gpu.GpuSnapshot
        self.ranks: RankSummary | None = None  # from the latest ranks record
        self._world_size = 1
        self._live_times: dict[int, collections.deque] = {}  # batch size -> recent steady step times
        self._batch_size: int | None = None
        self._steps_at_size = 0
        self._points_version = 0
        self._phase_config: tuple[int, int] | None = None  # (samples, micro-batches) of the latest step
        self._phase_steps = 0  # steps in a row at _phase_config, warm-up included
        #: (samples, micro-batches) -> recent (measured, marks) of steady steps, most recently used last
        self._phases: dict[tuple[int, int], collections.deque] = {}
        self._recommended_version = -1
        self._recommend_due = False
        self._recommended_at = -math.inf  # the job's time of the last step row's re-evaluation
        self._stable = StableRecommendation()
        self.recommendation: Recommendation | None = None
        self._recommend_reason: str | None = NO_PROFILE_REASON
        self._recommend_source: str | None = None
        self.branch_checks: list[BranchCheck] = []
        self._calibration: float | None = None
        self._flops_per_sample: dict[int, float] = {}  # samples per step on a rank -> FLOPs per sample
        self._flops_dtype: tuple[str | None, bool] = (None, False)  # of the last count: dtype, TF32 allowed
        self._flops_reason: str | None = None  # why there is no count

    # -- ingestion ------------------------------------------------------------
    @property
    def steps_done(self) -> int:
        """The last step ingested (0 before the first)."""
        return self._step

    def ingest(self, record: dict[str, Any] | StepBlock) -> None:
        """One record, or a block of plain steps (``wire.FrameReader(blocks=True)``)."""
        if isinstance(record, StepBlock):
            self._on_steps(record)
            return
        handler = getattr(self, f"_on_{record['k']}", None)
        if handler is not None:
            handler(record)

    def ingest_all(self, records: list[dict[str, Any] | StepBlock]) -> None:
        for record in records:
            self.ingest(record)

    def _on_hello(self, record: dict[str, Any]) -> None:
        self.hello = record
        self._figures = None
        self._units = SessionUnits.from_hello(record)
        if self._horizon_override is None and record.get("horizon_samples"):
            self._horizon = float(record["horizon_samples"])
        self._world_size = int(record.get("world_size") or 1)
        self._record_flops(1, {"total": record.get("flops_per_sample"), "dtype": record.get("flops_dtype"),
                               "tf32": record.get("flops_tf32"), "reason": record.get("flops_reason")})
        self._histories = {}

    def _on_bye(self, record: dict[str, Any]) -> None:
        self.bye = record

    def _on_event(self, record: dict[str, Any]) -> None:
        self.events.append(record)
        if record["level"] == "error" and "recording" in record["msg"]:
            self._recording_error = record["msg"]

    def _on_estimator(self, record: dict[str, Any]) -> None:
        fraction = record.get("covered_fraction")
        if record.get("name") == "per_example" and fraction is not None and fraction < 1:
            # Recorded before bsmon refused partial coverage in the job: withheld here the same way.
            record = {**record, "name": None, "reason": partial_coverage_reason(fraction, record.get("uncovered"))}
        self.estimator = record
        self._figures = None

    def _on_profile_point(self, record: dict[str, Any]) -> None:
        self.profile_points.append(record)
        self._points_version += 1

    def _on_profile(self, record: dict[str, Any]) -> None:
        from bsmon.profiling import Profile

        self.profile = Profile.from_dict(record["profile"])
        self._points_version += 1

    def _record_flops(self, samples: int, flops: dict[str, Any]) -> None:
        """A step's (or the hello's per-sample) FLOP count, or why there is none."""
        if flops.get("total") is None:
            self._flops_reason = flops.get("reason") or self._flops_reason
            return
        self._flops_per_sample[samples] = flops["total"] / samples
        self._flops_dtype = (flops.get("dtype"), bool(flops.get("tf32")))

    def _on_gpu(self, record: dict[str, Any]) -> None:
        from bsmon.gpu import GpuSnapshot  # monitor side only: the job never receives gpu records

        self.gpu = GpuSnapshot.from_record(record["snapshot"])
        if self.history is not None and self.gpu.gpus:
            h = self.history
            if h.last_gpu_time is not None and self.gpu.time <= h.last_gpu_time:
                return  # two monitors recorded the same moment; keep one
            h.last_gpu_time = self.gpu.time
            fields = self.gpu.csv_fields()
            h.gpu.append([self.gpu.time if name == "gpu_time" else _nan(fields.get(name)) for name in h.gpu.columns])
            h.recent_gpu_util.append(_nan(fields.get("gpu_util_pct")))

    def _on_ranks(self, record: dict[str, Any]) -> None:
        self.ranks = summary = summarise_ranks(record)
        if self.history is not None:
            self.history.ranks.append((record["t"], summary.world_size, _nan(summary.slowest),
                                       _nan(summary.slowest_step_time_s), _nan(summary.slowest_lag_steps),
                                       _nan(summary.skew)))

    def _on_branch_check(self, record: dict[str, Any]) -> None:
        self.branch_checks.append(BranchCheck.from_record(record))
        self._figures = None
        self._recommend_due = True

    def _on_scalars(self, record: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in record["values"].items()}
        self.last_scalars.update(values)
        if self.history is not None:
            self.history.add_scalars(record["step"], values)

    def _on_step(self, record: dict[str, Any]) -> None:
        samples = self._units.global_samples(record["n"])  # rank 0's share times the shards
        self._step = record["step"]
        self._samples += samples
        self._dropped = record["dropped"]
        self._last = record
        counted = "flops" in record
        if counted:  # that step ran several times slower: its FLOPs, not its time
            self._record_flops(record["n"], record["flops"])
        else:
            self._recent.append((record["t"], record["dt"], samples))
        self._count_skipped(record.get("skipped") or [])
        if "noise" in record:
            # The probe measures only some steps (its cost budget). The averaging horizon is in
            # samples trained, so a measured step carries the samples since its estimator's last.
            self._update_noise(record["noise"], record["step"], self._samples, self._samples - samples)
        if not counted:  # nor its time or phases in the throughput and the in-run step-time fit
            self._track_live_throughput(record)
            self._track_phases(record)
        if record["step"] % RECOMMEND_EVERY == 0 or self._points_version != self._recommended_version:
            self._recommend_due = True
        if self.history is not None or self.on_step_rows is not None:
            if self.on_step_rows is not None and self._exported_advice_due(record["step"], record["t"]):
                self._refresh_exported_advice(record["t"])
            self._add_rows(self._rows(*(np.array([record[name]]) for name in ("step", "t", "n", "mb", "dt")),
                                      [(0, self._row_figures())]))

    def _on_steps(self, block: StepBlock) -> None:
        """A block of steps (plain, and measured ones carrying noise norms): the state that
        :meth:`_on_step` on each would leave, computed on the block's columns, and the block's
        rows, each made with the figures as of its step."""
        if self.branch_checks:  # a calibrated B_noise decays step by step: each row its own
            for record in block.records():
                self._on_step(record)
            return
        samples = self._units.global_samples(block.n)
        after = self._samples + np.cumsum(samples)  # samples trained up to each step, that one included
        rows = self.history is not None or self.on_step_rows is not None
        figures = [(0, self._row_figures())] if rows else []  # (first row, figures): each holds until the next
        advanced = 0  # the block's rows the state (_advance) covers
        deferred = None  # the last row the advice was re-evaluated at with the state behind it
        measured = collections.deque(block.measured)
        due = self._next_advice_due(block, 0)
        while measured or due is not None:
            if measured and (due is None or measured[0][0] <= due):
                row, noise = measured.popleft()
                self._update_noise(noise, int(block.step[row]), float(after[row]), float(after[row] - samples[row]))
                at = row
            else:
                # The exported advice, with the state up to that step. While there is neither a
                # noise scale nor advice, none can come whatever the step times: the state need
                # not catch up for it (only the reason given, which no row shows, is re-worded).
                if self._recommend_reason is not None and not _usable(self._advice_noise()):
                    self._recommend_due, deferred = True, due
                else:
                    self._catch_up(block, advanced, due + 1, deferred)
                    advanced, deferred = due + 1, None
                self._refresh_exported_advice(float(block.t[due]))
                at, due = due, self._next_advice_due(block, due + 1)
            if rows:
                self._figures_from(at, figures)
        self._catch_up(block, advanced, len(block), deferred)
        if rows:
            self._add_rows(self._rows(block.step, block.t, block.n, block.mb, block.dt, figures))

    def _catch_up(self, block: StepBlock, start: int, end: int, deferred: int | None) -> None:
        """The state over the block's rows start:end; the advice's bookkeeping as a re-evaluation
        at row ``deferred`` (if one, with the state behind) would have left it."""
        if deferred is not None:
            self._advance(block[start:deferred + 1])
            self._recommend_due, self._recommended_version = False, self._points_version
            start = deferred + 1
        if start < end:
            self._advance(block[start:end] if start or end < len(block) else block)

    def _next_advice_due(self, block: StepBlock, start: int) -> int | None:
        """The block's next row from ``start`` at which the exported rows re-evaluate the advice
        (None: none, or no export)."""
        if self.on_step_rows is None or start >= len(block):
            return None
        due = np.flatnonzero(self._exported_advice_due(block.step[start:], block.t[start:]))
        return start + int(due[0]) if len(due) else None

    def _figures_from(self, row: int, figures: list[tuple[int, dict[str, float]]]) -> None:
        """The figures as they stand now hold from ``row`` on."""
        if figures[-1][0] == row:
            figures.pop()
        figures.append((row, self._row_figures()))

    def _add_rows(self, table: np.ndarray) -> None:
        if self.history is not None:
            self.history.add_steps(table)
        if self.on_step_rows is not None:
            self.on_step_rows(table)

    def _advance(self, block: StepBlock) -> None:
        """The state _on_step keeps, after the block's plain steps."""
        samples = self._units.global_samples(block.n)  # rank 0's share times the shards
        self._step = int(block.step[-1])
        self._samples += samples.sum().item()
        self._dropped = int(block.dropped[-1])
        self._last = block.last()
        recent = slice(-RECENT_STEPS, None)
        self._recent.extend(zip(block.t[recent].tolist(), block.dt[recent].tolist(), samples[recent].tolist()))
        self._clear_run.clear()  # nothing abandoned (see _count_skipped)
        self._clearing_micro_batches = False
        self._track_live_throughput_of(block)
        self._track_phases_of(block)
        if (block.step % RECOMMEND_EVERY == 0).any() or self._points_version != self._recommended_version:
            self._recommend_due = True

    def _track_live_throughput_of(self, block: StepBlock) -> None:
        """_track_live_throughput over a block, a run of equal sizes at a time."""
        timed = (block.n > 0) & (block.dt > 0)
        sizes, times = block.n[timed], block.dt[timed]
        for start, end in _runs(sizes):
            size = int(sizes[start])
            if size != self._batch_size:
                self._batch_size, self._steps_at_size = size, 0
            first = start + max(0, LIVE_WARMUP_STEPS - self._steps_at_size)  # past the warm-up
            self._steps_at_size += end - start
            if first < end:
                kept = self._live_times.setdefault(size, collections.deque(maxlen=RECENT_STEPS))
                before = len(kept)
                kept.extend(times[max(first, end - RECENT_STEPS):end].tolist())
                if before < LIVE_MIN_STEPS <= before + end - first:
                    self._points_version += 1  # a new size became a point

    def _track_phases_of(self, block: StepBlock) -> None:
        """_track_phases over a block, a run of one configuration at a time."""
        for start, end in _runs(block.n, block.mb):
            config = (int(block.n[start]), int(block.mb[start]))
            if config != self._phase_config:
                self._phase_config, self._phase_steps = config, 0
            first = start + max(0, LIVE_WARMUP_STEPS - self._phase_steps)
            self._phase_steps += end - start
            timed = np.flatnonzero(block.has_ph[first:end]) + first if first < end else ()
            if not len(timed):
                continue
            rows = self._phases.pop(config, None) or collections.deque(maxlen=RECENT_STEPS)
            self._phases[config] = rows  # most recently used last
            if len(self._phases) > MAX_PHASE_CONFIGS:
                del self._phases[next(iter(self._phases))]
            if len(rows) < LIVE_MIN_STEPS:
                self._recommend_due = True  # the timing progress, then the first split, show at once
            kept = timed[-RECENT_STEPS:]
            measured = np.isin(kept, [row for row, _ in block.measured]) if block.measured else np.zeros(len(kept), bool)
            rows.extend(zip(measured.tolist(), block.ph[kept].tolist()))  # (measured by the noise probe, marks)

    def _count_skipped(self, skipped: list[dict[str, Any]]) -> None:
        """Count iterations abandoned before this step (the probe's ``skipped`` list).

        A chunk whose gradients were cleared without an optimizer step is a skipped step (a
        GradScaler overflow, a retry after an exception), unless CLEARS_IN_A_ROW steps in a row
        had such chunks: a loop that clears in every step calls zero_grad() between its micro-batches.
        """
        if not skipped and not self._clear_run:  # the common step: nothing abandoned, none before
            self._clearing_micro_batches = False
            return
        cleared = sum(chunk.get("why") == "cleared" for chunk in skipped)
        if cleared:
            self._clear_run.append(cleared)
        else:
            self._clear_run.clear()
        between = len(self._clear_run) == CLEARS_IN_A_ROW
        if between and not self._clearing_micro_batches:
            # the steps before in this run were micro-batches too, not skipped steps
            self._skipped_steps -= sum(self._clear_run) - cleared
        self._clearing_micro_batches = between
        self._skipped_steps += len(skipped) - (cleared if between else 0)

    def _track_live_throughput(self, record: dict[str, Any]) -> None:
        """Steady-state step time per batch size (samples per optimizer step), after a warm-up
        at each new size. This is the job's own r(B), in its configuration (accumulation included)."""
        size = record["n"]  # rank 0's samples: converted to the session's unit by throughput_points
        if size <= 0 or record["dt"] <= 0:
            return
        if size != self._batch_size:
            self._batch_size, self._steps_at_size = size, 0
        self._steps_at_size += 1
        if self._steps_at_size <= LIVE_WARMUP_STEPS:
            return
        times = self._live_times.setdefault(size, collections.deque(maxlen=RECENT_STEPS))
        times.append(record["dt"])
        if len(times) == LIVE_MIN_STEPS:
            self._points_version += 1  # a new size became a point

    def _track_phases(self, record: dict[str, Any]) -> None:
        """The phase marks of steady steps per configuration (after LIVE_WARMUP_STEPS at it).

        Kept per configuration, so a one-off step of another size (an epoch's short last batch)
        neither erases nor pollutes the split of the usual one.
        """
        config = (record["n"], record["mb"])
        if config != self._phase_config:
            self._phase_config, self._phase_steps = config, 0
        self._phase_steps += 1
        if "ph" not in record or "skipped" in record or self._phase_steps <= LIVE_WARMUP_STEPS:
            return  # (a step after a skipped attempt also timed the attempt's forwards)
        rows = self._phases.pop(config, None) or collections.deque(maxlen=RECENT_STEPS)
        self._phases[config] = rows  # most recently used last
        if len(self._phases) > MAX_PHASE_CONFIGS:
            del self._phases[next(iter(self._phases))]
        rows.append(("noise" in record, record["ph"]))
        if len(rows) <= LIVE_MIN_STEPS:
            self._recommend_due = True  # the timing progress, then the first split, show at once

    def step_split(self) -> StepSplit | None:
        """The job's step time split into per-step and per-micro-batch parts, once LIVE_MIN_STEPS are timed.

        Steps the noise probe did not measure are used when there are enough of them, so its own
        cost stays out; a job whose measurement is cheap enough to run every step has only measured
        steps, and their times include that cost (at most the noise budget, 1% by default).
        """
        for (samples, micro_batches), timed in reversed(self._phases.items()):  # the latest first
            if samples <= 0 or samples % micro_batches or len(timed) < LIVE_MIN_STEPS:
                continue  # unequal micro-batches have no single size to accumulate
            rows = [marks for measured, marks in timed if not measured]
            if len(rows) < LIVE_MIN_STEPS:
                rows = [marks for _, marks in timed]
            micro = int(self._units.from_rank_samples(samples // micro_batches))
            try:
                return split_step_time(rows, micro, micro_batches)
            except ValueError:
                continue
        return None

    def input_hint(self, split: StepSplit | None = None) -> str | None:
        """Says so when the wait before each step's first forward (data loading) rivals a micro-batch."""
        split = split or self.step_split()
        if split is None or not split.input_bound:
            return None
        return (f"input-bound? {split.before_forward_s * 1e3:.3g} ms before each step's first forward vs "
                f"{split.beta_mb_s * 1e3:.3g} ms per micro-batch. {DATA_LOADER_ADVICE}")

    def _framework(self) -> str | None:
        names = (self.hello or {}).get("frameworks") or ()
        if "lightning" in names or "pytorch_lightning" in names:
            return "lightning"
        return "transformers" if "transformers" in names else None

    def next_action(self) -> str:
        """Why there is no optimum yet, and the single most useful thing to do about it, in one line."""
        noise = self.noise()
        estimator = self.estimator or {}
        advice = self._advice_noise()
        if noise.b_simple is not None and noise.b_simple > 0 and (advice.b_simple is None or advice.b_simple <= 0):
            return f"the advice follows B_pre (the optimizer's geometry), which is not available: {self.precond_reason()}"
        if noise.b_simple is None or noise.b_simple <= 0:
            if self.estimator is not None and estimator.get("name") is None:
                switched_off = "noise_mode" in (self.hello or {}) and self.hello["noise_mode"] is None
                if self._last is not None and self._last["mb"] == 1 and not switched_off:
                    return MEASURE_NOISE_ACTION[self._framework()]
                return f"no noise scale: {estimator.get('reason')}"
            return f"needs the noise scale, which is not available yet: {noise.reason}"
        samples, micro_batches = self._phase_config or (0, 1)
        timed = len(self._phases.get(self._phase_config, ()))
        if "ph" in (self._last or {}) and samples % micro_batches == 0 and timed < LIVE_MIN_STEPS:
            return f"timing this job's steps for the in-run optimum ({timed}/{LIVE_MIN_STEPS} steps)"
        return PROFILE_ACTION[self._framework()]

    def memory_limit(self) -> str | None:
        """The batch-size memory limit in words (session unit, whole job): known from the profile,
        or only what was measured."""
        if self.profile is not None and self.profile.memory_limit_batch is not None:
            units = self.profile.units
            text = f"memory: fits up to {self._profile_size(self.profile.memory_limit_batch, units):,}"
            if self.profile.oom_batch is not None:
                text += f" (out of memory at {self._profile_size(self.profile.oom_batch, units):,})"
            return text + self._per_rank_note()
        sizes = [p.batch_size for p in self.throughput_points()]
        if sizes:
            return f"memory limit unknown: the largest size measured is {max(sizes):,}" + self._per_rank_note()
        return None

    def _per_rank_note(self) -> str:
        ranks = self._units.data_parallel
        return f" {self._units.unit} over all {ranks} ranks" if ranks > 1 else ""

    def _profile_size(self, size: float, units: ProfileUnits) -> int:
        return int(round(self._units.from_profile(size, units)))

    def memory_per_sample_bytes(self) -> float | None:
        """Peak memory per sample of one rank: the slope of the profile's peak memory against its sizes."""
        if self.profile is None:
            return None
        units = self.profile.units
        points = [(units.per_rank_samples(p.batch_size), p.peak_memory_bytes) for p in self.profile.points
                  if p.peak_memory_bytes is not None]
        if len({size for size, _ in points}) < 2:
            return None
        sizes, memory = np.array(points, dtype=float).T
        slope = float(np.polyfit(sizes, memory, 1)[0])
        return slope if slope > 0 else None

    def gpu_hints(self) -> tuple[str, ...]:
        """What the GPU readings say about the batch: memory headroom, and a GPU waiting for input."""
        if self.gpu is None or not self.gpu.gpus:
            return ()
        hints = []
        per_sample = self.memory_per_sample_bytes()
        free_mib = [g.mem_total_mib - g.mem_used_mib for g in self.gpu.gpus
                    if g.mem_total_mib is not None and g.mem_used_mib is not None]
        if per_sample and free_mib:
            room = int(min(free_mib) * 2**20 // per_sample)
            hints.append(f"room for about {room:,} more samples per micro-batch "
                         f"(the profile's peak memory grows {per_sample / 2**20:.3g} MiB a sample)")
        util = self.history.recent_gpu_util if self.history is not None else ()
        if len(util) >= LOW_UTIL_SAMPLES and self.bye is None:
            recent = np.array(list(util)[-LOW_UTIL_SAMPLES:])
            mean = float(np.nanmean(recent)) if np.isfinite(recent).any() else math.nan
            if mean < LOW_GPU_UTIL_PCT:
                hints.append(f"GPU busy only {mean:.0f}% of the time while training: input-bound? {DATA_LOADER_ADVICE}")
        return tuple(hints)

    def throughput_points(self) -> list[ThroughputPoint]:
        """The profile's points, then live steady-state points: sizes of the whole job's batch in
        the session's unit (converted here, the one place, by bsmon.stats.units)."""
        if self.profile is not None:
            units = self.profile.units
            raw = [(p.batch_size, p.step_time_s, p.peak_memory_bytes) for p in self.profile.points]
        else:
            # Streamed while bsmon.profile() runs: each point says its units (older sessions did not,
            # and were in samples per rank).
            units = ProfileUnits(**{k: v for k, v in (self.profile_points[0] if self.profile_points else {}).items()
                                    if k in ("unit", "tokens_per_sample", "world_size", "per_rank")})
            raw = [(p["batch_size"], p["step_time_s"], p.get("peak_memory_bytes")) for p in self.profile_points]
        points = [self._point(self._units.from_profile(size, units), step_time, memory, "profile")
                  for size, step_time, memory in raw]
        for size, times in sorted(self._live_times.items()):
            if len(times) >= LIVE_MIN_STEPS:
                points.append(self._point(self._units.from_rank_samples(size), float(np.median(times)), None, "live"))
        return points

    @staticmethod
    def _point(size: float, step_time: float, memory: int | None, source: str) -> ThroughputPoint:
        size = max(1, int(round(size)))
        return ThroughputPoint(size, step_time, size / step_time, memory, source=source)

    def _refresh_recommendation(self) -> None:
        """Recompute the recommendation if due: every RECOMMEND_EVERY steps, or on new throughput points.

        Lazily, when read (``stats()``: a view's redraw, ``Monitor.stats()``), and for the
        exported rows at most every RECOMMEND_INTERVAL_S of the job's time (see _exported_advice_due).
        """
        if self._recommend_due:
            self._recommend_due = False
            self._recommend()

    def _recommend(self) -> None:
        """From a throughput profile or live points (>= 2 sizes) if any, else from the in-run split.

        With a profile, the in-run alpha is the per-update overhead that accumulation does not
        repeat: the profile covers the micro-batch size, the split the accumulation.
        """
        self._recommended_version = self._points_version
        self._figures = None
        noise = self._advice_noise()
        check = self.branch_checks[-1] if self.branch_checks else None
        self._calibration = factor = self._calibration_now()
        if not _usable(noise):  # (the usual wait at a run's start: no step times needed)
            self._recommend_reason = self.next_action()
            return
        points = self.throughput_points()
        current = int(self._units.from_rank_samples(self._last["n"])) if self._last else None
        split = self.step_split()
        profiled = len({p.batch_size for p in points}) >= 2
        if not (profiled or split is not None):
            self._recommend_reason = self.next_action()
            return
        b_noise, low, high = noise.b_simple, noise.b_simple_low, noise.b_simple_high
        if factor is not None:  # B_noise = B_simple / (B_simple/B_crit measured), decaying (stats.branch)
            b_noise, low, high = (None if v is None else v / factor for v in (b_noise, low, high))
        if low is not None and high is not None:
            # A band reaching 0 (noise swamps |G|^2 at the low end) is kept as a tiny positive
            # B_noise: goodput ratios stay finite there.
            low = max(low, b_noise * 1e-6)
        else:
            low = high = None
        try:
            if profiled:
                rec = self._profiled_recommendation(points, b_noise, current, low, high, split)
                source = "profile" if any(p.source == "profile" for p in points) else "live"
            else:
                rec = optimal_accumulation(split, b_noise, b_noise_low=low, b_noise_high=high)
                source = "in-run"
        except ValueError as exc:
            self._recommend_reason = f"cannot recommend: {exc}"
            return
        self.recommendation = self._stable.update(rec)
        if self.noise_geometry()[0] == "optimizer":
            self.recommendation = dataclasses.replace(self.recommendation, reason=(
                "B_noise = B_pre, the noise scale in the optimizer's geometry. " + self.recommendation.reason))
        if factor is not None:
            self.recommendation = dataclasses.replace(self.recommendation, reason=(
                f"Calibrated by the branch check at step {check.step}: B_noise = B_simple/{factor:.3g} "
                f"(measured ratio {check.ratio:.3g}, decaying as training moves on). " + self.recommendation.reason))
        self._recommend_source = source
        self._recommend_reason = None

    def _calibration_now(self) -> float | None:
        """What B_simple is divided by for B_noise now: the latest branch check's decaying ratio, if it calibrates."""
        return calibrated_factor(self.branch_checks[-1] if self.branch_checks else None,
                                 self._units.from_samples(self._samples))

    def _profiled_recommendation(self, points, b_noise, current, low, high, split) -> Recommendation:
        profile = self.profile is not None or bool(self.profile_points)
        # A finished profile knows the largest micro-batch that fits; live points (steps of the job,
        # accumulation included) do not raise it.
        limit = (self._profile_size(self.profile.memory_limit_batch, self.profile.units)
                 if self.profile is not None and self.profile.memory_limit_batch is not None else None)
        if profile and split is not None and split.alpha_s > 0:
            try:
                return optimal_batch_size(points, b_noise, max_batch=limit, current_batch=current, b_noise_low=low,
                                          b_noise_high=high, update_overhead_s=split.alpha_s)
            except ValueError:
                pass  # the in-run alpha exceeds the profile's step at its limit: leave it out
        return optimal_batch_size(points, b_noise, max_batch=limit, current_batch=current, b_noise_low=low,
                                  b_noise_high=high)

    def _history_of(self, name: str, samples_before: float) -> EstimatorHistory:
        """The estimator's history, begun at a measured step with ``samples_before`` trained before it."""
        history = self._histories.get(name)
        if history is None:
            groups = (self.estimator or {}).get("groups") or []
            # One group is the whole model: its breakdown would repeat the total.
            history = self._histories[name] = EstimatorHistory(
                NoiseScaleTracker(self._horizon),
                [NoiseScaleTracker(self._horizon) for _ in groups] if len(groups) > 1 else [],
                NoiseScaleTracker(self._horizon),
                [NoiseScaleTracker(self._horizon) for _ in (self.estimator or {}).get("modules") or []],
                samples_at_update=samples_before)
        return history

    def _shown_history(self) -> EstimatorHistory | None:
        """The history of the estimator in use (as announced; else that of the last payload)."""
        name = self.estimator.get("name") if self.estimator is not None else self._last_estimator
        return self._histories.get(name) if name is not None else None

    def _update_noise(self, noise: dict[str, Any], step: int, samples_after: float, samples_before: float) -> None:
        """A measured step's noise norms; ``samples_after``: trained up to it, that step included."""
        name = noise.get("est")
        if name is None:
            return
        self._figures = None
        self._last_estimator = name
        history = self._history_of(name, samples_before)
        per_group = noise_points(noise, groups=bool(history.groups))
        samples = samples_after - history.samples_at_update  # the horizon is in samples, in any unit
        if not per_group or per_group[0] is None or samples <= 0:
            return
        total, groups = per_group[0], per_group[1:]
        history.total.update(step_estimate(self._in_unit(total)), samples)
        pre = precond_points(noise)
        if pre is not None:
            history.precond.update(step_estimate(self._in_unit(pre)), samples)
        for tracker, points in zip(history.modules, module_points(noise, len(history.modules))):
            if points is not None:
                tracker.update(step_estimate(self._in_unit(points)), samples)
        for tracker, points in zip(history.groups, groups):
            if points is not None:
                tracker.update(step_estimate(self._in_unit(points)), samples)
        history.samples_at_update = samples_after
        history.measured_step = step

    def _in_unit(self, points: GradNormPoints) -> GradNormPoints:
        if self._units.scale == 1:
            return points
        return GradNormPoints(tuple(self._units.from_samples(b) for b in points.batch_sizes), points.sq_norms)

    def _exported_advice_due(self, step, t):
        """Whether the exported rows re-evaluate the advice at these steps (numbers or columns):
        every RECOMMEND_INTERVAL_S of the job's time; until there is advice, every RECOMMEND_EVERY
        steps too, so the first shows as soon as the live view would show it."""
        due = t - self._recommended_at >= RECOMMEND_INTERVAL_S
        if self._recommend_reason is not None:
            due = due | (step % RECOMMEND_EVERY == 0)
        return due

    def _refresh_exported_advice(self, t: float) -> None:
        self._recommended_at = t
        self._refresh_recommendation()

    def _row_figures(self) -> dict[str, float]:
        """The step rows' figures (bsmon.records.STEP_COLUMNS after ``step_time_s``) as they stand,
        NaN for no value; ``noise_age_steps`` as the step the estimate was measured at (the rows
        subtract it from their step).

        They change only when the estimate, the estimator, the advice or a branch check does, so
        they are computed then and reused (only a calibrated B_noise moves every step).
        """
        if self._figures is None or self.branch_checks:  # a calibration decays (and may end) step by step
            noise, pre = self.noise(), self.precond_noise()
            rec = self.recommendation if self._recommend_reason is None else None
            self._figures = {
                "b_simple": _nan(noise.b_simple), "b_simple_low": _nan(noise.b_simple_low),
                "b_simple_high": _nan(noise.b_simple_high), "grad_sq": _nan(noise.grad_sq),
                "trace_sigma": _nan(noise.trace_sigma),
                "noise_coverage": _nan((self.estimator or {}).get("covered_fraction")),
                "b_simple_precond": _nan(pre.b_simple), "b_simple_precond_low": _nan(pre.b_simple_low),
                "b_simple_precond_high": _nan(pre.b_simple_high),
                "b_opt": _nan(rec.batch_size if rec else None), "b_opt_speedup": _nan(rec.speedup if rec else None)}
            self._advice_b = self._advice_noise().b_simple
        history = self._shown_history()
        measured = history.measured_step if history is not None else None
        factor = self._calibration_now() if self.branch_checks else None
        advice = self._advice_b
        return {**self._figures,
                "noise_age_steps": math.nan if measured is None or math.isnan(self._figures["b_simple"]) else measured,
                "b_noise": _nan(advice / factor if factor and advice else advice)}

    def _rows(self, step, t, n, mb, dt, figures: list[tuple[int, dict[str, float]]]) -> np.ndarray:
        """Steps' rows as a table, a row per step and a column per bsmon.records.STEP_COLUMNS (NaN:
        no value): the steps' own columns, then ``figures`` ((first row, _row_figures()), in row
        order, each holding until the next). The history bins the columns it keeps; the export
        gets them all."""
        table = np.empty((len(step), len(STEP_COLUMNS)))
        own = {"step": step, "time": t, "batch_size": self._units.from_rank_samples(n), "micro_batches": mb,
               "skipped_steps": self._skipped_steps, "step_time_s": dt}
        for name, values in own.items():
            table[:, STEP_COLUMN_AT[name]] = values
        starts = [first for first, _ in figures]
        values = np.array([[values[column.name] for column in _FIGURE_COLUMNS] for _, values in figures])
        table[:, _FIRST_FIGURE:] = np.repeat(values, np.diff([*starts, len(step)]), axis=0)
        age = STEP_COLUMN_AT["noise_age_steps"]  # the estimate's step, until here
        table[:, age] = table[:, STEP_COLUMN_AT["step"]] - table[:, age]
        return table

    # -- reading --------------------------------------------------------------
    @property
    def unit(self) -> str:
        return (self.hello or {}).get("unit", "samples")

    @property
    def elapsed_s(self) -> float:
        if self.hello is None or self._last is None:
            return 0.0
        end = self.bye["t"] if self.bye else self._last["t"]
        return max(0.0, end - self.hello["t0"])

    @property
    def last_step_time(self) -> float | None:
        """Wall-clock time of the latest step record, None before the first."""
        return self._last["t"] if self._last else None

    def throughput_now(self) -> float | None:
        """Samples (or tokens) per second over the recent window."""
        if not self._recent:
            return None
        end = self._recent[-1][0]
        total_n = total_dt = 0.0
        for t, dt, n in reversed(self._recent):
            total_n += n
            total_dt += dt
            if end - t >= THROUGHPUT_WINDOW_S:
                break
        if total_dt <= 0 or total_n <= 0:
            return None
        return self._units.from_samples(total_n) / total_dt

    def noise(self) -> NoiseScale:
        """The noise scale of the estimator in use (an empty result, with its reason, if none)."""
        history = self._shown_history()
        return (history.total if history is not None else NoiseScaleTracker(self._horizon)).result()

    def noise_age_steps(self) -> int | None:
        """Optimizer steps since the shown estimate last took in a measured step."""
        history = self._shown_history()
        if history is None or history.measured_step is None:
            return None
        return self._step - history.measured_step

    def noise_geometry(self) -> tuple[str, str]:
        """Which noise scale the advice uses, "sgd" (B_simple) or "optimizer" (B_pre), and why in words.

        watch(noise_geometry=...) decides; its default "auto" takes the optimizer's geometry when
        the optimizer keeps a per-element second moment (the probe's estimator record says so).
        A calibrating branch check measured B_simple/B_crit, so it keeps the advice on B_simple.
        """
        hello, estimator = self.hello or {}, self.estimator or {}
        requested = hello.get("noise_geometry") or "auto"
        optimizer = hello.get("optimizer") or "the optimizer"
        if self._calibration_now() is not None:
            return "sgd", ("a branch check calibrates the advice: it measured B_simple/B_crit, "
                           "so the advice uses B_simple divided by that ratio")
        if requested == "sgd":
            return "sgd", "noise_geometry='sgd' was asked for"
        if requested == "optimizer":
            return "optimizer", "noise_geometry='optimizer' was asked for"
        if estimator.get("second_moment") and estimator.get("precond_reason"):
            # a session recorded before every estimator measured B_pre
            return "sgd", (f"{optimizer} has its own geometry, but B_pre is not measured "
                           f"({estimator['precond_reason']}), so the advice falls back to B_simple")
        if estimator.get("second_moment"):
            return "optimizer", (f"{optimizer} rescales each gradient element by 1/(sqrt(v_hat)+eps), so the "
                                 "noise of its step is that of the rescaled gradient")
        return "sgd", f"{optimizer} steps along the raw gradient (no per-element second moment)"

    def _advice_noise(self) -> NoiseScale:
        """The noise scale the advice uses: B_pre in the optimizer's geometry, else B_simple."""
        return self.precond_noise() if self.noise_geometry()[0] == "optimizer" else self.noise()

    def _module_breakdown(self, history: EstimatorHistory | None) -> tuple[tuple[str, float, NoiseScale], ...]:
        estimator = self.estimator or {}
        labels, params = estimator.get("modules") or [], estimator.get("module_params") or []
        if history is None or not history.modules or len(labels) != len(history.modules):
            return ()
        total = sum(params) or 1
        return tuple((label, count / total, tracker.result())
                     for label, count, tracker in zip(labels, params, history.modules))

    def precond_noise(self) -> NoiseScale:
        """B_pre of the estimator in use (an empty result if it has none)."""
        history = self._shown_history()
        return (history.precond if history is not None else NoiseScaleTracker(self._horizon)).result()

    def precond_reason(self) -> str | None:
        """Why B_pre has no value (None when it has one)."""
        pre = self.precond_noise()
        if pre.b_simple is not None:
            return pre.reason
        estimator = self.estimator or {}
        if estimator.get("name") is None and self.estimator is not None:
            return estimator.get("reason")
        if "precond_reason" not in estimator and self.estimator is not None:
            return "recorded by a bsmon that did not measure B_pre"
        if estimator.get("precond_reason"):
            return estimator["precond_reason"]
        if pre.steps == 0:
            return ("no B_pre measurement yet: it needs the optimizer's second moment, which exists "
                    "from the optimizer's first step on")
        return pre.reason

    def stats(self) -> Stats:
        self._refresh_recommendation()
        last = self._last
        noise = self.noise()
        history = self._shown_history()
        estimator = self.estimator or {}
        local_batch = last["n"] * self._units.scale if last else None
        batch = int(self._units.from_rank_samples(last["n"])) if last else None
        age = self.noise_age_steps()
        step_problem = (CLEARED_BETWEEN_MICRO_BATCHES.format(n=batch, unit=self.unit)
                        if self._clearing_micro_batches and batch is not None else None)
        noise_reason = estimator.get("reason") if estimator.get("name") is None else noise.reason
        if step_problem is not None and noise.b_simple is None:
            noise_reason = step_problem
        dts = np.fromiter((dt for _, dt, _ in self._recent), dtype=float) if self._recent else None
        pre = self.precond_noise()
        geometry, geometry_reason = self.noise_geometry()
        efficiency = (statistical_efficiency(batch, noise.b_simple)
                      if batch and noise.b_simple and noise.b_simple > 0 else None)
        labels = estimator.get("groups") or []
        return Stats(
            step=self._step,
            samples_seen=int(self._units.from_samples(self._samples)),
            step_time_s=last["dt"] if last else None,
            step_time_p50_s=float(np.percentile(dts, 50)) if dts is not None else None,
            step_time_p95_s=float(np.percentile(dts, 95)) if dts is not None else None,
            samples_per_s=self.throughput_now(),
            batch_size=batch,
            micro_batches=last["mb"] if last else None,
            dropped=self._dropped,
            unit=self.unit,
            noise_estimator=estimator.get("name"),
            noise_reason=noise_reason,
            noise_covered_fraction=estimator.get("covered_fraction"),
            b_simple=noise.b_simple,
            b_simple_low=noise.b_simple_low,
            b_simple_high=noise.b_simple_high,
            grad_sq=noise.grad_sq,
            trace_sigma=noise.trace_sigma,
            noise_steps=noise.steps,
            noise_age_steps=age,
            noise_stale=age is not None and age > MEASURE_GAP_STEPS,
            noise_weak=noise.weak,
            negative_grad_sq_steps=noise.negative_grad_sq_steps,
            efficiency=efficiency,
            skipped_steps=self._skipped_steps,
            step_problem=step_problem,
            noise_groups=tuple((label, t.result()) for label, t in zip(labels, history.groups))
            if len(labels) > 1 and history is not None else (),
            noise_modules=self._module_breakdown(history),
            b_simple_precond=pre.b_simple,
            b_simple_precond_low=pre.b_simple_low,
            b_simple_precond_high=pre.b_simple_high,
            b_simple_precond_reason=self.precond_reason(),
            noise_geometry=geometry,
            noise_geometry_reason=geometry_reason,
            optimizer_geometry=bool(estimator.get("second_moment")),
            recording_error=self._recording_error,
            gpu_hints=self.gpu_hints(),
            **self._recommendation_fields(),
            branch_check=self.branch_checks[-1] if self.branch_checks else None,
            b_noise_calibration=self._calibration,
            local_batch_size=local_batch,
            **self._rank_fields(),
            **self._flops_fields(),
        )

    def _flops_fields(self) -> dict[str, Any]:
        """FLOPs per sample at the current batch (else the nearest counted one) times samples/s."""
        if not self._flops_per_sample:
            return {"flops_reason": self._flops_reason or ("no FLOP count recorded" if self.bye else "not counted yet")}
        local = self._last["n"] if self._last else 0
        nearest = min(self._flops_per_sample, key=lambda n: (abs(n - local), -n))
        per_sample = self._flops_per_sample[nearest]
        rate = self.throughput_now()
        fields: dict[str, Any] = {"flops_per_sample": per_sample}
        if rate is None:
            return {**fields, "flops_reason": "waiting for the step rate"}
        fields["flops_per_s"] = flops_per_s = per_sample * rate / self._units.scale
        devices = (self.hello or {}).get("devices") or []
        peak, what = peak_flops(devices[0]["name"] if devices else None, *self._flops_dtype)
        if peak is None:
            return {**fields, "mfu_reason": what}
        gpus = self._world_size * len(devices)
        return {**fields, "mfu": mfu(flops_per_s, peak, gpus), "peak_flops": peak * gpus,
                "peak_name": f"{gpus} x {what}"}

    def _rank_fields(self) -> dict[str, Any]:
        ranks = self.ranks
        if ranks is None:
            return {"world_size": self._world_size}
        return {"world_size": ranks.world_size, "rank_step_time_s": ranks.step_time_s, "rank_busy_s": ranks.busy_s,
                "slowest_rank": ranks.slowest, "slowest_rank_step_time_s": ranks.slowest_step_time_s,
                "slowest_rank_lag_steps": ranks.slowest_lag_steps, "rank_skew": ranks.skew,
                "ranks_stalled": ranks.stalled, "ranks_lost": ranks.lost,
                "uneven_rank_batches": ranks.uneven_batches}

    def _recommendation_fields(self) -> dict[str, Any]:
        rec = self.recommendation
        split = self.step_split()
        fields = {"step_split": split, "input_hint": self.input_hint(split)}
        if rec is None or self._recommend_reason is not None:
            return {**fields, "b_opt_reason": self._recommend_reason}
        return {**fields, "b_opt_source": self._recommend_source, "b_opt": rec.batch_size,
                "b_opt_speedup": rec.speedup, "b_opt_speedup_low": rec.speedup_low,
                "b_opt_speedup_high": rec.speedup_high, "b_opt_reason": rec.reason, "lr_advice": rec.lr_advice,
                "lr_factor_sgd": rec.lr_factor_sgd, "lr_factor_adam": rec.lr_factor_adam,
                "b_opt_micro_batch": rec.micro_batch, "b_opt_accumulation": rec.accumulation}


#: The numbers sent to a tracker (W&B, TensorBoard, a Trainer's loggers), by their name there,
#: and the Stats field each comes from. ``{unit}`` is "samples" or "tokens".
TRACKER_FIELDS = {
    "b_simple": "b_simple",
    "b_simple_low": "b_simple_low",
    "b_simple_high": "b_simple_high",
    "b_opt": "b_opt",
    "b_opt_speedup": "b_opt_speedup",
    "batch_size": "batch_size",
    "{unit}_per_s": "samples_per_s",
    "noise_coverage": "noise_covered_fraction",
}


def tracker_metrics(stats: Stats, prefix: str = "bsmon/") -> dict[str, float]:
    """The headline numbers of ``stats`` as ``{prefix + name: value}`` for a tracker.

    A number bsmon has no value for (no estimate yet, withheld, or an open band's infinite
    end) is left out rather than sent as a placeholder: a tracker's chart then shows a gap.
    """
    metrics = {}
    for name, field_name in TRACKER_FIELDS.items():
        value = getattr(stats, field_name)
        if value is not None and math.isfinite(value):
            metrics[prefix + name.format(unit=stats.unit)] = float(value)
    return metrics


def module_points(noise: dict[str, Any], modules: int) -> list[GradNormPoints | None]:
    """The step's points for each row of the per-module breakdown, if recorded: the micro-batch
    estimator's |.grad|^2 per row after each pass, or the per-example estimator's sum of
    per-example squared norms and |.grad|^2 per row."""
    if noise.get("est") == "per_example":
        pe, big = noise.get("mod_pe"), noise.get("mod_big")
        if not modules or pe is None or big is None or not len(pe) == len(big) == modules:
            return []
        return [per_example_points(noise["batch"], p, b) for p, b in zip(pe, big)]
    mod, micro = noise.get("mod"), noise.get("micro") or []
    if noise.get("est") != "microbatch" or mod is None or not modules or len(mod) != len(micro) * modules:
        return []
    rows = [mod[i * modules:(i + 1) * modules] for i in range(len(micro))]
    return [microbatch_points(micro, [row[k] for row in rows]) for k in range(modules)]


def precond_points(noise: dict[str, Any]) -> GradNormPoints | None:
    """The step's points in the optimizer's geometry, if measured: the estimator's own norms, of
    the gradients rescaled by P (micro-batch: after each pass; per-example: the per-example sum
    and the batch's; data parallel: the no_sync passes, then the local and averaged gradients)."""
    pre, est = noise.get("pre"), noise.get("est")
    if pre is None:
        return None
    if est == "microbatch" and len(pre) == len(noise["micro"]):
        return microbatch_points(noise["micro"], pre)
    if est == "per_example" and len(pre) == 2:
        return per_example_points(noise["batch"], pre[0], pre[1])
    if est == "ddp" and len(pre) == len(noise["micro"]) + 1:
        return ddp_points(noise["micro"], pre[:-2], pre[-2], pre[-1], noise["world"])
    return None


def noise_points(noise: dict[str, Any], groups: bool = True) -> list[GradNormPoints | None]:
    """The step's points for the whole model, then (if ``groups``) for each parameter group."""
    if noise.get("est") == "microbatch":
        acc, micro, n_groups = noise["acc"], noise["micro"], noise["g"]
        passes = len(acc) // n_groups if n_groups else 0
        if passes < 2 or len(micro) != passes:
            return []  # a forward without its backward (or the reverse) in this step
        rows = [acc[i * n_groups:(i + 1) * n_groups] for i in range(passes)]
        totals = microbatch_points(micro, [sum(row) for row in rows])
        if not groups:
            return [totals]
        return [totals, *(microbatch_points(micro, [row[g] for row in rows]) for g in range(n_groups))]
    if noise.get("est") == "ddp":
        micro, n_groups, norms = noise["micro"], noise["g"], noise["norms"]
        passes = len(micro) - 1  # before the synchronising one
        if passes < 0 or len(norms) != passes * n_groups + 2:
            return []  # a forward without its backward (or the reverse) in this step
        accumulated = [sum(norms[i * n_groups:(i + 1) * n_groups]) for i in range(passes)]
        return [ddp_points(micro, accumulated, norms[-2], norms[-1], noise["world"])]
    if noise.get("est") == "per_example":
        pe, big, batch = noise["pe"], noise["big"], noise["batch"]
        totals = per_example_points(batch, sum(pe), sum(big))
        if not groups:
            return [totals]
        return [totals, *(per_example_points(batch, p, b) for p, b in zip(pe, big))]
    return []
