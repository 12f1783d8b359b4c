"""Sessions on disk: where they live, appending, listing, resolving, reading.

Layout under ``$BSMON_HOME`` (default ``$XDG_DATA_HOME/bsmon``, else
``~/.local/share/bsmon``)::

    sessions/<id>/records.bsr   framed records written by the job (hello first, bye last)
    sessions/<id>/summary.json  steps, status, last time, bytes covered: kept current by the job
    sessions/<id>/gpu.bsr       NVML snapshots written by an attached monitor
    sessions/<id>/output.log    the job's stdout/stderr when started by ``bsmon run`` with the TUI
    run/<id>.sock               the live job's socket (directory 0700, socket 0600)

Files are append-only; a reader tolerates a torn last record (``kill -9``,
power loss) because every frame carries its length and CRC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import socket
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bsmon import wire
from bsmon.records import SUMMARY

RECORDS_FILE = "records.bsr"
SUMMARY_FILE = "summary.json"
GPU_FILE = "gpu.bsr"
OUTPUT_FILE = "output.log"
#: ``bsmon run --name`` reaches the job in this variable; it wins over ``watch(name=)``.
RUN_NAME_ENV = "BSMON_RUN_NAME"

#: How often the job's publisher rewrites summary.json (from its background thread).
SUMMARY_INTERVAL_S = 1.0
#: The tail read, growing, to find a session's last step and bye when its summary cannot say.
TAIL_BYTES = (1 << 16, 1 << 20, 1 << 23)

#: A summary this far behind the records file is not used (read forward from it): the tail is read instead.
SUMMARY_LAG_BYTES = 1 << 20

#: sockaddr_un.sun_path holds 108 bytes on Linux, 104 on macOS; stay under both.
_MAX_SOCKET_PATH = 100


class SessionError(Exception):
    """A session that cannot be found or used; the message says what to do."""


def bsmon_home() -> Path:
    if os.environ.get("BSMON_HOME"):
        return Path(os.environ["BSMON_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "bsmon"


def sessions_dir(home: Path | None = None) -> Path:
    return (home or bsmon_home()) / "sessions"


def socket_dir(home: Path | None = None) -> Path:
    """The per-user socket directory, created with mode 0700.

    A deep ``$BSMON_HOME`` would overflow the socket path limit; then the
    sockets go to a short per-user directory in the temp dir, keyed by a hash of
    the home so two homes never share one.
    """
    home = home or bsmon_home()
    directory = home / "run"
    if len(str(directory)) + len("/0123456789abcdef.sock") > _MAX_SOCKET_PATH:
        digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:10]
        directory = Path(tempfile.gettempdir()) / f"bsmon-{os.getuid()}-{digest}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory


def profiles_dir(home: Path | None = None) -> Path:
    return (home or bsmon_home()) / "profiles"


def save_profile(profile: dict[str, Any], name: str, home: Path | None = None) -> Path:
    """Save a throughput profile (Profile.to_dict()) as <name>-<id>.json; returns its path."""
    directory = profiles_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{new_session_id()}.json"
    path.write_text(json.dumps(profile, indent=1))
    return path


def load_profile(query: str, home: Path | None = None) -> dict[str, Any]:
    """A saved profile by path, file name, or unique prefix of its name; SessionError if none."""
    path = Path(query)
    if not path.is_file():
        candidates = sorted(profiles_dir(home).glob(f"{query}*.json")) if profiles_dir(home).is_dir() else []
        if len(candidates) != 1:
            found = ", ".join(c.stem for c in candidates) or "none"
            raise SessionError(f"profile {query!r} matches {len(candidates)} saved profiles ({found}); "
                               "give a path or a unique name. `bsmon sweep` saves them.")
        path = candidates[0]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SessionError(f"cannot read the profile {path}: {exc}") from None


def new_session_id() -> str:
    return secrets.token_hex(4)


class RecordWriter:
    """Appends frames to a file and never raises.

    A write failure (full disk, read-only mount, quota) is kept in ``error``
    and later appends are refused, so the training job goes on and the caller
    reports the failure once. ``durable_bytes`` counts only whole frames
    written, so a live stream never sends half a frame.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: OSError | None = None
        self.durable_bytes = 0
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            self._fd = None
            self.error = exc

    def append(self, frames: bytes) -> bool:
        if self._fd is None or self.error is not None:
            return False
        view = memoryview(frames)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self.error = exc
            return False
        self.durable_bytes += len(frames)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: Bytes read at a time when streaming a records file: bounded memory, whatever the session's length.
READ_CHUNK = 1 << 20


class RecordStream:
    """The validated records of a file, in batches, read in bounded memory (an iterator).

    After iteration: ``end`` is the offset just past the last whole frame, ``torn_bytes`` the
    bytes after it that were read but do not form a valid frame (the torn tail a crash
    leaves, or garbage), ``invalid`` the well-framed records skipped because they broke the
    record table (each also reported by an ``event`` record in the batches; bsmon.wire), and
    ``error`` the framing error that stopped the reading, if any.
    """

    def __init__(self, path: Path, start: int = 0, batch: int = 4096, blocks: bool = False, steps: bool = True) -> None:
        self.path = path
        self.blocks = blocks
        self.steps = steps
        self.end = start
        self.torn_bytes = 0
        self.invalid = 0
        self.error: wire.ProtocolError | None = None
        self._start = start
        self._batch = batch
        self._batches = self._read()

    def __iter__(self) -> "RecordStream":
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return next(self._batches)

    def _read(self) -> Iterator[list[dict[str, Any]]]:
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return
        reader = wire.FrameReader(blocks=self.blocks, steps=self.steps)
        read = 0
        with handle:
            handle.seek(self._start)
            while reader.error is None and (chunk := handle.read(READ_CHUNK)):
                read += len(chunk)
                records = reader.read(chunk)
                self.end = self._start + reader.consumed
                self.torn_bytes = read - reader.consumed
                self.invalid = reader.invalid
                self.error = reader.error
                for i in range(0, len(records), self._batch):
                    yield records[i:i + self._batch]


def iter_record_batches(path: Path, *, start: int = 0, batch: int = 4096, blocks: bool = False,
                        steps: bool = True) -> RecordStream:
    """Stream the records of ``path`` from byte ``start`` (a frame boundary) in lists of at most
    ``batch``; the returned iterator tells ``end``, ``torn_bytes`` and ``invalid`` afterwards.
    With ``blocks``, runs of plain steps come as ``wire.StepBlock`` items; ``steps=False``
    leaves the steps out, undecoded (bsmon.wire.FrameReader)."""
    return RecordStream(path, start, batch, blocks, steps)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """All valid records of a file and the number of trailing bytes that were not (a torn tail)."""
    stream = iter_record_batches(path)
    records = [record for batch in stream for record in batch]
    return records, stream.torn_bytes


def socket_alive(path: str | None) -> bool:
    """True when a job is listening on ``path`` (a stale socket file is not)."""
    if not path or not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@dataclass(frozen=True)
class Figures:
    """A session's headline numbers as `bsmon ls` shows them."""
    b_opt: int | None
    b_simple: float | None
    unit: str


@dataclass(frozen=True)
class SessionInfo:
    id: str
    name: str
    pid: int
    host: str
    status: str  # running | finished | failed | lost
    steps: int
    started: float
    directory: Path
    socket: str | None
    command: tuple[str, ...]
    exit_code: int | None
    torn_bytes: int
    hello: dict[str, Any]
    #: The headline figures (b_opt, b_simple, unit) as of the summary, at most a few seconds
    #: old while the job runs; None without a summary (`bsmon ls` computes them once then).
    figures: Figures | None = None
    #: The last bye record, if the session has one (``bsmon run`` may append a second).
    bye: dict[str, Any] | None = None

    @property
    def records_path(self) -> Path:
        return self.directory / RECORDS_FILE

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "pid": self.pid, "host": self.host,
                "status": self.status, "steps": self.steps, "started": self.started,
                "command": list(self.command), "exit_code": self.exit_code,
                "path": str(self.directory)}


#: Records that a step's exported row looks up later in the file (bsmon/export.py, scan).
LOOKUPS = frozenset(("ranks", "branch_check"))


def logged_names_and_lookups(records: list[dict[str, Any]], names: dict[str, None]) -> int:
    """Add the names ``records`` log to ``names`` (an ordered set), and count their LOOKUPS: the
    summary's ``scalars`` and ``lookups``, from which an export of the whole file skips its first pass."""
    lookups = 0
    for record in records:
        kind = record["k"]
        if kind == "scalars":
            names.update(dict.fromkeys(record["values"]))
        elif kind in LOOKUPS:
            lookups += 1
    return lookups


def replace_file(path: Path, data: bytes) -> bool:
    """Replace ``path`` atomically with ``data`` (a private temporary file beside it, then a
    rename): a reader sees the old file or the new one, never half of one. False (and no
    exception) when it cannot be written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
        return True
    except OSError:
        try:
            temporary.unlink()
        except OSError:
            pass
        return False


def write_summary(directory: Path, summary: dict[str, Any]) -> bool:
    """Replace the session's summary sidecar atomically; False when it cannot be written:
    listing then falls back to the records' tail."""
    return replace_file(directory / SUMMARY_FILE, json.dumps(summary).encode())


def read_summary(directory: Path) -> dict[str, Any] | None:
    """The session's summary sidecar, or None when it is missing or not a valid summary."""
    try:
        summary = json.loads((directory / SUMMARY_FILE).read_bytes())
        SUMMARY.check(summary, "summary")
        return summary
    except (OSError, ValueError):
        return None


def read_hello(path: Path) -> dict[str, Any] | None:
    """The first record of a records file if it is a hello (reads that frame only)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(wire.HEADER.size)
            if len(head) < wire.HEADER.size:
                return None
            length, _ = wire.HEADER.unpack(head)
            data = head + handle.read(min(length, wire.MAX_FRAME_BYTES))
    except OSError:
        return None
    first = wire.FrameReader().read(data)
    return first[0] if first and first[0]["k"] == "hello" else None


def tail_records(path: Path, size: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The records in the last part of the file, and its torn bytes, without reading the rest.

    A frame boundary in the tail is found by trying each offset: a header whose CRC matches,
    from which frames decode cleanly on to the end. The window grows (TAIL_BYTES) until it
    holds a step, so a tail of events still finds the last step.
    """
    size = path.stat().st_size if size is None else size
    for window in TAIL_BYTES:
        if window >= size:
            stream = iter_record_batches(path)
            return [record for batch in stream for record in batch], stream.torn_bytes
        with open(path, "rb") as handle:
            handle.seek(size - window)
            tail = handle.read(window)
        found = _decode_from_boundary(tail)
        if found is not None and any(r["k"] == "step" for r in found[0]):
            return found
    return found if found is not None else ([], 0)


def _decode_from_boundary(tail: bytes) -> tuple[list[dict[str, Any]], int] | None:
    with memoryview(tail) as view:
        for offset in range(len(tail) - wire.HEADER.size):
            length, crc = wire.HEADER.unpack_from(tail, offset)
            end = offset + wire.HEADER.size + length
            if end > len(tail) or zlib.crc32(view[offset + wire.HEADER.size:end]) != crc:
                continue
            reader = wire.FrameReader()
            found = reader.read(view[offset:])
            if found and reader.error is None and reader.invalid == 0:
                return found, reader.pending
    return None


def session_info(directory: Path) -> SessionInfo | None:
    """Summarise one session directory; None when it holds no hello record yet.

    Reads the hello (the first frame) and the summary sidecar the job keeps current, plus the
    records written after the summary (at most about a second's worth). Without a usable
    summary (an older bsmon, a crash before the first one, a summary of another file) it reads
    the records file's tail only. "running" is confirmed by connecting to the job's socket.
    """
    path = directory / RECORDS_FILE
    hello = read_hello(path)
    if hello is None:
        return None
    size = path.stat().st_size
    summary = read_summary(directory)
    if summary is not None and (summary["session"] != hello["session"] or summary["bytes"] > size
                                or size - summary["bytes"] > SUMMARY_LAG_BYTES):
        summary = None  # another session's, or a crash left it far behind: the tail says more
    if summary is not None:
        stream = iter_record_batches(path, start=summary["bytes"])
        later, torn = [record for batch in stream for record in batch], stream.torn_bytes
        if stream.error is not None or stream.invalid:  # "bytes" is not where a frame starts
            summary = None
    if summary is not None:
        steps, status, code = summary["steps"], summary["status"], summary["code"]
    else:
        later, torn = tail_records(path, size)
        steps, status, code = 0, "running", None
    bye = None
    for record in later:
        if record["k"] == "step":
            steps = record["step"]
        elif record["k"] == "bye":
            bye = record
    if bye is not None:
        status, code = ("finished" if bye["status"] == "finished" else "failed"), bye["code"]
    elif status == "running":
        status = "running" if socket_alive(hello.get("socket")) else "lost"
    figures = None
    if summary is not None and "b_opt" in summary:
        figures = Figures(summary["b_opt"], summary.get("b_simple"), summary.get("unit", "samples"))
    return SessionInfo(
        id=hello["session"], name=hello["name"], pid=hello["pid"], host=hello["host"],
        status=status, steps=steps, started=hello["t0"], directory=directory,
        socket=hello.get("socket"), command=tuple(hello["command"]),
        exit_code=code, torn_bytes=torn, hello=hello, figures=figures, bye=bye)


def list_sessions(home: Path | None = None) -> list[SessionInfo]:
    """Every recorded session, oldest first."""
    root = sessions_dir(home)
    if not root.is_dir():
        return []
    infos = [info for d in root.iterdir() if d.is_dir() and (info := session_info(d)) is not None]
    return sorted(infos, key=lambda info: info.started)


def resolve_session(query: str | None, home: Path | None = None, *, running: bool = False) -> SessionInfo:
    """Find a session by id, unique id prefix or name; the newest (running) one when query is None."""
    sessions = list_sessions(home)
    if running:
        candidates = [s for s in sessions if s.status == "running"]
    else:
        candidates = sessions
    if query is None:
        if not candidates:
            what = "running job" if running else "recorded session"
            hint = (" Start one with `bsmon run -- python train.py`, or call bsmon.watch() in your script."
                    if running else "")
            raise SessionError(f"no {what} under {home or bsmon_home()}.{hint}")
        return candidates[-1]
    exact = [s for s in sessions if s.id == query]
    matches = exact or [s for s in sessions if s.id.startswith(query)] or [s for s in sessions if s.name == query]
    if not matches:
        raise SessionError(f"no session matches {query!r}; `bsmon ls` lists them.")
    if len(matches) > 1:
        listing = ", ".join(f"{s.id} ({s.name})" for s in matches)
        raise SessionError(f"{query!r} is ambiguous: it matches {listing}. Give more of the id.")
    return matches[0]


def remove_stale_socket(info: SessionInfo) -> bool:
    """Delete the socket file of a job that is gone; True if one was removed."""
    if info.socket and os.path.exists(info.socket) and not socket_alive(info.socket):
        try:
            os.unlink(info.socket)
            return True
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    return False
