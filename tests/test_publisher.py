"""The publisher's division of labour: the caller encodes, never waits; one background thread writes."""

import threading
import time

import torch

from bsmon import store, wire
from bsmon.probe import publisher as publisher_module
from bsmon.probe.deferred import Deferred
from bsmon.probe.publisher import Publisher
from conftest import WAIT_S


class SlowDeviceValue(Deferred):
    """A Deferred whose device copy has not arrived until ``arrive()`` (a CUDA event, simulated)."""

    __slots__ = ("arrived",)

    def __init__(self, values):
        super().__init__(torch.tensor(values))
        self.arrived = False

    def ready(self):
        return self.arrived


class Recorder:
    """``on_records`` for a Publisher: the records it got, on which threads, and the stream's bytes
    up to each batch's end."""

    def __init__(self):
        self.records = []
        self.threads = set()
        self.ends = []

    def __call__(self, records, end):
        self.records.extend(records)
        self.threads.add(threading.get_ident())
        self.ends.append(end)

    def steps(self):
        return [r["step"] for r in self.records if r["k"] == "step"]


def _publisher(tmp_path):
    writer = store.RecordWriter(tmp_path / "records.bsr")
    recorder = Recorder()
    hello = {"k": "hello", "v": wire.PROTOCOL_VERSION, "session": "s", "name": "n", "pid": 1, "t0": 0.0, "command": [],
             "host": "h", "user": "u", "unit": "samples"}
    return Publisher(hello, writer, None, recorder), writer, recorder


def _step(n, **extra):
    return {"k": "step", "step": n, "t": 0.0, "dt": 0.01, "n": 8, "mb": 1, "dropped": 0, **extra}


def _written_steps(writer):
    records, _ = store.read_records(writer.path)
    return [r["step"] for r in records if r["k"] == "step"]


def _wait_for(condition, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_poll_encodes_on_the_calling_thread_and_the_background_thread_writes(tmp_path):
    publisher, writer, recorder = _publisher(tmp_path)
    for n in (1, 2, 3):
        publisher.submit(_step(n))
    publisher.poll(now=True)
    assert recorder.steps() == [1, 2, 3] and recorder.threads == {threading.get_ident()}
    assert _wait_for(lambda: _written_steps(writer) == [1, 2, 3])
    publisher.close({"k": "bye", "t": 0.0, "status": "finished", "code": 0})
    assert store.read_records(writer.path)[0][-1]["k"] == "bye"


def test_each_batch_comes_with_the_file_offset_of_its_end(tmp_path):
    """The offset a job's checkpoint covers (bsmon/checkpoint.py): where a late monitor's stream resumes."""
    publisher, writer, recorder = _publisher(tmp_path)
    for batch in ((1, 2), (3,), (4, 5, 6)):
        for n in batch:
            publisher.submit(_step(n, **({"noise": {"est": "microbatch", "micro": [4, 4], "g": 1, "acc": [1.0, 2.0]}}
                                          if n == 5 else {})))
        publisher.poll(now=True)
    assert _wait_for(lambda: _written_steps(writer) == [1, 2, 3, 4, 5, 6])
    data = writer.path.read_bytes()
    for end, last in zip(recorder.ends, (2, 3, 6)):
        reader = wire.FrameReader()
        assert [r["step"] for r in reader.feed(data[:end]) if r["k"] == "step"][-1] == last and reader.pending == 0
    assert recorder.ends[-1] == len(data)
    publisher.close({"k": "bye", "t": 0.0, "status": "finished", "code": 0})


def test_poll_is_rate_limited_unless_asked_now(tmp_path, monkeypatch):
    monkeypatch.setattr(publisher_module, "FLUSH_INTERVAL_S", 60.0)
    monkeypatch.setattr(publisher_module, "IDLE_FLUSH_S", 60.0)
    publisher, _, recorder = _publisher(tmp_path)
    publisher.submit(_step(1))
    publisher.poll()
    assert recorder.steps() == []
    publisher.poll(now=True)
    assert recorder.steps() == [1]
    publisher.close({"k": "bye", "t": 0.0, "status": "finished", "code": 0})


def test_poll_never_waits_for_device_values_and_keeps_the_order(tmp_path):
    publisher, writer, recorder = _publisher(tmp_path)
    late = SlowDeviceValue([2.5, 4.0])
    publisher.submit(_step(1))
    publisher.submit(_step(2, noise={"est": "microbatch", "micro": [4, 4], "g": 1, "acc": late}))
    publisher.submit(_step(3))
    publisher.poll(now=True)
    assert recorder.steps() == [1]  # step 2 is still on its way from the device; 3 waits behind it
    late.arrived = True
    publisher.poll(now=True)
    assert recorder.steps() == [1, 2, 3]
    assert recorder.records[1]["noise"]["acc"] == [2.5, 4.0]
    publisher.close({"k": "bye", "t": 0.0, "status": "finished", "code": 0})
    assert _written_steps(writer) == [1, 2, 3]


def test_the_background_thread_flushes_when_nobody_polls(tmp_path, monkeypatch):
    """Long steps, evaluation or a lagging device: records still reach the file and monitors."""
    monkeypatch.setattr(publisher_module, "IDLE_FLUSH_S", 0.1)
    publisher, writer, recorder = _publisher(tmp_path)
    late = SlowDeviceValue([1.0])  # never "ready": the background thread may wait for it
    publisher.submit(_step(1, noise={"est": "microbatch", "micro": [8], "g": 1, "acc": late}))
    publisher.submit(_step(2))
    assert _wait_for(lambda: _written_steps(writer) == [1, 2])
    assert recorder.steps() == [1, 2] and threading.get_ident() not in recorder.threads
    publisher.close({"k": "bye", "t": 0.0, "status": "finished", "code": 0})


def test_a_rank_that_records_nothing_encodes_nothing(tmp_path):
    """Ranks > 0 have no session file and no socket: their records only feed stats()."""
    recorder = Recorder()
    hello = {"k": "hello", "v": wire.PROTOCOL_VERSION, "session": "s", "name": "n", "pid": 1, "t0": 0.0, "command": [],
             "host": "h", "user": "u", "unit": "samples"}
    publisher = Publisher(hello, None, None, recorder)
    publisher.submit(_step(1))
    publisher.poll(now=True)
    assert recorder.steps() == [1] and not publisher._outbox
    publisher.close({"k": "bye", "t": 0.0, "status": "finished", "code": 0})
