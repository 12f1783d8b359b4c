"""A bug inside bsmon never reaches the training: each hook and thread, made to fail, leaves the
loss curve bitwise identical to an unwatched run, and the failure is recorded and said once."""

import atexit
import functools
import os
import sys
import threading

import pytest
import torch
from torch import nn

import bsmon
from bsmon import store
from bsmon.model import SessionModel
from bsmon.probe import monitor as monitor_module
from bsmon.probe.monitor import OFF_REASON, Monitor
from bsmon.probe.flops import FlopCounter
from bsmon.probe.per_example import PerExampleNorms
from bsmon.probe.publisher import Publisher
from bsmon.profiling import Profile

STEPS = 40
INJECTED = "injected bsmon bug"


def train(*, watch, accumulate, noise="auto", api=False):
    """Losses of a small deterministic run, and the monitor (closed) if watched. ``api``: the loop
    also calls the monitor's own methods every step, as a user's loop would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 8, generator=data), torch.randn(256, 1, generator=data)
    monitor = bsmon.watch(model, optimizer, noise=noise, noise_budget=1.0) if watch else None
    losses = []
    try:
        for _ in range(STEPS):
            for _ in range(accumulate):
                index = torch.randint(0, 256, (16,), generator=data)
                loss = nn.functional.mse_loss(model(x[index]), y[index]) / accumulate
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if api and watch:
                monitor.log(loss=loss)
                monitor.stats()
                monitor.metrics()
    finally:
        if monitor is not None:
            monitor.close()
    assert not model._forward_pre_hooks and not model._forward_hooks and not optimizer._optimizer_step_post_hooks
    return losses, monitor


def fail_on_call(monkeypatch, cls, name, call=3, thread=None, when=lambda *args: True):
    """Make ``cls.name`` raise on its ``call``-th call (on ``thread`` only, if given; counting only
    the calls whose arguments pass ``when``)."""
    original = getattr(cls, name)
    calls = []

    @functools.wraps(original)
    def failing(self, *args, **kwargs):
        if (thread is None or threading.current_thread().name == thread) and when(*args):
            calls.append(1)
            if len(calls) == call:
                raise RuntimeError(INJECTED)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, failing)
    return calls


#: hook: (class, method made to fail, options, micro-batches per step, where the guard reports it)
HOOKS = {
    "forward pre": (Monitor, "_on_forward_pre", {}, 2, "Monitor._on_forward_pre"),
    "forward": (Monitor, "_on_forward", {}, 2, "Monitor._on_forward"),
    "backward end": (Monitor, "_on_backward_end", {}, 2, "Monitor._on_backward_end"),
    "step pre": (Monitor, "_on_step_pre", {}, 2, "Monitor._on_step_pre"),
    "step post": (Monitor, "_on_step", {}, 2, "Monitor._on_step"),
    "publisher thread": (Publisher, "_deliver", {"thread": "bsmon-publisher", "call": 2}, 2,
                         "Publisher._background_loop"),
    "per-example layer backward": (PerExampleNorms, "_on_layer_backward", {}, 1, "PerExampleNorms._on_layer_backward"),
}


def assert_turned_off_once(calls, options, watched, unwatched, capsys, monitor, where):
    """The failure was injected, training was bitwise unchanged, one warning named ``where``, and the
    session ended normally with one error event carrying the traceback. Returns (info, that event)."""
    assert len(calls) >= options.get("call", 3), "the failure was injected"
    assert watched == unwatched  # bitwise: the training never saw the failure
    warnings = [line for line in capsys.readouterr().err.splitlines() if "turned itself off" in line]
    assert len(warnings) == 1 and INJECTED in warnings[0] and f"internal error in {where}" in warnings[0]
    info = store.resolve_session(monitor.session_id)
    records, torn = store.read_records(info.records_path)
    assert torn == 0 and records[-1]["k"] == "bye" and records[-1]["status"] == "finished"
    (event,) = [r for r in records if r["k"] == "event" and r["level"] == "error"]
    assert f"RuntimeError: {INJECTED}" in event["traceback"] and where in event["msg"]
    return info, event


@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_failing_hook_turns_bsmon_off_and_training_goes_on_unchanged(hook, monkeypatch, capsys):
    cls, name, options, accumulate, where = HOOKS[hook]
    unwatched, _ = train(watch=False, accumulate=accumulate)
    calls = fail_on_call(monkeypatch, cls, name, **options)
    watched, monitor = train(watch=True, accumulate=accumulate)

    info, event = assert_turned_off_once(calls, options, watched, unwatched, capsys, monitor, where)
    assert "training continues unchanged" in event["msg"]
    if cls is not Publisher:  # a training-thread hook failed mid-run: the steps after it went unrecorded
        assert info.steps < STEPS, "bsmon turned itself off"


def test_an_unwatched_and_a_watched_run_train_identically():
    """The premise of the test above: watching alone changes nothing."""
    for accumulate in (1, 2):
        assert train(watch=True, accumulate=accumulate)[0] == train(watch=False, accumulate=accumulate)[0]


#: method the user calls: (class, method made to fail, options, where the guard reports it)
USER_CALLS = {
    "log": (Publisher, "submit", {"when": lambda record: record["k"] == "scalars"}, "Monitor.log"),
    "stats": (SessionModel, "stats", {"call": 1}, "Monitor.stats"),  # computed at most every 0.25 s
    "metrics": (monitor_module, "tracker_metrics", {}, "Monitor.metrics"),  # a function: "self" is its first argument
    # a part of close() in the middle: the hooks it removes before (checked in train()) and the bye it
    # writes after are still there
    "close": (FlopCounter, "close", {"call": 1}, "Monitor.close"),
}


@pytest.mark.parametrize("call", list(USER_CALLS))
def test_a_bsmon_bug_in_a_method_the_user_calls_turns_bsmon_off_and_training_goes_on(call, monkeypatch, capsys):
    """log(), stats(), metrics() and close() run behind the same guard: the loop calling them never sees
    the failure, and afterwards they say bsmon is off instead of showing numbers that stopped."""
    target, name, options, where = USER_CALLS[call]
    unwatched, _ = train(watch=False, accumulate=1)
    calls = fail_on_call(monkeypatch, target, name, **options)
    watched, monitor = train(watch=True, accumulate=1, api=True)

    info, _ = assert_turned_off_once(calls, options, watched, unwatched, capsys, monitor, where)
    assert info.steps == STEPS if call == "close" else info.steps < STEPS

    stats = monitor.stats()
    assert stats.b_simple is None and stats.b_opt is None and stats.noise_reason == OFF_REASON
    assert monitor.metrics() == {} and monitor.recommended_batch_size() is None
    monitor.log(loss=1.0)  # and calling them again is harmless


# -- watch() is all or nothing ---------------------------------------------------------------------

def _fail(*args, **kwargs):
    raise RuntimeError(INJECTED)


#: Where set-up fails: early (session file open), after the publisher started (thread, socket),
#: after the per-example hooks went in, between the two training hooks, and last of all.
SET_UP_FAILURES = {
    "user name": lambda mp, model, optimizer: mp.setattr("bsmon.probe.monitor.getpass.getuser", _fail),
    "noise probe": lambda mp, model, optimizer: mp.setattr("bsmon.probe.monitor.NoiseProbe", _fail),
    "profile": lambda mp, model, optimizer: mp.setattr(Monitor, "record_profile", _fail),
    "step hook": lambda mp, model, optimizer: mp.setattr(optimizer, "register_step_post_hook", _fail),
    "atexit": lambda mp, model, optimizer: mp.setattr("bsmon.probe.monitor.atexit.register", _fail),
}


def _footprint(model, optimizer, home):
    """What watch() can leave behind."""
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() or p.is_socket()) \
        if home.exists() else []
    return {"hooks": hooks, "step hooks": len(optimizer._optimizer_step_post_hooks),
            "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("bsmon")),
            "fds": len(os.listdir("/proc/self/fd")), "files": files, "atexit": atexit._ncallbacks(),
            "excepthook": sys.excepthook}


@pytest.mark.parametrize("where", list(SET_UP_FAILURES))
def test_a_watch_that_raises_leaves_nothing_behind(where, monkeypatch, bsmon_home):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _footprint(model, optimizer, bsmon_home)
    with monkeypatch.context() as patch:
        SET_UP_FAILURES[where](patch, model, optimizer)
        with pytest.raises(RuntimeError, match=INJECTED):
            bsmon.watch(model, optimizer, noise="per_example", profile=Profile([], None, "cpu", "all_sizes"))
    assert _footprint(model, optimizer, bsmon_home) == before
    with bsmon.watch(model, optimizer) as monitor:  # and watching again works
        model(torch.randn(4, 4)).sum().backward()
        optimizer.step()
    assert monitor.stats().step == 1

