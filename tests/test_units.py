"""One unit everywhere: profiles, live points, the noise scale and B* in the session's unit.

Records with known answers go through the real SessionModel; the optimum is checked against the
closed form B* = sqrt(B_half * B_noise) (docs/optimal-batch.md), in the session's unit and over
the whole job.
"""

import math

import numpy as np
import pytest

from bsmon.headless import status_line
from bsmon.model import SessionModel
from bsmon.profiling import Profile
from bsmon.stats.optimal import GRID_STEP, optimal_batch_size
from bsmon.stats.throughput import ThroughputPoint
from bsmon.stats.units import ProfileUnits, SessionUnits


def _hello(**extra):
    return {"k": "hello", "v": 1, "session": "s", "name": "n", "pid": 1, "t0": 0.0, "command": [],
            "host": "h", "user": "u", "unit": "samples", **extra}


def _profile(alpha, beta, sizes, **units):
    points = [ThroughputPoint(b, alpha + beta * b, b / (alpha + beta * b)) for b in sizes]
    return Profile(points, None, "cpu", "all_sizes", **units)


def _exact_noise(micro, grad_sq, trace):
    """Accumulated squared norms equal to their expectations, in the convention c = 1/m."""
    m = len(micro)
    return {"est": "microbatch", "micro": micro, "g": 1,
            "acc": [(j / m) ** 2 * (grad_sq + trace / (j * micro[0])) for j in range(1, m + 1)]}


def _train(model, steps, micro, dt, noise):
    for step in range(1, steps + 1):
        model.ingest({"k": "step", "step": step, "t": step * dt, "dt": dt, "n": sum(micro), "mb": len(micro),
                      "dropped": 0, "noise": noise})


def _goodput(batch, b_half, b_noise):
    """r(B) E(B) for t(B) = alpha + beta B, up to the factor 1/beta: B/(B_half + B) / (1 + B/B_noise)."""
    return batch / (b_half + batch) / (1 + batch / b_noise)


def test_tokens_with_a_profile_in_samples_reach_the_closed_form_optimum():
    # 128 tokens a sample; the profile (as bsmon sweep writes it) is in samples per rank.
    tokens, alpha, beta, b_noise = 128, 0.008, 0.001, 22.0  # B_half = 8 samples, B_noise = 22 samples
    model = SessionModel()
    model.ingest(_hello(unit="tokens", tokens_per_sample=tokens))
    model.ingest({"k": "profile", "profile": _profile(alpha, beta, (1, 2, 4, 8, 16, 32, 64)).to_dict()})
    _train(model, 60, [8, 8], alpha + beta * 16, _exact_noise([8, 8], 1.0, b_noise))
    stats = model.stats()
    assert stats.unit == "tokens" and stats.batch_size == 16 * tokens
    assert stats.b_simple == pytest.approx(b_noise * tokens)
    best = tokens * math.sqrt(alpha / beta * b_noise)  # 1,698 tokens (before: 1,024 "1x predicted")
    fresh = optimal_batch_size(model.throughput_points(), stats.b_simple)
    assert abs(fresh.batch_size - best) <= GRID_STEP / 2
    assert fresh.goodput_at(stats.b_opt) >= 0.95 * fresh.goodput_at(fresh.batch_size)
    b_half_tokens = tokens * alpha / beta
    expected = _goodput(stats.b_opt, b_half_tokens, stats.b_simple) / _goodput(stats.batch_size, b_half_tokens,
                                                                               stats.b_simple)
    assert stats.b_opt_speedup == pytest.approx(expected, rel=1e-6)
    assert model.memory_limit() == f"memory: fits up to {64 * tokens:,}"


@pytest.mark.parametrize("units, sizes", [
    ({"world_size": 1, "per_rank": True}, (8, 16, 32, 64, 128, 256)),  # bsmon sweep on one process
    ({"world_size": 4, "per_rank": False}, (32, 64, 128, 256, 512, 1024)),  # global sizes, measured on 4 ranks
])
def test_a_ddp_job_scales_a_per_rank_profile_to_its_ranks(units, sizes):
    ranks, alpha, beta, b_noise = 4, 0.018, 0.001, 4000.0  # one rank: t(b) = alpha + beta b, B_half 18
    per_rank = [s if units["per_rank"] else s // ranks for s in sizes]
    points = [ThroughputPoint(s, alpha + beta * b, s / (alpha + beta * b)) for s, b in zip(sizes, per_rank)]
    model = SessionModel()
    model.ingest(_hello(world_size=ranks, data_parallel=ranks))
    model.ingest({"k": "profile", "profile": Profile(points, None, "cpu", "all_sizes", **units).to_dict()})
    _train(model, 60, [64, 64], alpha + beta * 128, _exact_noise([64, 64], 1.0, b_noise))
    stats = model.stats()
    assert stats.batch_size == 512 and stats.local_batch_size == 128
    # The profile's points are global batches now: 4 x the per-rank size at the per-rank step time.
    assert [p.batch_size for p in model.throughput_points() if p.source == "profile"] == [4 * b for b in per_rank]
    best = math.sqrt(ranks * alpha / beta * b_noise)  # 537 global (before: 272, "1.06x")
    fresh = optimal_batch_size(model.throughput_points(), stats.b_simple)
    assert abs(fresh.batch_size - best) <= GRID_STEP / 2
    assert stats.b_opt == fresh.batch_size == 536
    assert stats.b_opt_speedup == pytest.approx(
        _goodput(536, ranks * alpha / beta, b_noise) / _goodput(512, ranks * alpha / beta, b_noise), rel=1e-6)
    assert stats.b_opt_speedup < 1.001  # the current 512 is already near the optimum
    assert model.memory_limit() == "memory: fits up to 1,024 samples over all 4 ranks"


def test_a_token_job_averages_over_as_many_steps_as_the_same_job_in_samples():
    rng = np.random.default_rng(0)
    payloads = [{**_exact_noise([8, 8], 1.0, 50.0), "acc": [a * rng.uniform(0.5, 1.5) for a in
                                                             _exact_noise([8, 8], 1.0, 50.0)["acc"]]}
                for _ in range(3000)]
    results = {}
    for unit, extra in (("samples", {}), ("tokens", {"tokens_per_sample": 512})):
        model = SessionModel(keep_history=False)
        model.ingest(_hello(unit=unit, **extra))
        for step, noise in enumerate(payloads, start=1):
            model.ingest({"k": "step", "step": step, "t": step * 0.01, "dt": 0.01, "n": 16, "mb": 2, "dropped": 0,
                          "noise": noise})
        results[unit] = model.stats()
    samples, tokens = results["samples"], results["tokens"]
    # The default horizon (100k samples) in tokens was 100k tokens: about 12 steps of 8,192 tokens.
    assert tokens.b_simple == pytest.approx(512 * samples.b_simple)
    assert tokens.b_simple_low / tokens.b_simple == pytest.approx(samples.b_simple_low / samples.b_simple)
    assert tokens.b_simple_high / tokens.b_simple == pytest.approx(samples.b_simple_high / samples.b_simple)


def test_profile_units_round_trip_and_old_profiles_read_as_samples_per_rank():
    profile = _profile(0.01, 0.001, (4, 8), unit="tokens", tokens_per_sample=64, world_size=2, per_rank=False)
    again = Profile.from_dict(profile.to_dict())
    assert again.units == ProfileUnits("tokens", 64, 2, False) and again.points == profile.points
    old = profile.to_dict()
    for key in ("unit", "tokens_per_sample", "world_size", "per_rank"):
        del old[key]
    assert Profile.from_dict(old).units == ProfileUnits()
    with pytest.raises(ValueError, match="a profile in tokens needs tokens_per_sample"):
        _profile(0.01, 0.001, (4, 8), unit="tokens")
    # 8,192 global tokens on 2 ranks at 64 tokens a sample: 64 samples a rank; a 4-rank token job
    # at 128 tokens a sample trains 4 x 64 x 128 tokens at that step time.
    job = SessionUnits("tokens", 128, data_parallel=4)
    assert job.from_profile(8192, ProfileUnits("tokens", 64, 2, False)) == 4 * 64 * 128


def test_headless_line_shows_the_global_batch_in_the_unit():
    model = SessionModel()
    model.ingest(_hello(unit="tokens", tokens_per_sample=10, world_size=2, data_parallel=2))
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _train(model, 5, [8, 8], 0.1, _exact_noise([8, 8], 1.0, 50.0))
    line = status_line(model, "running")
    assert "B 320 = 2x80x2 ranks" in line and "B_simple 500 [500, 500] (microbatch, measured this step)" in line
