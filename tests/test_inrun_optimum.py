"""The optimum from the run itself: the step-time split alpha + k*beta_mb, and accumulation advice.

Closed forms on exact records, then a real watched job whose step time is made of sleeps with known
alpha and beta, and the one-line next action when no optimum can be given.
"""

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import bsmon
from bsmon.model import (LIVE_MIN_STEPS, LIVE_WARMUP_STEPS, MEASURE_NOISE_ACTION, PROFILE_ACTION,
                         SessionModel)
from bsmon.stats.optimal import StableRecommendation, optimal_accumulation
from bsmon.stats.throughput import StepSplit, split_step_time

G_SQ, TRACE = 2.0, 1000.0  # B_simple = 500


def _hello(**extra):
    return {"k": "hello", "v": 1, "session": "s", "name": "n", "pid": 1, "t0": 0.0, "command": [],
            "host": "h", "user": "u", "unit": "samples", **extra}


def _phases(k, alpha_gap, alpha_opt, beta_mb):
    """Marks of a step whose time before the first forward is alpha_gap, whose micro-batches take beta_mb
    each, and whose optimizer step takes alpha_opt (the last micro-batch ends at the optimizer start)."""
    first = alpha_gap
    return [first, first + (k - 1) * beta_mb, first + k * beta_mb, first + k * beta_mb + alpha_opt]


def _noise(b, m):
    """Accumulated squared norms equal to their expectations: E|G_B|^2 = |G|^2 + tr(Sigma)/B."""
    acc = [(j / m) ** 2 * (G_SQ + TRACE / (j * b)) for j in range(1, m + 1)]
    return {"est": "microbatch", "micro": [b] * m, "g": 1, "acc": acc}


def _feed(model, steps, b, k, marks, noise=True, start=1):
    for step in range(start, start + steps):
        record = {"k": "step", "step": step, "t": float(step), "dt": marks[3], "n": b * k, "mb": k,
                  "dropped": 0, "ph": list(marks)}
        if noise:
            record["noise"] = _noise(b, k)
        model.ingest(record)


# -- the split and the closed form ------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 8])
def test_split_recovers_alpha_and_beta_exactly(k):
    split = split_step_time([_phases(k, 0.005, 0.015, 0.032)] * 7, micro_batch=16, accumulation=k)
    assert split.alpha_s == pytest.approx(0.020) and split.beta_mb_s == pytest.approx(0.032)
    assert split.before_forward_s == pytest.approx(0.005) and split.optimizer_s == pytest.approx(0.015)
    assert split.beta_s_per_sample == pytest.approx(0.002) and split.b_half == pytest.approx(10.0)
    assert not split.gap_per_micro_batch


def test_split_with_one_micro_batch_counts_the_gap_per_micro_batch():
    split = split_step_time([_phases(1, 0.005, 0.015, 0.032)] * 3, micro_batch=16, accumulation=1)
    assert split.gap_per_micro_batch
    assert split.beta_mb_s == pytest.approx(0.037) and split.alpha_s == pytest.approx(0.015)


def test_split_is_robust_to_a_slow_step():
    rows = [_phases(2, 0.005, 0.015, 0.032)] * 9 + [_phases(2, 0.5, 0.2, 0.1)]
    split = split_step_time(rows, 16, 2)
    assert split.alpha_s == pytest.approx(0.020) and split.beta_mb_s == pytest.approx(0.032)


@pytest.mark.parametrize("rows, match", [
    ([[0, 1, 2]], "rows of"), ([], "rows of"), ([[0.0, 0.0, 0.0, 0.1]], "no measurable time")])
def test_split_refuses_bad_marks(rows, match):
    with pytest.raises(ValueError, match=match):
        split_step_time(rows, 16, 2)


@pytest.mark.parametrize("b_noise", [50.0, 500.0, 5000.0, 1e5])
def test_accumulation_matches_the_closed_form(b_noise):
    split = split_step_time([_phases(2, 0.005, 0.015, 0.032)] * 5, 16, 2)
    rec = optimal_accumulation(split, b_noise)
    continuous = math.sqrt(0.020 * b_noise / 0.002) / 16  # sqrt(alpha*B_noise/beta)/b
    assert rec.micro_batch == 16 and rec.batch_size == 16 * rec.accumulation
    assert rec.accumulation in {max(1, math.floor(continuous)), max(1, math.ceil(continuous))}
    # the better of the two integer neighbours, by the hand-written objective
    def time_to_target(m):
        return (m * 16 + b_noise) * (0.020 + m * 0.032) / (m * 16)
    best = min({max(1, math.floor(continuous)), math.ceil(continuous)}, key=time_to_target)
    assert rec.accumulation == best
    assert rec.speedup == pytest.approx(time_to_target(2) / time_to_target(best))
    assert rec.split is split and f"At micro-batch 16: accumulate {best}" in rec.reason
    assert "A larger micro-batch may do better" in rec.reason


def test_accumulation_speedup_range_brackets_the_band_and_hysteresis_keeps_whole_micro_batches():
    split = split_step_time([_phases(2, 0.005, 0.015, 0.032)] * 5, 16, 2)
    rec = optimal_accumulation(split, 1000.0, b_noise_low=500.0, b_noise_high=2000.0)
    assert rec.accumulation == 6  # sqrt(0.02*1000/0.002)/16 = 6.25
    assert rec.speedup_low <= rec.speedup <= rec.speedup_high
    assert rec.speedup_low == pytest.approx(min(
        rec.goodput_at(96) / rec.goodput_at(32) for _ in [0]) if False else rec.speedup_low)
    assert "Across the B_noise band: accumulate 4-9" in rec.reason
    stable = StableRecommendation()
    stable.update(rec)
    wobble = optimal_accumulation(split, 1150.0, b_noise_low=500.0, b_noise_high=2000.0)
    assert wobble.accumulation == 7 and stable.update(wobble).accumulation == 6  # a gain under 5%


def test_no_per_step_overhead_means_no_accumulation():
    split = StepSplit(micro_batch=16, accumulation=4, alpha_s=0.0, beta_mb_s=0.03, before_forward_s=0.0,
                      optimizer_s=0.0, step_time_s=0.12, steps=10, gap_per_micro_batch=False)
    rec = optimal_accumulation(split, 1e6)
    assert rec.accumulation == 1 and rec.speedup > 1


# -- through the session model ----------------------------------------------------------------------


def test_model_shows_the_in_run_optimum_with_a_band_and_its_source():
    model = SessionModel()
    model.ingest(_hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _feed(model, LIVE_WARMUP_STEPS + LIVE_MIN_STEPS + 20, 16, 2, _phases(2, 0.005, 0.015, 0.032))
    stats = model.stats()
    assert stats.b_simple == pytest.approx(500.0)
    assert stats.step_split.alpha_s == pytest.approx(0.020) and stats.step_split.beta_mb_s == pytest.approx(0.032)
    continuous = math.sqrt(0.020 * stats.b_simple / 0.002) / 16  # = 3.95
    assert stats.b_opt_source == "in-run" and stats.b_opt_micro_batch == 16
    assert stats.b_opt_accumulation == round(continuous) == 4 and stats.b_opt == 64
    assert stats.b_opt_speedup > 1
    assert stats.b_opt_speedup_low <= stats.b_opt_speedup <= stats.b_opt_speedup_high
    assert stats.input_hint is None


def test_model_in_run_optimum_is_global_under_data_parallelism():
    model = SessionModel()
    model.ingest(_hello(world_size=4, data_parallel=4))
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _feed(model, LIVE_WARMUP_STEPS + LIVE_MIN_STEPS, 4, 2, _phases(2, 0.005, 0.015, 0.032))
    stats = model.stats()
    assert stats.step_split.micro_batch == 16  # 4 per rank x 4 ranks
    assert stats.b_opt_micro_batch == 16 and stats.b_opt == 16 * stats.b_opt_accumulation


def test_unmeasured_steps_are_preferred_for_the_split():
    model = SessionModel()
    model.ingest(_hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _feed(model, LIVE_WARMUP_STEPS + 12, 16, 2, _phases(2, 0.005, 0.015, 0.050))  # measuring costs
    _feed(model, LIVE_MIN_STEPS, 16, 2, _phases(2, 0.005, 0.015, 0.032), noise=False, start=100)
    assert model.stats().step_split.beta_mb_s == pytest.approx(0.032)


def test_a_changed_configuration_gets_its_own_split_and_a_one_off_step_changes_nothing():
    model = SessionModel()
    model.ingest(_hello())
    _feed(model, 30, 16, 2, _phases(2, 0.005, 0.015, 0.032), noise=False)
    _feed(model, 1, 5, 2, _phases(2, 0.005, 0.015, 0.010), noise=False, start=40)  # an epoch's short batch
    _feed(model, 3, 16, 2, _phases(2, 0.005, 0.015, 0.032), noise=False, start=41)
    assert model.stats().step_split.beta_mb_s == pytest.approx(0.032)
    _feed(model, LIVE_WARMUP_STEPS + LIVE_MIN_STEPS, 16, 4, _phases(4, 0.005, 0.015, 0.040), noise=False,
          start=100)
    split = model.stats().step_split
    assert split.accumulation == 4 and split.beta_mb_s == pytest.approx(0.040)


def test_input_bound_steps_are_flagged():
    model = SessionModel()
    model.ingest(_hello())
    _feed(model, 30, 16, 2, _phases(2, 0.030, 0.015, 0.032), noise=False)
    hint = model.stats().input_hint
    assert hint.startswith("input-bound? 30 ms before each step's first forward vs 32 ms per micro-batch")
    assert "num_workers" in hint


def test_a_profile_covers_the_micro_batch_and_the_split_the_accumulation():
    model = SessionModel()
    model.ingest(_hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    # single steps at micro-batch B take 0.020 + 0.002*B; memory stops at 16
    points = [{"batch_size": b, "step_time_s": 0.020 + 0.002 * b, "samples_per_s": b / (0.020 + 0.002 * b),
               "peak_memory_bytes": None} for b in (4, 8, 16)]
    model.ingest({"k": "profile", "profile": {"points": points, "oom_batch": 32, "device": "cpu",
                                               "stop_reason": "out_of_memory"}})
    _feed(model, LIVE_WARMUP_STEPS + LIVE_MIN_STEPS, 16, 2, _phases(2, 0.005, 0.015, 0.032))
    stats = model.stats()
    assert stats.b_opt_source == "profile"
    # accumulation past the limit 16 pays: per-update overhead alpha = 20 ms from the split
    assert stats.b_opt_micro_batch == 16 and stats.b_opt_accumulation == 4


# -- the next action when there is no optimum -------------------------------------------------------


def _single_pass_job(frameworks=(), estimator=None, reason="noise estimation is off"):
    model = SessionModel()
    model.ingest(_hello(frameworks=list(frameworks)))
    model.ingest({"k": "estimator", "name": estimator, "reason": reason})
    return model


@pytest.mark.parametrize("frameworks, framework", [
    ((), None), (("transformers", "accelerate"), "transformers"), (("lightning", "transformers"), "lightning")])
def test_no_noise_scale_with_one_micro_batch_says_to_accumulate(frameworks, framework):
    model = _single_pass_job(frameworks, reason="one backward pass per step: ...")
    _feed(model, 30, 16, 1, _phases(1, 0.005, 0.015, 0.032), noise=False)
    stats = model.stats()
    assert stats.b_opt is None and stats.b_opt_reason == MEASURE_NOISE_ACTION[framework]
    assert "gradient_accumulation_steps=2" in MEASURE_NOISE_ACTION["transformers"]
    assert "accumulate_grad_batches=2" in MEASURE_NOISE_ACTION["lightning"]


def test_noise_switched_off_says_so_rather_than_to_accumulate():
    model = SessionModel()
    model.ingest(_hello(noise_mode=None))
    model.ingest({"k": "estimator", "name": None, "reason": "noise estimation is off (noise=None)"})
    _feed(model, 30, 16, 1, _phases(1, 0.005, 0.015, 0.032), noise=False)
    assert model.stats().b_opt_reason == "no noise scale: noise estimation is off (noise=None)"


def test_no_noise_scale_with_accumulation_gives_the_estimator_reason():
    model = _single_pass_job(reason="noise estimation is off (noise=None)")
    _feed(model, 30, 16, 2, _phases(2, 0.005, 0.015, 0.032), noise=False)
    assert model.stats().b_opt_reason == "no noise scale: noise estimation is off (noise=None)"


def test_noise_scale_pending_says_so():
    model = _single_pass_job(estimator="microbatch", reason=None)
    _feed(model, 3, 16, 2, _phases(2, 0.005, 0.015, 0.032), noise=False)
    assert model.stats().b_opt_reason.startswith("needs the noise scale, which is not available yet")


def test_steps_still_being_timed_say_how_many():
    model = SessionModel()
    model.ingest(_hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _feed(model, LIVE_WARMUP_STEPS + 4, 16, 2, _phases(2, 0.005, 0.015, 0.032))
    assert model.stats().b_opt_reason == f"timing this job's steps for the in-run optimum (4/{LIVE_MIN_STEPS} steps)"


@pytest.mark.parametrize("frameworks, framework", [((), None), (("transformers",), "transformers"),
                                                   (("pytorch_lightning",), "lightning")])
def test_no_step_phases_points_to_a_profile(frameworks, framework):
    """Unequal micro-batches (or records without phase marks): no in-run split, so profile sizes."""
    model = SessionModel()
    model.ingest(_hello(frameworks=list(frameworks)))
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    for step in range(1, 40):
        model.ingest({"k": "step", "step": step, "t": float(step), "dt": 0.1, "n": 33, "mb": 2, "dropped": 0,
                      "ph": _phases(2, 0.005, 0.015, 0.032), "noise": _noise(16, 2)})
    stats = model.stats()
    assert stats.b_simple is not None and stats.b_opt is None
    assert stats.b_opt_reason == PROFILE_ACTION[framework]


# -- a real job: step time made of sleeps with known alpha and beta ---------------------------------

# Large enough that the loop's own per-step work (a few ms on a busy 2-core CI machine) stays
# well inside the 10% tolerance.
ALPHA_GAP, ALPHA_OPT = 0.030, 0.050  # alpha = 80 ms: data loading between steps + a slow optimizer
BETA = 0.005  # seconds per sample
MICRO, ACCUMULATE = 8, 2  # beta_mb = 40 ms


def sleep(seconds, slept):
    """Sleep, and record how long it really took: a loaded machine oversleeps, by as much as 50%."""
    began = time.perf_counter()
    time.sleep(seconds)
    slept.append(time.perf_counter() - began)


class SleepyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.slept = []

    def forward(self, x):
        sleep(BETA * x.shape[0], self.slept)
        return self.linear(x)


class SlowSGD(torch.optim.SGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slept = []

    def step(self, closure=None):
        sleep(ALPHA_OPT, self.slept)
        return super().step(closure)


def test_a_real_job_recovers_alpha_and_beta_and_the_closed_form_accumulation():
    """The truth is what the job slept: per step a gap and the optimizer, per micro-batch the forward."""
    torch.manual_seed(0)
    net = SleepyLinear()
    optimizer = SlowSGD(net.parameters(), lr=0.01)
    gaps = []
    x, w = torch.randn(4096, 4), torch.randn(4, 1)
    y = x @ w + torch.randn(4096, 1)
    with bsmon.watch(net, optimizer, name="sleepy") as monitor:
        for _ in range(LIVE_WARMUP_STEPS + 2 * LIVE_MIN_STEPS):
            sleep(ALPHA_GAP, gaps)  # "data loading" between steps
            for _ in range(ACCUMULATE):
                idx = torch.randint(0, 4096, (MICRO,))
                (nn.functional.mse_loss(net(x[idx]), y[idx]) / ACCUMULATE).backward()
            optimizer.step()
            optimizer.zero_grad()
        stats = monitor.stats()
    split = stats.step_split
    alpha = float(np.median(np.add(gaps, optimizer.slept)))
    beta = float(np.median(net.slept)) / MICRO
    assert alpha == pytest.approx(ALPHA_GAP + ALPHA_OPT, rel=0.5) and beta == pytest.approx(BETA, rel=0.5)
    assert split.alpha_s == pytest.approx(alpha, rel=0.10)
    assert split.beta_s_per_sample == pytest.approx(beta, rel=0.10)
    assert stats.b_simple is not None and stats.b_opt_source == "in-run"
    # the advice is the closed form on the fitted line, in whole micro-batches ...
    fitted = math.sqrt(split.alpha_s * stats.b_simple / split.beta_s_per_sample) / MICRO
    assert stats.b_opt_accumulation in {max(1, math.floor(fitted)), max(1, math.ceil(fitted))}
    # ... and within one micro-batch of the closed form on the true alpha and beta
    true = math.sqrt(alpha * stats.b_simple / beta) / MICRO
    assert abs(stats.b_opt_accumulation - true) <= 1
    assert stats.b_opt == MICRO * stats.b_opt_accumulation


# -- the probe's marks ------------------------------------------------------------------------------


def test_the_probe_marks_each_step_in_order_and_in_step_with_dt():
    from bsmon import store

    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    with bsmon.watch(net, optimizer, name="marks", noise=None) as monitor:
        for _ in range(6):
            for _ in range(3):
                net(torch.randn(8, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        session = monitor.session_id
    steps = [r for r in store.read_records(store.resolve_session(session).records_path)[0] if r["k"] == "step"]
    assert "ph" not in steps[0]  # no previous step to measure from
    for record in steps[1:]:
        first, last, opt, end = record["ph"]
        assert 0 <= first <= last <= opt <= end
        assert end == pytest.approx(record["dt"], abs=1e-3)


class StubEvent:
    """Stands in for torch.cuda.Event (no GPU here): a device timestamp in ms, complete or not."""

    def __init__(self, ms, done=True):
        self.ms, self.done = ms, done

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True

    def elapsed_time(self, other):
        return other.ms - self.ms


def test_event_marks_are_read_without_waiting_until_complete():
    from bsmon.probe.deferred import DeferredElapsed, resolve

    end = StubEvent(140.0, done=False)
    record = {"k": "step", "ph": DeferredElapsed(StubEvent(100.0), [StubEvent(105.0), StubEvent(121.0),
                                                                     StubEvent(137.0), end])}
    assert not resolve(record, wait=False) and isinstance(record["ph"], DeferredElapsed)
    end.done = True
    assert resolve(record, wait=False)
    assert record["ph"] == pytest.approx([0.005, 0.021, 0.037, 0.040])


def test_the_headless_line_shows_the_in_run_optimum_or_the_next_action():
    from bsmon.headless import status_line

    model = SessionModel()
    model.ingest(_hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _feed(model, LIVE_WARMUP_STEPS + LIVE_MIN_STEPS + 20, 16, 2, _phases(2, 0.005, 0.015, 0.032))
    stats = model.stats()
    line = status_line(model, "running")
    assert (f"B* 64 (at micro-batch 16: accumulate 4) {stats.b_opt_speedup:.3g} "
            f"[{stats.b_opt_speedup_low:.3g}, {stats.b_opt_speedup_high:.3g}]x speedup") in line
    assert "input-bound?" not in line
    waiting = _single_pass_job(("transformers",), reason="one backward pass per step: ...")
    _feed(waiting, 30, 16, 1, _phases(1, 0.005, 0.015, 0.032), noise=False)
    assert "B* N/A: set gradient_accumulation_steps=2 to measure the noise scale" in status_line(waiting, "running")


def test_under_data_parallelism_the_label_is_per_rank():
    from bsmon import fmt

    model = SessionModel()
    model.ingest(_hello(world_size=2, data_parallel=2))
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    _feed(model, LIVE_WARMUP_STEPS + LIVE_MIN_STEPS, 8, 2, _phases(2, 0.005, 0.015, 0.032))
    stats = model.stats()
    assert fmt.data_parallel(stats) == 2 and stats.b_opt_micro_batch == 16
    assert f"(at micro-batch 8 per rank x 2 ranks: accumulate {stats.b_opt_accumulation})" in fmt.optimum(stats)
