"""NVML samples taken beside a live job go into its session: replay and CSV export include them."""

import csv
import io
import os
import time

from bsmon import store
from bsmon.client import Feed
from bsmon.export import write_csv
from bsmon.gpu import processes
from conftest import start_job
from fake_nvml import FakeDriver, FakeGpu, FakeProcess

UUID = "GPU-11111111-2222-3333-4444-555555555555"


def test_gpu_samples_are_recorded_and_exported_per_step(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    ready = tmp_path / "ready"
    job = start_job("--steps", "40", "--sleep", "0.05", "--ready-file", str(ready))
    while not ready.exists():
        time.sleep(0.05)
    info = store.resolve_session(None, running=True)
    hello = info.hello  # what the sampler needs to know about the job's environment
    assert (hello["pid_namespace"], hello["cuda_device_order"]) == (processes.pid_namespace(), "PCI_BUS_ID")
    driver = FakeDriver([FakeGpu(UUID, compute=[FakeProcess(job.pid, 1234, sm_util=80)])])
    sampler = driver.sampler(job.pid, device_uuids=[UUID], interval_s=0.1,
                             cuda_device_order=hello["cuda_device_order"], job_pid_namespace=hello["pid_namespace"])
    sampler.start()
    feed = Feed().attach(info.socket, info.directory)
    feed.record_gpu(sampler)
    second = Feed().attach(info.socket, info.directory)  # a second monitor shows but does not record
    second.record_gpu(sampler)
    assert job.wait(timeout=60) == 0
    assert feed.wait(timeout=10)
    time.sleep(0.3)
    feed.stop()
    second.stop()
    sampler.stop()
    # (the live view's latest snapshot may postdate the job: then job memory is rightly N/A)

    recorded, _ = store.read_records(info.directory / store.GPU_FILE)
    times = [r["snapshot"]["time"] for r in recorded]
    assert len(recorded) >= 2 and times == sorted(set(times)), "one recorder, no duplicates"

    replayed = Feed().replay(store.session_info(info.directory)).model
    assert replayed.gpu is not None and replayed.gpu.gpus[0].uuid == UUID
    out = io.StringIO()
    write_csv(replayed, out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    filled = [r for r in rows if r["gpu_job_mem_mib"]]
    assert filled and all(float(r["gpu_job_mem_mib"]) == 1234 for r in filled)
    assert all(r["gpu_mem_total_mib"] for r in filled)
    assert os.path.getsize(info.directory / store.GPU_FILE) > 0
