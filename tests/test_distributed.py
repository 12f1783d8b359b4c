"""Multi-process jobs: torchrun on the CPU (gloo), the data-parallel noise estimator against exact
ground truth, per-rank statistics through the job's key-value store, and the session's rank view.

tests/jobs/train_ddp.py trains linear regression at fixed parameters over a finite population, so
|G|^2 and tr(Sigma) are exact population values (train_ddp.exact_noise).
"""

import contextlib
import csv
import importlib.util
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bsmon
from bsmon import store, wire
from bsmon.client import Feed
from bsmon.model import RANK_SILENCE_S, SessionModel
from bsmon.probe.distributed import RankIdentity, RankReporter
from bsmon.stats.noise import ddp_points, step_estimate
from conftest import ROOT, bsmon_cli, spawn, wait_for

JOB = ROOT / "tests" / "jobs" / "train_ddp.py"
_spec = importlib.util.spec_from_file_location("train_ddp", JOB)
train_ddp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_ddp)


def torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(JOB), *args]


def exact_b_simple():
    grad_sq, trace = train_ddp.exact_noise()
    return trace / grad_sq


def _only_session():
    """The job's one session: every rank but rank 0 must have recorded nothing."""
    directories = list(store.sessions_dir().iterdir())
    assert len(directories) == 1, f"one session per job, found {[d.name for d in directories]}"
    (info,) = store.list_sessions()
    return info


# --------------------------------------------------------------------------------------------
# Real torchrun jobs


def test_bsmon_run_torchrun_is_one_session_and_agrees_with_the_microbatch_estimator():
    """Two ranks accumulating two micro-batches (the first under no_sync()) under `bsmon run`."""
    result = bsmon_cli("run", "--json", "--", *torchrun(2, "--steps", "600", "--accumulate", "2",
                                                         "--micro-batch", "256"), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    info = _only_session()
    assert (info.hello["world_size"], info.hello["rank"], info.hello["data_parallel"]) == (2, 0, 2)
    assert info.status == "finished" and info.steps == 600

    last = json.loads(result.stdout.splitlines()[-1])
    assert last["state"] == "ended" and last["world_size"] == 2
    assert last["local_batch_size"] == 512 and last["batch_size"] == 1024  # 2 micro-batches x 256 x 2 ranks
    assert len(last["rank_step_time_s"]) == 2 and all(t > 0 for t in last["rank_step_time_s"])
    assert last["slowest_rank"] in (0, 1) and last["ranks_lost"] == [] and last["ranks_stalled"] == []

    stats = Feed().replay(info).model.stats()
    assert stats.noise_estimator == "ddp" and stats.noise_steps == 600
    assert stats.b_simple == last["b_simple"]  # the live stream and the record agree
    exact = exact_b_simple()
    assert stats.b_simple == pytest.approx(exact, rel=0.10)
    microbatch = _microbatch_estimate(steps=600, micro_batches=4, micro_batch=256)
    assert microbatch == pytest.approx(exact, rel=0.10)
    assert abs(stats.b_simple - microbatch) < 0.10 * exact

    rows = list(csv.DictReader(io.StringIO(bsmon_cli("export", info.id).stdout)))
    assert len(rows) == 600 and {r["world_size"] for r in rows} == {"2"} and {r["batch_size"] for r in rows} == {"1024"}
    assert all(float(r["slowest_rank_step_time_s"]) > 0 for r in rows)


def _microbatch_estimate(steps, micro_batches, micro_batch):
    """The same problem in this process, one rank, noise='microbatch' over the same 4 x 256 samples."""
    torch.set_num_threads(1)
    inputs, targets, weights = train_ddp.problem()
    model = nn.Linear(train_ddp.DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(7)
    with bsmon.watch(model, optimizer, noise="microbatch", horizon_samples=1e12, noise_budget=1.0) as monitor:
        for _ in range(steps):
            for _ in range(micro_batches):
                idx = torch.randint(0, train_ddp.POPULATION, (micro_batch,), generator=gen)
                (F.mse_loss(model(inputs[idx]), targets[idx]) / micro_batches).backward()
            optimizer.step()
            optimizer.zero_grad()
    stats = monitor.stats()
    assert stats.noise_estimator == "microbatch" and stats.noise_steps == steps
    return stats.b_simple


def test_plain_torchrun_with_four_ranks_and_a_user_hook_is_one_session_to_attach_to(tmp_path):
    """One pass per step: the local and averaged gradients alone; the user's hook runs inside bsmon's."""
    ready = tmp_path / "ready"
    job = spawn(torchrun(4, "--steps", "400", "--micro-batch", "256", "--comm-hook", "after",
                         "--ready-file", str(ready)), stderr=subprocess.STDOUT)
    wait_for(ready.exists, "the job's first step", job)
    attached = bsmon_cli("attach", "--json", timeout=240)
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output[-3000:]
    for rank in range(4):  # one bucket: the user's hook ran once per step on every rank
        assert f"rank {rank}: trained 400 steps, comm hook calls 400" in output
    assert attached.returncode == 0, attached.stderr
    last = json.loads(attached.stdout.splitlines()[-1])
    assert last["state"] == "ended" and last["step"] == 400 and last["world_size"] == 4
    assert last["batch_size"] == 1024 and len(last["rank_step_time_s"]) == 4
    assert None not in last["rank_step_time_s"] and None not in last["rank_busy_s"]

    model = Feed().replay(_only_session()).model
    assert model.estimator["inner_hook"] == "counting_allreduce"
    stats = model.stats()
    assert stats.noise_estimator == "ddp" and stats.noise_steps == 400
    assert stats.b_simple == pytest.approx(exact_b_simple(), rel=0.10)


def test_b_pre_of_the_data_parallel_estimator_against_the_exact_value_in_adams_geometry():
    """AdamW at learning rate 0 from the exact second moment of the global batch's gradient: the
    local and averaged gradients (and the no_sync pass) rescaled by P give the exact B_pre."""
    job = spawn(torchrun(2, "--adam", "--steps", "500", "--accumulate", "2", "--micro-batch", "64"),
                stderr=subprocess.STDOUT)
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output[-3000:]
    stats = Feed().replay(_only_session()).model.stats()
    b_simple, b_pre = train_ddp.exact_b_pre(batch=2 * 64 * 2)
    assert abs(b_pre / b_simple - 1) > 0.3, (b_simple, b_pre)  # the geometry matters on this problem
    assert stats.noise_estimator == "ddp" and stats.noise_steps == 500
    assert stats.b_simple == pytest.approx(b_simple, rel=0.10)
    assert stats.b_simple_precond == pytest.approx(b_pre, rel=0.10), f"exact B_pre {b_pre:.2f}"
    assert stats.b_simple_precond_low <= b_pre <= stats.b_simple_precond_high
    assert stats.b_simple_precond_reason is None and stats.noise_geometry == "optimizer"


def test_a_killed_rank_ends_the_job_and_leaves_a_readable_session(tmp_path):
    """Also: noise='auto' explains why a hook registered before watch() leaves no estimate."""
    ready = tmp_path / "ready"
    job = spawn(torchrun(2, "--steps", "100000", "--sleep", "0.01", "--comm-hook", "before",
                         "--ready-file", str(ready), "--pid-dir", str(tmp_path)), stderr=subprocess.STDOUT)
    wait_for(ready.exists, "the job's first step", job)
    info = _only_session()
    wait_for(lambda: any(r["k"] == "ranks" for r in store.read_records(info.records_path)[0]),
             "a ranks record", job)
    os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and "Signal 9 (SIGKILL)" in output
    # Two real outcomes race: rank 0's next all-reduce fails (gloo sees the peer's socket close)
    # and the session ends "failed" with that error; or torchrun's SIGTERM ends rank 0 first and
    # the session is "lost" (no goodbye). Either way every step before it stays readable.
    info = store.session_info(info.directory)
    assert info.status in ("failed", "lost") and info.steps >= 1
    model = Feed().replay(info).model
    if info.status == "failed":
        assert "by peer" in model.bye["error"]
    stats = model.stats()
    assert stats.step == info.steps and stats.world_size == 2 and len(stats.rank_step_time_s) == 2
    assert bsmon_cli("export", info.id).returncode == 0

    assert stats.noise_estimator is None and stats.b_simple is None
    assert "already had a communication hook (counting_allreduce)" in stats.noise_reason
    assert "Call bsmon.watch() before ddp.register_comm_hook" in stats.noise_reason


def _ddp_losses(tmp_path, label, *args):
    """Each rank's losses from a 2-rank job that trains (lr > 0: the losses follow the all-reduced gradient)."""
    losses_dir = tmp_path / label
    losses_dir.mkdir()
    job = spawn(torchrun(2, "--steps", "30", "--micro-batch", "64", "--lr", "0.01", "--losses-dir",
                         str(losses_dir), *args), stderr=subprocess.STDOUT)
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output[-3000:]
    return [(losses_dir / f"rank{rank}.losses").read_text().split() for rank in range(2)], output


_UNWATCHED_LOSSES: list = []


@pytest.mark.parametrize("fail_at_norm", [3, 4], ids=["before-the-all-reduce", "after-the-all-reduce"])
def test_a_bsmon_bug_in_the_comm_hook_still_all_reduces_and_training_goes_on_unchanged(tmp_path, fail_at_norm):
    """The guard around the measuring parts of bsmon's DDP hook: rank 0 alone fails (step 2), so its
    hook goes on only all-reducing while rank 1 still measures; the ranks' losses stay bitwise those
    of an unwatched job, so the gradients were averaged exactly as without bsmon."""
    if not _UNWATCHED_LOSSES:  # the same for both failures: run once
        _UNWATCHED_LOSSES.append(_ddp_losses(tmp_path, "unwatched", "--unwatched")[0])
    unwatched = _UNWATCHED_LOSSES[0]
    watched, output = _ddp_losses(tmp_path, "watched", "--fail-at-norm", str(fail_at_norm))

    assert len(unwatched[0]) == 30 and unwatched[0] != unwatched[1]  # ranks see different data...
    assert len(set(unwatched[0])) > 1  # ...and train
    assert watched == unwatched
    warnings = [line for line in output.splitlines() if "turned itself off" in line]
    where = "DdpNormHook._measure_local_norm" if fail_at_norm % 2 else "DdpNormHook._measure_averaged_norm"
    assert len(warnings) == 1 and f"internal error in {where}" in warnings[0], output[-3000:]

    info = _only_session()
    records, torn = store.read_records(info.records_path)
    assert torn == 0 and records[-1]["k"] == "bye" and records[-1]["status"] == "finished"
    (event,) = [r for r in records if r["k"] == "event" and r["level"] == "error"]
    assert "RuntimeError: injected bsmon bug in the comm hook" in event["traceback"]
    assert info.steps == 1, "bsmon turned itself off at step 2"


# --------------------------------------------------------------------------------------------
# The DDP hook in this process (one rank, gloo)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.set_num_threads(1)
    yield
    dist.destroy_process_group()


def _ddp_linear():
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, 1).double())
    return model, torch.optim.SGD(model.parameters(), lr=0.0)


def _grad_sq(model):
    return float(sum(p.grad.square().sum() for p in model.parameters()))


def _accumulating_step(model, optimizer):
    """Two micro-batches, the first under no_sync(); the exact |.grad|^2 after each."""
    exact = []
    for micro in range(2):
        x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        with model.no_sync() if micro == 0 else contextlib.nullcontext():
            (F.mse_loss(model(x), y) / 2).backward()
        exact.append(_grad_sq(model))
    optimizer.step()
    optimizer.zero_grad()
    return exact


def _noise_payloads(monitor):
    records = store.read_records(store.resolve_session(monitor.session_id).records_path)[0]
    return [r["noise"] for r in records if r["k"] == "step" and "noise" in r]


def _rescaled_sq(model, optimizer):
    """|P * .grad|^2 with P = 1/(sqrt(v_hat) + eps) computed here from AdamW's state."""
    beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
    total = 0.0
    for p in model.parameters():
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
        total += float((p.grad / (v_hat.sqrt() + eps)).square().sum())
    return total


def test_the_buckets_rescaled_norms_weight_each_element_by_its_parameters_p(one_rank_group):
    """Several buckets (a tiny bucket_cap_mb): the local and averaged norms
    of P * bucket, and |P * .grad|^2 of the no_sync pass, against P computed from AdamW's state."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    model = nn.parallel.DistributedDataParallel(module, bucket_cap_mb=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    state = {"calls": 0}
    with bsmon.watch(model, optimizer, noise="ddp", noise_budget=1.0) as monitor:
        model.register_comm_hook(state, train_ddp.counting_allreduce)
        exact = []
        for step in range(4):
            passes = []
            for micro in range(2):
                x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
                with model.no_sync() if micro == 0 else contextlib.nullcontext():
                    (F.mse_loss(model(x), y) / 2).backward()
                passes.append(_rescaled_sq(model, optimizer) if step else None)
            exact.append(passes)
            optimizer.step()
            optimizer.zero_grad()
    assert state["calls"] > 4, "one bucket per step: the test would not check the layout"
    payloads = _noise_payloads(monitor)
    assert len(payloads) == 4 and "pre" not in payloads[0]  # no second moment before the first step
    for payload, (after_first, after_sync) in zip(payloads[1:], exact[1:]):
        accumulated, local, averaged = payload["pre"]
        assert accumulated == pytest.approx(after_first, rel=1e-5)
        assert local == pytest.approx(after_sync, rel=1e-5)  # one rank: averaging changes nothing
        assert averaged == pytest.approx(after_sync, rel=1e-5)


def test_user_hook_registered_after_watch_runs_inside_bsmons(one_rank_group):
    model, optimizer = _ddp_linear()
    state = {"calls": 0}
    with bsmon.watch(model, optimizer, noise="ddp", noise_budget=1.0) as monitor:
        model.register_comm_hook(state, train_ddp.counting_allreduce)
        with pytest.raises(RuntimeError, match="can only be called once"):
            model.register_comm_hook(state, train_ddp.counting_allreduce)
        exact = [_accumulating_step(model, optimizer) for _ in range(3)]
    assert state["calls"] == 3
    payloads = _noise_payloads(monitor)
    assert len(payloads) == 3
    for payload, (after_first, after_sync) in zip(payloads, exact):
        assert payload["est"] == "ddp" and payload["micro"] == [16, 16] and payload["world"] == 1
        accumulated, local, averaged = payload["norms"]
        assert accumulated == pytest.approx(after_first, rel=1e-6)
        assert local == pytest.approx(after_sync, rel=1e-6)  # one rank: averaging changes nothing
        assert averaged == pytest.approx(after_sync, rel=1e-6)

    _accumulating_step(model, optimizer)  # after close the hook only passes buckets on
    assert state["calls"] == 4
    with bsmon.watch(model, optimizer, noise="ddp") as again:  # a second watch reuses the hook
        _accumulating_step(model, optimizer)
    assert state["calls"] == 5 and len(_noise_payloads(again)) == 1


def test_hook_registered_before_watch_is_refused_clearly(one_rank_group):
    model, optimizer = _ddp_linear()
    model.register_comm_hook({"calls": 0}, train_ddp.counting_allreduce)
    with pytest.raises(ValueError, match=r"noise='ddp': this DistributedDataParallel model already had a "
                                         r"communication hook \(counting_allreduce\).*Call bsmon\.watch\(\) "
                                         r"before ddp\.register_comm_hook"):
        bsmon.watch(model, optimizer, noise="ddp")
    assert store.list_sessions() == []  # refused before anything was recorded


def test_ddp_mode_needs_the_ddp_model(one_rank_group):
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="not DistributedDataParallel: pass the DDP-wrapped module"):
        bsmon.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), noise="ddp")


def test_fsdp_is_reported_unsupported(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="FullyShardedDataParallel is not supported"):
        bsmon.watch(model, optimizer, noise="ddp")
    with bsmon.watch(model, optimizer) as monitor:
        pass
    assert monitor.stats().noise_estimator is None
    assert "partial squared norms" in monitor.stats().noise_reason


# --------------------------------------------------------------------------------------------
# Per-rank statistics through a real key-value store


def _step_records(start, count, dt, busy, n=32):
    return [{"k": "step", "step": s, "dt": dt, "busy": busy, "n": n} for s in range(start, start + count)]


def test_ranks_reach_rank_zero_through_the_store_and_silent_ranks_age():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    submitted = []
    prefix = "bsmon/test/rank"
    reporters = [RankReporter(RankIdentity(0, 3), submitted.append, store=server, interval_s=0.05,
                              key_prefix=prefix)]
    for rank in (1, 2):
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
        reporters.append(RankReporter(RankIdentity(rank, 3), None, store=client, interval_s=0.05,
                                      key_prefix=prefix))
    try:
        for rank, reporter in enumerate(reporters):
            # rank r: 9 steps of 10(r+1) ms and one of 100 ms, busy for half of each
            records = _step_records(1, 9, 0.01 * (rank + 1), 0.005 * (rank + 1)) + _step_records(10, 1, 0.1, 0.05)
            reporter.observe(records)
        wait_for(lambda: any(r["k"] == "ranks" and None not in r["step"] for r in submitted), "every rank")
        first = next(r for r in submitted if r["k"] == "ranks" and None not in r["step"])
        assert first["step"] == [10, 10, 10] and first["n"] == [32, 32, 32]
        assert first["dt"] == pytest.approx([0.01, 0.02, 0.03])  # medians of the interval
        assert first["busy"] == pytest.approx([0.005, 0.01, 0.015])
        assert first["dt95"] == pytest.approx([np.percentile([0.01 * r] * 9 + [0.1], 95) for r in (1, 2, 3)])
        wire.validate(json.loads(json.dumps(first)))

        reporters[2].close()  # rank 2 goes silent; rank 1 keeps reporting but takes no step
        time.sleep(1.2)
        reporters[0].observe(_step_records(11, 1, 0.01, 0.005))
        count = len(submitted)
        wait_for(lambda: len(submitted) > count + 1, "two more ranks records")
        latest = submitted[-1]
        assert latest["step"] == [11, 10, 10]
        assert latest["since_report"][0] < 0.5 and latest["since_report"][1] < 0.5
        assert latest["since_report"][2] > 1.0 and latest["since_step"][1] > 1.0
        assert latest["since_step"][0] < 0.5
        assert not any(r["k"] == "event" for r in submitted)
    finally:
        for reporter in reporters:
            reporter.close()


def test_without_a_store_rank_zero_says_so_once():
    assert not dist.is_initialized()
    submitted = []
    reporter = RankReporter(RankIdentity(0, 2), submitted.append, interval_s=0.02)
    time.sleep(0.3)
    reporter.close()
    assert [r["k"] for r in submitted] == ["event"]
    assert "per-rank statistics unavailable: torch.distributed is not initialised" in submitted[0]["msg"]


def test_busy_time_is_sampled_at_most_every_50_ms_on_fast_steps(monkeypatch):
    """The hooks that catch a backward's end are in place only on the steps that time it."""
    from bsmon.probe.monitor import BUSY_SAMPLE_INTERVAL_S

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a multi-process job (no store: no ranks records)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    hooked_before = []
    with bsmon.watch(model, optimizer, noise=None) as monitor:
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            hooked_before.append(monitor._follow_backward)  # output gradient hooks on this step's forward
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
    records = [r for r in store.read_records(store.resolve_session(monitor.session_id).records_path)[0]
               if r["k"] == "step"]
    timed = [r for r in records if "busy" in r]
    assert [("busy" in r) for r in records] == hooked_before
    assert len(records) > 4 * len(timed) and len(timed) >= 5
    assert all(0 < r["busy"] <= r["dt"] for r in timed)
    gaps = np.diff([r["t"] for r in timed])
    assert gaps.min() >= BUSY_SAMPLE_INTERVAL_S * 0.9  # time.time() against perf_counter


# --------------------------------------------------------------------------------------------
# The session model's view of the ranks


def _ranks_record(t=0.0, **columns):
    size = len(columns["step"])
    record = {"k": "ranks", "t": t, "world_size": size, "dt95": [None] * size, "n": [32] * size,
              "since_step": [0.0] * size, "since_report": [0.0] * size, "busy": [None] * size}
    record.update(columns)
    return wire.validate(record)


def test_rank_view_finds_the_straggler_and_the_silent_ranks():
    model = SessionModel()
    model.ingest({"k": "hello", "v": wire.PROTOCOL_VERSION, "session": "s", "name": "n", "pid": 1, "t0": 0.0, "command": [],
                  "host": "h", "user": "u", "unit": "samples", "world_size": 5, "data_parallel": 5})
    model.ingest({"k": "step", "step": 100, "t": 1.0, "dt": 0.1, "n": 32, "mb": 1, "dropped": 0})
    model.ingest(_ranks_record(
        step=[100, 100, 99, 100, 80], dt=[0.1, 0.1, 0.1, 0.1, 0.1], busy=[0.05, 0.05, 0.09, 0.04, 0.05],
        since_step=[0.0, RANK_SILENCE_S + 1, 0.0, 0.0, RANK_SILENCE_S + 5],
        since_report=[0.0, 0.0, 0.0, 0.0, RANK_SILENCE_S + 5], n=[32, 32, 32, 32, 16]))
    s = model.stats()
    assert s.world_size == 5 and s.batch_size == 160 and s.local_batch_size == 32
    assert s.slowest_rank == 2 and s.slowest_rank_step_time_s == 0.1 and s.slowest_rank_lag_steps == 1
    assert s.rank_skew == pytest.approx(0.09 / 0.04)  # lost rank 4 is not a candidate
    assert s.ranks_stalled == (1,) and s.ranks_lost == (4,) and s.uneven_rank_batches

    # Slow steps stretch the silence allowed: 20 x 2 s = 40 s.
    model.ingest(_ranks_record(step=[5, 5], dt=[2.0, 2.0], since_step=[35.0, 0.0], since_report=[35.0, 0.0]))
    s = model.stats()
    assert s.ranks_stalled == () and s.ranks_lost == () and not s.uneven_rank_batches
    assert s.slowest_rank == 0 and s.rank_skew == 1.0  # no busy times: step times decide
    assert list(model.history.rank_world_size) == [5, 2]
    assert list(model.history.rank_skew) == pytest.approx([0.09 / 0.04, 1.0])


def test_malformed_ranks_records_are_refused():
    good = _ranks_record(step=[1, 2], dt=[0.1, None])
    for field, value in (("dt", [0.1]), ("step", [1, "2"]), ("busy", [True, None]), ("since_step", None)):
        with pytest.raises(wire.ProtocolError, match=f"ranks.{field}"):
            wire.validate({**good, field: value})


def test_a_64_rank_stream_stays_cheap_to_ingest_and_read():
    """Frames of 64-rank records and steps through the wire decoder into the model, as a monitor does."""
    world = 64
    rng = np.random.default_rng(0)
    records = [{"k": "hello", "v": wire.PROTOCOL_VERSION, "session": "s", "name": "n", "pid": 1, "t0": 0.0, "command": [],
                "host": "h", "user": "u", "unit": "samples", "world_size": world, "data_parallel": world}]
    for i in range(2000):
        records.append({"k": "step", "step": i + 1, "t": i * 0.01, "dt": 0.01, "n": 32, "mb": 1, "dropped": 0})
        dt = [round(float(x), 6) for x in rng.uniform(0.009, 0.012, world)]
        records.append({"k": "ranks", "t": i * 0.01, "world_size": world, "step": [i] * world, "dt": dt,
                        "dt95": dt, "busy": dt, "n": [32] * world, "since_step": [0.0] * world,
                        "since_report": [0.0] * world})
    data = b"".join(wire.encode(r) for r in records)
    model = SessionModel()
    start = time.process_time()  # CPU time: a loaded machine stretches the wall clock, not this
    model.ingest_all(wire.FrameReader().feed(data))
    ingest_s = (time.process_time() - start) / 2000
    start = time.process_time()
    for _ in range(100):
        stats = model.stats()
    stats_s = (time.process_time() - start) / 100
    print(f"64 ranks: {ingest_s * 1e6:.0f} us per ranks record + step (decode and ingest), "
          f"stats() {stats_s * 1e6:.0f} us")
    assert stats.world_size == world and len(stats.rank_step_time_s) == world and stats.step == 2000
    # The TUI redraws at <= 10 Hz and a ranks record comes at 1 Hz: these ceilings (5x the ~2 ms and
    # ~5 ms of a busy CI machine) still catch a cost that grows with the run, not a loaded machine.
    assert ingest_s < 10e-3 and stats_s < 25e-3


# --------------------------------------------------------------------------------------------
# ddp_points against exact expectations


def _population():
    """Three examples' gradients (2-D): |G|^2 and tr(Sigma), with-replacement sampling."""
    grads = np.array([[1.0, 2.0], [-3.0, 0.5], [2.0, -1.0]])
    mean = grads.mean(0)
    return grads, float(mean @ mean), float(((grads - mean) ** 2).sum(1).mean())


@pytest.mark.parametrize("world, micro_batches", [(2, 2), (3, 1), (1, 3)])
@pytest.mark.parametrize("c", [None, 1.0])  # None: mean loss over the m passes (c = 1/m); 1.0: summed
def test_ddp_points_give_exactly_unbiased_estimates(world, micro_batches, c):
    """Averaged over every equally likely draw (micro-batches of one example), the fit is exact."""
    grads, grad_sq, trace = _population()
    m = micro_batches
    scale = 1.0 / m if c is None else c
    sums = np.zeros(2)
    for draw in itertools.product(range(len(grads)), repeat=world * m):
        per_rank = grads[list(draw)].reshape(world, m, 2)
        running = np.cumsum(per_rank[0], axis=0) * scale  # rank 0's .grad after each pass
        local = per_rank.sum(axis=1) * scale  # every rank's gradient entering the all-reduce
        points = ddp_points([1] * m, [float(v @ v) for v in running[:-1]], float(running[-1] @ running[-1]),
                            float(local.mean(0) @ local.mean(0)), world)
        estimate = step_estimate(points)
        sums += (estimate.grad_sq, estimate.trace_sigma)
    mean_grad_sq, mean_trace = sums / len(grads) ** (world * m)
    factor = (scale * m) ** 2  # a summed loss scales every point by m^2; B_simple is unchanged
    assert mean_grad_sq == pytest.approx(factor * grad_sq, rel=1e-12)
    assert mean_trace == pytest.approx(factor * trace, rel=1e-12)


def test_ddp_points_skip_what_cannot_be_measured():
    assert ddp_points([32], [], 1.0, 0.5, 1) is None  # one rank, one pass: a single batch size
    local = 2 * 2 / (1 / 32 + 1 / 16)  # unequal micro-batches are used: m^2 / sum(1/b_i) (mean convention)
    assert ddp_points([32, 16], [2.0], 1.0, 0.5, 2).batch_sizes == pytest.approx((32, local, 2 * local))
    assert ddp_points([32], [], math.inf, 0.5, 2) is None  # overflowed gradients
    points = ddp_points([32], [], 1.0, 0.5, 4)
    assert points.batch_sizes == (32.0, 128.0) and points.sq_norms == (1.0, 0.5)
    with pytest.raises(ValueError, match="after each of the 1 passes"):
        ddp_points([32, 32], [], 1.0, 0.5, 2)
    with pytest.raises(ValueError, match="world_size"):
        ddp_points([32], [], 1.0, 0.5, 0)
