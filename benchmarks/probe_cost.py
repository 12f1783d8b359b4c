"""The probe's own work per training step, in microseconds, hook by hook: a load-robust check.

overhead.py answers the question users ask (how much slower is my step?) but on a shared
machine its intervals are a few percent wide, wider than the whole probe. This script
measures only bsmon's Python work, so other processes' load barely moves it:

* ``watch()`` (or ``watch(noise=None)``) runs on the benchmark's MLP loop past the noise
  estimator's warm-up, with a budget so small that the steps timed here are not measured
  (what almost every step of a CPU job is);
* then the hooks bsmon registered (on the model, the sentinel parameter and the optimizer)
  are called in a loop the way torch calls them in a step, without the training work, and
  timed on the process's CPU clock (every thread: the publisher's too). A flush is forced
  every 50 steps, as a 5 ms step gets one every 0.25 s;
* each figure is the minimum over repeats, the run least disturbed by other processes. A
  hook alone is timed on the wall clock around each call (less the cost of the two clock
  reads); all hooks together on the CPU clock of the whole run.

Rows: each hook alone (the state between calls is a real step's), all hooks with the step
records dropped at ``Publisher.submit`` (the hooks alone), and all hooks with the records
encoded and ingested by the job's own model behind ``Monitor.stats()`` (everything the
training thread does for bsmon). torch's own cost of calling a hook (a few microseconds, a
module's hook loop or the autograd engine taking the GIL) is not included.

Run: .venv/bin/python benchmarks/probe_cost.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import bsmon
from _timing import benchmark_process, print_environment
from overhead import BATCH, INPUTS, make_mlp_loop

STEPS = 20000
REPEATS = 5
FLUSH_EVERY = 50
START_STEPS = 150


def registered_hooks(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor
                     ) -> dict[str, list[Callable[[], None]]]:
    """Every hook on the model, its parameters and the optimizer, as torch would call it in a step."""
    out = model(x)
    params = [p for p in model.parameters() if getattr(p, "_post_accumulate_grad_hooks", None)]
    return {
        "forward pre-hook": [lambda h=h: h(model, (x,), {}) for h in model._forward_pre_hooks.values()],
        "forward hook": [lambda h=h: h(model, (x,), out) for h in model._forward_hooks.values()],
        "sentinel gradient hook": [lambda h=h, p=p: h(p) for p in params
                                   for h in p._post_accumulate_grad_hooks.values()],
        "optimizer step pre-hook": [lambda h=h: h(optimizer, (), {})
                                    for h in optimizer._optimizer_step_pre_hooks.values()],
        "optimizer step post-hook": [lambda h=h: h(optimizer, (), {})
                                     for h in optimizer._optimizer_step_post_hooks.values()],
    }


def _timer_cost() -> float:
    """Seconds that two perf_counter() calls around a call of nothing add (subtracted per hook)."""
    def nothing() -> None:
        pass
    best = float("inf")
    for _ in range(REPEATS):
        spent = 0.0
        for _ in range(STEPS):
            t = time.perf_counter()
            nothing()
            spent += time.perf_counter() - t
        best = min(best, spent / STEPS)
    return best


TIMER_S = 0.0  # set in main()


def per_step_us(calls: list[Callable[[], None]], timed: list[Callable[[], None]],
                monitor: bsmon.Monitor) -> float:
    """Minimum over repeats of the CPU microseconds per step spent in ``timed`` (all of ``calls`` run)."""
    best = float("inf")
    timed_ids = {id(c) for c in timed}
    everything = len(timed_ids) == len(calls)
    for _ in range(REPEATS):
        spent = 0.0
        start = time.process_time()
        for n in range(1, STEPS + 1):
            for call in calls:
                if everything or id(call) not in timed_ids:
                    call()
                else:
                    t = time.perf_counter()
                    call()
                    spent += time.perf_counter() - t - TIMER_S
            if n % FLUSH_EVERY == 0:
                monitor._publisher.poll(now=True)
        total = time.process_time() - start if everything else spent
        best = min(best, total / STEPS)
    return best * 1e6


def measure(noise: str | None) -> list[tuple[str, float]]:
    model, optimizer, step = make_mlp_loop()
    x = torch.randn(BATCH, INPUTS)  # the loop's size: its FLOPs were counted in the first step
    rows = []
    for records in (False, True):
        monitor = bsmon.watch(model, optimizer, noise=noise, noise_budget=1e-9)
        try:
            for _ in range(START_STEPS):
                step()
            hooks = registered_hooks(model, optimizer, x)
            calls = [c for group in hooks.values() for c in group]
            if not records:
                for name, group in hooks.items():
                    if group:
                        rows.append((f"  {name}", per_step_us(calls, group, monitor)))
                monitor._publisher.submit = lambda record: None
                rows.append(("all hooks, records dropped", per_step_us(calls, calls, monitor)))
            else:
                rows.append(("all hooks, records encoded and ingested", per_step_us(calls, calls, monitor)))
        finally:
            monitor.close()
    return rows


def main() -> None:
    global TIMER_S
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with benchmark_process():
        print_environment()
        TIMER_S = _timer_cost()
        print(f"bsmon's hooks called without training, {STEPS} steps, a flush every {FLUSH_EVERY}; "
              f"CPU microseconds per step, minimum of {REPEATS} runs")
        for noise in (None, "auto"):
            print(f"\nwatch(noise={noise!r}), steps not measured by the noise estimator:")
            for name, us in measure(noise):
                print(f"{name:42s} {us:6.2f} us")


if __name__ == "__main__":
    main()
