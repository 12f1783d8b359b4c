import errno
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest

from bsmon.cli import default_signal_dispositions

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SMALL = Path(__file__).resolve().parent / "jobs" / "train_small.py"
#: Every process a test starts carries this variable (with a per-test value) in its environment,
#: and so do the processes those start: a job that `bsmon run` put in its own session, torchrun's
#: workers. That is how teardown finds them all, whoever their parent is by then.
TEST_TOKEN = "BSMON_TEST_PROCESS_TOKEN"
#: Ceiling of every wait in the end-to-end tests: generous, since CI machines are busy. A wait
#: ends early when its process dies (then the failure shows the process's stderr).
WAIT_S = 120


@pytest.fixture(autouse=True)
def bsmon_home(tmp_path, monkeypatch):
    """Every test gets its own BSMON_HOME so sessions never leak between tests."""
    home = tmp_path / "bsmon-home"
    monkeypatch.setenv("BSMON_HOME", str(home))
    for var in ("BSMON_SESSION_ID", "BSMON_NAME", "BSMON_RUN_NAME", "BSMON_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(autouse=True)
def no_process_left_behind(monkeypatch):
    """Pass or fail, every process the test started (and theirs) is killed with its process group."""
    token = uuid.uuid4().hex
    monkeypatch.setenv(TEST_TOKEN, token)
    yield
    kill_tagged(token)


_listdir = os.listdir  # teardown runs before the test's monkeypatches are undone (test_gpu patches this)


def _tagged(token: str) -> list[int]:
    mark = f"{TEST_TOKEN}={token}".encode()
    found = []
    for entry in _listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if mark in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            pass  # gone, or not ours
    return found


def kill_tagged(token: str) -> None:
    """SIGKILL every process carrying ``token`` and its process group (never pytest's own)."""
    own_group = os.getpgrp()
    for _ in range(3):  # a process may fork while we look
        pids = _tagged(token)
        if not pids:
            return
        for pid in pids:
            try:
                group = os.getpgid(pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running (a zombie waits only for its parent to read its status)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def spawn(args, *, ignore_sigint=False, preexec_fn=None, **kwargs) -> subprocess.Popen:
    """Start a process in its own process group with default signal dispositions.

    Default dispositions whatever pytest inherited: a suite started with SIGINT ignored (a script
    without job control, `nohup`) would otherwise pass the ignore on, and a test's SIGINT would do
    nothing. ``ignore_sigint`` starts it the `nohup ... &` way on purpose; ``preexec_fn`` runs after.
    """
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return subprocess.Popen(args, start_new_session=True, preexec_fn=_dispositions(ignore_sigint, preexec_fn),
                            **kwargs)


def _dispositions(ignore_sigint, then=None):
    def reset():
        default_signal_dispositions()
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if then is not None:
            then()
    return reset


def bsmon_cli(*args, timeout=WAIT_S, **kwargs):
    """Run the real `bsmon` command line in a subprocess and wait for it."""
    process = spawn([sys.executable, "-m", "bsmon.cli", *args], cwd=kwargs.pop("cwd", ROOT), **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"bsmon {' '.join(args)} still running after {timeout} s; stderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def train_command(*args):
    return [sys.executable, str(TRAIN_SMALL), *args]


def start_job(*args, **kwargs):
    """Start the small training job as a plain process (not under `bsmon run`)."""
    return spawn(train_command(*args), **kwargs)


def wait_for(condition, what, process=None, timeout=WAIT_S, output=None):
    """Wait until ``condition()`` holds; fail after ``timeout`` s, or at once if ``process`` exits first,
    showing the end of its stderr (or of ``output()``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            if condition():
                return
            text = output() if output is not None else _stderr(process)
            pytest.fail(f"waiting for {what}: the process exited with code {process.returncode}; "
                        f"its output ends:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            text = f"; its output ends:\n{output()[-3000:]}" if output is not None else ""
            pytest.fail(f"{what} did not happen within {timeout} s{text}")
        time.sleep(0.05)


def _stderr(process) -> str:
    """The rest of a dead process's stderr (its stdout when stderr went there)."""
    if process.stderr is None and process.stdout is None:
        return "(not captured)"
    try:
        stdout, stderr = process.communicate(timeout=10)
    except (ValueError, subprocess.TimeoutExpired):
        return "(unreadable)"
    return (stderr if process.stderr is not None else stdout) or ""


class Terminal:
    """A command in a real pseudo-terminal, as its controlling terminal (so closing it is a hang-up).

    A thread drains the screen's output into ``screen`` so the program never blocks writing.
    """

    def __init__(self, args, *, columns=120, rows=40, cwd=None, ignore_sigint=False) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

        reset = _dispositions(ignore_sigint)

        def take_terminal():
            reset()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(columns), LINES=str(rows))
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                        start_new_session=True, preexec_fn=take_terminal)
        os.close(slave)
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            if not select.select([self.master], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError as exc:  # EIO: every process has closed the terminal
                if exc.errno != errno.EIO:
                    raise
                return
            if not data:
                return
            with self._lock:
                self._chunks.append(data)

    def output(self) -> str:
        """Everything written to the terminal so far, escape sequences included."""
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def wait_for_text(self, text: str, timeout=WAIT_S) -> None:
        wait_for(lambda: text in self.output(), f"{text!r} on the terminal", self.process, timeout, self.output)

    def press(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def hang_up(self) -> None:
        """Close the terminal, as an SSH drop or `tmux kill-session` does: the kernel sends SIGHUP."""
        self._closed.set()
        self._reader.join()
        os.close(self.master)
        self.master = None

    def close(self) -> None:
        if self.master is not None:
            self.hang_up()


def wait_for_line(process, text, timeout=WAIT_S) -> str:
    """Read ``process``'s stdout until a line contains ``text``; fail if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.1)[0]:
            line = process.stdout.readline()
            if text in line:
                return line
            if not line:
                break  # end of output: the process is gone
    wait_for(lambda: False, f"a line with {text!r} on stdout", process, max(0.0, deadline - time.monotonic()))
