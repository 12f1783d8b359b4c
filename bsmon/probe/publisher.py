"""The probe's background side: drain the step buffer, record, serve monitors.

The training thread only calls :meth:`Publisher.submit`, which appends to a
bounded deque and returns (a full buffer drops the item and counts it). One
background thread wakes every ``FLUSH_INTERVAL_S``, resolves device values,
feeds the session model that backs ``Monitor.stats()``, appends the frames to
the session file with one write, and fans them out to attached monitors.

Each monitor gets its own sender thread: hello, then the backlog read from the
session file, then the live tail from a per-monitor queue. The file is the
backlog, so a monitor that attaches late sees the run from step 0 and a slow
monitor only ever delays itself.
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bsmon import wire
from bsmon.probe.deferred import resolve
from bsmon.store import RecordWriter

FLUSH_INTERVAL_S = 0.1
BUFFER_CAPACITY = 8192
#: A monitor that falls this far behind is disconnected; it can re-attach and catch up from the file.
CLIENT_BACKLOG_LIMIT = 64 << 20
#: When the disk fails, frames are kept in memory up to this size for monitors that attach later.
SPILL_LIMIT = 128 << 20
HANDSHAKE_TIMEOUT_S = 5.0


class Publisher:
    def __init__(self, hello: dict[str, Any], writer: RecordWriter | None, socket_path: str | None,
                 on_records: Callable[[list[dict]], None]) -> None:
        self.dropped = 0
        self._buffer: collections.deque = collections.deque()
        self._on_records = on_records
        self._writer = writer
        self._hello_frame = wire.encode(hello)
        self._lock = threading.Lock()
        self._clients: list[_Client] = []
        self._spill: list[bytes] = []
        self._spill_bytes = 0
        self._reported_failure = False
        self._stop = threading.Event()
        self._closing = False
        self._pending_events: list[dict] = []
        if writer is not None:
            writer.append(self._hello_frame)
        self._server = self._listen(socket_path) if socket_path else None
        self._drain_thread = threading.Thread(target=self._drain_loop, name="bsmon-publisher", daemon=True)
        self._drain_thread.start()
        if self._server is not None:
            self._accept_thread = threading.Thread(target=self._accept_loop, name="bsmon-accept", daemon=True)
            self._accept_thread.start()

    # -- training thread ------------------------------------------------------
    def submit(self, record: dict[str, Any]) -> None:
        """Queue a record; never blocks. A full buffer drops it and counts the drop."""
        if len(self._buffer) >= BUFFER_CAPACITY:
            self.dropped += 1
            return
        self._buffer.append(record)

    # -- lifecycle ------------------------------------------------------------
    def close(self, bye: dict[str, Any]) -> None:
        """Flush everything, write ``bye``, end every stream and remove the socket."""
        self._stop.set()
        self._drain_thread.join()
        self._buffer.append(bye)
        self._flush()
        with self._lock:
            self._closing = True
        if self._server is not None:
            path = self._server.getsockname()
            # Monitors still in the listen queue get the whole run too. The accept thread is not
            # waited for (it sits in accept() for up to 0.2 s); it ends when the socket closes.
            self._accept_pending()
            self._server.close()
            try:
                os.unlink(path)
            except OSError:
                pass
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.finish()
        for client in clients:
            client.join(timeout=2.0)
        if self._writer is not None:
            self._writer.close()

    @property
    def recording_error(self) -> OSError | None:
        return None if self._writer is None else self._writer.error

    # -- background -----------------------------------------------------------
    def _drain_loop(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self._flush()

    def _flush(self) -> None:
        records = []
        while self._buffer:
            records.append(resolve(self._buffer.popleft()))
        if not records:
            return
        frames = []
        for record in records:
            try:
                frames.append(wire.encode(record))
            except (wire.ProtocolError, TypeError, ValueError) as exc:
                # A record we cannot encode is a bsmon bug; keep the run going and say so.
                frames.append(wire.encode(_event("error", f"bsmon could not encode a {record.get('k')} record: {exc}")))
        data = b"".join(frames)
        with self._lock:
            if self._writer is not None and not self._writer.append(data):
                data = self._recording_failed(data)
            for client in self._clients:
                client.push(data)
        self._on_records(records + self._drain_events())

    def _recording_failed(self, data: bytes) -> bytes:
        """Keep the frames for monitors, and report the failure once (to the job and the stream)."""
        if not self._reported_failure:
            self._reported_failure = True
            error = self._writer.error
            message = (f"recording to {self._writer.path} failed: {error}. "
                       "Training continues and live monitors still receive every step, "
                       "but the session file stops here.")
            print(f"bsmon: {message}", file=sys.stderr)
            event = _event("error", message)
            self._pending_events.append(event)
            data += wire.encode(event)
        if self._spill_bytes + len(data) <= SPILL_LIMIT:
            self._spill.append(data)
            self._spill_bytes += len(data)
        return data

    def _drain_events(self) -> list[dict]:
        events, self._pending_events = self._pending_events, []
        return events

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
            server.settimeout(0.2)
            return server
        except OSError as exc:
            server.close()
            print(f"bsmon: cannot listen on {path}: {exc}. The job is recorded but monitors "
                  "cannot attach live (use `bsmon replay`).", file=sys.stderr)
            return None

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._serve(conn)

    def _accept_pending(self) -> None:
        self._server.setblocking(False)
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

    def push(self, data: bytes) -> None:
        with self._wake:
            self._queue.append(data)
            self._queued_bytes += len(data)
            self._wake.notify()

    def finish(self) -> None:
        with self._wake:
            self._finished = True
            self._wake.notify()

    def run(self) -> None:
        try:
            if self._handshake():
                self._stream()
        except OSError:
            pass  # the monitor went away; that costs the job nothing
        finally:
            self._publisher._forget(self)
            self._conn.close()

    def _handshake(self) -> bool:
        """Read the monitor's attach frame; anything else ends this connection only."""
        self._conn.settimeout(HANDSHAKE_TIMEOUT_S)
        reader = wire.FrameReader()
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while time.monotonic() < deadline:
            data = self._conn.recv(4096)
            if not data:
                return False
            try:
                records = reader.feed(data)
            except wire.ProtocolError:
                return False
            if records:
                return records[0]["k"] == "attach"
        return False

    def _stream(self) -> None:
        self._conn.settimeout(None)
        self._conn.sendall(self._publisher._hello_frame)
        writer = self._publisher._writer
        if writer is not None and self._backlog_end > len(self._publisher._hello_frame):
            self._send_file(writer.path, len(self._publisher._hello_frame), self._backlog_end)
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
                size, self._queued_bytes = self._queued_bytes, 0
            if size > CLIENT_BACKLOG_LIMIT:
                return  # hopelessly behind: drop this monitor, it can re-attach
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
