"""A late monitor starts from the job's checkpoint (bsmon/checkpoint.py) and ends exactly where a
monitor that read every record ends; a checkpoint it cannot trust is refused with the reason."""

import dataclasses
import json
import os
import pickle
import time
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import bsmon
from bsmon import checkpoint, store, wire
from bsmon.client import Feed, connect
from bsmon.model import SessionModel
from bsmon.probe import publisher as publisher_module
from conftest import WAIT_S


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def _train(model, optimizer, monitor, steps, start=0):
    for step in range(start, start + steps):
        micro = 8 if step < 150 else 12  # a change of batch size: two live throughput points
        for _ in range(2):  # two micro-batches: the noise scale is measured
            loss = model(torch.randn(micro, 6)).pow(2).mean() / 2
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            monitor.log(loss=float(loss.detach()) * 2)


def _train_until_checkpointed(model, optimizer, monitor, info, step):
    """Train on until the job's checkpoint covers ``step`` (the steps trained): the background thread
    writes it after a delivery, unless the training thread holds the model just then (it tries the next time)."""
    def covered():
        loaded = checkpoint.read(info.directory, info.id)
        return not isinstance(loaded, str) and loaded[0].steps_done >= step
    deadline, trained = time.monotonic() + WAIT_S, step
    while not covered():
        assert time.monotonic() < deadline, f"no checkpoint covering step {step} in {WAIT_S} s"
        _train(model, optimizer, monitor, 1, start=trained)
        trained += 1
        monitor.stats()  # publishes it
        time.sleep(0.05)
    return trained


@pytest.fixture
def every_flush_checkpoints(monkeypatch):
    """The summary and the checkpoint at every delivery, not every 1 and 5 s."""
    monkeypatch.setattr(publisher_module, "SUMMARY_INTERVAL_S", 0.0)
    monkeypatch.setattr(publisher_module, "MODEL_STATE_S", 0.0)


def _same_state(late: SessionModel, full: SessionModel) -> None:
    assert dataclasses.asdict(late.stats()) == dataclasses.asdict(full.stats())
    assert late.throughput_points() == full.throughput_points()
    assert late.events == full.events and late.bye == full.bye
    steps, expected = late.history.steps.arrays(), full.history.steps.arrays()
    assert steps.keys() == expected.keys()
    for name, column in expected.items():
        np.testing.assert_array_equal(steps[name], column, err_msg=name)
    assert late.history.loss_at(391) == full.history.loss_at(391) is not None


@pytest.mark.parametrize("damage", [False, True])
def test_a_late_monitor_starts_from_the_checkpoint_and_ends_where_a_full_read_does(every_flush_checkpoints, damage):
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer) as monitor:
        _train(model, optimizer, monitor, 300)
        info = store.resolve_session(None, running=True)
        checkpointed = _train_until_checkpointed(model, optimizer, monitor, info, 300)
        path = info.directory / checkpoint.CHECKPOINT_FILE
        if damage:
            data = bytearray(path.read_bytes())
            data[-10] ^= 0xFF
            path.write_bytes(bytes(data))
        covers = checkpoint.read(info.directory, info.id)
        late = Feed().attach(info.socket, info.directory)
        _train(model, optimizer, monitor, 100, start=checkpointed)
    assert late.wait(timeout=WAIT_S) and late.state == "ended"
    size = info.records_path.stat().st_size
    if damage:
        assert covers == late.checkpoint_note == "the checkpoint is incomplete or damaged"
        assert late.resumed_from == 0 and late.received_bytes == size  # the whole run, from the file and live
    else:
        assert late.checkpoint_note is None and late.resumed_from == covers[1] > size // 2
        hello = len(wire.encode(store.read_hello(info.records_path)))
        assert late.received_bytes == hello + size - late.resumed_from  # only what the checkpoint lacks
    full = Feed().replay(store.session_info(info.directory))
    assert full.model.steps_done == late.model.steps_done == checkpointed + 100
    assert full.model.stats().b_simple is not None
    _same_state(late.model, full.model)
    assert not path.exists(), "the job removes its checkpoint when it ends"


def test_a_from_the_job_cannot_serve_is_ignored(every_flush_checkpoints):
    """A monitor that asks for bytes past the file gets the whole run (protocol.md, the conversation)."""
    model, optimizer = _setup()
    with bsmon.watch(model, optimizer) as monitor:
        _train(model, optimizer, monitor, 20)
        monitor.stats()
        info = store.resolve_session(None, running=True)
        deadline = time.monotonic() + WAIT_S
        while store.session_info(info.directory).steps < 20:
            assert time.monotonic() < deadline, "20 steps not in the file"
            time.sleep(0.02)
        sock = connect(info.socket, start=1 << 40)
    reader, records = wire.FrameReader(), []
    while chunk := sock.recv(1 << 16):
        records += reader.feed(chunk)
    sock.close()
    assert records[0]["k"] == "hello" and [r["step"] for r in records if r["k"] == "step"] == list(range(1, 21))


class _Evil:
    def __reduce__(self):
        return os.system, ("true",)


def _write(directory, body, session="abcd1234", covers=100, **header):
    """A checkpoint file of ``body``, with ``header``'s fields replacing the right ones."""
    magic, fields, rest = checkpoint.encode(body, session, covers).split(b"\n", 2)
    fields = json.dumps({**json.loads(fields), **header}).encode()
    (directory / checkpoint.CHECKPOINT_FILE).write_bytes(b"\n".join((magic, fields, rest)))


def test_only_this_codes_whole_checkpoint_of_this_session_in_a_private_file_is_loaded(tmp_path):
    model = SessionModel()
    model.ingest({"k": "hello", "v": wire.PROTOCOL_VERSION, "session": "abcd1234", "name": "n", "pid": 1,
                  "t0": 0.0, "command": [], "host": "h", "user": "u", "unit": "samples"})
    body = pickle.dumps(model)
    assert checkpoint.read(tmp_path, "abcd1234") == "the job has written no checkpoint yet"
    _write(tmp_path, body)
    loaded, covers = checkpoint.read(tmp_path, "abcd1234")
    assert covers == 100 and loaded.hello == model.hello and loaded.history is not None
    assert checkpoint.read(tmp_path, "ffff0000") == "the checkpoint is another session's"
    _write(tmp_path, body, fingerprint="0" * 32)
    assert checkpoint.read(tmp_path, "abcd1234") == "the checkpoint was written by another bsmon release"
    _write(tmp_path, body, crc=zlib.crc32(body) ^ 1)
    assert checkpoint.read(tmp_path, "abcd1234") == "the checkpoint is incomplete or damaged"
    (tmp_path / checkpoint.CHECKPOINT_FILE).write_bytes(checkpoint.encode(body, "abcd1234", 100)[:-5])
    assert checkpoint.read(tmp_path, "abcd1234") == "the checkpoint is incomplete or damaged"
    _write(tmp_path, pickle.dumps(_Evil()))
    refused = checkpoint.read(tmp_path, "abcd1234")
    assert refused.startswith("the checkpoint does not load: a checkpoint may not name") and "system" in refused
    _write(tmp_path, pickle.dumps({"not": "a model"}))
    assert checkpoint.read(tmp_path, "abcd1234") == "the checkpoint holds no session model with history"
    _write(tmp_path, body)
    os.chmod(tmp_path / checkpoint.CHECKPOINT_FILE, 0o666)
    assert checkpoint.read(tmp_path, "abcd1234").endswith("is not this user's own file: not loaded")
    os.chmod(tmp_path / checkpoint.CHECKPOINT_FILE, 0o600)
    (tmp_path / checkpoint.CHECKPOINT_FILE).write_bytes(b"garbage\n")
    assert checkpoint.read(tmp_path, "abcd1234").endswith("is not a bsmon checkpoint")

