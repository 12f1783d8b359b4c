import os
import resource
import subprocess
import sys
import textwrap

import pytest

from bsmon import store, wire


def _hello(session, name, t0=1.0, socket_path=None):
    return {"k": "hello", "v": wire.PROTOCOL_VERSION, "session": session, "name": name, "pid": 1, "t0": t0,
            "command": ["python", "x.py"], "host": "h", "user": "u", "unit": "samples", "socket": socket_path}


def _write_session(home, session, name, steps=3, bye=True, t0=1.0):
    directory = store.sessions_dir(home) / session
    directory.mkdir(parents=True)
    records = [_hello(session, name, t0)]
    records += [{"k": "step", "step": i, "t": t0 + i, "dt": 0.1, "n": 8, "mb": 1, "dropped": 0}
                for i in range(1, steps + 1)]
    if bye:
        records.append({"k": "bye", "t": t0 + steps + 1, "status": "finished", "code": 0})
    (directory / store.RECORDS_FILE).write_bytes(b"".join(wire.encode(r) for r in records))
    return directory


def test_torn_last_record_is_tolerated(bsmon_home):
    directory = _write_session(bsmon_home, "aaaa1111", "job", bye=False)
    path = directory / store.RECORDS_FILE
    with open(path, "ab") as handle:
        handle.write(wire.encode({"k": "step", "step": 4, "t": 5, "dt": 0.1, "n": 8, "mb": 1, "dropped": 0})[:-5])
    records, torn = store.read_records(path)
    assert [r["k"] for r in records] == ["hello", "step", "step", "step"]
    assert torn > 0
    info = store.session_info(directory)
    assert info.steps == 3 and info.status == "lost" and info.torn_bytes == torn


def test_resolve_by_id_prefix_and_name(bsmon_home):
    _write_session(bsmon_home, "abcd0001", "alpha", t0=1)
    _write_session(bsmon_home, "abce0002", "beta", t0=2)
    _write_session(bsmon_home, "ffff0003", "beta2", t0=3)
    assert store.resolve_session("abcd0001").name == "alpha"
    assert store.resolve_session("abce").name == "beta"
    assert store.resolve_session("beta").id == "abce0002"
    assert store.resolve_session(None).id == "ffff0003"  # newest
    with pytest.raises(store.SessionError, match="ambiguous.*abcd0001.*abce0002"):
        store.resolve_session("abc")
    with pytest.raises(store.SessionError, match="no session matches 'zzz'"):
        store.resolve_session("zzz")
    with pytest.raises(store.SessionError, match="no running job"):
        store.resolve_session(None, running=True)


def test_status_from_bye_and_socket(bsmon_home):
    _write_session(bsmon_home, "f0000001", "ok")
    failed = _write_session(bsmon_home, "f0000002", "bad", bye=False)
    with open(failed / store.RECORDS_FILE, "ab") as handle:
        handle.write(wire.encode({"k": "bye", "t": 9, "status": "failed", "code": 1}))
    _write_session(bsmon_home, "f0000003", "gone", bye=False)
    statuses = {s.name: s.status for s in store.list_sessions()}
    assert statuses == {"ok": "finished", "bad": "failed", "gone": "lost"}


def test_stale_socket_is_detected_and_removed(bsmon_home, tmp_path):
    import socket as socketlib

    path = str(store.socket_dir(bsmon_home) / "dead.sock")
    server = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    server.bind(path)
    server.close()  # the file stays, nobody listens: what a killed job leaves
    directory = _write_session(bsmon_home, "dead0001", "dead", bye=False)
    (directory / store.RECORDS_FILE).write_bytes(wire.encode(_hello("dead0001", "dead", socket_path=path)))
    info = store.session_info(directory)
    assert info.status == "lost"
    assert store.remove_stale_socket(info) and not os.path.exists(path)


def test_socket_dir_falls_back_for_long_homes(tmp_path):
    home = tmp_path / ("deep" * 30)
    directory = store.socket_dir(home)
    assert len(str(directory / "0123456789abcdef.sock")) <= 100
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    assert store.socket_dir(home) == directory  # stable for the same home


def test_record_writer_reports_a_full_disk_without_raising(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size: a real failed write, as on a full disk."""
    script = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        from bsmon.store import RecordWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        w = RecordWriter(Path({str(tmp_path / 'r.bsr')!r}))
        print(w.append(b"x" * 600), w.append(b"y" * 600), w.append(b"z"), w.durable_bytes, w.error.errno)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "False", "600", "27"]  # EFBIG; the second frame is not counted


def test_record_writer_on_unwritable_path(tmp_path):
    writer = store.RecordWriter(tmp_path / "missing-dir" / "r.bsr")
    assert writer.error is not None and writer.append(b"data") is False
