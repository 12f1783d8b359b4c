"""The TUI of `bsmon run` and `bsmon attach` in a real pseudo-terminal: keys, detach, export, and the
terminal going away (an SSH drop) under a running job."""

import csv
import signal
import sys

import pytest

from bsmon import store
from conftest import WAIT_S, Terminal, _alive, spawn, start_job, train_command, wait_for

BSMON = [sys.executable, "-m", "bsmon.cli"]
DRAWN = "samples/s"  # on the screen once the throughput panel shows a number


def only_session(status=None):
    sessions = store.list_sessions()
    if len(sessions) != 1 or (status is not None and sessions[0].status != status):
        return None
    return sessions[0]


def wait_for_status(status, process=None):
    wait_for(lambda: only_session(status) is not None, f"the session to be {status}", process)
    return only_session()


@pytest.fixture
def terminals():
    opened = []

    def open_terminal(args, **kwargs):
        opened.append(Terminal(args, **kwargs))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


def test_a_hang_up_detaches_and_the_job_keeps_training_and_recording(tmp_path, terminals):
    ready = tmp_path / "ready"
    term = terminals([*BSMON, "run", "--", *train_command("--steps", "400", "--sleep", "0.02",
                                                          "--ready-file", str(ready))], cwd=tmp_path)
    term.wait_for_text(DRAWN)
    term.hang_up()
    assert term.process.wait(timeout=WAIT_S) == 0  # detached, as after `q`
    info = wait_for_status("finished")  # not killed by the hang-up: it trained to the end
    assert info.steps == 400 and info.exit_code in (None, 0)
    assert "trained 400 steps" in (info.directory / store.OUTPUT_FILE).read_text()


def test_a_hang_up_with_on_hangup_forward_ends_the_job(tmp_path, terminals):
    term = terminals([*BSMON, "run", "--on-hangup=forward", "--",
                      *train_command("--steps", "100000", "--sleep", "0.01")], cwd=tmp_path)
    term.wait_for_text(DRAWN)
    term.hang_up()
    assert term.process.wait(timeout=WAIT_S) == 128 + signal.SIGHUP
    info = wait_for_status("failed")
    assert info.exit_code == 128 + signal.SIGHUP


def test_a_hang_up_under_headless_run_leaves_the_job_running(tmp_path):
    ready = tmp_path / "ready"
    monitor = spawn([*BSMON, "run", "--headless", "--", *train_command("--steps", "100000", "--sleep", "0.01",
                                                                       "--ready-file", str(ready))])
    wait_for(ready.exists, "the job's first step", monitor)
    monitor.send_signal(signal.SIGHUP)
    assert monitor.wait(timeout=WAIT_S) == 0
    info = only_session("running")
    assert info is not None and _alive(info.pid)


def test_q_detaches_and_e_exports_in_run_mode(tmp_path, terminals):
    term = terminals([*BSMON, "run", "--", *train_command("--steps", "100000", "--sleep", "0.01")], cwd=tmp_path)
    term.wait_for_text(DRAWN)
    info = only_session("running")
    term.press("e")
    csv_path = tmp_path / f"bsmon-{info.name}-{info.id}.csv"
    wait_for(csv_path.exists, "the exported CSV", term.process, output=term.output)
    term.wait_for_text("CSV written to")
    rows = list(csv.DictReader(csv_path.open()))
    assert rows and [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    term.press("q")
    assert term.process.wait(timeout=WAIT_S) == 0
    term.wait_for_text(f"bsmon: detached; the job (pid {info.pid}) keeps running")
    assert _alive(info.pid) and only_session("running") is not None


def test_ctrl_c_in_run_mode_interrupts_the_job_even_when_bsmon_ignores_sigint(tmp_path, terminals):
    """`nohup bsmon run ... &` starts bsmon with SIGINT ignored; the job still gets the default."""
    term = terminals([*BSMON, "run", "--", *train_command("--steps", "100000", "--sleep", "0.01")], cwd=tmp_path,
                     ignore_sigint=True)
    term.wait_for_text(DRAWN)
    term.press("\x03")  # Ctrl-C
    term.wait_for_text("failed (SIGINT)")  # the view stays open and says how the job ended
    assert term.process.poll() is None
    term.press("q")
    assert term.process.wait(timeout=WAIT_S) == 128 + signal.SIGINT
    info = only_session("failed")
    bye = [r for r in store.read_records(info.records_path)[0] if r["k"] == "bye"][-1]
    assert "KeyboardInterrupt" in bye["error"] and bye["code"] == 128 + signal.SIGINT


def test_attach_in_a_terminal_exports_and_q_leaves_the_job_alone(tmp_path, terminals):
    ready = tmp_path / "ready"
    job = start_job("--steps", "100000", "--sleep", "0.01", "--ready-file", str(ready))
    wait_for(ready.exists, "the job's first step", job)
    term = terminals([*BSMON, "attach"], cwd=tmp_path)
    term.wait_for_text(DRAWN)
    term.press("e")
    info = only_session()
    wait_for((tmp_path / f"bsmon-{info.name}-{info.id}.csv").exists, "the exported CSV", term.process,
             output=term.output)
    term.press("q")
    assert term.process.wait(timeout=WAIT_S) == 0
    assert job.poll() is None


def test_replay_in_a_terminal_shows_the_record_and_q_quits(tmp_path, terminals):
    recorded = spawn([*BSMON, "run", "--headless", "--", *train_command("--steps", "30")])
    assert recorded.wait(timeout=WAIT_S) == 0
    (info,) = store.list_sessions()
    term = terminals([*BSMON, "replay", info.id], cwd=tmp_path)
    term.wait_for_text("step 30")
    term.press("q")
    assert term.process.wait(timeout=WAIT_S) == 0
