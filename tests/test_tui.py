"""The Textual app under Pilot, fed by records of a real (tiny) training run.

Snapshot baselines live in tests/__snapshots__/test_tui/ (pytest-textual-snapshot's layout);
regenerate them with `pytest tests/test_tui.py --snapshot-update` and look at them before
committing.
"""

from __future__ import annotations

import asyncio
import functools
import math
import signal
import time

import numpy as np
import pynvml
import pytest
import torch
from textual.widgets import Sparkline, Static

from bsmon import fmt, store
from bsmon.cli import ChildJob
from bsmon.client import Feed
from bsmon.export import export_to_file
from bsmon.gpu import GpuSampler
from bsmon.model import MEASURE_NOISE_ACTION, SessionModel
from bsmon.probe import monitor as monitor_module
from bsmon.probe.monitor import watch
from bsmon.stats.optimal import optimal_batch_size
from bsmon.tui import BsmonApp
from bsmon.history import Binned
from bsmon.tui.screens import HelpScreen, WhyScreen
from bsmon.tui.widgets import (
    BatchPanel, BatchSizeChart, GpuPanel, JobHeader, LinesView, LossChart, NoiseChart, OptimalPanel, RanksPanel,
    ScalarsPanel, OPTIMAL_GIST, ThroughputChart, ThroughputPanel, noise_source, regime,
)
from conftest import WAIT_S, spawn
from fake_nvml import FakeDriver, FakeGpu

SIZE = (100, 40)


def pilot_test(test):
    """Run an async Pilot test with asyncio.run (the venv has no pytest-asyncio)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


# -- records -------------------------------------------------------------------------------------

def train(home, *, steps, accumulate, noise="auto"):
    """A tiny real training run under bsmon.watch; returns its session."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD([{"params": model[0].parameters()},  # two groups: a per-group breakdown
                                 {"params": model[2].parameters(), "lr": 0.02}], lr=0.05)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1) + 0.3 * torch.randn(512, 1)
    with watch(model, optimizer, name="tiny", noise=noise, noise_budget=1.0) as monitor:
        for _ in range(steps):
            for _ in range(accumulate):
                idx = torch.randint(0, 512, (16,))
                loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx]) / accumulate
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.log(loss=loss.detach() * accumulate, lr=0.05)
    return store.resolve_session(monitor.session_id, home)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Two real sessions: one with gradient accumulation (a noise scale), one without."""
    home = tmp_path_factory.mktemp("bsmon-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BSMON_HOME", str(home))
        # A plain loop, whatever frameworks other tests imported into this process (the next-action
        # wording names the framework the job imported).
        patch.setattr(monitor_module, "FRAMEWORKS", ())
        return {"noise": train(home, steps=60, accumulate=4),
                "no_noise": train(home, steps=20, accumulate=1, noise="microbatch")}


def replay(info):
    return Feed().replay(info)


def partial_feed(info, steps):
    """A feed that has seen the session up to ``steps`` steps, and the records still to come."""
    records, _ = store.read_records(info.records_path)
    cut = next(i for i, r in enumerate(records) if r["k"] == "step" and r["step"] == steps) + 1
    feed = Feed()
    feed.state = "live"
    ingest(feed, records[:cut])
    return feed, records[cut:]


def ingest(feed, records):
    with feed.lock:
        feed.model.ingest_all(records)
        feed.version += 1


def synthetic_records(steps=400, adam=False):
    """A deterministic finished session: |G|^2 falls over training, so B_simple rises.

    ``adam``: an AdamW job, whose steps also carry |P .grad|^2 for B_pre (here 4x B_simple)."""
    rng = np.random.default_rng(0)
    t0 = 1_700_000_000.0
    records = [
        {"k": "hello", "v": 1, "session": "5eed0001", "name": "cifar_resnet18", "pid": 4242, "t0": t0,
         "command": ["/opt/venv/bin/python", "train.py", "--lr", "0.1", "--accumulate", "4"],
         "host": "node7", "user": "ml", "unit": "samples", "world_size": 1},
        {"k": "estimator", "name": "microbatch", "reason": None,
         "groups": ["group 0 (11,173,962 params, lr=0.1)"], "covered_fraction": 1.0},
    ]
    if adam:
        records[0]["optimizer"] = "AdamW"
        records[1].update(second_moment=True, precond_reason=None)
    micro, passes, trace_sigma = 64, 4, 400.0
    t = t0 + 4.0
    for step in range(1, steps + 1):
        progress = step / steps
        grad_sq = 2.0 * math.exp(-2.5 * progress)
        acc = [(j / passes) ** 2 * (grad_sq + trace_sigma / (j * micro)) * float(rng.gamma(50.0, 1 / 50.0))
               for j in range(1, passes + 1)]
        dt = 0.118 + 0.01 * float(rng.random())
        t += dt
        noise = {"est": "microbatch", "micro": [micro] * passes, "g": 1, "acc": acc}
        if adam:
            noise["pre"] = [(j / passes) ** 2 * (grad_sq + 4 * trace_sigma / (j * micro)) for j in range(1, passes + 1)]
        records.append({"k": "step", "step": step, "t": t, "dt": dt, "n": micro * passes, "mb": passes,
                        "dropped": 0, "noise": noise})
        loss = 2.3 * math.exp(-1.3 * progress) + 0.05 * float(rng.random())
        records.append({"k": "scalars", "step": step, "values": {"loss": loss, "lr": 0.1}})
        if step == steps // 2:
            records.append({"k": "event", "t": t, "level": "warning",
                            "msg": "log(acc=...) ignored: a Tensor of shape (64,) is not a number. "
                                   "Pass a Python number or a one-element tensor."})
    records.append({"k": "bye", "t": t + 0.5, "status": "finished", "code": 0, "error": None})
    return records


def synthetic_feed():
    model = SessionModel()
    model.ingest_all(synthetic_records())
    feed = Feed(model)
    feed.state = "replay"
    return feed


def shown(app, panel, line):
    """The plain text of one line of a panel ('' when the panel leaves it out)."""
    return app.query_one(panel).line(line)


def toasts(app):
    return [(toast.render().plain, toast.has_class("-error")) for toast in app.screen.query("Toast")]


# -- numbers -------------------------------------------------------------------------------------

@pilot_test
async def test_panels_show_the_numbers_of_the_model(sessions):
    feed = replay(sessions["noise"])
    stats = feed.model.stats()
    assert stats.step == 60 and stats.b_simple is not None
    async with BsmonApp(feed, mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        app = pilot.app
        assert "step 60" in shown(app, JobHeader, "title")
        assert "replay: finished" in shown(app, JobHeader, "title")
        assert shown(app, ThroughputPanel, "rate") == f"{fmt.si(stats.samples_per_s)} samples/s now"
        assert shown(app, ThroughputPanel, "dropped") == ""
        band = fmt.band(stats.b_simple, stats.b_simple_low, stats.b_simple_high)
        assert shown(app, BatchPanel, "b_simple") == f"B_simple {band}"
        assert shown(app, BatchPanel, "batch") == "batch 64 samples = 4 x 16"
        # At 100 columns the panel is narrow: the short forms, which fit one line.
        assert shown(app, BatchPanel, "source") == (
            f"microbatch, 60 steps, measured this step, |G|²<0 in {stats.negative_grad_sq_steps}")
        assert noise_source(stats).startswith("microbatch estimator, 100% of parameters, 60 steps")
        efficiency = 1 / (1 + 64 / stats.b_simple)
        assert shown(app, BatchPanel, "efficiency").startswith(f"efficiency {efficiency:.0%} per sample at B=64")
        assert shown(app, BatchPanel, "regime") == regime(64, stats.b_simple, short=True)
        assert len(stats.noise_groups) == 2
        assert shown(app, BatchPanel, "groups").splitlines() == [
            f"{label}: {fmt.band(noise.b_simple, noise.b_simple_low, noise.b_simple_high)}"
            for label, noise in stats.noise_groups]
        assert shown(app, BatchPanel, "groups").startswith("group 0 (288 params, lr=0.05): ")
        # no profile: the optimum from the run's own step times, over accumulation at its micro-batch
        assert stats.b_opt_source == "in-run" and stats.b_opt_micro_batch == 16
        assert shown(app, OptimalPanel, "optimal") == (
            f"B* {stats.b_opt} (now 64): at micro-batch 16: accumulate {stats.b_opt_accumulation}")
        assert shown(app, OptimalPanel, "memory").startswith("a larger micro-batch may do better")
        sizes, _, _, goodput, _, _, current, optimal = app.query_one(BatchSizeChart)._data
        assert (current, optimal) == (64, stats.b_opt) and all(size % 16 == 0 for size in sizes)  # whole micro-batches
        assert shown(app, ScalarsPanel, "scalars") == f"loss {feed.model.last_scalars['loss']:.4g}  lr 0.05"
        on_screen = app.query_one(BatchPanel).query_one(LinesView).text
        assert f"B_simple {band}" in on_screen.splitlines()


@pilot_test
async def test_a_torn_record_is_reported_in_the_header(sessions, tmp_path):
    info = sessions["noise"]
    copy = tmp_path / info.directory.name
    copy.mkdir()
    data = info.records_path.read_bytes()
    (copy / store.RECORDS_FILE).write_bytes(data + data[:10])  # a crash in the middle of a frame
    feed = replay(store.session_info(copy))
    async with BsmonApp(feed, mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert shown(pilot.app, JobHeader, "message") == feed.message
        assert "torn" in feed.message


@pilot_test
async def test_the_optimal_panel_and_chart_show_the_models_recommendation():
    """Live throughput points at six sizes and an exact noise scale: the model recommends, the view shows it."""
    import test_model

    model = SessionModel()
    model.ingest(test_model._hello())
    step, t = 1, 0.0
    for b in (8, 16, 32, 64, 128, 256):
        t = test_model._steps(model, step, 15, b, 2, t)
        step += 15
    model.ingest({"k": "bye", "t": t, "status": "finished", "code": 0})
    stats = model.stats()
    rec = model.recommendation
    feed = Feed(model)
    feed.state = "replay"
    async with BsmonApp(feed, mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        app = pilot.app
        assert shown(app, OptimalPanel, "optimal") == f"B* {stats.b_opt} (now {rec.current_batch})"
        # At 100 columns the panel is narrow: the band's name and the full reason are left to w.
        assert shown(app, OptimalPanel, "speedup") == (
            f"predicted speedup {rec.speedup:.2f}x [{rec.speedup_low:.2f}, {rec.speedup_high:.2f}]")
        assert shown(app, OptimalPanel, "lr") == f"lr: SGD x{rec.lr_factor_sgd:.3g}, Adam x{rec.lr_factor_adam:.3g}"
        assert shown(app, OptimalPanel, "why") == OPTIMAL_GIST
        assert shown(app, OptimalPanel, "memory") == "memory limit unknown: the largest size measured is 512"
        await pilot.press("w")
        assert isinstance(app.screen, WhyScreen)
        why = str(app.screen.query_one("#why-text", Static).visual)
        assert rec.reason in why and rec.lr_advice in why and "largest size measured is 512" in why
        await pilot.press("escape")
        assert not isinstance(app.screen, WhyScreen)
        chart = app.query_one(BatchSizeChart)
        sizes, throughput, efficiency, goodput, measured, _, current, optimal = chart._data
        # The curve peaks at the closed form sqrt(B_half * B_noise); the marker is the (hysteresis-held) advice.
        exact = math.sqrt(test_model.B_HALF * stats.b_simple)
        assert sizes[np.argmax(goodput)] == pytest.approx(exact, rel=0.06)
        assert (current, optimal) == (rec.current_batch, stats.b_opt)
        assert efficiency == pytest.approx(1 / (1 + sizes / stats.b_simple))
        assert sorted(measured) == [16, 32, 64, 128, 256, 512]
    async with BsmonApp(feed, mode="replay").run_test(size=(200, 60)) as pilot:
        await pilot.pause()
        assert shown(pilot.app, OptimalPanel, "why") == OPTIMAL_GIST  # one line, never the paragraph


@pilot_test
async def test_without_noise_data_the_reason_is_shown_and_never_a_number(sessions):
    feed = replay(sessions["no_noise"])
    reason = feed.model.stats().noise_reason
    assert reason.startswith("one backward pass per step")
    async with BsmonApp(feed, mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        app = pilot.app
        assert shown(app, BatchPanel, "b_simple") == "B_simple: no estimate"
        assert shown(app, BatchPanel, "reason") == reason
        assert shown(app, BatchPanel, "efficiency") == shown(app, BatchPanel, "regime") == ""
        assert not any(ch.isdigit() for ch in shown(app, BatchPanel, "b_simple"))
        # never a dead end: the one next action for this job
        assert shown(app, OptimalPanel, "optimal") == MEASURE_NOISE_ACTION[None]


@pilot_test
async def test_the_batch_panel_shows_measuring_progress_age_stale_and_skipped_steps():
    import test_units

    model = SessionModel()
    model.ingest(test_units._hello())
    model.ingest({"k": "estimator", "name": "microbatch", "reason": None, "groups": ["all"]})
    noise = test_units._exact_noise([8, 8], 1.0, 50.0)

    def step(n, **extra):
        model.ingest({"k": "step", "step": n, "t": n * 0.1, "dt": 0.1, "n": 16, "mb": 2, "dropped": 0, **extra})

    step(1, noise=noise)
    feed = Feed(model)
    feed.state = "replay"
    async with BsmonApp(feed, mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert shown(pilot.app, BatchPanel, "b_simple") == "B_simple: measuring: 1 step"  # no band: no number
        assert shown(pilot.app, BatchPanel, "reason") == ""
    for n in range(2, 11):
        step(n, noise=noise, **({"skipped": [{"n": 16, "mb": 2, "why": "cleared"}]} if n == 5 else {}))
    for n in range(11, 113):
        step(n)
    async with BsmonApp(feed, mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        app = pilot.app
        assert shown(app, BatchPanel, "b_simple") == "B_simple 50 [50, 50]"
        assert shown(app, BatchPanel, "source").endswith("10 steps, measured 102 steps ago")
        assert shown(app, BatchPanel, "stale") in (  # the long form where it fits, else the short one
            "stale: no measured step for 102 steps; the estimator stopped measuring", "stale: not measured for 102 steps")
        assert shown(app, BatchPanel, "steps") == "1 skipped step (no optimizer.step())"


def test_regime_wording_covers_below_near_and_above_the_noise_scale():
    assert regime(100, 1000) == "batch is 0.1x the noise scale: larger batches are nearly free statistically"
    assert "near the critical batch" in regime(1000, 1000)
    assert "most extra samples are wasted" in regime(5000, 1000)
    assert [regime(b, 1000, short=True) for b in (100, 1000, 5000)] == [
        "0.1x B_simple: larger batch ~free", "1x B_simple: near critical batch", "5x B_simple: most samples wasted"]


@pilot_test
async def test_dropped_records_are_highlighted(sessions):
    feed, rest = partial_feed(sessions["noise"], 30)
    step = next(r for r in rest if r["k"] == "step")
    ingest(feed, [dict(step, dropped=7)])
    async with BsmonApp(feed, mode="attach").run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert shown(pilot.app, ThroughputPanel, "dropped").startswith("7 records dropped")


@pilot_test
async def test_pause_freezes_the_numbers_while_records_keep_arriving(sessions):
    feed, rest = partial_feed(sessions["noise"], 30)
    async with BsmonApp(feed, mode="attach").run_test(size=SIZE) as pilot:
        app = pilot.app
        await pilot.pause()
        assert "step 30" in shown(app, JobHeader, "title")
        await pilot.press("p")
        assert "PAUSED" in shown(app, JobHeader, "title")
        ingest(feed, rest)
        app._redraw()  # what the redraw timer does
        assert "step 30" in shown(app, JobHeader, "title")
        assert app.refresh_numbers() is False and app.refresh_charts() is False
        await pilot.press("p")
        await pilot.pause()
        assert "step 60" in shown(app, JobHeader, "title") and "PAUSED" not in shown(app, JobHeader, "title")


@pilot_test
async def test_help_screen_opens_and_closes():
    async with BsmonApp(synthetic_feed(), mode="replay").run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(pilot.app.screen, HelpScreen)
        text = str(pilot.app.screen.query_one("#help-numbers", Static).visual)
        assert "1/(1+B/B_simple)" in text and "well-conditioned Hessian" in text
        await pilot.press("escape")
        assert not isinstance(pilot.app.screen, HelpScreen)


# -- export ----------------------------------------------------------------------------------------

def csv_export(feed, path):
    """The export callable `bsmon run` hands the app: write the session file's CSV."""
    def export():
        export_to_file(feed.session_dir, path)
        return path
    return export


@pilot_test
async def test_export_writes_the_csv_and_says_where(sessions, tmp_path):
    feed = replay(sessions["noise"])
    path = tmp_path / "run.csv"
    app = BsmonApp(feed, mode="replay", export=csv_export(feed, path))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("e")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        assert toasts(pilot.app) == [(f"Export\nCSV written to {path}", False)]
    assert len(path.read_text().splitlines()) == 61


@pilot_test
async def test_an_export_that_fails_shows_the_error(sessions, tmp_path):
    feed = replay(sessions["noise"])
    path = tmp_path / "no such directory" / "run.csv"
    app = BsmonApp(feed, mode="replay", export=csv_export(feed, path))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("e")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        [(text, is_error)] = toasts(pilot.app)
        assert is_error and text.startswith("Export failed\ncould not write the CSV: [Errno 2]")
        assert str(path.parent) in text


# -- the job ---------------------------------------------------------------------------------------

@pytest.fixture
def sleeping_job():
    job = ChildJob(spawn(["sleep", "30"]))  # default signal dispositions, whatever pytest inherited
    yield job
    job.restore_signals()
    job.process.kill()
    job.process.wait()


async def until(pilot, condition, what, timeout=WAIT_S):
    """Let the app run until ``condition()`` holds (its timers tick on their own schedule)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await pilot.pause(0.05)


@pilot_test
async def test_ctrl_c_in_run_mode_interrupts_the_job_and_stays_open(sessions, sleeping_job):
    async with BsmonApp(replay(sessions["noise"]), mode="run", job=sleeping_job).run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+c")
        assert sleeping_job.process.wait(timeout=WAIT_S) == -signal.SIGINT
        await until(pilot, lambda: "failed (SIGINT)" in shown(pilot.app, JobHeader, "title"), "the header update")
        assert pilot.app.is_running


@pilot_test
async def test_q_in_run_mode_detaches_and_leaves_the_job_running(sessions, sleeping_job):
    async with BsmonApp(replay(sessions["noise"]), mode="run", job=sleeping_job).run_test(size=SIZE) as pilot:
        await pilot.press("p")  # any other key leaves it running
        await pilot.pause()
        assert pilot.app.is_running
        await pilot.press("q")
        await until(pilot, lambda: not pilot.app.is_running, "leaving")
    assert sleeping_job.returncode() is None


@pilot_test
async def test_the_run_view_leaves_when_the_terminal_hangs_up(sessions, sleeping_job):
    async with BsmonApp(replay(sessions["noise"]), mode="run", job=sleeping_job).run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert pilot.app.is_running
        sleeping_job.hung_up = True  # what bsmon run's SIGHUP handler sets
        await until(pilot, lambda: not pilot.app.is_running, "leaving")
    assert sleeping_job.returncode() is None


@pilot_test
async def test_q_in_the_demo_ends_the_demo_job():
    """The demo is bsmon's own job: q stops it (it finishes normally) instead of leaving it training."""
    import os
    import sys

    from bsmon.client import wait_for_session

    session = "demo0001"
    env = dict(os.environ, BSMON_SESSION_ID=session)
    job = ChildJob(spawn([sys.executable, "-m", "bsmon.demo", "--steps", "1000000"], env=env,
                         stdout=None, stderr=None))
    try:
        info = wait_for_session(session, alive=lambda: job.returncode() is None, timeout=120)
        assert info is not None and info.status == "running"
        feed = Feed().attach(info.socket, info.directory)
        app = BsmonApp(feed, mode="run", job=job, quit_ends_job=True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert footer_keys(app)["q"] == "Quit, ends demo"
            await pilot.press("q")
        assert job.process.wait(timeout=WAIT_S) == 0
        assert feed.wait(timeout=WAIT_S)
        feed.stop()
        assert store.session_info(info.directory).status == "finished"
    finally:
        job.restore_signals()
        job.process.kill()
        job.process.wait()


def footer_keys(app):
    """Key -> description of the bindings the footer shows."""
    return {active.binding.key: active.binding.description for active in app.active_bindings.values()
            if active.enabled and active.binding.show}


@pilot_test
async def test_the_footer_says_what_q_does_in_each_mode(sleeping_job):
    cases = [("run", sleeping_job, "Detach"), ("attach", None, "Detach"), ("replay", None, "Quit")]
    for mode, job, q in cases:
        app = BsmonApp(synthetic_feed(), mode=mode, job=job)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert footer_keys(app)["q"] == q, mode
            await pilot.press("question_mark")
            keys = str(app.screen.query_one("#help-keys", Static).visual)
            assert {"run": "detach: the job keeps running and is still recorded", "attach": "detach: the job keeps",
                    "replay": "q       quit"}[mode] in keys


@pilot_test
async def test_ctrl_c_quits_a_replay():
    async with BsmonApp(synthetic_feed(), mode="replay").run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+c")
        await until(pilot, lambda: not pilot.app.is_running, "quitting")


def test_bad_arguments_are_refused_with_a_sentence(sleeping_job):
    with pytest.raises(ValueError, match="mode='live'"):
        BsmonApp(Feed(), mode="live")
    with pytest.raises(ValueError, match="only meaningful in mode='run'"):
        BsmonApp(Feed(), mode="attach", job=sleeping_job)
    with pytest.raises(ValueError, match="keeps no history"):
        BsmonApp(Feed(SessionModel(keep_history=False)), mode="replay")


# -- GPUs (NVML is the one fake) ------------------------------------------------------------------

@pilot_test
async def test_gpu_fields_the_driver_does_not_give_show_na():
    refused = ("nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature",
               "nvmlDeviceGetUtilizationRates")
    driver = FakeDriver([FakeGpu("GPU-3eb79704-1571-707c-aee8-f43ce747313d",
                                 errors=dict.fromkeys(refused, pynvml.NVML_ERROR_NOT_SUPPORTED))])
    sampler = GpuSampler(None, nvml=driver.nvml)
    feed = synthetic_feed()
    feed.model.ingest({"k": "gpu", "snapshot": sampler.sample_once().to_record()})
    sampler.stop()
    async with BsmonApp(feed, mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        text = shown(pilot.app, GpuPanel, "gpus")
    assert text == ("0 NVIDIA H100 80GB HBM3  util N/A (job N/A)  mem 29.3/79.6 GiB (job N/A GiB)  N/A/700 W  N/A  "
                    "SM 1755 MHz")


@pilot_test
async def test_no_gpu_shows_the_banner():
    sampler = GpuSampler(None, nvml=FakeDriver(library_present=False).nvml)
    snapshot = sampler.sample_once()
    sampler.stop()
    feed = synthetic_feed()
    feed.model.ingest({"k": "gpu", "snapshot": snapshot.to_record()})
    async with BsmonApp(feed, mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert shown(pilot.app, GpuPanel, "banner") == snapshot.banner
        assert snapshot.banner.startswith("No NVIDIA driver found")
        assert shown(pilot.app, GpuPanel, "gpus") == ""


@pilot_test
async def test_a_session_without_gpu_readings_says_so():
    async with BsmonApp(synthetic_feed(), mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert shown(pilot.app, GpuPanel, "banner").startswith("no GPU readings were recorded")


# -- charts ----------------------------------------------------------------------------------------

def test_binned_keeps_sums_and_last_values_exactly():
    rows = [(float(i), float(i * i), float(i % 7), float(i % 5)) for i in range(1, 1001)]
    binned = Binned({"last": "last", "sum": "sum", "min": "min", "max": "max"}, max_bins=8)
    binned.extend(rows[:500])
    binned.extend(rows[500:])
    arrays = binned.arrays()
    assert binned.bins <= 8 and len(binned) == arrays["count"].sum() == 1000
    ends = np.cumsum(arrays["count"]).astype(int)
    starts = np.concatenate(([0], ends[:-1]))
    assert arrays["last"].tolist() == [rows[end - 1][0] for end in ends]
    assert arrays["sum"].tolist() == [sum(r[1] for r in rows[s:e]) for s, e in zip(starts, ends)]
    assert arrays["min"].tolist() == [min(r[2] for r in rows[s:e]) for s, e in zip(starts, ends)]
    assert arrays["max"].tolist() == [max(r[3] for r in rows[s:e]) for s, e in zip(starts, ends)]
    assert len(set(arrays["count"][:-1])) == 1  # equal widths, the open bin last
    merged = binned.arrays(max_bins=3)
    assert len(merged["count"]) <= 3 and merged["count"].sum() == 1000 and merged["last"][-1] == 1000.0


def test_binned_memory_stays_bounded_and_a_short_series_stays_exact():
    binned = Binned({"x": "last"}, max_bins=16)
    binned.extend((float(i),) for i in range(10))
    assert binned.column("x").tolist() == [float(i) for i in range(10)]  # one bin a row
    for start in range(0, 100_000, 5000):
        binned.extend((float(i),) for i in range(start, start + 5000))
    assert binned.bins <= 16 and binned.column("x")[-1] == 99_999.0 and len(binned) == 100_010


@pilot_test
async def test_charts_get_the_whole_history(sessions):
    feed = replay(sessions["noise"])
    app = BsmonApp(feed, mode="replay")
    async with app.run_test(size=(200, 60)) as pilot:
        await pilot.pause()
        steps = app.series.steps
        history = feed.model.history
        assert steps["count"].sum() == len(history) == 60
        assert steps["step"][-1] == 60 and steps["b_simple"][-1] == history.b_simple[-1]
        assert math.isclose(steps["batch_size"].sum() / steps["step_time_s"].sum(),
                            sum(history.batch_size) / sum(history.step_time_s))
        assert app.series.loss["count"].sum() == 60


@pilot_test
async def test_live_charts_wait_for_the_newest_steps_scalars(sessions):
    feed, rest = partial_feed(sessions["noise"], 10)
    app = BsmonApp(feed, mode="attach")
    async with app.run_test(size=(200, 60)):
        for start in range(0, len(rest), 7):  # records arrive in uneven batches between redraws
            ingest(feed, rest[start:start + 7])
            app.refresh_charts(force=True)
        loss = app.series.loss
        assert app.series.steps["count"].sum() == 60
        assert loss["count"].sum() == 59  # step 60's scalars may still grow while the job runs
        feed.state = "ended"
        app.refresh_charts(force=True)
        loss = app.series.loss
        _, losses = feed.model.history.scalar_series("loss")
        assert loss["count"].sum() == 60 and loss["step"][-1] == 60
        assert math.isclose(loss["loss"].sum(), losses.sum())


@pilot_test
async def test_a_log_scale_chart_survives_being_rendered_again():
    """A re-render (here after a resize) keeps the log axis over the data (plotext once took the log twice)."""
    app = BsmonApp(synthetic_feed(), mode="replay")
    async with app.run_test(size=(200, 60)) as pilot:
        chart = app.query_one(LossChart)
        chart.show(np.arange(1.0, 101.0), np.geomspace(10.0, 0.01, 100))
        await pilot.pause()
        ticks = y_ticks(chart.text())
        assert ticks[0] == 10.0 and ticks[-1] < 0.02  # a log axis over the data's range
        await pilot.resize_terminal(190, 60)
        await pilot.pause()
        assert y_ticks(chart.text()) == ticks


def y_ticks(plot):
    """The y-axis tick values of a rendered chart, top to bottom ('20k' -> 20000.0)."""
    return [si_value(line.split("┤")[0].strip()) for line in plot.splitlines() if "┤" in line]


def si_value(label):
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(label[-1:], 1.0)
    return float(label[:-1] if scale != 1.0 else label) * scale


@pilot_test
async def test_chart_axes_read_in_round_si_numbers_and_an_early_band_edge_stays_open():
    """Ticks 1-2-5 apart with SI suffixes; one band edge of 5.4M (or infinite) does not stretch the axis."""
    app = BsmonApp(synthetic_feed(), mode="replay")
    async with app.run_test(size=(200, 60)) as pilot:
        chart = app.query_one(ThroughputChart)
        chart.show(np.arange(1.0, 101.0), np.linspace(80_000, 106_294.5, 100), "samples")
        await pilot.pause()
        plot = chart.text()
        assert y_ticks(plot) == [100_000, 80_000, 60_000, 40_000, 20_000, 0]
        assert "100k┤" in plot and "106294" not in plot
        noise = app.query_one(NoiseChart)
        step = np.arange(1.0, 201.0)
        b_simple = np.full(200, 1000.0)
        low, high = b_simple / 2, b_simple * 2
        high[:5] = [5.4e6, np.inf, 5.4e6, np.inf, 5.4e6]  # early steps: |G|² barely resolved
        low[:3] = 0.0
        noise.show(step, b_simple, low, high, np.full(200, 64.0))
        await pilot.pause()
        plot = noise.text()
        ticks = y_ticks(plot)
        assert max(ticks) <= 3 * 1000 and min(ticks) >= 64 / 3  # clipped to 3x the estimates and batch
        assert all(fmt.tick_label(t) in plot for t in ticks)
        assert "▲" in plot and "▼" in plot and "band open beyond" in plot


# -- how it looks ----------------------------------------------------------------------------------

def snapshot_app(tmp_path):
    feed = synthetic_feed()
    return BsmonApp(feed, mode="replay", export=csv_export(feed, tmp_path / "run.csv"))


def test_snapshot_80x24(snap_compare, tmp_path):
    """The minimum size: header, both number columns, the events line and the footer."""
    assert snap_compare(snapshot_app(tmp_path), terminal_size=(80, 24))


def test_snapshot_200x60(snap_compare, tmp_path):
    """A large terminal: all panels in one row and a grid of charts."""
    assert snap_compare(snapshot_app(tmp_path), terminal_size=(200, 60))


# -- ranks of a multi-process job ------------------------------------------------------------------

@pilot_test
async def test_the_ranks_panel_shows_the_straggler_and_silent_ranks():
    from test_distributed import RANK_SILENCE_S, _ranks_record

    model = SessionModel()
    model.ingest({"k": "hello", "v": 1, "session": "s", "name": "ddp", "pid": 1, "t0": 0.0, "command": [],
                  "host": "h", "user": "u", "unit": "samples", "world_size": 5, "data_parallel": 5})
    model.ingest({"k": "step", "step": 100, "t": 1.0, "dt": 0.1, "n": 32, "mb": 1, "dropped": 0})
    for t, slow in ((1.0, 0.07), (2.0, 0.09)):
        model.ingest(_ranks_record(
            t=t, step=[100, 100, 99, 100, 80], dt=[0.1] * 5, busy=[0.05, 0.05, slow, 0.04, 0.05],
            since_step=[0.0, RANK_SILENCE_S + 1, 0.0, 0.0, RANK_SILENCE_S + 5],
            since_report=[0.0, 0.0, 0.0, 0.0, RANK_SILENCE_S + 5]))
    feed = Feed(model)
    feed.state = "live"
    async with BsmonApp(feed, mode="attach").run_test(size=SIZE) as pilot:
        await pilot.pause()
        app = pilot.app
        assert shown(app, RanksPanel, "world") == "5 ranks"
        assert shown(app, RanksPanel, "slowest") == "slowest rank 2: 2.25x the fastest, 1 steps behind"
        assert shown(app, RanksPanel, "per_rank") == "  ".join(f"r{r} 100 ms" for r in range(5))
        assert shown(app, RanksPanel, "stalled") == "stalled (no new step): ranks 1"
        assert shown(app, RanksPanel, "lost") == "LOST (no report): ranks 4"
        assert app.query_one("#skew-spark", Sparkline).data == pytest.approx([0.07 / 0.04, 0.09 / 0.04])
    async with BsmonApp(synthetic_feed(), mode="replay").run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert not pilot.app.query_one(RanksPanel).display  # a single process has no rank view


@pilot_test
async def test_the_optimal_panel_shows_the_measured_critical_batch_and_b_opens_the_details():
    from test_branch import calibrated_session
    from bsmon.tui.screens import BranchScreen

    model, b_simple, _ = calibrated_session(True)
    feed = Feed(model)
    feed.state = "replay"
    check = model.branch_checks[-1]
    async with BsmonApp(feed, mode="replay").run_test(size=(200, 60)) as pilot:
        await pilot.pause()
        line = shown(pilot.app, OptimalPanel, "branch")
        assert line.startswith(f"measured critical batch now: {check.b_crit:,.0f} "
                               f"[{check.b_crit_low:,.0f}-{fmt.si(check.b_crit_high)}] "
                               f"(B_simple: {b_simple:,.0f}, ratio 4.00)")
        assert "advice calibrated: B_noise = B_simple/4" in line and "(b: details)" in line
        assert any(b.key == "b" for b in pilot.app.BINDINGS)
        await pilot.press("b")
        assert isinstance(pilot.app.screen, BranchScreen)
        text = str(pilot.app.screen.query_one("#branch-checks", Static).visual)
        assert "The advice is calibrated now" in text and "E/E_base" in text and "2.40" in text
        await pilot.press("escape")
        assert not isinstance(pilot.app.screen, BranchScreen)
        await pilot.press("question_mark")
        assert "branch checks" in str(pilot.app.screen.query_one("#help-keys", Static).visual)


@pilot_test
async def test_an_adam_job_shows_b_pre_beside_b_simple_and_says_the_advice_uses_it():
    model = SessionModel()
    model.ingest_all(synthetic_records(adam=True))
    feed = Feed(model)
    feed.state = "replay"
    stats = model.stats()
    assert stats.b_simple_precond == pytest.approx(4 * stats.b_simple, rel=0.1)
    async with BsmonApp(feed, mode="replay").run_test(size=(200, 60)) as pilot:  # wide: side by side, in full
        await pilot.pause()
        app = pilot.app
        simple = fmt.band(stats.b_simple, stats.b_simple_low, stats.b_simple_high)
        pre = fmt.band(stats.b_simple_precond, stats.b_simple_precond_low, stats.b_simple_precond_high)
        # side by side where the panel has room for both, else B_pre on the line right below
        both = shown(app, BatchPanel, "b_simple") + " · " + shown(app, BatchPanel, "b_pre")
        assert both.startswith(f"B_simple {simple} · B_pre {pre}")
        lines = app.query_one(BatchPanel).query_one(LinesView).text.splitlines()
        assert any(f"B_pre {pre}" in line for line in lines[lines.index(f"B_simple {simple}") if f"B_simple {simple}" in lines else 0:][:2])
        assert shown(app, BatchPanel, "geometry") in (  # as much of the why as the panel has room for
            f"advice uses B_pre: {stats.noise_geometry_reason}", "advice uses B_pre: the step is g/(√v̂+ε)")
        assert "AdamW rescales each gradient element" in stats.noise_geometry_reason
        await pilot.resize_terminal(80, 24)
        # the panels relayout on the next redraw tick
        await until(pilot, lambda: shown(app, BatchPanel, "b_pre") == f"B_pre {pre}", "B_pre on its own line at 80x24")
        assert shown(app, BatchPanel, "geometry").startswith("advice uses B_pre")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = str(app.screen.query_one("#help-numbers", Static).visual)
        assert "B_pre" in text and "plain SGD's raw gradient" in text


@pilot_test
async def test_a_line_a_digit_shorter_keeps_its_rows_and_a_reworded_one_shrinks():
    """Numbers of varying width at a line's wrap point must not lay the screen out again each redraw."""
    from textual.app import App

    class One(App):
        def compose(self):
            yield LinesView()

    app = One()
    async with app.run_test(size=(40, 10)) as pilot:
        view = app.query_one(LinesView)
        view.set_lines({"warning": "x" * 33 + " 0.487 ms", "other": "y"})
        await pilot.pause()
        assert len(view._strips) == 3  # the warning wraps to two rows at 40 columns
        view.set_lines({"warning": "x" * 33 + " 0.5 ms", "other": "y"})  # fits one row now
        await pilot.pause()
        assert len(view._strips) == 3 and view.render_line(1).text.strip() == ""
        view.set_lines({"warning": "short", "other": "y"})
        await pilot.pause()
        assert len(view._strips) == 2 and view.render_line(1).text.startswith("y")
