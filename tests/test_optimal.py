"""The throughput fit and the optimal batch size, checked against closed forms worked out by hand."""

import math

import numpy as np
import pytest

from bsmon.profiling import Profile
from bsmon.stats.optimal import StableRecommendation, goodput, optimal_batch_size
from bsmon.stats.throughput import ThroughputPoint, fit_step_time

DOUBLING = [2**k for k in range(11)]  # 1 .. 1024


def point(batch_size, step_time, source="profile"):
    return ThroughputPoint(batch_size, step_time, batch_size / step_time, source=source)


def line_points(alpha, beta, sizes=DOUBLING):
    return [point(b, alpha + beta * b) for b in sizes]


def capped_linear_points(k_max, sizes):
    """The seed note's throughput r = min(B, k_max) samples/s: step time 1 s up to k_max, then B/k_max."""
    return [point(b, b / min(b, k_max)) for b in sizes]


def hand_goodput(batch_size, alpha, beta, b_noise):
    return batch_size / (alpha + beta * batch_size) / (1 + batch_size / b_noise)


# -- the step-time fit ------------------------------------------------------------------------------


def test_fit_recovers_an_exact_line():
    fit = fit_step_time(line_points(0.016, 0.001))
    assert fit.alpha_s == pytest.approx(0.016, rel=1e-12)
    assert fit.beta_s_per_sample == pytest.approx(0.001, rel=1e-12)
    assert fit.r_max == pytest.approx(1000.0, rel=1e-12)
    assert fit.b_half == pytest.approx(16.0, rel=1e-12)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)
    assert fit.max_rel_residual < 1e-12
    assert fit.fits and fit.reason is None


def test_knee_is_smallest_measured_size_within_90_percent_of_best():
    # r(B) = 1000*B/(16+B): best measured is r(1024) = 984.6; r(128) = 888.9 >= 886.2 > r(64) = 800.
    assert fit_step_time(line_points(0.016, 0.001)).knee_batch == 128


def test_fit_weighs_relative_residuals_so_b_half_survives_timing_noise():
    # B_half = 8 measured up to 4096 with 3% multiplicative noise. An unweighted fit lets the
    # largest sizes decide and misses B_half by ~80% on average; the relative fit stays within 10%.
    rng = np.random.default_rng(0)
    sizes = [2**k for k in range(13)]
    for _ in range(20):
        noise = np.exp(rng.normal(0.0, 0.03, len(sizes)))
        points = [point(b, (8e-5 + 1e-5 * b) * n) for b, n in zip(sizes, noise)]
        assert fit_step_time(points).b_half == pytest.approx(8.0, rel=0.10)


def test_fit_keeps_intercept_nonnegative():
    # Slightly superlinear step time: the unconstrained line has a negative intercept.
    points = [point(b, 1e-3 * b * (1 + b / 2048)) for b in DOUBLING]
    fit = fit_step_time(points)
    assert fit.alpha_s == 0.0
    assert fit.b_half == 0.0
    assert fit.beta_s_per_sample > 0


def test_step_time_that_does_not_grow_does_not_fit():
    fit = fit_step_time([point(b, 0.02) for b in (1, 2, 4, 8)])
    assert not fit.fits
    assert fit.beta_s_per_sample == 0.0
    assert math.isinf(fit.r_max) and math.isinf(fit.b_half)
    assert "does not grow" in fit.reason


def test_kinked_step_time_does_not_fit():
    fit = fit_step_time(capped_linear_points(8, range(1, 33)))
    assert not fit.fits
    assert "off the line" in fit.reason


def test_two_sizes_are_an_untested_line():
    fit = fit_step_time(line_points(0.016, 0.001, sizes=(8, 64)))
    assert fit.b_half == pytest.approx(16.0)
    assert not fit.fits and "two batch sizes" in fit.reason


def test_repeated_points_at_one_size_are_averaged_into_the_fit():
    points = line_points(0.016, 0.001) + [point(64, 0.08 * 1.01, "live"), point(64, 0.08 * 0.99, "live")]
    assert fit_step_time(points).b_half == pytest.approx(16.0, rel=1e-3)


@pytest.mark.parametrize("points", [[], [point(8, 0.1)], [point(8, 0.1), point(8, 0.2)]])
def test_fit_needs_two_distinct_sizes(points):
    with pytest.raises(ValueError, match="two"):
        fit_step_time(points)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0, step_time_s=1.0, samples_per_s=0.0), "batch_size"),
        (dict(batch_size=True, step_time_s=1.0, samples_per_s=1.0), "int"),
        (dict(batch_size=4, step_time_s=-1.0, samples_per_s=-4.0), "step_time_s"),
        (dict(batch_size=4, step_time_s=1.0, samples_per_s=5.0), "must equal"),
        (dict(batch_size=4, step_time_s=1.0, samples_per_s=4.0, source="guess"), "source"),
        (dict(batch_size=4, step_time_s=1.0, samples_per_s=4.0, peak_memory_bytes=-1), "peak_memory"),
    ],
)
def test_throughput_point_rejects_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ThroughputPoint(**kwargs)


# -- the optimum under the linear model -------------------------------------------------------------


@pytest.mark.parametrize("alpha, beta, b_noise, expected", [
    (0.016, 0.001, 256, 64),      # B_half 16
    (0.004, 0.001, 1024, 64),     # B_half 4
    (0.025, 0.001, 4096, 320),    # B_half 25
    (0.09, 0.01, 6400, 240),      # B_half 9
])
def test_optimum_is_sqrt_of_b_half_times_b_noise(alpha, beta, b_noise, expected):
    assert math.sqrt(alpha / beta * b_noise) == pytest.approx(expected)
    rec = optimal_batch_size(line_points(alpha, beta), b_noise, max_batch=1 << 14)
    assert rec.batch_size == expected
    assert rec.micro_batch is None and rec.accumulation is None
    assert f"sqrt(B_half*B_noise) = {expected}" in rec.reason


def test_non_integer_optimum_goes_to_the_better_multiple_of_8():
    # B_half = 10, B_noise = 300: B* = 54.77. Time to target ~ x + 1/x with x = B/B*:
    # 56 gives 2.0005, 48 gives 2.0174.
    rec = optimal_batch_size(line_points(0.01, 0.001), 300)
    assert rec.batch_size == 56


def test_small_optimum_is_not_rounded():
    rec = optimal_batch_size(line_points(0.001, 0.001), 9)  # B* = sqrt(1*9) = 3
    assert rec.batch_size == 3


def test_mapping_and_points_give_the_same_recommendation():
    alpha, beta = 0.016, 0.001
    rates = {b: b / (alpha + beta * b) for b in DOUBLING}
    from_map = optimal_batch_size(rates, 1000, current_batch=8)
    from_points = optimal_batch_size(line_points(alpha, beta), 1000, current_batch=8)
    assert from_map.batch_size == from_points.batch_size == 128  # sqrt(16000) = 126.5
    assert from_map.speedup == pytest.approx(from_points.speedup)


def test_speedup_and_lr_factors_match_hand_formulas():
    alpha, beta, n = 0.016, 0.001, 256
    rec = optimal_batch_size(line_points(alpha, beta), n, current_batch=8)
    assert rec.batch_size == 64
    expected = hand_goodput(64, alpha, beta, n) / hand_goodput(8, alpha, beta, n)
    assert rec.speedup == pytest.approx(expected, rel=1e-12)
    assert rec.lr_factor_sgd == pytest.approx((1 + 256 / 8) / (1 + 256 / 64))
    assert rec.lr_factor_adam == pytest.approx(math.sqrt(8))
    assert "x6.6" in rec.lr_advice and "x2.83" in rec.lr_advice


def test_without_current_batch_there_is_no_speedup_and_generic_lr_advice():
    rec = optimal_batch_size(line_points(0.016, 0.001), 256)
    assert rec.speedup is None and rec.lr_factor_sgd is None and rec.lr_factor_adam is None
    assert "sqrt(B/B0)" in rec.lr_advice


def test_goodput_function():
    assert goodput(100, 500.0, 300) == pytest.approx(500 / (1 + 100 / 300))
    np.testing.assert_allclose(goodput(np.array([1, 3]), np.array([2.0, 8.0]), 1), [1.0, 2.0])
    assert goodput(100, 500.0, math.inf) == 500.0
    with pytest.raises(ValueError, match="b_noise"):
        goodput(100, 500.0, 0)


# -- speedup range ----------------------------------------------------------------------------------


def test_speedup_range_contains_the_true_speedup_for_any_b_noise_in_the_band():
    alpha, beta = 0.016, 0.001
    rec = optimal_batch_size(
        line_points(alpha, beta), 1000, current_batch=8, b_noise_low=500, b_noise_high=2000
    )
    assert rec.batch_size == 128
    def true_speedup(b_noise):
        return hand_goodput(128, alpha, beta, b_noise) / hand_goodput(8, alpha, beta, b_noise)

    assert rec.speedup == pytest.approx(true_speedup(1000))
    assert rec.speedup_low < rec.speedup < rec.speedup_high
    for true_noise in np.geomspace(500, 2000, 25):
        assert rec.speedup_low - 1e-12 <= true_speedup(true_noise) <= rec.speedup_high + 1e-12
    # The band's ends are attained: the range is no wider than it has to be.
    assert rec.speedup_low == pytest.approx(true_speedup(500))
    assert rec.speedup_high == pytest.approx(true_speedup(2000))
    assert "optimum is 88-176" in rec.reason  # sqrt(16*500) = 89.4, sqrt(16*2000) = 178.9


def test_open_ended_band_bounds_speedup_by_the_throughput_ratio():
    # With B_noise -> inf efficiency is 1 everywhere, so the speedup is r(B*)/r(B_now).
    alpha, beta = 0.016, 0.001
    rec = optimal_batch_size(
        line_points(alpha, beta), 1000, current_batch=8, b_noise_low=500, b_noise_high=math.inf
    )
    throughput_ratio = (128 / (alpha + beta * 128)) / (8 / (alpha + beta * 8))
    assert rec.speedup_high == pytest.approx(throughput_ratio)
    assert "above 500 the optimum is 88 or more" in rec.reason


# -- memory limit and accumulation ------------------------------------------------------------------


def test_memory_limit_is_optimal_when_accumulation_adds_no_throughput():
    alpha, beta, n = 0.016, 0.001, 16384  # unconstrained B* = 512
    rec = optimal_batch_size(line_points(alpha, beta), n, max_batch=128)
    assert rec.batch_size == 128
    assert rec.micro_batch is None and rec.accumulation is None
    assert "would not help" in rec.reason
    # Past the limit, throughput stays at r(128) while efficiency falls.
    r_limit = 128 / (alpha + beta * 128)
    for m in range(2, 9):
        assert rec.goodput_at(128 * m) == pytest.approx(r_limit / (1 + 128 * m / n), rel=1e-12)
        assert rec.goodput_at(128 * m) < rec.goodput_at(128)


def test_profile_memory_limit_caps_the_micro_batch():
    profile = Profile(line_points(0.016, 0.001, sizes=(1, 2, 4, 8, 16, 32, 64, 128)),
                      oom_batch=256, device="cpu", stop_reason="out_of_memory")
    assert optimal_batch_size(profile, 16384).batch_size == 128
    assert optimal_batch_size(profile, 16384, max_batch=256).batch_size == 256  # caller overrides


def test_accumulation_recommended_when_per_update_overhead_is_amortised():
    # All of alpha is per-update overhead, so accumulated micro-batches of 64 are as fast as one
    # big batch: the optimum is the unconstrained sqrt(16 * 16384) = 512 = 8 x 64.
    rec = optimal_batch_size(line_points(0.016, 0.001), 16384, max_batch=64, update_overhead_s=0.016)
    assert (rec.batch_size, rec.micro_batch, rec.accumulation) == (512, 64, 8)
    assert "accumulate 8 micro-batches" in rec.reason


@pytest.mark.parametrize("b_noise, expected", [
    (4 * 1216, (128, 64, 2)),     # accumulated optimum sqrt(B_noise*tau*c/u) = 128 exactly
    (0.9 * 1216, (64, None, None)),  # below the threshold c*u/tau = 64*0.076/0.004 = 1216
])
def test_accumulation_threshold(b_noise, expected):
    # t(64) = 0.08 s, of which tau = 0.004 s is per update and u = 0.076 s per micro-batch.
    rec = optimal_batch_size(line_points(0.016, 0.001), b_noise, max_batch=64, update_overhead_s=0.004)
    assert (rec.batch_size, rec.micro_batch, rec.accumulation) == expected
    if rec.accumulation is None:
        assert "B_noise > 1216" in rec.reason


@pytest.mark.parametrize("overhead, expected", [
    (0.020, (32, 16, 2)),       # tau > u = t(16) - tau = 0.012: 0.044/sqrt(32) < 0.032/sqrt(16)
    (0.012, (16, None, None)),  # tau < u = 0.020: the accumulated optimum tau*c/u = 9.6 < 16
])
def test_sqrt_model_accumulates_only_when_overhead_exceeds_the_rest_of_the_step(overhead, expected):
    rec = optimal_batch_size(line_points(0.016, 0.001), None, model="sqrt", max_batch=16,
                             update_overhead_s=overhead)
    assert (rec.batch_size, rec.micro_batch, rec.accumulation) == expected


def test_current_batch_past_the_limit_is_evaluated_as_accumulated():
    alpha, beta, n = 0.016, 0.001, 4096
    rec = optimal_batch_size(line_points(alpha, beta), n, max_batch=128, current_batch=512)
    r_limit = 128 / (alpha + beta * 128)
    current = r_limit / (1 + 512 / n)
    assert rec.batch_size == 128
    assert rec.speedup == pytest.approx(hand_goodput(128, alpha, beta, n) / current)


# -- interpolated throughput and the seed note's sqrt model -----------------------------------------


@pytest.mark.parametrize("k_max", [6, 12, 20])
def test_sqrt_model_optimum_is_the_knee_not_min_4_k_max(k_max):
    points = capped_linear_points(k_max, range(1, 33))
    rec = optimal_batch_size(points, None, model="sqrt")
    assert "interpolated" in rec.reason
    assert rec.batch_size == k_max
    # The note's answer min(4, k_max) = 4: progress r/sqrt(B) = sqrt(4) = 2 < sqrt(k_max).
    assert rec.goodput_at(4) == pytest.approx(2.0)
    assert rec.goodput_at(k_max) == pytest.approx(math.sqrt(k_max))
    assert rec.goodput_at(4) < rec.goodput_at(k_max)


def test_sqrt_model_optimum_is_b_half_for_smooth_throughput():
    rec = optimal_batch_size(line_points(0.048, 0.001), None, model="sqrt", current_batch=12)
    assert rec.batch_size == 48
    assert rec.lr_factor_sgd is None and rec.lr_factor_adam == pytest.approx(2.0)
    # r/sqrt(B) = sqrt(B)/(alpha + beta*B)
    assert rec.speedup == pytest.approx((math.sqrt(48) / 0.096) / (math.sqrt(12) / 0.060))


@pytest.mark.parametrize("b_noise", [10, 1000, 100000])
def test_mccandlish_on_capped_linear_throughput_is_the_knee(b_noise):
    # Below k_max goodput B/(1 + B/B_noise) rises; above it r is flat and E falls.
    rec = optimal_batch_size(capped_linear_points(12, range(1, 33)), b_noise)
    assert rec.batch_size == 12


def test_interpolation_never_extrapolates_past_the_largest_measured_size():
    points = capped_linear_points(64, (8, 16, 32, 64))  # a flat then step: no line fits
    rec = optimal_batch_size(points + [point(128, 2.0)], 1e6, max_batch=4096)
    assert "interpolated" in rec.reason
    assert rec.batch_size == 64


# -- hysteresis -------------------------------------------------------------------------------------


def test_hysteresis_holds_through_a_noisy_b_noise():
    points = line_points(0.016, 0.001)
    rng = np.random.default_rng(1)
    noise_scales = 1000 * np.exp(rng.normal(0.0, 0.1, 200))
    stable = StableRecommendation()
    raw, shown = [], []
    for n in noise_scales:
        rec = optimal_batch_size(points, float(n), current_batch=32)
        raw.append(rec.batch_size)
        shown.append(stable.update(rec).batch_size)
    flips = sum(a != b for a, b in zip(raw, raw[1:]))
    assert flips >= 20  # the raw optimum wanders between 112 and 144 ...
    assert len(set(shown)) == 1  # ... the shown one does not


@pytest.mark.parametrize("b_noise, new_optimum, switches", [(900, 120, False), (1200, 136, True)])
def test_hysteresis_switches_only_for_a_five_percent_gain(b_noise, new_optimum, switches):
    alpha, beta = 0.016, 0.001
    points = line_points(alpha, beta)
    stable = StableRecommendation()
    assert stable.update(optimal_batch_size(points, 256, current_batch=32)).batch_size == 64
    gain = hand_goodput(new_optimum, alpha, beta, b_noise) / hand_goodput(64, alpha, beta, b_noise) - 1
    assert (gain >= 0.05) == switches  # 4.2% and 5.8%
    rec = optimal_batch_size(points, b_noise, current_batch=32)
    assert rec.batch_size == new_optimum
    shown = stable.update(rec)
    if switches:
        assert shown is rec
    else:
        assert shown.batch_size == 64
        assert shown.reason.startswith(f"Keeping batch 64: switching to the new optimum {new_optimum}")
        # The held size's numbers are refreshed under the new B_noise.
        expected = hand_goodput(64, alpha, beta, b_noise) / hand_goodput(32, alpha, beta, b_noise)
        assert shown.speedup == pytest.approx(expected)


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("b_noise", [0, -5, float("nan"), float("inf"), None])
def test_bad_b_noise(b_noise):
    with pytest.raises(ValueError, match="b_noise"):
        optimal_batch_size(line_points(0.016, 0.001), b_noise)


@pytest.mark.parametrize("data, kwargs, error, match", [
    ([], {}, ValueError, "no throughput points"),
    ([point(8, 0.1)], {}, ValueError, "two distinct"),
    ({8: 0.0, 16: 10.0}, {}, ValueError, "samples_per_s"),
    ({0: 1.0, 16: 10.0}, {}, ValueError, "batch size"),
    ("fast", {}, TypeError, "profile_or_points"),
    (None, {}, TypeError, "profile_or_points"),
    ("line", dict(model="linear"), ValueError, "model"),
    ("line", dict(max_batch=0), ValueError, "max_batch"),
    ("line", dict(current_batch=2.5), ValueError, "current_batch"),
    ("line", dict(b_noise_low=10), ValueError, "both"),
    ("line", dict(b_noise_low=300, b_noise_high=400), ValueError, "contain"),
    ("line", dict(b_noise_low=float("nan"), b_noise_high=400), ValueError, "b_noise_low"),
    ("line", dict(update_overhead_s=-1.0), ValueError, "update_overhead_s"),
    ("line", dict(max_batch=64, update_overhead_s=0.09), ValueError, "below the step time"),
])
def test_bad_input(data, kwargs, error, match):
    if isinstance(data, str) and data == "line":
        data = line_points(0.016, 0.001)
    with pytest.raises(error, match=match):
        optimal_batch_size(data, 256, **kwargs)


def test_sqrt_model_refuses_b_noise():
    with pytest.raises(ValueError, match="sqrt model does not use B_noise"):
        optimal_batch_size(line_points(0.016, 0.001), 256, model="sqrt")


def test_min_gain_must_be_nonnegative():
    with pytest.raises(ValueError, match="min_gain"):
        StableRecommendation(min_gain=-0.1)
