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
