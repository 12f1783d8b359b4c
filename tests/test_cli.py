"""End to end: the real `bsmon` command line around real training subprocesses."""

import csv
import io
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bsmon import fmt, store
from conftest import WAIT_S, bsmon_cli, spawn, start_job, train_command, wait_for


def test_run_headless_passes_the_exit_code_and_records_it():
    ok = bsmon_cli("run", "--headless", "--name", "ok-job", "--", *train_command("--steps", "20"))
    assert ok.returncode == 0, ok.stderr
    assert "step 20" in ok.stdout and "ended" in ok.stdout
    assert "trained 20 steps" in ok.stdout  # the job's own output passes through in headless mode
    bad = bsmon_cli("run", "--headless", "--", *train_command("--steps", "5", "--exit-code", "3"))
    assert bad.returncode == 3
    sessions = {s.name: s for s in store.list_sessions()}
    assert sessions["ok-job"].status == "finished" and sessions["ok-job"].steps == 20
    failed = sessions["train_small"]
    assert failed.status == "failed" and failed.exit_code == 3 and failed.steps == 5
    listing = bsmon_cli("ls")
    assert "ok-job" in listing.stdout and "failed (3)" in listing.stdout
    as_json = json.loads(bsmon_cli("ls", "--json").stdout)
    assert {s["name"] for s in as_json} == {"ok-job", "train_small"}


def test_the_command_lines_name_wins_then_watch_then_the_environment(monkeypatch):
    """Precedence: `bsmon run --name` > watch(name=) > $BSMON_NAME > the script's name."""
    run = bsmon_cli("run", "--headless", "--name", "t1", "--", *train_command("--steps", "3", "--name", "in-script"))
    assert run.returncode == 0, run.stderr
    exported = bsmon_cli("export", "t1")
    assert exported.returncode == 0, exported.stderr
    assert len(exported.stdout.splitlines()) == 4  # header and three steps
    from bsmon.probe.monitor import session_name

    monkeypatch.setenv("BSMON_NAME", "from-env")
    assert session_name("in-script") == "in-script"
    assert session_name(None) == "from-env"
    monkeypatch.setenv("BSMON_RUN_NAME", "t1")
    assert session_name("in-script") == "t1"
    monkeypatch.delenv("BSMON_NAME")
    monkeypatch.delenv("BSMON_RUN_NAME")
    monkeypatch.setattr(sys, "argv", ["/somewhere/train_gpt.py"])
    assert session_name(None) == "train_gpt"


def test_ls_shows_the_last_noise_scale_and_advice_and_filters_running(tmp_path):
    assert bsmon_cli("run", "--headless", "--", *train_command("--steps", "12")).returncode == 0
    [done] = store.list_sessions()
    ready = tmp_path / "ready"
    job = start_job("--steps", "2000", "--sleep", "0.05", "--ready-file", str(ready))
    try:
        wait_for(ready.exists, "the job to be ready", job)
        listing = bsmon_cli("ls").stdout.splitlines()
        assert listing[0].split()[:9] == ["ID", "NAME", "PID", "STATUS", "STEPS", "STARTED", "B*", "B_SIMPLE",
                                          "COMMAND"]
        row = next(line for line in listing if line.startswith(done.id)).split()
        from bsmon.cli import session_figures

        figures = session_figures(done)
        assert figures.b_simple is not None
        assert row[7:9] == ["-", fmt.si(figures.b_simple)]  # no profile: no recommended batch
        running = bsmon_cli("ls", "--running").stdout.splitlines()
        assert len(running) == 2 and "running" in running[1] and done.id not in running[1]
        as_json = json.loads(bsmon_cli("ls", "--json").stdout)
        assert {s["id"]: s["b_simple"] for s in as_json}[done.id] == figures.b_simple
    finally:
        job.kill()
        job.wait()


def test_json_lines_keep_stdout_machine_readable():
    result = bsmon_cli("run", "--json", "--", *train_command("--steps", "10"))
    assert result.returncode == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["step"] == 10 and lines[-1]["state"] == "ended"
    assert lines[-1]["batch_size"] == 32 and lines[-1]["noise_estimator"] == "microbatch"
    assert "trained 10 steps" in result.stderr  # the job's output went to stderr


def test_attach_to_a_plain_job_then_export_csv(tmp_path):
    ready = tmp_path / "ready"
    job = start_job("--steps", "60", "--sleep", "0.03", "--ready-file", str(ready))
    wait_for(ready.exists, "the job's first step", job)
    attached = bsmon_cli("attach", "--headless")
    assert job.wait(timeout=WAIT_S) == 0
    assert attached.returncode == 0, attached.stderr
    assert "step 60" in attached.stdout.splitlines()[-1]
    out = tmp_path / "run.csv"
    exported = bsmon_cli("export", "-o", str(out))
    assert exported.returncode == 0 and "wrote 60 steps" in exported.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    header = out.read_text().splitlines()[0].split(",")
    assert header[:9] == ["step", "time", "elapsed_s", "batch_size", "micro_batches", "skipped_steps",
                          "step_time_s", "samples_per_s", "loss"]
    assert header[9:] == ["lr", "b_simple", "b_simple_low", "b_simple_high", "noise_age_steps", "grad_sq",
                          "trace_sigma", "noise_coverage", "b_simple_precond", "b_simple_precond_low",
                          "b_simple_precond_high", "b_noise", "b_opt", "b_opt_speedup", "branch_b_crit",
                          "branch_b_crit_low", "branch_b_crit_high", "branch_b_simple_ratio",
                          "world_size", "slowest_rank_step_time_s", "gpu_util_pct", "gpu_mem_used_mib", "gpu_mem_total_mib", "gpu_job_mem_mib",
                          "gpu_power_w", "gpu_temp_c", "gpu_sm_clock_mhz"]
    assert [int(r["step"]) for r in rows] == list(range(1, 61))
    for r in rows:
        assert int(r["batch_size"]) == 32 and int(r["micro_batches"]) == 2 and int(r["skipped_steps"]) == 0
        assert float(r["samples_per_s"]) == pytest.approx(32 / float(r["step_time_s"]))
        assert float(r["loss"]) >= 0 and float(r["lr"]) == 0.05
    assert rows[-1]["b_simple"] != ""  # the micro-batch estimator has a value by the end
    assert float(rows[-1]["elapsed_s"]) > float(rows[0]["elapsed_s"])
    assert bsmon_cli("export").stdout == out.read_text()  # stdout export is the same CSV


def test_job_that_exits_before_its_first_step():
    code = ("import torch, bsmon; m = torch.nn.Linear(2, 1); "
            "bsmon.watch(m, torch.optim.SGD(m.parameters(), lr=0.1)); raise SystemExit(0)")
    result = bsmon_cli("run", "--headless", "--", sys.executable, "-c", code)
    assert result.returncode == 0
    assert "before its first optimizer step" in result.stderr
    (info,) = store.list_sessions()
    assert info.steps == 0 and info.status == "finished"


def test_job_without_watch_and_missing_commands():
    result = bsmon_cli("run", "--headless", "--", sys.executable, "-c", "print('no bsmon here')")
    assert result.returncode == 1 and "before calling bsmon.watch()" in result.stderr
    missing = bsmon_cli("run", "--headless", "--", "no-such-command-xyz")
    assert missing.returncode == 127 and "command not found: no-such-command-xyz" in missing.stderr
    empty = bsmon_cli("run", "--headless")
    assert empty.returncode == 2 and "after --" in empty.stderr


@pytest.mark.parametrize("args", [("attach", "nope"), ("export", "nope"), ("replay", "nope"), ("attach",)])
def test_unknown_sessions_get_a_clear_message(args):
    result = bsmon_cli(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("bsmon: no ") and "Traceback" not in result.stderr


def test_killed_job_shows_as_lost_and_its_stale_socket_is_cleaned(tmp_path):
    ready = tmp_path / "ready"
    job = start_job("--steps", "100000", "--sleep", "0.01", "--ready-file", str(ready))
    wait_for(lambda: ready.exists() and store.list_sessions()[0].steps >= 1, "a recorded step", job)
    job.send_signal(signal.SIGKILL)
    job.wait()
    (info,) = store.list_sessions()
    assert info.status == "lost" and info.steps >= 1 and os.path.exists(info.socket)
    result = bsmon_cli("attach", info.id)
    assert result.returncode == 1
    assert "is lost" in result.stderr and "stale socket was removed" in result.stderr
    assert not os.path.exists(info.socket)
    assert bsmon_cli("export", info.id).returncode == 0  # what was recorded is still there


@pytest.mark.parametrize("ignore_sigint", [False, True], ids=["plain", "started-with-sigint-ignored"])
def test_sigint_is_forwarded_to_the_job(tmp_path, ignore_sigint):
    """Also when bsmon inherited SIGINT ignored (`nohup bsmon run ... &`): the job gets the default."""
    ready = tmp_path / "ready"
    wrapper = spawn([sys.executable, "-m", "bsmon.cli", "run", "--headless", "--",
                     *train_command("--steps", "100000", "--sleep", "0.01", "--ready-file", str(ready))],
                    ignore_sigint=ignore_sigint)
    wait_for(ready.exists, "the job's first step", wrapper)
    wrapper.send_signal(signal.SIGINT)
    out, err = wrapper.communicate(timeout=WAIT_S)
    assert wrapper.returncode == 130, err  # Python re-raises SIGINT on an uncaught KeyboardInterrupt: 128 + 2
    assert "KeyboardInterrupt" in err
    (info,) = store.list_sessions()
    assert info.status == "failed" and "KeyboardInterrupt" in json.dumps(
        [r for r in store.read_records(info.records_path)[0] if r["k"] == "bye"])


def test_full_disk_while_recording_keeps_training(tmp_path):
    """The kernel refuses writes past RLIMIT_FSIZE, as on a full disk: training goes on and says so."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    job = subprocess.run(train_command("--steps", "300"), capture_output=True, text=True,
                         preexec_fn=limit_file_size, timeout=120)
    assert job.returncode == 0 and "trained 300 steps" in job.stdout
    assert "recording to" in job.stderr and "failed" in job.stderr and "Training continues" in job.stderr
    (info,) = store.list_sessions()
    assert 0 < info.steps < 300  # what fitted is readable
    assert info.records_path.stat().st_size <= 20_000


SWEEP_SMALL = str(Path(__file__).resolve().parent / "jobs" / "sweep_small.py")


def test_sweep_saves_a_profile_that_run_records_and_uses():
    sweep = bsmon_cli("sweep", "--sizes", "8,16,32,64", "--steps", "3", "--", sys.executable, SWEEP_SMALL)
    assert sweep.returncode == 0, sweep.stderr
    assert "measured batch 64" in sweep.stdout and "stopped: all_sizes" in sweep.stdout
    profile_id = sweep.stdout.split("--profile ")[1].split()[0]
    run = bsmon_cli("run", "--headless", "--profile", profile_id, "--", sys.executable, SWEEP_SMALL, "60")
    assert run.returncode == 0, run.stderr
    (info,) = store.list_sessions()
    records, _ = store.read_records(info.records_path)
    profile = next(r["profile"] for r in records if r["k"] == "profile")
    assert [p["batch_size"] for p in profile["points"]] == [8, 16, 32, 64]
    rows = list(csv.DictReader(io.StringIO(bsmon_cli("export").stdout)))
    assert rows[-1]["b_opt"] and int(rows[-1]["b_opt"]) >= 1 and float(rows[-1]["b_opt_speedup"]) > 0


def test_sweep_refuses_scripts_without_the_convention(tmp_path):
    script = tmp_path / "no_step.py"
    script.write_text("if __name__ == '__main__':\n    print('training')\n")
    result = bsmon_cli("sweep", "--", sys.executable, str(script))
    assert result.returncode == 1 and "defines no step_fn(batch_size)" in result.stderr
    assert bsmon_cli("sweep", "--", "torchrun", "x.py").returncode == 2
    missing = bsmon_cli("run", "--headless", "--profile", "nope", "--", sys.executable, SWEEP_SMALL)
    assert missing.returncode == 1 and "profile 'nope' matches 0 saved profiles" in missing.stderr


def test_demo_runs_headless_to_the_end():
    result = bsmon_cli("demo", "--headless", "--steps", "60")
    assert result.returncode == 0, result.stderr
    assert "step 60" in result.stdout.splitlines()[-1] and "ended" in result.stdout.splitlines()[-1]


def test_export_into_a_closed_pipe_exits_quietly():
    """`bsmon export | head -1`: the reader leaves early; bsmon exits 141 without a traceback."""
    assert bsmon_cli("run", "--headless", "--", *train_command("--steps", "1500", "--accumulate", "1")).returncode == 0
    export = spawn([sys.executable, "-m", "bsmon.cli", "export"])
    assert export.stdout.readline().startswith("step,")
    export.stdout.close()  # far more than a pipe buffer is still to come
    assert export.wait(timeout=WAIT_S) == 141
    assert "Traceback" not in export.stderr.read()


def test_export_writes_into_a_device_or_fifo_and_through_a_symlink_never_replacing_them(tmp_path):
    """`-o /dev/null` once replaced /dev/null with a regular file (the atomic rename): a path that
    exists and is not a regular file is written into; a symlink's file is replaced, the link kept."""
    assert bsmon_cli("run", "--headless", "--", *train_command("--steps", "20")).returncode == 0
    expected = bsmon_cli("export").stdout
    null = bsmon_cli("export", "-o", os.devnull)
    assert null.returncode == 0, null.stderr
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and not Path(os.devnull).with_name(".null.partial").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    export = spawn([sys.executable, "-m", "bsmon.cli", "export", "-o", str(fifo)])
    with open(fifo) as reader:
        assert reader.read() == expected
    assert export.wait(timeout=WAIT_S) == 0 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    target, link = tmp_path / "session.csv", tmp_path / "latest.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    assert bsmon_cli("export", "-o", str(link)).returncode == 0
    assert link.is_symlink() and target.read_text() == expected
