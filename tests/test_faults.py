"""Faults around a running job, each with what bsmon promises (docs/reliability.md): the training
never pays, and what was recorded stays readable."""

import ast
import random
import re
import resource
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
from conftest import ROOT, WAIT_S, bsmon_cli, spawn, start_job, train_command, wait_for, wait_for_line


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


def test_kill_9_of_the_job_mid_write_leaves_the_session_readable_to_its_last_whole_record(tmp_path):
    """A record file is append-only, so a job killed mid-write leaves a byte prefix of it. Cut a
    real session's file at every byte of its last records, and at random bytes before: each reads
    as the whole records before the cut, the rest counted as a torn tail, the steps in order."""
    ready = tmp_path / "ready"
    job = start_job("--steps", "100000", "--sleep", "0.01", "--ready-file", str(ready))
    wait_for(lambda: ready.exists() and store.list_sessions()[0].steps >= 20, "20 recorded steps", job)
    job.kill()  # kill -9 at an arbitrary moment: what it left reads whole, too
    job.wait()
    (info,) = store.list_sessions()
    whole, torn = store.read_records(info.records_path)
    assert info.status == "lost" and info.steps >= 20
    steps = [r["step"] for r in whole if r["k"] == "step"]
    assert steps == list(range(1, len(steps) + 1))

    data = info.records_path.read_bytes()
    data = data[:len(data) - torn]
    cut = tmp_path / store.RECORDS_FILE
    dense = range(max(0, len(data) - 600), len(data) + 1)  # every byte of the last records
    positions = sorted({*random.Random(0).sample(range(len(data)), min(300, len(data))), *dense})
    consumed, count, torn_cuts = 0, 0, 0
    for position in positions:
        cut.write_bytes(data[:position])
        records, torn = store.read_records(cut)
        where = f"cut at byte {position} of {len(data)}"
        assert records == whole[:len(records)], where
        assert len(records) >= count and position - torn >= consumed, where
        if position in dense and position - 1 in dense and torn:
            assert position - torn == consumed and len(records) == count, where  # no record completed
        consumed, count, torn_cuts = position - torn, len(records), torn_cuts + bool(torn)
        steps = [r["step"] for r in records if r["k"] == "step"]
        assert steps == list(range(1, len(steps) + 1)), where
    assert count == len(whole) and consumed == len(data) and torn_cuts > 300
    assert store.read_records(info.records_path)[0] == whole


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


def test_a_full_disk_mid_run_keeps_training_and_a_monitor_still_gets_every_record(tmp_path):
    """The kernel refuses writes past RLIMIT_FSIZE, as on a full disk. Training goes on and says so
    once; a monitor attached after the disk filled still gets the whole run, from memory."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # Python ignores SIGXFSZ itself

    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        job = spawn(train_command("--steps", "100000", "--sleep", "0.005"), stderr=err, preexec_fn=limit_file_size)
    wait_for(lambda: "Training continues" in stderr.read_text(), "the job to say its disk is full", job,
             output=stderr.read_text)
    (info,) = store.list_sessions()
    recorded = store.session_info(info.directory).steps
    assert 0 < recorded and info.records_path.stat().st_size <= 20_000
    feed = Feed().attach(info.socket)
    wait_for(lambda: feed.read(lambda model: model.stats().step) > recorded + 50, "50 steps past the full disk", job,
             output=stderr.read_text)
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=WAIT_S) == -signal.SIGINT  # Python re-raises SIGINT after KeyboardInterrupt
    assert feed.wait(timeout=WAIT_S)
    steps = list(feed.model.history.step)
    assert len(steps) > recorded + 50 and steps == list(range(1, len(steps) + 1))
    text = stderr.read_text()
    assert text.count("Training continues") == 1 and "recording to" in text and "failed" in text
    assert store.session_info(info.directory).steps == recorded  # the file kept what fitted


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


def test_the_reliability_table_names_real_tests():
    """docs/reliability.md: every fault names at least one test, and every test it names exists
    (``file.py::name``, or ``::name`` in the file named before it; a parametrize id is ignored)."""
    rows = [line for line in (ROOT / "docs" / "reliability.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| fault ", "| ---", "| |"))]
    rows = rows[:next(i for i, row in enumerate(rows) if row.startswith("| the job |"))]  # the fault table only
    assert len(rows) >= 15
    defined: dict[str, set[str]] = {}
    for row in rows:
        named, file = re.findall(r"`((?:test_\w+\.py)?::test_\w+)(?:\[[^\]`]*\])?`", row), None
        assert named, f"no test named for: {row[:80]}"
        for reference in named:
            prefix, name = reference.split("::")
            file = prefix or file
            if file not in defined:
                tree = ast.parse((ROOT / "tests" / file).read_text())
                defined[file] = {node.name for node in tree.body
                                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
            assert name in defined[file], f"docs/reliability.md names {file}::{name}, which does not exist"
