"""Throughput as a function of batch size, and the linear step-time model.

A training step at batch size B usually takes close to t(B) = alpha + beta*B seconds: a fixed cost
(kernel launches, Python, the optimizer update) plus a per-sample cost. Throughput is then
r(B) = B / t(B), which saturates at r_max = 1/beta and reaches half of that at B_half = alpha/beta.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The line "fits" when every measured step time lies within this fraction of it.
FIT_TOLERANCE = 0.10
#: The knee is the smallest measured size reaching this fraction of the best measured throughput.
KNEE_FRACTION = 0.90
POINT_SOURCES = ("profile", "live")


@dataclass(frozen=True)
class ThroughputPoint:
    """One measured batch size: mean step time and the throughput it implies.

    ``samples_per_s`` must equal ``batch_size / step_time_s``; it is stored for display.
    ``source`` is "profile" (a dedicated sweep) or "live" (measured while the job trained).
    """

    batch_size: int
    step_time_s: float
    samples_per_s: float
    peak_memory_bytes: int | None = None
    source: str = "profile"

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        for name in ("step_time_s", "samples_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if not math.isclose(self.samples_per_s * self.step_time_s, self.batch_size, rel_tol=1e-6):
            raise ValueError(
                f"samples_per_s ({self.samples_per_s}) must equal batch_size / step_time_s "
                f"({self.batch_size / self.step_time_s}); compute it from the other two"
            )
        if self.peak_memory_bytes is not None and (
            isinstance(self.peak_memory_bytes, bool)
            or not isinstance(self.peak_memory_bytes, (int, np.integer))
            or self.peak_memory_bytes < 0
        ):
            raise ValueError(f"peak_memory_bytes must be None or an int >= 0, got {self.peak_memory_bytes!r}")
        if self.source not in POINT_SOURCES:
            raise ValueError(f"source must be one of {POINT_SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class ThroughputFit:
    """The line t(B) = alpha + beta*B fitted to measured step times.

    ``knee_batch`` is the smallest measured batch size whose throughput is at least
    ``KNEE_FRACTION`` of the best measured throughput: where doubling the batch stops buying much.
    It is read off the measurements, not the line, so it exists even when the line does not fit and
    never lies outside the measured range. (On the line itself, 90% of r_max is reached at 9*B_half.)

    ``fits`` is False, with ``reason`` saying why, when the step time does not grow with B (then
    ``r_max`` and ``b_half`` are infinite), when some measured step time is more than
    ``FIT_TOLERANCE`` off the line, or when only two sizes were measured (a line passes through any
    two points, so nothing was tested).
    """

    alpha_s: float
    beta_s_per_sample: float
    r_max: float
    b_half: float
    knee_batch: int
    r_squared: float
    max_rel_residual: float
    fits: bool
    reason: str | None

    def step_time(self, batch_size):
        """Predicted step time in seconds (scalar or numpy array)."""
        return self.alpha_s + self.beta_s_per_sample * np.asarray(batch_size, dtype=float)


def mean_step_times(points: Sequence[ThroughputPoint]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct batch sizes (ascending) and the mean step time measured at each."""
    if len(points) == 0:
        raise ValueError("no throughput points: measure at least two batch sizes")
    sizes = np.array([p.batch_size for p in points], dtype=float)
    times = np.array([p.step_time_s for p in points], dtype=float)
    distinct, index = np.unique(sizes, return_inverse=True)
    mean_times = np.bincount(index, weights=times) / np.bincount(index)
    return distinct, mean_times


def fit_step_time(points: Sequence[ThroughputPoint]) -> ThroughputFit:
    """Fit t(B) = alpha + beta*B with alpha, beta >= 0, minimising squared *relative* residuals.

    Timing noise is roughly proportional to the step time, so an unweighted fit would let the
    largest batches decide everything and leave alpha (hence B_half) to chance; relative residuals
    give every measured size the same say. Repeated points at one size are fitted individually.
    """
    if len(points) == 0:
        raise ValueError("no throughput points: measure at least two batch sizes")
    sizes = np.array([p.batch_size for p in points], dtype=float)
    times = np.array([p.step_time_s for p in points], dtype=float)
    if np.unique(sizes).size < 2:
        raise ValueError(
            f"a step-time fit needs at least two distinct batch sizes, got only {int(sizes[0])}"
        )
    alpha, beta = _nonnegative_relative_lsq(sizes, times)
    predicted = alpha + beta * sizes
    relative = (times - predicted) / times
    max_rel_residual = float(np.max(np.abs(relative)))
    weights = 1.0 / times**2
    weighted_mean = np.sum(weights * times) / np.sum(weights)
    total = float(np.sum(weights * (times - weighted_mean) ** 2))
    residual = float(np.sum(relative**2))
    r_squared = 1.0 - residual / total if total > 0 else float(residual == 0.0)

    distinct, mean_times = mean_step_times(points)
    throughput = distinct / mean_times
    knee_batch = int(distinct[np.argmax(throughput >= KNEE_FRACTION * throughput.max())])

    if beta > 0:
        r_max, b_half = 1.0 / beta, alpha / beta
    else:
        r_max = b_half = math.inf
    reason = _misfit_reason(distinct, beta, relative, sizes)
    return ThroughputFit(
        alpha_s=float(alpha),
        beta_s_per_sample=float(beta),
        r_max=float(r_max),
        b_half=float(b_half),
        knee_batch=knee_batch,
        r_squared=float(r_squared),
        max_rel_residual=max_rel_residual,
        fits=reason is None,
        reason=reason,
    )


def _nonnegative_relative_lsq(sizes: np.ndarray, times: np.ndarray) -> tuple[float, float]:
    """Minimise sum(((t - alpha - beta*B)/t)^2) over alpha, beta >= 0.

    The objective is a convex quadratic, so when the unconstrained minimum leaves the quadrant the
    constrained one lies on an edge: alpha = 0 or beta = 0. Each edge has a positive closed-form
    minimiser (the data are positive); take the better edge.
    """
    design = np.column_stack([1.0 / times, sizes / times])
    target = np.ones_like(times)
    (alpha, beta), *_ = np.linalg.lstsq(design, target, rcond=None)
    if alpha >= 0 and beta >= 0:
        return float(alpha), float(beta)

    def loss(a: float, b: float) -> float:
        return float(np.sum((1.0 - (a + b * sizes) / times) ** 2))

    # Each edge is a one-parameter least squares in the same relative metric.
    edge_beta = float(np.sum(sizes / times) / np.sum((sizes / times) ** 2))  # alpha = 0
    edge_alpha = float(np.sum(1.0 / times) / np.sum(1.0 / times**2))  # beta = 0
    if loss(0.0, edge_beta) <= loss(edge_alpha, 0.0):
        return 0.0, edge_beta
    return edge_alpha, 0.0


def _misfit_reason(distinct: np.ndarray, beta: float, relative: np.ndarray, sizes: np.ndarray) -> str | None:
    low, high = int(distinct[0]), int(distinct[-1])
    if beta <= 0:
        return (
            f"step time does not grow with batch size between {low} and {high}, so throughput has "
            "not started to saturate; measure larger batch sizes to find r_max and B_half"
        )
    worst = int(np.argmax(np.abs(relative)))
    if abs(relative[worst]) > FIT_TOLERANCE:
        return (
            f"measured step time at batch {int(sizes[worst])} is {abs(relative[worst]):.0%} off the "
            f"line t = alpha + beta*B (tolerance {FIT_TOLERANCE:.0%})"
        )
    if distinct.size == 2:
        return "only two batch sizes measured: a line passes through any two points; measure a third"
    return None


# -- the in-run split: per optimizer step and per micro-batch ---------------------------------------

#: Input-bound: the wait before a step's first forward is at least this share of one micro-batch's
#: time. With data fetched per micro-batch that is fetching taking as long as forward and backward.
INPUT_BOUND_SHARE = 0.5


@dataclass(frozen=True)
class StepSplit:
    """A running job's step time, t = alpha + k * beta_mb, at k micro-batches of ``micro_batch``.

    ``alpha_s`` is what an optimizer step costs once however many micro-batches it accumulates: the
    optimizer update, DDP's all-reduce wait, zero_grad, and the time between steps (data loading,
    logging) beyond what one micro-batch repeats. ``beta_mb_s`` is one micro-batch: forward,
    backward and whatever the loop repeats with it (fetching the next micro-batch).
    ``before_forward_s``, ``optimizer_s`` and ``step_time_s`` are medians of the time from the
    previous step's end to the first forward, inside optimizer.step(), and of the whole step.
    With one micro-batch a step (``gap_per_micro_batch``), nothing in the step repeats, so the time
    before the first forward is assumed to repeat with each micro-batch, as when every micro-batch
    is fetched from the data loader: alpha is then the optimizer step alone, the cautious choice.
    """

    micro_batch: int
    accumulation: int
    alpha_s: float
    beta_mb_s: float
    before_forward_s: float
    optimizer_s: float
    step_time_s: float
    steps: int
    gap_per_micro_batch: bool

    @property
    def beta_s_per_sample(self) -> float:
        return self.beta_mb_s / self.micro_batch

    @property
    def b_half(self) -> float:
        """alpha/beta in samples: the batch at which accumulation reaches half its saturated throughput."""
        return self.alpha_s / self.beta_s_per_sample

    def optimal_batch(self, b_noise: float) -> float:
        """The continuous optimum over accumulation, B* = sqrt(alpha * B_noise / beta)."""
        return math.sqrt(self.b_half * b_noise)

    @property
    def input_share(self) -> float:
        """The wait before a step's first forward (mostly data loading) over one micro-batch's time."""
        return self.before_forward_s / self.beta_mb_s

    @property
    def input_bound(self) -> bool:
        return self.input_share >= INPUT_BOUND_SHARE


def split_step_time(phases, micro_batch: int, accumulation: int) -> StepSplit:
    """Fit t = alpha + k*beta_mb from steps' phase marks, robustly (medians over steps).

    ``phases``: one row per step, (first forward, last forward, optimizer.step() start, end) in
    seconds from the previous step's end, all at ``accumulation`` micro-batches of ``micro_batch``.
    With k >= 2 micro-batches one micro-batch is the interval between two forward starts,
    (last - first)/(k - 1), and alpha is the rest of the step, t - k*beta_mb. With k = 1 one
    micro-batch is everything before optimizer.step() (see StepSplit.gap_per_micro_batch).
    """
    marks = np.asarray(phases, dtype=float)
    if marks.ndim != 2 or marks.shape[1] != 4 or len(marks) == 0:
        raise ValueError("phases must be rows of (first forward, last forward, optimizer start, end)")
    if not (isinstance(micro_batch, (int, np.integer)) and micro_batch >= 1):
        raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    if not (isinstance(accumulation, (int, np.integer)) and accumulation >= 1):
        raise ValueError(f"accumulation must be an integer >= 1, got {accumulation!r}")
    first, last, optimizer, end = marks.T
    if accumulation >= 2:
        per_micro = (last - first) / (accumulation - 1)
    else:
        per_micro = optimizer
    per_step = end - accumulation * per_micro
    # the five medians in one call (a replay or export re-evaluates this about once a second)
    beta_mb, alpha, before_forward, optimizer_s, step_time = np.median(
        np.stack([per_micro, per_step, first, end - optimizer, end]), axis=1).tolist()
    if not beta_mb > 0:
        raise ValueError("the micro-batches take no measurable time: no step-time split")
    return StepSplit(
        micro_batch=int(micro_batch),
        accumulation=int(accumulation),
        alpha_s=max(0.0, alpha),
        beta_mb_s=beta_mb,
        before_forward_s=before_forward,
        optimizer_s=optimizer_s,
        step_time_s=step_time,
        steps=len(marks),
        gap_per_micro_batch=accumulation == 1,
    )
