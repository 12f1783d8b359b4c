"""The critical batch measured directly: what a branch check's losses say (numpy only).

A branch check (``bsmon.branch_check``) trains short branches from one snapshot: the base branch
at the job's batch B, and branches at larger batches b = kB, every branch on the same number of
samples N, each at its best learning rate from a small set. The base branch is evaluated along
the way (its loss curve against samples), the others at their end.

For each larger branch, ``equiv_samples`` is how many samples the base branch needed to reach the
loss that branch reached on N: the first crossing of the base curve, interpolated linearly.
Then ``samples_ratio`` e = N / equiv_samples is E(b)/E(B), the samples needed at b over those
needed at B for the same loss, and ``steps_ratio`` = e*B/b is S(b)/S(B): MKA's steps-vs-samples
trade-off (arXiv 1812.06162) measured at the tested sizes. It is clipped to 1 <= e <= b/B: a
branch better than the base counts as no slowdown, and one worse than taking the base's steps at
the larger batch as no gain at all.

**Measured critical batch.** MKA's model says e(b) = (b + B_crit)/(B + B_crit): linear in b.
A branch is *within tolerance* when e <= 2, i.e. its loss on N samples is no worse than the base
branch's loss on N/2 samples (``tolerance_loss`` is that loss gap, in the loss's units). The
tolerance crossing b2, where e = 2 (interpolated linearly in b between tested sizes, which is
exact under the model), lies at B_crit + 2B, so the measured critical batch is b2 - 2B: the batch
at which training needs twice the samples of the small-batch limit, MKA's definition. It is
censored when no branch needed twice the samples (B_crit > b_max - 2B) or the first one already
did (B_crit below about B).

**Uncertainty.** A percentile bootstrap over the evaluations. When ``eval_fn`` returns one loss
per held-out item, every replicate resamples the items, with the same indices for every
evaluation: the held-out set is shared, so resampling it pairs the branches as the measurement
does. When it returns a single number and is called r > 1 times, each evaluation's r values are
resampled independently (repeated evaluations on fresh held-out batches are independent). The
learning rate chosen per branch is held fixed. The interval covers the evaluation noise only,
not the branches' own data-order noise: for that, check again later or lengthen the branches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: A branch is within tolerance while it needs at most this many times the base branch's samples.
TOLERANCE_RATIO = 2.0
BOOTSTRAP_REPLICATES = 1000
DEFAULT_CONFIDENCE = 0.9
#: Calibration decays with samples trained since the check: the measured ratio's logarithm is
#: halved every CALIBRATION_HALF_LIFE times the samples trained before the check.
CALIBRATION_HALF_LIFE = 1.0


@dataclass(frozen=True)
class BranchRun:
    """One branch: its batch, steps, and the loss its best learning rate reached on N samples."""

    batch_size: int
    steps: int
    lr: float
    loss: float
    lrs: tuple[float, ...]
    losses: tuple[float, ...]  # mean eval loss at each of lrs
    equiv_samples: float | None = None  # base-branch samples to the same loss (None for the base)
    samples_ratio: float | None = None  # E(b)/E(B)
    steps_ratio: float | None = None  # S(b)/S(B)

    @property
    def lr_at_edge(self) -> bool:
        """Whether the best rate is the smallest or largest of several tried: the optimum may lie beyond."""
        return len(self.lrs) > 1 and self.lr in (min(self.lrs), max(self.lrs))


@dataclass(frozen=True)
class BranchCheck:
    """What a branch check measured (``Stats.branch_check``, the ``branch_check`` record)."""

    step: int  # training step the check branched from
    samples_seen: int  # samples trained before it
    base_batch: int
    samples: int  # per branch
    start_loss: float
    tolerance_loss: float | None
    branches: tuple[BranchRun, ...]
    b_crit: float | None
    b_crit_low: float | None
    b_crit_high: float | None
    censored: str | None  # "above" / "below" the tested range, else None
    within: int | None  # largest tested batch within tolerance
    confidence: float
    interval: str | None  # what the interval's spread comes from; None: no interval
    b_simple: float | None = None  # at the moment of the check, if the job was watched
    calibrate: bool = False
    cost_samples: int = 0
    cost_steps: int = 0
    cost_evals: int = 0
    cost_s: float = 0.0
    reason: str | None = None  # why there is no number, if there is none

    @property
    def ratio(self) -> float | None:
        """B_simple / measured critical batch."""
        if self.b_simple is None or self.b_crit is None or self.b_crit <= 0:
            return None
        return self.b_simple / self.b_crit

    def to_record(self) -> dict[str, Any]:
        """JSON-native (lists, not tuples): the record as it will be read back."""
        record = asdict(self)
        record["branches"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(b).items()}
                              for b in self.branches]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BranchCheck:
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        fields["branches"] = tuple(BranchRun(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in b.items()
                                                if k in BranchRun.__dataclass_fields__})
                                   for b in record["branches"])
        return cls(**fields)


def calibration_weight(samples_at_check: int, samples_now: int) -> float:
    """How much of the measured ratio still applies: 1 at the check, halving every
    CALIBRATION_HALF_LIFE x samples_at_check samples since (B_crit moves on a log-samples scale)."""
    since = max(0, samples_now - samples_at_check)
    return 0.5 ** (since / (CALIBRATION_HALF_LIFE * max(samples_at_check, 1)))


def calibrated_factor(check: BranchCheck | None, samples_now: int) -> float | None:
    """Divide B_simple by this for the calibrated B_noise; None when the check cannot calibrate."""
    if check is None or not check.calibrate or check.ratio is None:
        return None
    return check.ratio ** calibration_weight(check.samples_seen, samples_now)


@dataclass
class Evaluations:
    """Raw evaluations of a branch check, each an array (held-out items, or repeated calls).

    ``curves[i][j]``: base branch at lrs[0][i], after ``curve_samples[j]`` samples (the last is N).
    ``finals[k][i]``: larger branch k at lrs[k+1][i], after N samples.
    """

    start: np.ndarray
    curve_samples: list[int]
    curves: list[list[np.ndarray]] = field(default_factory=list)
    finals: list[list[np.ndarray]] = field(default_factory=list)
    paired: bool = True  # items of one held-out set (resampled together) or independent repeats


def analyse(evals: Evaluations, base_batch: int, batch_sizes: Sequence[int], lrs: Sequence[Sequence[float]],
            samples: int, *, confidence: float = DEFAULT_CONFIDENCE, seed: int = 0, **context: Any) -> BranchCheck:
    """The measured critical batch and its interval from a check's evaluations (see the module doc).

    ``batch_sizes`` are the larger branches' batches, ``lrs[0]`` the base branch's rates and
    ``lrs[k+1]`` branch k's; ``context`` fills BranchCheck's bookkeeping fields (step, cost, ...).
    """
    means = _means(evals, None)
    base_best = int(np.argmin([curve[-1] for curve in means["curves"]]))
    best = [int(np.argmin(final)) for final in means["finals"]]
    point = _estimate(means, base_best, best, evals.curve_samples, base_batch, batch_sizes, samples)
    n_items = len(evals.start)
    interval = None
    low = high = None
    if n_items > 1:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(BOOTSTRAP_REPLICATES):
            idx = rng.integers(n_items, size=n_items) if evals.paired else rng
            replicate = _estimate(_means(evals, idx), base_best, best, evals.curve_samples, base_batch,
                                  batch_sizes, samples)
            draws.append(_censored_value(replicate["b_crit"], replicate["censored"]))
        low, high = (float(q) for q in np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2],
                                                      method="inverted_cdf"))
        interval = ("bootstrap over the held-out items" if evals.paired
                    else f"bootstrap over {n_items} repeated evaluations")
    base_curve = means["curves"][base_best]
    branches = [BranchRun(base_batch, samples // base_batch, float(lrs[0][base_best]), float(base_curve[-1]),
                          tuple(map(float, lrs[0])), tuple(float(c[-1]) for c in means["curves"]))]
    for k, batch in enumerate(batch_sizes):
        losses = means["finals"][k]
        branches.append(BranchRun(int(batch), samples // batch, float(lrs[k + 1][best[k]]), float(losses[best[k]]),
                                  tuple(map(float, lrs[k + 1])), tuple(map(float, losses)),
                                  point["equiv"][k], point["ratios"][k], point["ratios"][k] * base_batch / batch))
    b_crit, censored = point["b_crit"], point["censored"]
    reason = None
    if censored == "above":
        reason = (f"no tested batch up to {max(batch_sizes):,} needed twice the base batch's samples: "
                  f"the critical batch is above about {max(batch_sizes) - 2 * base_batch:,}; test larger multiples")
        if low is None or math.isinf(low):  # every replicate censored too: the tested range is the bound
            low = max(batch_sizes) - TOLERANCE_RATIO * base_batch
    elif censored == "below":
        reason = (f"already at {batch_sizes[0]:,} training needed twice the samples of batch {base_batch:,}: "
                  "the critical batch is at or below the current batch")
    return BranchCheck(
        base_batch=base_batch, samples=samples, start_loss=float(means["start"]),
        tolerance_loss=point["tolerance"], branches=tuple(branches), b_crit=b_crit,
        b_crit_low=low, b_crit_high=high, censored=censored, within=point["within"], confidence=confidence,
        interval=interval, reason=reason, **context)


def _censored_value(b_crit: float | None, censored: str | None) -> float:
    if censored == "above":
        return math.inf
    if censored == "below":
        return 0.0
    return b_crit


def _means(evals: Evaluations, idx) -> dict[str, Any]:
    """Mean loss of every evaluation; ``idx``: item indices (paired), a Generator (independent
    resampling of each evaluation's repeats), or None (no resampling)."""
    def mean(values: np.ndarray) -> float:
        if idx is None:
            return float(values.mean())
        if isinstance(idx, np.random.Generator):
            return float(values[idx.integers(len(values), size=len(values))].mean())
        return float(values[idx].mean())

    return {"start": mean(evals.start),
            "curves": [np.array([mean(v) for v in curve]) for curve in evals.curves],
            "finals": [np.array([mean(v) for v in final]) for final in evals.finals]}


def equivalent_samples(curve_samples: Sequence[float], curve: Sequence[float], loss: float) -> float:
    """Samples at which the base curve (starting at samples 0) first reaches ``loss``, interpolated
    linearly between evaluations; the curve's end if it never does."""
    for j in range(1, len(curve)):
        if curve[j] <= loss:
            above, below = curve[j - 1], curve[j]
            if above <= loss:
                return float(curve_samples[j - 1])
            return float(curve_samples[j - 1] + (curve_samples[j] - curve_samples[j - 1]) * (above - loss) / (above - below))
    return float(curve_samples[-1])


def _estimate(means: dict[str, Any], base_best: int, best: list[int], curve_samples: list[int], base_batch: int,
              batch_sizes: Sequence[int], samples: int) -> dict[str, Any]:
    curve = [means["start"], *means["curves"][base_best]]
    xs = [0, *curve_samples]
    equiv, ratios = [], []
    for k, batch in enumerate(batch_sizes):
        n = equivalent_samples(xs, curve, float(means["finals"][k][best[k]]))
        equiv.append(n)
        ratios.append(min(max(samples / n, 1.0), batch / base_batch) if n > 0 else batch / base_batch)
    half = equivalent_loss(xs, curve, samples / TOLERANCE_RATIO)
    tolerance = None if half is None else float(half - curve[-1])
    within = max([base_batch] + [b for b, e in zip(batch_sizes, ratios) if e <= TOLERANCE_RATIO])
    b_crit = censored = None
    points = [(float(base_batch), 1.0), *zip(map(float, batch_sizes), ratios)]
    for (b0, e0), (b1, e1) in zip(points, points[1:]):
        if e1 > TOLERANCE_RATIO:
            b2 = b0 + (TOLERANCE_RATIO - e0) * (b1 - b0) / (e1 - e0)
            b_crit = b2 - TOLERANCE_RATIO * base_batch
            break
    if b_crit is None:
        censored = "above"
    elif b_crit <= 0:
        # e(2B) > 2 is impossible under MKA's model (there e <= (2B + B_crit)/(B + B_crit) <= 2)
        b_crit, censored = None, "below"
    return {"equiv": equiv, "ratios": ratios, "tolerance": tolerance, "within": within, "b_crit": b_crit,
            "censored": censored}


def equivalent_loss(curve_samples: Sequence[float], curve: Sequence[float], samples: float) -> float | None:
    """The base curve's loss after ``samples`` samples, interpolated; None outside the curve."""
    if not curve_samples[0] <= samples <= curve_samples[-1]:
        return None
    return float(np.interp(samples, curve_samples, curve))
