"""FLOP/s and MFU: the probe counts a real step's FLOPs once per size; the model divides by the peak."""

import pytest
import torch
from torch import nn

from bsmon import store, wire
from bsmon.model import SessionModel
from bsmon.probe.flops import REASON_COMPILED, FlopCounter
from bsmon.probe.monitor import watch
from bsmon.stats.flops import REASON_CPU, peak_flops
import test_model

IN, HIDDEN, OUT = 32, 64, 4
#: One step of Linear-ReLU-Linear per sample: forward 2*(IN*HIDDEN + HIDDEN*OUT), the same again for
#: the weight gradients, and 2*HIDDEN*OUT for the input gradient of the second layer (the first
#: layer's input needs none).
EXACT_PER_SAMPLE = 4 * (IN * HIDDEN + HIDDEN * OUT) + 2 * HIDDEN * OUT


def train(steps, sizes, **watch_args):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, optimizer, name="flops", **watch_args) as monitor:
        for step in range(steps):
            for _ in range(2):
                model(torch.randn(sizes[step * len(sizes) // steps], IN)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    records, _ = store.read_records(store.resolve_session(monitor.session_id).records_path)
    return monitor, records


def test_a_step_is_counted_once_per_batch_size_exactly():
    monitor, records = train(80, sizes=(8, 16))
    counted = [r for r in records if r["k"] == "step" and "flops" in r]
    assert [r["n"] for r in counted] == [16, 32]  # two micro-batches per step
    for r in counted:
        assert r["flops"] == {"total": EXACT_PER_SAMPLE * r["n"], "dtype": "float32", "tf32": False, "reason": None}
    stats = monitor.stats()
    assert stats.flops_per_sample == EXACT_PER_SAMPLE
    assert stats.flops_per_s == pytest.approx(EXACT_PER_SAMPLE * stats.samples_per_s)
    assert stats.mfu is None and stats.mfu_reason == REASON_CPU  # a CPU job: no peak, no MFU


def test_a_given_count_replaces_counting():
    monitor, records = train(10, sizes=(8,), flops_per_sample=1e6)
    assert records[0]["flops_per_sample"] == 1e6 and records[0]["flops_dtype"] == "float32"
    assert not any("flops" in r for r in records if r["k"] == "step")
    assert monitor.stats().flops_per_s == pytest.approx(1e6 * monitor.stats().samples_per_s)
    with pytest.raises(ValueError, match="flops_per_sample=-1"):
        watch(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), flops_per_sample=-1)


def test_a_compiled_model_is_not_counted_and_says_why():
    model = nn.Linear(4, 1)
    compiled = torch.compile(model)
    counter = FlopCounter(compiled, None)
    assert counter.off and counter.hello_fields == {"flops_reason": REASON_COMPILED}


def test_the_counted_steps_time_is_left_out_of_the_throughput():
    model = SessionModel()
    model.ingest(test_model._hello(devices=[{"index": 0, "uuid": None, "name": "NVIDIA H100 80GB HBM3",
                                             "total_memory": 0}]))
    model.ingest(wire.validate({"k": "step", "step": 1, "t": 1.0, "dt": 1.0, "n": 32, "mb": 1, "dropped": 0,
                                "flops": {"total": 32e9, "dtype": "bfloat16", "tf32": False, "reason": None}}))
    for step in range(2, 12):
        model.ingest({"k": "step", "step": step, "t": 1.0 + 0.01 * step, "dt": 0.01, "n": 32, "mb": 1, "dropped": 0})
    stats = model.stats()
    assert stats.samples_per_s == pytest.approx(3200)  # without the counted (slow) step
    assert stats.flops_per_s == pytest.approx(3200 * 1e9)
    assert stats.mfu == pytest.approx(3.2e12 / 989.5e12)
    assert stats.peak_name == "1 x H100/H200 SXM bf16 peak"


def test_a_malformed_count_is_refused_at_the_wire():
    step = {"k": "step", "step": 1, "t": 1.0, "dt": 1.0, "n": 32, "mb": 1, "dropped": 0}
    for bad in ("lots", {"total": "lots"}, {"total": -1.0}, {"total": None, "reason": 3}):
        with pytest.raises(wire.ProtocolError, match="step.flops"):
            wire.validate({**step, "flops": bad})


@pytest.mark.parametrize("device, dtype, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", False, 989.5e12),
    ("NVIDIA H100 PCIe", "float16", False, 756e12),
    ("NVIDIA A100-SXM4-80GB", "float32", True, 156e12),
    ("NVIDIA A100-SXM4-80GB", "float32", False, 19.5e12),
    ("Tesla V100-SXM2-16GB", "float32", True, 15.7e12),  # no TF32 before Ampere
    ("NVIDIA L40S", "bfloat16", False, 362e12),
    ("NVIDIA L4", "bfloat16", False, 121e12),
])
def test_peak_table(device, dtype, tf32, peak):
    assert peak_flops(device, dtype, tf32)[0] == peak


def test_no_peak_says_why():
    assert peak_flops(None, "float32") == (None, REASON_CPU)
    assert peak_flops("Tesla T4", "bfloat16")[1] == "the T4 has no bfloat16 tensor-core peak in bsmon's table"
    assert "NVIDIA A10G" in peak_flops("NVIDIA A10G", "float16")[1]
    assert peak_flops("NVIDIA H100 80GB HBM3", "int8")[1] == "no peak for dtype int8"
