"""Steps are steps: skipped and abandoned attempts, unequal and cleared micro-batches.

Real training loops on the CPU under bsmon.watch(), parameters held fixed (learning rate 0) so
the population noise scale is exact (per-example gradients with torch.func, as in
test_noise_probe). Every number is checked against that ground truth: the exact value must lie
inside the band shown.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bsmon
from bsmon import store
from bsmon.headless import status_line
from bsmon.model import SessionModel
from bsmon.probe.noise import REASON_DDP_NO_SYNC, REASON_NEEDS_ACCUMULATION
from test_noise_probe import N_EXAMPLES, _problem, exact_b_simple


def _records(monitor):
    return store.read_records(store.resolve_session(monitor.session_id).records_path)[0]


def _steps(monitor):
    return [r for r in _records(monitor) if r["k"] == "step"]


def _estimators(monitor):
    return [r["name"] for r in _records(monitor) if r["k"] == "estimator"]


def _inside_band(stats, exact):
    assert stats.b_simple is not None, stats.noise_reason
    assert stats.b_simple_low <= exact <= stats.b_simple_high, (
        f"exact {exact:.1f} outside [{stats.b_simple_low:.1f}, {stats.b_simple_high:.1f}]")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_gradscaler_overflows_are_skipped_steps_not_merged_and_reset_nothing():
    """A real torch.amp.GradScaler: an inf in the gradient makes it skip optimizer.step()."""
    model, x, y, loss_fn = _problem("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sampler = torch.Generator().manual_seed(1)
    overflows = {40, 41, 300}  # 40 and 41 back to back: one optimizer step after two skipped attempts
    iterations = 700
    with bsmon.watch(model, optimizer, horizon_samples=1e12, noise_budget=1.0) as monitor:
        for it in range(iterations):
            idx = torch.randint(0, N_EXAMPLES, (32,), generator=sampler)
            loss = loss_fn(model(x[idx]), y[idx])
            scaler.scale(loss).backward()
            if it in overflows:
                model[0].weight.grad[0, 0] = math.inf  # what a half-precision overflow leaves behind
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    stats = monitor.stats()
    steps = _steps(monitor)
    assert len(steps) == iterations - len(overflows) == stats.step
    assert all(r["n"] == 32 and r["mb"] == 1 for r in steps)  # nothing merged into the next step
    skipped = [chunk for r in steps for chunk in r.get("skipped", [])]
    assert skipped == [{"n": 32, "mb": 1, "why": "cleared"}] * 3
    assert stats.skipped_steps == 3 and stats.step_problem is None
    assert _estimators(monitor) == ["per_example"]  # never flipped to micro-batch and back
    # Nothing reset: every step after the first (which installs the per-example hooks) counted.
    assert stats.noise_steps == len(steps) - 1
    _inside_band(stats, exact_b_simple(model, x, y, loss_fn))


class Flaky(nn.Module):
    """An MLP whose forward can raise, as an out-of-memory error would."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.net(x)


def test_an_attempt_that_raised_is_skipped_and_the_retry_is_one_step():
    net, x, y, loss_fn = _problem("mlp")
    model = Flaky(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sampler = torch.Generator().manual_seed(2)
    fails = {25, 200}
    steps = 900
    with bsmon.watch(model, optimizer, noise="microbatch", horizon_samples=1e12, noise_budget=1.0) as monitor:
        for step in range(steps):
            if step in fails:  # the out-of-memory retry pattern: one 48-sample pass fails ...
                model.fail = True
                try:
                    model(x[:48])
                except RuntimeError:
                    optimizer.zero_grad()
                model.fail = False
            for _ in range(2):  # ... and the step is retried as two micro-batches of 24
                idx = torch.randint(0, N_EXAMPLES, (24,), generator=sampler)
                (loss_fn(model(x[idx]), y[idx]) / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
    stats = monitor.stats()
    records = _steps(monitor)
    assert all(r["n"] == 48 and r["mb"] == 2 for r in records)  # before: n=96, mb=3 on the failing steps
    assert [r["step"] for r in records if "skipped" in r] == [f + 1 for f in sorted(fails)]
    assert all(r["skipped"] == [{"n": 48, "mb": 1, "why": "raised"}] for r in records if "skipped" in r)
    assert stats.skipped_steps == 2 and stats.noise_estimator == "microbatch"
    assert stats.noise_steps == steps
    _inside_band(stats, exact_b_simple(net, x, y, loss_fn))


def test_a_micro_batch_that_raised_inside_the_accumulation_is_dropped_alone():
    net, x, y, loss_fn = _problem("linear")
    model = Flaky(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with bsmon.watch(model, optimizer, noise="microbatch", noise_budget=1.0) as monitor:
        for step in range(3):
            for micro in range(3):
                if step == 1 and micro == 1:  # the second micro-batch fails once and is retried
                    model.fail = True
                    with pytest.raises(RuntimeError):
                        model(x[:16])
                    model.fail = False
                (loss_fn(model(x[:16]), y[:16]) / 3).backward()
            optimizer.step()
            optimizer.zero_grad()
        for _ in range(2):  # then a last micro-batch that fails, and the job steps without it
            (loss_fn(model(x[:16]), y[:16]) / 3).backward()
        model.fail = True
        with pytest.raises(RuntimeError):
            model(x[:16])
        optimizer.step()
    records = _steps(monitor)
    assert [(r["n"], r["mb"]) for r in records] == [(48, 3)] * 3 + [(32, 2)]
    assert records[1]["skipped"] == records[3]["skipped"] == [{"n": 16, "mb": 1, "why": "raised"}]
    assert all("noise" in r for r in records)  # each step kept the passes it trained on


def _ragged_run(noise, steps, sizes, clear_between=False, seed=3):
    """Accumulate len(sizes) micro-batches of the given sizes (a mean loss / m, the common way)."""
    model, x, y, loss_fn = _problem("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sampler = torch.Generator().manual_seed(seed)
    with bsmon.watch(model, optimizer, noise=noise, horizon_samples=1e12, noise_budget=1.0) as monitor:
        for _ in range(steps):
            idx = torch.randint(0, N_EXAMPLES, (sum(sizes),), generator=sampler)
            for chunk in torch.split(idx, sizes):
                if clear_between:
                    optimizer.zero_grad()  # the mistake: inside the accumulation loop
                (loss_fn(model(x[chunk]), y[chunk]) / len(sizes)).backward()
            optimizer.step()
            optimizer.zero_grad()
    return monitor, exact_b_simple(model, x, y, loss_fn)


def test_unequal_micro_batches_are_used():
    # torch.tensor_split(100 samples, 3): 34/33/33. Before: every step dropped, and the reason
    # said to accumulate >= 2 micro-batches.
    monitor, exact = _ragged_run("microbatch", 1500, [34, 33, 33])
    stats = monitor.stats()
    assert stats.noise_estimator == "microbatch" and stats.noise_steps == 1500
    _inside_band(stats, exact)


def test_zero_grad_between_micro_batches_is_named():
    monitor, exact = _ragged_run("microbatch", 40, [16, 16, 16], clear_between=True)
    stats = monitor.stats()
    records = _steps(monitor)
    # Each step trains on its last micro-batch only: that is the batch recorded and shown.
    assert all(r["n"] == 16 and r["mb"] == 1 for r in records)
    assert all(r["skipped"] == [{"n": 16, "mb": 1, "why": "cleared"}] * 2 for r in records)
    assert stats.batch_size == 16 and stats.skipped_steps == 0  # micro-batches, not skipped steps
    assert stats.step_problem == (
        "gradients are cleared between micro-batches: zero_grad() runs inside the accumulation loop, so "
        "each optimizer step uses only the micro-batch after the last clear (16 samples, the batch shown). "
        "Call zero_grad() once per optimizer step, after optimizer.step()")
    assert stats.b_simple is None and stats.noise_reason == stats.step_problem  # not "accumulate >= 2"
    assert REASON_NEEDS_ACCUMULATION in [r["reason"] for r in _records(monitor) if r["k"] == "estimator"]
    replayed = SessionModel()
    replayed.ingest_all(_records(monitor))
    line = status_line(replayed, "ended")
    assert "B 16 |" in line and line.count("gradients are cleared between micro-batches") == 1


def test_zero_grad_between_micro_batches_in_auto_measures_the_batch_that_trains():
    monitor, exact = _ragged_run("auto", 600, [32, 32], clear_between=True)
    stats = monitor.stats()
    assert stats.step_problem.startswith("gradients are cleared between micro-batches")
    assert stats.noise_estimator == "per_example" and stats.batch_size == 32
    _inside_band(stats, exact)


def test_ddp_accumulation_without_no_sync_gets_its_reason():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Linear(8, 1).double())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        with bsmon.watch(model, optimizer, noise="ddp", noise_budget=1.0) as monitor:
            for _ in range(3):
                for _ in range(2):  # both passes all-reduce: no model.no_sync()
                    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
                    (F.mse_loss(model(x), y) / 2).backward()
                optimizer.step()
                optimizer.zero_grad()
    finally:
        dist.destroy_process_group()
    stats = monitor.stats()
    assert stats.b_simple is None and stats.noise_estimator is None
    assert stats.noise_reason == REASON_DDP_NO_SYNC.format(synced=2, m=2)
    assert stats.noise_reason.endswith("Run all but the last micro-batch inside `with model.no_sync():`")


def test_overflows_in_two_steps_in_a_row_are_skipped_steps_and_three_in_a_row_are_zero_grad():
    """GradScaler overflows come alone or in bursts; a loop with zero_grad() between its
    micro-batches clears in every step. Only CLEARS_IN_A_ROW steps in a row name the mistake."""
    from bsmon.model import CLEARS_IN_A_ROW
    from test_units import _hello

    def run(cleared_steps, steps=8):
        model = SessionModel()
        model.ingest(_hello())
        for n in range(1, steps + 1):
            skipped = [{"n": 16, "mb": 2, "why": "cleared"}] if n in cleared_steps else []
            model.ingest({"k": "step", "step": n, "t": n * 0.1, "dt": 0.1, "n": 16, "mb": 2, "dropped": 0,
                          **({"skipped": skipped} if skipped else {})})
        return model.stats()

    overflows = run({3, 4})
    assert overflows.skipped_steps == 2 and overflows.step_problem is None
    mistake = run(set(range(2, 9)))
    assert CLEARS_IN_A_ROW == 3 and mistake.skipped_steps == 0 and "zero_grad()" in mistake.step_problem
