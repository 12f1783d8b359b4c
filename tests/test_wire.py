import struct
import zlib

import pytest

from bsmon import wire


def _step(step=1):
    return {"k": "step", "step": step, "t": 1.5, "dt": 0.01, "n": 32, "mb": 2, "dropped": 0}


def test_round_trip_in_arbitrary_chunks():
    records = [_step(i) for i in range(1, 50)]
    data = b"".join(wire.encode(r) for r in records)
    reader = wire.FrameReader()
    out = []
    for i in range(0, len(data), 7):  # frames split across reads at every possible place
        out += reader.feed(data[i:i + 7])
    assert out == records
    assert reader.pending == 0


def _frame(payload: bytes, crc=None, length=None):
    return struct.pack(">II", len(payload) if length is None else length,
                       zlib.crc32(payload) if crc is None else crc) + payload


@pytest.mark.parametrize("frame, message", [
    (_frame(b"x" * 10, length=wire.MAX_FRAME_BYTES + 1), "exceeds"),
    (_frame(b'{"k":"step"}', crc=123), "checksum"),
    (_frame(b"\xff\xfe not json"), "not JSON"),
    (_frame(b"[1, 2]"), "not a JSON object"),
    (_frame(b'{"k":"rm -rf"}'), "unknown record kind"),
    (_frame(b'{"k":"step","step":1}'), "lacks field"),
    (_frame(b'{"k":"step","step":"1","t":1,"dt":1,"n":1,"mb":1,"dropped":0}'), "step.step has type str"),
    (_frame(b'{"k":"step","step":true,"t":1,"dt":1,"n":1,"mb":1,"dropped":0}'), "type bool"),
    (_frame(b'{"k":"attach","v":99,"client":"x"}'), "protocol version 99"),
    (_frame(b'{"k":"scalars","step":1,"values":{"loss":"high"}}'), "not a number"),
    (_frame(b'{"k":"hello","v":1,"session":"s","name":"n","pid":1,"t0":0,"command":[],"host":"h","user":"u",'
            b'"unit":"samples","pid_namespace":4026531836}'), "hello.pid_namespace has type int"),
    (_frame(b'{"k":"step","step":1,"t":1,"dt":1,"n":1,"mb":1,"dropped":0,"skipped":3}'), "step.skipped is not a list"),
    (_frame(b'{"k":"step","step":1,"t":1,"dt":1,"n":1,"mb":1,"dropped":0,"skipped":[{"n":1,"mb":1,"why":"?"}]}'),
     "step.skipped holds"),
])
def test_bad_frames_raise_protocol_error(frame, message):
    with pytest.raises(wire.ProtocolError, match=message):
        wire.FrameReader().feed(frame)


def test_iter_frames_stops_at_a_torn_or_corrupt_tail():
    good = b"".join(wire.encode(_step(i)) for i in range(1, 4))
    torn = wire.encode(_step(4))[:-3]
    ends = [end for end, _ in wire.iter_frames(good + torn)]
    assert ends[-1] == len(good) and len(ends) == 3
    corrupt = bytearray(wire.encode(_step(5)))
    corrupt[-2] ^= 0xFF
    assert len(list(wire.iter_frames(good + bytes(corrupt) + good))) == 3


def test_encode_refuses_oversized_records():
    with pytest.raises(wire.ProtocolError):
        wire.encode({"k": "event", "t": 0, "level": "info", "msg": "x" * (wire.MAX_FRAME_BYTES + 10)})
