"""The probe inside a real (small) torch training loop, with real sockets."""

import socket
import time
import warnings

import pytest
import torch
from torch import nn

import bsmon
from bsmon import store, wire
from bsmon.client import Feed, connect
from conftest import WAIT_S


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, optimizer


def _train(model, optimizer, monitor, steps, accumulate=2, micro=8, kwargs_input=False):
    for _ in range(steps):
        for _ in range(accumulate):
            x = torch.randn(micro, 6)
            out = model(input=x) if kwargs_input else model(x)
            loss = out.pow(2).mean() / accumulate
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.log(loss=loss.detach(), lr=0.01)


def _records(monitor):
    info = store.resolve_session(monitor.session_id)
    return store.read_records(info.records_path)[0]


def test_steps_samples_and_micro_batches_are_counted():
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer) as monitor:
        _train(model, optimizer, monitor, steps=5, accumulate=3, micro=8)
        with torch.no_grad():
            model(torch.randn(100, 6))  # evaluation: not counted
    steps = [r for r in _records(monitor) if r["k"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert all(s["n"] == 24 and s["mb"] == 3 for s in steps)
    stats = monitor.stats()
    assert stats.step == 5 and stats.samples_seen == 120 and stats.batch_size == 24 and stats.micro_batches == 3
    assert stats.noise_estimator == "microbatch" and stats.dropped == 0


def test_an_optimizer_subclass_calling_super_step_is_one_step_with_its_phases():
    """torch runs the step hooks around each patched ``step`` in the class hierarchy: once SGD itself
    has been instantiated (here, or anywhere earlier in the process), a subclass whose step() calls
    super().step() fires them twice, nested. That is still one optimizer step."""
    class ClippedSGD(torch.optim.SGD):
        def step(self, closure=None):
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], 1.0)
            return super().step(closure)

    torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # SGD.step patched with the hook runner
    model = _setup()[0]
    optimizer = ClippedSGD(model.parameters(), lr=0.01)
    with bsmon.watch(model, optimizer) as monitor:
        _train(model, optimizer, monitor, steps=4, accumulate=2, micro=8)
    steps = [r for r in _records(monitor) if r["k"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["n"] == 16 and s["mb"] == 2 for s in steps)
    assert all(len(s["ph"]) == 4 for s in steps[1:])  # the first step has no previous end


def test_explicit_batch_size_and_tokens():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(6, 1)

        def forward(self, input):
            return self.inner(input)

    model = Wrapper()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with bsmon.watch(model, optimizer, unit="tokens", tokens_per_sample=128, noise=None) as monitor:
        _train(model, optimizer, monitor, steps=2, accumulate=1, micro=4, kwargs_input=True)
    stats = monitor.stats()
    assert stats.batch_size == 4 * 128 and stats.unit == "tokens"
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer, batch_size=1000, noise=None) as monitor:
        _train(model, optimizer, monitor, steps=2)
    assert monitor.stats().batch_size == 1000


def test_logged_values_are_tagged_with_their_step():
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer) as monitor:
        _train(model, optimizer, monitor, steps=3)
        loss = model(torch.randn(8, 6)).pow(2).mean()
        monitor.log(before_backward=loss)  # mid-iteration: belongs to step 4
        loss.backward()
        optimizer.step()
    scalars = {r["step"]: r["values"] for r in _records(monitor) if r["k"] == "scalars"}
    assert set(scalars[1]) == {"loss", "lr"} and scalars[3]["lr"] == 0.01
    assert "before_backward" in scalars[4]


def test_non_numeric_log_value_warns_and_training_goes_on():
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer) as monitor:
        with pytest.warns(bsmon.BsmonWarning, match="log\\(note=...\\) ignored: a str"):
            monitor.log(note="hello", loss=1.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            monitor.log(note="again")  # warned once per name; still recorded as an event
        with pytest.warns(bsmon.BsmonWarning, match="shape \\(3,\\)"):
            monitor.log(vec=torch.ones(3))
        _train(model, optimizer, monitor, steps=1)
    records = _records(monitor)
    assert any(r["k"] == "scalars" and r["values"] == {"loss": 1.5} for r in records)
    assert sum(r["k"] == "event" and "note" in r["msg"] for r in records) == 2


def test_second_watch_in_one_process_is_refused():
    model, optimizer = _setup()
    monitor = bsmon.watch(model, optimizer)
    try:
        with pytest.raises(RuntimeError, match="already active.*close\\(\\)"):
            bsmon.watch(model, optimizer)
    finally:
        monitor.close()
    bsmon.watch(model, optimizer).close()  # fine once the first is closed


@pytest.mark.parametrize("kwargs, message", [
    (dict(unit="tokens"), "tokens_per_sample"),
    (dict(unit="bytes"), "unit="),
    (dict(batch_size=0), "positive int"),
    (dict(noise="magic"), "noise='magic'"),
])
def test_bad_arguments_are_refused_clearly(kwargs, message):
    model, optimizer = _setup()
    with pytest.raises(ValueError, match=message):
        bsmon.watch(model, optimizer, **kwargs).close()
    with pytest.raises(TypeError, match="nn.Module"):
        bsmon.watch("model", optimizer)


def test_hooks_are_removed_on_close():
    model, optimizer = _setup()
    monitor = bsmon.watch(model, optimizer)
    monitor.close()
    monitor.close()  # idempotent
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not optimizer._optimizer_step_post_hooks


def test_records_wait_in_bounded_batches_until_stats_asks():
    from bsmon.probe.monitor import INGEST_BATCH

    model, optimizer = _setup()
    with bsmon.watch(model, optimizer, noise=None) as monitor:
        for _ in range(2 * INGEST_BATCH + 100):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            assert len(monitor._unread) < INGEST_BATCH  # a flush reaching the batch ingests it
        assert monitor.stats().step == 2 * INGEST_BATCH + 100
        assert not monitor._unread


def test_stats_asked_every_step_is_recomputed_a_few_times_a_second(monkeypatch):
    from bsmon.model import SessionModel
    from bsmon.probe.monitor import STATS_REFRESH_S

    computed = []
    original = SessionModel.stats
    monkeypatch.setattr(SessionModel, "stats", lambda self: computed.append(1) or original(self))
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer, noise=None) as monitor:
        began = time.monotonic()
        for step in range(1, 401):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            seen = monitor.stats().step
            assert seen == step if step == 1 else seen <= step  # the first ask is up to date
        elapsed = time.monotonic() - began
    assert len(computed) <= elapsed / STATS_REFRESH_S + 2
    assert monitor.stats().step == 400  # after close(): up to the end


def test_exception_in_with_block_marks_the_session_failed():
    model, optimizer = _setup()
    with pytest.raises(ZeroDivisionError):
        with bsmon.watch(model, optimizer) as monitor:
            _train(model, optimizer, monitor, steps=1)
            1 / 0
    bye = _records(monitor)[-1]
    assert bye["k"] == "bye" and bye["status"] == "failed" and "ZeroDivisionError" in bye["error"]
    assert store.resolve_session(monitor.session_id).status == "failed"


def test_late_monitor_sees_the_whole_run_and_several_can_attach():
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer) as monitor:
        _train(model, optimizer, monitor, steps=20)
        info = store.resolve_session(None, running=True)
        early, late = Feed().attach(info.socket), None
        _train(model, optimizer, monitor, steps=10)
        late = Feed().attach(info.socket)  # attaches after step 30
        _train(model, optimizer, monitor, steps=5)
    for feed in (early, late):
        assert feed.wait(timeout=WAIT_S)
        history = feed.model.history
        assert list(history.step) == list(range(1, 36)), "every step from step 0, in order"
        assert feed.state == "ended"
        assert feed.model.stats().b_simple == monitor.stats().b_simple  # same numbers everywhere


def test_hostile_peer_is_dropped_and_the_session_survives():
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer) as monitor:
        _train(model, optimizer, monitor, steps=3)
        info = store.resolve_session(None, running=True)
        for garbage in (b"\x00\x00\x00\x05\x00\x00\x00\x00hello", b"\xff" * 64,
                        wire.HEADER.pack(1 << 30, 0)):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(info.socket)
            peer.sendall(garbage)
            peer.settimeout(5)
            assert peer.recv(100) == b"", "the probe closes a peer that sends garbage"
            peer.close()
        good = Feed().attach(info.socket)
        _train(model, optimizer, monitor, steps=3)
    assert good.wait(timeout=WAIT_S) and good.model.stats().step == 6
    assert [r["step"] for r in _records(monitor) if r["k"] == "step"] == list(range(1, 7))


def test_a_stalled_monitor_never_delays_training():
    model, optimizer = _setup()
    monitor = bsmon.watch(model, optimizer)
    try:
        info = store.resolve_session(None, running=True)
        stalled = connect(info.socket)  # attaches and then never reads
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        start = time.perf_counter()
        for _ in range(50):
            monitor.log(blob=1.0, **{f"pad{i}": float(i) for i in range(200)})  # fat records fill the socket
            _train(model, optimizer, monitor, steps=1)
        elapsed = time.perf_counter() - start
    finally:
        monitor.close()
        stalled.close()
    assert elapsed < 5.0
    assert monitor.stats().step == 50 and monitor.stats().dropped == 0


def test_monitor_client_drops_a_job_that_sends_garbage(tmp_path):
    """The monitor side: a bad frame ends that connection with a message, never the process."""
    path = str(tmp_path / "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    feed = Feed().attach(path)
    conn, _ = server.accept()
    conn.sendall(wire.HEADER.pack(10, 0) + b"0123456789")
    assert feed.wait(timeout=WAIT_S)
    assert feed.state == "error" and "bad frame" in feed.message and "checksum" in feed.message
    conn.close()
    server.close()


def test_unwritable_home_keeps_training(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("BSMON_HOME", str(blocker / "home"))
    model, optimizer = _setup()
    with pytest.warns(bsmon.BsmonWarning, match="cannot record the session"):
        monitor = bsmon.watch(model, optimizer)
    with monitor:
        _train(model, optimizer, monitor, steps=3)
    assert monitor.stats().step == 3


def test_profile_inside_a_watched_job_is_streamed_and_drives_the_recommendation():
    model, optimizer = _setup()

    def step_fn(batch_size):
        model(torch.randn(batch_size, 6)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    with bsmon.watch(model, optimizer, noise_budget=1.0) as monitor:
        result = bsmon.profile(step_fn, [4, 8, 16, 32], steps=3, warmup=1)
        _train(model, optimizer, monitor, steps=40, accumulate=2, micro=8)
        recommended = monitor.recommended_batch_size()
        stats = monitor.stats()
    records = _records(monitor)
    assert [r["batch_size"] for r in records if r["k"] == "profile_point"] == [4, 8, 16, 32]
    assert next(r for r in records if r["k"] == "profile")["profile"] == result.to_dict()
    assert stats.b_simple is not None
    assert recommended == stats.b_opt and isinstance(recommended, int) and recommended >= 1
