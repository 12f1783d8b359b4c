"""NVML samples taken beside a live job, by the sampler `bsmon attach` builds from the job's hello,
go into its session: replay and CSV export include them."""

import csv
import io
import os

import bsmon.gpu
from bsmon import cli, store
from bsmon.client import Feed
from bsmon.export import write_csv
from bsmon.gpu import processes
from conftest import WAIT_S, start_job, wait_for
from fake_nvml import FakeDriver, FakeGpu, FakeProcess

UUID = "GPU-11111111-2222-3333-4444-555555555555"


def test_gpu_samples_are_recorded_and_exported_per_step(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ready = tmp_path / "ready"
    job = start_job("--steps", "100", "--sleep", "0.05", "--ready-file", str(ready))
    wait_for(ready.exists, "the job's first step", job)
    info = store.resolve_session(None, running=True)
    driver = FakeDriver([FakeGpu(UUID, compute=[FakeProcess(job.pid, 1234, sm_util=80)])])
    made = []

    def sampler_on_the_fake(**hello_fields):  # what `bsmon attach` builds from the hello, over the fake
        made.append(hello_fields)
        return driver.sampler(interval_s=0.1, **hello_fields)
    monkeypatch.setattr(bsmon.gpu, "GpuSampler", sampler_on_the_fake)
    feed = cli._attach_with_gpu(Feed(), info)
    second = cli._attach_with_gpu(Feed(), info)  # a second monitor shows but does not record
    assert made[0] == {"job_pid": job.pid, "device_uuids": [], "visible_devices": None,
                       "cuda_device_order": "PCI_BUS_ID", "job_pid_namespace": processes.pid_namespace()}
    gpu_file = info.directory / store.GPU_FILE
    wait_for(lambda: gpu_file.exists() and len(store.read_records(gpu_file)[0]) >= 2,
             "two GPU samples recorded while the job runs")  # a loaded machine can starve the sampler a while
    assert job.wait(timeout=WAIT_S) == 0
    assert feed.wait(timeout=WAIT_S)
    feed.stop()
    second.stop()
    # (the live view's latest snapshot may postdate the job: then job memory is rightly N/A)

    recorded, _ = store.read_records(info.directory / store.GPU_FILE)
    times = [r["snapshot"]["time"] for r in recorded]
    assert len(recorded) >= 2 and times == sorted(set(times)), "one recorder, no duplicates"

    replayed = Feed().replay(store.session_info(info.directory)).model
    assert replayed.gpu is not None and replayed.gpu.gpus[0].uuid == UUID
    out = io.StringIO()
    write_csv(info.directory, out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    filled = [r for r in rows if r["gpu_job_mem_mib"]]
    assert filled and all(float(r["gpu_job_mem_mib"]) == 1234 for r in filled)
    assert all(r["gpu_mem_total_mib"] for r in filled)
    assert os.path.getsize(info.directory / store.GPU_FILE) > 0
