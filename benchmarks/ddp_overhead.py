"""What bsmon costs a 2-process DistributedDataParallel job on the CPU (gloo).

The job: an MLP 256-512-512-512-10 (ReLU), 128 samples per rank and step (as in overhead.py),
SGD with momentum, wrapped in DistributedDataParallel, one torch thread per rank (the machine's
two cores). Four variants run interleaved round by round in both ranks (method and statistics:
_timing.py):

  no bsmon              plain DDP;
  watch(noise=None)     the probe and rank aggregation: every rank's background thread sets
                        one store key a second, rank 0 reads them all and records the session;
  watch(noise="ddp")    the same plus the data-parallel noise estimator: bsmon's
                        communication hook takes each bucket's squared norm before and after
                        the all-reduce;
  + scalar all-reduce   for comparison, not something bsmon does: one extra asynchronous
                        all-reduce of one number per step, which averaging every rank's local
                        norm would need (docs/distributed.md).

Ranks must stay in lockstep (each step is an all-reduce), so a chunk is a fixed number of steps
that lasts about ``chunk_s`` on the plain job, calibrated once and broadcast from rank 0,
rather than _timing.timed_chunk's "as many steps as fit". The table is rank 0's: in lockstep
the wall time per step is the job's; the CPU time is rank 0's process, which also records.

A third clock follows the training thread alone (its CPU time): what bsmon adds to the hot
path, which neither other processes' load nor the background threads move. Two ranks on two
cores leave no core idle, so wall time here is the noisiest of the three.

DDP cannot unregister a communication hook: after the first watch(noise="ddp") turn (in the
discarded warm-up round) the plain variants run through bsmon's inactive hook, one Python call
per bucket per step.

Run: .venv/bin/python benchmarks/ddp_overhead.py [--quick]   (starts torchrun itself)
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from _timing import (STARTUP_STEPS, Budget, Rounds, Variant, benchmark_process, compare, estimator_summary,
                     paired_ratio, parse_budget, print_environment, print_table, watching)

QUICK = Budget(rounds=3, chunks=2, chunk_s=0.3, warmup_s=0.1)
FULL = Budget(rounds=24, chunks=4, chunk_s=0.3, warmup_s=0.15)
INPUTS, HIDDEN, CLASSES, LOCAL_BATCH = 256, 512, 10, 128
TARGET = 1.02


def make_ddp_loop(extra_allreduce: list[bool]) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """The DDP model, its optimizer, and one step; ``extra_allreduce[0]`` adds the scalar all-reduce."""
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
    model = nn.parallel.DistributedDataParallel(nn.Sequential(
        nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(dist.get_rank())
    batches = itertools.cycle([(torch.randn(LOCAL_BATCH, INPUTS, generator=gen),
                                torch.randint(0, CLASSES, (LOCAL_BATCH,), generator=gen)) for _ in range(16)])
    scalar = torch.zeros(1)

    def step() -> None:
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if extra_allreduce[0]:
            dist.all_reduce(scalar, async_op=True).wait()
        optimizer.step()

    return model, optimizer, step


def timed_steps(step: Callable[[], None], steps: int) -> tuple[float, float, float]:
    """Mean wall, process-CPU and training-thread-CPU seconds per step over exactly ``steps`` steps."""
    thread_start = time.thread_time()
    cpu_start = time.process_time()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return ((time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps,
            (time.thread_time() - thread_start) / steps)


def steps_lasting(step: Callable[[], None], seconds: float) -> int:
    """Rank 0's count of plain steps that take ``seconds``, the same on every rank."""
    per_step = timed_steps(step, 20)[0]
    count = [max(5, round(seconds / per_step))]
    dist.broadcast_object_list(count, src=0)
    return count[0]


def run_lockstep_rounds(step: Callable[[], None], variants: Sequence[Variant],
                        budget: Budget) -> tuple[Rounds, dict[str, list[float]]]:
    """_timing.run_rounds with chunks of a fixed, agreed number of steps; also training-thread CPU."""
    chunk_steps = steps_lasting(step, budget.chunk_s)
    warmup_steps = steps_lasting(step, budget.warmup_s)
    rounds = Rounds(wall={v.name: [] for v in variants}, cpu={v.name: [] for v in variants})
    thread: dict[str, list[float]] = {v.name: [] for v in variants}
    total = budget.warmup_rounds + budget.rounds
    for index in range(total):
        shift = index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            with variant.context():
                timed_steps(step, STARTUP_STEPS + warmup_steps)  # past the estimator's start-up, as run_rounds
                gc.collect()
                chunks = np.array([timed_steps(step, chunk_steps) for _ in range(budget.chunks)])
            if index >= budget.warmup_rounds:
                wall, cpu, thread_cpu = np.median(chunks, axis=0)
                rounds.wall[variant.name].append(float(wall))
                rounds.cpu[variant.name].append(float(cpu))
                thread[variant.name].append(float(thread_cpu))
        if dist.get_rank() == 0:
            print(f"\r  round {index + 1}/{total}", end="", file=sys.stderr, flush=True)
    if dist.get_rank() == 0:
        print(file=sys.stderr)
    return rounds, thread


@contextlib.contextmanager
def flag(setting: list[bool]) -> Iterator[None]:
    setting[0] = True
    try:
        yield
    finally:
        setting[0] = False


def main() -> None:
    budget = parse_budget(__doc__, quick=QUICK, full=FULL)
    dist.init_process_group("gloo")
    leader = dist.get_rank() == 0
    with benchmark_process():
        if leader:
            print_environment()
            print(f"{dist.get_world_size()} ranks (gloo); {budget.describe()}")
        extra_allreduce = [False]
        model, optimizer, step = make_ddp_loop(extra_allreduce)
        summary = estimator_summary(model, optimizer, step, noise="ddp")
        if leader:
            print(f"  watch(noise='ddp'): {summary}")
        variants = [
            Variant("no bsmon"),
            Variant("noise=None", lambda: watching(model, optimizer, noise=None)),
            Variant("noise=ddp", lambda: watching(model, optimizer, noise="ddp")),
            Variant("scalar all-reduce", lambda: flag(extra_allreduce)),
        ]
        rounds, thread = run_lockstep_rounds(step, variants, budget)
        if leader:
            cases = {"noise=None": "probe + rank aggregation", "noise=ddp": "+ DDP noise estimator",
                     "scalar all-reduce": "(not bsmon) + 1 scalar all-reduce/step"}
            print_table("Step time of a 2-rank DDP job against the same job without bsmon",
                        [compare(rounds, "no bsmon", name, TARGET, case=case) for name, case in cases.items()])
            base = float(np.median(thread["no bsmon"])) * 1e3
            print(f"\nTraining-thread CPU per step (the hot path alone); no bsmon: {base:.2f} ms")
            for name, case in cases.items():
                ratio = paired_ratio(thread["no bsmon"], thread[name])
                print(f"  {case}: {float(np.median(thread[name])) * 1e3:.2f} ms, ratio {ratio}")
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node", "2", __file__, *sys.argv[1:]]))
