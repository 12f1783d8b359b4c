"""Demo: measure the critical batch size of a task, as McCandlish et al. did, and set it beside B_simple.

McCandlish, Kaplan & Amodei (arXiv 1812.06162) find that the steps S and the examples E = B*S that
training needs to reach a given loss trade off as S = S_min * (1 + B_crit/B), where
B_crit = E_min/S_min is the critical batch size, and that bsmon's kind of noise scale, B_simple,
predicts B_crit within about an order of magnitude. This script repeats their measurement on the
teacher-student task of demos/adaptive_batch.py, with a small student so it runs in minutes:

1. For each batch size B, train the student with SGD at every learning rate of a grid (two seeds
   each, all at once as one batched ensemble) and record the steps to each target excess loss.
   The learning rate with the fewest steps (mean over seeds) is that B's tuned rate.
2. Fit S(B) = S_min + E_min/B to the tuned step counts of each target: B_crit = E_min/S_min.
3. Train the same student under bsmon.watch at one batch size, at that size's tuned rate, and
   read bsmon's B_simple where the loss passes each target, and averaged over the way there.
4. Train it at a small batch, at that size's tuned rate, until the loss passes each target, and
   run bsmon.branch_check there: the critical batch measured locally, set beside the sweep's.

With ``--optimizer adamw`` the same measurement is made for AdamW (its own learning-rate grid,
tuned per batch size as for SGD), and step 3 reads both of bsmon's noise scales: B_simple, of the
raw gradient, and B_pre, of the gradient in AdamW's geometry (rescaled by 1/(sqrt(v_hat)+eps)),
which is what bsmon's advice follows for Adam-family optimizers. The branch checks are SGD's only.

    .venv/bin/python demos/critical_batch.py            # full run, about 2 minutes
    .venv/bin/python demos/critical_batch.py --quick    # smoke test, seconds
    .venv/bin/python demos/critical_batch.py --optimizer adamw [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from array import array
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import bsmon
from bsmon import store
from bsmon.model import SessionModel

from adaptive_batch import TeacherTask, describe_task, evaluate, student

#: Evaluations come at steps 1, 2, ... and then every EVAL_GROWTH-fold, so a run of S steps costs
#: about log(S)/log(EVAL_GROWTH) evaluations; crossings are interpolated between them.
EVAL_GROWTH = 1.04
#: AdamW's settings (torch's defaults), the same in the ensemble and the bsmon-watched runs.
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


@dataclass(frozen=True)
class Sweep:
    """Steps to each target at one batch size: ``steps[target, lr, seed]``, NaN where not reached."""

    batch_size: int
    lrs: tuple[float, ...]
    steps: np.ndarray
    seconds: float

    def tuned(self, target: int) -> tuple[float, float] | None:
        """(learning rate, mean steps over seeds) of the fastest rate whose every seed reached the target."""
        mean = self.steps[target].mean(axis=1)
        if np.all(np.isnan(mean)):
            return None
        best = int(np.nanargmin(mean))
        return self.lrs[best], float(mean[best])


class Ensemble:
    """Many copies of the student MLP trained in lockstep with batched matrix products.

    Copy m has its own weights, learning rate and data; stacking them makes one step of M small
    models cost about one step of one model, which is what makes a learning-rate grid affordable.
    ``optimizer`` is "sgd" or "adamw" (torch.optim.AdamW with ADAMW, applied per copy: every
    operation of AdamW is elementwise, so the stacked copies keep separate moments).
    """

    def __init__(self, task: TeacherTask, hidden: tuple[int, ...], lrs: list[float], seeds: list[int],
                 optimizer: str = "sgd") -> None:
        copies = [student(task.inputs, hidden, task.classes, seed) for _ in lrs for seed in seeds]
        linears = [[layer for layer in copy if isinstance(layer, nn.Linear)] for copy in copies]
        # Weights stored transposed, (models, fan_in, fan_out), so a layer is one baddbmm.
        self.weights = [torch.stack([c[i].weight.detach().T for c in linears]).requires_grad_()
                        for i in range(len(hidden) + 1)]
        self.biases = [torch.stack([c[i].bias.detach() for c in linears]).requires_grad_()
                       for i in range(len(hidden) + 1)]
        self.lr = torch.tensor([lr for lr in lrs for _ in seeds])
        self.size = len(self.lr)
        self.optimizer = optimizer
        self._moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.weights + self.biases]
        self._steps = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (models, batch, inputs) -> (models, batch, classes)."""
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias.unsqueeze(1), x, weight)
            if i < len(self.weights) - 1:
                x = torch.tanh(x)
        return x

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        logits = self.logits(x)
        # Summing the models' mean losses gives each model exactly its own gradient.
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = loss.view(self.size, -1).mean(dim=1).sum()
        params = self.weights + self.biases
        grads = torch.autograd.grad(loss, params)
        self._steps += 1
        with torch.no_grad():
            for param, grad, (m, v) in zip(params, grads, self._moments):
                lr = self.lr.view(-1, *[1] * (param.dim() - 1))
                if self.optimizer == "sgd":
                    param -= lr * grad
                    continue
                beta1, beta2 = ADAMW["betas"]
                param.mul_(1 - lr * ADAMW["weight_decay"])
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (v / (1 - beta2 ** self._steps)).sqrt_().add_(ADAMW["eps"])
                param -= lr / (1 - beta1 ** self._steps) * m / denominator


def crossing(step: int, loss: float, last_step: int, last_loss: float, target: float) -> float:
    """Step at which the loss passed the target, interpolated linearly between two evaluations."""
    if last_step == 0 or last_loss <= loss:
        return float(step)
    return last_step + (step - last_step) * (last_loss - target) / (last_loss - loss)


def sweep(task: TeacherTask, batch_size: int, args: argparse.Namespace) -> Sweep:
    """Steps to every target for every (learning rate, seed), stopping once no rate can still win."""
    began = time.perf_counter()
    lrs, seeds, targets = args.lrs, list(range(args.seeds)), args.targets
    ensemble = Ensemble(task, args.hidden, lrs, seeds, args.optimizer)
    generator = torch.Generator().manual_seed(batch_size)
    hit = np.full((len(targets), ensemble.size), np.nan)
    diverged = np.zeros(ensemble.size, dtype=bool)
    last_step, last_loss = 0, np.full(ensemble.size, np.inf)
    next_eval = 1
    for step in range(1, args.max_samples // batch_size + 1):
        x, y = task.batch((ensemble.size, batch_size), generator)
        ensemble.step(x, y)
        if step < next_eval:
            continue
        next_eval = max(step + 1, math.ceil(step * EVAL_GROWTH))
        with torch.no_grad():
            loss = task.excess_loss(ensemble.logits(task.eval_x.expand(ensemble.size, -1, -1))).numpy()
        diverged |= ~np.isfinite(loss)
        ensemble.lr[torch.from_numpy(diverged)] = 0.0  # frozen; never counted as reaching a target
        for k, target in enumerate(targets):
            for m in np.flatnonzero(np.isnan(hit[k]) & ~diverged & (loss <= target)):
                hit[k, m] = crossing(step, loss[m], last_step, last_loss[m], target)
        last_step, last_loss = step, loss
        if decided(hit, diverged, step, len(lrs), len(seeds)):
            break
    return Sweep(batch_size, tuple(lrs), hit.reshape(len(targets), len(lrs), len(seeds)),
                 time.perf_counter() - began)


def decided(hit: np.ndarray, diverged: np.ndarray, step: int, n_lrs: int, n_seeds: int) -> bool:
    """True when, for every target, some rate has all seeds there and no other rate can still beat it.

    A rate whose seeds are not all there yet will average at least the mean of its known crossings
    and the current step for the rest; diverged copies never arrive.
    """
    for target_hits in hit:
        per_rate = target_hits.reshape(n_lrs, n_seeds)
        alive = ~diverged.reshape(n_lrs, n_seeds).any(axis=1)
        complete = ~np.isnan(per_rate).any(axis=1)
        if not complete.any():
            return False
        best = per_rate[complete].mean(axis=1).min()
        lower_bounds = np.where(np.isnan(per_rate), step, per_rate).mean(axis=1)
        if np.any(alive & ~complete & (lower_bounds < best)):
            return False
    return True


@dataclass(frozen=True)
class CriticalFit:
    s_min: float
    e_min: float
    max_rel_residual: float

    @property
    def b_crit(self) -> float:
        return self.e_min / self.s_min if self.s_min > 0 else math.inf


def fit_steps(batch_sizes: list[int], steps: list[float]) -> CriticalFit:
    """Least squares for S = S_min + E_min/B on relative residuals (the scatter of S grows with S)."""
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    design = np.column_stack([np.ones_like(b), 1.0 / b]) / s[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    residual = np.abs(s - (s_min + e_min / b)) / s
    return CriticalFit(float(s_min), float(e_min), float(residual.max()))


@dataclass(frozen=True)
class NoiseReading:
    target: float
    batch_size: int
    lr: float
    steps: int | None  # first evaluation at or below the target
    at_target: float | None  # B_simple there
    mean_before: float | None  # mean of B_simple over the steps up to there
    pre_at_target: float | None = None  # B_pre there (AdamW)
    pre_mean_before: float | None = None


def make_optimizer(model: nn.Module, lr: float, args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, **ADAMW)
    return torch.optim.SGD(model.parameters(), lr=lr)


def _at_and_mean(values: array, reached: int) -> tuple[float | None, float | None]:
    """A recorded series' value at step ``reached`` and its mean over the known values up to there."""
    series = np.frombuffer(values, dtype=float)[:reached]  # NaN while unknown
    known = series[np.isfinite(series)]
    return (float(series[-1]) if np.isfinite(series[-1]) else None), (float(known.mean()) if known.size else None)


def measure_b_simple(task: TeacherTask, target: float, batch_size: int, lr: float,
                     args: argparse.Namespace) -> NoiseReading:
    """Train one student under bsmon.watch until the loss passes ``target``; read B_simple (and for
    AdamW B_pre) there.

    bsmon records every step; replaying the session (as ``bsmon replay`` does) gives B_simple after
    each step, without calling ``monitor.stats()`` (and paying for it) at every step.
    """
    model = student(task.inputs, args.hidden, task.classes, seed=0)
    optimizer = make_optimizer(model, lr, args)
    generator = torch.Generator().manual_seed(batch_size)
    reached = None
    # noise_budget=1.0: measure every step. The default budget measures only every k-th step on a CPU,
    # to bound bsmon's overhead; here the noise scale itself is the result, so every step counts.
    with bsmon.watch(model, optimizer, name=f"critical-demo-{target}", horizon_samples=args.horizon,
                     noise_budget=1.0) as monitor:
        for step in range(1, args.max_samples // batch_size + 1):
            x, y = task.batch(batch_size, generator)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if step % args.noise_eval_every == 0 and evaluate(task, model) <= target:
                reached = step
                break
    if reached is None:
        return NoiseReading(target, batch_size, lr, None, None, None)
    records, _ = store.read_records(store.resolve_session(monitor.session_id).records_path)
    replay = SessionModel(horizon_samples=args.horizon)
    replay.ingest_all(records)
    return NoiseReading(target, batch_size, lr, reached, *_at_and_mean(replay.history.b_simple, reached),
                        *_at_and_mean(replay.history.b_simple_precond, reached))


def branch_reading(task: TeacherTask, target: float, lr: float, args: argparse.Namespace):
    """Train at --branch-batch and lr until the loss passes ``target``; run a branch check there."""
    batch = args.branch_batch
    model = student(task.inputs, args.hidden, task.classes, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(batch)

    def step_fn(batch_size: int) -> None:
        x, y = task.batch(batch_size, generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for step in range(1, args.max_samples // batch + 1):
        step_fn(batch)
        if step % args.noise_eval_every == 0 and evaluate(task, model) <= target:
            break
    else:
        return None
    # extra=[generator]: every branch starts from the same data stream, and training would resume on it
    return bsmon.branch_check(step_fn, lambda: task.excess_loss_items(model(task.eval_x)), model=model,
                              optimizer=optimizer, batch_size=batch, multiples=args.branch_multiples,
                              steps=args.branch_steps, lrs=args.branch_lrs or None, extra=[generator], verbose=False)


def print_branch_table(targets: list[float], fits: list[CriticalFit | None], checks: list, args) -> None:
    sizes = [args.branch_batch * k for k in sorted(args.branch_multiples)]
    rule = ("lr x " + ", ".join(f"{m:g}" for m in args.branch_lrs) if args.branch_lrs
            else "lr x 1/2, 1, 2 (base) and x 1, sqrt(k), k (branch k)")
    print(f"\nbranch checks at each target's loss level (base batch {args.branch_batch} at its tuned lr, "
          f"{args.branch_steps} base steps; {rule})")
    print(f"{'target':>7} | {'sweep B_crit':>12} | {'branch B_crit':>13} {'90% interval':>15} {'within 2x':>9} | "
          f"{'branch/sweep':>12} | E/E_base at " + " ".join(f"{b:>5}" for b in sizes))
    for target, fit, check in zip(targets, fits, checks):
        sweep = f"{fit.b_crit:>12.0f}" if fit is not None else f"{'-':>12}"
        if check is None:
            print(f"{target:>7g} | {sweep} | {'target not reached':>40}")
            continue
        value = f"{check.b_crit:>13.0f}" if check.b_crit is not None else f"{'> ' + format(check.b_crit_low or 0, '.0f'):>13}"
        interval = (f"{check.b_crit_low:.0f}-{check.b_crit_high:.0f}" if check.b_crit_low is not None
                    and check.b_crit_high is not None else "-")
        ratio = f"{check.b_crit / fit.b_crit:.2f}" if check.b_crit is not None and fit is not None else "-"
        ratios = " ".join(f"{r.samples_ratio:>5.2f}" for r in check.branches[1:])
        print(f"{target:>7g} | {sweep} | {value} {interval:>15} {check.within:>9} | {ratio:>12} | {ratios}   "
              f"({check.cost_samples:,} samples, {check.cost_s:.1f} s)")


def print_sweep_header(targets: list[float]) -> None:
    print("\nsteps to target at the tuned learning rate (mean of seeds; the lr in brackets; "
          "* = the best lr is at the edge of the grid)")
    print(f"{'batch':>6} {'time':>6} | " + " | ".join(f"{'target ' + format(t, 'g'):>18}" for t in targets),
          flush=True)


def print_sweep(result: Sweep, n_targets: int) -> None:
    cells = []
    for k in range(n_targets):
        tuned = result.tuned(k)
        if tuned is None:
            cells.append(f"{'not reached':>18}")
            continue
        lr, steps = tuned
        edge = "*" if lr in (result.lrs[0], result.lrs[-1]) else " "
        cells.append(f"{steps:>8.0f} [{lr:>6.3g}]{edge}")
    print(f"{result.batch_size:>6} {result.seconds:>5.1f}s | " + " | ".join(cells), flush=True)


def print_summary(targets: list[float], fits: list[CriticalFit | None], readings: list[NoiseReading]) -> None:
    print(f"\n{'target':>7} | {'S_min':>7} {'E_min':>9} {'B_crit':>7} {'fit err':>7} | "
          f"{'B_simple at target':>18} {'mean before':>11} {'(batch, lr, steps)':>20} | {'B_simple/B_crit':>15}")
    for target, fit, reading in zip(targets, fits, readings):
        if fit is None:
            left = f"{'too few batch sizes reached it':>34}"
        else:
            left = f"{fit.s_min:>7.1f} {fit.e_min:>9.0f} {fit.b_crit:>7.0f} {fit.max_rel_residual:>6.0%} "
        if reading.at_target is None:
            right = f"{'not measured':>52}"
            ratio = "-"
        else:
            run = f"({reading.batch_size}, {reading.lr:.3g}, {reading.steps})"
            right = f"{reading.at_target:>18.0f} {reading.mean_before:>11.0f} {run:>20}"
            ratio = f"{reading.at_target / fit.b_crit:.2f}" if fit is not None and fit.s_min > 0 else "-"
        print(f"{target:>7g} | {left}| {right} | {ratio:>15}")


def print_precond_summary(targets: list[float], fits: list[CriticalFit | None], readings: list[NoiseReading]) -> None:
    """B_pre (AdamW's geometry, what bsmon's advice follows) beside B_crit and B_simple."""
    print(f"\n{'target':>7} | {'B_crit':>7} | {'B_pre at target':>15} {'mean before':>11} | "
          f"{'B_pre/B_crit':>12} | {'B_simple/B_crit':>15}   (AdamW's geometry: what bsmon's advice follows)")
    for target, fit, reading in zip(targets, fits, readings):
        b_crit = fit.b_crit if fit is not None and fit.s_min > 0 else None
        crit = f"{b_crit:>7.0f}" if b_crit is not None else f"{'-':>7}"
        pre = (f"{reading.pre_at_target:>15.0f} {reading.pre_mean_before:>11.0f}"
               if reading.pre_at_target is not None else f"{'not measured':>27}")
        print(f"{target:>7g} | {crit} | {pre} | "
              f"{_ratio(reading.pre_at_target, b_crit):>12} | {_ratio(reading.at_target, b_crit):>15}")


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value is not None and reference else "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: three batch sizes, one easy target")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.06, 0.035],
                        help="excess losses (nats) to count steps to")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2 ** k for k in range(3, 12)])
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--lrs", type=float, nargs="+",
                        help="learning-rate grid, tried at every batch size (default: 0.0125 to 6.4 for SGD, "
                             "0.00025 to 0.128 for AdamW, doubling)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per learning rate")
    parser.add_argument("--max-samples", type=int, default=2_000_000, help="per model, at each batch size")
    parser.add_argument("--noise-batch", type=int, default=256, help="batch size of the B_simple runs")
    parser.add_argument("--horizon", type=float, default=20_000, help="bsmon's noise-scale horizon (samples)")
    parser.add_argument("--branch-batch", type=int, default=64, help="base batch of the branch checks")
    parser.add_argument("--branch-multiples", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--branch-steps", type=int, default=512, help="steps of the base branch")
    parser.add_argument("--temperature", type=float, nargs="+", metavar="LR",
                        help="skip everything else: read B_simple at --noise-batch at each of these learning rates, at "
                             "the last target (one controlled comparison of B_simple against the learning rate)")
    parser.add_argument("--branch-lrs", type=float, nargs="*", metavar="FACTOR",
                        default=[2.0 ** k for k in range(-5, 3)],
                        help="learning-rate multipliers tried in every branch (default 1/32 to 4; with no values, bsmon's default "
                             "rule, which sees no slowdown on this task: docs/demos.md)")
    parser.add_argument("--branch-only", type=float, nargs="+", metavar="LR",
                        help="skip the sweep (its table is deterministic): run only the branch checks, at these tuned "
                             "learning rates of --branch-batch, one per target; --sweep-b-crit gives the comparison")
    parser.add_argument("--sweep-b-crit", type=float, nargs="+", help="with --branch-only: the sweep's B_crit per target")
    args = parser.parse_args(argv)
    args.hidden = (64,)
    args.noise_eval_every = 5
    adamw = args.optimizer == "adamw"
    if args.lrs is None:
        args.lrs = [0.00025 * 2 ** k for k in range(10)] if adamw else [0.0125 * 2 ** k for k in range(10)]
    if args.quick:
        args.targets, args.batch_sizes = [0.3], [16, 64, 256]
        args.lrs = [0.004, 0.008, 0.016, 0.032] if adamw else [0.2, 0.4, 0.8, 1.6]
        args.seeds, args.noise_batch, args.max_samples = 1, 64, 200_000
        args.branch_batch, args.branch_multiples, args.branch_steps = 16, [2, 4], 16
    for name in ("noise_batch", "branch_batch"):
        if getattr(args, name) not in args.batch_sizes:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be one of --batch-sizes "
                         "(it uses that size's tuned lr)")
    if adamw and args.branch_only is not None:
        parser.error("--branch-only runs SGD's branch checks; leave out --optimizer adamw")
    args.targets = sorted(args.targets, reverse=True)
    if args.branch_only is not None and (len(args.branch_only) != len(args.targets) or (
            args.sweep_b_crit is not None and len(args.sweep_b_crit) != len(args.targets))):
        parser.error("--branch-only and --sweep-b-crit take one value per target")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    task = TeacherTask()
    description = describe_task(task, args.hidden)
    print(description if args.optimizer == "sgd" else description.replace("plain SGD", f"AdamW {ADAMW}"))
    print(f"targets (excess loss, nats): {args.targets}; lr grid {[float(f'{lr:.3g}') for lr in args.lrs]}; "
          f"{args.seeds} seed(s) per lr")
    if args.temperature is not None:
        print(f"\nB_simple at batch {args.noise_batch} where the loss passes {args.targets[-1]}, by learning rate")
        for lr in args.temperature:
            r = measure_b_simple(task, args.targets[-1], args.noise_batch, lr, args)
            print(f"  lr {lr:<6g} steps {r.steps}  B_simple at target {r.at_target or float('nan'):.0f}  "
                  f"mean before {r.mean_before or float('nan'):.0f}", flush=True)
        return
    if args.branch_only is not None:
        fits = [None if args.sweep_b_crit is None else CriticalFit(1.0, b, 0.0) for b in args.sweep_b_crit]
        checks = [branch_reading(task, target, lr, args) for target, lr in zip(args.targets, args.branch_only)]
        print_branch_table(args.targets, fits, checks, args)
        return
    print_sweep_header(args.targets)
    sweeps = []
    for batch_size in args.batch_sizes:
        sweeps.append(sweep(task, batch_size, args))
        print_sweep(sweeps[-1], len(args.targets))

    fits: list[CriticalFit | None] = []
    readings = []
    for k, target in enumerate(args.targets):
        points = [(s.batch_size, s.tuned(k)[1]) for s in sweeps if s.tuned(k) is not None]
        fits.append(fit_steps(*zip(*points)) if len(points) >= 3 else None)
        tuned = next(s for s in sweeps if s.batch_size == args.noise_batch).tuned(k)
        readings.append(measure_b_simple(task, target, args.noise_batch, tuned[0], args) if tuned is not None
                        else NoiseReading(target, args.noise_batch, math.nan, None, None, None))
    print_summary(args.targets, fits, readings)
    if args.optimizer == "adamw":
        print_precond_summary(args.targets, fits, readings)
        return
    checks = []
    for k, target in enumerate(args.targets):
        tuned = next(s for s in sweeps if s.batch_size == args.branch_batch).tuned(k)
        checks.append(branch_reading(task, target, tuned[0], args) if tuned is not None else None)
    if any(check is not None for check in checks):
        print_branch_table(args.targets, fits, checks, args)


if __name__ == "__main__":
    main()
