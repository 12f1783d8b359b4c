"""Gradient noise scale B_simple = tr(Sigma) / |G|^2 from squared gradient norms.

Everything rests on one identity (McCandlish et al. 2018, appendix A): for the mean gradient
G_B of B i.i.d. examples, E|G_B|^2 = |G|^2 + tr(Sigma)/B. Squared norms of batch-mean gradients
of at least two sizes, taken at the same parameters, therefore give unbiased per-step estimates
of |G|^2 and tr(Sigma). Their ratio is biased, so the tracker averages the two estimates
separately and divides only the averages. See docs/noise-scale.md for the reasoning.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_HORIZON_SAMPLES: int = 100_000
"""EMA horizon in samples: about two epochs of MNIST/CIFAR-sized data. Long enough for ~25
effective steps even at batch 8192, short next to the tens of epochs over which B_simple drifts."""

MEASURE_GAP_STEPS: int = 100
"""After its warm-up the probe measures at least one step in every MEASURE_GAP_STEPS, whatever its
cost budget (bsmon.probe.noise.NoiseProbe.end_step). An estimate whose last measured step lies
further back than this is stale: the estimator has stopped measuring, not merely slowed down."""

WEAK_RATIO: float = 10.0
"""B_simple > WEAK_RATIO * B_big marks an estimate as weak: the steps needed for a given
precision grow like (B_simple / B_big)^2, so past 10x the band, not the point, is the message."""



def partial_coverage_reason(covered_fraction: float, uncovered: dict[str, str] | None = None) -> str:
    """Why a per-example estimate over part of the model is not shown, and what to change.

    The noise scale of some parameters is not the model's: the uncovered layers' share of
    tr(Sigma) and of |G|^2 is unknown and differs between models (GPT-2 with 4% covered showed
    a third of the whole model's value), so no correction with an honest band exists.
    """
    text = f"per-example norms cover only {covered_fraction:.0%} of the trainable parameters"
    if uncovered:
        name, why = next(iter(uncovered.items()))
        more = f" and {len(uncovered) - 1} more" if len(uncovered) > 1 else ""
        text += f" (not covered: {name} [{why}]{more})"
    return (text + ", and part of a model does not give the model's noise scale. Accumulate >= 2 "
            "micro-batches per step (noise='auto' then measures the whole model with the micro-batch "
            "estimator), or freeze the uncovered parameters")

@dataclass(frozen=True)
class GradNormPoints:
    """Squared norms of batch-mean gradients of several batch sizes measured at the SAME parameters.

    Batch sizes may repeat: data parallel with W ranks of local batch b is
    GradNormPoints((b,) * W + (W * b,), (*local_sq_norms, global_sq)); the least-squares fit in
    step_estimate then passes through the mean of the local norms, the usual two-size estimator.
    """

    batch_sizes: tuple[float, ...]  # B_k (samples, or tokens)
    sq_norms: tuple[float, ...]  # |G_{B_k}|^2

    def __post_init__(self) -> None:
        sizes = tuple(float(b) for b in self.batch_sizes)
        norms = tuple(float(s) for s in self.sq_norms)
        if len(sizes) != len(norms):
            raise ValueError(
                f"GradNormPoints needs one squared norm per batch size; got {len(sizes)} sizes "
                f"and {len(norms)} norms."
            )
        if not all(math.isfinite(b) and b > 0 for b in sizes):
            raise ValueError(f"batch sizes must be finite and positive; got {sizes}.")
        if len(set(sizes)) < 2:
            raise ValueError(
                f"at least two different batch sizes are needed to separate |G|^2 from tr(Sigma); "
                f"got {sizes}."
            )
        if not all(math.isfinite(s) and s >= 0 for s in norms):
            raise ValueError(
                f"squared norms must be finite and >= 0; got {norms}. Skip steps with non-finite "
                f"gradients (microbatch_points and per_example_points return None for them)."
            )
        object.__setattr__(self, "batch_sizes", sizes)
        object.__setattr__(self, "sq_norms", norms)


def _all_finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def microbatch_points(
    micro_sizes: Sequence[float], accumulated_sq: Sequence[float]
) -> GradNormPoints | None:
    """Points from gradient accumulation: accumulated_sq[j] = |.grad|^2 after backward pass j+1.

    After j passes .grad = c * (sum of the first j micro-batch mean gradients) for an unknown
    constant c (1/m for a mean loss divided by m, b for a summed loss, times any AMP scale).
    The points are expressed as if c = 1/m, the convention in which the final .grad is the
    batch-mean gradient: B_j = j*b and |G_{B_j}|^2 = a_j * (m/j)^2. Any other c multiplies every
    point by the same factor, which cancels in B_simple. Unequal micro-batches are used too (see
    _accumulated_passes for the size each pass stands for).

    Returns None (skip the step) for fewer than two micro-batches or any non-finite value.
    """
    if len(micro_sizes) != len(accumulated_sq):
        raise ValueError(
            f"need one accumulated squared norm per micro-batch; got {len(micro_sizes)} sizes "
            f"and {len(accumulated_sq)} norms."
        )
    m = len(micro_sizes)
    if m < 2 or not _all_finite(micro_sizes) or not _all_finite(accumulated_sq):
        return None
    return GradNormPoints(*_accumulated_passes(micro_sizes, accumulated_sq))


def _accumulated_passes(
    micro_sizes: Sequence[float], accumulated_sq: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(B_j, |G_{B_j}|^2) after each pass in accumulated_sq, in the convention c = 1/m.

    Equal sizes b give B_j = j*b whatever the loss's reduction. Unequal sizes make the weight of
    each pass depend on it: a mean-reduced loss divided by m adds every micro-batch mean with the
    same weight, a summed loss weights each by its size, and the two differ in B_simple by far
    more than a band (70% for 34/33/33 at B_simple = 500). So when the first two or more passes
    share a size (a ragged last micro-batch), only those passes are used: their points do not
    depend on the reduction. Otherwise every pass is used in the mean convention: the sum of j
    independent micro-batch means has E|.|^2 = j^2 |G|^2 + tr(Sigma) * sum_{i<=j} 1/b_i, so
    a_j (m/j)^2 estimates |G|^2 + tr(Sigma)/B_j with 1/B_j = (sum_{i<=j} 1/b_i) / j^2.
    """
    m = len(micro_sizes)
    sizes = [float(size) for size in micro_sizes[:len(accumulated_sq)]]
    if any(size <= 0 for size in micro_sizes):
        raise ValueError(f"micro-batch sizes must be positive; got {list(micro_sizes)}.")
    equal = next((j for j, size in enumerate(sizes) if size != sizes[0]), len(sizes))
    if 2 <= equal < len(sizes):
        sizes = sizes[:equal]
    inverse_sums = itertools.accumulate(1.0 / size for size in sizes)  # in order, as np.cumsum: a few passes
    return (tuple(j * j / inverse for j, inverse in enumerate(inverse_sums, start=1)),
            tuple(a * (m / j) ** 2 for j, a in zip(range(1, len(sizes) + 1), accumulated_sq)))


def per_example_points(
    batch_size: float, per_example_sq_sum: float, batch_sq: float
) -> GradNormPoints | None:
    """Points from per-example gradient norms taken inside backward of a MEAN-reduced loss.

    per_example_sq_sum = sum_i |g_i / B|^2 (each per-example gradient carries the loss's 1/B),
    batch_sq = |.grad|^2 over the same parameters. The mean per-example squared norm is
    B * per_example_sq_sum, the point for B_small = 1; batch_sq is the point for B_big = B.
    A summed loss scales both inputs by B^2, which leaves B_simple unchanged.
    Returns None for batch_size < 2 or non-finite input.
    """
    values = (batch_size, per_example_sq_sum, batch_sq)
    if not _all_finite(values) or batch_size < 2:
        return None
    return GradNormPoints(
        batch_sizes=(1.0, float(batch_size)),
        sq_norms=(batch_size * per_example_sq_sum, batch_sq),
    )


def ddp_points(
    micro_sizes: Sequence[float], accumulated_sq: Sequence[float], local_sq: float,
    averaged_sq: float, world_size: int,
) -> GradNormPoints | None:
    """Points from data parallel: one rank's gradient before the all-reduce and the average after.

    Each of ``world_size`` ranks runs m micro-batches of size b (micro_sizes, the same on every
    rank), the first m-1 under no_sync(): accumulated_sq[j-1] = |.grad|^2 after pass j (j < m).
    local_sq is this rank's gradient entering the all-reduce (after all m passes, B = m*b) and
    averaged_sq the gradient averaged over the ranks (B = m*b*world_size). With the convention
    of microbatch_points (c = 1/m) the micro-batch points are a_j * (m/j)^2; the last two need
    no rescaling, because the all-reduce averages. An unknown c scales every point alike.

    Unequal micro-batches are used as in microbatch_points. Returns None (skip the step) for fewer
    than two batch sizes (one rank, one pass) or any non-finite value.
    """
    m = len(micro_sizes)
    if len(accumulated_sq) != m - 1:
        raise ValueError(
            f"need a squared norm after each of the {m - 1} passes before the synchronising one; "
            f"got {len(accumulated_sq)}."
        )
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive int; got {world_size!r}.")
    values = (*micro_sizes, *accumulated_sq, local_sq, averaged_sq)
    if m == 0 or not _all_finite(values) or (m == 1 and world_size == 1):
        return None
    sizes, norms = _accumulated_passes(micro_sizes, accumulated_sq)
    local = m * m / math.fsum(1.0 / float(size) for size in micro_sizes)
    return GradNormPoints((*sizes, local, local * world_size), (*norms, local_sq, averaged_sq))


@dataclass(frozen=True)
class NoiseStepEstimate:
    grad_sq: float  # unbiased estimate of |G|^2 for this step (may be negative)
    trace_sigma: float  # unbiased estimate of tr(Sigma)
    b_small: float
    b_big: float


def step_estimate(points: GradNormPoints) -> NoiseStepEstimate:
    """Least-squares line |G_B|^2 = |G|^2 + tr(Sigma) * (1/B) through the points.

    The fitted intercept and slope are linear in the norms with weights that depend only on the
    batch sizes, so each is unbiased. With two sizes this is exactly
    |G|^2 = (B_big|G_big|^2 - B_small|G_small|^2) / (B_big - B_small) and
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big).
    """
    xs = [1.0 / b for b in points.batch_sizes]
    ys = points.sq_norms
    x_mean = math.fsum(xs) / len(xs)
    y_mean = math.fsum(ys) / len(ys)
    sxx = math.fsum((x - x_mean) ** 2 for x in xs)
    sxy = math.fsum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
    trace_sigma = sxy / sxx
    return NoiseStepEstimate(
        grad_sq=y_mean - trace_sigma * x_mean,
        trace_sigma=trace_sigma,
        b_small=min(points.batch_sizes),
        b_big=max(points.batch_sizes),
    )


@dataclass(frozen=True)
class NoiseScale:
    b_simple: float | None  # ratio of the bias-corrected EMAs, clamped only after averaging
    b_simple_low: float | None
    b_simple_high: float | None  # may be math.inf when the |G|^2 interval reaches 0
    grad_sq: float | None  # EMA of |G|^2 estimates
    trace_sigma: float | None  # EMA of tr(Sigma) estimates
    steps: int  # steps that contributed
    samples: float  # samples that contributed
    negative_grad_sq_steps: int  # steps whose raw |G|^2 estimate was negative
    b_big: float | None  # typical B_big of recent steps (EMA-weighted mean)
    weak: bool  # True when B_simple > WEAK_RATIO * B_big
    reason: str | None  # why b_simple is None, or the caveat when weak; plain English


class NoiseScaleTracker:
    """Exponentially weighted averages of per-step |G|^2 and tr(Sigma) estimates, with a band.

    Each step first decays every earlier weight by beta = exp(-samples / horizon_samples) and
    then enters with weight 1 - beta. The weighted mean sum(w x) / sum(w) is exactly Adam's
    bias-corrected EMA, m_t / (1 - prod(beta)). Means and the weighted scatter matrix are updated
    in West's incremental form, which avoids cancellation in the variances.
    """

    def __init__(
        self, horizon_samples: float = DEFAULT_HORIZON_SAMPLES, confidence: float = 0.95
    ) -> None:
        if not (math.isfinite(horizon_samples) and horizon_samples > 0):
            raise ValueError(
                f"horizon_samples must be a positive number of samples; got {horizon_samples}."
            )
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95); got {confidence}.")
        self.horizon_samples = float(horizon_samples)
        self.confidence = float(confidence)
        self._weight = 0.0  # sum of w = 1 - prod(beta)
        self._weight_sq = 0.0  # sum of w^2, for the effective number of steps
        self._mean_trace = 0.0
        self._mean_grad = 0.0
        self._scatter_trace = 0.0  # sum w (trace - mean)^2
        self._scatter_grad = 0.0  # sum w (grad - mean)^2
        self._scatter_cross = 0.0  # sum w (trace - mean)(grad - mean)
        self._mean_b_big = 0.0
        self._steps = 0
        self._samples = 0.0
        self._negative_steps = 0
        self._result: NoiseScale | None = None  # result() until the next update (its band is costly)

    def update(self, estimate: NoiseStepEstimate, samples: float) -> None:
        """Add one step's estimate; samples = examples (or tokens) that step consumed."""
        if not (math.isfinite(samples) and samples > 0):
            raise ValueError(f"samples must be a positive number; got {samples}.")
        fields = (estimate.grad_sq, estimate.trace_sigma, estimate.b_big)
        if not _all_finite(fields):
            raise ValueError(
                f"step estimate has a non-finite value {estimate}; skip such steps instead."
            )
        decay = math.exp(-samples / self.horizon_samples)
        new_weight = -math.expm1(-samples / self.horizon_samples)  # 1 - decay, accurate when tiny
        self._weight *= decay
        self._weight_sq *= decay * decay
        self._scatter_trace *= decay
        self._scatter_grad *= decay
        self._scatter_cross *= decay

        self._weight += new_weight
        self._weight_sq += new_weight * new_weight
        share = new_weight / self._weight
        d_trace = estimate.trace_sigma - self._mean_trace
        d_grad = estimate.grad_sq - self._mean_grad
        self._mean_trace += share * d_trace
        self._mean_grad += share * d_grad
        self._mean_b_big += share * (estimate.b_big - self._mean_b_big)
        self._scatter_trace += new_weight * d_trace * (estimate.trace_sigma - self._mean_trace)
        self._scatter_grad += new_weight * d_grad * (estimate.grad_sq - self._mean_grad)
        self._scatter_cross += new_weight * d_trace * (estimate.grad_sq - self._mean_grad)

        self._steps += 1
        self._samples += samples
        self._negative_steps += estimate.grad_sq < 0
        self._result = None

    @property
    def effective_steps(self) -> float:
        """Kish effective sample size of the EMA weights, (sum w)^2 / sum w^2."""
        return self._weight**2 / self._weight_sq if self._steps else 0.0

    def result(self) -> NoiseScale:
        """The estimate and its band; computed once per update (a monitor reads it every step)."""
        if self._result is None:
            self._result = self._compute()
        return self._result

    def _compute(self) -> NoiseScale:
        if self._steps == 0:
            return NoiseScale(
                b_simple=None, b_simple_low=None, b_simple_high=None, grad_sq=None,
                trace_sigma=None, steps=0, samples=0.0, negative_grad_sq_steps=0, b_big=None,
                weak=False,
                reason="no noise measurements yet: each step needs squared gradient norms at two "
                "batch sizes (gradient accumulation over >= 2 micro-batches, per-example norms, "
                "or the local and all-reduced gradients of data parallel).",
            )
        trace, grad, b_big = self._mean_trace, self._mean_grad, self._mean_b_big
        common = dict(
            grad_sq=grad, trace_sigma=trace, steps=self._steps, samples=self._samples,
            negative_grad_sq_steps=self._negative_steps, b_big=b_big,
        )
        steps_text = f"{self._steps} step{'s' if self._steps != 1 else ''}"
        if grad <= 0:
            return NoiseScale(
                b_simple=None, b_simple_low=None, b_simple_high=None, weak=False,
                reason=f"noise dominates: |G|^2 not yet resolved after {steps_text} "
                f"(B_big ~{b_big:.4g}); keep training or raise B_big.",
                **common,
            )
        b_simple = max(trace, 0.0) / grad
        band = self._fieller_band(b_simple)
        if band is None:
            # A point without a band is not shown as B_simple: say how far the measuring got.
            return NoiseScale(
                b_simple=None, b_simple_low=None, b_simple_high=None, weak=False,
                reason=f"measuring: {steps_text}, no uncertainty band yet (it needs about 2 "
                f"steps' worth of independent estimates).",
                **common,
            )
        weak = b_simple > WEAK_RATIO * b_big
        low, high = band

        caveats = []
        if trace <= 0:
            caveats.append(
                f"no gradient noise resolved: the tr(Sigma) average is <= 0 after {steps_text}, "
                f"so B_simple is below what these batch sizes can resolve; a smaller B_small "
                f"(per-example norms, smaller micro-batches) would measure it."
            )
        if weak:
            caveats.append(
                f"weak: B_big (~{b_big:.4g}) is far below B_simple, so |G|^2 is a small "
                f"difference of noisy norms; trust the band, not the point, and raise B_big or "
                f"average longer."
            )
        if high == math.inf:
            caveats.append(
                f"|G|^2 is not yet significantly above 0 after {steps_text}, so the band has "
                f"no upper end; keep training or raise B_big."
            )
        return NoiseScale(
            b_simple=b_simple, b_simple_low=low, b_simple_high=high, weak=weak,
            reason=" ".join(caveats) or None, **common,
        )

    def _fieller_band(self, ratio: float) -> tuple[float, float] | None:
        """Fieller interval for mean_trace / mean_grad, restricted to ratios >= 0.

        With a, b the weighted means and v_* their estimated (co)variances, the ratio r is kept
        when (a - r b)^2 <= t^2 (v_aa - 2 r v_ab + r^2 v_bb), i.e. A r^2 - 2 K r + C <= 0 with
        A = b^2 - t^2 v_bb, K = a b - t^2 v_ab, C = a^2 - t^2 v_aa. The point estimate always
        satisfies it, so K^2 >= A C. The upper end is infinite when A <= 0: the |G|^2 mean is then
        not significantly above zero.
        """
        n_eff = self.effective_steps
        if n_eff < 2:
            return None
        t = student_t_quantile(self.confidence, n_eff - 1)
        # Variance of a weighted mean: reliability-weighted sample (co)variance / n_eff,
        # which simplifies to scatter / (sum w * (n_eff - 1)).
        scale = t * t / (self._weight * (n_eff - 1))
        a, b = self._mean_trace, self._mean_grad
        quad_a = b * b - scale * self._scatter_grad
        quad_k = a * b - scale * self._scatter_cross
        quad_c = a * a - scale * self._scatter_trace
        root = math.sqrt(max(quad_k * quad_k - quad_a * quad_c, 0.0))
        low = 0.0 if quad_c <= 0 else quad_c / (quad_k + root)
        high = (quad_k + root) / quad_a if quad_a > 0 else math.inf
        return min(max(low, 0.0), ratio), max(high, ratio)


#: From this many degrees of freedom on, the t quantile comes from its expansion in 1/dof:
#: within 2e-7 of the exact value at 20 and closer above (the grid's error is about 1e-6), and
#: a hundred times cheaper (it is computed at every noise update).
T_SERIES_DOF = 20


def student_t_quantile(confidence: float, dof: float) -> float:
    """Two-sided Student-t critical value t with P(|T| <= t) = confidence, for real dof >= 1.

    Below T_SERIES_DOF: with T = sqrt(dof) * tan(theta), theta has density proportional to
    cos(theta)^(dof - 1) on (-pi/2, pi/2), a smooth bounded integrand; its cumulative integral
    is inverted on a grid. From T_SERIES_DOF on: Fisher's expansion of t in the normal quantile
    z and 1/dof to the fourth order (Abramowitz and Stegun 26.7.5).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1; got {confidence}.")
    if not dof >= 1:
        raise ValueError(f"the t quantile here needs at least 1 degree of freedom; got {dof}.")
    if dof >= T_SERIES_DOF:
        z = _normal_quantile((1 + confidence) / 2)
        z2 = z * z
        g1 = (z2 + 1) * z / 4
        g2 = ((5 * z2 + 16) * z2 + 3) * z / 96
        g3 = (((3 * z2 + 19) * z2 + 17) * z2 - 15) * z / 384
        g4 = ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) * z / 92160
        return z + (g1 + (g2 + (g3 + g4 / dof) / dof) / dof) / dof
    # Beyond 12/sqrt(dof - 1) radians the integrand is below exp(-72): cut the grid there.
    upper = math.pi / 2 if dof < 2 else min(math.pi / 2, 12.0 / math.sqrt(dof - 1))
    theta = np.linspace(0.0, upper, 4097)
    density = np.cos(theta) ** (dof - 1)
    cumulative = np.concatenate(([0.0], np.cumsum((density[1:] + density[:-1]) / 2)))
    angle = float(np.interp(confidence * cumulative[-1], cumulative, theta))
    return math.sqrt(dof) * math.tan(angle)


@functools.lru_cache(maxsize=8)
def _normal_quantile(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


def statistical_efficiency(batch_size, b_noise: float):
    """Progress per example at batch_size relative to tiny batches: 1 / (1 + B / B_noise).

    ``batch_size`` may be a number or a numpy array; ``b_noise`` may be math.inf (efficiency 1).
    """
    batch = np.asarray(batch_size, dtype=float)
    if not (np.all(np.isfinite(batch)) and np.all(batch > 0)):
        raise ValueError(f"batch_size must be positive and finite; got {batch_size}.")
    if math.isnan(b_noise) or b_noise < 0:
        raise ValueError(f"b_noise must be >= 0 (math.inf allowed); got {b_noise}.")
    result = np.ones_like(batch) if math.isinf(b_noise) else b_noise / (b_noise + batch)
    return float(result) if result.ndim == 0 else result
