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
_NOT_PH = ~HAS_PH & 0xFF  # any flag but HAS_PH: not a plain step
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
    """``json.loads(payload)``, at a third of its cost for the usual payload: UTF-8 JSON with
    nothing around it, read by the decoder's scanner directly (anything else takes json.loads,
    which says what is wrong)."""
    try:
        text = payload.decode()
        value, end = _SCAN(text, 0)
        if end == len(text):
            return value
    except (UnicodeDecodeError, StopIteration, json.JSONDecodeError):
        pass
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRecord(f"payload is not JSON: {exc}") from None


#: The standard decoder's scanner: one JSON value from a position in a string (json.loads
#: around it detects the encoding and skips whitespace, most of its cost for a small record).
_SCAN = json.JSONDecoder().scan_once


def decode_payload(payload: bytes) -> dict[str, Any]:
    """One frame's payload as a validated record; InvalidRecord, or ProtocolError for an unreadable hello."""
    record = _decode_step(payload) if payload[:1] == b"\x01" else _json(payload)
    return validate(record)


#: Frame bytes of a binary step without a tail, the layout a run of plain steps shares.
PLAIN_STEP_FRAME = HEADER.size + STEP.size
#: Fewer plain steps than this between other records are decoded one by one (numpy's set-up
#: would cost more).
BULK_MIN = 4
#: Records whose order against the steps around them carries no meaning (``scalars`` name
#: their step): read while plain steps wait for bulk decoding, they follow the steps' block.
ORDER_FREE = frozenset(("scalars",))


class StepBlock:
    """Steps decoded in bulk, as numpy columns: the monitor's fast path (``FrameReader(blocks=True)``;
    ``SessionModel`` ingests a block whole). ``ph`` is NaN where a step has no phase marks.

    Most rows are plain steps (the binary layout, no tail). A measured step, whose tail carries
    only the probe's ``noise`` payload (a few in a hundred), rides in the block too: its fixed
    fields are a row like any other, and ``measured`` lists ``(row, noise)`` in row order.
    Steps with other extras (FLOPs, skipped attempts, a rank's busy time) end a block.
    """

    __slots__ = ("step", "t", "dt", "n", "mb", "dropped", "ph", "has_ph", "measured")
    _COLUMNS = __slots__[:-1]

    def __init__(self, step, t, dt, n, mb, dropped, ph, has_ph, measured=()) -> None:
        self.step, self.t, self.dt, self.n, self.mb, self.dropped = step, t, dt, n, mb, dropped
        self.ph, self.has_ph = ph, has_ph
        self.measured: tuple[tuple[int, dict[str, Any]], ...] = tuple(measured)

    @classmethod
    def from_frames(cls, frames) -> "StepBlock":
        """From frames of the numpy layout :func:`_plain_dtype` (a copy of the buffer's bytes)."""
        has_ph = (frames["flags"] & HAS_PH) != 0
        ph = frames["ph"]
        ph[~has_ph] = math.nan
        return cls(frames["step"].astype("i8"), frames["t"], frames["dt"], frames["n"].astype("i8"),
                   frames["mb"].astype("i8"), frames["dropped"].astype("i8"), ph, has_ph)

    @classmethod
    def from_records(cls, steps: list[dict[str, Any]]) -> "StepBlock":
        """Step records, each plain or measured (:func:`rides_in_block`), as one block: a job's own
        model ingests its steps this way (``bsmon.probe.monitor``), as a monitor does decoded frames."""
        import numpy as np

        ph = [record.get("ph") for record in steps]
        return cls(*(np.array([record[name] for record in steps], dtype=dtype) for name, dtype in (
            ("step", "i8"), ("t", "f8"), ("dt", "f8"), ("n", "i8"), ("mb", "i8"), ("dropped", "i8"))),
            np.array([_NO_PH if marks is None else marks for marks in ph], dtype="f8").reshape(-1, 4),
            np.array([marks is not None for marks in ph], dtype=bool),
            [(row, record["noise"]) for row, record in enumerate(steps) if "noise" in record])

    @classmethod
    def interleave(cls, plain: "StepBlock", measured: list[tuple[int, dict[str, Any]]]) -> "StepBlock":
        """``plain`` with the measured step records inserted, each ``(plain rows before it, record)``."""
        import numpy as np

        rows = np.array([before + i for i, (before, _) in enumerate(measured)], dtype=np.int64)
        extra = cls.from_records([record for _, record in measured])
        size = len(plain) + len(extra)
        is_plain = np.ones(size, dtype=bool)
        is_plain[rows] = False
        columns = []
        for name in cls._COLUMNS:
            part = getattr(plain, name)
            column = np.empty((size, *part.shape[1:]), dtype=part.dtype)
            column[is_plain] = part
            column[rows] = getattr(extra, name)
            columns.append(column)
        return cls(*columns, zip(rows.tolist(), (noise for _, noise in extra.measured)))

    def __getitem__(self, rows: slice) -> "StepBlock":
        start, stop, _ = rows.indices(len(self))
        return StepBlock(*(getattr(self, column)[rows] for column in self._COLUMNS),
                         ((row - start, noise) for row, noise in self.measured if start <= row < stop))

    def __len__(self) -> int:
        return len(self.step)

    def records(self) -> list[dict[str, Any]]:
        """The same steps as records (what frame-by-frame decoding gives)."""
        out = []
        for step, t, dt, n, mb, dropped, ph, with_ph in zip(
                self.step.tolist(), self.t.tolist(), self.dt.tolist(), self.n.tolist(), self.mb.tolist(),
                self.dropped.tolist(), self.ph.tolist(), self.has_ph.tolist()):
            record = {"k": "step", "step": step, "t": t, "dt": dt, "n": n, "mb": mb, "dropped": dropped}
            if with_ph:
                record["ph"] = ph
            out.append(record)
        for row, noise in self.measured:
            out[row]["noise"] = noise
        return out

    def last(self) -> dict[str, Any]:
        """The block's last step as a record."""
        return self[-1:].records()[0]


def rides_in_block(record: dict[str, Any]) -> bool:
    """A measured step: a step record whose only extra is the probe's noise payload."""
    return record["k"] == "step" and "noise" in record and len(record) == (9 if "ph" in record else 8)


def in_blocks(records: list[dict[str, Any]]) -> list[dict[str, Any] | StepBlock]:
    """Records as a monitor's reader hands them on (``FrameReader(blocks=True)``): each run of at
    least BULK_MIN plain or measured steps as one StepBlock, ORDER_FREE records read among them
    after it, every other record in place. For records that never were frames: the job's own."""
    out: list[dict[str, Any] | StepBlock] = []
    run: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []

    def end_run() -> None:
        if len(run) >= BULK_MIN:
            out.append(StepBlock.from_records(run))
        else:
            out.extend(run)
        run.clear()
        out.extend(later)
        later.clear()

    for record in records:
        kind = record["k"]
        if kind == "step" and (len(record) == (8 if "ph" in record else 7) or rides_in_block(record)):
            run.append(record)
        elif kind in ORDER_FREE:
            later.append(record)
        else:
            end_run()
            out.append(record)
    end_run()
    return out


def record_time(record: "dict[str, Any] | StepBlock") -> float | None:
    """A record's ``t`` (a block's last), None for a record without one."""
    if isinstance(record, StepBlock):
        return float(record.t[-1])
    t = record.get("t")
    return t if isinstance(t, float) else None


def record_count(records: "list[dict[str, Any] | StepBlock]") -> int:
    """Records in a list that may hold blocks, each step of a block counted."""
    return sum(len(r) if isinstance(r, StepBlock) else 1 for r in records)


class FrameReader:
    """Incremental decoder for a byte stream of frames (socket or file).

    ``invalid`` counts the well-framed records skipped because they broke the record table;
    each skip at a count of 1, 10, 100, ... also adds an ``event`` record to the output, so a
    view shows it. ``error`` is the framing error that stopped the stream, if any; ``consumed``
    counts the bytes of whole frames taken. Steps must advance: a step record whose number is
    not above the previous one's is skipped too.

    Plain binary steps are decoded in bulk with numpy. With ``blocks=True`` they come out as
    :class:`StepBlock` items among the records (a monitor's fast path; ``scalars`` read
    among them follow the block), else as one record each, in the stream's order. With
    ``steps=False`` binary steps are framed and checked but not decoded, nor returned: a pass
    that needs only the other records (the export's first) reads at checksum speed.
    ``after_step``: the last step already known (a monitor resuming from a checkpoint).
    """

    def __init__(self, *, blocks: bool = False, steps: bool = True, after_step: int = -1) -> None:
        self._buf = bytearray()
        self._blocks = blocks
        self._steps = steps
        self.invalid = 0
        self.error: ProtocolError | None = None
        self.consumed = 0
        self._last_step = after_step
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
        plain: list[int] = []  # offsets of the plain binary steps, decoded together below
        others: list[tuple[int, dict[str, Any] | str]] = []  # (plain steps before it, the record or why it was refused)
        buf, pos, size, steps = self._buf, 0, len(self._buf), self._steps
        # The loop runs once a frame (a million times for a 1M-step session): its names are locals.
        unpack, crc32, add_plain, header, plain_size = HEADER.unpack_from, zlib.crc32, plain.append, HEADER.size, STEP.size
        with memoryview(buf) as view:
            while size - pos >= header:
                length, crc = unpack(buf, pos)
                if length > MAX_FRAME_BYTES:
                    self.error = ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
                    break
                start = pos + header
                end = start + length
                if end > size:
                    break
                if crc32(view[start:end]) != crc:
                    self.error = ProtocolError("frame checksum mismatch")
                    break
                if length and buf[start] == STEP_TAG:
                    if not steps:  # read past
                        pos = end
                        continue
                    if length == plain_size and not buf[start + 1] & _NOT_PH:
                        add_plain(pos)
                        pos = end
                        continue
                try:
                    others.append((len(plain), decode_payload(bytes(view[start:end]))))
                except InvalidRecord as exc:
                    others.append((len(plain), str(exc)))
                except ProtocolError as exc:
                    self.error = exc
                    break
                pos = end
        out = self._in_order(plain, others)
        del buf[:pos]
        self.consumed += pos
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buf)

    def _in_order(self, plain: list[int], others: list[tuple[int, dict[str, Any] | str]]) -> list[dict[str, Any]]:
        """The plain steps and the other records merged back in the stream's order (blocks: runs
        of steps as StepBlocks, measured steps inside them, ORDER_FREE records after the run
        they came in)."""
        steps = self._decode_plain(plain) if len(plain) >= BULK_MIN else None
        out: list[dict[str, Any]] = []
        later: list[dict[str, Any]] = []
        measured: list[tuple[int, dict[str, Any]]] = []  # the run's measured steps: (plain steps before, record)
        done = 0
        for before, item in others:
            if self._blocks and not isinstance(item, str):
                if item["k"] in ORDER_FREE:
                    later.append(item)
                    continue
                if rides_in_block(item):
                    measured.append((before, item))
                    continue
            self._run(plain, steps, done, before, measured, out)
            done = before
            measured = []
            out += later
            later.clear()
            if isinstance(item, str):
                self._skip(item, out)
            else:
                self._take(item, out)
        self._run(plain, steps, done, len(plain), measured, out)
        return out + later

    def _run(self, plain: list[int], steps: StepBlock | None, lo: int, hi: int,
             measured: list[tuple[int, dict[str, Any]]], out: list) -> None:
        """The plain steps ``plain[lo:hi]`` and the measured steps among them into ``out``: a block
        (or its records) when decoded in bulk, else one by one, which says what is wrong with a bad one."""
        if steps is not None and hi - lo + len(measured) >= BULK_MIN:
            block = steps[lo:hi]
            if measured:
                block = StepBlock.interleave(block, [(before - lo, record) for before, record in measured])
            if int(block.step[0]) > self._last_step and (not measured or (block.step[1:] > block.step[:-1]).all()):
                self._last_step = int(block.step[-1])
                if self._blocks:
                    out.append(block)
                else:
                    out += block.records()
                return
        for before, record in [*measured, (hi, None)]:
            for at in plain[lo:before]:
                try:
                    step = decode_payload(bytes(self._buf[at + HEADER.size:at + PLAIN_STEP_FRAME]))
                except InvalidRecord as exc:
                    self._skip(str(exc), out)
                else:
                    self._take(step, out)
            if record is not None:
                self._take(record, out)
            lo = before

    def _take(self, record: dict[str, Any], out: list[dict[str, Any]]) -> None:
        if record["k"] == "step":
            step = record["step"]
            if step <= self._last_step:
                self._skip(f"step {step} after step {self._last_step}: steps must advance", out)
                return
            self._last_step = step
        out.append(record)

    def _skip(self, why: str, out: list[dict[str, Any]]) -> None:
        """Count a refused record; say so at the 1st, 10th, 100th, ... (a view shows events)."""
        self.invalid += 1
        if math.log10(self.invalid).is_integer():
            last_t = next((t for r in reversed(out) if (t := record_time(r)) is not None), None)
            self._last_t = last_t if last_t is not None else self._last_t or time.time()
            out.append({"k": "event", "t": self._last_t, "level": "warning",
                        "msg": f"skipped {self.invalid} invalid record{'s' if self.invalid > 1 else ''} so far "
                               f"(the latest: {why}); the session goes on without them"})

    def _decode_plain(self, plain: list[int]) -> StepBlock | None:
        """All the plain steps at these offsets as one block; None if any breaks the table (a time
        not finite, steps not advancing): those are then read frame by frame."""
        import numpy as np  # the monitor side only: the probe encodes, it never decodes

        raw = np.frombuffer(self._buf, np.uint8)
        try:  # every PLAIN_STEP_FRAME bytes from each offset, copied: the buffer moves on
            rows = np.lib.stride_tricks.as_strided(raw, (len(raw) - PLAIN_STEP_FRAME + 1, PLAIN_STEP_FRAME), (1, 1))[plain]
        finally:
            del raw  # releases the buffer, which read() resizes next
        frames = rows.view(_plain_dtype()).reshape(-1)
        has_ph = (frames["flags"] & HAS_PH) != 0
        step, t, dt, ph = frames["step"], frames["t"], frames["dt"], frames["ph"]
        ok = (np.isfinite(t) & (t >= 0) & np.isfinite(dt) & (dt >= 0) & (step < (1 << 63))
              & (frames["n"] < (1 << 63)) & (frames["dropped"] < (1 << 63))
              & ((np.isfinite(ph) & (ph >= 0)).all(axis=1) | ~has_ph))
        if not ok.all() or (step[1:] <= step[:-1]).any():
            return None
        return StepBlock.from_frames(frames)


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

