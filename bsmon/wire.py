"""The bsmon protocol: framing, the binary step frame, and decoding with validation.

One format serves the socket and the session file, so replay reads exactly the
bytes a live monitor saw. A frame is::

    uint32 big-endian payload length | uint32 big-endian CRC32 of payload | payload

The payload is either a UTF-8 JSON object whose ``"k"`` names the record kind, or (protocol
v2) a binary step: :data:`STEP` packs the fixed fields of a step record, the most frequent by
far, and a JSON tail carries its rare extras (noise norms, FLOPs, skipped attempts). Packing a
plain step costs the training thread about a third of what ``json.dumps`` did, and a monitor
decodes a run of plain steps in bulk with numpy (docs/design.md has the figures).
docs/protocol.md lays out every byte.

Every record received or read is checked against the table in :mod:`bsmon.records`.
A record that breaks it (wrong type, out of range, a missing nested field) is skipped: the
reader counts it in ``invalid`` and says so in an ``event`` record it adds to the stream, and
the stream goes on. A frame that breaks the framing (a length over the cap, a checksum that
does not match, a hello of an unreadable protocol version) means the bytes that follow cannot
be trusted: a socket closes that one connection, a file reader stops there (a torn tail).
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from typing import Any

# PROTOCOL_VERSION and validate are used as wire.PROTOCOL_VERSION and wire.validate: the protocol's face.
from bsmon.records import PROTOCOL_VERSION, InvalidRecord, ProtocolError, validate  # noqa: F401

MAX_FRAME_BYTES = 1 << 20
HEADER = struct.Struct(">II")

#: The first payload byte of a binary step frame (a JSON payload starts with "{").
STEP_TAG = 0x01
#: tag, flags, reserved, mb, step, t, dt, n, dropped, ph[4]; little-endian, 8-byte aligned.
STEP = struct.Struct("<BBHIQddQQdddd")
#: Flags of a binary step: which optional parts it carries.
HAS_PH = 0x01
HAS_TAIL = 0x02
#: The fields a binary step packs; all others go to its JSON tail.
STEP_FIXED = frozenset(("k", "step", "t", "dt", "n", "mb", "dropped", "ph"))
_NO_PH = (math.nan,) * 4

#: Built once: json.dumps with non-default separators builds an encoder per call, a third of
#: the cost of a small record, paid on the training thread for every step.
_JSON = json.JSONEncoder(separators=(",", ":"))


def encode(record: dict[str, Any]) -> bytes:
    """One record as a frame: a step as a binary step frame, any other record as JSON.

    A step whose fixed fields do not pack (a negative count, a value of the wrong type) is
    written as JSON instead, so the reader sees it and refuses it, counted. Non-finite floats
    in JSON are written as NaN/Infinity.
    """
    payload = _step_payload(record) if record.get("k") == "step" else None
    if payload is None:
        payload = _JSON.encode(record).encode()
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"record of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _step_payload(record: dict[str, Any]) -> bytes | None:
    """A step's binary payload; None when its fixed fields are not of the types the layout holds
    (struct would take a bool for an int, or an int for a float, and the reader would accept it)."""
    try:
        mb, step, t, dt, n, dropped = (record["mb"], record["step"], record["t"], record["dt"], record["n"],
                                       record["dropped"])
    except KeyError:
        return None
    ph = record.get("ph")
    if not (type(mb) is type(step) is type(n) is type(dropped) is int and type(t) in _REAL and type(dt) in _REAL
            and (ph is None or (type(ph) is list and len(ph) == 4 and type(ph[0]) in _REAL and type(ph[1]) in _REAL
                                and type(ph[2]) in _REAL and type(ph[3]) in _REAL))):
        return None
    plain = len(record) == (7 if ph is None and "ph" not in record else 8)
    tail = b"" if plain else _JSON.encode({k: v for k, v in record.items() if k not in STEP_FIXED}).encode()
    try:
        return STEP.pack(STEP_TAG, (HAS_PH if ph is not None else 0) | (HAS_TAIL if tail else 0), 0,
                         mb, step, t, dt, n, dropped, *(_NO_PH if ph is None else ph)) + tail
    except (struct.error, OverflowError):
        return None  # a count out of the layout's range: JSON, and the reader says what is wrong


_REAL = frozenset((float, int))


def _decode_step(payload: bytes) -> dict[str, Any]:
    if len(payload) < STEP.size:
        raise InvalidRecord(f"binary step of {len(payload)} bytes, shorter than its {STEP.size}-byte header")
    _, flags, _, mb, step, t, dt, n, dropped, *ph = STEP.unpack_from(payload)
    if flags & ~(HAS_PH | HAS_TAIL):
        raise InvalidRecord(f"binary step with unknown flags {flags:#x} (a newer bsmon wrote it)")
    record = {"k": "step", "step": step, "t": t, "dt": dt, "n": n, "mb": mb, "dropped": dropped}
    if flags & HAS_PH:
        record["ph"] = ph
    if flags & HAS_TAIL:
        extras = _json(payload[STEP.size:])
        if not isinstance(extras, dict) or STEP_FIXED.intersection(extras):
            raise InvalidRecord("binary step's tail is not an object of extra fields")
        record.update(extras)
    elif len(payload) != STEP.size:
        raise InvalidRecord("binary step with trailing bytes and no tail flag")
    return record


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRecord(f"payload is not JSON: {exc}") from None


def decode_payload(payload: bytes) -> dict[str, Any]:
    """One frame's payload as a validated record; InvalidRecord, or ProtocolError for an unreadable hello."""
    record = _decode_step(payload) if payload[:1] == b"\x01" else _json(payload)
    return validate(record)


#: Frame bytes of a binary step without a tail, the layout a run of plain steps shares.
PLAIN_STEP_FRAME = HEADER.size + STEP.size
#: A run of plain steps shorter than this is decoded one by one (numpy's set-up would cost more).
BULK_MIN = 4
BULK_MAX = 8192


class FrameReader:
    """Incremental decoder for a byte stream of frames (socket or file).

    ``invalid`` counts the well-framed records skipped because they broke the record table;
    each skip at a count of 1, 10, 100, ... also adds an ``event`` record to the output, so a
    view shows it. ``error`` is the framing error that stopped the stream, if any; ``consumed``
    counts the bytes of whole frames taken. Steps must advance: a step record whose number is
    not above the previous one's is skipped too.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.invalid = 0
        self.error: ProtocolError | None = None
        self.consumed = 0
        self._last_step = -1
        self._last_t = 0.0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes and return every complete record; raise ProtocolError on a framing error."""
        records = self.read(data)
        if self.error is not None:
            raise self.error
        return records

    def read(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes and return every complete record; never raises.

        After a framing error (``error``) the rest of the stream is not decoded.
        """
        if self.error is not None:
            return []
        self._buf += data
        out: list[dict[str, Any]] = []
        buf, pos, size = self._buf, 0, len(self._buf)
        while size - pos >= HEADER.size:
            length, crc = HEADER.unpack_from(buf, pos)
            if length > MAX_FRAME_BYTES:
                self.error = ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
                break
            end = pos + HEADER.size + length
            if end > size:
                break
            if length == STEP.size and self._plain_step_at(end, size):
                run_end = self._read_plain_steps(pos, size, out)
                if run_end > pos:
                    pos = run_end
                    continue
            payload = bytes(buf[pos + HEADER.size:end])
            if zlib.crc32(payload) != crc:
                self.error = ProtocolError("frame checksum mismatch")
                break
            try:
                record = decode_payload(payload)
                if record["k"] == "step":
                    self._advance(record["step"])
            except InvalidRecord as exc:
                self._skip(str(exc), out)
            except ProtocolError as exc:
                self.error = exc
                break
            else:
                out.append(record)
            pos = end
        del buf[:pos]
        self.consumed += pos
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buf)

    def _advance(self, step: int) -> None:
        if step <= self._last_step:
            raise InvalidRecord(f"step {step} after step {self._last_step}: steps must advance")
        self._last_step = step

    def _skip(self, why: str, out: list[dict[str, Any]]) -> None:
        """Count a refused record; say so at the 1st, 10th, 100th, ... (a view shows events)."""
        self.invalid += 1
        if math.log10(self.invalid).is_integer():
            last_t = next((r["t"] for r in reversed(out) if isinstance(r.get("t"), float)), None)
            self._last_t = last_t if last_t is not None else self._last_t or time.time()
            out.append({"k": "event", "t": self._last_t, "level": "warning",
                        "msg": f"skipped {self.invalid} invalid record{'s' if self.invalid > 1 else ''} so far "
                               f"(the latest: {why}); the session goes on without them"})

    def _plain_step_at(self, second: int, size: int) -> bool:
        """Whether the frame at ``second - PLAIN_STEP_FRAME`` and the one after it are plain binary steps."""
        first = second - STEP.size
        return (size - second >= PLAIN_STEP_FRAME and self._buf[first] == STEP_TAG
                and self._buf[first + 1] & ~HAS_PH == 0
                and self._buf[second:second + HEADER.size - 4] == _PLAIN_LENGTH
                and self._buf[second + HEADER.size] == STEP_TAG and self._buf[second + HEADER.size + 1] & ~HAS_PH == 0)

    def _read_plain_steps(self, pos: int, size: int, out: list[dict[str, Any]]) -> int:
        """Decode the run of plain binary steps at ``pos`` with numpy; returns where it ended.

        The run ends before the first frame that is not a plain step, fails its checksum, or
        breaks the table (a time not finite, a step not advancing): the frame-by-frame path
        deals with that one.
        """
        import numpy as np  # the monitor side only: the probe encodes, it never decodes

        buf, run, limit = self._buf, 0, min((size - pos) // PLAIN_STEP_FRAME, BULK_MAX)
        with memoryview(buf) as view:
            at = pos
            while run < limit and buf[at:at + 4] == _PLAIN_LENGTH and buf[at + 8] == STEP_TAG \
                    and buf[at + 9] & ~HAS_PH == 0 \
                    and zlib.crc32(view[at + HEADER.size:at + PLAIN_STEP_FRAME]) == HEADER.unpack_from(buf, at)[1]:
                run += 1
                at += PLAIN_STEP_FRAME
        if run < BULK_MIN:
            return pos
        frames = np.frombuffer(buf, _plain_dtype(), run, pos)
        has_ph = (frames["flags"] & HAS_PH) != 0
        step = frames["step"]
        ok = (np.isfinite(frames["t"]) & (frames["t"] >= 0) & np.isfinite(frames["dt"]) & (frames["dt"] >= 0)
              & (np.isfinite(frames["ph"]).all(axis=1) | ~has_ph) & (step < (1 << 63)))
        ok[1:] &= step[1:] > step[:-1]
        ok[0] &= int(step[0]) > self._last_step
        run = run if ok.all() else int(ok.argmin())
        if run < BULK_MIN:
            return pos
        frames, has_ph = frames[:run], has_ph[:run].tolist()
        columns = (frames["step"].tolist(), frames["t"].tolist(), frames["dt"].tolist(), frames["n"].tolist(),
                   frames["mb"].tolist(), frames["dropped"].tolist(), frames["ph"].tolist())
        del frames, step  # numpy views of the buffer, which read() resizes next
        for step_, t, dt, n, mb, dropped, ph, with_ph in zip(*columns, has_ph):
            record = {"k": "step", "step": step_, "t": t, "dt": dt, "n": n, "mb": mb, "dropped": dropped}
            if with_ph:
                record["ph"] = ph
            out.append(record)
        self._last_step = columns[0][-1]
        return pos + run * PLAIN_STEP_FRAME


_PLAIN_LENGTH = STEP.size.to_bytes(4, "big")
_PLAIN_DTYPE = None


def _plain_dtype():
    """The numpy layout of a plain binary step frame: the header, then :data:`STEP`."""
    global _PLAIN_DTYPE
    if _PLAIN_DTYPE is None:
        import numpy as np
        _PLAIN_DTYPE = np.dtype([("len", ">u4"), ("crc", ">u4"), ("tag", "u1"), ("flags", "u1"), ("reserved", "<u2"),
                                 ("mb", "<u4"), ("step", "<u8"), ("t", "<f8"), ("dt", "<f8"), ("n", "<u8"),
                                 ("dropped", "<u8"), ("ph", "<f8", (4,))])
        assert _PLAIN_DTYPE.itemsize == PLAIN_STEP_FRAME
    return _PLAIN_DTYPE
