"""What bsmon costs a training step: the probe alone, the default watch(), and a live monitor.

One CPU training loop runs four ways, interleaved round by round in this process (method and
statistics: benchmarks/_timing.py):

  no bsmon            the plain loop;
  watch(noise=None)   bsmon.watch with the noise estimator off: the cost of the probe alone
                      (hooks, step records, the background flush and session file);
  watch()             the defaults a user gets (noise="auto"). On this loop, one backward
                      pass per step, "auto" installs the per-example estimator;
  watch() + monitor   the same with `bsmon attach --json SESSION` (headless, one JSON status
                      line a second) running as a second process, reading the live stream
                      for the whole turn.

Every watched turn calls watch() afresh and close()s it after its steps (one active watch
per process, one session per watch, in a temporary BSMON_HOME); the monitor process is
started on the new session and timing begins only once it has printed its first status
line, so it is attached and streaming. When the job closes, the monitor's last line must
count every step of the turn, or the benchmark fails: the monitor read the stream throughout.

Why in one process rather than one worker per variant: separate processes differ in memory
layout and allocator state by a percent or two, which is the size of the effect measured
here. One model and one batch stream shared by every variant cannot favour any of them.

The loop: an MLP 256-512-512-512-10 (ReLU), batch 128, SGD with momentum, cross-entropy, on
one torch thread (the monitor has the other core). A step takes several milliseconds, like
a small real job; a toy step of tens of microseconds would measure Python call overhead that
no real job pays per sample.

Also reported: the import cost of bsmon in the job (python -X importtime) and the time
watch() and close() take.

Run: .venv/bin/python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

import bsmon
from _timing import (Budget, Variant, benchmark_process, compare, estimator_summary, median_ms,
                     parse_budget, print_environment, print_table, run_rounds, watching)

INPUTS, HIDDEN, CLASSES, BATCH = 256, 512, 10, 128
TARGET = 1.02
QUICK = Budget(rounds=4, chunks=2, chunk_s=0.3, warmup_s=0.1)
FULL = Budget(rounds=30, chunks=3, chunk_s=0.3, warmup_s=0.1)
IMPORT_REPEATS = 3


def make_mlp_loop(micro_batches: int = 1, seed: int = 0, adamw: bool = False
                  ) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """The MLP, its optimizer (SGD with momentum, or AdamW) and one optimizer step of BATCH
    samples from a fixed pool.

    With ``micro_batches`` > 1 the step accumulates gradients over that many equal parts.
    """
    if BATCH % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} must divide the batch of {BATCH}")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-3) if adamw
                 else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    loss_fn = nn.CrossEntropyLoss()
    size = BATCH // micro_batches
    batches = itertools.cycle([(torch.randn(size, INPUTS), torch.randint(0, CLASSES, (size,)))
                               for _ in range(16 * micro_batches)])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            x, y = next(batches)
            (loss_fn(model(x), y) / micro_batches).backward()
        optimizer.step()

    return model, optimizer, step


@contextlib.contextmanager
def watched_with_monitor(model: nn.Module, optimizer: torch.optim.Optimizer,
                         steps_seen: list[tuple[int, int]]) -> Iterator[None]:
    """watch() with `bsmon attach --json` attached; appends (monitor's steps, job's steps)."""
    monitor = bsmon.watch(model, optimizer)
    viewer = subprocess.Popen([sys.executable, "-m", "bsmon.cli", "attach", "--json", monitor.session_id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if not viewer.stdout.readline():  # its first status line: attached and streaming
            raise RuntimeError(f"the monitor process failed to attach: {viewer.stderr.read().strip()}")
        yield
    finally:
        monitor.close()
        out, err = viewer.communicate(timeout=30)
    last = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    if viewer.returncode != 0 or last.get("state") != "ended":
        raise RuntimeError(f"the monitor did not follow the job to its end (exit {viewer.returncode}): "
                           f"{last} {err.strip()}")
    steps_seen.append((last["step"], monitor.stats().step))


def importtime_ms(code: str, module_prefix: str) -> tuple[float, dict[str, float]]:
    """Median over runs of the import time of top-level imports named ``module_prefix*``.

    Returns that total in ms and, per module imported beneath them, its median cumulative ms.
    """
    totals, children = [], {}
    for _ in range(IMPORT_REPEATS):
        result = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                                capture_output=True, text=True, check=True)
        total = 0.0
        pending: list[tuple[str, float]] = []  # importtime lists a module's imports before it
        for line in result.stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            _, cumulative, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip()) - 1) // 2
            ms = int(cumulative) / 1e3
            if depth == 1:
                pending.append((name.strip(), ms))
            elif depth == 0:
                if name.strip().startswith(module_prefix):
                    total += ms
                    for module, child_ms in pending:
                        children.setdefault(module, []).append(child_ms)
                pending = []
        totals.append(total)
    return float(np.median(totals)), {m: float(np.median(v)) for m, v in children.items()}


def report_import_cost() -> None:
    modules = subprocess.run(
        [sys.executable, "-c", "import bsmon, sys; "
         "print(', '.join(m for m in ('torch', 'numpy', 'textual') if m in sys.modules) or 'none')"],
        capture_output=True, text=True, check=True).stdout.strip()
    package_ms, _ = importtime_ms("import bsmon", "bsmon")
    probe_ms, children = importtime_ms("import torch, bsmon; bsmon.watch", "bsmon")
    heaviest = sorted(children.items(), key=lambda item: -item[1])[:3]
    print(f"import bsmon: {package_ms:.1f} ms (python -X importtime, median of {IMPORT_REPEATS}); "
          f"heavy modules it loads: {modules}")
    print(f"import bsmon and first use of bsmon.watch (loads bsmon.probe), torch already imported: "
          f"{probe_ms:.1f} ms; largest parts: "
          + ", ".join(f"{m} {ms:.1f} ms" for m, ms in heaviest))


def main() -> None:
    budget = parse_budget(__doc__, quick=QUICK, full=FULL)
    with benchmark_process():
        print_environment()
        report_import_cost()
        model, optimizer, step = make_mlp_loop()
        watch_s: list[float] = []
        close_s: list[float] = []
        steps_seen: list[tuple[int, int]] = []
        variants = [
            Variant("no bsmon"),
            Variant("watch(noise=None)", lambda: watching(model, optimizer, noise=None,
                                                          watch_seconds=watch_s, close_seconds=close_s)),
            Variant("watch()", lambda: watching(model, optimizer, watch_seconds=watch_s, close_seconds=close_s)),
            Variant("watch() + monitor", lambda: watched_with_monitor(model, optimizer, steps_seen)),
        ]
        print(f"loop: MLP {INPUTS}-{HIDDEN}x3-{CLASSES}, batch {BATCH}; {budget.describe()}")
        print(f"watch() on this loop: {estimator_summary(model, optimizer, step)}")
        rounds = run_rounds(step, variants, budget, label="overhead")
        missed = [(seen, job) for seen, job in steps_seen if seen != job]
        if missed:
            raise RuntimeError(f"the attached monitor missed steps (seen, sent): {missed}")
        print(f"the attached monitor received every step in all {len(steps_seen)} rounds")
        print(f"bsmon.watch(): {median_ms(watch_s)}, Monitor.close(): {median_ms(close_s)} "
              f"(medians of {len(watch_s)} calls)")
        rows = [compare(rounds, "no bsmon", v.name, TARGET) for v in variants[1:]]
        print_table("Step time against the same loop without bsmon", rows)


if __name__ == "__main__":
    main()
