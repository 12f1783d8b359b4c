"""``bsmon run | attach | ls | export | replay | demo``: thin commands over the parts.

Exit codes: ``run`` and ``demo`` exit with the job's code; 2 is a usage error;
1 is any other failure, always with a one-line message on stderr saying what
to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from bsmon import fmt, store, terminal, wire

if TYPE_CHECKING:  # the commands import them when they run: `bsmon ls` needs neither numpy nor the model
    from bsmon.client import Feed


def _fail(message: str, code: int = 1) -> int:
    print(f"bsmon: {message}", file=sys.stderr)
    return code


# -- the job under `bsmon run` -------------------------------------------------
HANGUP_POLICIES = ("detach", "forward")


class ChildJob:
    """The wrapped training process; SIGINT and SIGTERM to bsmon are forwarded to it.

    SIGHUP (the terminal went away) sets ``hung_up`` and sends bsmon's own output to
    /dev/null, so the view leaves at once. The job is sent SIGHUP only with
    ``on_hangup="forward"``; by default it keeps running, as after ``q``.
    """

    FORWARDED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, process: subprocess.Popen, *, on_hangup: str = "detach") -> None:
        if on_hangup not in HANGUP_POLICIES:
            raise ValueError(f"on_hangup={on_hangup!r}: use one of {', '.join(HANGUP_POLICIES)}")
        self.process = process
        self.pid = process.pid
        self.on_hangup = on_hangup
        self.hung_up = False
        self._previous = {sig: signal.signal(sig, self._forward) for sig in self.FORWARDED}
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup, hang-ups stay ignored
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hang_up)

    def _forward(self, signum: int, frame: Any) -> None:
        self.send(signum)

    def _hang_up(self, signum: int, frame: Any) -> None:
        self.hung_up = True
        terminal.silence_output()
        if self.on_hangup == "forward":
            self.send(signum)

    def send(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    @property
    def detached_by_hangup(self) -> bool:
        """The terminal went away and the job is to keep running."""
        return self.hung_up and self.on_hangup == "detach"

    def interrupt(self) -> None:
        self.send(signal.SIGINT)

    def returncode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the job to exit; True if it has."""
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def restore_signals(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def shell_exit_code(returncode: int) -> int:
    """A child killed by signal N (Popen gives -N) exits with 128+N, as in a shell."""
    return 128 - returncode if returncode < 0 else returncode


def _start_job(command: list[str], env: dict[str, str], output: Any) -> subprocess.Popen:
    # A new session: the terminal's Ctrl-C and hang-up reach bsmon only, which decides.
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL if output else None,
                            stdout=output, stderr=subprocess.STDOUT if output else None,
                            start_new_session=True, preexec_fn=default_signal_dispositions)


def default_signal_dispositions() -> None:
    """In the job, before exec: every signal at its default and none blocked.

    Whatever bsmon inherited: under ``nohup bsmon run ... &`` (or a script without job
    control) SIGINT is ignored, an ignore survives exec, and the forwarded Ctrl-C would
    silently do nothing. bsmon has no other thread yet when it starts the job, so this
    runs safely between fork and exec.
    """
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # signals the C library reserves
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def record_exit(info: store.SessionInfo, code: int) -> None:
    """Give the session the job's real exit code (the job itself cannot know it).

    Safe because the job has exited: nobody else writes the file. A torn tail
    is cut off first so the appended record stays readable. Reads the file's tail only,
    and brings the summary sidecar up to date.
    """
    tail, torn = store.tail_records(info.records_path)
    last_bye = next((r for r in reversed(tail) if r["k"] == "bye"), None)
    if last_bye is not None and last_bye.get("code") == code:
        return
    status = "finished" if code == 0 else "failed"
    bye = {"k": "bye", "t": time.time(), "status": status, "code": code,
           "error": (last_bye or {}).get("error") or (None if code == 0 else f"exit code {code}")}
    try:
        size = info.records_path.stat().st_size
        with open(info.records_path, "r+b") as handle:
            handle.truncate(size - torn)
            handle.seek(0, os.SEEK_END)
            handle.write(wire.encode(bye))
            end = handle.tell()
    except OSError as exc:
        print(f"bsmon: could not record the exit code in {info.records_path}: {exc}", file=sys.stderr)
        return
    summary = store.read_summary(info.directory)
    if summary is not None and summary["bytes"] <= size - torn:
        store.write_summary(info.directory, {**summary, "status": status, "code": code, "t": bye["t"], "bytes": end})


#: After q in `bsmon demo` the demo has this long to stop on its SIGINT before it is killed.
DEMO_STOP_S = 10.0


def run_job(command: list[str], *, name: str | None, headless: bool, json_lines: bool,
            profile: str | None = None, on_hangup: str = "detach", quit_ends_job: bool = False) -> int:
    """``bsmon run``; ``quit_ends_job``: q in the TUI ends the job too (the demo, bsmon's own job)."""
    home = store.bsmon_home().resolve()
    session_id = store.new_session_id()
    session_dir = store.sessions_dir(home) / session_id
    env = dict(os.environ, BSMON_HOME=str(home), BSMON_SESSION_ID=session_id, BSMON_COMMAND=json.dumps(command))
    if name:
        env[store.RUN_NAME_ENV] = name
    if profile:
        env["BSMON_PROFILE"] = profile
    output = None
    if not headless:
        try:
            session_dir.mkdir(parents=True, exist_ok=True)
            output = open(session_dir / store.OUTPUT_FILE, "ab")
        except OSError as exc:
            return _fail(f"cannot create {session_dir}: {exc}. Set BSMON_HOME to a writable directory.")
    elif json_lines:
        output = sys.stderr  # keep stdout for the JSON lines
    try:
        process = _start_job(command, env, output)
    except FileNotFoundError:
        return _fail(f"command not found: {command[0]}", 127)
    except PermissionError:
        return _fail(f"permission denied: {command[0]}", 126)
    except OSError as exc:
        return _fail(f"cannot start {command[0]}: {exc}", 126)
    job = ChildJob(process, on_hangup=on_hangup)
    try:
        from bsmon.client import wait_for_session
        info = wait_for_session(session_id, alive=lambda: process.poll() is None, home=home)
        if info is None:
            code = shell_exit_code(process.wait())
            hint = f" Its output is in {session_dir / store.OUTPUT_FILE}." if output and output is not sys.stderr else ""
            return _fail(f"the job exited with code {code} before calling bsmon.watch(); nothing was recorded."
                         f"{hint} Add `bsmon.watch(model, optimizer)` to the training script.", code or 1)
        feed = _open_feed(info)
        if headless:
            _headless(feed, json_lines, job)
        else:
            _tui(feed, "run", info, job, quit_ends_job=quit_ends_job)
            if quit_ends_job and not job.hung_up and not job.wait(DEMO_STOP_S):
                job.send(signal.SIGKILL)
        leaves_job_running = job.detached_by_hangup or (not headless and not job.hung_up)  # or `q`
        if process.poll() is None and leaves_job_running:
            to_log = f"; its output goes to {session_dir / store.OUTPUT_FILE}" if output and output is not sys.stderr else ""
            print(f"bsmon: detached; the job (pid {process.pid}) keeps running and is still recorded. "
                  f"Re-attach with `bsmon attach {session_id}`{to_log}.")
            if job.hung_up:
                # Nobody to return to, nothing left to write: skip the interpreter's teardown, which
                # takes over a second on a loaded machine, and leave within the promised 2 s.
                os._exit(0)
            return 0
        code = shell_exit_code(process.wait())
        feed.wait(timeout=5.0)
        feed.stop()
        record_exit(info, code)
        if feed.read(lambda m: m.stats().step) == 0:
            print(f"bsmon: the job exited with code {code} before its first optimizer step.", file=sys.stderr)
        return code
    finally:
        job.restore_signals()
        if output is not None and output is not sys.stderr:
            output.close()


def _open_feed(info: store.SessionInfo) -> Feed:
    from bsmon.client import Feed
    feed = Feed()
    if info.status == "running":
        try:
            return _attach_with_gpu(feed, info)
        except store.SessionError:
            pass  # it ended between the listing and the connect: show the record instead
    return feed.replay(store.session_info(info.directory) or info)


def _attach_with_gpu(feed: Feed, info: store.SessionInfo) -> Feed:
    """Stream a live job, with NVML readings of the GPUs it uses sampled and recorded beside it."""
    from bsmon.gpu import GpuSampler

    feed.attach(info.socket, info.directory)
    hello = info.hello
    sampler = GpuSampler(job_pid=hello["pid"],
                         device_uuids=[d["uuid"] for d in hello.get("devices") or [] if d.get("uuid")],
                         visible_devices=hello.get("cuda_visible_devices"),
                         cuda_device_order=hello.get("cuda_device_order"),
                         job_pid_namespace=hello.get("pid_namespace"))
    sampler.start()
    feed.record_gpu(sampler)
    feed.on_stop(sampler.stop)
    return feed


# -- views ---------------------------------------------------------------------
def _tui(feed: Feed, mode: str, info: store.SessionInfo, job: ChildJob | None = None,
         quit_ends_job: bool = False) -> None:
    from bsmon.tui.app import BsmonApp

    def export() -> Path:
        return _export_session_csv(feed, info)

    BsmonApp(feed, mode=mode, job=job, export=export, quit_ends_job=quit_ends_job).run()
    feed.stop()


def _export_session_csv(feed: Feed, info: store.SessionInfo) -> Path:
    from bsmon.export import export_to_file

    path = Path.cwd() / f"bsmon-{info.name}-{info.id}.csv"
    export_to_file(info, path)  # from the session file, not the view's model: no lock held
    return path


def _headless(feed: Feed, json_lines: bool, job: ChildJob | None = None) -> None:
    from bsmon.headless import follow

    follow(feed, json_lines, job)


# -- commands --------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        return _fail("give the command to run after --, e.g. `bsmon run -- python train.py`", 2)
    profile = None
    if args.profile:
        profile = json.dumps(store.load_profile(args.profile))
    return run_job(command, name=args.name, headless=_headless_wanted(args), json_lines=args.json,
                   profile=profile, on_hangup=args.on_hangup)


def cmd_sweep(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if len(command) < 2 or not Path(command[0]).name.startswith("python") or not command[1].endswith(".py"):
        return _fail("bsmon sweep profiles a Python script's step_fn: `bsmon sweep -- python script.py [args]`", 2)
    options = [f"--{name.replace('_', '-')}={value}" for name, value in
               (("sizes", args.sizes), ("max_batch", args.max_batch), ("steps", args.steps), ("name", args.name))
               if value is not None]
    try:
        return subprocess.call([command[0], "-m", "bsmon.sweep", *options, command[1], *command[2:]])
    except FileNotFoundError:
        return _fail(f"command not found: {command[0]}", 127)


def cmd_demo(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "bsmon.demo", "--steps", str(args.steps)]
    return run_job(command, name="demo", headless=_headless_wanted(args), json_lines=args.json,
                   quit_ends_job=True)


def cmd_attach(args: argparse.Namespace) -> int:
    info = store.resolve_session(args.session, running=args.session is None)
    if info.status != "running":
        stale = " Its stale socket was removed." if store.remove_stale_socket(info) else ""
        return _fail(f"session {info.id} ({info.name}) is {info.status}: there is no job to attach to.{stale} "
                     f"`bsmon replay {info.id}` shows the record.")
    from bsmon.client import Feed
    feed = _attach_with_gpu(Feed(), info)
    if _headless_wanted(args):
        try:
            _headless(feed, args.json)
        except KeyboardInterrupt:
            pass  # detaching never touches the job
        feed.stop()
    else:
        _tui(feed, "attach", info)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from bsmon.client import Feed
    info = store.resolve_session(args.session)
    feed = Feed().replay(info)
    if _headless_wanted(args):
        _headless(feed, args.json)
    else:
        _tui(feed, "replay", info)
    return 0


def session_figures(info: store.SessionInfo) -> store.Figures:
    """The session's last numbers (B*, B_simple, their unit) for `bsmon ls`.

    From the summary the job keeps (store.session_info). A session without one (an older bsmon,
    or a job killed before its first summary) is replayed once through a model without history,
    about 0.1 s for 10,000 steps, and, once it no longer runs, its summary is written so the
    next listing reads that instead.
    """
    if info.figures is not None:
        return info.figures
    from bsmon.model import SessionModel
    model = SessionModel(keep_history=False)
    stream = store.iter_record_batches(info.records_path)
    samples, last_t, names, lookups = 0, None, {}, 0
    for batch in stream:
        model.ingest_all(batch)
        samples += sum(r["n"] for r in batch if r["k"] == "step")
        last_t = next((r["t"] for r in reversed(batch) if "t" in r), last_t)
        lookups += store.logged_names_and_lookups(batch, names)
    stats = model.stats()
    figures = store.Figures(stats.b_opt, stats.b_simple, stats.unit)
    if info.status != "running":
        store.write_summary(info.directory, {
            "session": info.id, "steps": info.steps, "samples": samples,
            "status": info.status if info.status in ("finished", "failed") else "running",
            "t": last_t, "bytes": stream.end, "code": info.exit_code, **dataclasses.asdict(figures),
            "scalars": list(names), "lookups": lookups})
    return figures


def cmd_ls(args: argparse.Namespace) -> int:
    sessions = store.list_sessions()
    if args.running:
        sessions = [s for s in sessions if s.status == "running"]
    figures = [session_figures(s) for s in sessions]
    if args.json:
        print(json.dumps([{**s.to_json(), **dataclasses.asdict(f)}
                          for s, f in zip(sessions, figures)], indent=2))
        return 0
    if not sessions:
        print(f"no {'running ' if args.running else ''}sessions under {store.bsmon_home()}")
        return 0
    rows = [("ID", "NAME", "PID", "STATUS", "STEPS", "STARTED", "B*", "B_SIMPLE", "COMMAND")]
    for s, f in zip(sessions, figures):
        started = dt.datetime.fromtimestamp(s.started).strftime("%Y-%m-%d %H:%M:%S")
        status = s.status if s.exit_code in (None, 0) else f"{s.status} ({s.exit_code})"
        unit = " tok" if f.unit == "tokens" else ""
        rows.append((s.id, s.name, str(s.pid), status, str(s.steps), started,
                     "-" if f.b_opt is None else f"{fmt.si(f.b_opt)}{unit}",
                     "-" if f.b_simple is None else f"{fmt.si(f.b_simple)}{unit}", " ".join(s.command)[:60]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bsmon.export import export_to_file, write_csv

    if args.format == "parquet" and args.output is None:
        return _fail("--format parquet writes a file: give it with -o FILE.parquet", 2)
    from bsmon.client import Feed
    info = store.resolve_session(args.session)
    if args.output is None:
        write_csv(info, sys.stdout)
        return 0
    path = Path(args.output)
    try:
        rows = export_to_file(info, path, format=args.format)
    except ImportError as exc:
        return _fail(f"Parquet export needs pandas and pyarrow: pip install 'bsmon[parquet]' ({exc})")
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror or exc}")
    print(f"bsmon: wrote {rows} steps of session {info.id} ({info.name}) to {path}", file=sys.stderr)
    return 0


def _headless_wanted(args: argparse.Namespace) -> bool:
    """The TUI needs a terminal on both sides: keys in, screen out."""
    return args.headless or args.json or not (sys.stdout.isatty() and sys.stdin.isatty())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bsmon", description="Live batch-size monitor for PyTorch training: throughput, "
        "gradient noise scale and the optimal batch size.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def views(p: argparse.ArgumentParser) -> None:
        p.add_argument("--headless", action="store_true", help="print a status line a second instead of the TUI "
                       "(the default when stdout is not a terminal)")
        p.add_argument("--json", action="store_true", help="print JSON lines instead of the TUI")

    p = sub.add_parser("run", help="run a training command under the monitor")
    p.add_argument("--name", help="session name; wins over watch(name=) and $BSMON_NAME "
                   "(default: the script's name)")
    p.add_argument("--profile", help="a throughput profile saved by `bsmon sweep` (id, name prefix or path)")
    p.add_argument("--on-hangup", choices=HANGUP_POLICIES, default="detach",
                   help="when the terminal goes away (SSH drop): detach and keep the job running (default), "
                   "or forward SIGHUP to the job")
    views(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("attach", help="attach to a running job (default: the newest)")
    p.add_argument("session", nargs="?", help="id, unique id prefix or name")
    views(p)
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("ls", help="list recorded sessions, with the last B_simple and recommended batch")
    p.add_argument("--running", action="store_true", help="only sessions whose job is running")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("export", help="write a session as CSV (or Parquet), one row per optimizer step")
    p.add_argument("session", nargs="?", help="id, unique id prefix or name (default: the newest)")
    p.add_argument("-o", "--output", help="output file (default: CSV to stdout)")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv",
                   help="parquet: the same columns, typed, with the session's metadata (needs pandas and pyarrow)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("replay", help="open a recorded session in the TUI")
    p.add_argument("session", help="id, unique id prefix or name")
    views(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("sweep", help="measure throughput against batch size with a script's step_fn")
    p.add_argument("--sizes", help="comma-separated batch sizes (default: double until out of memory or plateau)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--steps", type=int, help="timed steps per size (default 5)")
    p.add_argument("--name", help="profile name (default: the script's name)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- python script.py [args]")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="watch a built-in CPU training run (no GPU, no downloads)")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps to train (default 20000, about 2 minutes)")
    views(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except store.SessionError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `bsmon export | head`: the reader left; exit quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
