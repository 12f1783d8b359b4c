"""A small, honest training run for ``bsmon demo``: CPU only, no downloads.

A fixed random "teacher" network labels Gaussian inputs (with 10% label
noise); a student MLP learns them with SGD + momentum and gradient
accumulation (4 micro-batches of 32), so bsmon has the micro-batch noise
statistics from the first step. As the loss falls the gradient noise scale
grows, as McCandlish et al. describe.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import bsmon

INPUTS, CLASSES, HIDDEN = 128, 10, 384


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x, y = teacher_data(50_000, generator)
    model = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    loss_fn = nn.CrossEntropyLoss()
    with bsmon.watch(model, optimizer, name="demo") as monitor:
        for _ in range(args.steps):
            for _ in range(args.accumulate):
                idx = torch.randint(0, len(x), (args.micro_batch,), generator=generator)
                loss = loss_fn(model(x[idx]), y[idx]) / args.accumulate
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            monitor.log(loss=loss.detach() * args.accumulate, lr=schedule.get_last_lr()[0])


if __name__ == "__main__":
    main()
