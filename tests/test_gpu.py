"""bsmon.gpu against a fake libnvidia-ml (tests/fake_nvml.py) under the real pynvml, real
processes for the job, and the real pynvml path of a machine without an NVIDIA driver."""

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass

import pynvml
import pytest

from bsmon.gpu import GpuReading, GpuSampler, GpuSnapshot, processes
from bsmon.gpu import sampler as gpu_sampler
import fake_nvml
from conftest import WAIT_S
from fake_nvml import (NEWEST, OLDEST, R12_535_77, R470_MISSING, R535_MISSING, RELEASES, FakeDriver,
                       FakeGpu, FakeProcess)

UUID0 = "GPU-3eb79704-1571-707c-aee8-f43ce747313d"
UUID1 = "GPU-849d5a8d-610e-eeea-1fd4-81ff44a23794"
UUID2 = "GPU-18ef14e9-dec6-1d7e-1284-3010c6ce98b1"
MIG_A = "MIG-d184f67c-c95f-5ef2-a935-195bd0094fbd"
MIG_B = "MIG-37b51284-1df4-5451-979d-3231ccb0822e"
PID_MAX_LIMIT = 4_194_304  # no Linux pid reaches this (the largest pid_max), so it never exists here


@pytest.fixture(autouse=True, params=RELEASES, ids=lambda release: f"pynvml-{release.version}")
def release(request, monkeypatch):
    """Every test here runs against each replayed nvidia-ml-py release (see fake_nvml.RELEASES)."""
    monkeypatch.setattr(fake_nvml, "RELEASE", request.param)
    return request.param


@dataclass
class Job:
    """A real process tree: a shell (the job) and two sleeping children."""

    pid: int
    children: list[int]


@pytest.fixture
def job():
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; sleep 60 & echo $!; wait"],
                             stdout=subprocess.PIPE, text=True)
    children = [int(shell.stdout.readline()) for _ in range(2)]
    yield Job(shell.pid, children)
    for pid in children:
        _kill(pid)
    shell.kill()
    shell.wait()
    shell.stdout.close()


@pytest.fixture
def stranger():
    """A real process outside the job's tree."""
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_until_gone(pid, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}"), f"process {pid} did not go away"


def _nvml_library_present():
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def has_memory_v2(release):
    return "nvmlMemory_v2" not in release.absent


def sample(driver, job_pid=None, **kwargs):
    sampler = driver.sampler(job_pid, **kwargs)
    try:
        return sampler.sample_once()
    finally:
        sampler.stop()


@pytest.mark.parametrize(("release", "imported", "absent"), [
    (NEWEST, "bsmon, bsmon.probe.monitor", ("bsmon.gpu", "textual")),  # the job's (torch.cuda loads pynvml)
    (NEWEST, "bsmon.gpu", ("pynvml", "torch", "textual")),  # pynvml only once sampling starts
], indirect=["release"], ids=["probe", "gpu"])
def test_what_each_side_imports(release, imported, absent):
    code = f"import sys, {imported}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- NVML absent or broken --------------------------------------------------------------------

@pytest.mark.skipif(_nvml_library_present(), reason="this machine has an NVIDIA driver")
def test_real_pynvml_without_a_driver_reports_a_banner():
    sampler = GpuSampler(os.getpid(), device_uuids=[UUID0])
    snapshot = sampler.sample_once()
    sampler.stop()
    assert snapshot.banner == "No NVIDIA driver found (libnvidia-ml.so.1 missing): GPU panel disabled"
    assert snapshot.gpus == () and snapshot.hint is None
    assert sampler.selection_rule is None
    assert snapshot.csv_fields() == dict.fromkeys(snapshot.csv_fields())


@pytest.mark.gpu
@pytest.mark.skipif(not _nvml_library_present(), reason="needs an NVIDIA driver")
def test_real_pynvml_with_a_driver_reads_every_gpu():
    sampler = GpuSampler(os.getpid())
    snapshot = sampler.sample_once()
    sampler.stop()
    assert snapshot.banner is None and snapshot.gpus
    for reading in snapshot.gpus:
        assert reading.uuid.startswith(("GPU-", "MIG-"))
        assert reading.mem_total_mib > 0 and 0 <= reading.mem_used_mib <= reading.mem_total_mib


def test_missing_pynvml_module_reports_a_banner(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what `import pynvml` meets when it is absent
    snapshot = GpuSampler(os.getpid()).sample_once()
    assert snapshot.banner.startswith("nvidia-ml-py is not installed (")
    assert snapshot.banner.endswith("GPU panel disabled")
    assert snapshot.gpus == ()


def test_missing_library_through_pynvml_reports_a_banner():
    driver = FakeDriver([FakeGpu(UUID0)], library_present=False)
    snapshot = sample(driver)
    assert snapshot.banner == "No NVIDIA driver found (libnvidia-ml.so.1 missing): GPU panel disabled"
    assert snapshot.gpus == ()


class Clock:
    """The sampler's back-off clock, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(gpu_sampler, "_retry_clock", clock)
    return clock


def test_a_failed_start_is_retried_with_backoff(clock):
    driver = FakeDriver([FakeGpu(UUID0)], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    sampler = driver.sampler(None)
    first, second = sampler.sample_once(), sampler.sample_once()
    assert first.banner == "NVIDIA driver not loaded (NVML: Driver Not Loaded): GPU panel disabled"
    assert second.banner == first.banner and second.gpus == ()
    assert driver.calls["nvmlInitWithFlags"] == 1  # not again within the back-off
    assert driver.calls["nvmlShutdown"] == 0  # nothing was initialised
    attempts = []
    for _ in range(8):  # attempts at +1, +2, +4, +8 s ...
        clock.now += 1.0
        sampler.sample_once()
        attempts.append(driver.calls["nvmlInitWithFlags"])
    assert attempts == [2, 2, 3, 3, 3, 3, 4, 4]
    driver.init_error = None  # the driver module is loaded now
    clock.now += 8.0
    snapshot = sampler.sample_once()
    sampler.stop()
    assert snapshot.banner is None and snapshot.gpus[0].uuid == UUID0


def test_a_lost_gpu_is_looked_up_again_and_read_once_it_comes_back(clock):
    driver = FakeDriver([FakeGpu(UUID0), FakeGpu(UUID1)])
    sampler = driver.sampler(None, device_uuids=[UUID1])
    assert sampler.sample_once().gpus[0].util_pct == 97.0
    driver.gpus[1].lost = True
    assert sampler.sample_once().gpus[0].util_pct is None
    driver.reset(driver.gpus[1])  # back, with a new handle; the old one stays lost
    assert sampler.sample_once().banner is not None  # not looked up again before the back-off
    clock.now += 1.0
    snapshot = sampler.sample_once()
    sampler.stop()
    assert snapshot.banner is None and snapshot.gpus[0].util_pct == 97.0 and snapshot.gpus[0].uuid == UUID1
    assert driver.calls["nvmlInitWithFlags"] == 2


def test_stop_returns_while_an_nvml_call_hangs(monkeypatch):
    monkeypatch.setattr(gpu_sampler, "_STOP_TIMEOUT_S", 0.2)
    driver = FakeDriver([FakeGpu(UUID0)])
    entered, release = driver.block("nvmlDeviceGetPowerUsage")
    sampler = driver.sampler(None)
    sampler.start()
    assert entered.wait(30)
    stopper = threading.Thread(target=sampler.stop)
    stopper.start()
    stopper.join(30)
    stopped = not stopper.is_alive()
    release.set()  # let the wedged call return so the thread ends
    stopper.join(30)
    assert stopped, "stop() waited for the wedged NVML call"


def test_no_gpus_reports_a_banner_and_shuts_nvml_down():
    driver = FakeDriver([])
    snapshot = sample(driver)
    assert snapshot.banner == "NVML found no NVIDIA GPU: GPU panel disabled"
    assert snapshot.gpus == ()
    assert driver.calls["nvmlShutdown"] == 1 and not driver.initialized


# --- readings ---------------------------------------------------------------------------------------

def test_a_healthy_gpu_reads_every_field_and_only_the_jobs_processes(job, stranger, release):
    shell, (child_a, child_b) = job.pid, job.children
    gpu0 = FakeGpu(UUID0, clock_reasons=0x1 | 0x4 | 0x40,  # idle bit set too: it must not show
                   compute=[FakeProcess(shell, 300, sm_util=5), FakeProcess(child_a, 12_000, sm_util=50),
                            FakeProcess(stranger, 9_000, sm_util=30)],
                   graphics=[FakeProcess(child_b, 700, sm_util=20)])
    driver = FakeDriver([gpu0])
    snapshot = sample(driver, job.pid, device_uuids=[UUID0])
    assert driver.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 0  # a current driver: v3
    assert snapshot.banner is None and snapshot.hint is None
    # Releases without the v2 memory struct read v1, which counts the driver's reservation as used.
    used, reserved = (30_000.0, 527.0) if has_memory_v2(release) else (30_527.0, None)
    assert snapshot.gpus == (GpuReading(
        index=0, uuid=UUID0, name="NVIDIA H100 80GB HBM3", util_pct=97.0, mem_util_pct=41.0,
        mem_used_mib=used, mem_reserved_mib=reserved, mem_total_mib=81_559.0,
        job_mem_mib=300.0 + 12_000.0 + 700.0, job_util_pct=5.0 + 50.0 + 20.0,
        power_w=612.345, power_limit_w=700.0, temp_c=63.0, sm_clock_mhz=1755.0,
        throttle_reasons=("power cap", "thermal slowdown (hw)"),
        pcie_tx_mib_s=20.0, pcie_rx_mib_s=5.0, mig=None),)


def test_throttle_reasons_name_unknown_bits_and_ignore_idle():
    snapshot = sample(FakeDriver([FakeGpu(UUID0, clock_reasons=0x1 | 0x8 | 0x10 | 0x20 | 0x80 | 0x4000)]))
    assert snapshot.gpus[0].throttle_reasons == (
        "hw slowdown", "sync boost", "thermal slowdown (sw)", "power brake", "unknown reason 0x4000")
    assert sample(FakeDriver([FakeGpu(UUID0, clock_reasons=0x1)])).gpus[0].throttle_reasons == ()


def test_a_process_in_both_lists_is_counted_once(job):
    both = FakeProcess(job.pid, 700, sm_util=12)
    reading = sample(FakeDriver([FakeGpu(UUID0, compute=[both], graphics=[both])]), job.pid).gpus[0]
    assert (reading.job_mem_mib, reading.job_util_pct) == (700.0, 12.0)


def test_no_utilisation_sample_in_the_last_second_is_na_not_zero(job):
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, 700, sm_util=None)])  # driver: NOT_FOUND
    assert sample(FakeDriver([gpu0]), job.pid).gpus[0].job_util_pct is None


def test_a_failed_utilisation_call_is_na_not_zero(job):
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, 700, sm_util=50)],
                   errors={"nvmlDeviceGetProcessUtilization": pynvml.NVML_ERROR_UNKNOWN})
    assert sample(FakeDriver([gpu0]), job.pid).gpus[0].job_util_pct is None


def test_a_job_absent_from_the_drivers_samples_is_idle(job, stranger):
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, 700, sm_util=None), FakeProcess(stranger, 9, sm_util=80)])
    assert sample(FakeDriver([gpu0]), job.pid).gpus[0].job_util_pct == 0.0


def test_job_utilisation_holds_between_the_drivers_samples(job):
    # The driver samples every 0.5 s; bsmon samples faster. Asking only for samples newer than the
    # newest seen got NOT_FOUND between driver samples and showed 0 %.
    gpu0 = FakeGpu(UUID0, util_sample_period_s=0.5, compute=[FakeProcess(job.pid, 700, sm_util=64)])
    sampler = FakeDriver([gpu0]).sampler(job.pid)
    utilisation = [sampler.sample_once().gpus[0].job_util_pct for _ in range(6)]
    sampler.stop()
    assert utilisation == [64.0] * 6


def test_job_utilisation_is_capped_at_100_percent(job):
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, 100, sm_util=70),
                                   FakeProcess(job.children[0], 100, sm_util=60)])
    assert sample(FakeDriver([gpu0]), job.pid).gpus[0].job_util_pct == 100.0


def test_an_old_driver_is_read_through_the_older_functions_which_are_looked_up_once(job):
    gpu0 = FakeGpu(UUID0, clock_reasons=0x4, compute=[FakeProcess(job.pid, 2_000, sm_util=33)])
    driver = FakeDriver([gpu0], missing=R470_MISSING)
    sampler = driver.sampler(job.pid)
    sampler.sample_once()
    lookups_after_first_sample = dict(driver.missing_lookups)
    for _ in range(2):
        reading = sampler.sample_once().gpus[0]
    sampler.stop()
    assert reading.mem_used_mib == 30_000.0 + 527.0  # v1 counts the driver's reservation as used
    assert reading.mem_reserved_mib is None and reading.mem_total_mib == 81_559.0
    assert (reading.job_mem_mib, reading.job_util_pct) == (2_000.0, 33.0)
    assert (reading.temp_c, reading.throttle_reasons) == (63.0, ("power cap",))
    assert set(lookups_after_first_sample) <= R470_MISSING
    assert driver.missing_lookups == lookups_after_first_sample  # never looked up again
    assert driver.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 2 * 3
    assert driver.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3


@pytest.mark.parametrize(("missing", "symbol"), [
    ((), "nvmlDeviceGetComputeRunningProcesses_v3"),  # R550 and later: v3 entries in the v2 layout
    (R535_MISSING, "nvmlDeviceGetComputeRunningProcesses_v3"),  # R535: v3 entries with the CC field
    (R470_MISSING, "nvmlDeviceGetComputeRunningProcesses_v2"),
])
def test_process_lists_are_read_in_the_drivers_layout_whatever_pynvml_defines(job, missing, symbol):
    processes_ = [FakeProcess(job.pid, 1_000), FakeProcess(job.children[0], 2_000),
                  FakeProcess(job.children[1], None)]
    driver = FakeDriver([FakeGpu(UUID0, compute=processes_[:2], graphics=processes_[2:])], missing=missing)
    reading = sample(driver, job.pid).gpus[0]
    assert reading.job_mem_mib is None  # the graphics process's memory is not available
    driver.gpus[0].graphics = []
    assert sample(driver, job.pid).gpus[0].job_mem_mib == 3_000.0
    assert driver.calls[symbol] == 2 * 2  # count and read, twice


def naive_pids(driver, function):
    """What pynvml's own process-list call reads, as a user of that release would get it."""
    nv = driver.nvml
    nv.nvmlInit()
    try:
        return [(p.pid, p.usedGpuMemory) for p in getattr(nv, function)(nv.nvmlDeviceGetHandleByIndex(0))]
    finally:
        nv.nvmlShutdown()


@pytest.mark.parametrize(("release", "missing"), [(R12_535_77, ()), (NEWEST, R535_MISSING)],
                         indirect=["release"], ids=["12.535.77 on R550", "newest on R535"])
def test_the_replayed_releases_misread_as_reported(job, release, missing):
    """The fake is faithful: pynvml's own call misreads where its struct and the driver differ."""
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, 1_000), FakeProcess(job.children[0], 2_000),
                                   FakeProcess(job.children[1], 500)])
    driver = FakeDriver([gpu0], missing=missing)
    expected = [(job.pid, 1_000 * fake_nvml.MIB), (job.children[0], 2_000 * fake_nvml.MIB),
                (job.children[1], 500 * fake_nvml.MIB)]
    read = naive_pids(driver, "nvmlDeviceGetComputeRunningProcesses_v3")
    assert read[0] == expected[0] and read[1:] != expected[1:]
    assert sample(driver, job.pid).gpus[0].job_mem_mib == 3_500.0


@pytest.mark.parametrize("release", [OLDEST, NEWEST], indirect=True, ids=["11.450.51", "newest"])
def test_releases_before_11_515_return_bytes_which_bsmon_reads_as_text(release):
    driver = FakeDriver([FakeGpu(UUID0)])
    nv = driver.nvml
    nv.nvmlInit()
    raw = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(0))
    nv.nvmlShutdown()
    assert raw == (UUID0.encode() if release is OLDEST else UUID0)
    reading = sample(driver, device_uuids=[UUID0]).gpus[0]
    assert (reading.uuid, reading.name) == (UUID0, "NVIDIA H100 80GB HBM3")


def test_a_mig_slice_name_in_bytes_is_split_into_model_and_profile():
    driver = mig_machine(os.getpid())
    driver.nvml = FakeDriver([], release=OLDEST).nvml  # an 11.450 pynvml ...
    driver.nvml.nvmlLib = fake_nvml._FakeLibrary(driver)  # ... over this driver
    assert [(r.name, r.mig) for r in sample(driver).gpus] == [
        ("NVIDIA H100 80GB HBM3", None), ("NVIDIA A100-SXM4-80GB", "MIG 1g.10gb"),
        ("NVIDIA A100-SXM4-80GB", "MIG 3g.40gb")]


def test_unsupported_fields_are_none_and_never_asked_again(job):
    not_supported = pynvml.NVML_ERROR_NOT_SUPPORTED
    unsupported = ("nvmlDeviceGetPowerUsage", "nvmlDeviceGetPcieThroughput", "nvmlDeviceGetProcessUtilization")
    gpu0 = FakeGpu(UUID0, clock_reasons=0x4, compute=[FakeProcess(job.pid, 1_000, sm_util=10)],
                   errors={**dict.fromkeys(unsupported, not_supported),
                           "nvmlDeviceGetUtilizationRates": pynvml.NVML_ERROR_NO_PERMISSION})
    driver = FakeDriver([gpu0])
    sampler = driver.sampler(job.pid)
    for _ in range(3):
        reading = sampler.sample_once().gpus[0]
    sampler.stop()
    assert (reading.power_w, reading.pcie_tx_mib_s, reading.pcie_rx_mib_s, reading.job_util_pct,
            reading.util_pct, reading.mem_util_pct) == (None,) * 6
    assert (reading.job_mem_mib, reading.sm_clock_mhz, reading.temp_c) == (1_000.0, 1755.0, 63.0)
    for name in (*unsupported, "nvmlDeviceGetUtilizationRates"):
        assert driver.calls[name] == 1, name


@pytest.mark.parametrize("refusal", ["NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION",
                                     "NVML_ERROR_ARGUMENT_VERSION_MISMATCH"])
def test_a_refused_variant_falls_back_to_the_older_call_and_is_not_asked_again(release, refusal):
    newer = ("nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetTemperatureV", "nvmlDeviceGetCurrentClocksEventReasons",
             "nvmlDeviceGetComputeRunningProcesses_v3")
    gpu0 = FakeGpu(UUID0, clock_reasons=0x4, compute=[FakeProcess(os.getpid(), 1_000)],
                   errors=dict.fromkeys(newer, getattr(pynvml, refusal)))
    driver = FakeDriver([gpu0])
    sampler = driver.sampler(os.getpid())
    for _ in range(3):
        reading = sampler.sample_once().gpus[0]
    sampler.stop()
    assert (reading.mem_used_mib, reading.mem_reserved_mib) == (30_527.0, None)  # the v1 call
    assert (reading.temp_c, reading.throttle_reasons, reading.job_mem_mib) == (63.0, ("power cap",), 1_000.0)
    for name, older in zip(newer, ("nvmlDeviceGetMemoryInfo", "nvmlDeviceGetTemperature",
                                   "nvmlDeviceGetCurrentClocksThrottleReasons",
                                   "nvmlDeviceGetComputeRunningProcesses_v2")):
        assert driver.calls[name] <= 1, name  # 0 where this pynvml release cannot ask
        assert driver.calls[older] == 3 * (2 if "Processes" in older else 1), older


def test_slow_values_are_cached_and_refreshed(monkeypatch):
    driver = FakeDriver([FakeGpu(UUID0)])
    sampler = driver.sampler(None)
    for _ in range(3):
        sampler.sample_once()
    assert driver.calls["nvmlDeviceGetName"] == driver.calls["nvmlDeviceGetUUID"] == 1
    assert driver.calls["nvmlDeviceGetEnforcedPowerLimit"] == 1
    assert driver.calls["nvmlDeviceGetPcieThroughput"] == 2  # tx and rx once, within _PCIE_REFRESH_S
    assert driver.calls["nvmlDeviceGetPowerUsage"] == 3
    monkeypatch.setattr(gpu_sampler, "_SLOW_REFRESH_S", 0.0)
    monkeypatch.setattr(gpu_sampler, "_PCIE_REFRESH_S", 0.0)
    driver.gpus[0].power_limit_mw = 450_000
    reading = sampler.sample_once().gpus[0]
    sampler.stop()
    assert reading.power_limit_w == 450.0
    assert driver.calls["nvmlDeviceGetEnforcedPowerLimit"] == 2
    assert driver.calls["nvmlDeviceGetPcieThroughput"] == 4


def test_a_lost_gpu_empties_its_reading_and_says_so_in_the_banner():
    driver = FakeDriver([FakeGpu(UUID0), FakeGpu(UUID1)])
    sampler = driver.sampler(None)
    assert sampler.sample_once().banner is None
    driver.gpus[1].lost = True
    snapshot = sampler.sample_once()
    sampler.stop()
    assert snapshot.banner == f"GPU 1 ({UUID1}) is lost: its readings are unavailable"
    healthy, lost = snapshot.gpus
    assert healthy.util_pct == 97.0
    assert lost.uuid == UUID1
    assert (lost.util_pct, lost.mem_used_mib, lost.temp_c, lost.power_w) == (None, None, None, None)


def test_a_gpu_lost_before_enumeration_is_named_in_the_banner():
    driver = FakeDriver([FakeGpu(UUID0), FakeGpu(UUID1, lost=True)])
    snapshot = sample(driver)
    assert snapshot.banner == "GPU 1 unavailable (GPU is lost)"
    assert [reading.uuid for reading in snapshot.gpus] == [UUID0]


# --- the job's processes ------------------------------------------------------------------------------

def test_process_tree_is_the_job_and_all_its_descendants(job, stranger):
    tree = processes.JobProcesses(job.pid)
    assert tree.alive
    assert [tree.owns(pid) for pid in (*job.children, job.pid, stranger, os.getpid(), 1, PID_MAX_LIMIT)] == [
        True, True, True, False, False, False, False]
    assert processes.parent_of(job.pid) == os.getpid() and processes.parent_of(PID_MAX_LIMIT) is None
    assert not processes.JobProcesses(PID_MAX_LIMIT).alive


def test_only_the_listed_pids_parent_chains_are_read_never_all_of_proc(job, stranger, monkeypatch):
    listdir = os.listdir

    def no_proc_scan(path="."):
        assert str(path).rstrip("/") != "/proc", "a full /proc scan"
        return listdir(path)
    monkeypatch.setattr(os, "listdir", no_proc_scan)
    read = []
    parent_of = processes.parent_of
    monkeypatch.setattr(processes, "parent_of", lambda pid: read.append(pid) or parent_of(pid))
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.children[0], 1_000), FakeProcess(stranger, 50)])
    assert sample(FakeDriver([gpu0]), job.pid).gpus[0].job_mem_mib == 1_000.0
    ancestors, pid = [], os.getpid()  # the stranger's parent is this test process
    while pid > 1:
        ancestors.append(pid)
        pid = parent_of(pid)
    assert sorted(read) == sorted([job.children[0], stranger, *ancestors])  # each read once


def test_a_process_list_that_outgrows_the_buffer_is_read_again(job, stranger):
    # pynvml sizes its buffer at count * 2 + 5 = 7; eight processes arrive before the read.
    grown = [FakeProcess(job.pid, 1_000), FakeProcess(job.children[0], 500),
             *(FakeProcess(stranger, 10) for _ in range(6))]
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, 1_000)], churn=[grown])
    driver = FakeDriver([gpu0])
    reading = sample(driver, job.pid).gpus[0]
    assert reading.job_mem_mib == 1_500.0
    assert driver.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 4  # count, too-small read, again


def test_a_process_that_exits_between_count_and_read_is_dropped(job):
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, 1_000), FakeProcess(job.children[0], 500)],
                   churn=[[FakeProcess(job.pid, 1_000)]])
    assert sample(FakeDriver([gpu0]), job.pid).gpus[0].job_mem_mib == 1_000.0


def test_a_listed_pid_that_vanished_from_proc_is_ignored(job):
    gone, alive = job.children
    _kill(gone)
    _wait_until_gone(gone)  # the shell reaps it
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(gone, 4_000, sm_util=40), FakeProcess(alive, 800, sm_util=9)])
    snapshot = sample(FakeDriver([gpu0]), job.pid)
    assert (snapshot.gpus[0].job_mem_mib, snapshot.gpus[0].job_util_pct) == (800.0, 9.0)
    assert snapshot.hint is None


def test_an_exited_job_has_no_job_memory_and_a_hint():
    process = subprocess.Popen(["true"])
    process.wait()
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(process.pid, 4_000, sm_util=40)])
    snapshot = sample(FakeDriver([gpu0]), process.pid, device_uuids=[UUID0])
    assert (snapshot.gpus[0].job_mem_mib, snapshot.gpus[0].job_util_pct) == (None, None)
    assert snapshot.hint == f"Job process {process.pid} is not running: job GPU memory unavailable"


def test_memory_the_driver_cannot_attribute_makes_job_memory_unknown(job):
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, None), FakeProcess(job.children[0], 500)])
    assert sample(FakeDriver([gpu0]), job.pid).gpus[0].job_mem_mib is None


OTHER_NAMESPACE = "pid:[0]"  # no PID namespace has inode 0, so never this test's own


def in_a_container(driver, job_pid, **kwargs):
    """Sample as a monitor whose PID namespace is not the one NVML's PIDs belong to."""
    sampler = GpuSampler(job_pid, nvml=driver.nvml, nvml_pid_namespace=OTHER_NAMESPACE, **kwargs)
    try:
        return sampler.sample_once()
    finally:
        sampler.stop()


def test_host_pids_seen_from_a_container_give_a_hint_instead_of_a_number(job, stranger):
    # One listed PID happens to be the stranger's number here: it must not count as 0 for the job.
    host_pids = [FakeProcess(PID_MAX_LIMIT + 17, 12_000, sm_util=90), FakeProcess(stranger, 600, sm_util=5),
                 FakeProcess(PID_MAX_LIMIT + 18, 600)]
    snapshot = in_a_container(FakeDriver([FakeGpu(UUID0, compute=host_pids)]), job.pid, device_uuids=[UUID0])
    reading = snapshot.gpus[0]
    assert (reading.job_mem_mib, reading.job_util_pct) == (None, None)
    assert snapshot.hint == gpu_sampler.REASON_CONTAINER.format(monitor=processes.pid_namespace())


def test_from_a_container_a_host_pid_that_happens_to_be_visible_is_not_a_zero(job, stranger):
    snapshot = in_a_container(FakeDriver([FakeGpu(UUID0, compute=[FakeProcess(stranger, 600, sm_util=5)])]),
                              job.pid, device_uuids=[UUID0])
    assert (snapshot.gpus[0].job_mem_mib, snapshot.gpus[0].job_util_pct) == (None, None)


def test_a_job_in_another_pid_namespace_is_na_even_where_its_pid_matches(job):
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(job.pid, 12_000, sm_util=90)])
    snapshot = sample(FakeDriver([gpu0]), job.pid, device_uuids=[UUID0], job_pid_namespace=OTHER_NAMESPACE)
    assert (snapshot.gpus[0].job_mem_mib, snapshot.gpus[0].job_util_pct) == (None, None)
    assert snapshot.hint == gpu_sampler.REASON_JOB_ELSEWHERE.format(job=OTHER_NAMESPACE,
                                                                    monitor=processes.pid_namespace())
    same = sample(FakeDriver([gpu0]), job.pid, job_pid_namespace=processes.pid_namespace())
    assert same.gpus[0].job_mem_mib == 12_000.0 and same.hint is None


@pytest.fixture
def device_nodes(tmp_path, monkeypatch):
    """Stand-ins for /dev/nvidia<minor>, and a job process that holds nodes open."""
    monkeypatch.setattr(processes, "DEVICE_NODE", str(tmp_path / "nvidia{minor}"))
    started = []

    def job_holding(*minors):
        paths = [str(tmp_path / f"nvidia{minor}") for minor in minors]
        for path in paths:
            open(path, "w").close()
        opener = "; ".join(f"exec {3 + i}<{path}" for i, path in enumerate(paths))
        process = subprocess.Popen(["sh", "-c", f"{opener}; echo ready; exec sleep 60"],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "ready\n"
        started.append(process)
        return process.pid
    yield job_holding
    for process in started:
        process.kill()
        process.wait()
        process.stdout.close()


def test_in_a_container_the_one_invisible_process_on_the_jobs_device_is_attributed_and_labelled(device_nodes,
                                                                                                 stranger):
    job_pid = device_nodes(1)
    host_pid = PID_MAX_LIMIT + 17
    driver = FakeDriver([FakeGpu(UUID0, compute=[FakeProcess(PID_MAX_LIMIT + 5, 3_000)]),
                         FakeGpu(UUID1, compute=[FakeProcess(host_pid, 12_000, sm_util=90),
                                                 FakeProcess(stranger, 100)])])  # a coincidence
    assert [r.index for r in in_a_container(driver, job_pid).gpus] == [1]  # rule 3 finds the job's GPU
    snapshot = in_a_container(driver, job_pid, visible_devices="0,1")
    other, job_gpu = snapshot.gpus
    assert (job_gpu.job_mem_mib, job_gpu.job_util_pct) == (12_000.0, 90.0)
    assert other.job_mem_mib is None  # the job does not hold /dev/nvidia0 open
    assert snapshot.hint == "; ".join([
        gpu_sampler.REASON_CONTAINER.format(monitor=processes.pid_namespace()),
        gpu_sampler.REASON_BY_ELIMINATION.format(index=1, node=processes.DEVICE_NODE.format(minor=1))])


def test_in_a_container_two_invisible_processes_are_not_guessed_between(device_nodes):
    job_pid = device_nodes(0)
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(PID_MAX_LIMIT + 1, 3_000), FakeProcess(PID_MAX_LIMIT + 2, 5)])
    snapshot = in_a_container(FakeDriver([gpu0]), job_pid)
    assert snapshot.gpus[0].job_mem_mib is None
    assert snapshot.hint == gpu_sampler.REASON_CONTAINER.format(monitor=processes.pid_namespace())


def test_a_gpu_used_only_by_visible_strangers_has_zero_job_memory(job, stranger):
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(stranger, 5_000, sm_util=80)])
    snapshot = sample(FakeDriver([gpu0]), job.pid, device_uuids=[UUID0])
    assert (snapshot.gpus[0].job_mem_mib, snapshot.gpus[0].job_util_pct) == (0.0, 0.0)
    assert snapshot.hint is None


def test_without_a_job_pid_job_fields_are_none():
    gpu0 = FakeGpu(UUID0, compute=[FakeProcess(os.getpid(), 5_000, sm_util=80)])
    reading = sample(FakeDriver([gpu0])).gpus[0]
    assert (reading.job_mem_mib, reading.job_util_pct) == (None, None)


# --- which GPUs ---------------------------------------------------------------------------------------

def three_gpus():
    return FakeDriver([FakeGpu(UUID0), FakeGpu(UUID1, temp_c=70), FakeGpu(UUID2, temp_c=80)])


def selected(driver, job_pid=None, **kwargs):
    sampler = driver.sampler(job_pid, **kwargs)
    indices = [reading.index for reading in sampler.sample_once().gpus]
    sampler.stop()
    return sampler.selection_rule, indices


@pytest.mark.parametrize(("uuids", "expected"), [
    ([UUID2, UUID0], [2, 0]),
    ([UUID1[4:]], [1]),  # torch's bare UUID
    ([UUID2.upper()], [2]),
    (["GPU-00000000-0000-0000-0000-000000000000", UUID1], [1]),
])
def test_probe_uuids_choose_the_gpus_in_order(uuids, expected):
    assert selected(three_gpus(), device_uuids=uuids, visible_devices="0") == ("device_uuids", expected)


@pytest.mark.parametrize(("visible", "expected"), [
    ("2,0", [2, 0]),
    (" 1 , 2 ", [1, 2]),
    ("1abc", [1]),
    (UUID2[:12], [2]),  # a unique UUID prefix, as CUDA accepts
    (f"{UUID1},{UUID0}", [1, 0]),
    ("1,nonsense,0", [1]),  # CUDA drops everything from the first invalid entry
    ("1,7,0", [1]),
    ("2,2,0", [2]),
])
def test_cuda_visible_devices_chooses_the_gpus(visible, expected):
    unknown = ["GPU-00000000-0000-0000-0000-000000000000"]
    rule, indices = selected(three_gpus(), device_uuids=unknown, visible_devices=visible)
    assert (rule, indices) == ("visible_devices", expected)


def test_without_uuids_or_visible_devices_the_jobs_gpus_are_watched(job):
    driver = three_gpus()
    driver.gpus[1].compute = [FakeProcess(job.children[1], 100)]
    sampler = driver.sampler(job.pid, visible_devices="GPU-ffff,")
    assert [r.index for r in sampler.sample_once().gpus] == [1]
    assert sampler.selection_rule == "job_processes"
    driver.gpus[2].compute = [FakeProcess(job.pid, 100)]  # the job opens a second GPU later
    assert [r.index for r in sampler.sample_once().gpus] == [1, 2]
    sampler.stop()


def mixed_gpus():
    return FakeDriver([FakeGpu(UUID0, name="NVIDIA GeForce RTX 3060"), FakeGpu(UUID1), FakeGpu(UUID2)])


@pytest.mark.parametrize("order", [None, "FASTEST_FIRST", "pci_bus"])
def test_indices_are_not_trusted_where_cuda_may_order_the_gpus_otherwise(job, order):
    driver = mixed_gpus()
    driver.gpus[2].compute = [FakeProcess(job.pid, 100)]
    snapshot = sample(driver, job.pid, visible_devices="1", cuda_device_order=order)
    assert [r.index for r in snapshot.gpus] == [2]  # the job's process, not NVML's GPU 1
    assert snapshot.hint == gpu_sampler.REASON_UNSAFE_INDICES.format(order=(order or "FASTEST_FIRST").upper())


def test_indices_are_trusted_in_pci_bus_order_and_uuids_always():
    assert selected(mixed_gpus(), visible_devices="2,0", cuda_device_order="PCI_BUS_ID") == (
        "visible_devices", [2, 0])
    assert selected(mixed_gpus(), visible_devices=f"{UUID2},{UUID0}") == ("visible_devices", [2, 0])


def test_indices_are_not_trusted_on_a_mig_machine():
    driver = mig_machine(os.getpid())
    driver.gpus[0].name = driver.gpus[1].name  # one model
    assert selected(driver, visible_devices="0")[0] == "all"


def test_a_job_without_gpu_processes_gets_every_gpu(job):
    assert selected(three_gpus(), job.pid) == ("all", [0, 1, 2])
    assert selected(three_gpus(), None, visible_devices="") == ("all", [0, 1, 2])


# --- MIG ------------------------------------------------------------------------------------------------

def mig_machine(job_pid):
    slices = [FakeGpu(MIG_A, name="NVIDIA A100-SXM4-80GB MIG 1g.10gb", total_mib=9_728, used_mib=13,
                      reserved_mib=0),
              FakeGpu(MIG_B, name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", total_mib=40_192, used_mib=20_000,
                      reserved_mib=0, compute=[FakeProcess(job_pid, 19_500, sm_util=60)])]
    return FakeDriver([FakeGpu(UUID0), FakeGpu(UUID1, name="NVIDIA A100-SXM4-80GB", temp_c=55,
                                               sm_clock_mhz=1410, clock_reasons=0x4, mig_slices=slices)])


def test_a_mig_slice_reads_its_memory_and_its_parents_temperature(job, release):
    driver = mig_machine(job.pid)
    probe_uuid = "GPU-" + MIG_B[4:]  # the probe labels MIG UUIDs 'GPU-' too
    snapshot = sample(driver, job.pid, device_uuids=[probe_uuid])
    assert snapshot.banner is None and snapshot.hint is None
    assert snapshot.gpus == (GpuReading(
        index=1, uuid=MIG_B, name="NVIDIA A100-SXM4-80GB", util_pct=None, mem_util_pct=None,
        mem_used_mib=20_000.0, mem_reserved_mib=0.0 if has_memory_v2(release) else None, mem_total_mib=40_192.0,
        job_mem_mib=19_500.0, job_util_pct=None, power_w=None, power_limit_w=None,
        temp_c=55.0, sm_clock_mhz=1410.0, throttle_reasons=("power cap",),
        pcie_tx_mib_s=None, pcie_rx_mib_s=None, mig="MIG 3g.40gb"),)
    assert driver.calls["nvmlDeviceGetPowerUsage"] == 0  # a slice has no power reading of its own


def test_mig_gpus_are_listed_as_their_slices():
    snapshot = sample(mig_machine(os.getpid()))
    assert [(r.index, r.uuid, r.mig) for r in snapshot.gpus] == [
        (0, UUID0, None), (1, MIG_A, "MIG 1g.10gb"), (1, MIG_B, "MIG 3g.40gb")]


def test_a_mig_gpu_named_by_its_parent_uuid_means_its_slices():
    assert selected(mig_machine(os.getpid()), device_uuids=[UUID1]) == ("device_uuids", [1, 1])


# --- sampler lifecycle -------------------------------------------------------------------------------

def test_the_thread_samples_at_most_at_2_hz_and_stop_shuts_nvml_down():
    driver = FakeDriver([FakeGpu(UUID0)])
    sampler = driver.sampler(None)
    before = sampler.latest()
    assert before.gpus == () and before.banner is None
    sampler.start()
    sampler.start()  # already running: no second thread
    seen = set()
    deadline = time.monotonic() + WAIT_S  # three samples take 1 s; a loaded machine may starve the thread
    while len(seen - {before.time}) < 3 and time.monotonic() < deadline:
        seen.add(sampler.latest().time)
        time.sleep(0.02)
    sampler.stop()
    samples = sorted(seen - {before.time})
    assert len(samples) >= 3  # samples at 0, 0.5 and 1.0 s
    # load can only stretch the interval: never faster than 2 Hz (a little slack for clock rounding)
    assert min(b - a for a, b in zip(samples, samples[1:])) >= 0.45
    assert sampler.latest().gpus[0].uuid == UUID0
    assert driver.calls["nvmlInitWithFlags"] == driver.calls["nvmlShutdown"] == 1
    assert not driver.initialized
    assert [t.name for t in threading.enumerate()].count("bsmon-gpu-sampler") == 0


def test_sampling_after_stop_opens_nvml_again():
    driver = FakeDriver([FakeGpu(UUID0)])
    sampler = driver.sampler(None)
    sampler.sample_once()
    sampler.stop()
    reading = sampler.sample_once().gpus[0]  # handles from the closed session would read nothing
    sampler.stop()
    assert reading.util_pct == 97.0
    assert driver.calls["nvmlInitWithFlags"] == driver.calls["nvmlShutdown"] == 2


def test_a_failing_sample_shows_in_latest_instead_of_killing_the_thread():
    sampler = GpuSampler(None, nvml=types.SimpleNamespace())  # not pynvml at all: every sample raises
    with pytest.raises(AttributeError):
        sampler.sample_once()
    sampler.start()
    deadline = time.monotonic() + WAIT_S
    while sampler.latest().banner is None and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert sampler.latest().banner.startswith("GPU sampling failed: AttributeError(")


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"job_pid": 0}, ValueError, "job_pid must be a positive process id"),
    ({"job_pid": True}, ValueError, "job_pid must be a positive process id"),
    ({"job_pid": None, "device_uuids": UUID0}, TypeError, "device_uuids must be a sequence"),
    ({"job_pid": None, "visible_devices": 0}, TypeError, "visible_devices must be"),
    ({"job_pid": None, "interval_s": 0}, ValueError, "interval_s must be a positive number"),
    ({"job_pid": None, "interval_s": float("nan")}, ValueError, "interval_s must be a positive number"),
])
def test_bad_arguments_are_refused_with_a_sentence(kwargs, error, message):
    with pytest.raises(error, match=message):
        GpuSampler(**kwargs)


# --- records and csv ----------------------------------------------------------------------------------

def test_records_round_trip_through_json(job):
    driver = mig_machine(job.pid)
    snapshot = sample(driver, job.pid, device_uuids=[UUID0, MIG_B], job_pid_namespace=OTHER_NAMESPACE)
    assert snapshot.hint is not None and any(r.util_pct is None for r in snapshot.gpus)
    restored = GpuSnapshot.from_record(json.loads(json.dumps(snapshot.to_record())))
    assert restored == snapshot
    banner_only = GpuSnapshot(12.5, (), "No NVIDIA driver found", None)
    assert GpuSnapshot.from_record(json.loads(json.dumps(banner_only.to_record()))) == banner_only


def test_unknown_record_keys_are_ignored():
    record = GpuSnapshot(1.0, (reading(),)).to_record()
    record["future"] = 1
    record["gpus"][0]["future"] = 2
    assert GpuSnapshot.from_record(record) == GpuSnapshot(1.0, (reading(),))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.pop("gpus"), "snapshot record has no 'gpus'"),
    (lambda r: r.update(time="now"), "snapshot record key 'time' must be int or float"),
    (lambda r: r["gpus"][0].update(util_pct="97"),
     r"gpus\[0\] record key 'util_pct' must be int or float or null"),
    (lambda r: r["gpus"][0].update(index=True), r"gpus\[0\] record key 'index' must be int"),
    (lambda r: r["gpus"][0].update(throttle_reasons=[4]), "must be a list of strings"),
    (lambda r: r["gpus"].append("gpu"), r"gpus\[1\] must be a dict"),
])
def test_malformed_records_are_refused_with_the_key_named(mutate, message):
    record = GpuSnapshot(1.0, (reading(),)).to_record()
    mutate(record)
    with pytest.raises(ValueError, match=message):
        GpuSnapshot.from_record(record)
    with pytest.raises(ValueError, match="must be a dict"):
        GpuSnapshot.from_record([record])


def reading(**values):
    fields = dict(index=0, uuid=UUID0, name="NVIDIA H100 80GB HBM3", util_pct=90.0, mem_util_pct=40.0,
                  mem_used_mib=30_000.0, mem_reserved_mib=527.0, mem_total_mib=81_559.0, job_mem_mib=12_000.0,
                  job_util_pct=80.0, power_w=600.0, power_limit_w=700.0, temp_c=60.0, sm_clock_mhz=1755.0,
                  throttle_reasons=(), pcie_tx_mib_s=20.0, pcie_rx_mib_s=5.0, mig=None)
    return GpuReading(**{**fields, **values})


def test_csv_fields_of_one_gpu_are_its_values():
    assert GpuSnapshot(1.0, (reading(),)).csv_fields() == {
        "gpu_util_pct": 90.0, "gpu_mem_used_mib": 30_000.0, "gpu_mem_total_mib": 81_559.0,
        "gpu_job_mem_mib": 12_000.0, "gpu_power_w": 600.0, "gpu_temp_c": 60.0, "gpu_sm_clock_mhz": 1755.0}


def test_csv_fields_of_two_gpus_are_documented_aggregates():
    second = reading(index=1, util_pct=60.0, mem_used_mib=10_000.0, mem_total_mib=40_000.0, job_mem_mib=0.0,
                     power_w=250.5, temp_c=71.0, sm_clock_mhz=1410.0)
    assert GpuSnapshot(1.0, (reading(), second)).csv_fields() == {
        "gpu_util_pct": 75.0, "gpu_mem_used_mib": 40_000.0, "gpu_mem_total_mib": 121_559.0,
        "gpu_job_mem_mib": 12_000.0, "gpu_power_w": 850.5, "gpu_temp_c": 71.0, "gpu_sm_clock_mhz": 1410.0}


def test_csv_aggregates_are_none_when_any_gpu_lacks_the_value():
    fields = GpuSnapshot(1.0, (reading(), reading(index=1, power_w=None, util_pct=None))).csv_fields()
    assert fields["gpu_power_w"] is None and fields["gpu_util_pct"] is None
    assert fields["gpu_temp_c"] == 60.0
    assert set(GpuSnapshot(1.0, ()).csv_fields().values()) == {None}
