"""The record table (bsmon/records.py) drives every check: property-based fuzzing of the whole
record layer (encoder, framing, file and socket readers), round trips of every kind, the v1
format, and the summary sidecar that `bsmon ls` reads instead of the records."""

from __future__ import annotations

import math
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bsmon import records, store, wire
from bsmon.client import Feed
from bsmon.model import SessionModel
from conftest import bsmon_cli

V1_SESSION = Path(__file__).parent / "data" / "v1_session" / "records.bsr"

# -- one valid example of every kind ----------------------------------------------------------

HELLO = {"k": "hello", "v": wire.PROTOCOL_VERSION, "session": "abcd1234", "name": "job", "pid": 7, "t0": 100.0,
         "command": ["python", "train.py"], "host": "h", "user": "u", "unit": "samples", "socket": None,
         "world_size": 1, "rank": 0, "pid_namespace": "pid:[1]", "devices": [], "frameworks": []}
EXAMPLES = {
    "hello": HELLO,
    "attach": {"k": "attach", "v": wire.PROTOCOL_VERSION, "client": "bsmon"},
    "step": {"k": "step", "step": 1, "t": 101.0, "dt": 0.25, "n": 32, "mb": 2, "dropped": 0,
             "ph": [0.001, 0.002, 0.1, 0.25], "busy": 0.2,
             "noise": {"est": "microbatch", "micro": [16, 16], "g": 2, "acc": [1.0, 2.0, 1.5, 3.0],
                       "pre": [0.5, 0.7], "mod": [0.1, 0.2]},
             "flops": {"total": 3.2e10, "dtype": "float32", "tf32": False, "reason": None},
             "skipped": [{"n": 16, "mb": 1, "why": "cleared"}]},
    "scalars": {"k": "scalars", "step": 1, "values": {"loss": 2.5, "lr": 0.001, "diverged": math.nan}},
    "estimator": {"k": "estimator", "name": "microbatch", "reason": None, "groups": ["a", "b"],
                  "covered_fraction": 1.0, "second_moment": False, "precond_reason": "SGD",
                  "modules": ["x"], "module_params": [10]},
    "event": {"k": "event", "t": 101.5, "level": "warning", "msg": "hello", "traceback": "Traceback..."},
    "profile_point": {"k": "profile_point", "batch_size": 8, "step_time_s": 0.1, "samples_per_s": 80.0},
    "profile": {"k": "profile", "profile": {"points": [], "oom_batch": None, "device": "cpu", "stop_reason": "max_batch"}},
    "gpu": {"k": "gpu", "snapshot": {"time": 101.0, "gpus": [], "banner": None, "hint": None}},
    "ranks": {"k": "ranks", "t": 102.0, "world_size": 2, "step": [3, None], "dt": [0.1, None], "dt95": [0.2, None],
              "busy": [0.05, None], "n": [8, None], "since_step": [0.0, None], "since_report": [0.1, None]},
    "branch_check": {"k": "branch_check", "t": 103.0, "step": 5, "samples_seen": 100, "base_batch": 8, "samples": 64,
                     "start_loss": 2.0, "branches": [{"batch_size": 8, "steps": 8, "lr": 0.1, "loss": 1.5,
                                                      "lrs": [0.1], "losses": [1.5]}],
                     "b_crit": 30.0, "b_crit_low": 10.0, "b_crit_high": math.inf, "censored": None,
                     "b_simple": 20.0, "calibrate": False, "confidence": 0.9, "cost_samples": 64, "cost_s": 1.0,
                     "tolerance_loss": 0.01, "within": 8, "interval": None},
    "bye": {"k": "bye", "t": 104.0, "status": "finished", "code": 0, "error": None},
}
NOISE_EXAMPLES = [
    {"est": "per_example", "batch": 32, "pe": [1.0, 2.0], "big": [0.5, 0.25], "pre": [3.0, 0.5],
     "mod_pe": [2.5, 0.5], "mod_big": [0.7, 0.05]},
    {"est": "ddp", "micro": [8, 8], "g": 1, "world": 2, "norms": [1.0, 2.0, 1.5], "pre": [1.0, 2.0, 1.5]},
]


def same(a, b) -> bool:
    """Equal, with NaN equal to NaN and an int equal to the same float (a binary step packs floats)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or isinstance(a, int) == isinstance(b, int):
        return type(a) is type(b) and a == b
    return isinstance(b, (int, float)) and a == b


def test_every_kind_has_an_example_and_every_example_is_valid():
    assert set(EXAMPLES) == set(records.KINDS)
    for example in [*EXAMPLES.values(), *({**EXAMPLES["step"], "noise": n} for n in NOISE_EXAMPLES)]:
        assert records.validate(example) is example


def test_the_docs_show_the_table_as_it_is():
    protocol = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    block = protocol.split("<!-- records table -->\n")[1].split("<!-- end records table -->")[0]
    assert block == records.markdown_table() + "\n", "run `python -m bsmon.records` and paste it into docs/protocol.md"


def _stream() -> list[dict]:
    steps = [{**EXAMPLES["step"], "step": 2, "noise": NOISE_EXAMPLES[0]},
             {**EXAMPLES["step"], "step": 3, "noise": NOISE_EXAMPLES[1]},
             {"k": "step", "step": 4, "t": 105.0, "dt": 0.25, "n": 32, "mb": 2, "dropped": 0}]
    return [*EXAMPLES.values(), *steps]


def test_every_kind_round_trips_through_a_file(tmp_path):
    path = tmp_path / store.RECORDS_FILE
    path.write_bytes(b"".join(map(wire.encode, _stream())))
    read, torn = store.read_records(path)
    assert torn == 0 and same(read, _stream())


def test_every_kind_round_trips_through_a_socket():
    sender, receiver = socket.socketpair()
    data = b"".join(map(wire.encode, _stream()))
    thread = threading.Thread(target=lambda: (sender.sendall(data), sender.close()))
    thread.start()
    reader, received = wire.FrameReader(), []
    while chunk := receiver.recv(97):  # odd reads split frames everywhere
        received += reader.feed(chunk)
    thread.join()
    receiver.close()
    assert same(received, _stream()) and reader.pending == 0


# -- records built from the table, and broken from it -------------------------------------------

def _values(kind) -> st.SearchStrategy:
    """Every value the table accepts for a field type (and, for a list or object, its shape)."""
    if isinstance(kind, records.Int):
        base = st.integers(min_value=kind.min, max_value=2 ** 64 + 5)
    elif isinstance(kind, records.Num):
        base = st.floats(min_value=kind.min, max_value=kind.max, allow_nan=False, allow_infinity=False) \
            | st.integers(min_value=0 if kind.min is not None else None, max_value=10 ** 6)
        if not kind.finite:
            base = base | st.sampled_from([math.nan, math.inf] + ([] if kind.min is not None else [-math.inf]))
        if kind.min is not None and kind.min > 0:
            base = base.filter(lambda v: v >= kind.min)
    elif isinstance(kind, records.Str):
        base = st.sampled_from(kind.choices) if kind.choices else st.text(max_size=8)
    elif isinstance(kind, records.Bool):
        base = st.booleans()
    elif isinstance(kind, records.ListOf):
        size = kind.length if kind.length is not None else None
        base = st.lists(_values(kind.item), min_size=size or kind.min_length, max_size=size or 4)
    elif isinstance(kind, records.MapOf):
        base = st.dictionaries(st.text(max_size=5), _values(kind.value), max_size=3)
    elif isinstance(kind, (records.AnyObj, records.Parsed)):
        base = st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3)
    elif isinstance(kind, records.Obj):
        base = _objects(kind.fields)
    elif isinstance(kind, records.Tagged):
        base = st.one_of([_objects(variant.fields).map(lambda v, tag=tag: {kind.tag: tag, **v})
                          for tag, variant in kind.variants.items()])
    else:
        raise AssertionError(f"no strategy for {kind!r}")
    return base | st.none() if getattr(kind, "null", False) else base


def _objects(fields) -> st.SearchStrategy:
    return st.fixed_dictionaries({f.name: _values(f.type) for f in fields if f.required},
                                 optional={f.name: _values(f.type) for f in fields if not f.required})


def _kind_records(name: str) -> st.SearchStrategy:
    kind = records.KINDS[name]
    strategy = _objects(kind.fields).map(lambda fields: {"k": name, **fields})
    if name == "hello":
        strategy = strategy.map(lambda r: {**r, "v": min(r["v"], wire.PROTOCOL_VERSION)})
    return strategy


def _valid(record) -> bool:
    try:
        records.validate(record)
        return True
    except records.ProtocolError:
        return False


WRONG = st.sampled_from(["x", -1, math.inf, math.nan, None, [], {}, True, 1.5, 2 ** 70])


@st.composite
def broken(draw, record: dict) -> dict:
    """``record`` with one field, at any depth, removed or replaced by something of another type or range."""
    path, node = [], record
    while isinstance(node, (dict, list)) and node and (not path or draw(st.booleans())):
        key = draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node))))
        if node is record and key == "k":
            continue
        path.append(key)
        node = node[key]
    if not path:
        return {**record, "step": "x"} if "step" in record else {**record, "t": "x"}
    copy = _deep_copy(record)
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(WRONG)
    return copy


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


STREAM_KINDS = sorted(set(records.KINDS) - {"hello", "attach"})


@st.composite
def streams(draw) -> tuple[list[dict], list[dict]]:
    """(records sent, the valid ones a reader must keep): table-built records, some broken."""
    sent, kept, step = [], [], 0
    for _ in range(draw(st.integers(0, 12))):
        record = draw(_kind_records(draw(st.sampled_from(STREAM_KINDS))))
        if record["k"] == "step":
            step += 1 + draw(st.integers(0, 2))
            record["step"] = step  # steps advance in a stream; a record that breaks that is refused
        if draw(st.integers(0, 3)) == 0:
            record = draw(broken(record))
        sent.append(record)
        if _valid(record) and not (record["k"] == "step" and kept_steps(kept) and record["step"] <= kept_steps(kept)[-1]):
            kept.append(record)
    return sent, kept


def kept_steps(kept):
    return [r["step"] for r in kept if r["k"] == "step"]


def _frames(sent: list[dict]) -> bytes:
    out = []
    for record in sent:
        try:
            out.append(wire.encode(record))
        except (ValueError, TypeError, OverflowError, RecursionError):
            pass  # the encoder refuses what JSON cannot hold (the probe's publisher turns it into an event)
    return b"".join(out)


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])


@FUZZ
@given(streams())
def test_a_reader_keeps_every_valid_record_and_refuses_the_rest_counted(stream):
    sent, kept = stream
    encodable = [r for r in sent if _encodes(r)]
    kept = [r for r in kept if _encodes(r)]
    reader = wire.FrameReader()
    out = reader.feed(_frames(encodable))
    events = [r for r in out if r["k"] == "event" and r["msg"].startswith("skipped ")]
    assert same([r for r in out if not any(r is e for e in events)], kept)
    assert reader.invalid == len(encodable) - len(kept) and reader.error is None
    assert len(events) == sum(1 for i in range(1, reader.invalid + 1) if math.log10(i).is_integer())
    model = SessionModel()
    model.ingest(EXAMPLES["hello"])
    model.ingest_all(out)  # nothing the reader lets through can raise in the model
    model.stats()


def _encodes(record) -> bool:
    try:
        wire.encode(record)
        return True
    except (ValueError, TypeError, OverflowError, RecursionError):
        return False


@FUZZ
@given(streams(), st.data())
def test_a_cut_or_corrupted_file_gives_a_prefix_and_never_raises(tmp_path_factory, stream, data):
    sent, _ = stream
    whole = _frames([EXAMPLES["hello"], *sent])
    cut = data.draw(st.integers(0, len(whole)))
    damaged = bytearray(whole[:cut])
    if damaged and data.draw(st.booleans()):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path_factory.mktemp("fuzz") / store.RECORDS_FILE
    path.write_bytes(bytes(damaged))
    complete = wire.FrameReader().read(whole)
    got, torn = store.read_records(path)
    prefix = [r for r in got if not (r["k"] == "event" and r["msg"].startswith("skipped "))]
    reference = [r for r in complete if not (r["k"] == "event" and r["msg"].startswith("skipped "))]
    assert torn <= len(damaged)
    if damaged == whole[:cut]:  # torn only: exactly the records of the whole frames
        assert same(prefix, reference[:len(prefix)])
    store.session_info(path.parent)  # listing a damaged session never raises either


@FUZZ
@given(st.binary(max_size=600), st.integers(1, 64))
def test_arbitrary_bytes_never_raise_past_the_reader(data, chunk):
    reader = wire.FrameReader()
    for i in range(0, len(data), chunk):
        reader.read(data[i:i + chunk])
    assert reader.error is not None or reader.pending < wire.HEADER.size + wire.MAX_FRAME_BYTES


def test_a_noise_payload_lacking_a_field_is_refused_not_ingested():
    """The bug of issue 12: it used to pass validation and raise KeyError in SessionModel.ingest."""
    for noise in [{"est": "microbatch", "micro": [8, 8], "g": 1}, {"est": "per_example", "batch": 8, "pe": [1.0]},
                  {"est": "ddp", "micro": [8], "g": 1, "norms": [1.0, 2.0]},
                  {"est": "microbatch", "micro": [8, 8], "g": 1, "acc": [1.0]},
                  {"est": "per_example", "batch": 8, "pe": [1.0], "big": [0.5], "mod_pe": [1.0]},
                  {"est": "per_example", "batch": 8, "pe": [1.0], "big": [0.5], "mod_pe": [1.0], "mod_big": [0.2, 0.3]}]:
        reader = wire.FrameReader()
        out = reader.feed(wire.encode({**EXAMPLES["step"], "noise": noise}))
        assert reader.invalid == 1 and [r["k"] for r in out] == ["event"], noise


# -- the v1 format ------------------------------------------------------------------------------

def test_a_v1_session_replays_lists_and_exports(bsmon_home, tmp_path):
    directory = store.sessions_dir(bsmon_home) / "3747c03a"
    directory.mkdir(parents=True)
    shutil.copy(V1_SESSION, directory / store.RECORDS_FILE)
    records_, torn = store.read_records(directory / store.RECORDS_FILE)
    assert torn == 0 and records_[0]["v"] == 1 and sum(r["k"] == "step" for r in records_) == 40
    assert all(r["k"] != "event" for r in records_)  # every v1 record is valid under the v2 table
    info = store.session_info(directory)
    assert (info.status, info.steps, info.exit_code) == ("finished", 40, None)
    feed = Feed().replay(info)
    stats = feed.model.stats()
    assert feed.state == "replay" and stats.step == 40 and stats.b_simple is not None
    out = tmp_path / "v1.csv"
    assert bsmon_cli("export", "3747c03a", "-o", str(out)).returncode == 0
    assert len(out.read_text().splitlines()) == 41  # the header and the 40 steps
    listing = bsmon_cli("ls").stdout
    assert "3747c03a" in listing and "finished" in listing


def test_a_monitor_of_another_version_is_told_so(bsmon_home):
    """A v1 monitor gets the job's hello, which its own reader refuses naming both versions."""
    import torch
    from torch import nn

    import bsmon
    model = nn.Linear(2, 1)
    monitor = bsmon.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), noise=None)
    try:
        info = store.resolve_session(monitor.session_id)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(info.socket)
        sock.sendall(wire.encode({"k": "attach", "v": 1, "client": "old"}))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
        [hello] = wire.FrameReader().feed(data)  # the hello alone, then the job closes the connection
        assert hello["k"] == "hello" and hello["v"] == wire.PROTOCOL_VERSION == 2
    finally:
        monitor.close()


# -- the summary sidecar ------------------------------------------------------------------------

def _steps(first: int, last: int, t0: float = 100.0) -> list[dict]:
    return [{"k": "step", "step": i, "t": t0 + i, "dt": 0.1, "n": 8, "mb": 1, "dropped": 0,
             "ph": [0.0, 0.01, 0.05, 0.1]} for i in range(first, last + 1)]


def _session(home: Path, steps: int, *, bye: bool = True, summary: dict | None = None) -> Path:
    directory = store.sessions_dir(home) / HELLO["session"]
    directory.mkdir(parents=True)
    frames = b"".join(map(wire.encode, [HELLO, *_steps(1, steps)]))
    if bye:
        frames += wire.encode({**EXAMPLES["bye"], "t": 200.0 + steps})
    (directory / store.RECORDS_FILE).write_bytes(frames)
    if summary is not None:
        store.write_summary(directory, summary)
    return directory


def _summary(**fields) -> dict:
    return {"session": HELLO["session"], "steps": 0, "samples": 0, "status": "running", "t": None, "bytes": 0,
            "code": None, **fields}


class CountingReads:
    """Bytes read from records.bsr (what listing costs)."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        real_open = open

        def counting_open(path, mode="r", *args, **kwargs):
            handle = real_open(path, mode, *args, **kwargs)
            if str(path).endswith(store.RECORDS_FILE) and "b" in mode:
                read = handle.read

                def counted(*a):
                    data = read(*a)
                    self.bytes += len(data)
                    return data
                handle.read = counted
            return handle
        monkeypatch.setattr("builtins.open", counting_open)


def test_listing_reads_the_hello_and_the_summary_not_the_records(bsmon_home, monkeypatch):
    directory = _session(bsmon_home, 20000)
    size = (directory / store.RECORDS_FILE).stat().st_size
    store.write_summary(directory, _summary(steps=20000, samples=160000, status="finished", t=20200.0,
                                            bytes=size, code=0, b_opt=None, b_simple=12.5, unit="samples"))
    reads = CountingReads(monkeypatch)
    [info] = store.list_sessions()
    assert (info.status, info.steps, info.exit_code, info.torn_bytes) == ("finished", 20000, 0, 0)
    assert info.figures == store.Figures(None, 12.5, "samples")
    assert reads.bytes < 1000 < size  # the hello frame only


@pytest.mark.parametrize("state", ["missing", "stale", "foreign", "corrupt", "torn"])
def test_without_a_usable_summary_listing_reads_only_the_tail(bsmon_home, monkeypatch, state):
    directory = _session(bsmon_home, 20000, bye=state != "torn")
    path = directory / store.RECORDS_FILE
    if state == "torn":  # killed mid-write: no bye, half a frame
        with open(path, "ab") as handle:
            handle.write(wire.encode(_steps(20001, 20001)[0])[:-7])
    if state == "stale":  # the summary of a job that crashed a while later
        store.write_summary(directory, _summary(steps=5, samples=40, bytes=800))
    elif state == "foreign":
        store.write_summary(directory, _summary(session="other", steps=5, bytes=800))
    elif state == "corrupt":
        (directory / store.SUMMARY_FILE).write_text('{"session": "abcd1234", "steps": ')
    size = path.stat().st_size
    reads = CountingReads(monkeypatch)
    [info] = store.list_sessions()
    assert info.steps == 20000
    if state == "torn":
        assert (info.status, info.torn_bytes) == ("lost", wire.PLAIN_STEP_FRAME - 7)
    else:
        assert (info.status, info.exit_code, info.torn_bytes) == ("finished", 0, 0)
    assert info.figures is None
    assert reads.bytes <= store.TAIL_BYTES[0] + 1000 < size / 10


def test_records_after_the_summary_are_read_from_where_it_ends(bsmon_home, monkeypatch):
    """A running job rewrites its summary about once a second: the last second is read from the file."""
    directory = _session(bsmon_home, 1000, bye=False)
    covered = len(wire.encode(HELLO)) + 990 * wire.PLAIN_STEP_FRAME
    store.write_summary(directory, _summary(steps=990, samples=7920, bytes=covered))
    reads = CountingReads(monkeypatch)
    [info] = store.list_sessions()
    assert (info.steps, info.status) == (1000, "lost")  # no bye, nobody on the socket
    assert reads.bytes < 3000


def test_a_crash_while_writing_the_summary_leaves_the_old_one(bsmon_home, monkeypatch):
    directory = _session(bsmon_home, 10, summary=_summary(steps=3, bytes=200))
    before = (directory / store.SUMMARY_FILE).read_text()

    def crash(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", crash)
    assert not store.write_summary(directory, _summary(steps=10, bytes=300))
    assert (directory / store.SUMMARY_FILE).read_text() == before
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_the_job_keeps_its_summary_current_and_final(bsmon_home):
    import torch
    from torch import nn

    import bsmon
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    monitor = bsmon.watch(model, optimizer, noise=None)
    directory = store.sessions_dir(bsmon_home) / monitor.session_id
    for _ in range(30):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
    monitor.close()
    summary = store.read_summary(directory)
    assert summary["bytes"] == (directory / store.RECORDS_FILE).stat().st_size
    assert (summary["steps"], summary["samples"], summary["status"], summary["code"]) == (30, 240, "finished", None)
    assert summary["unit"] == "samples" and "b_opt" in summary
    assert oct((directory / store.SUMMARY_FILE).stat().st_mode & 0o777) == "0o600"
    info = store.session_info(directory)
    assert (info.steps, info.status) == (30, "finished") and info.figures is not None
