"""The monitor side of the socket: feed a job's records into a SessionModel.

A :class:`Feed` owns a background thread that reads records (from a live
job's socket, or from a session file for replay) and ingests them into the
model under ``lock``. Views never touch the socket: they read the model on
their own timers, so ingestion rate and redraw rate are independent.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from bsmon import checkpoint, store, wire
from bsmon.model import SessionModel

if TYPE_CHECKING:
    from bsmon.gpu import GpuSampler

#: A late monitor's backlog comes in reads this large, each decoded in bulk.
RECV_BYTES = 1 << 20
#: How often an attached monitor records the latest NVML snapshot into the session.
GPU_RECORD_INTERVAL_S = 1.0
#: Ingest at most this many records per lock hold, so a large backlog never starves redraws.
INGEST_BATCH = 2000
#: A live job whose read brings at least this much (about 80 steps) is fast: its records are then
#: left to gather for BUSY_READ_S before the next read, so they are ingested in blocks of a second
#: (the numbers on screen move every 2 s), not of the job's 0.25 s flushes: each block
#: has a fixed cost, a quarter of the feed's CPU at 1 kHz.
BUSY_READ_BYTES = 8 << 10
BUSY_READ_S = 1.0


class Feed:
    """Records flowing into ``model`` on a background thread.

    ``state`` is one of: connecting, live, ended (the job said bye), lost (the
    stream stopped without a bye), replay, error (``message`` says why).
    ``version`` grows with every ingested batch, so a view can skip redraws
    when nothing changed.
    """

    def __init__(self, model: SessionModel | None = None) -> None:
        self.model = model or SessionModel()
        self.lock = threading.Lock()
        self.state = "connecting"
        self.message: str | None = None
        self.version = 0
        self.session_dir: Path | None = None
        #: While attaching: the bytes the session file held when the stream began (the backlog the
        #: job sends first), and the bytes received so far; see :meth:`catching_up`.
        self.backlog_bytes = 0
        self.received_bytes = 0
        #: Where the stream began: 0, or the records' bytes the job's checkpoint covered (bsmon/checkpoint.py),
        #: and why no checkpoint was used (None when one was, or none was looked for).
        self.resumed_from = 0
        self.checkpoint_note: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._gpu_thread: threading.Thread | None = None
        self._on_stop: list[Callable[[], None]] = []

    # -- sources --------------------------------------------------------------
    def replay(self, info: store.SessionInfo) -> "Feed":
        """Load a recorded session synchronously (GPU samples included), streamed from disk in
        batches: memory stays bounded however long the session."""
        self.session_dir = info.directory
        records = store.iter_record_batches(info.records_path, batch=INGEST_BATCH, blocks=True)
        gpu_records, _ = store.read_records(info.directory / store.GPU_FILE)  # about one a second
        for batch in merge_by_time(records, gpu_records):
            self._ingest(batch)
        self.state = "replay"
        torn = records.torn_bytes
        if torn:
            self.message = f"the last {torn} bytes of the record were torn (job killed?) and are skipped"
        return self

    def attach(self, socket_path: str, session_dir: Path | None = None) -> "Feed":
        """Connect to a live job and stream on a background thread; raises SessionError.

        A fresh model starts from the job's checkpoint when it has a usable one: the job then
        sends only the records after it, so the first full screen does not wait for the whole
        backlog (``resumed_from``; ``checkpoint_note`` says why not otherwise).
        """
        self.session_dir = session_dir
        resumed = None
        if session_dir is not None and self.model.hello is None:
            loaded = checkpoint.read(session_dir, session_dir.name)
            if isinstance(loaded, str):
                self.checkpoint_note = loaded
            else:
                resumed = loaded
        self._sock = connect(socket_path, start=resumed[1] if resumed else 0)
        if resumed is not None:
            model, self.resumed_from = resumed
            if self.model.history is None:
                model.history = None  # the caller asked for a model without one
            self.model = model
        try:
            size = os.path.getsize(session_dir / store.RECORDS_FILE) if session_dir else 0
            self.backlog_bytes = max(0, size - self.resumed_from)
        except OSError:
            self.backlog_bytes = 0
        self._thread = threading.Thread(target=self._read_socket, name="bsmon-feed", daemon=True)
        self._thread.start()
        return self

    def record_gpu(self, sampler: "GpuSampler") -> None:
        """Ingest the sampler's snapshots, and append them to the session's gpu file.

        Only one monitor records (an exclusive lock on the file decides); the
        others still show the readings. Recording stops when the job ends.
        """
        self._gpu_thread = threading.Thread(target=self._record_gpu, args=(sampler,), name="bsmon-gpu", daemon=True)
        self._gpu_thread.start()

    def _record_gpu(self, sampler: "GpuSampler") -> None:
        fd = self._open_gpu_file()
        placeholder = sampler.latest().time  # the empty snapshot from before the first reading
        last_time = None
        shown = None  # what the last snapshot without readings showed (its banner and hint)
        try:
            while not self._stop.wait(GPU_RECORD_INTERVAL_S if last_time is not None else 0.1):
                snapshot = sampler.latest()
                if snapshot.time in (last_time, placeholder):
                    continue
                first = last_time is None
                last_time = snapshot.time
                if not snapshot.gpus and (snapshot.banner, snapshot.hint) == shown:
                    continue  # no GPU (no driver): the same banner each second changes nothing shown
                shown = None if snapshot.gpus else (snapshot.banner, snapshot.hint)
                record = {"k": "gpu", "snapshot": snapshot.to_record()}
                with self.lock:
                    self.model.ingest(record)
                    self.version += 1
                    job_ended = self.model.bye is not None
                if fd is not None and not job_ended and (snapshot.gpus or first):
                    try:
                        os.write(fd, wire.encode(record))
                    except OSError as exc:
                        self.message = f"recording GPU samples failed: {exc}"
                        os.close(fd)
                        fd = None
        finally:
            if fd is not None:
                os.close(fd)

    def _open_gpu_file(self) -> int | None:
        if self.session_dir is None:
            return None
        try:
            fd = os.open(self.session_dir / store.GPU_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # another monitor records this session
            return None
        return fd

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the feed stops (e.g. stop the GPU sampler)."""
        self._on_stop.append(callback)

    def stop(self) -> None:
        self._stop.set()
        for callback in self._on_stop:
            callback()
        self._on_stop.clear()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in (self._thread, self._gpu_thread):
            if thread is not None:
                thread.join(timeout=2.0)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the stream to end; True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def catching_up(self) -> float | None:
        """The share of the backlog received while a live stream catches up with the job's
        recorded steps (a monitor attached late); None once it has."""
        if self.state != "live" or not self.backlog_bytes or self.received_bytes >= self.backlog_bytes:
            return None
        return self.received_bytes / self.backlog_bytes

    def read(self, fn: Callable[[SessionModel], Any]) -> Any:
        """Run ``fn(model)`` under the lock (views use this to take a snapshot)."""
        with self.lock:
            return fn(self.model)

    # -- internals ------------------------------------------------------------
    def _ingest(self, records: list[dict[str, Any] | wire.StepBlock]) -> None:
        """Into the model in batches, one lock hold each: views wait at most one batch (a block
        of plain steps is one item, ingested at once)."""
        for start in range(0, len(records), INGEST_BATCH):
            with self.lock:
                self.model.ingest_all(records[start:start + INGEST_BATCH])
                self.version += 1

    def _read_socket(self) -> None:
        # Resumed from a checkpoint: the stream's hello is the one the model has, and its steps
        # follow the checkpoint's last.
        reader = wire.FrameReader(blocks=True, after_step=self.model.steps_done if self.resumed_from else -1)
        hello_due = bool(self.resumed_from)
        self.state = "live"
        ingested = 0
        buffer = bytearray(RECV_BYTES)  # reused: a live job's reads are small, a backlog's large
        try:
            while not self._stop.is_set():
                size = self._sock.recv_into(buffer)
                if not size:
                    break
                records = reader.feed(buffer[:size])
                if hello_due and records:
                    hello_due = False
                    if records[0].get("k") == "hello":
                        records = records[1:]
                ingested += wire.record_count(records)
                self._ingest(records)
                self.received_bytes += size  # after: caught up means the screen can show it all
                if size >= BUSY_READ_BYTES and self.catching_up() is None:
                    self._stop.wait(BUSY_READ_S)
        except wire.ProtocolError as exc:
            self.state = "error"
            self.message = f"connection dropped: the job sent a bad frame ({exc}); the session file is intact"
            return
        except OSError as exc:
            if self._stop.is_set():
                return
            self.message = f"connection lost: {exc}"
        finally:
            self._sock.close()
        if self._stop.is_set():
            return
        if ingested == 0:
            self._explain_refusal()
        if self.model.bye is None:
            self._catch_up_from_file(ingested)
        self.state = "ended" if self.model.bye is not None else "lost"
        if self.state == "lost" and self.message is None:
            self.message = "the job stopped streaming without saying goodbye (killed?)"

    def _explain_refusal(self) -> None:
        """The job closed the connection before its hello: a job of another protocol version does
        (docs/protocol.md, "Versions"). Say so; its session file is still read below."""
        hello = store.read_hello(self.session_dir / store.RECORDS_FILE) if self.session_dir is not None else None
        if hello is not None and hello["v"] != wire.PROTOCOL_VERSION:
            self.message = (f"the job runs bsmon protocol v{hello['v']} and this monitor v{wire.PROTOCOL_VERSION}, "
                            "so it refused the live stream: shown from its session file up to now. Attach with "
                            "the job's bsmon release to follow it live")

    def _catch_up_from_file(self, ingested: int) -> None:
        """The stream broke off early: the session file holds the same records, take the rest from it."""
        if self.session_dir is None:
            return
        seen = 0
        path = self.session_dir / store.RECORDS_FILE
        for batch in store.iter_record_batches(path, start=self.resumed_from, batch=INGEST_BATCH):
            seen += len(batch)
            if seen > ingested:
                self._ingest(batch[max(0, len(batch) - (seen - ingested)):])
        if seen > ingested and self.model.bye is not None:
            self.message = None


def connect(socket_path: str, client: str = "bsmon", start: int = 0) -> socket.socket:
    """Open a job's socket and send the attach frame (``start``: the records' bytes the monitor
    has from the job's checkpoint); SessionError with advice on failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    attach = {"k": "attach", "v": wire.PROTOCOL_VERSION, "client": client, **({"from": start} if start else {})}
    try:
        sock.connect(socket_path)
        sock.sendall(wire.encode(attach))
    except FileNotFoundError:
        sock.close()
        raise store.SessionError(f"the job's socket {socket_path} is gone: the job has ended") from None
    except ConnectionRefusedError:
        sock.close()
        raise store.SessionError(f"nothing listens on {socket_path}: the job is gone (stale socket)") from None
    except OSError as exc:
        sock.close()
        raise store.SessionError(f"cannot connect to {socket_path}: {exc}") from None
    return sock


def merge_by_time(batches: Iterable[list[dict]], gpu_records: list[dict]) -> Iterator[list[dict]]:
    """Interleave NVML snapshots into the job's batches of records by wall time (stable for the job's order)."""
    gpu = sorted(gpu_records, key=lambda r: r["snapshot"].get("time", 0.0))
    at = 0
    for records in batches:
        if at == len(gpu):
            yield records
            continue
        merged: list[dict] = []
        for record in records:
            t = wire.record_time(record)
            while at < len(gpu) and t is not None and gpu[at]["snapshot"].get("time", 0.0) <= t:
                merged.append(gpu[at])
                at += 1
            merged.append(record)
        yield merged
    if at < len(gpu):
        yield gpu[at:]


def wait_for_session(session_id: str, alive: Callable[[], bool], timeout: float | None = None,
                     home: Path | None = None) -> store.SessionInfo | None:
    """Poll until the job with ``session_id`` is listening; None if ``alive()`` turns false first."""
    directory = store.sessions_dir(home) / session_id
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        info = store.session_info(directory) if (directory / store.RECORDS_FILE).exists() else None
        if info is not None and (info.status == "running" or info.status in ("finished", "failed")):
            return info
        if not alive():
            return store.session_info(directory) if (directory / store.RECORDS_FILE).exists() else None
        time.sleep(0.05)
    return None
