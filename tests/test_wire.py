import json
import math
import re
import struct
import zlib

import pytest

from bsmon import wire


def _step(step=1, **extra):
    return {"k": "step", "step": step, "t": 1.5, "dt": 0.01, "n": 32, "mb": 2, "dropped": 0, **extra}


def test_round_trip_in_arbitrary_chunks():
    records = [_step(i, **({"ph": [0.001, 0.002, 0.003, 0.01]} if i % 2 else {})) for i in range(1, 50)]
    records[10]["noise"] = {"est": "microbatch", "micro": [16, 16], "g": 1, "acc": [1.0, 2.5]}
    records[20]["busy"] = 0.005
    data = b"".join(wire.encode(r) for r in records)
    reader = wire.FrameReader()
    out = []
    for i in range(0, len(data), 7):  # frames split across reads at every possible place
        out += reader.feed(data[i:i + 7])
    assert out == records
    assert reader.pending == 0 and reader.invalid == 0


def test_a_step_is_a_binary_frame_and_extras_ride_in_its_tail():
    plain = wire.encode(_step(7, ph=[0.1, 0.2, 0.3, 0.4]))
    assert len(plain) == wire.PLAIN_STEP_FRAME == 88 and plain[8] == wire.STEP_TAG
    fields = wire.STEP.unpack_from(plain, 8)
    assert fields[:9] == (wire.STEP_TAG, wire.HAS_PH, 0, 2, 7, 1.5, 0.01, 32, 0) and fields[9:] == (0.1, 0.2, 0.3, 0.4)
    noisy = wire.encode(_step(8, skipped=[{"n": 4, "mb": 1, "why": "cleared"}]))
    assert noisy[9] == wire.HAS_TAIL and noisy[8 + wire.STEP.size:] == b'{"skipped":[{"n":4,"mb":1,"why":"cleared"}]}'
    assert wire.FrameReader().feed(noisy) == [_step(8, skipped=[{"n": 4, "mb": 1, "why": "cleared"}])]


def test_a_step_that_does_not_pack_is_sent_as_json_and_refused_on_reading():
    frame = wire.encode(_step(3, n=-8))  # a negative count does not fit the binary layout
    assert frame[8:9] == b"{"
    reader = wire.FrameReader()
    [event] = reader.feed(frame)
    assert reader.invalid == 1 and event["k"] == "event" and "step.n is -8, not an int >= 0" in event["msg"]


def test_bulk_decoding_equals_frame_by_frame_decoding():
    records = [_step(i, ph=[0.0, 0.001 * i, 0.002, 0.003]) for i in range(1, 3000)]
    records[1000]["noise"] = {"est": "per_example", "batch": 32, "pe": [1.0], "big": [0.5]}
    records[2000]["t"] = math.inf  # refused in the middle of a run; the run goes on after it
    data = b"".join(wire.encode(r) for r in records)
    bulk = wire.FrameReader()
    bulk_out = bulk.feed(data)
    single = wire.FrameReader()
    single_out = [r for i in range(0, len(data), wire.PLAIN_STEP_FRAME) for r in single.feed(data[i:i + wire.PLAIN_STEP_FRAME])]
    expected = records[:2000] + records[2001:]
    assert [r for r in bulk_out if r["k"] == "step"] == expected
    assert [r for r in single_out if r["k"] == "step"] == expected
    assert bulk.invalid == single.invalid == 1


def _frame(payload: bytes, crc=None, length=None):
    return struct.pack(">II", len(payload) if length is None else length,
                       zlib.crc32(payload) if crc is None else crc) + payload


@pytest.mark.parametrize("frame, message", [
    (_frame(b"x" * 10, length=wire.MAX_FRAME_BYTES + 1), "exceeds"),
    (_frame(b'{"k":"step"}', crc=123), "checksum"),
    (_frame(b'{"k":"hello","v":99,"session":"s","name":"n","pid":1,"t0":0,"command":[],"host":"h","user":"u",'
            b'"unit":"samples"}'), "protocol v99.*upgrade bsmon"),
])
def test_framing_errors_end_the_stream(frame, message):
    reader = wire.FrameReader()
    with pytest.raises(wire.ProtocolError, match=message):
        reader.feed(frame + wire.encode(_step()))
    assert reader.read(wire.encode(_step(2))) == []  # nothing after it is trusted


@pytest.mark.parametrize("frame, message", [
    (_frame(b"\xff\xfe not json"), "not JSON"),
    (_frame(b"[1, 2]"), "not an object"),
    (_frame(b'{"k":"rm -rf"}'), "unknown record kind"),
    (_frame(b'{"k":"step","step":1}'), "step lacks field 't'"),
    (_frame(b'{"k":"step","step":"1","t":1,"dt":1,"n":1,"mb":1,"dropped":0}'), "step.step is '1'"),
    (_frame(b'{"k":"step","step":true,"t":1,"dt":1,"n":1,"mb":1,"dropped":0}'), "step.step is True"),
    (_frame(b'{"k":"step","step":-1,"t":1,"dt":1,"n":1,"mb":1,"dropped":0}'), "step.step is -1, not an int >= 0"),
    (_frame(b'{"k":"step","step":1,"t":1,"dt":Infinity,"n":1,"mb":1,"dropped":0}'), "step.dt is inf, not a finite"),
    (_frame(b'{"k":"scalars","step":1,"values":{"loss":"high"}}'), "scalars.values\\['loss'\\]"),
    (_frame(b'{"k":"hello","v":2,"session":"s","name":"n","pid":1,"t0":0,"command":[],"host":"h","user":"u",'
            b'"unit":"samples","pid_namespace":4026531836}'), "hello.pid_namespace is 4026531836"),
    (_frame(b'{"k":"step","step":1,"t":1,"dt":1,"n":1,"mb":1,"dropped":0,"skipped":3}'), "step.skipped is 3"),
    (_frame(b'{"k":"step","step":1,"t":1,"dt":1,"n":1,"mb":1,"dropped":0,"skipped":[{"n":1,"mb":1,"why":"?"}]}'),
     r"step.skipped\[0\].why"),
    (_frame(b'{"k":"step","step":1,"t":1,"dt":1,"n":1,"mb":1,"dropped":0,"noise":{"est":"microbatch","micro":[1],'
            b'"g":1}}'), "step.noise lacks field 'acc'"),
    (_frame(b"\x01\x00"), "binary step of 2 bytes"),
])
def test_invalid_records_are_skipped_counted_and_shown(frame, message):
    reader = wire.FrameReader()
    records = reader.feed(wire.encode(_step(1)) + frame + wire.encode(_step(2)))
    assert reader.invalid == 1 and reader.error is None
    assert [r["k"] for r in records] == ["step", "event", "step"]
    assert records[1]["level"] == "warning"
    assert records[1]["msg"].startswith("skipped 1 invalid record so far")
    assert re.search(message, records[1]["msg"]), records[1]["msg"]


def test_steps_must_advance_and_skips_are_reported_at_powers_of_ten():
    reader = wire.FrameReader()
    records = reader.feed(b"".join(wire.encode(_step(s)) for s in [1, 2, 3] + [2] * 12 + [4]))
    assert [r["step"] for r in records if r["k"] == "step"] == [1, 2, 3, 4]
    events = [r["msg"] for r in records if r["k"] == "event"]
    assert reader.invalid == 12 and len(events) == 2
    assert events[0].startswith("skipped 1 invalid record") and events[1].startswith("skipped 10 invalid records")
    assert "step 2 after step 3" in events[0]


def test_encode_refuses_oversized_records():
    with pytest.raises(wire.ProtocolError):
        wire.encode({"k": "event", "t": 0, "level": "info", "msg": "x" * (wire.MAX_FRAME_BYTES + 10)})


@pytest.mark.parametrize("payload", [b'{"k":"scalars","step":3,"values":{"loss":NaN,"lr":Infinity}}', b' {"a": 1} ',
                                     b'{"a": 1}{"b": 2}', b'{"a": 1', b"[1, 2]", b"", b"1", '{"é":"ü"}'.encode(),
                                     '{"a":1}'.encode("utf-16"), b'\xef\xbb\xbf{"a": 1}', b'{"a": "\xff"}'])
def test_payload_json_reads_as_json_loads(payload):
    """The fast path of reading a payload's JSON gives what json.loads gives, or its error."""
    try:
        expected = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        with pytest.raises(wire.InvalidRecord, match=re.escape(f"payload is not JSON: {exc}")):
            wire._json(payload)
    else:
        assert repr(wire._json(payload)) == repr(expected)
