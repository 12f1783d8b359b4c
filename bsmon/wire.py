"""The bsmon protocol: record kinds, framing and validation.

One format serves the socket and the session file, so replay reads exactly the
bytes a live monitor saw. A frame is::

    uint32 big-endian payload length | uint32 big-endian CRC32 of payload | payload

and the payload is a UTF-8 JSON object whose ``"k"`` names the record kind.
The CRC lets a reader tell a torn or corrupted tail from a real record, and a
length cap keeps a hostile peer from making us allocate without bound.
Everything received is validated; a bad frame raises :class:`ProtocolError`,
which ends that one connection and nothing else.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Iterator

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
HEADER = struct.Struct(">II")

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))

#: Required fields and their types for each record kind. Extra fields are allowed
#: (forward compatibility); missing or mistyped required ones are not.
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    # First record of every session and of every stream.
    "hello": {"v": (int,), "session": (str,), "name": (str,), "pid": (int,), "t0": _NUM,
              "command": (list,), "host": (str,), "user": (str,), "unit": (str,)},
    # A monitor's first (and only) frame to the probe.
    "attach": {"v": (int,), "client": (str,)},
    # One optimizer step. Optional "noise" holds the raw norms (see bsmon.probe.noise), optional
    # "ph" the step's phase marks (see bsmon.probe.phases), optional "flops" the step's FLOP
    # count (see bsmon.probe.flops), optional "skipped" the attempts abandoned before it:
    # [{"n": samples, "mb": forwards, "why": "cleared" or "raised"}] (bsmon.probe.monitor),
    # which n and mb do not include.
    "step": {"step": (int,), "t": _NUM, "dt": _NUM, "n": (int,), "mb": (int,), "dropped": (int,)},
    # Values from Monitor.log(), tagged with the step they belong to.
    "scalars": {"step": (int,), "values": (dict,)},
    # Which noise estimator is active, what it covers, or why none applies.
    "estimator": {"name": _OPT_STR, "reason": _OPT_STR},
    # Something a person should see: a recording failure, a rejected log value. Optional "traceback":
    # the Python traceback of a bug inside bsmon that turned it off (bsmon/probe/guard.py).
    "event": {"t": _NUM, "level": (str,), "msg": (str,)},
    # One measured point of a throughput profile, and a finished profile.
    "profile_point": {"batch_size": (int,), "step_time_s": _NUM, "samples_per_s": _NUM},
    "profile": {"profile": (dict,)},
    # One NVML snapshot (written by the monitor into the session's gpu file).
    "gpu": {"snapshot": (dict,)},
    # Multi-process jobs, from rank 0 about once a second: one column per field, one entry per
    # rank (bsmon.probe.distributed.RankReporter); None where a rank has not reported.
    "ranks": {"t": _NUM, "world_size": (int,), "step": (list,), "dt": (list,), "dt95": (list,),
              "busy": (list,), "n": (list,), "since_step": (list,), "since_report": (list,)},
    # A branch check's result (bsmon.branch_check; fields as bsmon.stats.branch.BranchCheck, one
    # dict per branch in "branches"). An aborted check leaves only an event.
    "branch_check": {"t": _NUM, "step": (int,), "samples_seen": (int,), "base_batch": (int,), "samples": (int,),
                     "start_loss": _NUM, "branches": (list,), "b_crit": _OPT_NUM, "b_crit_low": _OPT_NUM,
                     "b_crit_high": _OPT_NUM, "censored": _OPT_STR, "b_simple": _OPT_NUM, "calibrate": (bool,),
                     "confidence": _NUM, "cost_samples": (int,), "cost_s": _NUM},
    # Last record: how the job ended.
    "bye": {"t": _NUM, "status": (str,), "code": (int, type(None))},
}
#: Fields a record may lack (older jobs do not send them), with their types where present.
OPTIONAL: dict[str, dict[str, tuple[type, ...]]] = {
    # The job's environment as the GPU sampler needs it (bsmon.gpu.GpuSampler).
    "hello": {"cuda_visible_devices": _OPT_STR, "cuda_device_order": _OPT_STR, "pid_namespace": _OPT_STR},
}



class ProtocolError(ValueError):
    """A frame that is not a valid bsmon record."""


#: Built once: json.dumps with non-default separators builds an encoder per call, a third of
#: the cost of a small record, paid on the training thread for every step.
_JSON = json.JSONEncoder(separators=(",", ":"))


def encode(record: dict[str, Any]) -> bytes:
    """One record as a frame. Non-finite floats are written as JSON NaN/Infinity."""
    payload = _JSON.encode(record).encode()
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"record of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def validate(record: Any) -> dict[str, Any]:
    """Return ``record`` if it is a well-formed record, else raise ProtocolError."""
    if not isinstance(record, dict):
        raise ProtocolError("record is not a JSON object")
    kind = record.get("k")
    if kind not in SCHEMA:
        raise ProtocolError(f"unknown record kind {kind!r}")
    for field, types in SCHEMA[kind].items():
        value = record.get(field, _MISSING)
        if value is _MISSING:
            raise ProtocolError(f"{kind} record lacks field {field!r}")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"{kind}.{field} has type {type(value).__name__}")
    for field, types in OPTIONAL.get(kind, {}).items():
        value = record.get(field)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"{kind}.{field} has type {type(value).__name__}")
    if kind in ("hello", "attach") and record["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {record['v']} is not {PROTOCOL_VERSION}: "
            "the job and the monitor run different bsmon releases")
    if kind == "ranks":
        _validate_rank_columns(record)
    if kind == "step" and "ph" in record:
        phases = record["ph"]
        if not (isinstance(phases, list) and len(phases) == 4
                and all(isinstance(v, _NUM) and not isinstance(v, bool) for v in phases)):
            raise ProtocolError("step.ph is not a list of 4 numbers")
    if kind == "step" and "skipped" in record:
        _validate_skipped(record["skipped"])
    if kind == "branch_check":
        _validate_branches(record)
    if kind == "step" and "flops" in record:
        _validate_flops(record["flops"])
    if kind == "scalars":
        for name, value in record["values"].items():
            if not isinstance(value, _NUM) or isinstance(value, bool):
                raise ProtocolError(f"scalar {name!r} is not a number")
    return record


_MISSING = object()


def _validate_flops(flops: Any) -> None:
    """A step's optional FLOP count: {"total": number or null, "dtype", "tf32", "reason"}."""
    if not isinstance(flops, dict):
        raise ProtocolError("step.flops is not an object")
    total = flops.get("total")
    if not isinstance(total, _OPT_NUM) or isinstance(total, bool) or (total is not None and total < 0):
        raise ProtocolError("step.flops.total is not a non-negative number or null")
    for field in ("dtype", "reason"):
        if not isinstance(flops.get(field), _OPT_STR):
            raise ProtocolError(f"step.flops.{field} is not a string or null")


def _validate_rank_columns(record: dict[str, Any]) -> None:
    size = record["world_size"]
    if size < 1:
        raise ProtocolError(f"ranks.world_size is {size}")
    for field in SCHEMA["ranks"]:
        column = record[field]
        if not isinstance(column, list):
            continue
        if len(column) != size:
            raise ProtocolError(f"ranks.{field} has {len(column)} entries for {size} ranks")
        types = (int, type(None)) if field in ("step", "n") else _OPT_NUM
        if any(not isinstance(v, types) or isinstance(v, bool) for v in column):
            raise ProtocolError(f"ranks.{field} holds a value that is not a number or null")


SKIP_CAUSES = ("cleared", "raised")


def _validate_skipped(skipped: Any) -> None:
    if not isinstance(skipped, list):
        raise ProtocolError("step.skipped is not a list")
    for chunk in skipped:
        if (not isinstance(chunk, dict) or chunk.get("why") not in SKIP_CAUSES
                or any(not isinstance(chunk.get(f), int) or isinstance(chunk.get(f), bool) for f in ("n", "mb"))):
            raise ProtocolError(f"step.skipped holds {chunk!r}, not {{n: int, mb: int, why: {SKIP_CAUSES}}}")


#: Required fields of each entry of a branch_check record's "branches".
BRANCH_FIELDS: dict[str, tuple[type, ...]] = {"batch_size": (int,), "steps": (int,), "lr": _NUM, "loss": _NUM,
                                              "lrs": (list,), "losses": (list,)}


def _validate_branches(record: dict[str, Any]) -> None:
    branches = record["branches"]
    if not branches:
        raise ProtocolError("branch_check.branches is empty")
    for i, branch in enumerate(branches):
        if not isinstance(branch, dict):
            raise ProtocolError(f"branch_check.branches[{i}] is not an object")
        for field, types in BRANCH_FIELDS.items():
            value = branch.get(field, _MISSING)
            if value is _MISSING or not isinstance(value, types) or isinstance(value, bool):
                raise ProtocolError(f"branch_check.branches[{i}].{field} is missing or mistyped")
        if len(branch["lrs"]) != len(branch["losses"]) or any(
                not isinstance(v, _NUM) or isinstance(v, bool) for v in branch["lrs"] + branch["losses"]):
            raise ProtocolError(f"branch_check.branches[{i}]: lrs and losses must be equally long lists of numbers")


def decode_payload(payload: bytes) -> dict[str, Any]:
    try:
        record = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"payload is not JSON: {exc}") from None
    return validate(record)


class FrameReader:
    """Incremental decoder for a byte stream of frames (socket or file)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes and return every complete record; raise ProtocolError on a bad frame."""
        self._buf += data
        records = []
        while len(self._buf) >= HEADER.size:
            length, crc = HEADER.unpack_from(self._buf)
            if length > MAX_FRAME_BYTES:
                raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER.size:end])
            if zlib.crc32(payload) != crc:
                raise ProtocolError("frame checksum mismatch")
            del self._buf[:end]
            records.append(decode_payload(payload))
        return records

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buf)


def iter_frames(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (end offset, record) for each valid frame from the start of ``data``.

    Stops silently at the first incomplete or invalid frame: in a file that is
    the torn tail a crash leaves, and the caller learns where it begins from the
    last end offset.
    """
    pos = 0
    while pos + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if length > MAX_FRAME_BYTES or end > len(data):
            return
        payload = data[pos + HEADER.size:end]
        if zlib.crc32(payload) != crc:
            return
        try:
            record = decode_payload(payload)
        except ProtocolError:
            return
        yield end, record
        pos = end
