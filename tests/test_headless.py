"""Headless and JSON lines: what a SLURM log shows, and when (bsmon/headless.py)."""

import json
from types import SimpleNamespace

from bsmon import store
from bsmon.gpu import GpuSampler
from bsmon import fmt
from bsmon.headless import HeadlessPrinter, staleness
from bsmon.model import SessionModel
from conftest import bsmon_cli, train_command
from fake_nvml import FakeDriver
import test_model

T0 = 1_700_000_000.0


def fresh_model():
    model = SessionModel()
    model.ingest(test_model._hello(t0=T0))
    return model


def step(model, n, t, loss=None):
    model.ingest({"k": "step", "step": n, "t": t, "dt": 0.01, "n": 32, "mb": 1, "dropped": 0})
    if loss is not None:
        model.ingest({"k": "scalars", "step": n, "values": {"loss": loss}})


def texts(lines):
    return [line.text for line in lines]


def test_before_the_first_step_one_waiting_line_then_one_every_30_s():
    model, printer = fresh_model(), HeadlessPrinter(json_lines=False)
    seen = [texts(printer.look(model, "running", T0 + s)) for s in range(0, 95)]
    printed = {s: lines for s, lines in enumerate(seen) if lines}
    assert list(printed) == [0, 30, 60, 90]
    assert printed[0] == ["bsmon: waiting for the first step"]
    assert printed[60] == ["bsmon: waiting for the first step (1:00 since the job started)"]


def test_a_line_only_when_the_step_advanced_with_that_steps_loss():
    model, printer = fresh_model(), HeadlessPrinter(json_lines=False)
    step(model, 1, T0 + 1, loss=2.5)
    [first] = texts(printer.look(model, "running", T0 + 1))
    assert first.startswith("[") and " step 1 |" in first and "loss 2.5 |" in first
    # A stall: the job logs more (an eval loop) for the next step but takes none.
    for s in range(2, 31):
        model.ingest({"k": "scalars", "step": 2, "values": {"loss": 1.0 + s}})
        assert printer.look(model, "running", T0 + s) == []
    [stalled] = texts(printer.look(model, "running", T0 + 31))
    assert stalled == "bsmon: no new step for 30 s (last step 1)"
    assert printer.look(model, "running", T0 + 45) == []
    assert texts(printer.look(model, "running", T0 + 61)) == ["bsmon: no new step for 1:00 (last step 1)"]
    step(model, 2, T0 + 62, loss=0.5)
    [resumed] = texts(printer.look(model, "running", T0 + 62))
    assert " step 2 |" in resumed and "loss 0.5 |" in resumed


def test_the_final_line_is_printed_once():
    model, printer = fresh_model(), HeadlessPrinter(json_lines=False)
    step(model, 1, T0 + 1)
    printer.look(model, "running", T0 + 1)
    model.ingest({"k": "bye", "t": T0 + 2, "status": "finished", "code": 0})
    [final] = texts(printer.look(model, "ended", T0 + 2, final=True))
    assert final.endswith("| ended")
    assert printer.look(model, "ended", T0 + 3, final=True) == []
    assert printer.look(model, "ended", T0 + 100) == []


def test_no_gpu_is_said_once_with_the_gpu_panels_reason():
    sampler = GpuSampler(None, nvml=FakeDriver(library_present=False).nvml)
    snapshot = sampler.sample_once()
    sampler.stop()
    model, printer = fresh_model(), HeadlessPrinter(json_lines=True)
    model.ingest({"k": "gpu", "snapshot": snapshot.to_record()})
    first = printer.look(model, "running", T0)
    assert [(line.text, line.notice) for line in first[:1]] == [(f"bsmon: no GPU visible: {snapshot.banner}", True)]
    assert json.loads(first[1].text)["state"] == "waiting"
    step(model, 1, T0 + 1)
    model.ingest({"k": "gpu", "snapshot": snapshot.to_record()})
    assert all(not line.notice for line in printer.look(model, "running", T0 + 1))


def test_the_line_and_json_carry_the_optimum_or_the_next_action():
    model, printer = fresh_model(), HeadlessPrinter(json_lines=False)
    step(model, 1, T0 + 1)
    stats = model.stats()
    [line] = texts(printer.look(model, "running", T0 + 1))
    assert f"| {fmt.optimum(stats)} |" in line and fmt.optimum(stats).startswith("B* N/A: ")
    model = SessionModel()
    model.ingest(test_model._hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    t, n = 0.0, 1
    for b in (8, 16, 32, 64, 128, 256):
        t = test_model._steps(model, n, 15, b, 2, t)
        n += 15
    stats = model.stats()
    assert stats.b_opt is not None
    [line] = texts(HeadlessPrinter(json_lines=True).look(model, "running", 10.0))
    assert json.loads(line)["advice"] == fmt.optimum(stats) and fmt.optimum(stats).startswith(f"B* {stats.b_opt}")


def test_a_stale_estimate_is_marked_when_stats_say_so():
    assert staleness(SimpleNamespace(noise_stale=True, noise_age_steps=1200)) == "STALE (1,200 steps old)"
    assert staleness(SimpleNamespace(noise_stale=False, noise_age_steps=3)) is None
    assert staleness(fresh_model().stats()) is None  # Stats without freshness fields: no marker


def test_run_headless_prints_each_line_once_with_the_optimum():
    result = bsmon_cli("run", "--headless", "--", *train_command("--steps", "30", "--sleep", "0.01"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len([line for line in lines if line.endswith("| ended")]) == 1 and lines[-1].endswith("| ended")
    steps = [line.split(" step ")[1].split(" ")[0] for line in lines]
    assert len(steps[:-1]) == len(set(steps[:-1]))  # no step repeated before the final line
    assert "| B* " in lines[-1]
    [session] = store.list_sessions()
    assert session.steps == 30
