"""Real-hardware check of bsmon's NVML path (bsmon.gpu), about 3-5 minutes on a GPU machine.

Run from the repository root, on a machine with an NVIDIA GPU, with nothing else using it:

    .venv/bin/python demos/gpu_check.py

It prints one line per check, ``PASS``, ``FAIL`` or ``SKIP``, with the evidence (what was
measured, against what) or the reason the machine cannot show it (no GPU, MIG off, a PID
namespace), and exits 1 if any check fails. Each check compares bsmon with an independent
source (nvidia-smi, torch, a second way of asking NVML), so none passes by finding nothing:
a check with nothing to compare SKIPs and says why. Paste the output into docs/gpu.md.

The checks: the environment; every NVML function bsmon uses (return type, latency); job
memory against ``nvidia-smi --query-compute-apps``; per-process utilisation asked two ways
while a child process runs matmuls; device selection by UUID, by index and by neither; the
sampler's cost per sample; and bsmon's own monitor path (``bsmon attach`` in a separate
process, recording a CUDA job that called ``bsmon.watch``).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bsmon.gpu import GpuSampler, processes
from bsmon.gpu.nvml import FUNCTIONS, MEMORY_V2, PROCESS_SYMBOLS, Device, ProcessInfoR535, Session, text

MIB = 1024 * 1024
BUSY_SECONDS = 20.0  # the matmul child's run; the checks sample while it runs
CHILD_MIB = 1536  # the child's known allocation on top of its CUDA context and matmul buffers
SAMPLER_COST_TARGET_MS = 25.0  # 5 % of one core at bsmon's 2 Hz

# A CUDA process with a fixed allocation that keeps the GPU busy: argv = device, seconds, MiB.
MATMUL_CHILD = """
import sys, time, torch
device, seconds, mib = torch.device("cuda", int(sys.argv[1])), float(sys.argv[2]), int(sys.argv[3])
block = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
a = torch.randn(4096, 4096, device=device)
b = a @ a
torch.cuda.synchronize(device)
print("ready", str(torch.cuda.get_device_properties(device).uuid), flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(8):
        torch.matmul(a, a, out=b)
    torch.cuda.synchronize(device)
"""
# CUDA's own device order in a fresh process: one UUID per CUDA index.
UUID_CHILD = """
import json, torch
print(json.dumps([str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]))
"""
# A small training job under bsmon.watch on cuda:0: argv = seconds.
TRAIN_CHILD = """
import sys, time, torch
from torch import nn
import bsmon
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 2048)).cuda()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
x = torch.randn(2048, 2048, device="cuda")
with bsmon.watch(model, optimizer, batch_size=2048, name="gpu-check"):
    end, step = time.monotonic() + float(sys.argv[1]), 0
    while time.monotonic() < end:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if step == 20:
            torch.cuda.synchronize()
            print("ready", flush=True)
"""


class Skip(Exception):
    """The machine cannot show this check; the message says why."""


class Check:
    """Runs the checks, prints a line each, remembers failures."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def run(self, name: str, check: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, evidence = check()
            status = "PASS" if ok else "FAIL"
        except Skip as reason:
            status, evidence = "SKIP", str(reason)
        except Exception as exc:  # noqa: BLE001 - an exception in bsmon is a finding, not a crash
            status, evidence = "FAIL", f"raised {exc!r}"
        print(f"{status} {name}: {evidence}", flush=True)
        if status == "FAIL":
            self.failed.append(name)


# -- helpers ----------------------------------------------------------------------------------

def open_session() -> Session:
    session, banner = Session.open(None)
    if session is None:
        raise Skip(banner.removesuffix(": GPU panel disabled"))
    return session


def leaves(session: Session) -> list[Device]:
    return [leaf for device in session.devices for leaf in device.leaves()]


def need_cuda() -> None:
    try:
        import torch
    except ImportError as exc:
        raise Skip(f"torch is not installed ({exc})") from None
    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device")


def smi_compute_apps() -> dict[int, float]:
    """pid -> used MiB (summed over GPUs) of every compute process, from nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        raise Skip("nvidia-smi is not on PATH")
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True)
    apps: dict[int, float] = {}
    for line in out.stdout.strip().splitlines():
        _, pid, used = (part.strip() for part in line.split(","))
        apps[int(pid)] = apps.get(int(pid), 0.0) + (float(used) if used.replace(".", "").isdigit() else float("nan"))
    return apps


class Child:
    """A python child process running ``code``; ``ready`` is the rest of its first 'ready' line."""

    def __init__(self, code: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, **(env or {})})
        line = self.process.stdout.readline().split()
        if not line or line[0] != "ready":
            self.close()
            raise RuntimeError(f"the CUDA child did not start (exit {self.process.returncode})")
        self.ready = line[1:]
        self.pid = self.process.pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()


def timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    value = call()
    return value, (time.perf_counter() - started) * 1e3


# -- the checks -------------------------------------------------------------------------------

def environment() -> tuple[bool, str]:
    session = open_session()
    try:
        nv = session.nv
        driver = text(nv.nvmlSystemGetDriverVersion())
        v3 = session.functions.get("nvmlDeviceGetComputeRunningProcesses_v3")
        r535 = v3 is not None and v3.args[2] is ProcessInfoR535
        pynvml_struct = getattr(nv, "c_nvmlProcessInfo_v3_t", getattr(nv, "c_nvmlProcessInfo_t", None))
        pynvml_fields = [name for name, *_ in getattr(pynvml_struct, "_fields_", [])]
        namespace = processes.pid_namespace()
        gpus = "; ".join(f"{d.index} {d.name} {d.uuid} MIG {'on' if d.mig_enabled else 'off'}"
                         + "".join(f" [{s.mig} {s.uuid}]" for s in d.slices) for d in session.devices)
        facts = (f"driver {driver}, nvidia-ml-py {importlib.metadata.version('nvidia-ml-py')}, "
                 f"v3 process entries {'with' if r535 else 'without'} the R535 CC field "
                 f"(this pynvml's struct: {len(pynvml_fields)} fields), PID namespace {namespace} "
                 f"({'host' if namespace == processes.ROOT_PID_NAMESPACE else 'NOT the host'}), GPUs: {gpus}")
    finally:
        session.close()
    if shutil.which("nvidia-smi") is None:
        return True, facts + "; nvidia-smi absent, driver version not cross-checked"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return smi[:1] == [driver], facts + f"; nvidia-smi says driver {smi[:1]}"


def functions() -> tuple[bool, str]:
    """Every call bsmon makes, on every GPU and slice: what it returns and how long it takes."""
    session = open_session()
    nv = session.nv
    since_us = time.time_ns() // 1000 - 1_000_000
    arguments = {"nvmlDeviceGetTemperatureV": (nv.NVML_TEMPERATURE_GPU,),
                 "nvmlDeviceGetTemperature": (nv.NVML_TEMPERATURE_GPU,),
                 "nvmlDeviceGetClockInfo": (nv.NVML_CLOCK_SM,),
                 "nvmlDeviceGetPcieThroughput": (nv.NVML_PCIE_UTIL_TX_BYTES,),
                 "nvmlDeviceGetProcessUtilization": (since_us,)}
    names = [*FUNCTIONS, MEMORY_V2, *(s for symbols in PROCESS_SYMBOLS.values() for s in symbols)]
    lines, bad = [], []
    try:
        for device in leaves(session):
            for name in names:
                function = session.functions.get(name)
                if function is None:
                    lines.append(f"{name}: absent")
                    continue
                try:
                    value, ms = timed(lambda: function(device.handle, *arguments.get(name, ())))
                    kind = type(value).__name__
                    if isinstance(value, bytes):
                        kind += " (decoded by bsmon)"
                except nv.NVMLError as exc:
                    ms, kind = float("nan"), f"NVMLError {exc}"
                except Exception as exc:  # noqa: BLE001 - anything else is a bug bsmon would hit
                    ms, kind = float("nan"), f"RAISED {exc!r}"
                    bad.append(f"{name} on GPU {device.index}")
                if ms > 1000:
                    bad.append(f"{name} took {ms:.0f} ms")
                lines.append(f"{name}@{device.uuid[:12] if device.uuid else device.index}: {kind} {ms:.2f} ms")
    finally:
        session.close()
    print("\n".join(f"    {line}" for line in lines))
    return not bad, f"{len(lines)} calls listed above" + (f"; problems: {', '.join(bad)}" if bad else "")


def job_memory() -> tuple[bool, str]:
    need_cuda()
    child = Child(MATMUL_CHILD, "0", str(BUSY_SECONDS / 2), str(CHILD_MIB))
    try:
        uuid = child.ready[0]
        sampler = GpuSampler(child.pid, device_uuids=[uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"])
        snapshot = sampler.sample_once()
        sampler.stop()
        session = open_session()
        try:
            bsmon_lists: dict[int, float] = {}
            for device in leaves(session):
                for pid, used in (session.query(device, PROCESS_SYMBOLS["Compute"]) or {}).items():
                    bsmon_lists[pid] = bsmon_lists.get(pid, 0.0) + (float("nan") if used is None else used / MIB)
        finally:
            session.close()
        smi = smi_compute_apps()
    finally:
        child.close()
    if len(snapshot.gpus) != 1:
        return False, f"expected one GPU for the child's UUID {uuid}, got {snapshot}"
    reading = snapshot.gpus[0]
    if processes.pid_namespace() != processes.ROOT_PID_NAMESPACE:
        if reading.job_mem_mib is not None:
            return False, f"in a PID namespace not the host's, bsmon showed job memory {reading.job_mem_mib} MiB"
        raise Skip(f"this PID namespace is not the host's, so NVML's PIDs cannot be matched here; bsmon says N/A "
                   f"with {snapshot.hint!r}")
    lists_agree = set(bsmon_lists) == set(smi) and all(abs(bsmon_lists[pid] - smi[pid]) <= 1 for pid in smi)
    ok = (child.pid in smi and reading.job_mem_mib is not None and abs(reading.job_mem_mib - smi[child.pid]) <= 1
          and reading.job_mem_mib >= CHILD_MIB and lists_agree and snapshot.hint is None)
    return ok, (f"child {child.pid}: bsmon {reading.job_mem_mib} MiB, nvidia-smi {smi.get(child.pid)} MiB "
                f"(it allocated {CHILD_MIB} MiB plus context and buffers); every compute process (pid, MiB): "
                f"bsmon {sorted((pid, round(mib)) for pid, mib in bsmon_lists.items())}, nvidia-smi "
                f"{sorted((pid, round(mib)) for pid, mib in smi.items())}; hint {snapshot.hint!r}")


def utilisation() -> tuple[bool, str]:
    """bsmon's way (the last second, every sample) against asking only for samples newer than seen."""
    need_cuda()
    if processes.pid_namespace() != processes.ROOT_PID_NAMESPACE:
        raise Skip("this PID namespace is not the host's: per-process samples cannot be matched here")
    child = Child(MATMUL_CHILD, "0", str(BUSY_SECONDS), "64")
    try:
        uuid = child.ready[0]
        sampler = GpuSampler(child.pid, device_uuids=[uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"])
        watched = sampler.sample_once().gpus[0].uuid
        session = open_session()
        device = next(d for d in leaves(session) if d.uuid and d.uuid[4:] == watched[4:])
        nv, seen_us = session.nv, 0
        ours, since_newest, device_util = [], [], []
        try:
            for _ in range(int(BUSY_SECONDS * 2) - 4):
                time.sleep(0.5)
                reading = sampler.sample_once().gpus[0]
                ours.append(reading.job_util_pct)
                device_util.append(reading.util_pct)
                try:
                    samples = nv.nvmlDeviceGetProcessUtilization(device.handle, seen_us)
                    mine = [s for s in samples if s.pid == child.pid]
                    seen_us = max([seen_us, *(s.timeStamp for s in samples)])
                    since_newest.append(mine[-1].smUtil if mine else 0)
                except nv.NVMLError as exc:
                    since_newest.append(f"{exc}")
        finally:
            session.close()
            sampler.stop()
    finally:
        child.close()
    busy = [value for value, util in zip(ours, device_util) if util is not None and util >= 50]
    if not busy:
        raise Skip(f"the matmul child never made the GPU 50 % busy (device utilisation {device_util})")
    ok = all(value is not None and value > 0 for value in busy)
    return ok, (f"while the GPU was >= 50 % busy, bsmon's job utilisation {busy}; asking only for newer samples "
                f"gave {since_newest}; device utilisation {device_util}")


def selection() -> tuple[bool, str]:
    need_cuda()
    session = open_session()
    nvml_uuids = [d.uuid for d in leaves(session)]
    session.close()
    evidence, ok = [], True
    for order in (None, "PCI_BUS_ID"):
        env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
        if order:
            env["CUDA_DEVICE_ORDER"] = order
        probe = subprocess.run([sys.executable, "-c", UUID_CHILD], capture_output=True, text=True, timeout=120,
                               env=env, check=True)
        cuda_uuids = json.loads(probe.stdout)
        for index, cuda_uuid in enumerate(cuda_uuids):
            label = cuda_uuid if cuda_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{cuda_uuid}"
            by_uuid = GpuSampler(None, device_uuids=[label])
            chosen = [r.uuid for r in by_uuid.sample_once().gpus]
            by_uuid.stop()
            ok &= by_uuid.selection_rule == "device_uuids" and [u[4:] for u in chosen] == [label[4:]]
            by_index = GpuSampler(None, visible_devices=str(index), cuda_device_order=order)
            snapshot = by_index.sample_once()
            by_index.stop()
            if by_index.selection_rule == "visible_devices":  # bsmon trusted the index: it must be right
                ok &= [r.uuid[4:] for r in snapshot.gpus] == [label[4:]]
            evidence.append(f"order {order or 'default'} cuda:{index}={label[:12]}: by UUID "
                            f"{[u[:12] for u in chosen]}, by index {by_index.selection_rule} "
                            f"{[r.uuid[:12] for r in snapshot.gpus]}"
                            + (f" ({snapshot.hint})" if snapshot.hint else ""))
    child = Child(MATMUL_CHILD, "0", "10", "64")
    try:
        by_process = GpuSampler(child.pid)
        snapshot = by_process.sample_once()
        by_process.stop()
    finally:
        child.close()
    label = child.ready[0][4:] if child.ready[0].startswith("GPU-") else child.ready[0]
    if processes.pid_namespace() == processes.ROOT_PID_NAMESPACE:
        ok &= by_process.selection_rule == "job_processes" and [r.uuid[4:] for r in snapshot.gpus] == [label]
    evidence.append(f"neither: {by_process.selection_rule} {[r.uuid[:12] for r in snapshot.gpus]} "
                    f"for a child on {label[:8]}; NVML order {[u[:12] for u in nvml_uuids]}")
    return ok, "; ".join(evidence)


def sampler_cost() -> tuple[bool, str]:
    need_cuda()
    child = Child(MATMUL_CHILD, "0", "30", "64")
    try:
        sampler = GpuSampler(child.pid)
        sampler.sample_once()  # NVML start and enumeration are not per-sample costs
        costs = [timed(sampler.sample_once)[1] for _ in range(60)]
        sampler.stop()
    finally:
        child.close()
    mean, p95 = statistics.fmean(costs), sorted(costs)[int(0.95 * len(costs))]
    return mean <= SAMPLER_COST_TARGET_MS, (f"{len(costs)} samples of {len(sampler.latest().gpus)} GPU(s): mean "
                                            f"{mean:.2f} ms, p95 {p95:.2f} ms, max {max(costs):.2f} ms "
                                            f"(target {SAMPLER_COST_TARGET_MS:.0f} ms)")


def monitor_path() -> tuple[bool, str]:
    """`bsmon attach` in its own process, watching a CUDA job that called bsmon.watch."""
    need_cuda()
    if processes.pid_namespace() != processes.ROOT_PID_NAMESPACE:
        raise Skip("this PID namespace is not the host's: the job's memory cannot be matched here")
    from bsmon import store
    with tempfile.TemporaryDirectory() as home:
        env = {"BSMON_HOME": home}
        job = Child(TRAIN_CHILD, "25", env=env)
        monitor = None
        try:
            info = store.resolve_session(None, Path(home), running=True)
            monitor = subprocess.Popen([sys.executable, "-m", "bsmon.cli", "attach", "--json", info.id],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, **env})
            smi: list[float] = []
            while job.process.poll() is None:
                smi += [mib for pid, mib in smi_compute_apps().items() if pid == job.pid]
                time.sleep(1)
            monitor.wait(timeout=60)
            errors = monitor.stderr.read()
        finally:
            job.close()
            if monitor is not None:
                if monitor.poll() is None:
                    monitor.kill()
                monitor.wait()
                monitor.stderr.close()
        records, _ = store.read_records(info.directory / store.GPU_FILE)
    hello = info.hello
    job_mem = [g["job_mem_mib"] for r in records for g in r["snapshot"]["gpus"] if g["job_mem_mib"]]
    hints = {r["snapshot"]["hint"] for r in records} - {None}
    if not smi or not job_mem:
        return False, f"no readings to compare: nvidia-smi {smi}, recorded {job_mem}, hints {hints}, stderr {errors!r}"
    ours, theirs = statistics.median(job_mem[-10:]), statistics.median(smi[-10:])
    ok = abs(ours - theirs) <= max(2.0, 0.01 * theirs) and not hints
    return ok, (f"{len(records)} snapshots recorded by the attach process; job memory median bsmon {ours:.0f} MiB "
                f"vs nvidia-smi {theirs:.0f} MiB; hello pid_namespace {hello.get('pid_namespace')}, "
                f"cuda_device_order {hello.get('cuda_device_order')}, devices {hello.get('devices')}; hints {hints}")


def mig() -> tuple[bool, str]:
    session = open_session()
    try:
        mig_gpus = [d for d in session.devices if d.mig_enabled]
        if not mig_gpus:
            raise Skip("MIG is off on every GPU: slices cannot be checked here")
        sampler = GpuSampler(None)
        snapshot = sampler.sample_once()
        sampler.stop()
        slices = [r for r in snapshot.gpus if r.mig]
        expected = sum(len(d.slices) for d in mig_gpus)
        ok = len(slices) == expected and all(r.uuid.startswith("MIG-") and r.power_w is None for r in slices)
        return ok, f"{expected} slices enumerated, read {[(r.uuid[:12], r.mig, r.mem_total_mib) for r in slices]}"
    finally:
        session.close()


def main() -> int:
    ctypes_ok = True
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        ctypes_ok = False
    print(f"bsmon gpu_check on {os.uname().nodename}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
          f"libnvidia-ml {'found' if ctypes_ok else 'NOT found'}", flush=True)
    check = Check()
    for name, function in (("environment", environment), ("NVML functions", functions),
                           ("job memory vs nvidia-smi", job_memory), ("per-process utilisation", utilisation),
                           ("device selection", selection), ("sampler cost", sampler_cost),
                           ("monitor path", monitor_path), ("MIG", mig)):
        check.run(name, function)
    print(f"{len(check.failed)} check(s) failed: {', '.join(check.failed)}" if check.failed else "no check failed")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
