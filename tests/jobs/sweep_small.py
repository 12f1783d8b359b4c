"""A job following the `bsmon sweep` convention: a top-level step_fn, training under __main__."""

import sys

import torch
from torch import nn

import bsmon

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)


def batch(size):
    x = torch.randn(size, 32)
    return x, x[:, :4].argmax(dim=1)


def step_fn(batch_size):
    x, y = batch(batch_size)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


if __name__ == "__main__":
    with bsmon.watch(model, optimizer) as monitor:
        for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 40):
            for _ in range(2):
                x, y = batch(16)
                (nn.functional.cross_entropy(model(x), y) / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
