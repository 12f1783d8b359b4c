"""profile_training: a sweep on the job's own model that leaves training bitwise unchanged."""

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import bsmon
from bsmon.profiling import profile_training
from bsmon import store

torch.set_num_threads(1)
DATA = 512


class Job:
    """A real model with every kind of state a step changes: dropout (RNG), BatchNorm (buffers),
    AdamW (moments and step counts), a GradScaler, and a NumPy/Python-random data pipeline."""

    def __init__(self, scaler=False):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        self.model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
        self.x = torch.randn(DATA, 8)
        self.y = self.x @ torch.randn(8, 1)
        self.losses = []

    def make_batch(self, size):
        idx = torch.randint(0, DATA, (size,))
        return self.x[idx], self.y[idx]

    def step(self, batch):
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad()
        return loss

    def train(self, steps):
        for _ in range(steps):
            noise = np.random.rand() * 1e-3 + random.random() * 1e-3  # the pipeline's own RNGs
            x, y = self.make_batch(16)
            self.losses.append(self.step((x + noise, y)).item())

    def fingerprint(self):
        tensors = [*self.model.state_dict().values()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return self.losses, [t.clone() for t in tensors]


def run(before, after, sweep=None, scaler=False):
    """A whole run (its jobs share the global RNGs, so runs go one after the other): train
    ``before`` steps, call ``sweep(job)`` if given, train ``after`` steps."""
    job = Job(scaler)
    job.train(before)
    if sweep is not None:
        sweep(job)
    job.train(after)
    return job


def assert_bitwise_equal(a, b):
    losses_a, tensors_a = a.fingerprint()
    losses_b, tensors_b = b.fingerprint()
    assert len(losses_a) == len(losses_b) and losses_a == losses_b
    assert len(tensors_a) == len(tensors_b)
    for x, y in zip(tensors_a, tensors_b):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("scaler", [False, True])
@pytest.mark.parametrize("before", [0, 5])
def test_training_after_the_sweep_is_bitwise_identical(before, scaler):
    results = []

    def sweep(job):
        results.append(profile_training(job.model, job.optimizer, job.make_batch, job.step, scaler=job.scaler,
                                        batch_sizes=[4, 16, 64], steps=2))

    swept = run(before, 10, sweep, scaler)
    plain = run(before, 10, scaler=scaler)
    assert [p.batch_size for p in results[0].points] == [4, 16, 64] and results[0].stop_reason == "all_sizes"
    assert_bitwise_equal(swept, plain)
    if scaler:
        assert swept.scaler.get_scale() == plain.scaler.get_scale()


def test_eval_mode_and_gradients_in_place_are_restored():
    job = Job()
    job.model.eval()
    nn.functional.mse_loss(job.model(job.x[:8]), job.y[:8]).backward()  # gradients pending mid-step
    grads = [p.grad.clone() for p in job.model.parameters()]
    profile_training(job.model, job.optimizer, job.make_batch, job.step, batch_sizes=[8], steps=1)
    assert not any(m.training for m in job.model.modules())
    assert all(torch.equal(p.grad, g) for p, g in zip(job.model.parameters(), grads))


class InjectedOOM:
    """A step that runs out of memory at ``limit`` samples or more, after its backward pass (half-done)."""

    def __init__(self, job, limit):
        self.job, self.limit, self.sizes = job, limit, []

    def __call__(self, batch):
        x, y = batch
        self.sizes.append(len(x))
        if len(x) >= self.limit:
            nn.functional.mse_loss(self.job.model(x), y).backward()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.job.step(batch)


def test_out_of_memory_stops_the_sweep_and_restores_the_half_done_step():
    seen = []

    def sweep(job):
        step = InjectedOOM(job, limit=32)
        seen.append((profile_training(job.model, job.optimizer, job.make_batch, step, steps=2, start=2), step.sizes))

    swept = run(3, 5, sweep)
    plain = run(3, 5)
    result, sizes = seen[0]
    assert result.stop_reason == "out_of_memory" and result.oom_batch == 32
    assert [p.batch_size for p in result.points] == [2, 4, 8, 16] and result.memory_limit_batch == 16
    assert max(sizes) == 32  # nothing larger was tried
    assert_bitwise_equal(swept, plain)


def test_another_error_propagates_and_still_restores():
    def sweep(job):
        def broken(batch):
            job.step(batch)
            raise KeyError("label")

        with pytest.raises(KeyError):
            profile_training(job.model, job.optimizer, job.make_batch, broken, batch_sizes=[8])

    assert_bitwise_equal(run(2, 4, sweep), run(2, 4))


def test_a_watched_job_records_the_profile_but_not_the_sweep_steps():
    job = Job()
    with bsmon.watch(job.model, job.optimizer, name="swept", noise="microbatch") as monitor:
        job.train(3)
        profile_training(job.model, job.optimizer, job.make_batch, job.step, batch_sizes=[4, 8, 16], steps=2)
        job.train(2)
        stats = monitor.stats()
        session = monitor.session_id
    assert stats.step == 5
    records = store.read_records(store.resolve_session(session).records_path)[0]
    assert [r["step"] for r in records if r["k"] == "step"] == [1, 2, 3, 4, 5]
    profile = next(r["profile"] for r in records if r["k"] == "profile")
    assert [p["batch_size"] for p in profile["points"]] == [4, 8, 16]
    assert any("throughput profile of micro-batch sizes 4, 8, 16 took" in r["msg"]
               for r in records if r["k"] == "event")
    steps = [r for r in records if r["k"] == "step"]
    assert steps[3]["dt"] < 1.0  # the first step after the sweep is timed from its end


CPU_OOM_JOB = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    from bsmon.profiling import profile_training
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(1 << 16, 1)  # a sample is 256 KiB of float32
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = [t.clone() for t in model.state_dict().values()]

    def make_batch(size):
        return torch.randn(size, 1 << 16)

    def step(x):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
    sizes = [2**k for k in range(13)]  # listed, so no throughput plateau ends the sweep first
    result = profile_training(model, optimizer, make_batch, step, batch_sizes=sizes, steps=1)
    same = all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    step(make_batch(8))  # training goes on
    print(json.dumps({"stop": result.stop_reason, "oom": result.oom_batch,
                      "sizes": [p.batch_size for p in result.points], "restored": same}))
""")


def test_a_cpu_allocation_cap_stops_the_sweep_cleanly():
    """A real out-of-memory: the address space is capped at 256 MiB above what the process has."""
    done = subprocess.run([sys.executable, "-c", CPU_OOM_JOB], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stop"] == "out_of_memory" and result["restored"]
    assert 64 <= result["oom"] <= 1024  # 256 KiB a sample: 1024 samples fill 256 MiB
    assert result["sizes"] == [2**k for k in range(len(result["sizes"]))] and result["sizes"][-1] < result["oom"]
