"""A DistributedDataParallel job with a known noise scale, for torchrun on the CPU (gloo).

Linear regression over a fixed population of POPULATION examples, held at fixed parameters
(learning rate 0), so |G|^2 and tr(Sigma) are exact population values (see ``exact_noise``).
Every rank draws its micro-batches i.i.d. with replacement from the whole population, with
its own seed. With ``--accumulate m`` the first m-1 passes of a step run under ``no_sync()``.
With ``--adam`` the features have scales spread over two orders of magnitude and AdamW (still at
learning rate 0) starts from the exact second moment of the global batch's gradient, so the
noise scale in its geometry, B_pre, is exact too (``exact_b_pre``).

Run: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/jobs/train_ddp.py
"""

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

POPULATION, DIM = 2048, 128


def problem(scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and the fixed weights (float64): near, not at, the least-squares fit."""
    gen = torch.Generator().manual_seed(1234)
    inputs = torch.randn(POPULATION, DIM, generator=gen, dtype=torch.float64)
    if scaled:
        inputs *= torch.logspace(-1, 1, DIM, dtype=torch.float64)
    w_true = torch.randn(1, DIM, generator=gen, dtype=torch.float64)
    targets = inputs @ w_true.T + torch.randn(POPULATION, 1, generator=gen, dtype=torch.float64)
    weights = w_true + 0.07 * torch.randn(1, DIM, generator=gen, dtype=torch.float64)
    return inputs, targets, weights


def exact_moments(scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """G and diag(Sigma), element by element: the per-example gradient of (w.x - y)^2 is 2 (w.x - y) x."""
    inputs, targets, weights = problem(scaled)
    per_example = 2 * (inputs @ weights.T - targets) * inputs
    mean = per_example.mean(0)
    return mean, (per_example - mean).square().mean(0)


def exact_noise() -> tuple[float, float]:
    """Exact |G|^2 and tr(Sigma)."""
    mean, variance = exact_moments()
    return float(mean @ mean), float(variance.sum())


def exact_second_moment(batch: int) -> torch.Tensor:
    """Adam's v at learning rate 0 for batch gradients of ``batch`` examples: E[g_B^2] = G^2 + diag(Sigma)/B."""
    mean, variance = exact_moments(scaled=True)
    return mean**2 + variance / batch


def exact_b_pre(batch: int, eps: float = 1e-8) -> tuple[float, float]:
    """(B_simple, B_pre = tr(P Sigma P)/|P G|^2) with P = 1/(sqrt(v) + eps) for the --adam problem."""
    mean, variance = exact_moments(scaled=True)
    p_sq = 1 / (exact_second_moment(batch).sqrt() + eps) ** 2
    return float(variance.sum() / mean.square().sum()), float((p_sq * variance).sum() / (p_sq * mean.square()).sum())


def counting_allreduce(state: dict, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A user's communication hook: DDP's standard all-reduce, counting its calls."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state["calls"] += 1
    return allreduce_hook(None, bucket)


def fail_at_norm(call: int) -> None:
    """Make bsmon's ``call``-th squared bucket norm raise: in the comm hook before the all-reduce
    (odd calls, one bucket a step) or in its callback after it (even calls)."""
    from bsmon.probe import distributed

    sq_norm, calls = distributed._sq_norm, []

    def failing(tensor):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected bsmon bug in the comm hook")
        return sq_norm(tensor)

    distributed._sq_norm = failing


def main() -> int:
    import bsmon

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (no_sync before the last)")
    parser.add_argument("--micro-batch", type=int, default=128)
    parser.add_argument("--noise", default="auto")
    parser.add_argument("--adam", action="store_true", help="AdamW from the exact second moment, scaled features")
    parser.add_argument("--comm-hook", choices=("none", "before", "after"), default="none",
                        help="register counting_allreduce before or after bsmon.watch()")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step")
    parser.add_argument("--ready-file", help="rank 0 touches it after its first step")
    parser.add_argument("--pid-dir", help="each rank writes rank<N>.pid there")
    parser.add_argument("--lr", type=float, default=0.0, help="0 (the default) holds the parameters fixed")
    parser.add_argument("--unwatched", action="store_true", help="train without bsmon")
    parser.add_argument("--fail-at-norm", type=int,
                        help="rank 0: bsmon's N-th bucket norm raises (a bsmon bug in the comm hook)")
    parser.add_argument("--losses-dir", help="each rank writes its losses to rank<N>.losses there")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.pid_dir:
        Path(args.pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    inputs, targets, weights = problem(args.adam)
    module = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        module.weight.copy_(weights)
    model = nn.parallel.DistributedDataParallel(module)
    if args.adam:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.999), eps=1e-8)
        module.weight.grad = torch.zeros_like(module.weight)
        optimizer.step()  # creates the state at step 1; v_hat = v / (1 - beta2) is then the exact one
        optimizer.state[module.weight]["exp_avg_sq"].copy_(
            exact_second_moment(args.accumulate * args.micro_batch * dist.get_world_size()).view(1, DIM) * (1 - 0.999))
        optimizer.zero_grad()
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    hook_state = {"calls": 0}
    if args.comm_hook == "before":
        model.register_comm_hook(hook_state, counting_allreduce)
    if args.fail_at_norm and rank == 0:
        fail_at_norm(args.fail_at_norm)
    monitor = None if args.unwatched else bsmon.watch(
        model, optimizer, noise=None if args.noise == "none" else args.noise,
        horizon_samples=1e12,  # fixed parameters: average over every step
        noise_budget=1.0)  # and measure every step (accuracy, not cost, is tested)
    if args.comm_hook == "after":
        model.register_comm_hook(hook_state, counting_allreduce)

    gen = torch.Generator().manual_seed(100 + rank)
    losses = []
    for step in range(args.steps):
        for micro in range(args.accumulate):
            sync = micro == args.accumulate - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                idx = torch.randint(0, POPULATION, (args.micro_batch,), generator=gen)
                loss = F.mse_loss(model(inputs[idx]), targets[idx]) / args.accumulate
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 0 and args.ready_file and rank == 0:
            Path(args.ready_file).touch()
        time.sleep(args.sleep)
    if monitor is not None:
        monitor.close()
    if args.losses_dir:
        Path(args.losses_dir, f"rank{rank}.losses").write_text("".join(f"{loss!r}\n" for loss in losses))
    print(f"rank {rank}: trained {args.steps} steps, comm hook calls {hook_state['calls']}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
