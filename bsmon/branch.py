"""``bsmon.branch_check``: measure the critical batch directly, from short branches of training.

From a snapshot of the job (bsmon.snapshot) it trains a base branch at the current batch B and
branches at kB (default k = 2, 4, 8), all on the same number of samples, each at a few learning
rates, evaluates them, puts the exact state back, and records what bsmon.stats.branch concludes.
Runs in the training process: torch, numpy and the standard library only.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from bsmon.snapshot import Snapshot
from bsmon.stats.branch import DEFAULT_CONFIDENCE, BranchCheck, Evaluations, analyse

DEFAULT_MULTIPLES = (2, 4, 8)
#: By default the largest branch takes this many steps (the base branch max(multiples) times more).
STEPS_OF_LARGEST = 8
#: The base branch is evaluated this many times along the way (its loss-vs-samples curve).
CURVE_POINTS = 16


def default_lr_multipliers(k: int) -> tuple[float, ...]:
    """Branch k runs at the current learning rate times 1, sqrt(k) and k: no scaling, the square-root
    rule (Adam-like optimizers) and the linear rule (SGD below the noise scale). The base branch runs
    at x1/2, 1 and 2: a rate tuned for the run so far can sit at its noise floor, where every larger
    batch (a lower temperature lr/B) looks better and no slowdown shows (seen in demos/critical_batch.py)."""
    if k == 1:
        return (0.5, 1.0, 2.0)
    return tuple(sorted({1.0, math.sqrt(k), float(k)}))


def branch_check(step_fn: Callable[[int], Any], eval_fn: Callable[[], Any], *, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, batch_size: int | None = None,
                 multiples: Sequence[int] = DEFAULT_MULTIPLES, steps: int | None = None,
                 lrs: Sequence[float] | Callable[[int], Sequence[float]] | None = None, scaler: Any = None,
                 extra: Iterable[Any] = (), to_host: bool = False, eval_repeats: int = 1,
                 curve_points: int = CURVE_POINTS, calibrate: bool = False,
                 confidence: float = DEFAULT_CONFIDENCE, seed: int = 0, verbose: bool = True) -> BranchCheck | None:
    """Measure the critical batch now with short training branches, then restore the exact state.

    ``step_fn(batch_size)`` runs one optimizer step at that batch size on fresh data (by
    accumulation if it does not fit); ``eval_fn()`` returns the held-out loss: one number, or one
    loss per held-out item (a 1-D tensor or sequence), which gives the result an interval.
    ``model``/``optimizer`` default to the watched ones, ``batch_size`` to the job's current one.
    The base branch takes ``steps`` steps (default 8 x max(multiples)); branch k takes steps/k at
    k x batch_size, so all see the same samples. Each runs at the optimizer's learning rates times
    each of ``lrs`` (a list, or a function of k; default 1, sqrt(k), k, and 1/2, 1, 2 for the
    base branch) and keeps the best.
    ``scaler`` (a GradScaler) and ``extra`` (objects with state_dict/load_state_dict or
    get_state/set_state) are restored too; ``to_host`` keeps the snapshot in host memory.
    ``calibrate`` lets the advice use the measured ratio (docs/branch-check.md).

    The cost is printed (``verbose``) and recorded before the check starts, and measured after.
    Ctrl-C during the check restores the snapshot and returns None; training continues. Any
    other exception from step_fn or eval_fn restores the snapshot and propagates.
    """
    from bsmon.probe.monitor import active_monitor

    monitor = active_monitor()
    model = model if model is not None else (monitor.model if monitor is not None else None)
    optimizer = optimizer if optimizer is not None else (monitor.optimizer if monitor is not None else None)
    if model is None or optimizer is None:
        raise ValueError("branch_check needs model= and optimizer= (or an active bsmon.watch() to take them from)")
    stats = monitor.stats() if monitor is not None else None
    if stats is not None and stats.world_size > 1:
        raise ValueError("branch_check does not support multi-process jobs yet: every rank would have to branch "
                         "together")
    batch_size = _base_batch(batch_size, stats)
    multiples = _check_multiples(multiples)
    steps = STEPS_OF_LARGEST * multiples[-1] if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or any(steps % k for k in multiples):
        raise ValueError(f"steps={steps!r} must be a positive integer divisible by every multiple {multiples}")
    if isinstance(eval_repeats, bool) or not isinstance(eval_repeats, int) or eval_repeats < 1:
        raise ValueError(f"eval_repeats={eval_repeats!r} must be an integer >= 1")
    if not (isinstance(curve_points, int) and curve_points >= 2):
        raise ValueError(f"curve_points={curve_points!r} must be an integer >= 2")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1)")
    lr_sets = [_lr_multipliers(lrs, k) for k in (1, *multiples)]
    samples = steps * batch_size
    curve_steps = sorted({max(1, round(steps * j / curve_points)) for j in range(1, curve_points + 1)})
    sizes = [batch_size * k for k in multiples]

    cost_samples = samples * sum(len(m) for m in lr_sets)
    cost_steps = sum(len(m) * steps // k for m, k in zip(lr_sets, (1, *multiples)))
    cost_evals = eval_repeats * (1 + len(lr_sets[0]) * len(curve_steps) + sum(len(m) for m in lr_sets[1:]))
    step = stats.step if stats is not None else 0
    b_simple = stats.b_simple if stats is not None else None
    snapshot = Snapshot(model, optimizer, scaler=scaler, extra=extra, to_host=to_host)
    pause = monitor.paused() if monitor is not None else contextlib.nullcontext()
    began = time.perf_counter()
    try:
        with pause:
            start = _evaluate(eval_fn, eval_repeats)
            eval_s = time.perf_counter() - began
            plan = (f"bsmon: branch check at step {step}: batch {batch_size:,} and "
                    f"{', '.join(f'{s:,}' for s in sizes)} on {samples:,} samples each, "
                    f"learning rate x {'; '.join('/'.join(f'{m:.3g}' for m in ms) for ms in lr_sets)}. "
                    f"Extra cost: {cost_samples:,} samples ({cost_steps:,} steps) and {cost_evals:,} evaluations, "
                    f"{_estimate_time(monitor, batch_size, lr_sets, (1, *multiples), steps, cost_evals, eval_s)}. "
                    "Ctrl-C stops it and restores the training state.")
            _announce(monitor, plan, verbose)
            evals = Evaluations(start=start, curve_samples=[s * batch_size for s in curve_steps],
                                paired=eval_repeats == 1)
            base_lrs = [group["lr"] for group in optimizer.param_groups]
            for m in lr_sets[0]:
                evals.curves.append(_run_branch(snapshot, optimizer, base_lrs, m, step_fn, batch_size, steps,
                                                curve_steps, eval_fn, eval_repeats))
            for k, size in zip(multiples, sizes):
                evals.finals.append([_run_branch(snapshot, optimizer, base_lrs, m, step_fn, size, steps // k,
                                                 [steps // k], eval_fn, eval_repeats)[0]
                                     for m in lr_sets[multiples.index(k) + 1]])
            snapshot.restore()
    except KeyboardInterrupt:
        snapshot.restore()
        _announce(monitor, f"bsmon: branch check at step {step} interrupted after "
                  f"{time.perf_counter() - began:.1f} s; the training state is restored and training continues.",
                  verbose, level="warning")
        return None
    except BaseException:
        snapshot.restore()
        raise
    _check_lengths(evals)
    lr_values = [[m * _scalar_lr(base_lrs[0]) for m in ms] for ms in lr_sets]
    result = analyse(evals, batch_size, sizes, lr_values, samples, confidence=confidence, seed=seed,
                     step=step, samples_seen=stats.samples_seen if stats is not None else 0, b_simple=b_simple,
                     calibrate=calibrate, cost_samples=cost_samples, cost_steps=cost_steps, cost_evals=cost_evals,
                     cost_s=time.perf_counter() - began)
    if monitor is not None:
        monitor.record({"k": "branch_check", "t": time.time(), **result.to_record()})
    if verbose:
        print(describe(result), flush=True)
    return result


def describe(result: BranchCheck) -> str:
    """The result in a few lines (printed after a check)."""
    if result.b_crit is not None:
        found = f"measured critical batch {result.b_crit:,.0f}"
        if result.b_crit_low is not None and result.b_crit_high is not None:
            found += (f" ({result.confidence:.0%} interval {result.b_crit_low:,.0f}-{result.b_crit_high:,.0f}, "
                      f"{result.interval})")
    else:
        found = f"no measured critical batch: {result.reason}"
    if result.b_simple is not None:
        found += f"; B_simple {result.b_simple:,.0f}"
        if result.ratio is not None:
            found += f", ratio {result.ratio:.2f}"
    lines = [f"bsmon: branch check done in {result.cost_s:.1f} s ({result.cost_samples:,} samples, "
             f"{result.cost_steps:,} steps, {result.cost_evals:,} evaluations): {found}."]
    for run in result.branches:
        edge = "*" if run.lr_at_edge else " "
        line = f"  batch {run.batch_size:>7,}  {run.steps:>5} steps  lr {run.lr:<8.3g}{edge} loss {run.loss:.5g}"
        if run.samples_ratio is not None:
            line += f"  E/E_base {run.samples_ratio:.2f}  S/S_base {run.steps_ratio:.2f}"
        lines.append(line)
    if any(run.lr_at_edge for run in result.branches):
        lines.append("  * the best rate is at the edge of those tried: widen lrs= (the optimum may lie beyond)")
    return "\n".join(lines)


def _run_branch(snapshot: Snapshot, optimizer, base_lrs: list, multiplier: float, step_fn, batch_size: int,
                steps: int, eval_at: Sequence[int], eval_fn, repeats: int) -> list[np.ndarray]:
    """One branch from the snapshot: ``steps`` steps at ``batch_size``, evaluated after each of ``eval_at``."""
    snapshot.restore()
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr * multiplier
    results = []
    for step in range(1, steps + 1):
        step_fn(batch_size)
        if step in eval_at:
            results.append(_evaluate(eval_fn, repeats))
    return results


def _evaluate(eval_fn, repeats: int) -> np.ndarray:
    """eval_fn's losses as a float array: its items (one call), or one value per call (repeats)."""
    values = []
    for _ in range(repeats):
        with torch.no_grad():
            loss = eval_fn()
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().to("cpu", torch.float64).numpy()
        array = np.atleast_1d(np.asarray(loss, dtype=float))
        if array.ndim != 1 or not array.size or (repeats > 1 and array.size != 1):
            raise ValueError(f"eval_fn must return a number or a 1-D sequence of per-item losses "
                             f"(a number when eval_repeats > 1), got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("eval_fn returned a non-finite loss")
        values.append(array)
    return np.concatenate(values)


def _check_lengths(evals: Evaluations) -> None:
    sizes = {len(a) for a in [evals.start, *(a for c in evals.curves for a in c), *(a for f in evals.finals for a in f)]}
    if len(sizes) > 1:
        raise ValueError(f"eval_fn returned different numbers of items ({sorted(sizes)}): per-item losses must "
                         "come from one fixed held-out set")


def _estimate_time(monitor, batch_size: int, lr_sets, ks, steps: int, n_evals: int, eval_s: float) -> str:
    """Seconds expected, from the session's measured step times (interpolated; beyond the largest
    measured size, proportional to the batch), plus the evaluations at the first one's cost."""
    points = monitor.throughput_points() if monitor is not None else []
    if not points:
        return f"time unknown (no step time measured yet) plus about {n_evals * eval_s:.1f} s of evaluation"
    from bsmon.stats.throughput import mean_step_times

    sizes, times = mean_step_times(points)

    def step_time(b: float) -> float:
        if b > sizes[-1]:
            return float(times[-1] * b / sizes[-1])
        return float(np.interp(b, sizes, times))

    train = sum(len(ms) * (steps // k) * step_time(batch_size * k) for ms, k in zip(lr_sets, ks))
    return f"about {train + n_evals * eval_s:.1f} s ({train:.1f} s training, {n_evals * eval_s:.1f} s evaluating)"


def _announce(monitor, message: str, verbose: bool, level: str = "info") -> None:
    if verbose:
        print(message, flush=True)
    if monitor is not None:
        monitor.record({"k": "event", "t": time.time(), "level": level, "msg": message.removeprefix("bsmon: ")})
    elif level == "warning" and not verbose:
        warnings.warn(message, stacklevel=3)


def _base_batch(batch_size: int | None, stats) -> int:
    if batch_size is None:
        if stats is None or stats.batch_size is None:
            raise ValueError("branch_check needs batch_size= (no watched step has run yet to take it from)")
        if stats.unit != "samples":
            raise ValueError("a job watched in tokens: pass batch_size= in samples, as step_fn takes it")
        return int(stats.batch_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    return batch_size


def _check_multiples(multiples: Sequence[int]) -> list[int]:
    values = list(multiples)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in values):
        raise ValueError(f"multiples={multiples!r} must be integers >= 2 (the base batch itself always runs)")
    if len(set(values)) != len(values):
        raise ValueError(f"multiples={multiples!r} has repeats")
    return sorted(values)


def _lr_multipliers(lrs, k: int) -> tuple[float, ...]:
    chosen = default_lr_multipliers(k) if lrs is None else (lrs(k) if callable(lrs) else lrs)
    values = tuple(float(m) for m in chosen)
    if not values or not all(math.isfinite(m) and m > 0 for m in values):
        raise ValueError(f"learning-rate multipliers for k={k} must be positive numbers, got {chosen!r}")
    return values


def _scalar_lr(lr: Any) -> float:
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)

