"""The batch size that reaches a training target in the least wall-clock time.

Progress per second is throughput times per-sample efficiency: goodput(B) = r(B) * E(B).
- model "mccandlish" (McCandlish et al. 2018): E(B) = 1/(1 + B/B_noise). Maximising goodput is
  minimising (B + B_noise)/r(B), the time to a target. With t(B) = alpha + beta*B the optimum is
  B* = sqrt(B_half * B_noise).
- model "sqrt" (the seed note's assumption): E(B) = 1/sqrt(B). The optimum is B_half for the smooth
  r(B), and the throughput knee for r = r0*min(B, k_max).

Memory caps the micro-batch at ``micro_limit``. Larger batches need gradient accumulation: m
micro-batches of size b per optimizer update take m*(t(b) - tau) + tau seconds, where tau
(``update_overhead_s``) is the per-update cost that accumulation does not repeat (optimizer step,
gradient all-reduce). With tau = 0 throughput stays flat past the cap while E keeps falling, so
accumulation never helps; with tau > 0 the accumulated regime is again linear, t = tau + (u/c)*B with
u = t(c) - tau, and it helps exactly when its own optimum lies past the cap: for "mccandlish" when
B_noise > c*u/tau, for "sqrt" when tau > u. See docs/optimal-batch.md.

Without a profile, ``optimal_accumulation`` answers the question a running job can answer by
itself: at its own micro-batch size b, how many micro-batches to accumulate. Its step time splits
into t = alpha + k*beta_mb (bsmon.stats.throughput.split_step_time), the same accumulated line
with tau = alpha, so B* = sqrt(alpha*B_noise/beta) with beta = beta_mb/b, in whole micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from bsmon.stats.noise import statistical_efficiency
from bsmon.stats.throughput import StepSplit, ThroughputFit, ThroughputPoint, fit_step_time, mean_step_times

MODELS = ("mccandlish", "sqrt")
#: Recommended sizes from 8 up are multiples of 8 (measured sizes and the memory limit are allowed
#: too): matrix units want the batch dimension padded to 8, and the objective is flat enough near
#: its optimum that this costs under 1% for B* >= 32.
GRID_STEP = 8
#: StableRecommendation's default: switch only for a predicted gain of at least 5% (as Pollux does).
MIN_GAIN = 0.05


class ProfileLike(Protocol):
    """What optimal_batch_size needs from a bsmon.profiling.Profile (kept torch-free here)."""

    points: Sequence[ThroughputPoint]
    memory_limit_batch: int | None


def goodput(batch_size, samples_per_s, b_noise):
    """Useful samples per second: r(B) / (1 + B/B_noise). Scalars or numpy arrays; B_noise may be inf."""
    _check_positive("b_noise", b_noise, allow_inf=True)
    rate = np.asarray(samples_per_s, dtype=float)
    if np.any(rate < 0):
        raise ValueError("samples_per_s must be non-negative")
    result = rate * statistical_efficiency(batch_size, b_noise)
    return float(result) if np.ndim(result) == 0 else result


@dataclass(frozen=True)
class Recommendation:
    """A recommended batch size, why, the predicted gain, and how to change the learning rate.

    ``speedup`` is goodput(batch_size)/goodput(current_batch); ``speedup_low``/``speedup_high``
    bound it over the B_noise band (the ratio is monotone in B_noise, so the band's ends bound it).
    ``micro_batch``/``accumulation`` are set when the batch exceeds the micro-batch limit, and
    always for an in-run recommendation (``split`` set: the job's own micro-batch, accumulated).
    """

    batch_size: int
    current_batch: int | None
    speedup: float | None
    speedup_low: float | None
    speedup_high: float | None
    reason: str
    lr_advice: str
    lr_factor_sgd: float | None
    lr_factor_adam: float | None
    micro_batch: int | None
    accumulation: int | None
    model: str
    _problem: _Problem = field(repr=False, compare=False)

    def goodput_at(self, batch_size: int) -> float:
        """The maximised quantity r(B)*E(B) at any batch size, under this recommendation's inputs."""
        return float(self._problem.goodput(_check_batch("batch_size", batch_size)))

    @property
    def b_noise(self) -> float | None:
        """The B_noise this recommendation was computed with (None for the "sqrt" model)."""
        return self._problem.b_noise

    @property
    def split(self) -> StepSplit | None:
        """The in-run step-time split this recommendation comes from (None: from throughput points)."""
        return self._problem.split


def optimal_batch_size(
    profile_or_points: ProfileLike | Sequence[ThroughputPoint] | Mapping[int, float],
    b_noise: float | None,
    *,
    max_batch: int | None = None,
    model: str = "mccandlish",
    current_batch: int | None = None,
    b_noise_low: float | None = None,
    b_noise_high: float | None = None,
    update_overhead_s: float = 0.0,
) -> Recommendation:
    """Recommend the batch size that maximises goodput.

    ``profile_or_points``: a Profile, ThroughputPoints, or {batch_size: samples_per_s}.
    ``b_noise``: the noise scale, required for "mccandlish"; must be None for "sqrt".
    ``max_batch``: largest micro-batch that fits in memory; defaults to the profile's
    memory_limit_batch, else the largest measured size.
    ``b_noise_low``/``b_noise_high``: an uncertainty band around b_noise (give both or neither).
    ``update_overhead_s``: seconds per optimizer update that gradient accumulation does not repeat.
    """
    problem = _Problem.build(
        profile_or_points, b_noise, max_batch, model, current_batch, b_noise_low, b_noise_high,
        update_overhead_s,
    )
    batch_size = problem.best(problem.b_noise)
    return problem.recommend(batch_size, problem.explain_choice(batch_size))


def optimal_accumulation(
    split: StepSplit,
    b_noise: float,
    *,
    b_noise_low: float | None = None,
    b_noise_high: float | None = None,
) -> Recommendation:
    """The goodput-optimal number of micro-batches per optimizer step at the job's micro-batch size.

    ``split`` is the job's own step time, t = alpha + k*beta_mb at micro-batch b = split.micro_batch
    (in the unit and scope of ``b_noise``: global samples or tokens). Candidates are whole
    micro-batches, B = m*b; 1/goodput is convex in m, so the best m is 1 or an integer neighbour of
    sqrt(alpha*B_noise/beta)/b. The current batch is b times the current accumulation. Other
    micro-batch sizes are not compared: that needs a profile.
    """
    if not isinstance(split, StepSplit):
        raise TypeError(f"split must be a StepSplit, got {type(split).__name__}")
    b = split.micro_batch
    points = [ThroughputPoint(b, split.alpha_s + split.beta_mb_s, b / (split.alpha_s + split.beta_mb_s))]
    problem = _Problem.build(points, b_noise, b, "mccandlish", b * split.accumulation, b_noise_low,
                             b_noise_high, split.alpha_s, split=split)
    batch_size = problem.best(problem.b_noise)
    return problem.recommend(batch_size, problem.explain_choice(batch_size))


class StableRecommendation:
    """Shows a recommendation that changes only when switching is predicted to gain >= min_gain.

    A noise-scale estimate wanders; advice that follows every wobble is useless. Each update
    compares, under the newest estimate, the goodput of the new optimum with that of the size shown
    now, and keeps the shown size (with refreshed numbers) unless the gain reaches ``min_gain``.
    """

    def __init__(self, min_gain: float = MIN_GAIN):
        if not (math.isfinite(min_gain) and min_gain >= 0):
            raise ValueError(f"min_gain must be a finite number >= 0, got {min_gain!r}")
        self.min_gain = min_gain
        self._shown: Recommendation | None = None

    @property
    def shown(self) -> Recommendation | None:
        return self._shown

    def update(self, rec: Recommendation) -> Recommendation:
        shown = self._shown
        if shown is None or shown.batch_size == rec.batch_size or not _comparable(shown, rec):
            self._shown = rec
            return rec
        gain = rec.goodput_at(rec.batch_size) / rec.goodput_at(shown.batch_size) - 1.0
        if gain >= self.min_gain:
            self._shown = rec
            return rec
        note = (
            f"Keeping batch {shown.batch_size}: switching to the new optimum {rec.batch_size} would "
            f"gain only {gain:.1%} (threshold {self.min_gain:.0%})."
        )
        self._shown = rec._problem.recommend(shown.batch_size, note)
        return self._shown


def _comparable(shown: Recommendation, new: Recommendation) -> bool:
    """Whether the shown size is still a candidate of the new recommendation's problem."""
    if shown.model != new.model or (shown.split is None) != (new.split is None):
        return False
    return new.split is None or shown.batch_size % new.split.micro_batch == 0


@dataclass(frozen=True, eq=False)
class _Problem:
    """Everything a recommendation depends on, validated; evaluates goodput at any batch size."""

    sizes: np.ndarray  # distinct measured batch sizes, ascending
    times: np.ndarray  # mean step time at each
    fit: ThroughputFit | None  # None for an in-run split (one micro-batch size)
    micro_limit: int
    b_noise: float | None
    band: tuple[float, float] | None
    model: str
    current_batch: int | None
    update_overhead_s: float
    #: True when micro_limit is only the largest size measured, not a known memory limit.
    limit_unmeasured: bool = False
    #: An in-run split: the micro-batch is fixed at micro_limit and only accumulation varies.
    split: StepSplit | None = None

    @classmethod
    def build(cls, data, b_noise, max_batch, model, current_batch, b_noise_low, b_noise_high,
              update_overhead_s, split: StepSplit | None = None) -> _Problem:
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if model == "mccandlish":
            _check_positive("b_noise", b_noise)
        elif b_noise is not None or b_noise_low is not None or b_noise_high is not None:
            raise ValueError("the sqrt model does not use B_noise: pass b_noise=None and no band")
        band = None
        if (b_noise_low is None) != (b_noise_high is None):
            raise ValueError("give both b_noise_low and b_noise_high, or neither")
        if b_noise_low is not None:
            _check_positive("b_noise_low", b_noise_low)
            _check_positive("b_noise_high", b_noise_high, allow_inf=True)  # an open-ended interval
            if not b_noise_low <= b_noise <= b_noise_high:
                raise ValueError(
                    f"the band must contain b_noise: got {b_noise_low} <= {b_noise} <= {b_noise_high} false"
                )
            band = (float(b_noise_low), float(b_noise_high))
        if current_batch is not None:
            current_batch = _check_batch("current_batch", current_batch)
        if not (math.isfinite(update_overhead_s) and update_overhead_s >= 0):
            raise ValueError(f"update_overhead_s must be a finite number >= 0, got {update_overhead_s!r}")

        points, profile_limit = _points_of(data)
        # An in-run split has one micro-batch size; a profile needs two (fit_step_time raises).
        fit = None if split is not None else fit_step_time(points)
        sizes, times = mean_step_times(points)
        largest = int(sizes[-1])
        if max_batch is not None:
            micro_limit = _check_batch("max_batch", max_batch)
        else:
            micro_limit = profile_limit if profile_limit is not None else largest
        if fit is None or not fit.fits:  # measured points are trusted only within the measured range
            micro_limit = min(micro_limit, largest)
        problem = cls(sizes, times, fit, micro_limit, None if b_noise is None else float(b_noise), band,
                      model, current_batch, float(update_overhead_s),
                      limit_unmeasured=max_batch is None and profile_limit is None, split=split)
        limit_time = float(problem.step_time(micro_limit))
        if update_overhead_s >= limit_time:
            raise ValueError(
                f"update_overhead_s ({update_overhead_s} s) must be below the step time at the "
                f"micro-batch limit {micro_limit} ({limit_time:.3g} s): it is part of that step"
            )
        return problem

    # -- the throughput and goodput model -------------------------------------------------------

    def step_time(self, batch):
        """Seconds for one step without accumulation: the line if it fits, else interpolation.

        Interpolating the step time linearly keeps throughput monotone between neighbouring
        measured sizes; below the smallest one the step time is held, a pessimistic throughput.
        """
        batch = np.asarray(batch, dtype=float)
        if self.fit is not None and self.fit.fits:
            return self.fit.step_time(batch)
        return np.interp(batch, self.sizes, self.times)

    def update_time(self, batch):
        """Seconds per optimizer update: past the limit, ceil(B/limit) equal micro-batches."""
        batch = np.asarray(batch, dtype=float)
        steps = np.ceil(batch / self.micro_limit)
        tau = self.update_overhead_s
        return steps * (self.step_time(batch / steps) - tau) + tau

    def efficiency(self, batch, b_noise):
        batch = np.asarray(batch, dtype=float)
        if self.model == "sqrt":
            return 1.0 / np.sqrt(batch)
        return statistical_efficiency(batch, b_noise)

    def goodput(self, batch, b_noise=None):
        b_noise = self.b_noise if b_noise is None else b_noise
        batch = np.asarray(batch, dtype=float)
        return batch / self.update_time(batch) * self.efficiency(batch, b_noise)

    # -- the optimum ----------------------------------------------------------------------------

    def best(self, b_noise) -> int:
        """The candidate size with the highest goodput (the smaller one on ties)."""
        candidates = self.candidates(b_noise)
        return int(candidates[np.argmax(self.goodput(candidates, b_noise))])

    def candidates(self, b_noise) -> np.ndarray:
        limit = self.micro_limit
        if self.split is not None:  # whole micro-batches of the job's own size
            optimum = self.accumulated_optimum(b_noise) / limit
            steps = {1, self.split.accumulation, max(1, math.floor(optimum)), max(1, math.ceil(optimum))}
            return np.array(sorted(steps)) * limit
        single = np.concatenate([
            np.arange(1, min(GRID_STEP - 1, limit) + 1),
            np.arange(GRID_STEP, limit + 1, GRID_STEP),
            self.sizes[self.sizes <= limit],
            [limit],
        ])
        # Past the limit, 1/goodput is convex in the number of micro-batches m (B = m * limit) and
        # minimal at the accumulated regime's own closed form, so the best m is one of its integer
        # neighbours. With no per-update overhead that optimum is 0: accumulation never helps.
        optimum = self.accumulated_optimum(b_noise)
        steps = [m for m in {math.floor(optimum / limit), math.ceil(optimum / limit)} if m >= 2]
        return np.unique(np.concatenate([single, np.array(steps, dtype=float) * limit])).astype(int)

    def accumulated_optimum(self, b_noise) -> float:
        """Continuous optimum of the accumulated regime t = tau + (u/limit)*B, u = t(limit) - tau."""
        tau = self.update_overhead_s
        if tau == 0:
            return 0.0
        b_half = tau * self.micro_limit / (float(self.step_time(self.micro_limit)) - tau)
        return b_half if self.model == "sqrt" else math.sqrt(b_half * b_noise)

    def line_optimum(self, b_noise) -> float:
        """Continuous optimum of the fitted line, ignoring memory: B_half or sqrt(B_half*B_noise)."""
        b_half = self.fit.b_half
        return b_half if self.model == "sqrt" else math.sqrt(b_half * b_noise)

    # -- words ----------------------------------------------------------------------------------

    def explain_choice(self, batch_size: int) -> str:
        if self.split is not None:
            return self.explain_accumulation(batch_size)
        fit = self.fit
        if fit.fits:
            source = (
                f"Step times fit t = alpha + beta*B (B_half = {fit.b_half:.3g}, "
                f"r_max = {fit.r_max:.4g} samples/s)."
            )
            formula = "B_half" if self.model == "sqrt" else "sqrt(B_half*B_noise)"
            optimum = f" The unconstrained optimum is {formula} = {self.line_optimum(self.b_noise):.4g}."
        else:
            source = (
                f"Step times do not fit a line ({fit.reason}), so throughput is interpolated "
                "between measured sizes."
            )
            optimum = ""
        what = self.describe_objective()
        parts = [source, what + optimum]
        if batch_size > self.micro_limit:
            steps = math.ceil(batch_size / self.micro_limit)
            parts.append(
                f"Batch {batch_size} is past the memory limit {self.micro_limit}: accumulate {steps} "
                f"micro-batches; that amortises the {self.update_overhead_s:.3g} s per-update overhead."
            )
        elif batch_size == self.micro_limit and self.capped(self.b_noise):
            if self.limit_unmeasured:
                parts.append(
                    f"Recommending {batch_size}, the largest size measured so far: goodput still rises "
                    "there, so the optimum may be larger. Measure larger sizes (bsmon sweep, or raise the "
                    "batch size) to find it."
                )
            else:
                parts.append(
                    f"Recommending the memory limit {batch_size}. Accumulating beyond it would not help: "
                    + self.why_no_accumulation()
                )
        else:
            parts.append(f"Recommending {batch_size}" + self.rounding_note(batch_size) + ".")
        if fit.fits and not self.sizes[0] <= batch_size <= self.sizes[-1]:
            parts.append(
                f"That is outside the measured sizes {int(self.sizes[0])}-{int(self.sizes[-1])}: "
                "the line is extrapolated."
            )
        if self.band is not None:
            # The optimum never decreases with B_noise (log E(B) has a positive cross-derivative in
            # B and B_noise), so the band's ends bound it.
            low_noise, high_noise = self.band
            low = self.best(low_noise)
            if math.isinf(high_noise):
                parts.append(f"With B_noise anywhere above {low_noise:.4g} the optimum is {low} or more.")
            elif low != (high := self.best(high_noise)):
                band = f"{low_noise:.4g}-{high_noise:.4g}"
                parts.append(f"Across the B_noise band {band} the optimum is {low}-{high}.")
        return " ".join(parts)

    def explain_accumulation(self, batch_size: int) -> str:
        split, b = self.split, self.micro_limit
        steps = batch_size // b
        alpha = f"alpha = {_ms(split.alpha_s)} per optimizer step"
        if split.gap_per_micro_batch:
            alpha += (f" (optimizer.step() {_ms(split.optimizer_s)}; with one micro-batch a step, the "
                      f"{_ms(split.before_forward_s)} before each forward is counted per micro-batch)")
        else:
            alpha += (f" (of which optimizer.step() {_ms(split.optimizer_s)}, "
                      f"before the first forward {_ms(split.before_forward_s)})")
        parts = [
            f"In-run fit over {split.steps} steps: {alpha}, beta = {_ms(split.beta_mb_s)} per micro-batch of {b}.",
            self.describe_objective() + f" B* = sqrt(alpha*B_noise/beta) = {split.optimal_batch(self.b_noise):.4g}.",
            f"At micro-batch {b}: accumulate {steps} (batch {batch_size}).",
        ]
        if self.band is not None:
            low_noise, high_noise = self.band
            low = self.best(low_noise) // b
            if math.isinf(high_noise):  # more accumulation pays without bound as B_noise grows
                parts.append(f"With B_noise anywhere above {low_noise:.4g}: accumulate {low} or more.")
            elif low != (high := self.best(high_noise) // b):
                parts.append(f"Across the B_noise band: accumulate {low}-{high}.")
        parts.append("A larger micro-batch may do better if it fits in memory: profile micro-batch sizes "
                     "(bsmon.profile(step_fn), `bsmon sweep`, or an integration's profile=True) to find out.")
        return " ".join(parts)

    def describe_objective(self) -> str:
        if self.model == "sqrt":
            return "Maximising r(B)/sqrt(B) (per-sample efficiency falling as 1/sqrt(B))."
        return f"Minimising time to target, (B + B_noise)/r(B), with B_noise = {self.b_noise:.4g}."

    def capped(self, b_noise) -> bool:
        """Whether goodput still rises at the memory limit, i.e. the limit is what stops the optimum."""
        limit = self.micro_limit
        return limit > 1 and self.goodput(limit, b_noise) > self.goodput(limit - 1, b_noise)

    def why_no_accumulation(self) -> str:
        tau = self.update_overhead_s
        if tau == 0:
            return "past the limit throughput stays flat while per-sample efficiency keeps falling."
        u = float(self.step_time(self.micro_limit)) - tau
        if self.model == "sqrt":
            return (
                f"it pays only when the per-update overhead ({tau:.3g} s) exceeds "
                f"the rest of a step ({u:.3g} s)."
            )
        threshold = self.micro_limit * u / tau
        return f"with a per-update overhead of {tau:.3g} s it pays only when B_noise > {threshold:.4g}."

    def rounding_note(self, batch_size: int) -> str:
        if batch_size in self.sizes or batch_size < GRID_STEP or batch_size == self.micro_limit:
            return ""
        return f" (sizes from {GRID_STEP} up are multiples of {GRID_STEP})"

    def recommend(self, batch_size: int, choice: str) -> Recommendation:
        current = self.current_batch
        speedup = speedup_low = speedup_high = None
        factor_sgd = factor_adam = None
        words = [choice]
        if current is not None:
            speedup = float(self.goodput(batch_size) / self.goodput(current))
            words.append(f"Predicted {speedup:.3g}x the progress per second of the current batch {current}.")
            if self.band is not None:
                ends = [float(self.goodput(batch_size, n) / self.goodput(current, n)) for n in self.band]
                speedup_low, speedup_high = min(ends), max(ends)
                words.append(f"Across the B_noise band: {speedup_low:.3g}x-{speedup_high:.3g}x.")
            factor_adam = math.sqrt(batch_size / current)
            if self.model == "mccandlish":
                factor_sgd = (1 + self.b_noise / current) / (1 + self.b_noise / batch_size)
        micro_batch = accumulation = None
        if self.split is not None:
            micro_batch, accumulation = self.micro_limit, batch_size // self.micro_limit
        elif batch_size > self.micro_limit:
            accumulation = math.ceil(batch_size / self.micro_limit)
            micro_batch = math.ceil(batch_size / accumulation)
        return Recommendation(
            batch_size=batch_size,
            current_batch=current,
            speedup=speedup,
            speedup_low=speedup_low,
            speedup_high=speedup_high,
            reason=" ".join(words),
            lr_advice=self.lr_advice(batch_size, factor_sgd, factor_adam),
            lr_factor_sgd=factor_sgd,
            lr_factor_adam=factor_adam,
            micro_batch=micro_batch,
            accumulation=accumulation,
            model=self.model,
            _problem=self,
        )

    def lr_advice(self, batch_size: int, factor_sgd: float | None, factor_adam: float | None) -> str:
        if factor_adam is None:
            return (
                f"Scale the learning rate from the batch B0 it was tuned at to {batch_size}: SGD by "
                "(1 + B_noise/B0)/(1 + B_noise/B), Adam-like by sqrt(B/B0)."
            )
        start = f"From batch {self.current_batch} to {batch_size}: "
        adam = f"Adam-like optimizers x{factor_adam:.3g} (square-root rule)"
        if factor_sgd is None:
            return start + adam + "; this model has no B_noise, so no SGD rule."
        return start + f"SGD x{factor_sgd:.3g} (optimal step ~ 1/(1 + B_noise/B)); " + adam + "."


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _points_of(data) -> tuple[list[ThroughputPoint], int | None]:
    """Throughput points and a memory limit, from a Profile, a point sequence or a mapping."""
    if isinstance(data, Mapping):
        points = []
        for batch_size, rate in data.items():
            _check_batch("batch size", batch_size)
            _check_positive(f"samples_per_s at batch {batch_size}", rate)
            points.append(ThroughputPoint(batch_size, batch_size / rate, float(rate)))
        return points, None
    if hasattr(data, "points") and hasattr(data, "memory_limit_batch"):
        return list(data.points), data.memory_limit_batch
    if isinstance(data, Sequence) and all(isinstance(p, ThroughputPoint) for p in data):
        return list(data), None
    raise TypeError(
        "profile_or_points must be a Profile, a sequence of ThroughputPoint, or a mapping "
        f"{{batch_size: samples_per_s}}, got {type(data).__name__}"
    )


def _check_positive(name: str, value, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        kind = "positive number (inf allowed)" if allow_inf else "finite positive number"
        raise ValueError(f"{name} must be a {kind}, got {value!r}")


def _check_batch(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
