"""demos/gpu_check.py, the real-hardware check: on this machine, and its NVML-only checks on the fake."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT
from fake_nvml import OLDEST, FakeDriver, FakeGpu, FakeProcess
from test_gpu import _nvml_library_present

sys.path.insert(0, str(ROOT / "demos"))
import gpu_check  # noqa: E402

CHECKS = ("environment", "NVML functions", "job memory vs nvidia-smi", "per-process utilisation",
          "device selection", "sampler cost", "monitor path", "MIG")


@pytest.mark.skipif(_nvml_library_present(), reason="this machine has an NVIDIA driver: run the check itself")
def test_without_a_gpu_every_check_skips_with_its_reason():
    result = subprocess.run([sys.executable, str(ROOT / "demos" / "gpu_check.py")], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "libnvidia-ml NOT found" in lines[0] and lines[-1] == "no check failed"
    assert [re.match(r"SKIP (.+?): (.+)", line).group(1) for line in lines[1:-1]] == list(CHECKS)
    assert "SKIP environment: No NVIDIA driver found (libnvidia-ml.so.1 missing)" in lines
    assert "SKIP sampler cost: torch sees no CUDA device" in lines


@pytest.fixture
def fake_pynvml(monkeypatch):
    """Make `import pynvml` give the fake driver's module, as gpu_check's own sessions do."""
    def install(driver):
        monkeypatch.setitem(sys.modules, "pynvml", driver.nvml)
        return driver
    return install


def mig_driver(**kwargs):
    slices = [FakeGpu("MIG-d184f67c-c95f-5ef2-a935-195bd0094fbd", name="NVIDIA A100-SXM4-80GB MIG 3g.40gb")]
    return FakeDriver([FakeGpu("GPU-3eb79704-1571-707c-aee8-f43ce747313d", compute=[FakeProcess(1, 100)]),
                       FakeGpu("GPU-849d5a8d-610e-eeea-1fd4-81ff44a23794", name="NVIDIA A100-SXM4-80GB",
                               mig_slices=slices)], **kwargs)


def test_the_nvml_checks_pass_on_a_healthy_fake_with_their_evidence(fake_pynvml, capsys):
    fake_pynvml(mig_driver())
    ok, evidence = gpu_check.environment()
    assert ok and "driver 550.54.15" in evidence and "MIG on" in evidence and "MIG off" in evidence
    ok, evidence = gpu_check.functions()
    listed = capsys.readouterr().out
    assert ok and "nvmlDeviceGetComputeRunningProcesses_v3@GPU-3eb79704: dict" in listed
    assert "nvmlDeviceGetUtilizationRates@MIG-d184f67c: NVMLError Not Supported" in listed
    ok, evidence = gpu_check.mig()
    assert ok and evidence.startswith("1 slices enumerated")


def test_the_function_check_shows_bytes_from_an_old_release(fake_pynvml, capsys):
    fake_pynvml(mig_driver(release=OLDEST))
    assert gpu_check.functions()[0]
    assert "nvmlDeviceGetUUID@GPU-3eb79704: bytes (decoded by bsmon)" in capsys.readouterr().out


def test_a_check_that_raises_is_a_failure_with_the_exception(capsys):
    check = gpu_check.Check()
    check.run("broken", lambda: 1 / 0)
    check.run("absent", lambda: (_ for _ in ()).throw(gpu_check.Skip("MIG is off")))
    assert capsys.readouterr().out.splitlines() == [
        "FAIL broken: raised ZeroDivisionError('division by zero')", "SKIP absent: MIG is off"]
    assert check.failed == ["broken"]
