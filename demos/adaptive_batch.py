"""Demo: training at the batch size bsmon recommends reaches a target loss sooner than a fixed batch.

The task is a synthetic teacher-student classification (no downloads): a fixed random tanh network
(the teacher) defines class probabilities for Gaussian inputs, labels are sampled from them, and a
wider tanh MLP (the student) learns them with plain SGD. The loss reported is the excess loss, the
KL divergence from teacher to student on held-out inputs: zero only for a perfect student, so "the
target" means the same thing for every run.

Why batch size matters here, on one CPU thread:
* every step has a fixed cost (Python, autograd, the optimizer, bsmon's hooks), so small batches
  run far below the machine's throughput (the profile shows it);
* the gradient noise scale grows as the loss falls, so the batch that wastes few samples grows too.

One process runs, one after the other:
1. a throughput profile (bsmon.profile) of the student in a throwaway watched session;
2. the adaptive run: starts at --batch and, every --check-every steps, moves to
   monitor.recommended_batch_size(), scaling the learning rate by the SGD rule that bsmon's advice
   gives, (1 + B_noise/B_old) / (1 + B_noise/B_new);
3. the fixed run: the same start (weights, learning rate, data order) at --batch throughout.
Each run has its own bsmon.watch() session (one active monitor per process), given the profile.
Times are training wall-clock: evaluation is excluded, bsmon's own overhead is included. The
process's CPU time is reported beside it, since other load on a shared machine inflates only the
wall-clock. The comparison is repeated for --seeds seeds (student weights and data order).

    .venv/bin/python demos/adaptive_batch.py            # full run, one to two minutes
    .venv/bin/python demos/adaptive_batch.py --quick    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import bsmon
from bsmon import fmt


class TeacherTask:
    """Gaussian inputs, labels sampled from a random tanh teacher; excess loss = KL(teacher || student).

    The training set is a fixed pool of ``pool`` labelled examples, drawn with replacement, so a step
    costs an index, not a teacher evaluation. ``scale`` sets how sharp the teacher's probabilities
    are, and with it the label noise: at 2.0 the Bayes-optimal loss is about 1.4 nats.
    """

    def __init__(self, seed: int = 0, inputs: int = 16, hidden: int = 16, classes: int = 10,
                 scale: float = 2.0, pool: int = 1 << 20, eval_size: int = 4096) -> None:
        generator = torch.Generator().manual_seed(seed)

        def weights(*shape: int, fan_in: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator) * scale / math.sqrt(fan_in)

        self.inputs, self.classes = inputs, classes
        self._w1, self._b1 = weights(inputs, hidden, fan_in=inputs), weights(hidden, fan_in=inputs)
        self._w2, self._b2 = weights(hidden, classes, fan_in=hidden), weights(classes, fan_in=hidden)
        self.x = torch.randn(pool, inputs, generator=generator)
        self.y = torch.multinomial(torch.softmax(self.teacher(self.x), 1), 1, generator=generator).squeeze(1)
        self.eval_x = torch.randn(eval_size, inputs, generator=generator)
        self._eval_log_p = torch.log_softmax(self.teacher(self.eval_x), 1)

    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self._w1 + self._b1) @ self._w2 + self._b2

    def batch(self, size: int | tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples drawn with replacement from the pool; ``size`` may be a shape such as (models, batch)."""
        shape = (size,) if isinstance(size, int) else size
        index = torch.randint(0, len(self.x), shape, generator=generator)
        return self.x[index], self.y[index]

    def excess_loss(self, student_logits: torch.Tensor) -> torch.Tensor:
        """Mean KL(teacher || student) over eval_x, from logits of shape (..., eval_size, classes)."""
        return self.excess_loss_items(student_logits).mean(-1)

    def excess_loss_items(self, student_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) at each held-out input."""
        log_q = torch.log_softmax(student_logits, -1)
        return (self._eval_log_p.exp() * (self._eval_log_p - log_q)).sum(-1)

    def bayes_loss(self) -> float:
        """The cross-entropy of the teacher itself (the floor no student can beat), on eval_x."""
        return float(-(self._eval_log_p.exp() * self._eval_log_p).sum(-1).mean())


def student(inputs: int, hidden: tuple[int, ...], classes: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = inputs
    for size in hidden:
        layers += [nn.Linear(width, size), nn.Tanh()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, classes))


def evaluate(task: TeacherTask, model: nn.Module) -> float:
    with torch.no_grad():
        return float(task.excess_loss(model(task.eval_x)))


@dataclass(frozen=True)
class Evaluation:
    wall_s: float  # training wall-clock so far (evaluations excluded)
    cpu_s: float  # CPU time of this process (all threads, so bsmon's too) over the same stretches
    steps: int
    samples: int
    loss: float  # excess loss


@dataclass
class Run:
    """What one training run did: its evaluations and its batch-size changes."""

    name: str
    evals: list[Evaluation] = field(default_factory=list)
    switches: list[str] = field(default_factory=list)
    predicted_speedups: list[float] = field(default_factory=list)  # bsmon's b_opt_speedup at each eval
    batch_sizes: list[int] = field(default_factory=list)
    final_lr: float = math.nan

    def first_at_or_below(self, level: float) -> Evaluation | None:
        return next((e for e in self.evals if e.loss <= level), None)


def measure_profile(task: TeacherTask, args: argparse.Namespace) -> bsmon.Profile:
    """Time full training steps of a throwaway student, with bsmon's hooks on as in the real runs."""
    model = student(task.inputs, args.hidden, task.classes, args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    def step_fn(batch_size: int) -> None:
        x, y = task.batch(batch_size, generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    sizes = [2 ** k for k in range(int(math.log2(args.batch)), int(math.log2(args.max_batch)) + 1)]
    with bsmon.watch(model, optimizer, name="adaptive-demo-profile"):
        return bsmon.profile(step_fn, sizes, warmup=args.profile_warmup, steps=args.profile_steps)


def sgd_lr_factor(b_noise: float, old_batch: int, new_batch: int) -> float:
    """MKA's optimal SGD step is e_max / (1 + B_noise/B): the factor for a move from old to new."""
    return (1 + b_noise / old_batch) / (1 + b_noise / new_batch)


def train(task: TeacherTask, profile: bsmon.Profile, args: argparse.Namespace, *, adaptive: bool) -> Run:
    model = student(task.inputs, args.hidden, task.classes, args.seed)
    lr = args.lr
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(args.seed + 1)
    batch = args.batch
    run = Run("adaptive" if adaptive else f"fixed {batch}", batch_sizes=[batch])
    wall = cpu = 0.0
    steps = samples = 0
    next_eval = args.eval_every
    loss = evaluate(task, model)
    with bsmon.watch(model, optimizer, profile=profile, name=f"adaptive-demo-{run.name.replace(' ', '-')}",
                     horizon_samples=args.horizon) as monitor:
        while loss > args.target and samples < args.max_samples:
            wall_began, cpu_began = time.perf_counter(), time.process_time()
            x, y = task.batch(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps += 1
            samples += batch
            if adaptive and steps % args.check_every == 0:
                recommended = monitor.recommended_batch_size()
                b_noise = monitor.stats().b_simple
                if recommended is not None and recommended != batch and b_noise:
                    lr *= sgd_lr_factor(b_noise, batch, recommended)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    run.switches.append(
                        f"  step {steps:>6}  samples {samples:>8}  {wall:6.1f} s  last loss {loss:.4f}  "
                        f"B_simple {b_noise:7.0f}  batch {batch:>4} -> {recommended:<4}  lr -> {lr:.3g}")
                    batch = recommended
                    run.batch_sizes.append(batch)
            wall += time.perf_counter() - wall_began
            cpu += time.process_time() - cpu_began
            if samples >= next_eval:
                next_eval += args.eval_every
                loss = evaluate(task, model)
                run.evals.append(Evaluation(wall, cpu, steps, samples, loss))
                predicted = monitor.stats().b_opt_speedup
                if predicted is not None:
                    run.predicted_speedups.append(predicted)
    run.final_lr = lr
    return run


def print_profile(profile: bsmon.Profile) -> None:
    print(f"{'batch':>7} {'step time':>10} {'samples/s':>10}")
    for point in profile.points:
        print(f"{point.batch_size:>7} {fmt.duration(point.step_time_s):>10} {fmt.si(point.samples_per_s):>10}")
    fit = profile.fit
    verdict = "fits" if fit.fits else f"does not fit ({fit.reason})"
    print(f"t(B) = alpha + beta*B: alpha {fmt.duration(fit.alpha_s)}, beta {fmt.duration(fit.beta_s_per_sample)}"
          f"/sample, B_half {fit.b_half:.0f}; the line {verdict}")


def print_levels(adaptive: Run, fixed: Run, levels: list[float]) -> None:
    """Wall-clock time, steps and samples each run took to first reach each excess-loss level."""
    print(f"{'excess loss':>11} | {'fixed: time':>11} {'steps':>6} {'samples':>8} | "
          f"{'adaptive: time':>14} {'steps':>6} {'samples':>8} | {'speedup':>7}")
    for level in levels:
        hits = [run.first_at_or_below(level) for run in (fixed, adaptive)]
        cells = [f"{'not reached':>27}" if hit is None else f"{hit.wall_s:>9.1f} s {hit.steps:>6} {hit.samples:>8}"
                 for hit in hits]
        speedup = f"{hits[0].wall_s / hits[1].wall_s:>6.2f}x" if None not in hits else f"{'-':>7}"
        print(f"{level:>11.3f} | {cells[0]:>27} | {cells[1]:>30} | {speedup}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: smaller model, easy target, one seed")
    parser.add_argument("--seeds", type=int, default=3, help="repeat the comparison with this many seeds")
    parser.add_argument("--batch", type=int, default=32, help="the fixed run's batch, and the adaptive run's start")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate at --batch")
    parser.add_argument("--target", type=float, default=0.02, help="stop at this excess loss (nats)")
    parser.add_argument("--max-batch", type=int, default=2048, help="largest size profiled (and recommended)")
    parser.add_argument("--max-samples", type=int, default=2_000_000, help="give up after this many samples")
    parser.add_argument("--eval-every", type=int, default=10_000, help="samples between evaluations")
    parser.add_argument("--check-every", type=int, default=20, help="steps between looks at the recommendation")
    parser.add_argument("--horizon", type=float, default=100_000, help="bsmon's noise-scale horizon (samples)")
    args = parser.parse_args(argv)
    args.hidden = (256, 256)
    args.profile_warmup, args.profile_steps = 10, 50
    if args.quick:
        args.hidden, args.seeds = (64,), 1
        args.target, args.max_batch, args.max_samples = 0.15, 256, 100_000
        args.eval_every, args.horizon = 4_000, 10_000
        args.profile_warmup, args.profile_steps = 2, 5
    return args


def compare(task: TeacherTask, args: argparse.Namespace) -> dict[str, object]:
    """Profile, then the adaptive and the fixed run for args.seed; prints both and returns a summary row.

    The two runs alternate in order from seed to seed, so a machine that gets busier or quieter
    over time does not always favour the same one.
    """
    began = time.perf_counter()
    profile = measure_profile(task, args)
    profile_s = time.perf_counter() - began
    print(f"throughput profile ({profile_s:.1f} s, with bsmon's hooks on):")
    print_profile(profile)
    order = (True, False) if args.seed % 2 == 0 else (False, True)
    runs = {adaptive: train(task, profile, args, adaptive=adaptive) for adaptive in order}
    adaptive, fixed = runs[True], runs[False]
    for run in (runs[flag] for flag in order):
        end = run.evals[-1]
        print(f"\n{run.name}: {end.steps} steps, {end.samples} samples, {end.wall_s:.1f} s, "
              f"excess loss {end.loss:.4f}, final lr {run.final_lr:.3g}")
    print("adaptive batch-size changes (following monitor.recommended_batch_size()):")
    print("\n".join(adaptive.switches) or "  none")
    predicted = statistics.median(fixed.predicted_speedups) if fixed.predicted_speedups else math.nan
    print(f"during the fixed run, bsmon's predicted speedup from moving to its recommendation "
          f"(median over the run): {predicted:.2f}x\n")
    levels = sorted({0.2, 0.1, 0.05, args.target}, reverse=True)
    print_levels(adaptive, fixed, [level for level in levels if level >= args.target])
    return {"seed": args.seed, "fixed": fixed.first_at_or_below(args.target),
            "adaptive": adaptive.first_at_or_below(args.target), "profile_s": profile_s,
            "predicted": predicted, "batches": "->".join(map(str, adaptive.batch_sizes))}


def print_comparisons(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\nSummary: training time to excess loss {args.target} (evaluation excluded); "
          "speedup = fixed / adaptive")
    print(f"{'seed':>4} | {'fixed ' + str(args.batch):>9} {'adaptive':>9} {'speedup':>7} | "
          f"{'CPU speedup':>11} | {'with profile':>12} | {'bsmon predicted':>15} | adaptive batch sizes")
    speedups = []
    for row in rows:
        fixed, adaptive = row["fixed"], row["adaptive"]
        if fixed is None or adaptive is None:
            print(f"{row['seed']:>4} | target not reached by both runs within {args.max_samples} samples")
            continue
        speedups.append(fixed.wall_s / adaptive.wall_s)
        print(f"{row['seed']:>4} | {fixed.wall_s:>7.1f} s {adaptive.wall_s:>7.1f} s {speedups[-1]:>6.2f}x | "
              f"{fixed.cpu_s / adaptive.cpu_s:>10.2f}x | "
              f"{fixed.wall_s / (adaptive.wall_s + row['profile_s']):>11.2f}x | "
              f"{row['predicted']:>14.2f}x | {row['batches']}")
    if speedups:
        print(f"median wall-clock speedup {statistics.median(speedups):.2f}x over {len(speedups)} seed(s)")


def describe_task(task: TeacherTask, hidden: Sequence[int]) -> str:
    return (f"teacher task: {task.inputs} inputs, {task.classes} classes, Bayes loss {task.bayes_loss():.3f} nats; "
            f"student tanh MLP {task.inputs}-{'-'.join(map(str, hidden))}-{task.classes}, plain SGD")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    task = TeacherTask()
    print(describe_task(task, args.hidden))
    print(f"target excess loss {args.target}; fixed batch {args.batch} (the adaptive run's start), lr {args.lr}")
    rows = []
    for seed in range(args.seeds):
        args.seed = seed
        print(f"\n=== seed {seed} ===")
        rows.append(compare(task, args))
    print_comparisons(rows, args)


if __name__ == "__main__":
    main()
