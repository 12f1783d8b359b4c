"""The monitor's fast path: plain steps decoded as numpy blocks and ingested whole must leave
exactly what the same steps ingested one record at a time leave (state, numbers, history, the
exported rows)."""

import dataclasses
import math

import numpy as np
import pytest

from bsmon import wire
from bsmon.model import SessionModel
from bsmon.wire import StepBlock

HELLO = {"k": "hello", "v": wire.PROTOCOL_VERSION, "session": "abcd1234", "name": "job", "pid": 7, "t0": 100.0,
         "command": ["python", "train.py"], "host": "h", "user": "u", "unit": "samples", "socket": None,
         "world_size": 1, "rank": 0, "pid_namespace": "pid:[1]", "devices": [], "frameworks": []}
ESTIMATOR = {"k": "estimator", "name": "microbatch", "reason": None, "covered_fraction": 1.0}


def _job(steps=3000, branch_at=None, unresolved=(), slow=1.0):
    """A job's records: two micro-batches a step with phase marks, the batch size changed twice
    (live throughput points), noise norms every 37th step, a loss every 10th, an abandoned
    attempt, a step with FLOPs counted; optionally a branch check, and steps whose norms leave
    |G|^2 negative (``unresolved``: no noise scale, so no advice, for a while); ``slow`` stretches
    the step times (a slow job: the advice's re-evaluations each second fall between every tenth step)."""
    rng = np.random.default_rng(0)
    out, t = [HELLO, ESTIMATOR], 100.0
    for step in range(1, steps + 1):
        micro = 8 if step < 1200 else 16 if step < 2400 else 12
        dt = (0.002 + 0.0001 * micro) * (1 + 0.05 * rng.random()) * slow
        t += dt
        record = {"k": "step", "step": step, "t": t, "dt": dt, "n": 2 * micro, "mb": 2, "dropped": 0,
                  "ph": [dt * 0.1, dt * 0.4, dt * 0.8, dt * 0.9]}
        if step % 37 == 0:
            g = float(rng.uniform(1, 2))
            second = g if step in unresolved else 4 * g + 8.0 / micro
            record["noise"] = {"est": "microbatch", "micro": [micro, micro], "g": 1, "acc": [g + 8.0 / micro, second]}
        if step == 500:
            record["skipped"] = [{"n": 2 * micro, "mb": 1, "why": "raised"}]
        if step == 700:
            record["flops"] = {"total": 1e9, "dtype": "float32", "tf32": False, "reason": None}
        if step in (250, 1000):
            del record["ph"]  # a step without phase marks inside a run
        out.append(record)
        if step % 10 == 0:
            out.append({"k": "scalars", "step": step, "values": {"loss": 1.0 / step}})
        if step == branch_at:
            out.append({"k": "branch_check", **_branch(step)})
    out.append({"k": "bye", "t": t, "status": "finished", "code": 0})
    return out


def _branch(step):
    from tests.test_records import EXAMPLES  # the table's example of a branch check
    return {**{k: v for k, v in EXAMPLES["branch_check"].items() if k != "k"}, "step": step, "calibrate": True}


def _read(records, blocks, chunk=1 << 12):
    data = b"".join(map(wire.encode, records))
    reader = wire.FrameReader(blocks=blocks)
    out = []
    for i in range(0, len(data), chunk):
        out += reader.feed(data[i:i + chunk])
    assert reader.invalid == 0
    return out


def _flat(items):
    return [r for item in items for r in (item.records() if isinstance(item, StepBlock) else [item])]


def test_blocks_hold_the_same_steps_and_records():
    records = _job()
    plain, blocked = _read(records, False), _read(records, True)
    assert plain == records
    assert any(isinstance(item, StepBlock) for item in blocked)
    flat = _flat(blocked)
    assert [r for r in flat if r["k"] == "step"] == [r for r in records if r["k"] == "step"]
    assert sorted(map(repr, flat)) == sorted(map(repr, records))  # scalars may follow their block
    assert wire.record_count(blocked) == len(records)
    # the kinds whose order matters keep it exactly
    ordered = [r for r in flat if r["k"] != "scalars"]
    assert ordered == [r for r in records if r["k"] != "scalars"]


def _ingest(items, *, history=True):
    model = SessionModel(keep_history=history)
    tables = []
    model.on_step_rows = tables.append
    for item in items:
        model.ingest(item)
    return model, np.concatenate(tables)


@pytest.mark.parametrize("branch_at, unresolved, slow", [(None, (), 1), (1500, (), 1), (None, range(600, 1300), 1),
                                                         (None, range(600, 1300), 120)])
def test_a_model_fed_blocks_equals_one_fed_records(branch_at, unresolved, slow):
    records = _job(branch_at=branch_at, unresolved=unresolved, slow=slow)
    one, rows_one = _ingest(_read(records, False))
    a = one.stats()
    assert a.b_opt is not None and a.step_split is not None and a.skipped_steps == 1  # the paths were exercised
    assert len(rows_one) == 3000
    # a monitor's reader, and the job's own model (its records grouped as published, 1024 at a time)
    job = [item for i in range(0, len(records), 1024) for item in wire.in_blocks(records[i:i + 1024])]
    for items in (_read(records, True), job):
        bulk, rows_bulk = _ingest(items)
        assert dataclasses.asdict(a) == dataclasses.asdict(bulk.stats())
        assert one.throughput_points() == bulk.throughput_points()
        np.testing.assert_array_equal(rows_one, rows_bulk)  # the exported rows, the advice's cadence included
        for name, column in one.history.steps.arrays().items():
            np.testing.assert_allclose(column, bulk.history.steps.arrays()[name], rtol=1e-12, equal_nan=True)
        assert one.history.loss_at(2995) == bulk.history.loss_at(2995) == 1 / 2990


def test_a_job_groups_its_records_as_a_reader_does():
    """wire.in_blocks, for the job's own model: the same blocks, measured rows and order as the frames read."""
    records = _job()
    read, grouped = _read(records, True, chunk=1 << 30), wire.in_blocks(records)
    assert [len(item) if isinstance(item, StepBlock) else item["k"] for item in read] == \
        [len(item) if isinstance(item, StepBlock) else item["k"] for item in grouped]
    assert _flat(read) == _flat(grouped)
    for ours, theirs in zip(grouped, read):
        if isinstance(ours, StepBlock):
            for column in StepBlock._COLUMNS:
                np.testing.assert_array_equal(getattr(ours, column), getattr(theirs, column))
            assert ours.measured == theirs.measured
    short = [HELLO, *records[2:5], {"k": "scalars", "step": 3, "values": {"x": 1.0}}, ESTIMATOR]
    assert wire.in_blocks(short) == short  # under BULK_MIN steps in a row: records


def test_a_block_that_breaks_the_table_is_read_frame_by_frame():
    records = [HELLO] + [{"k": "step", "step": i, "t": 100.0 + i, "dt": 0.01, "n": 8, "mb": 1, "dropped": 0}
                         for i in range(1, 40)]
    records[20]["t"] = math.inf  # refused, counted; the steps around it stay
    records[30]["step"] = 5  # not advancing: refused
    data = b"".join(map(wire.encode, records))
    reader = wire.FrameReader(blocks=True)
    out = _flat(reader.feed(data))
    assert reader.invalid == 2
    assert [r["step"] for r in out if r["k"] == "step"] == [i for i in range(1, 40) if i not in (20, 30)]
    assert [r["k"] for r in out].count("event") == 1  # the first skip is said


def test_measured_steps_ride_inside_blocks():
    """A step whose only extra is its noise norms stays in its block (a row, and its payload in
    ``measured``); a step with FLOPs or a skipped attempt ends the block."""
    records = _job()
    blocked = _read(records, True, chunk=1 << 20)
    blocks = [item for item in blocked if isinstance(item, StepBlock)]
    measured = [(int(block.step[row]), noise) for block in blocks for row, noise in block.measured]
    assert measured == [(r["step"], r["noise"]) for r in records if r["k"] == "step" and set(r) - wire.STEP_FIXED == {"noise"}]
    loose = [item["step"] for item in blocked if not isinstance(item, StepBlock) and item["k"] == "step"]
    assert loose == [500, 700]  # the skipped attempt and the FLOP count
    assert len(blocks) == 3  # cut at steps 500 and 700 only: batch sizes, scalars and measured steps do not
    halves = blocks[0][5:400]  # slicing keeps the measured rows where they are
    assert [int(halves.step[row]) for row, _ in halves.measured] == [s for s in range(6, 405) if s % 37 == 0]


def test_a_measured_step_out_of_order_is_refused_among_its_block():
    records = [HELLO] + [{"k": "step", "step": i, "t": 100.0 + i, "dt": 0.01, "n": 8, "mb": 2, "dropped": 0}
                         for i in range(1, 40)]
    noise = {"est": "microbatch", "micro": [4, 4], "g": 1, "acc": [2.0, 3.0]}
    records[10]["noise"] = records[25]["noise"] = noise
    records[25]["step"] = 3  # not advancing: refused, counted; its block is read step by step
    reader = wire.FrameReader(blocks=True)
    out = _flat(reader.feed(b"".join(map(wire.encode, records))))
    assert reader.invalid == 1
    steps = [r for r in out if r["k"] == "step"]
    assert [r["step"] for r in steps] == [i for i in range(1, 40) if i != 25]
    assert [r["step"] for r in steps if "noise" in r] == [10]
