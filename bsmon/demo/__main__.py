"""A small, honest training run for ``bsmon demo``: CPU only, no downloads.

A fixed random "teacher" network labels Gaussian inputs (with 10% label
noise); a student MLP learns them with SGD + momentum and gradient
accumulation (2 micro-batches per step), so bsmon has the micro-batch noise
statistics from the first step.

The run first spends a few seconds at several micro-batch sizes: each becomes
a live throughput point, which is all bsmon needs to recommend a batch size.
It then follows ``monitor.recommended_batch_size()``, visiting half and double
the current size now and then to keep the points fresh. As the loss falls the
gradient noise scale grows (McCandlish et al.), and the recommended batch
grows with it.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import bsmon
from bsmon.model import LIVE_MIN_STEPS, LIVE_WARMUP_STEPS

INPUTS, CLASSES, HIDDEN = 128, 10, 256
SWEEP_SIZES = (8, 16, 32, 64, 128)
ACCUMULATE = 2
MAX_MICRO_BATCH = 1024
#: Steps at the recommended size between two visits to its neighbours (half and double).
EXPLORE_EVERY = 400


def teacher_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = nn.Sequential(nn.Linear(INPUTS, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 1.5 / math.sqrt(p.shape[-1]))
        x = torch.randn(n, INPUTS, generator=generator)
        y = teacher(x).argmax(dim=1)
    flip = torch.rand(n, generator=generator) < 0.1
    y[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=generator)
    return x, y


def micro_batch_schedule(steps: int, monitor: bsmon.Monitor):
    """Micro-batch size per step: sweep the sizes, then follow the advice.

    Every size runs long enough to become a live throughput point. While following the
    advice the run regularly revisits half and double the current size, so one noisy
    timing (a busy machine) cannot lock the advice in: the points stay fresh.
    """
    per_size = LIVE_WARMUP_STEPS + 3 * LIVE_MIN_STEPS
    planned = [size for size in SWEEP_SIZES for _ in range(per_size)]
    micro = SWEEP_SIZES[len(SWEEP_SIZES) // 2]
    for step in range(steps):
        if step < len(planned):
            yield planned[step]
            continue
        phase = (step - len(planned)) % (EXPLORE_EVERY + 2 * per_size)
        if phase == 0:
            recommended = monitor.recommended_batch_size()
            if recommended is not None:
                micro = max(1, min(MAX_MICRO_BATCH, recommended // ACCUMULATE))
        if phase < EXPLORE_EVERY:
            yield micro
        elif phase < EXPLORE_EVERY + per_size:
            yield min(MAX_MICRO_BATCH, 2 * micro)
        else:
            yield max(1, micro // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x, y = teacher_data(100_000, generator)
    model = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with bsmon.watch(model, optimizer, name="demo") as monitor:
        try:
            for micro in micro_batch_schedule(args.steps, monitor):
                for _ in range(ACCUMULATE):
                    idx = torch.randint(0, len(x), (micro,), generator=generator)
                    loss = loss_fn(model(x[idx]), y[idx]) / ACCUMULATE
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                monitor.log(loss=loss.detach() * ACCUMULATE, lr=args.lr)
        except KeyboardInterrupt:  # q (or ctrl+c) in `bsmon demo`: a demo that stops early ends normally
            print(f"demo stopped at step {monitor.stats().step}", flush=True)


if __name__ == "__main__":
    main()
