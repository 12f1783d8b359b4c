"""Freshness: every estimate carries its age; stale and band-less values are not passed off as current."""

import json

import pytest
import torch

import bsmon
from bsmon import store
from bsmon.headless import stats_json, status_line
from bsmon.model import SessionModel
from bsmon.probe.noise import WARMUP_MEASUREMENTS
from bsmon.stats.noise import MEASURE_GAP_STEPS
from test_noise_probe import N_EXAMPLES, _problem, exact_b_simple
from test_units import _exact_noise, _hello


def _step(model, step, noise=None, est="microbatch"):
    record = {"k": "step", "step": step, "t": step * 0.1, "dt": 0.1, "n": 16, "mb": 2, "dropped": 0}
    if noise is not None:
        record["noise"] = {**noise, "est": est}
    model.ingest(record)


def test_age_and_stale_flag_in_stats_headless_and_json():
    model = SessionModel()
    model.ingest(_hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    for step in range(1, 21):
        _step(model, step, _exact_noise([8, 8], 1.0, 50.0))
    stats = model.stats()
    assert stats.noise_age_steps == 0 and not stats.noise_stale
    assert "B_simple 50 [50, 50] (microbatch, measured this step)" in status_line(model, "running")
    for step in range(21, 21 + MEASURE_GAP_STEPS):
        _step(model, step)
    stats = model.stats()
    assert stats.noise_age_steps == MEASURE_GAP_STEPS and not stats.noise_stale  # within the probe's bound
    _step(model, 21 + MEASURE_GAP_STEPS)
    stats = model.stats()
    assert stats.noise_age_steps == MEASURE_GAP_STEPS + 1 and stats.noise_stale
    assert status_line(model, "running").count("(microbatch, measured 101 steps ago) STALE") == 1
    shown = json.loads(stats_json(model, "running"))
    assert shown["noise_age_steps"] == 101 and shown["noise_stale"] is True


def test_a_value_without_a_band_is_not_shown_as_b_simple():
    model = SessionModel()
    model.ingest(_hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _step(model, 1, _exact_noise([8, 8], 1.0, 50.0))
    stats = model.stats()
    assert stats.b_simple is None and stats.b_simple_low is None
    assert stats.noise_reason.startswith("measuring: 1 step, no uncertainty band yet")
    assert "B_simple N/A: measuring: 1 step, no uncertainty band yet" in status_line(model, "running")
    assert json.loads(stats_json(model, "running"))["b_simple"] is None


def test_an_estimator_change_keeps_each_estimators_history():
    model = SessionModel()
    model.ingest(_hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    for step in range(1, 59):
        _step(model, step, _exact_noise([8, 8], 1.0, 50.0))
    pe = {"batch": 16, "pe": [(1.0 + 50.0) / 16], "big": [1.0 + 50.0 / 16]}  # E|g|^2/B and E|G_16|^2
    model.ingest({"k": "estimator", "name": "per_example", "reason": None, "groups": ["all"]})
    _step(model, 59, pe, est="per_example")
    assert model.stats().noise_steps == 1 and model.stats().noise_estimator == "per_example"
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _step(model, 60, _exact_noise([8, 8], 1.0, 50.0))
    stats = model.stats()
    # Before: reset on each flip, 58 steps of averaging down to 1.
    assert stats.noise_steps == 59 and stats.b_simple == pytest.approx(50.0)
    assert stats.noise_age_steps == 0


def test_measuring_never_starves_after_the_warm_up():
    """A small linear model whose per-example measurement costs more than the 1% budget allows."""
    torch.set_num_threads(1)
    model, x, y, loss_fn = _problem("linear")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sampler = torch.Generator().manual_seed(4)
    steps = 600
    with bsmon.watch(model, optimizer, noise="per_example") as monitor:
        for _ in range(steps):
            idx = torch.randint(0, N_EXAMPLES, (32,), generator=sampler)
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
            optimizer.zero_grad()
    records = store.read_records(store.resolve_session(monitor.session_id).records_path)[0]
    measured = [r["step"] for r in records if r["k"] == "step" and "noise" in r]
    after_warmup = [s for s in measured if s > WARMUP_MEASUREMENTS + 1]  # the first step installs the hooks
    gaps = [b - a for a, b in zip(measured, measured[1:])]
    # Before: the warm-up's cost was a debt, and no step after it was measured for 1,470 steps.
    assert len(after_warmup) >= (steps - WARMUP_MEASUREMENTS - 1) // MEASURE_GAP_STEPS
    assert max(gaps) <= MEASURE_GAP_STEPS
    stats = monitor.stats()
    assert stats.noise_age_steps < MEASURE_GAP_STEPS and not stats.noise_stale
    assert stats.b_simple_low <= exact_b_simple(model, x, y, loss_fn) <= stats.b_simple_high
