"""A small real training job for end-to-end tests (CPU, a second or two)."""

import argparse
import sys
import time

import torch
from torch import nn

import bsmon

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--accumulate", type=int, default=2)
parser.add_argument("--micro-batch", type=int, default=16)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step (keeps the job alive)")
parser.add_argument("--exit-code", type=int, default=0)
parser.add_argument("--no-watch", action="store_true")
parser.add_argument("--ready-file", help="touched after the first step")
parser.add_argument("--name", help="passed to bsmon.watch(name=)")
args = parser.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
monitor = None if args.no_watch else bsmon.watch(model, optimizer, name=args.name)
x = torch.randn(512, 8)
y = x @ torch.randn(8, 1) + 0.1 * torch.randn(512, 1)
for step in range(args.steps):
    for _ in range(args.accumulate):
        idx = torch.randint(0, 512, (args.micro_batch,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx]) / args.accumulate
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if monitor is not None:
        monitor.log(loss=loss.detach() * args.accumulate, lr=0.05)
    if step == 0 and args.ready_file:
        open(args.ready_file, "w").close()
    time.sleep(args.sleep)
print(f"trained {args.steps} steps", flush=True)
sys.exit(args.exit_code)
