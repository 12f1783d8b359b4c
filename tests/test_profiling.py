"""The throughput profiler on real torch training steps (CPU; one test on CUDA where present)."""

import json
import os
import resource
import time
import weakref
from pathlib import Path

import pytest
import torch

from bsmon.profiling import Profile, plateau_reached, profile
from bsmon.stats.throughput import ThroughputPoint

torch.set_num_threads(1)


class TinyTrainer:
    """A real MLP trained with SGD; records every batch size it is stepped at and each step's duration."""

    def __init__(self, device="cpu", in_features=32):
        torch.manual_seed(0)
        self.device = device
        self.model = torch.nn.Sequential(
            torch.nn.Linear(in_features, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        ).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.in_features = in_features
        self.calls: list[int] = []
        self.durations: list[float] = []

    def step(self, batch_size: int) -> None:
        began = time.perf_counter()
        x = torch.randn(batch_size, self.in_features, device=self.device)
        y = torch.randint(0, 10, (batch_size,), device=self.device)
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.calls.append(batch_size)
        self.durations.append(time.perf_counter() - began)


def test_profiles_a_real_model_at_listed_sizes():
    trainer = TinyTrainer()
    streamed = []
    result = profile(trainer.step, [64, 4, 16], warmup=1, steps=3, device="cpu", on_point=streamed.append)

    assert [p.batch_size for p in result.points] == [4, 16, 64]
    assert streamed == result.points
    assert trainer.calls == [4] * 4 + [16] * 4 + [64] * 4  # warm-up + timed steps, smallest first
    for i, p in enumerate(result.points):
        timed = trainer.durations[4 * i + 1: 4 * i + 4]
        # The profiler's clock spans the timed steps only, and divides by their number.
        assert sum(timed) / 3 <= p.step_time_s <= 2 * sum(timed) / 3 + 2e-3
        assert p.samples_per_s == pytest.approx(p.batch_size / p.step_time_s)
        assert isinstance(p.peak_memory_bytes, int) and p.peak_memory_bytes >= 0
        assert p.source == "profile"
    assert result.stop_reason == "all_sizes"
    assert result.oom_batch is None
    assert result.memory_limit_batch == 64
    assert result.device == "cpu"
    assert result.fit is not None


def test_doubling_stops_at_max_batch_and_measures_it():
    trainer = TinyTrainer()
    result = profile(trainer.step, max_batch=20, start=3, warmup=0, steps=2, device="cpu")
    assert [p.batch_size for p in result.points] == [3, 6, 12, 20]
    assert result.stop_reason == "max_batch"


def test_doubling_stops_once_throughput_stops_growing():
    # Step time constant up to 4, then growing as B^2: throughput doubles twice, then halves with
    # each doubling, so the sweep should stop after 16. On an overloaded machine sleep can wake
    # late enough to hide the first fall; one extra doubling is tolerated, max_batch is never hit.
    def step(batch_size):
        time.sleep(0.0005 * max(batch_size, 4) ** 2)

    result = profile(step, max_batch=64, warmup=1, steps=2, device="cpu")
    assert result.stop_reason == "plateau"
    assert [p.batch_size for p in result.points] in ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32])


@pytest.mark.parametrize("rates, reached", [
    ([100, 200, 209, 215], True),     # +4.5%, +2.9%: two small gains in a row
    ([100, 104, 110, 113], False),    # +4%, +5.8%, +2.7%: not two in a row
    ([100, 104], False),              # only one gain
    ([100, 105, 110.25], False),      # exactly 5% is not below 5%
    ([100, 90, 80], True),            # throughput falling
])
def test_plateau_rule(rates, reached):
    assert plateau_reached(rates) is reached


def out_of_memory_above(limit, trainer, raise_oom, freed):
    """A step that trains normally up to ``limit`` and runs out of memory above it, holding a tensor."""

    def step(batch_size):
        if batch_size > limit:
            held = torch.ones(1 << 20)
            freed.append(weakref.ref(held))
            raise_oom()
        trainer.step(batch_size)

    return step


def cuda_style_oom():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def cpu_allocator_oom():
    torch.empty(1 << 62, dtype=torch.uint8)  # the real DefaultCPUAllocator RuntimeError


@pytest.mark.parametrize("raise_oom", [cuda_style_oom, cpu_allocator_oom])
def test_out_of_memory_ends_the_sweep_and_frees_the_failed_step(raise_oom):
    trainer = TinyTrainer()
    freed = []
    streamed = []
    result = profile(out_of_memory_above(8, trainer, raise_oom, freed), warmup=1, steps=1,
                     device="cpu", on_point=streamed.append)
    assert [p.batch_size for p in result.points] == [1, 2, 4, 8]
    assert [p.batch_size for p in streamed] == [1, 2, 4, 8]
    assert result.oom_batch == 16
    assert result.memory_limit_batch == 8
    assert result.stop_reason == "out_of_memory"
    assert len(freed) == 1 and freed[0]() is None  # nothing keeps the failed step's tensors alive


def test_out_of_memory_skips_larger_listed_sizes():
    trainer = TinyTrainer()
    result = profile(out_of_memory_above(8, trainer, cpu_allocator_oom, []), [2, 128, 4, 64],
                     warmup=0, steps=1, device="cpu")
    assert trainer.calls == [2, 4]
    assert result.oom_batch == 64
    assert result.stop_reason == "out_of_memory"


def test_out_of_memory_at_the_first_size_gives_an_empty_profile():
    result = profile(lambda b: cpu_allocator_oom(), device="cpu")
    assert result.points == [] and result.fit is None and result.memory_limit_batch is None
    assert result.oom_batch == 1


@pytest.mark.parametrize("error", [ValueError("labels out of range"), RuntimeError("shape mismatch")])
def test_other_errors_propagate_unchanged(error):
    trainer = TinyTrainer()

    def step(batch_size):
        if batch_size == 4:
            raise error
        trainer.step(batch_size)

    with pytest.raises(type(error)) as caught:
        profile(step, warmup=0, steps=1, device="cpu")
    assert caught.value is error


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc for the current RSS")
def test_cpu_peak_memory_is_peak_rss_growth():
    # Allocate enough at batch 4 to lift the process's peak RSS 64 MiB above its pre-sweep peak.
    page = os.sysconf("SC_PAGE_SIZE")
    current = int(Path("/proc/self/statm").read_text().split()[1]) * page
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = peak - current + (64 << 20)

    def step(batch_size):
        if batch_size == 4:
            torch.ones(extra // 4, dtype=torch.float32)  # filled, so the pages are resident

    result = profile(step, [2, 4], warmup=0, steps=1, device="cpu")
    # The kernel's RSS counters lag by a few hundred pages: allow 16 MiB.
    assert result.points[0].peak_memory_bytes < (16 << 20)
    assert result.points[1].peak_memory_bytes >= (48 << 20)


def test_profile_round_trips_through_json():
    trainer = TinyTrainer()
    result = profile(trainer.step, [2, 8, 32], warmup=0, steps=2, device="cpu")
    restored = Profile.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
    assert restored.fit == result.fit


def test_a_profile_records_its_unit_and_world_size_and_a_watched_job_converts_it(monkeypatch):
    import bsmon

    monkeypatch.setenv("WORLD_SIZE", "1")
    trainer = TinyTrainer()
    with bsmon.watch(trainer.model, trainer.optimizer, unit="tokens", tokens_per_sample=16) as monitor:
        result = profile(trainer.step, [2, 8], warmup=0, steps=2, device="cpu", unit="tokens", tokens_per_sample=4)
    records = bsmon.store.read_records(bsmon.store.resolve_session(monitor.session_id).records_path)[0]
    streamed = [r for r in records if r["k"] == "profile_point"]
    assert (result.unit, result.tokens_per_sample, result.world_size, result.per_rank) == ("tokens", 4, 1, True)
    assert [(p["batch_size"], p["unit"], p["tokens_per_sample"], p["per_rank"]) for p in streamed] == [
        (2, "tokens", 4, True), (8, "tokens", 4, True)]
    # 8 tokens of 4 a sample are 2 samples, 32 tokens in the job's unit of 16 tokens a sample.
    from bsmon.model import SessionModel

    model = SessionModel()
    model.ingest({"k": "hello", "unit": "tokens", "tokens_per_sample": 16})
    model.ingest_all(streamed)  # while the sweep runs: its streamed points
    assert [p.batch_size for p in model.throughput_points()] == [8, 32]
    model.ingest({"k": "profile", "profile": result.to_dict()})
    assert [p.batch_size for p in model.throughput_points()] == [8, 32]
    with pytest.raises(ValueError, match="a profile in tokens needs tokens_per_sample"):
        profile(trainer.step, [2], unit="tokens")


def test_profile_from_bad_dict():
    with pytest.raises(ValueError, match="Profile.to_dict"):
        Profile.from_dict({"points": []})
    with pytest.raises(ValueError, match="stop_reason"):
        Profile([ThroughputPoint(4, 1.0, 4.0)], None, "cpu", "bored")


@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup=-1), "warmup"),
    (dict(steps=0), "steps"),
    (dict(start=0), "start"),
    (dict(max_batch=0), "max_batch"),
    (dict(batch_sizes=[4, 0]), "batch size"),
    (dict(batch_sizes=[64, 128], max_batch=32), "within max_batch"),
    (dict(device="meta"), "cpu and cuda"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        profile(lambda b: None, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profiles_on_cuda_with_peak_memory():
    trainer = TinyTrainer(device="cuda", in_features=4096)
    result = profile(trainer.step, [256, 4096], warmup=2, steps=5, device="cuda")
    small, large = result.points
    assert result.device == "cuda"
    assert 0 < small.peak_memory_bytes < large.peak_memory_bytes
    # The 4096 x 4096 input alone takes 64 MiB of float32.
    assert large.peak_memory_bytes >= 4096 * 4096 * 4
