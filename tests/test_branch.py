"""bsmon.branch_check and bsmon.snapshot: exact restore, identical continuation, Ctrl-C, and the
measured critical batch against a quadratic whose critical batch is known in closed form."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import bsmon
from bsmon import store, wire
from bsmon.model import SessionModel
from bsmon.snapshot import Snapshot
from bsmon.stats.branch import BranchCheck, calibrated_factor, calibration_weight


# -- exact restore ---------------------------------------------------------------------------------

class Net(nn.Module):
    """BatchNorm (buffers), dropout (the RNG) and two layers: everything a restore must cover."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_job(seed: int = 0, scaler: bool = True):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3) if scaler else None
    teacher = torch.Generator().manual_seed(99)
    w = torch.randn(6, 3, generator=teacher)
    eval_x = torch.randn(64, 6, generator=teacher)

    def step_fn(batch_size: int) -> None:
        # Data from all three global generators, so their states matter.
        x = torch.randn(batch_size, 6) + float(np.random.standard_normal()) * 1e-3 + random.random() * 1e-3
        y = (x @ w).argmax(dim=1)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def eval_fn() -> torch.Tensor:
        model.eval()  # the snapshot puts the train/eval modes back
        return nn.functional.cross_entropy(model(eval_x), (eval_x @ w).argmax(dim=1), reduction="none")

    return model, optimizer, grad_scaler, step_fn, eval_fn


def state_of(model, optimizer, scaler) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "optimizer": optimizer.state_dict(),
        "scaler": None if scaler is None else (scaler.state_dict(), scaler._scale.clone()),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()),
    }


def assert_bitwise_equal(a, b, path="state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.is_floating_point() else a,
                           b.reshape(-1).view(torch.uint8) if b.is_floating_point() else b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("to_host", [False, True])
def test_state_is_bitwise_equal_after_a_check(to_host):
    model, optimizer, scaler, step_fn, eval_fn = make_job()
    for _ in range(3):
        step_fn(8)
    before = state_of(model, optimizer, scaler)
    result = bsmon.branch_check(step_fn, eval_fn, model=model, optimizer=optimizer, scaler=scaler, batch_size=8,
                                steps=8, multiples=(2, 4), to_host=to_host, verbose=False)
    assert result is not None and len(result.branches) == 3
    assert_bitwise_equal(before, state_of(model, optimizer, scaler))


def test_snapshot_drops_optimizer_state_created_on_the_detour():
    model, optimizer, _, step_fn, _ = make_job(scaler=False)
    snapshot = Snapshot(model, optimizer)
    assert not optimizer.state
    step_fn(4)
    assert optimizer.state
    snapshot.restore()
    assert not optimizer.state
    snapshot.restore()  # twice is fine
    assert all(p.grad is None for p in model.parameters())


def test_snapshot_restores_extra_state_objects():
    model, optimizer, _, step_fn, _ = make_job(scaler=False)
    generator = torch.Generator().manual_seed(3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    snapshot = Snapshot(model, optimizer, extra=[generator, scheduler], to_host=True)
    first = torch.rand(4, generator=generator)
    step_fn(4)
    scheduler.step()
    snapshot.restore()
    assert torch.equal(torch.rand(4, generator=generator), first)
    assert scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 3e-3


def test_without_a_monitor_the_cost_is_printed_before_and_after(capsys):
    model, optimizer, scaler, step_fn, eval_fn = make_job()
    result = bsmon.branch_check(step_fn, eval_fn, model=model, optimizer=optimizer, batch_size=8, steps=4,
                                multiples=(2, 4))
    plan, done = capsys.readouterr().out.split("bsmon: branch check done")
    assert "Extra cost: 288 samples (" in plan and "time unknown (no step time measured yet)" in plan
    assert result.cost_samples == 8 * 4 * (3 + 3 + 3) and f"({result.cost_samples} samples" in done


def test_snapshot_refuses_what_it_cannot_restore():
    model, optimizer, *_ = make_job(scaler=False)
    with pytest.raises(TypeError, match="neither state_dict"):
        Snapshot(model, optimizer, extra=[object()])


def run_job(with_check: bool, interrupt_at: int | None = None, tmp_home=None):
    """10 steps of training; with_check: a branch check after the 5th. Returns the final state and the check."""
    model, optimizer, scaler, step_fn, eval_fn = make_job(seed=1)
    calls = 0

    def counting_step(batch_size: int) -> None:
        nonlocal calls
        calls += 1
        if calls == interrupt_at:
            raise KeyboardInterrupt
        step_fn(batch_size)

    result = None
    with bsmon.watch(model, optimizer, name="branch-test", noise_budget=1.0) as monitor:
        for step in range(10):
            step_fn(8)
            if with_check and step == 4:
                calls = 0
                result = bsmon.branch_check(counting_step, eval_fn, scaler=scaler, steps=8, multiples=(2, 4),
                                            verbose=False)
    return state_of(model, optimizer, scaler), result, monitor.session_id


def test_training_continues_identically_and_the_session_records_only_its_own_steps():
    plain, _, _ = run_job(False)
    checked, result, session = run_job(True)
    assert result is not None and result.step == 5 and result.base_batch == 8
    assert_bitwise_equal(plain, checked)
    records, _ = store.read_records(store.resolve_session(session).records_path)
    steps = [r["step"] for r in records if r["k"] == "step"]
    assert steps == list(range(1, 11))  # the check's 8 + 3*4 + 3*2 steps are not the job's
    checks = [r for r in records if r["k"] == "branch_check"]
    assert len(checks) == 1 and wire.validate(checks[0])
    plans = [r["msg"] for r in records if r["k"] == "event" and "Extra cost" in r["msg"]]
    assert plans and f"{result.cost_samples:,} samples" in plans[0]
    model = SessionModel()
    model.ingest_all(records)
    stats = model.stats()
    assert stats.branch_check == BranchCheck.from_record(checks[0])
    assert stats.step == 10


def test_ctrl_c_during_the_check_restores_and_training_continues():
    plain, _, _ = run_job(False)
    interrupted, result, session = run_job(True, interrupt_at=11)  # inside the 2x branch
    assert result is None
    assert_bitwise_equal(plain, interrupted)
    records, _ = store.read_records(store.resolve_session(session).records_path)
    assert not [r for r in records if r["k"] == "branch_check"]
    assert any(r["k"] == "event" and "interrupted" in r["msg"] and r["level"] == "warning" for r in records)
    assert [r["step"] for r in records if r["k"] == "step"] == list(range(1, 11))


def test_an_error_in_step_fn_restores_and_propagates():
    model, optimizer, scaler, step_fn, eval_fn = make_job()
    step_fn(8)
    before = state_of(model, optimizer, scaler)
    calls = 0

    def failing(batch_size: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("data loader broke")
        step_fn(batch_size)

    with pytest.raises(RuntimeError, match="data loader broke"):
        bsmon.branch_check(failing, eval_fn, model=model, optimizer=optimizer, scaler=scaler, batch_size=8,
                           steps=8, multiples=(2,), verbose=False)
    assert_bitwise_equal(before, state_of(model, optimizer, scaler))


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 6, "multiples": (4,)}, "divisible"),
    ({"multiples": (1, 2)}, "integers >= 2"),
    ({"lrs": [0.0]}, "positive"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_are_refused_before_anything_runs(kwargs, message):
    model, optimizer, scaler, step_fn, eval_fn = make_job()
    args = {"model": model, "optimizer": optimizer, "batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        bsmon.branch_check(step_fn, eval_fn, verbose=False, **args)
    assert not optimizer.state


# -- the measured critical batch on a quadratic with a known critical batch -------------------------

DIM, H, S, BASE, ITEMS = 1024, 1.0, 16.0, 8, 256


def critical_batch_closed_form() -> float:
    """The quadratic below: L = h|e|^2/2, per-example gradients h e + |e| z_x with the noise z_x
    orthogonal to e and tr(Sigma) = s^2 |e|^2. Then B_noise = tr(H Sigma)/(G^T H G) = s^2/h^2 at every
    point, the best SGD step at batch b multiplies the expected loss by rho(b) = B_noise/(b + B_noise)
    (MKA's per-step model, exact here), and the samples to reach a loss scale as
    E(b) ~ b / ln(1 + b/B_noise). MKA's critical batch, where E = 2 E_min, solves x/ln(1+x) = 2 with
    x = b/B_noise (x = 2.513: MKA's hyperbola E = E_min(1 + b/B_crit) is the limit of small steps,
    where x/ln(1+x) ~ 1 + x/2)."""
    b_noise = S ** 2 / H ** 2
    lo, hi = 1.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid / math.log1p(mid) < 2 else (lo, mid)
    return lo * b_noise


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        start = torch.randn(DIM, dtype=torch.float64)
        self.theta = nn.Parameter(start / start.norm())  # |e| = 1, the optimum at 0


def quadratic_job():
    model = Quadratic()
    b_noise = S ** 2 / H ** 2
    lr = 1 / (H * (1 + b_noise / BASE))  # the best rate at the base batch
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    held_out = torch.randn(ITEMS, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 / math.sqrt(DIM)

    def step_fn(batch_size: int) -> None:
        e = model.theta.detach()
        noise = torch.randn(DIM, dtype=torch.float64)
        noise -= (noise @ e) / (e @ e) * e
        noise *= S / math.sqrt(batch_size) / noise.norm()  # batch mean of b per-example noises, norm fixed
        model.theta.grad = H * e + e.norm() * noise
        optimizer.step()

    def eval_fn() -> torch.Tensor:
        # one loss per held-out item: h|theta - x_i|^2 / 2 (the held-out set's noise is theta-dependent)
        return 0.5 * H * (model.theta.detach() - held_out).square().sum(dim=1)

    def lrs(k: int) -> list[float]:
        """Around the best rate at kB relative to the base's (lr tuning is not what is tested here)."""
        best = (1 + b_noise / BASE) / (1 + b_noise / (k * BASE))
        return [best * 2 ** (j / 8) for j in range(-2, 3)]

    return model, optimizer, step_fn, eval_fn, lrs


def test_measured_critical_batch_brackets_the_closed_form_on_a_quadratic():
    model, optimizer, step_fn, eval_fn, lrs = quadratic_job()
    truth = critical_batch_closed_form()
    result = bsmon.branch_check(step_fn, eval_fn, model=model, optimizer=optimizer, batch_size=BASE,
                                multiples=(2, 4, 8, 16, 32, 64, 128), steps=128, lrs=lrs, verbose=False)
    assert result.censored is None and result.interval == "bootstrap over the held-out items"
    assert result.b_crit_low <= truth <= result.b_crit_high, (result.b_crit_low, truth, result.b_crit_high)
    assert result.b_crit == pytest.approx(truth, rel=0.1)
    assert result.b_crit_high / result.b_crit_low < 2  # an interval that says something
    # MKA's trade-off at the tested sizes: E(b)/E(B) = (b/B) ln(1 + B/B_noise)/ln(1 + b/B_noise)
    b_noise = S ** 2 / H ** 2
    for run in result.branches[1:]:
        expected = run.batch_size / BASE * math.log1p(BASE / b_noise) / math.log1p(run.batch_size / b_noise)
        assert run.samples_ratio == pytest.approx(expected, rel=0.05)
        assert run.steps_ratio == pytest.approx(run.samples_ratio * BASE / run.batch_size)
    assert result.within == max(r.batch_size for r in result.branches if r.samples_ratio is None
                                or r.samples_ratio <= 2)


def test_too_small_multiples_give_a_lower_bound_not_a_number():
    model, optimizer, step_fn, eval_fn, lrs = quadratic_job()
    result = bsmon.branch_check(step_fn, eval_fn, model=model, optimizer=optimizer, batch_size=BASE,
                                multiples=(2, 4), steps=8, lrs=lrs, verbose=False)
    assert result.b_crit is None and result.censored == "above"
    assert "above about" in result.reason and result.b_crit_low is not None


# -- calibration -----------------------------------------------------------------------------------

def test_calibration_halves_its_log_ratio_every_half_life():
    assert calibration_weight(1000, 1000) == 1.0
    assert calibration_weight(1000, 2000) == pytest.approx(0.5)
    assert calibration_weight(1000, 3000) == pytest.approx(0.25)
    check = BranchCheck(step=10, samples_seen=1000, base_batch=8, samples=64, start_loss=1.0, tolerance_loss=0.1,
                        branches=(), b_crit=100.0, b_crit_low=80.0, b_crit_high=130.0, censored=None, within=64,
                        confidence=0.9, interval=None, b_simple=400.0, calibrate=True)
    assert calibrated_factor(check, 1000) == pytest.approx(4.0)
    assert calibrated_factor(check, 2000) == pytest.approx(2.0)
    import dataclasses
    assert calibrated_factor(dataclasses.replace(check, calibrate=False), 1000) is None


def check_record(step: int, samples_seen: int, b_simple: float, b_crit: float, calibrate: bool) -> dict:
    check = BranchCheck(
        step=step, samples_seen=samples_seen, base_batch=64, samples=8192, start_loss=0.5, tolerance_loss=0.01,
        branches=(BranchRunFor(64, 128, 0.1, 0.40, None), BranchRunFor(128, 64, 0.2, 0.41, 1.3),
                  BranchRunFor(256, 32, 0.4, 0.43, 2.4)),
        b_crit=b_crit, b_crit_low=b_crit * 0.8, b_crit_high=b_crit * 1.3, censored=None, within=128, confidence=0.9,
        interval="bootstrap over the held-out items", b_simple=b_simple, calibrate=calibrate, cost_samples=40960,
        cost_steps=600, cost_evals=40, cost_s=3.5)
    return {"k": "branch_check", "t": 0.0, **check.to_record()}


def BranchRunFor(batch, steps, lr, loss, ratio):
    from bsmon.stats.branch import BranchRun
    return BranchRun(batch, steps, lr, loss, (lr,), (loss,), None if ratio is None else 1000.0,
                     ratio, None if ratio is None else ratio * 64 / batch)


def calibrated_session(calibrate: bool, keep_history: bool = True):
    """test_model's exact session (known B_simple, live throughput at six sizes) plus a branch check."""
    import test_model

    model = SessionModel(keep_history=keep_history)
    model.ingest(test_model._hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    step, t = 1, 0.0
    for b in (8, 16, 32, 64, 128, 256):
        t = test_model._steps(model, step, 15, b, test_model.MICRO_BATCHES, t)
        step += 15
    b_simple = test_model.TRACE / test_model.G_SQ  # exact (test_model checks the model reproduces it)
    samples = 15 * test_model.MICRO_BATCHES * sum((8, 16, 32, 64, 128, 256))
    model.ingest(wire.validate(check_record(step - 1, samples, b_simple, b_simple / 4, calibrate)))
    return model, b_simple, samples


def test_a_calibrating_check_divides_b_simple_by_the_measured_ratio_and_decays():
    from bsmon.stats.optimal import optimal_batch_size

    model, b_simple, samples = calibrated_session(True, keep_history=False)
    stats = model.stats()  # the first recommendation (no history): no hysteresis holds an earlier one
    assert stats.b_simple == pytest.approx(b_simple) and stats.samples_seen == samples
    assert stats.b_noise_calibration == pytest.approx(4.0)
    noise = model.noise()
    expected = optimal_batch_size(model.throughput_points(), stats.b_simple / 4, current_batch=stats.batch_size,
                                  b_noise_low=noise.b_simple_low / 4, b_noise_high=noise.b_simple_high / 4)
    assert stats.b_opt == expected.batch_size
    assert stats.b_opt_reason.startswith("Calibrated by the branch check at step")
    plain, *_ = calibrated_session(False, keep_history=False)
    assert plain.stats().b_noise_calibration is None and plain.stats().branch_check.ratio == pytest.approx(4.0)
    assert plain.stats().b_opt == optimal_batch_size(
        model.throughput_points(), stats.b_simple, current_batch=stats.batch_size, b_noise_low=noise.b_simple_low,
        b_noise_high=noise.b_simple_high).batch_size != stats.b_opt
    # one half-life later (as many samples again), the factor is sqrt(4)
    import test_model
    model, *_ = calibrated_session(True)
    test_model._steps(model, 91, samples // (256 * test_model.MICRO_BATCHES), 256, test_model.MICRO_BATCHES, 100.0)
    model._recommend_due = True
    assert model.stats().b_noise_calibration == pytest.approx(2.0, rel=0.02)
    assert model.history.b_noise[-1] == pytest.approx(model.stats().b_simple / model.stats().b_noise_calibration)


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.update(branches=[]), "branch_check.branches"),
    (lambda r: r["branches"][0].pop("loss"), "lacks field 'loss'"),
    (lambda r: r["branches"][1].update(losses=[1.0, 2.0]), "equally long"),
    (lambda r: r.update(calibrate=1), "calibrate"),
])
def test_malformed_branch_check_records_are_refused(breakage, message):
    record = check_record(10, 1000, 400.0, 100.0, False)
    breakage(record)
    with pytest.raises(wire.ProtocolError, match=message):
        wire.validate(record)


def test_analysis_recovers_mka_exactly_and_repeated_evaluations_give_an_interval():
    """Losses built from MKA's model: a base curve linear in samples, and branch b reaching the loss
    the base reaches on N (B + B_crit)/(b + B_crit) samples. The analysis must return B_crit itself
    (its interpolation is exact on this model); with noisy repeated evaluations, an interval around it."""
    from bsmon.stats.branch import Evaluations, analyse

    base, n, b_crit, sizes = 16, 4096, 300.0, [32, 64, 128, 256, 512, 1024]
    curve_samples = [n * j // 16 for j in range(1, 17)]

    def loss(samples: float) -> float:
        return 1.0 - 1e-4 * samples

    def evaluations(noise: float, repeats: int, seed: int = 0) -> Evaluations:
        rng = np.random.default_rng(seed)

        def ev(value: float) -> np.ndarray:
            return value + noise * rng.standard_normal(repeats)

        equiv = [n * (base + b_crit) / (b + b_crit) for b in sizes]
        return Evaluations(start=ev(loss(0)), curve_samples=curve_samples,
                           curves=[[ev(loss(s)) for s in curve_samples]],
                           finals=[[ev(loss(e))] for e in equiv], paired=False)

    exact = analyse(evaluations(0.0, 1), base, sizes, [[0.1]] + [[0.1]] * len(sizes), n, step=0, samples_seen=0)
    assert exact.b_crit == pytest.approx(b_crit, rel=1e-9) and exact.interval is None
    for run in exact.branches[1:]:
        assert run.samples_ratio == pytest.approx(min((run.batch_size + b_crit) / (base + b_crit),
                                                      run.batch_size / base))
    assert exact.tolerance_loss == pytest.approx(1e-4 * n / 2)
    assert exact.within == 256  # e(256) = 556/316 <= 2 < e(512) = 812/316
    noisy = analyse(evaluations(2e-3, 8), base, sizes, [[0.1]] + [[0.1]] * len(sizes), n, step=0, samples_seen=0)
    assert noisy.interval == "bootstrap over 8 repeated evaluations"
    assert noisy.b_crit_low < b_crit < noisy.b_crit_high and noisy.b_crit_high / noisy.b_crit_low < 3
