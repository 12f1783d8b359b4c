"""Faults around a running job, each with what bsmon promises (docs/reliability.md): the training
never pays, and what was recorded stays readable."""

import shutil
import signal
import socket
import sys

import torch
from torch import nn

import bsmon
from bsmon import store
from bsmon.client import Feed, connect
from bsmon.probe import publisher
from conftest import WAIT_S, bsmon_cli, spawn, start_job, train_command, wait_for, wait_for_line


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def _train(model, optimizer, steps, monitor=None, pad=0):
    for _ in range(steps):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if pad:
            monitor.log(**{f"pad{i}": float(i) for i in range(pad)})  # fat records


def test_kill_9_of_the_monitor_leaves_the_job_alone(tmp_path):
    ready = tmp_path / "ready"
    job = start_job("--steps", "300", "--sleep", "0.01", "--ready-file", str(ready))
    wait_for(ready.exists, "the job's first step", job)
    monitor = spawn([sys.executable, "-m", "bsmon.cli", "attach", "--headless"])
    wait_for_line(monitor, "running")  # attached and streaming
    monitor.kill()
    assert job.wait(timeout=WAIT_S) == 0
    (info,) = store.list_sessions()
    assert info.status == "finished" and info.steps == 300


def test_the_session_directory_deleted_under_a_running_job(tmp_path):
    """Training goes on to the end, and a monitor attached before keeps the live stream."""
    ready = tmp_path / "ready"
    job = start_job("--steps", "200", "--sleep", "0.01", "--ready-file", str(ready))
    wait_for(ready.exists, "the job's first step", job)
    (info,) = store.list_sessions()
    feed = Feed().attach(info.socket, info.directory)
    shutil.rmtree(info.directory)
    out, err = job.communicate(timeout=WAIT_S)
    assert job.returncode == 0 and "trained 200 steps" in out, err
    assert feed.wait(timeout=WAIT_S) and feed.state == "ended"
    assert list(feed.model.history.step) == list(range(1, 201))
    assert store.list_sessions() == []


def test_a_monitor_that_stops_reading_is_dropped_and_counted(monkeypatch):
    monkeypatch.setattr(publisher, "CLIENT_BACKLOG_LIMIT", 256 << 10)
    model, optimizer = _model()
    with bsmon.watch(model, optimizer) as monitor:
        info = store.resolve_session(monitor.session_id)
        stalled = connect(info.socket)  # attaches, then never reads
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # accepted before the records pile up (a loaded machine may take a while to accept it)
        wait_for(lambda: monitor._publisher._clients, "the job to accept the monitor")
        _train(model, optimizer, 300, monitor, pad=200)  # about 1.5 MB of records
    records, _ = store.read_records(info.records_path)
    assert [r["step"] for r in records if r["k"] == "step"] == list(range(1, 301))
    (event,) = [r for r in records if r["k"] == "event"]
    assert "stopped reading and was disconnected (1 so far)" in event["msg"]
    assert monitor.stats().dropped == 0  # the session lost nothing
    stalled.settimeout(WAIT_S)
    while stalled.recv(1 << 16):  # what it had been sent, then the end
        pass
    stalled.close()


def test_32_monitors_attached_at_once_each_get_the_whole_run():
    model, optimizer = _model()
    with bsmon.watch(model, optimizer) as monitor:
        _train(model, optimizer, 10)
        info = store.resolve_session(monitor.session_id)
        feeds = [Feed().attach(info.socket) for _ in range(32)]
        _train(model, optimizer, 20)
    for feed in feeds:
        assert feed.wait(timeout=WAIT_S) and feed.state == "ended"
        assert list(feed.model.history.step) == list(range(1, 31))


def test_a_second_bsmon_run_with_the_same_name(tmp_path):
    """Both are recorded, under their own ids; the shared name then asks for an id."""
    ready = tmp_path / "ready"
    first = spawn([sys.executable, "-m", "bsmon.cli", "run", "--headless", "--name", "twin", "--",
                   *train_command("--steps", "100000", "--sleep", "0.01", "--ready-file", str(ready))])
    wait_for(ready.exists, "the first job's first step", first)
    second = bsmon_cli("run", "--headless", "--name", "twin", "--", *train_command("--steps", "20"))
    assert second.returncode == 0 and "step 20" in second.stdout, second.stderr
    running = store.resolve_session(None, running=True)
    assert running.name == "twin" and running.steps >= 1
    ambiguous = bsmon_cli("attach", "twin")
    assert ambiguous.returncode == 1 and "'twin' is ambiguous" in ambiguous.stderr
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=WAIT_S) == 128 + signal.SIGINT
    sessions = store.list_sessions()
    assert [s.name for s in sessions] == ["twin", "twin"] and len({s.id for s in sessions}) == 2
    assert sorted(s.status for s in sessions) == ["failed", "finished"]
