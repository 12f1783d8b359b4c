"""The export's fast paths against plain ground truth: every cell as repr / int / datetime write
it, cell by cell; the first pass (steps left undecoded) against the reader's records."""

from __future__ import annotations

import datetime
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from bsmon import export, store, wire
from tests.test_records import EXAMPLES, FUZZ, _frames, streams

EDGES = [0.0, -0.0, 1e-4, -1e-4, 9.999999999999999e-05, 1e16, 9999999999999998.0, 1e15, 5e-324, 2.2250738585072014e-308,
         1.7976931348623157e308, 0.1, 1 / 3, 123456789012.0, 1.0, 100.0, math.inf, -math.inf, math.nan]


def _floats(count: int, seed: int = 0) -> np.ndarray:
    """Doubles of every exponent (random bit patterns) and of the ranges an export holds, and the edges."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 63, count, dtype=np.int64).view(np.float64)
    scaled = rng.random(count) * 10.0 ** rng.integers(-8, 20, count)
    negative = rng.random(count) < 0.5
    return np.concatenate([np.where(negative, -bits, bits), np.where(negative, -scaled, scaled), EDGES])


def _cell(value: float, kind: str) -> str:
    """One cell, as the CSV has always written it (docs/csv.md)."""
    if kind == export._TIME:
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (epoch + datetime.timedelta(milliseconds=value)).isoformat(timespec="milliseconds")
    if value != value:
        return ""
    return str(int(value)) if kind == export._INTEGER else repr(value)


def test_floats_are_written_as_repr_writes_them():
    values = _floats(200_000)
    assert export._cells(values, export._FLOAT) == [_cell(v, export._FLOAT) for v in values.tolist()]


def test_whole_numbers_are_written_without_a_point_and_missing_ones_empty():
    values = np.array([0.0, 1.0, -3.0, 2.0 ** 53, math.nan, 123456789.0, 2.0 ** 63 - 1024])
    assert export._cells(values, export._INTEGER) == [_cell(v, export._INTEGER) for v in values.tolist()]
    huge = np.array([2.0 ** 63, 1e19, math.nan, 7.0])  # past int64: Python's ints
    assert export._cells(huge, export._INTEGER) == ["9223372036854775808", "10000000000000000000", "", "7"]
    sizes = np.array([8, 8, 16], dtype=np.int64)  # world_size without a ranks record is an int column
    assert export._cells(sizes, export._INTEGER) == ["8", "8", "16"]


def test_times_are_iso_8601_utc_to_the_millisecond():
    rng = np.random.default_rng(1)
    ms = np.concatenate([1_796_298_835_232 + np.cumsum(rng.integers(0, 3, 5000)),  # a step a millisecond or so
                         rng.integers(-2_000_000_000_000, 32_000_000_000_000, 5000),  # 1906 to 2984
                         [0, -1, 999, 1000, -1000, -999]]).astype(np.int64)
    assert export._cells(ms, export._TIME) == [_cell(v, export._TIME) for v in ms.tolist()]


def test_a_block_of_rows_is_its_cells_joined():
    """Columns that change at few rows (grouped, formatted once per run), at every row, and in
    between; NaN runs, 0.0 next to -0.0 (equal numbers, different cells), a time column."""
    rng = np.random.default_rng(2)
    n = 4096
    varied = _floats(n, seed=3)[:n]

    def runs(values: np.ndarray, share: float) -> np.ndarray:
        """values[0], changing to the next value at about ``share`` of the rows."""
        return values[np.cumsum(rng.random(n) < share) % len(values)]

    block = [np.arange(1, n + 1, dtype=float),
             1_796_298_835_232 + np.cumsum(rng.integers(0, 2, n)),
             varied,
             runs(np.array([8.0, 16.0]), 0.001),
             runs(np.array([math.nan, 0.25, math.nan, 0.5]), 0.2),
             runs(np.array([0.0, -0.0, 1e-7, math.inf, 3.0]), 0.05),
             runs(varied, 0.01),
             runs(varied, 0.3),
             np.full(n, math.nan),
             runs(np.array([1.0, math.nan, 2.0 ** 70]), 0.02),
             np.full(n, 4, dtype=np.int64)]
    kinds = [export._INTEGER, export._TIME, export._FLOAT, export._INTEGER, export._FLOAT, export._FLOAT,
             export._FLOAT, export._FLOAT, export._FLOAT, export._INTEGER, export._INTEGER]
    cells = [[_cell(v, kind) for v in column.tolist()] for column, kind in zip(block, kinds)]
    expected = "".join(",".join(row) + "\n" for row in zip(*cells))
    assert export._text(block, kinds) == expected
    for rows in (1, 2, 5):  # a short last block
        short = [column[:rows] for column in block]
        assert export._text(short, kinds) == "".join(expected.splitlines(keepends=True)[:rows])


def _reader_records(path, **options) -> list[dict]:
    """What store.iter_record_batches reads, less steps and its own events about refused records."""
    return [r for batch in store.iter_record_batches(path, **options) for r in batch
            if r["k"] != "step" and not (r["k"] == "event" and r["msg"].startswith("skipped "))]


@FUZZ
@given(streams(), st.data())
def test_the_first_pass_reads_the_records_the_reader_reads(tmp_path_factory, stream, data):
    """Reading past the steps undecoded keeps every other record the reader keeps, in order, up
    to the same stop, in a torn or corrupted file; and the header's names are those of the valid
    scalars records, in first-seen order, whatever the invalid ones name."""
    sent, _ = stream
    named = [{"k": "scalars", "step": 3, "values": {"loss": 1.0, "lr": 0.1}},
             {"k": "scalars", "step": -1, "values": {"refused": 1.0}},  # invalid: its name is not a column
             {"k": "scalars", "step": 4, "values": {"loss": "high"}}]  # invalid, known name
    records = [EXAMPLES["hello"], *data.draw(st.permutations(sent + named))]
    whole = _frames(records)
    damaged = bytearray(whole[:data.draw(st.integers(0, len(whole)))])
    if damaged and data.draw(st.booleans()):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path_factory.mktemp("first-pass") / store.RECORDS_FILE
    path.write_bytes(bytes(damaged))
    expected = _reader_records(path)
    assert _reader_records(path, steps=False) == expected
    names = {name: None for record in expected if record["k"] == "scalars" for name in record["values"]}
    assert list(export.scan(path.parent).scalar_names) == list(names)


def test_reading_past_the_steps_stops_where_the_reader_stops():
    hello = wire.encode(EXAMPLES["hello"])
    step = wire.encode({"k": "step", "step": 1, "t": 1.0, "dt": 0.1, "n": 8, "mb": 1, "dropped": 0})
    scalars = wire.encode({"k": "scalars", "step": 1, "values": {"loss": 1.0}})
    bad = bytearray(step)
    bad[-1] ^= 1
    oversize = wire.HEADER.pack(wire.MAX_FRAME_BYTES + 1, 0)
    for data, kinds, taken, error in ((hello + step + scalars + step[:10], ["hello", "scalars"], len(hello + step + scalars), None),
                                      (hello + bytes(bad) + scalars, ["hello"], len(hello), "checksum"),
                                      (hello + oversize + scalars, ["hello"], len(hello), "exceeds")):
        for steps in (True, False):
            reader = wire.FrameReader(steps=steps)
            got = [r["k"] for r in reader.read(data)]
            assert got == (kinds[:1] + ["step"] + kinds[1:] if steps and taken > len(hello) else kinds)
            assert reader.consumed == taken  # a torn frame waits for its rest
            assert reader.error is None if error is None else error in str(reader.error)


def test_the_summary_stands_in_for_the_first_pass_only_when_it_covers_the_file_and_no_lookups(tmp_path):
    """A finished job's summary names what it logged, in order: the export then skips the first pass."""
    import torch

    import bsmon

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with bsmon.watch(model, optimizer) as monitor:
        for step in range(40):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.log(loss=1.0 / (step + 1), **({"lr": 0.1} if step >= 20 else {}), **({"acc": 0.5} if step == 30 else {}))
    info = store.resolve_session(monitor.session_id)
    summary = store.read_summary(info.directory)
    assert summary["scalars"] == ["loss", "lr", "acc"] and summary["lookups"] == 0
    from_summary = export.scan(info)
    summary_file = info.directory / store.SUMMARY_FILE
    summary_file.unlink()
    scanned = export.scan(info)
    assert list(from_summary.scalar_names) == list(scanned.scalar_names) == ["loss", "lr", "acc"]
    assert from_summary.hello == scanned.hello
    # a summary that says a row looks something up later, or covers less than the file, is not used
    for bytes_, lookups, used in ((summary["bytes"], 0, True), (summary["bytes"], 1, False), (summary["bytes"] - 1, 0, False)):
        store.write_summary(info.directory, {**summary, "scalars": ["other"], "lookups": lookups, "bytes": bytes_})
        assert list(export.scan(info).scalar_names) == (["other"] if used else ["loss", "lr", "acc"])
