"""The monitor side at scale: listing, export, replay, attach, memory and the TUI's CPU.

Sessions are made by the real probe: ``bsmon.watch()`` on a tiny, fast CPU loop (a 4->1
linear model, 2 micro-batches of 4 per optimizer step so the micro-batch noise estimator
measures, ``log(loss=...)`` every 10 steps). That loop makes about 1,500 steps/s on this
2-core machine, so a 1M-step session takes ~11 minutes to record. Sessions are recorded once
into a cache (``/tmp/bsmon-monitor-scale/v<protocol>/``) and reused; ``--fresh`` re-records.

The 10M-step session is too slow to record with the probe (~2 hours), so it is made from the
recorded 1M-step session: its hello, then its step and scalars records ten times over with
step numbers and times shifted by the 1M block's span (re-encoded with ``bsmon.wire``), then
its bye. Everything in it is a record the probe wrote, only repeated.

Every figure is measured in a fresh subprocess (wall and CPU time; peak resident memory, the
process's VmHWM), against the issue's targets, with a same-run baseline where one exists:

* ``bsmon ls`` with the big session present, and with 100 sessions (100 watch()/close()
  sessions of 1,000 steps made by one process);
* ``bsmon export`` in steps/s, against reading and decoding the file once, and side by side
  with ingesting it once into the session model (the part of an export that is not its own),
  and without the session's summary (the first pass then reads the file for the header);
* replay to the final screen (the real Textual app under Pilot at 200x60, and
  ``bsmon replay --headless``), per 100k steps;
* attach to a running job with a big backlog: time until the first full screen shows
  the backlog's last step (the real app under Pilot at 200x60), from the job's checkpoint,
  against the same attach made to refuse the checkpoint and read the whole backlog;
* peak resident memory of attach, replay and export at 10M steps (attach: the live attach is
  measured with a 1M backlog, and at every length what a late monitor loads first, the
  checkpoint a job with the session's records writes);
* the TUI's CPU (``bsmon attach`` in a pseudo-terminal of 200x60) with the job at ~1 kHz,
  against the job's own CPU, and with the job idle.

Run: .venv/bin/python benchmarks/monitor_scale.py [--quick] [--fresh]
  --quick: 100k-step sessions and 1M for the "10M" figure, short CPU windows (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CACHE = Path("/tmp/bsmon-monitor-scale")
PYTHON = sys.executable
HERE = Path(__file__).resolve()
MiB = 1 << 20


# -- the job ------------------------------------------------------------------------------------
def job(args: argparse.Namespace) -> None:
    """The training loop the sessions come from (run as a subprocess: ``monitor_scale.py job``).

    ``--steps`` as fast as it goes; then, with ``--ready-file``, touch it and go on at
    ``--hz`` steps/s (0: idle, no steps) until ``--stop-file`` appears.
    """
    import torch
    from torch import nn

    import bsmon

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 4), torch.randn(64, 1)

    def step(i: int, monitor) -> None:
        for k in range(2):
            j = (i * 8 + k * 4) % 60
            nn.functional.mse_loss(model(x[j:j + 4]), y[j:j + 4]).backward()
        optimizer.step()
        optimizer.zero_grad()
        if i % 10 == 0:
            monitor.log(loss=float(1.0 / (1 + i * 1e-4)))

    for _ in range(args.sessions):
        monitor = bsmon.watch(model, optimizer, name="scale")
        start = time.perf_counter()
        for i in range(args.steps):
            step(i, monitor)
        rate = args.steps / (time.perf_counter() - start)
        if args.ready_file:
            Path(args.ready_file).write_text(json.dumps({"steps_per_s": rate, "session": monitor.session_id}))
            i, next_at = args.steps, time.monotonic()
            while not Path(args.stop_file).exists():
                if args.hz <= 0:
                    time.sleep(0.1)
                    continue
                step(i, monitor)
                i += 1
                next_at += 1.0 / args.hz
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        monitor.close()
    print(json.dumps({"steps_per_s": rate}), flush=True)


# -- measuring subprocesses ---------------------------------------------------------------------
@dataclass
class Run:
    wall_s: float
    cpu_s: float
    rss_mib: float
    stdout: str


def measure(command: list[str], home: Path, *, stdin: int | None = subprocess.DEVNULL) -> Run:
    """Run ``command`` with BSMON_HOME=home; its wall time, CPU time and peak resident memory.

    The peak is the process's own VmHWM, polled from /proc while it runs: wait4's ru_maxrss
    would count this (big) process's pages, which a vfork()ed child shares until it execs.
    """
    env = {**os.environ, "BSMON_HOME": str(home)}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    out, err, peak = [], [], [0]
    readers = [threading.Thread(target=lambda s, b: b.append(s.read()), args=(s, b), daemon=True)
               for s, b in ((process.stdout, out), (process.stderr, err))]
    for reader in readers:
        reader.start()

    def poll() -> None:
        while process.returncode is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    for thread in (*readers, poller):
        thread.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {''.join(err)[-2000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, peak[0] / 1024, "".join(out))


def bsmon_cli(*args: str) -> list[str]:
    return [PYTHON, "-m", "bsmon.cli", *args]


def helper(*args: str) -> list[str]:
    return [PYTHON, str(HERE), *args]


def protocol_version() -> int:
    from bsmon import wire

    return wire.PROTOCOL_VERSION


def recorded_home(name: str, make) -> Path:
    """A BSMON_HOME under the cache, made once by ``make(home)`` and reused."""
    home = CACHE / f"v{protocol_version()}" / name
    if (home / "complete").exists():
        return home
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    start = time.perf_counter()
    info = make(home)
    (home / "complete").write_text(json.dumps({"made_in_s": time.perf_counter() - start, **(info or {})}))
    return home


def record_session(home: Path, steps: int, sessions: int = 1) -> dict:
    env = {**os.environ, "BSMON_HOME": str(home)}
    out = subprocess.run(helper("job", "--steps", str(steps), "--sessions", str(sessions)), env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def session_dir(home: Path) -> Path:
    (directory,) = [d for d in (home / "sessions").iterdir() if d.is_dir()]
    return directory


def repeat_session(source: Path, home: Path, times: int) -> dict:
    """``times`` copies of ``source``'s step and scalars records, shifted in step and time (see the docstring)."""
    from bsmon import store, wire

    records, _ = store.read_records(source / store.RECORDS_FILE)
    hello, bye = records[0], records[-1]
    assert hello["k"] == "hello" and bye["k"] == "bye", "the source session must be complete"
    body = [r for r in records[1:-1] if r["k"] in ("step", "scalars")]
    steps = max(r["step"] for r in body if r["k"] == "step")
    span = max(r["t"] for r in body if r["k"] == "step") - hello["t0"]
    directory = home / "sessions" / source.name
    directory.mkdir(parents=True)
    with open(directory / store.RECORDS_FILE, "wb") as out:
        out.write(wire.encode(hello))
        out.write(b"".join(wire.encode(r) for r in records[1:-1] if r["k"] not in ("step", "scalars")))
        for copy in range(times):
            shift_step, shift_t = copy * steps, copy * span
            out.write(b"".join(wire.encode({**r, "step": r["step"] + shift_step,
                                            **({"t": r["t"] + shift_t} if "t" in r else {})}) for r in body))
        out.write(wire.encode({**bye, "t": bye["t"] + (times - 1) * span}))
    return {"steps": steps * times}


class LiveJob:
    """The job, recorded into ``home``: ``steps`` fast, then ``hz`` steps/s until stopped."""

    def __init__(self, home: Path, steps: int, hz: float) -> None:
        self.home = home
        self.ready = home / "ready"
        self.stop_file = home / "stop"
        for path in (self.ready, self.stop_file):
            path.unlink(missing_ok=True)
        env = {**os.environ, "BSMON_HOME": str(home)}
        self.process = subprocess.Popen(helper("job", "--steps", str(steps), "--hz", str(hz), "--ready-file",
                                               str(self.ready), "--stop-file", str(self.stop_file)),
                                        env=env, stdout=subprocess.DEVNULL)
        while not self.ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"the job exited with {self.process.returncode} before it was ready")
            time.sleep(0.2)
        time.sleep(0.1)
        self.session = json.loads(self.ready.read_text())["session"]

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def recorded_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.home / "sessions").glob("*/records.bsr"))

    #: The recorded file's bytes per step of this loop (a binary step frame, a scalars record every 10).
    bytes_per_step = 98

    def stop(self) -> None:
        self.stop_file.touch()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the TUI under Pilot (run as a helper subprocess, so its memory is its own) ------------------
def process_age_s() -> float:
    """Seconds since this process started (the kernel's clock ticks): start-up and imports included."""
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def first_screen(args: argparse.Namespace) -> None:
    """Open the real app (replay or attach) at 200x60; print the seconds from this process's start
    (Python's, the imports' and Textual's start-up included) until it shows ``--step``."""
    from bsmon import checkpoint, store
    from bsmon.client import Feed
    from bsmon.tui.app import BsmonApp
    from bsmon.tui.widgets import JobHeader

    start = time.perf_counter()
    info = store.resolve_session(args.session)
    feed = Feed()
    if args.mode == "attach":
        saved = info.directory / checkpoint.CHECKPOINT_FILE
        if args.refuse_checkpoint:  # the baseline: made group-writable, the monitor refuses it and reads everything
            saved.chmod(0o620)
        try:
            feed.attach(info.socket, info.directory)
        finally:
            if args.refuse_checkpoint:
                saved.chmod(0o600)
    else:
        feed.replay(info)
    app = BsmonApp(feed, mode=args.mode)

    async def run() -> float:
        async with app.run_test(size=(200, 60)) as pilot:
            header = app.query_one(JobHeader)
            while f"step {args.step:,}" not in header.line("title"):
                if time.perf_counter() - start > 600:
                    raise TimeoutError(f"no screen with step {args.step:,} in 600 s: {header.line('title')}")
                await pilot.pause(0.02)
            await pilot.pause()  # the frame with it is composited
            return process_age_s()

    seconds = asyncio.run(run())
    feed.stop()
    print(json.dumps({"seconds": seconds, "resumed_from": feed.resumed_from, "received": feed.received_bytes,
                      "checkpoint_note": feed.checkpoint_note}))


def make_checkpoint(args: argparse.Namespace) -> None:
    """The checkpoint a job with this session's records writes at its last step: the model of a
    full read, which equals the job's own (tests/test_checkpoint.py), pickled, into ``--out``."""
    import pickle

    from bsmon import checkpoint, store
    from bsmon.client import Feed

    path = Path(args.path)
    feed = Feed()
    for batch in store.iter_record_batches(path, blocks=True):
        feed._ingest(batch)
    body = pickle.dumps(feed.model, protocol=pickle.HIGHEST_PROTOCOL)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    checkpoint.write(Path(args.out), checkpoint.encode(body, path.parent.name, path.stat().st_size))
    print(json.dumps({"bytes": len(body)}))


def load_checkpoint(args: argparse.Namespace) -> None:
    """What a late monitor loads before its first screen (measured for its time and memory)."""
    from bsmon import checkpoint

    loaded = checkpoint.read(Path(args.out), args.session)
    if isinstance(loaded, str):
        raise SystemExit(loaded)
    print(json.dumps({"steps": loaded[0].steps_done}))


def read_once(args: argparse.Namespace) -> None:
    """The baseline for export: read and decode every record of the session file once."""
    from bsmon import store

    records, _ = store.read_records(Path(args.path))
    print(json.dumps({"records": len(records)}))


def ingest_once(args: argparse.Namespace) -> None:
    """The export's other baseline: the records ingested once into a SessionModel that makes the
    steps' rows, as the export's second pass does, with no column or cell made from them."""
    from bsmon import store
    from bsmon.model import SessionModel

    model, rows = SessionModel(keep_history=False), []
    model.on_step_rows = lambda table: rows.append(len(table))
    for batch in store.iter_record_batches(Path(args.path), blocks=True):
        model.ingest_all(batch)
    print(json.dumps({"rows": sum(rows)}))


# -- the TUI's CPU in a pseudo-terminal ------------------------------------------------------------
#: How long ``bsmon attach`` may take to draw its first screen before the benchmark gives up.
STARTUP_CEILING_S = 120.0


def tui_cpu(home: Path, session: str, job: LiveJob, window_s: float, settle_s: float) -> tuple[float, float, float]:
    """(TUI CPU, job CPU) as shares of a core over ``window_s``, ``bsmon attach`` at 200x60 in a pty,
    and the job's steps/s (from its session file's growth)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(BSMON_HOME=str(home), TERM="xterm-256color", COLUMNS="200", LINES="60")
        os.execv(PYTHON, [PYTHON, "-m", "bsmon.cli", "attach", session])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    stop, drawn = threading.Event(), threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                output = os.read(fd, 1 << 16)
            except OSError:
                return
            if not output:
                return
            if b"Throughput" in output:  # a panel's title: the first full screen is out
                drawn.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        # the window opens after the first full screen (start-up, imports and the backlog are not
        # what a running TUI costs; on a loaded machine they take longer than any fixed pause)
        if not drawn.wait(STARTUP_CEILING_S):
            raise RuntimeError(f"bsmon attach drew no screen in {STARTUP_CEILING_S:.0f} s")
        time.sleep(settle_s)
        tui0, job0, step0, t0 = process_cpu_s(pid), job.cpu_s(), job.recorded_bytes(), time.perf_counter()
        time.sleep(window_s)
        tui1, job1, step1, t1 = process_cpu_s(pid), job.cpu_s(), job.recorded_bytes(), time.perf_counter()
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        stop.set()
        os.close(fd)
    return (tui1 - tui0) / (t1 - t0), (job1 - job0) / (t1 - t0), (step1 - step0) / job.bytes_per_step / (t1 - t0)


# -- the benchmark ---------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> None:
    big = 100_000 if args.quick else 1_000_000
    window = 5.0 if args.quick else 20.0
    if args.fresh:
        shutil.rmtree(CACHE / f"v{protocol_version()}", ignore_errors=True)
    print(f"bsmon monitor at scale ({'quick' if args.quick else 'full'}), protocol v{protocol_version()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[tuple[str, str, str, str]] = []

    def row(work: str, figure: str, target: str, verdict: bool | None, note: str = "") -> None:
        mark = "" if verdict is None else ("PASS" if verdict else "FAIL")
        rows.append((work, figure, target, f"{mark} {note}".strip()))
        print(f"  {work}: {figure} (target {target}) {mark} {note}", flush=True)

    if args.only != "tui":
        measure_sessions(args, row, big)
    if args.only in ("all", "tui"):
        measure_live(args, row, big, window)

    print("\n| work | measured | target | verdict |\n| --- | --- | --- | --- |")
    for work, figure, target, verdict in rows:
        print(f"| {work} | {figure} | {target} | {verdict} |")
    print(f"\nload at the end: {os.getloadavg()[0]:.2f}")


def measure_sessions(args: argparse.Namespace, row: Callable[..., None], big: int) -> None:
    """ls, export and replay of recorded sessions."""
    huge_times = 10
    home_big = recorded_home(f"steps-{big}", lambda home: record_session(home, big))
    made = json.loads((home_big / "complete").read_text())
    print(f"  the {big:,}-step session: recorded at {made['steps_per_s']:,.0f} steps/s", flush=True)
    home_many = recorded_home("sessions-100", lambda home: record_session(home, 1000, sessions=100))
    home_huge = recorded_home(f"steps-{big * huge_times}",
                              lambda home: repeat_session(session_dir(home_big), home, huge_times))
    huge = big * huge_times
    big_dir, huge_dir = session_dir(home_big), session_dir(home_huge)
    size = (big_dir / "records.bsr").stat().st_size
    print(f"  file: {size / MiB:.1f} MiB for {big:,} steps ({size / big:.0f} bytes a step)", flush=True)

    # ls: the first listing writes the summary of a session recorded without one (an older probe)
    if args.only != "export":
        for label, home, target in ((f"one {big:,}-step session", home_big, 0.3), ("100 sessions", home_many, 1.0)):
            first, run = measure(bsmon_cli("ls"), home), measure(bsmon_cli("ls"), home)
            row(f"bsmon ls, {label}", f"{run.wall_s:.2f} s, {run.rss_mib:.0f} MiB", f"<= {target:g} s",
                run.wall_s <= target, f"(first listing {first.wall_s:.2f} s)")
        version = measure(bsmon_cli("--help"), home_many)
        print(f"    (baseline: `bsmon --help`, the interpreter and import, {version.wall_s:.2f} s)")

    # export
    csv = CACHE / "export.csv"
    for label, directory, steps in ((f"{big:,}", big_dir, big), (f"{huge:,}", huge_dir, huge))[:2 - args.skip_huge]:
        home = home_big if directory is big_dir else home_huge
        measure(bsmon_cli("ls"), home)  # the repeated session gets the summary bsmon writes for one without
        read = measure(helper("read-once", str(directory / "records.bsr")), home)
        ingest = measure(helper("ingest-once", str(directory / "records.bsr")), home)
        run = measure(bsmon_cli("export", directory.name, "-o", str(csv)), home)
        summary, hidden = directory / "summary.json", directory / "summary.json.hidden"
        summary.rename(hidden)  # without it (an older session), the export's first pass reads the file for the header
        try:
            scanned = measure(bsmon_cli("export", directory.name, "-o", str(csv)), home)
        finally:
            hidden.rename(summary)
        rate = steps / run.wall_s
        row(f"bsmon export, {label} steps", f"{rate:,.0f} steps/s ({run.wall_s:.1f} s, {run.rss_mib:.0f} MiB)",
            ">= 100k steps/s" + (", <= 250 MB" if directory is huge_dir else ""),
            rate >= 100_000 and (directory is not huge_dir or run.rss_mib * MiB <= 250e6),
            f"x{run.wall_s / read.wall_s:.1f} of reading the file once ({read.wall_s:.1f} s, {read.rss_mib:.0f} MiB)")
        # side by side: the export against the ingest it cannot do without; the difference is its own
        # cost (CPU time: on a busy machine the steadier figure)
        print(f"    side by side: export {run.wall_s:.1f} s ({run.cpu_s:.1f} s CPU), ingesting the file once into "
              f"the model {ingest.wall_s:.1f} s ({ingest.cpu_s:.1f} s CPU), fresh processes: the export's own "
              f"{(run.cpu_s - ingest.cpu_s) / (steps / 100_000):.2f} s CPU per 100k steps; without the summary "
              f"(the first pass reads the file): {scanned.wall_s:.1f} s, {steps / scanned.wall_s:,.0f} steps/s",
              flush=True)
    csv.unlink(missing_ok=True)

    # replay
    if args.only == "export":
        return
    for label, home, directory, steps in ((f"{big:,}", home_big, big_dir, big),
                                          (f"{huge:,}", home_huge, huge_dir, huge))[:2 - args.skip_huge]:
        run = measure(helper("first-screen", "replay", directory.name, str(steps)), home)
        seconds = json.loads(run.stdout)["seconds"]
        per = seconds / (steps / 100_000)
        row(f"TUI replay to the final screen, {label} steps", f"{per:.2f} s per 100k ({seconds:.1f} s, "
            f"{run.rss_mib:.0f} MiB)", "<= 1 s per 100k" + (", <= 250 MB" if steps == huge else ""),
            per <= 1.0 and (steps != huge or run.rss_mib * MiB <= 250e6))
        run = measure(bsmon_cli("replay", "--headless", directory.name), home)
        per = run.wall_s / (steps / 100_000)
        row(f"bsmon replay --headless, {label} steps", f"{per:.2f} s per 100k ({run.wall_s:.1f} s, "
            f"{run.rss_mib:.0f} MiB)", "<= 1 s per 100k", per <= 1.0)
        # a late monitor's start: the live attach is measured below on a job with a 1M backlog (recording
        # 10M steps live would take hours); here what it loads at this session's length
        saved = CACHE / "checkpoint"
        made = json.loads(measure(helper("make-checkpoint", str(directory / "records.bsr"), str(saved)), home).stdout)
        run = measure(helper("load-checkpoint", str(saved), directory.name), home)
        row(f"a late monitor's start at {label} steps: the job's checkpoint loaded",
            f"{made['bytes'] / MiB:.2f} MiB, {run.wall_s:.2f} s, {run.rss_mib:.0f} MiB", "<= 250 MB",
            run.rss_mib * MiB <= 250e6, "(Python and the imports included)")
        shutil.rmtree(saved, ignore_errors=True)


def measure_live(args: argparse.Namespace, row: Callable[..., None], big: int, window: float) -> None:
    """Attach with a backlog; then the TUI's CPU with the job idle and at ~1 kHz (a 1,000-step backlog)."""
    backlog = 100_000 if args.quick else big
    for steps, hz in ((backlog, None), (1000, 0), (1000, 1000)):
        home_live = CACHE / "live"
        shutil.rmtree(home_live, ignore_errors=True)
        home_live.mkdir(parents=True)
        live = LiveJob(home_live, steps, hz=hz or 0)
        try:
            if hz is None:
                size = live.recorded_bytes()
                for refuse in (True, False):  # the baseline first: the whole backlog, as before checkpoints
                    run = measure(helper("first-screen", "attach", live.session, str(steps),
                                         *(["--refuse-checkpoint"] if refuse else [])), home_live)
                    shown = json.loads(run.stdout)
                    figure = (f"{shown['seconds']:.2f} s, {run.rss_mib:.0f} MiB, {shown['received'] / MiB:.1f} of "
                              f"{size / MiB:.1f} MiB received")
                    if refuse:
                        baseline = shown["seconds"]
                        row(f"attach, {steps:,}-step backlog, without the job's checkpoint (baseline)", figure, "",
                            None, f"({shown['checkpoint_note']})")
                    else:
                        row(f"attach, {steps:,}-step backlog: the first full screen", figure, "<= 2 s",
                            shown["seconds"] <= 2.0, f"x{shown['seconds'] / baseline:.2f} of the baseline"
                            + ("" if shown["resumed_from"] else f"; no checkpoint: {shown['checkpoint_note']}"))
                continue
            tui, job_cpu, rate = tui_cpu(home_live, live.session, live, window, settle_s=3.0)
            if hz == 0:
                row("TUI at 200x60, job idle", f"{tui:.1%} of a core", "<= 1%", tui <= 0.01)
            else:
                row("TUI at 200x60, job at ~1 kHz", f"{tui:.1%} of a core", "<= 5%", tui <= 0.05,
                    f"x{tui / job_cpu:.3f} of the job's CPU ({job_cpu:.0%} of a core, {rate:,.0f} steps/s)")
        finally:
            live.stop()
    shutil.rmtree(CACHE / "live", ignore_errors=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    j = sub.add_parser("job")
    j.add_argument("--steps", type=int, required=True)
    j.add_argument("--sessions", type=int, default=1)
    j.add_argument("--hz", type=float, default=0.0)
    j.add_argument("--ready-file")
    j.add_argument("--stop-file")
    s = sub.add_parser("first-screen")
    s.add_argument("mode", choices=("replay", "attach"))
    s.add_argument("session")
    s.add_argument("step", type=int)
    s.add_argument("--refuse-checkpoint", action="store_true",
                   help="attach: make the job's checkpoint one the monitor refuses, so it reads the whole backlog")
    m = sub.add_parser("make-checkpoint")
    m.add_argument("path")
    m.add_argument("out")
    c = sub.add_parser("load-checkpoint")
    c.add_argument("out")
    c.add_argument("session")
    r = sub.add_parser("read-once")
    r.add_argument("path")
    i = sub.add_parser("ingest-once")
    i.add_argument("path")
    parser.add_argument("--quick", action="store_true", help="100k-step sessions, short CPU windows")
    parser.add_argument("--only", choices=("all", "tui", "sessions", "export"), default="all",
                        help="tui: only attach and the TUI's CPU (no recorded sessions needed); "
                             "sessions: only ls, export, replay and the checkpoint; export: only the export")
    parser.add_argument("--fresh", action="store_true", help="record the sessions again")
    parser.add_argument("--skip-huge", action="store_true",
                        help="leave out the 10x session (a monitor without bounded memory needs hours and GBs)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    helpers = {"job": job, "first-screen": first_screen, "read-once": read_once, "ingest-once": ingest_once,
               "make-checkpoint": make_checkpoint, "load-checkpoint": load_checkpoint}
    helpers.get(arguments.cmd, main)(arguments)
