"""The probe's publishing side: buffer records, record them, serve monitors.

Who does what, and why:

* Any thread calls :meth:`Publisher.submit`, which appends to a bounded deque and
  returns (a full buffer drops the record and counts it).
* The training thread calls :meth:`Publisher.poll` once a step (from the probe's step
  hook; ``Monitor.stats()`` polls too, to be up to date). At most every
  ``FLUSH_INTERVAL_S`` it encodes the buffered records into frames, passes the records
  to ``on_records`` (the Monitor, for ``stats()``), and hands the bytes over. That is
  CPU work of a few microseconds a record, done between steps. It never waits: a
  record whose device values have not reached the host yet stays for the next poll.
* One background thread writes the frames to the session file, fans them out to
  attached monitors and accepts new monitors. It wakes once per flush and otherwise
  every ``IDLE_FLUSH_S``, so it hardly competes with the training thread for the GIL:
  a thread that woke to encode and ingest on its own slowed a 5 ms CPU step by 4-6%
  (docs/benchmarks.md), far more than the work itself. When the training thread has
  not flushed for ``IDLE_FLUSH_S`` (long steps, evaluation, a device that lags), the
  background thread flushes instead, waiting for device values if it must.

Each monitor gets its own sender thread: hello, then the backlog read from the
session file, then the live tail from a per-monitor queue. The file is the
backlog, so a monitor that attaches late sees the run from step 0 and a slow
monitor only ever delays itself.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bsmon import checkpoint, wire
from bsmon.probe.deferred import resolve
from bsmon.store import SUMMARY_INTERVAL_S, RecordWriter, logged_names_and_lookups, write_summary

FLUSH_INTERVAL_S = 0.25
IDLE_FLUSH_S = 0.5
BUFFER_CAPACITY = 8192
#: A monitor that falls this far behind is disconnected; it can re-attach and catch up from the file.
CLIENT_BACKLOG_LIMIT = 64 << 20
#: When the disk fails, frames are kept in memory up to this size for monitors that attach later.
SPILL_LIMIT = 128 << 20
HANDSHAKE_TIMEOUT_S = 5.0
#: The job's own SessionModel is asked for the summary's headline figures (B*, B_simple) and
#: written as the late monitors' checkpoint (bsmon/checkpoint.py) at most this often while the job
#: runs: about a millisecond each of the background thread's time.
MODEL_STATE_S = 5.0


class Publisher:
    def __init__(self, hello: dict[str, Any], writer: RecordWriter | None, socket_path: str | None,
                 on_records: Callable[[list[dict], int], None], guard: Callable[[Callable], Callable] = lambda f: f,
                 summary_figures: Callable[[], dict[str, Any] | None] = lambda: None,
                 pickled_model: Callable[[], tuple[bytes, int] | None] = lambda: None) -> None:
        """``on_records`` gets the records encoded, in order, and the stream's bytes up to their end.
        ``guard`` wraps the background thread and every monitor's sender thread (bsmon/probe/guard.py).
        ``summary_figures`` gives the headline figures for the summary sidecar (None: keep the last);
        ``pickled_model`` the job's model pickled and the stream's bytes it covers (None: not now), for the checkpoint."""
        self.dropped = 0
        self.dropped_monitors = 0  # disconnected for falling CLIENT_BACKLOG_LIMIT behind
        self._guard = guard
        self._buffer: collections.deque = collections.deque()
        self._on_records = on_records
        self._writer = writer
        self._hello_frame = wire.encode(hello)
        self._encoded_bytes = len(self._hello_frame)  # the stream's bytes, up to the last record encoded
        self._flush_lock = threading.Lock()  # one flusher at a time, so frames stay in order
        self._last_flush = time.monotonic()
        self._last_wake = -FLUSH_INTERVAL_S  # the first flush wakes the background thread
        self._outbox: collections.deque[bytes] = collections.deque()  # encoded, not yet delivered
        self._lock = threading.Lock()  # the writer, the monitors and the spill
        self._clients: list[_Client] = []
        self._spill: list[bytes] = []
        self._spill_bytes = 0
        self._reported_failure = False
        # summary.json, the session's sidecar for `bsmon ls`: updated from what is delivered.
        self._summary = {"session": hello["session"], "steps": 0, "samples": 0, "status": "running",
                         "t": hello["t0"], "bytes": 0, "code": None, "scalars": [], "lookups": 0}
        self._scalar_names: dict[str, None] = {}  # the summary's "scalars", as an ordered set
        self._summary_at = -SUMMARY_INTERVAL_S
        self._summary_figures = summary_figures
        self._figures_at = time.monotonic()
        self._pickled_model = pickled_model
        if writer is not None:
            checkpoint.fingerprint()  # the code this job runs: hashed now, not after an upgrade in place
        self._stopping = False
        self._closing = False
        if writer is not None:
            writer.append(self._hello_frame)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._server = self._listen(socket_path) if socket_path else None
        self._thread = threading.Thread(target=guard(self._background_loop), name="bsmon-publisher", daemon=True)
        self._thread.start()

    # -- any thread -----------------------------------------------------------
    def submit(self, record: dict[str, Any]) -> None:
        """Queue a record; never blocks. A full buffer drops it and counts the drop."""
        if len(self._buffer) >= BUFFER_CAPACITY:
            self.dropped += 1
            return
        self._buffer.append(record)

    def poll(self, *, now: bool = False) -> None:
        """Encode the buffered records when a flush is due (or ``now``); never waits.

        The background thread is woken at most every ``FLUSH_INTERVAL_S`` to deliver them,
        so polling ``now`` at every step (``Monitor.stats()`` in an adaptive loop) adds
        encoding work only.
        """
        if self._stopping or (not now and time.monotonic() - self._last_flush < FLUSH_INTERVAL_S):
            return  # close() flushes the rest itself
        if not self._flush_lock.acquire(blocking=False):
            return  # the background thread is flushing
        try:
            self._encode_buffered(wait=False)
        finally:
            self._flush_lock.release()

    def report(self, record: dict[str, Any]) -> None:
        """Queue ``record`` and deliver what is queued now, on the calling thread: the guard's
        failure event, which must reach the session even when the background thread failed."""
        self.submit(record)
        with self._flush_lock:
            self._encode_buffered(wait=False)
        self._deliver()

    # -- lifecycle ------------------------------------------------------------
    def close(self, bye: dict[str, Any]) -> None:
        """Flush everything, write ``bye``, end every stream and remove the socket."""
        self._stopping = True
        self._wake()
        self._thread.join()
        self._buffer.append(bye)
        with self._flush_lock:
            self._encode_buffered(wait=True)
        self._deliver()
        with self._lock:
            self._closing = True
        if self._server is not None:
            path = self._server.getsockname()
            self._accept_pending()  # monitors still in the listen queue get the whole run too
            self._server.close()
            try:
                os.unlink(path)
            except OSError:
                pass
        os.close(self._wake_read)
        os.close(self._wake_write)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.finish()
        for client in clients:
            client.join(timeout=2.0)
        if self._writer is not None:
            self._write_summary(final=True)
            self._writer.close()
            checkpoint.remove(self._writer.path.parent)  # for late monitors of a running job only

    @property
    def recording_error(self) -> OSError | None:
        return None if self._writer is None else self._writer.error

    # -- flushing -------------------------------------------------------------
    def _encode_buffered(self, *, wait: bool) -> None:
        """Move buffered records, in order, to the outbox as frames; then to ``on_records``.

        Without ``wait``, stops at the first record whose device values are still on their
        way to the host. The caller holds ``_flush_lock``.
        """
        records = []
        while self._buffer and resolve(self._buffer[0], wait=wait):
            records.append(self._buffer.popleft())
        now = time.monotonic()
        if records or not self._buffer:
            self._last_flush = now
        if not records:
            return
        if self._writer is not None or self._server is not None:  # ranks > 0 record nothing
            frames = b"".join(map(_frame, records))
            self._encoded_bytes += len(frames)
            self._outbox.append((frames, records))
            if now - self._last_wake >= FLUSH_INTERVAL_S:
                self._last_wake = now
                self._wake()
        self._on_records(records, self._encoded_bytes)

    def _wake(self) -> None:
        """Wake the background thread (a full pipe means it is awake already)."""
        try:
            os.write(self._wake_write, b"\0")
        except OSError:
            pass

    def _deliver(self) -> None:
        """Write the outbox to the session file and to every monitor (background thread)."""
        chunks, delivered = [], []
        while self._outbox:
            frames, records = self._outbox.popleft()
            chunks.append(frames)
            delivered.append(records)
        if not chunks:
            return
        data = b"".join(chunks)
        with self._lock:
            if self._writer is not None and not self._writer.append(data):
                data = self._recording_failed(data)
            for client in self._clients:
                client.push(data)
        if self._writer is not None and self._writer.error is None:
            self._count(delivered)
            if time.monotonic() - self._summary_at >= SUMMARY_INTERVAL_S:
                self._write_summary(final=False)

    def _count(self, delivered: list[list[dict[str, Any]]]) -> None:
        """Bring the summary up to the records just written."""
        summary = self._summary
        for records in delivered:
            for record in records:
                kind = record["k"]
                if kind == "step":
                    summary["steps"] = record["step"]
                    summary["samples"] += record["n"]
                elif kind == "bye":
                    summary["status"] = "finished" if record["status"] == "finished" else "failed"
                    summary["code"] = record.get("code")
            if records and isinstance(records[-1].get("t"), float):
                summary["t"] = records[-1]["t"]
            summary["lookups"] += logged_names_and_lookups(records, self._scalar_names)
        summary["scalars"] = list(self._scalar_names)
        summary["bytes"] = self._writer.durable_bytes

    def _write_summary(self, *, final: bool) -> None:
        """Rewrite summary.json (background thread, or close()): at most every SUMMARY_INTERVAL_S."""
        if self._writer.error is not None:
            return
        self._summary_at = time.monotonic()
        due = self._figures_due()
        figures = self._summary_figures() if final or due else None
        if figures is not None:
            self._summary.update(figures)
        write_summary(self._writer.path.parent, self._summary)
        if due and not final:
            self._write_checkpoint()

    def _figures_due(self) -> bool:
        due = time.monotonic() - self._figures_at >= MODEL_STATE_S
        if due:
            self._figures_at = time.monotonic()
        return due

    def _write_checkpoint(self) -> None:
        """The job's model for late monitors (bsmon/checkpoint.py), when it covers only records already
        in the file: a monitor asks for those after it, and the job sends them from the file."""
        state = self._pickled_model()
        if state is not None and state[1] <= self._writer.durable_bytes:
            checkpoint.write(self._writer.path.parent, checkpoint.encode(state[0], self._summary["session"], state[1]))

    def _recording_failed(self, data: bytes) -> bytes:
        """Keep the frames for monitors, and report the failure once (to the job and the stream)."""
        if not self._reported_failure:
            self._reported_failure = True
            message = (f"recording to {self._writer.path} failed: {self._writer.error}. "
                       "Training continues and live monitors still receive every step, "
                       "but the session file stops here.")
            print(f"bsmon: {message}", file=sys.stderr)
            event = _event("error", message)
            data += wire.encode(event)
            self._on_records([event], self._encoded_bytes)
        if self._spill_bytes + len(data) <= SPILL_LIMIT:
            self._spill.append(data)
            self._spill_bytes += len(data)
        return data

    # -- the background thread ------------------------------------------------
    def _background_loop(self) -> None:
        watched = [self._wake_read] + ([self._server] if self._server is not None else [])
        while not self._stopping:
            readable, _, _ = select.select(watched, [], [], IDLE_FLUSH_S)
            if self._wake_read in readable:
                try:
                    os.read(self._wake_read, 4096)
                except BlockingIOError:
                    pass
            if self._server is not None and self._server in readable:
                self._accept_pending()
            if self._buffer and time.monotonic() - self._last_flush >= IDLE_FLUSH_S:
                with self._flush_lock:
                    self._encode_buffered(wait=True)
            self._deliver()
        self._deliver()

    # -- serving monitors ---------------------------------------------------
    def _listen(self, path: str) -> socket.socket | None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)  # a stale socket of a dead job with the same id
            old_umask = os.umask(0o177)
            try:
                server.bind(path)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            server.listen(16)
            server.setblocking(False)
            return server
        except OSError as exc:
            server.close()
            print(f"bsmon: cannot listen on {path}: {exc}. The job is recorded but monitors "
                  "cannot attach live (use `bsmon replay`).", file=sys.stderr)
            return None

    def _accept_pending(self) -> None:
        """Serve every monitor waiting in the listen queue."""
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            conn.setblocking(True)
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            backlog_end = self._writer.durable_bytes if self._writer is not None else 0
            client = _Client(conn, self, backlog_end, list(self._spill))
            self._clients.append(client)
            if self._closing:
                client.finish()  # accepted during close(): the backlog is everything, then the end
        client.start()

    def _forget(self, client: "_Client") -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)


def _event(level: str, message: str) -> dict[str, Any]:
    return {"k": "event", "t": time.time(), "level": level, "msg": message}


def _frame(record: dict[str, Any]) -> bytes:
    """One record's frame; a record that cannot be encoded (a bsmon bug) becomes an error event."""
    try:
        return wire.encode(record)
    except (wire.ProtocolError, TypeError, ValueError) as exc:
        return wire.encode(_event("error", f"bsmon could not encode a {record.get('k')} record: {exc}"))


class _Client(threading.Thread):
    """Streams hello, backlog and live tail to one monitor."""

    def __init__(self, conn: socket.socket, publisher: Publisher, backlog_end: int, spill: list[bytes]) -> None:
        super().__init__(name="bsmon-client", daemon=True)
        self._conn = conn
        self._publisher = publisher
        self._backlog_end = backlog_end
        self._spill = spill
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._wake = threading.Condition()
        self._finished = False
        self._dropped = False

    def push(self, data: bytes) -> None:
        """Queue ``data`` for this monitor; one that stopped reading is dropped once it falls
        CLIENT_BACKLOG_LIMIT behind (its socket is shut, which also frees a blocked send)."""
        with self._wake:
            if self._dropped:
                return
            self._queue.append(data)
            self._queued_bytes += len(data)
            if self._queued_bytes > CLIENT_BACKLOG_LIMIT:
                self._dropped = True
                self._queue.clear()
                self._queued_bytes = 0
                self._publisher.dropped_monitors += 1
                self._publisher.submit(_event(
                    "warning", f"a monitor stopped reading and was disconnected "
                    f"({self._publisher.dropped_monitors} so far); it can re-attach and catch up from the file"))
                try:
                    self._conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._wake.notify()

    def finish(self) -> None:
        with self._wake:
            self._finished = True
            self._wake.notify()

    def run(self) -> None:
        self._publisher._guard(self._run)()

    def _run(self) -> None:
        try:
            attach = self._handshake()
            if attach is not None and attach["v"] != wire.PROTOCOL_VERSION:
                # A monitor of another release: the hello alone, whose version its reader refuses
                # with a message naming both releases (docs/protocol.md, "Versions").
                self._conn.sendall(self._publisher._hello_frame)
            elif attach is not None:
                self._stream(attach.get("from", 0))
        except OSError:
            pass  # the monitor went away; that costs the job nothing
        finally:
            self._publisher._forget(self)
            self._conn.close()

    def _handshake(self) -> dict[str, Any] | None:
        """The monitor's attach record; None (end this connection only) for anything else."""
        self._conn.settimeout(HANDSHAKE_TIMEOUT_S)
        reader = wire.FrameReader()
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while time.monotonic() < deadline:
            data = self._conn.recv(4096)
            if not data:
                return None
            try:
                records = reader.feed(data)
            except wire.ProtocolError:
                return None
            if records:
                return records[0] if records[0]["k"] == "attach" else None
        return None

    def _stream(self, start: int) -> None:
        """The hello, the file's records from ``start`` (the end of the job's checkpoint that the
        monitor loaded; else the first after the hello), then the live records."""
        self._conn.settimeout(None)
        hello = self._publisher._hello_frame
        self._conn.sendall(hello)
        writer = self._publisher._writer
        if not len(hello) <= start <= self._backlog_end:
            start = len(hello)
        if writer is not None and self._backlog_end > start:
            self._send_file(writer.path, start, self._backlog_end)
        for chunk in self._spill:
            self._conn.sendall(chunk)
        self._spill = []
        while True:
            with self._wake:
                while not self._queue and not self._finished:
                    self._wake.wait()
                if not self._queue and self._finished:
                    return
                chunks = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
            self._conn.sendall(b"".join(chunks))

    def _send_file(self, path: Path, start: int, end: int) -> None:
        with open(path, "rb") as handle:
            handle.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = handle.read(min(remaining, 1 << 16))
                if not chunk:
                    return
                self._conn.sendall(chunk)
                remaining -= len(chunk)
