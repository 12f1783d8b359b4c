"""bsmon.stats.noise against exact ground truth.

The synthetic problems hold their parameters fixed (learning rate 0), so the population of
per-example gradients is known exactly: torch.func gives every example's gradient, and |G|^2 and
tr(Sigma) (population covariance) follow from that matrix. Batches are drawn i.i.d. with
replacement, for which E|G_B|^2 = |G|^2 + tr(Sigma)/B holds exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from bsmon.stats import (
    DEFAULT_HORIZON_SAMPLES,
    WEAK_RATIO,
    GradNormPoints,
    NoiseScaleTracker,
    NoiseStepEstimate,
    microbatch_points,
    per_example_points,
    statistical_efficiency,
    step_estimate,
    student_t_quantile,
)

POPULATION = 2048
# At fixed parameters there is nothing to forget, so the accuracy tests average over all steps.
NO_FORGETTING = 1e12


# --------------------------------------------------------------------------------------------
# Synthetic problems with exact per-example gradients


@dataclass
class Problem:
    model: torch.nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable[..., torch.Tensor]  # F.mse_loss or F.cross_entropy; takes reduction=
    per_example: np.ndarray  # POPULATION x n_params, exact per-example gradients

    @property
    def mean_grad(self) -> np.ndarray:
        return self.per_example.mean(axis=0)

    @property
    def grad_sq(self) -> float:
        return float(self.mean_grad @ self.mean_grad)

    @property
    def trace_sigma(self) -> float:
        return float(((self.per_example - self.mean_grad) ** 2).sum(axis=1).mean())

    @property
    def b_simple(self) -> float:
        return self.trace_sigma / self.grad_sq


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _set_params(model: torch.nn.Module, values: list[torch.Tensor]) -> torch.nn.Module:
    with torch.no_grad():
        for param, value in zip(model.parameters(), values, strict=True):
            param.copy_(value)
    return model


# Each problem sits near, not at, its best parameters, so |G| is small but non-zero and
# B_simple comes out at a few hundred.


def _linear_regression(gen: torch.Generator):
    dim = 128
    inputs = _randn(gen, POPULATION, dim)
    w_true = _randn(gen, 1, dim)
    targets = inputs @ w_true.T + _randn(gen, POPULATION, 1)
    model = torch.nn.Linear(dim, 1, bias=False).double()
    _set_params(model, [w_true + 0.07 * _randn(gen, 1, dim)])
    return model, inputs, targets, F.mse_loss


def _softmax_regression(gen: torch.Generator):
    dim, classes = 20, 5
    inputs = _randn(gen, POPULATION, dim)
    w_true = _randn(gen, classes, dim)
    targets = torch.multinomial(torch.softmax(inputs @ w_true.T, 1), 1, generator=gen)[:, 0]
    model = torch.nn.Linear(dim, classes).double()
    _set_params(model, [0.3 * w_true, torch.zeros(classes, dtype=torch.float64)])
    return model, inputs, targets, F.cross_entropy


def _mlp(gen: torch.Generator):
    dim, hidden, classes = 16, 32, 10

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)
        ).double()

    # A confident teacher (weights ~ 3/sqrt(fan_in)) labels the inputs by sampling its softmax;
    # the student is the teacher plus noise.
    shapes = [p.shape for p in net().parameters()]
    teacher_values = [3 * _randn(gen, *s) / math.sqrt(s[-1] if len(s) > 1 else 1) for s in shapes]
    teacher = _set_params(net(), teacher_values)
    inputs = _randn(gen, POPULATION, dim)
    with torch.no_grad():
        targets = torch.multinomial(torch.softmax(teacher(inputs), 1), 1, generator=gen)[:, 0]
    model = _set_params(net(), [v + 0.15 * _randn(gen, *v.shape) for v in teacher_values])
    return model, inputs, targets, F.cross_entropy


def _build(factory) -> Problem:
    torch.set_num_threads(1)
    model, inputs, targets, loss = factory(torch.Generator().manual_seed(1234))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, x, y):
        return loss(functional_call(model, p, (x[None],)), y[None])

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    per_example = torch.cat([g.reshape(POPULATION, -1) for g in grads.values()], dim=1)
    return Problem(model, inputs, targets, loss, per_example.numpy())


FACTORIES = {"linear": _linear_regression, "softmax": _softmax_regression, "mlp": _mlp}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def problem(request) -> Problem:
    return _build(FACTORIES[request.param])


@pytest.fixture(scope="module")
def softmax_problem() -> Problem:
    return _build(_softmax_regression)


def accumulate(
    problem: Problem, rng: np.random.Generator, micro_size: int, micro_batches: int,
    reduction: str = "mean", loss_scale: float = 1.0,
) -> list[float]:
    """Real gradient accumulation: |.grad|^2 after each backward pass."""
    problem.model.zero_grad(set_to_none=True)
    squared = []
    for _ in range(micro_batches):
        idx = torch.from_numpy(rng.integers(0, POPULATION, micro_size))
        loss = problem.loss(problem.model(problem.inputs[idx]), problem.targets[idx],
                            reduction=reduction)
        if reduction == "mean":
            loss = loss / micro_batches
        (loss * loss_scale).backward()
        squared.append(float(sum(p.grad.square().sum() for p in problem.model.parameters())))
    return squared


def hook_sums(rows: np.ndarray, reduction: str = "mean") -> tuple[float, float]:
    """What per-example backward hooks report for a batch: (sum_i |g_i|^2, |.grad|^2), where each
    g_i carries the loss's 1/B factor under a mean reduction."""
    seen = rows / len(rows) if reduction == "mean" else rows
    return float((seen**2).sum()), float((seen.sum(axis=0) ** 2).sum())


def per_example_step(problem: Problem, rng: np.random.Generator, batch_size: int,
                     reduction: str = "mean") -> GradNormPoints:
    rows = problem.per_example[rng.integers(0, POPULATION, batch_size)]
    return per_example_points(batch_size, *hook_sums(rows, reduction))


# --------------------------------------------------------------------------------------------
# 1. Accuracy and band against the exact population values


def test_per_example_gradients_match_autograd(problem):
    """The vmap gradients are the same function the accumulation path differentiates."""
    problem.model.zero_grad(set_to_none=True)
    idx = torch.arange(0, POPULATION, 7)
    problem.loss(problem.model(problem.inputs[idx]), problem.targets[idx]).backward()
    autograd = torch.cat([p.grad.reshape(-1) for p in problem.model.parameters()]).numpy()
    np.testing.assert_allclose(autograd, problem.per_example[idx.numpy()].mean(0), rtol=1e-10,
                               atol=1e-14)


@pytest.mark.parametrize("estimator", ["microbatch", "per_example"])
def test_estimate_matches_exact_noise_scale(problem, estimator):
    assert 100 < problem.b_simple < 1000, "test problem should have B_simple of a few hundred"
    rng = np.random.default_rng(7)
    tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
    if estimator == "microbatch":
        micro_size, micro_batches, steps = 128, 4, 600
        for _ in range(steps):
            points = microbatch_points([micro_size] * micro_batches,
                                       accumulate(problem, rng, micro_size, micro_batches))
            tracker.update(step_estimate(points), micro_size * micro_batches)
    else:
        batch_size, steps = 128, 400
        for _ in range(steps):
            tracker.update(step_estimate(per_example_step(problem, rng, batch_size)), batch_size)

    result = tracker.result()
    exact = problem.b_simple
    assert result.steps == steps
    assert result.b_simple == pytest.approx(exact, rel=0.10)
    assert result.trace_sigma == pytest.approx(problem.trace_sigma, rel=0.10)
    assert result.grad_sq == pytest.approx(problem.grad_sq, rel=0.10)
    assert result.b_simple_low <= exact <= result.b_simple_high
    assert not result.weak and result.reason is None


TINY = [(4, 1), (-2, 3), (1, -1)]  # G = (1, 1): |G|^2 = 2, tr(Sigma) = 26/3, B_simple = 13/3


def _tiny_exact() -> tuple[list[Fraction], Fraction, Fraction]:
    """Mean gradient, |G|^2 and tr(Sigma) of TINY in exact arithmetic."""
    n = len(TINY)
    mean = [Fraction(sum(g[c] for g in TINY), n) for c in range(2)]
    grad_sq = sum(m * m for m in mean)
    trace = sum((g[c] - mean[c]) ** 2 for g in TINY for c in range(2)) / n
    return mean, grad_sq, trace


def _tiny_batches(size: int) -> list[tuple[tuple[int, int], ...]]:
    """Every ordered batch drawn from TINY with replacement; all are equally likely."""
    return list(product(TINY, repeat=size))


def _cumulative_sq(micro_means: np.ndarray) -> list[float]:
    """|.grad|^2 after each pass when .grad accumulates micro-batch means / m."""
    return list((np.cumsum(micro_means / len(micro_means), axis=0) ** 2).sum(axis=1))


def test_step_estimates_are_exactly_unbiased():
    """Averaged over every possible batch, each estimator returns exactly |G|^2 and tr(Sigma)."""
    _, grad_sq, trace = _tiny_exact()
    assert (grad_sq, trace) == (2, Fraction(26, 3))

    per_example = [step_estimate(per_example_points(3, *hook_sums(np.array(batch, float))))
                   for batch in _tiny_batches(3)]
    micro_1x3 = [step_estimate(microbatch_points([1] * 3, _cumulative_sq(np.array(batch, float))))
                 for batch in _tiny_batches(3)]
    micro_2x2 = [step_estimate(microbatch_points(
                     [2, 2], _cumulative_sq(np.array(batch, float).reshape(2, 2, 2).mean(axis=1))))
                 for batch in _tiny_batches(4)]
    for estimates in (per_example, micro_1x3, micro_2x2):
        assert np.mean([e.grad_sq for e in estimates]) == pytest.approx(float(grad_sq), rel=1e-12)
        assert np.mean([e.trace_sigma for e in estimates]) == pytest.approx(float(trace), rel=1e-12)


def test_two_sizes_reproduce_the_closed_forms_and_ols_is_exact_on_a_line():
    est = step_estimate(GradNormPoints((16, 64), (5.0, 2.0)))
    assert est.grad_sq == pytest.approx((64 * 2.0 - 16 * 5.0) / (64 - 16), rel=1e-14)
    assert est.trace_sigma == pytest.approx((5.0 - 2.0) / (1 / 16 - 1 / 64), rel=1e-14)
    assert (est.b_small, est.b_big) == (16, 64)

    sizes = (8, 16, 24, 32)
    line = step_estimate(GradNormPoints(sizes, tuple(0.25 + 40.0 / b for b in sizes)))
    assert line.grad_sq == pytest.approx(0.25, rel=1e-12)
    assert line.trace_sigma == pytest.approx(40.0, rel=1e-12)


def test_data_parallel_points_reduce_to_the_two_size_estimator():
    """Repeated local sizes: the fit passes through the mean of the local norms."""
    local = (3.0, 5.0, 4.0, 6.0)
    points = GradNormPoints((32,) * 4 + (128,), local + (1.5,))
    two_size = GradNormPoints((32, 128), (float(np.mean(local)), 1.5))
    pooled, reference = step_estimate(points), step_estimate(two_size)
    assert pooled.grad_sq == pytest.approx(reference.grad_sq, rel=1e-12)
    assert pooled.trace_sigma == pytest.approx(reference.trace_sigma, rel=1e-12)


# --------------------------------------------------------------------------------------------
# 2. The hand-calculation mistakes of reference section 5, each off by its predicted factor


def test_variance_of_batch_means_is_too_small_by_exactly_b():
    mean, grad_sq, trace = _tiny_exact()
    batch_size = 3
    batches = _tiny_batches(batch_size)
    variance_of_means = sum(
        (Fraction(sum(g[c] for g in batch), batch_size) - mean[c]) ** 2
        for batch in batches for c in range(2)
    ) / len(batches)
    assert variance_of_means / grad_sq == (trace / grad_sq) / batch_size


def test_naive_grad_sq_from_the_same_k_gradients_saturates_below_k(softmax_problem):
    k = 4
    _, grad_sq, trace = _tiny_exact()
    b_simple = trace / grad_sq
    draws = _tiny_batches(k)
    # Sample variance (Bessel) and |mean|^2 of the same K gradients, in exact arithmetic.
    variance = naive_grad_sq = Fraction(0)
    for draw in draws:
        draw_mean = [Fraction(sum(g[c] for g in draw), k) for c in range(2)]
        variance += sum((g[c] - draw_mean[c]) ** 2 for g in draw for c in range(2)) / (k - 1)
        naive_grad_sq += sum(m * m for m in draw_mean)
    assert variance / len(draws) == trace  # the variance part is right ...
    assert variance / naive_grad_sq == k * b_simple / (k + b_simple)  # ... the ratio is capped

    # "About 4, then flat": keep the noise, shrink the mean gradient so B_simple grows 16x. The
    # naive ratio with K = 4 barely moves; bsmon, on batches drawn alongside, follows the truth.
    rng = np.random.default_rng(3)
    centred = softmax_problem.per_example - softmax_problem.mean_grad
    batch_size, steps = 1024, 800
    naive_values, exact_values = [], []
    for shrink in (1.0, 2.0, 4.0):
        population = centred + softmax_problem.mean_grad / shrink
        exact = softmax_problem.b_simple * shrink**2
        variance_sum = naive_sum = 0.0
        tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
        for _ in range(steps):
            rows = population[rng.integers(0, POPULATION, batch_size)]
            head = rows[:k]
            variance_sum += ((head - head.mean(axis=0)) ** 2).sum() / (k - 1)
            naive_sum += (head.mean(axis=0) ** 2).sum()
            tracker.update(step_estimate(per_example_points(batch_size, *hook_sums(rows))),
                           batch_size)
        naive_values.append(variance_sum / naive_sum)
        exact_values.append(exact)
        assert naive_values[-1] == pytest.approx(k * exact / (k + exact), rel=0.05)
        assert tracker.result().b_simple == pytest.approx(exact, rel=0.10)
    assert exact_values[-1] / exact_values[0] == pytest.approx(16)
    assert max(naive_values) / min(naive_values) < 1.1


def test_per_example_gradients_of_a_mean_loss_shrink_trace_by_b_squared(softmax_problem):
    """Treating the hook values (which carry 1/B) as per-example gradients: tr(Sigma) / B^2."""
    rng = np.random.default_rng(5)
    batch_size = 128  # a power of two, so scaling by 1/B is exact in binary floating point
    rows = softmax_problem.per_example[rng.integers(0, POPULATION, batch_size)]
    seen_by_hooks = rows / batch_size
    wrong = ((seen_by_hooks - seen_by_hooks.mean(0)) ** 2).sum() / (batch_size - 1)
    right = ((rows - rows.mean(0)) ** 2).sum() / (batch_size - 1)
    assert wrong * batch_size**2 == right
    assert step_estimate(per_example_points(batch_size, *hook_sums(rows))).trace_sigma == (
        pytest.approx(right, rel=1e-12))


def test_averaging_per_step_ratios_is_biased_while_the_ratio_of_averages_is_not(softmax_problem):
    exact = softmax_problem.b_simple
    rng = np.random.default_rng(11)
    batch_size, steps = 32, 3000  # B_big well below B_simple: per-step |G|^2 is mostly noise
    tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
    ratios = []
    for _ in range(steps):
        est = step_estimate(per_example_step(softmax_problem, rng, batch_size))
        tracker.update(est, batch_size)
        ratios.append(est.trace_sigma / est.grad_sq)
    result = tracker.result()
    ratios = np.array(ratios)
    positive = ratios[ratios > 0]

    assert result.negative_grad_sq_steps == np.sum(ratios < 0) > 0.15 * steps
    assert result.b_simple == pytest.approx(exact, rel=0.10)
    # Steps whose |G|^2 estimate lands near zero make single ratios explode, so their mean has no
    # finite expectation and never settles ...
    assert abs(ratios).max() > 100 * exact
    # ... and dropping the negative ones gives biased answers in either direction, depending on
    # the summary: the mean is pulled up (Jensen, 1/x convex), the median down.
    assert positive.mean() > 1.5 * exact
    assert np.median(positive) < 0.85 * exact


# --------------------------------------------------------------------------------------------
# 3. Invariance to the loss convention and scaling


def test_microbatch_b_simple_is_identical_for_mean_summed_and_scaled_losses(softmax_problem):
    results = []
    for reduction, loss_scale in [("mean", 1.0), ("sum", 1.0), ("mean", 65536.0)]:
        rng = np.random.default_rng(21)  # the same batches for every convention
        tracker = NoiseScaleTracker()
        for _ in range(40):
            squared = accumulate(softmax_problem, rng, 32, 4, reduction, loss_scale)
            tracker.update(step_estimate(microbatch_points([32] * 4, squared)), 128)
        results.append(tracker.result())
    mean, summed, scaled = results
    # Summing instead of averaging 4 micro-batches of 32 multiplies .grad by 32 * 4.
    assert summed.grad_sq == pytest.approx(mean.grad_sq * 128**2, rel=1e-9)
    assert scaled.grad_sq == pytest.approx(mean.grad_sq * 65536.0**2, rel=1e-9)
    for other in (summed, scaled):
        assert other.b_simple == pytest.approx(mean.b_simple, rel=1e-9)
        assert other.b_simple_low == pytest.approx(mean.b_simple_low, rel=1e-9)
        assert other.b_simple_high == pytest.approx(mean.b_simple_high, rel=1e-9)


def test_per_example_b_simple_is_identical_for_mean_and_summed_loss(softmax_problem):
    results = []
    for reduction in ("mean", "sum"):
        rng = np.random.default_rng(22)
        tracker = NoiseScaleTracker()
        for _ in range(40):
            tracker.update(step_estimate(per_example_step(softmax_problem, rng, 64, reduction)), 64)
        results.append(tracker.result())
    mean, summed = results
    assert summed.trace_sigma == pytest.approx(mean.trace_sigma * 64**2, rel=1e-9)
    assert summed.b_simple == pytest.approx(mean.b_simple, rel=1e-9)


# --------------------------------------------------------------------------------------------
# 4. Edge cases, weighting and the band


def _estimate(grad_sq: float, trace_sigma: float, b_big: float = 64.0) -> NoiseStepEstimate:
    return NoiseStepEstimate(grad_sq=grad_sq, trace_sigma=trace_sigma, b_small=1.0, b_big=b_big)


def test_no_steps_says_what_is_needed():
    result = NoiseScaleTracker().result()
    assert result.b_simple is None and result.steps == 0 and result.samples == 0
    assert "two batch sizes" in result.reason


def test_one_step_shows_progress_not_a_value_without_a_band():
    tracker = NoiseScaleTracker()
    tracker.update(_estimate(0.5, 100.0), 64)
    result = tracker.result()
    assert result.b_simple is None and result.b_simple_low is None and result.b_simple_high is None
    assert result.reason.startswith("measuring: 1 step, no uncertainty band yet")
    assert result.grad_sq == pytest.approx(0.5) and result.trace_sigma == pytest.approx(100.0)
    for _ in range(2):  # decayed weights: 2 steps count as slightly fewer than 2 independent ones
        tracker.update(_estimate(0.5, 100.0), 64)
    assert tracker.result().b_simple == pytest.approx(200.0)  # the band exists


def test_zero_variance_collapses_the_band_to_the_point():
    tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
    for _ in range(5):
        tracker.update(_estimate(0.5, 100.0), 64)
    result = tracker.result()
    assert result.b_simple_low == result.b_simple == result.b_simple_high == pytest.approx(200.0)


def test_negative_grad_sq_mean_gives_none_with_a_reason_and_counts_steps():
    tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
    for grad_sq in (0.3, -0.5, 0.1, -0.4):
        tracker.update(_estimate(grad_sq, 100.0), 64)
    result = tracker.result()
    assert result.b_simple is None and result.b_simple_high is None
    assert result.negative_grad_sq_steps == 2 and result.steps == 4
    assert result.grad_sq == pytest.approx(-0.125)
    assert "noise dominates" in result.reason and "after 4 steps" in result.reason
    assert "raise B_big" in result.reason


def test_unresolved_grad_sq_gives_an_unbounded_band():
    tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
    for i in range(10):
        tracker.update(_estimate(1.1 if i % 2 else -0.9, 100.0), 64)
    result = tracker.result()
    assert result.b_simple == pytest.approx(1000.0)
    assert result.b_simple_high == math.inf
    assert 0 < result.b_simple_low < result.b_simple
    assert "no upper end" in result.reason


def test_negative_trace_is_clamped_after_averaging():
    tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
    for trace in (3.0, -5.0, -1.0):
        tracker.update(_estimate(1.0, trace), 64)
    result = tracker.result()
    assert result.trace_sigma == pytest.approx(-1.0)
    assert result.b_simple == 0.0 and result.b_simple_low == 0.0
    assert "no gradient noise resolved" in result.reason


def test_weak_flag_when_b_big_is_far_below_b_simple():
    def run(b_big):
        tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
        for grad_sq in (0.9, 1.1, 1.0):
            tracker.update(_estimate(grad_sq, 2000.0, b_big), b_big)
        return tracker.result()

    weak = run(2000.0 / (WEAK_RATIO * 1.1))
    strong = run(2000.0 / (WEAK_RATIO * 0.9))
    assert weak.weak and "weak" in weak.reason and weak.b_simple is not None
    assert not strong.weak


def test_weights_are_the_bias_corrected_ema_with_horizon_in_samples():
    """Same samples in small or large steps: identical weighting of the same data."""
    horizon = 1000.0
    blocks = [(3.0, 50.0, 640), (1.0, 80.0, 1280), (2.0, 60.0, 640)]  # grad_sq, trace, samples

    def run(batch_size):
        tracker = NoiseScaleTracker(horizon_samples=horizon)
        ema, correction = 0.0, 1.0
        for grad_sq, trace, samples in blocks:
            for _ in range(samples // batch_size):
                tracker.update(_estimate(grad_sq, trace), batch_size)
                beta = math.exp(-batch_size / horizon)
                ema, correction = beta * ema + (1 - beta) * grad_sq, correction * beta
        return tracker.result(), ema / (1 - correction)

    small, adam_small = run(64)
    large, adam_large = run(320)
    assert small.grad_sq == pytest.approx(adam_small, rel=1e-12)  # Adam-style correction
    assert large.grad_sq == pytest.approx(adam_large, rel=1e-12)
    assert small.grad_sq == pytest.approx(large.grad_sq, rel=1e-12)
    assert small.trace_sigma == pytest.approx(large.trace_sigma, rel=1e-12)
    assert small.samples == large.samples == 2560
    assert (small.steps, large.steps) == (40, 8)


def test_band_matches_fieller_computed_independently():
    """Equal weights (no forgetting), 6 steps: t for 5 dof from tables, np.cov for (co)variances."""
    grad_sq = np.array([0.8, 1.3, 0.6, 1.1, 1.4, 0.9])
    trace = np.array([210.0, 260.0, 190.0, 240.0, 250.0, 230.0])
    tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
    for g, t in zip(grad_sq, trace):
        tracker.update(_estimate(g, t), 64)
    result = tracker.result()

    t_crit = 2.5705818366  # two-sided 95%, 5 degrees of freedom
    cov = np.cov(trace, grad_sq, ddof=1) / len(trace)  # covariance of the two means
    a, b = trace.mean(), grad_sq.mean()
    quadratic = [b * b - t_crit**2 * cov[1, 1], -2 * (a * b - t_crit**2 * cov[0, 1]),
                 a * a - t_crit**2 * cov[0, 0]]
    low, high = sorted(np.roots(quadratic))
    assert result.b_simple == pytest.approx(a / b, rel=1e-9)
    assert result.b_simple_low == pytest.approx(low, rel=1e-5)
    assert result.b_simple_high == pytest.approx(high, rel=1e-5)


def _band_run(problem: Problem, rng: np.random.Generator, steps: int, batch_size: int = 64):
    tracker = NoiseScaleTracker(horizon_samples=NO_FORGETTING)
    for _ in range(steps):
        tracker.update(step_estimate(per_example_step(problem, rng, batch_size)), batch_size)
    return tracker.result()


def test_band_shrinks_with_more_steps(softmax_problem):
    rng = np.random.default_rng(31)
    widths = []
    for steps in (100, 400, 1600):
        result = _band_run(softmax_problem, rng, steps)
        widths.append(result.b_simple_high - result.b_simple_low)
    # Width goes as 1/sqrt(steps): about 4x narrower for 16x the steps.
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] > 2.5


def test_band_covers_the_exact_value_at_the_nominal_rate(softmax_problem):
    rng = np.random.default_rng(41)
    exact = softmax_problem.b_simple
    runs = 200
    covered = sum(r.b_simple_low <= exact <= r.b_simple_high
                  for r in (_band_run(softmax_problem, rng, 30) for _ in range(runs)))
    # Binomial(200, 0.95): 180..198 holds with probability > 0.999; too wide a band fails too.
    assert 180 <= covered <= 198


def test_student_t_quantile_matches_tables():
    for dof, expected in [(1, 12.7062047), (2, 4.30265273), (5, 2.57058184), (30, 2.04227246),
                          (1000, 1.96233908), (1e7, 1.95996398)]:
        assert student_t_quantile(0.95, dof) == pytest.approx(expected, rel=1e-5)
    assert student_t_quantile(0.99, 4) == pytest.approx(4.60409487, rel=1e-5)
    # either side of T_SERIES_DOF, where the grid hands over to the expansion in 1/dof
    for confidence, dof, expected in [(0.95, 19, 2.09302405), (0.95, 20, 2.08596345), (0.99, 20, 2.84533971),
                                      (0.95, 100, 1.98397152), (0.9, 60, 1.67064887)]:
        assert student_t_quantile(confidence, dof) == pytest.approx(expected, rel=1e-6)


def test_statistical_efficiency():
    assert statistical_efficiency(256, 256) == 0.5
    assert statistical_efficiency(100, 900) == pytest.approx(0.9)
    assert statistical_efficiency(64, math.inf) == 1.0
    assert statistical_efficiency(64, 0.0) == 0.0
    with pytest.raises(ValueError, match="batch_size"):
        statistical_efficiency(0, 100)
    with pytest.raises(ValueError, match="b_noise"):
        statistical_efficiency(32, -1)


def test_point_builders_skip_unusable_steps():
    assert microbatch_points([16], [1.0]) is None
    assert microbatch_points([16, 16], [1.0, math.inf]) is None
    assert per_example_points(1, 1.0, 1.0) is None
    assert per_example_points(32, math.nan, 1.0) is None
    points = microbatch_points([16, 16, 16], [1.0, 3.0, 6.0])
    assert points.batch_sizes == (16, 32, 48)
    assert points.sq_norms == pytest.approx((9.0, 3.0 * 2.25, 6.0))
    assert per_example_points(8, 0.5, 0.2) == GradNormPoints((1, 8), (4.0, 0.2))


@pytest.mark.parametrize("sizes", [[34, 33, 33], [40, 20, 10, 30]])
def test_unequal_micro_batches_give_the_exact_line_in_the_mean_convention(sizes):
    # Each pass adds its micro-batch mean with weight 1/m: E a_j = (j^2 G + T sum_{i<=j} 1/b_i) / m^2.
    m = len(sizes)
    expected = [(j * j * 2.0 + 1000.0 * sum(1 / b for b in sizes[:j])) / m**2 for j in range(1, m + 1)]
    estimate = step_estimate(microbatch_points(sizes, expected))
    assert estimate.grad_sq == pytest.approx(2.0) and estimate.trace_sigma == pytest.approx(1000.0)


@pytest.mark.parametrize("convention", ["mean", "sum"])
def test_a_ragged_last_micro_batch_is_left_out_whatever_the_reduction(convention):
    sizes = [32, 32, 32, 7]
    cumulative = np.cumsum(sizes)
    if convention == "sum":  # .grad = sum of per-example gradients: E a_j = S_j^2 G + S_j T
        expected = [s * s * 2.0 + s * 1000.0 for s in cumulative]
    else:
        expected = [(j * j * 2.0 + 1000.0 * sum(1 / b for b in sizes[:j])) / 16 for j in range(1, 5)]
    points = microbatch_points(sizes, expected)
    assert points.batch_sizes == (32, 64, 96)  # the equal passes only
    estimate = step_estimate(points)
    assert estimate.trace_sigma / estimate.grad_sq == pytest.approx(500.0)


def test_bad_input_raises_with_a_message():
    with pytest.raises(ValueError, match="one squared norm per batch size"):
        GradNormPoints((1, 8), (1.0,))
    with pytest.raises(ValueError, match="two different batch sizes"):
        GradNormPoints((8, 8), (1.0, 2.0))
    with pytest.raises(ValueError, match="finite and positive"):
        GradNormPoints((0, 8), (1.0, 2.0))
    with pytest.raises(ValueError, match="one accumulated squared norm per micro-batch"):
        microbatch_points([16, 16], [1.0])
    with pytest.raises(ValueError, match="horizon_samples"):
        NoiseScaleTracker(horizon_samples=0)
    with pytest.raises(ValueError, match="confidence"):
        NoiseScaleTracker(confidence=1.5)
    with pytest.raises(ValueError, match="skip such steps"):
        NoiseScaleTracker().update(_estimate(math.nan, 1.0), 64)
    with pytest.raises(ValueError, match="samples"):
        NoiseScaleTracker().update(_estimate(1.0, 1.0), 0)


def test_default_horizon_gives_the_documented_effective_steps():
    """Steady state of an EMA with decay beta: n_eff = (1 + beta) / (1 - beta), about 2H/B."""
    for batch_size, documented in [(1024, 200), (8192, 25)]:
        tracker = NoiseScaleTracker()
        for _ in range(20 * DEFAULT_HORIZON_SAMPLES // batch_size):
            tracker.update(_estimate(1.0, 100.0), batch_size)
        beta = math.exp(-batch_size / DEFAULT_HORIZON_SAMPLES)
        assert tracker.effective_steps == pytest.approx((1 + beta) / (1 - beta), rel=1e-6)
        assert tracker.effective_steps == pytest.approx(documented, rel=0.05)
