"""The help screen (the keys, what the numbers mean and do not mean) and the optimal batch's why view."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Static

from bsmon import fmt
from bsmon.model import Stats
from bsmon.stats.branch import CALIBRATION_HALF_LIFE, TOLERANCE_RATIO, BranchCheck

NUMBERS_HELP = """\
[b]What the numbers mean[/b]
[b]B_simple[/b] = tr(Σ)/|G|²: per-example gradient variance over the squared true gradient. It \
estimates B_noise, the batch size at which the noise of a batch gradient equals its signal.
[b]band[/b]: 95% interval of the ratio of the averaged tr(Σ) and |G|² estimates (Fieller); ∞ while \
|G|² is not yet clearly above 0. Trust the band, not the point, when it is wide.
[b]estimator[/b]: where the two batch sizes come from: the micro-batches of gradient accumulation, \
per-example norms, or local and all-reduced gradients. "B_big << B_simple" means |G|² is a small \
difference of noisy norms: average longer or raise B_big.
[b]B_pre[/b] = tr(PΣP)/|PG|²: the same ratio for the gradient rescaled by Adam's P = 1/(√v̂+ε), the direction \
an Adam-family optimizer actually steps along, whereas B_simple is the noise scale of plain SGD's raw gradient. \
For Adam-family optimizers the advice uses B_pre (watch(noise_geometry=...) overrides): a heuristic with \
evidence (Adam's critical batch runs larger than SGD's), not a theorem.
[b]efficiency[/b] = 1/(1+B/B_simple): progress per sample at batch B relative to very small batches. \
Below B_simple larger batches are nearly free; above it most extra samples are wasted.

[b]Caveats[/b]
• B_simple equals B_noise only for a well-conditioned Hessian; they usually differ by a modest factor.
• It depends on the learning rate (the temperature lr/B): too small an lr inflates it, warm-up makes \
it fall.
• It grows as the loss falls, often more than 10x over a run.
• With Adam-like optimizers both B_simple and B_pre are guides to the batch size, not laws.
"""


def keys_help(mode: str, output_log: Path | None, quit_ends_job: bool = False) -> str:
    where = escape(str(output_log)) if output_log else "the session's output.log"
    if quit_ends_job:
        quit_line = "[b]q[/b]       quit and end the demo (bsmon's own job)"
    elif mode == "run":
        quit_line = f"[b]q[/b]       detach: the job keeps running and is still recorded; its output goes to {where}"
    elif mode == "attach":
        quit_line = "[b]q[/b]       detach: the job keeps running"
    else:
        quit_line = "[b]q[/b]       quit"
    ctrl_c = ("[b]ctrl+c[/b]  send SIGINT to the job; this view stays open to show how it ends"
              if mode == "run" else "[b]ctrl+c[/b]  quit")
    return "\n".join([
        "[b]Keys[/b]", quit_line, ctrl_c,
        "[b]e[/b]       export the session as CSV (one row per step)",
        "[b]p[/b]       pause or resume redrawing; data keeps arriving",
        "[b]b[/b]       the branch checks: critical batch measured by bsmon.branch_check, per branch",
        "[b]w[/b]       why this batch size: the optimal-batch panel's full explanation",
        "[b]l[/b]       the noise scale per layer: B_simple per module, its share of |G|² and tr(Σ)",
        "[b]?[/b]       this help; esc closes it",
    ])


def why_text(reason: str | None, lr_advice: str | None, memory: str | None) -> str:
    """The optimal-batch panel's full explanation, for the w view."""
    parts = ["[b]Why this batch size[/b]", escape(reason or "no recommendation yet")]
    if lr_advice:
        parts += ["", "[b]Learning rate[/b]", escape(lr_advice)]
    if memory:
        parts += ["", "[b]Memory[/b]", escape(memory)]
    return "\n".join(parts)


class WhyScreen(ModalScreen[None]):
    """The full reason behind the optimal batch size (the panel keeps one line of it)."""

    BINDINGS = [Binding("escape,w,q", "close", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(self._text, id="why-text")

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "optimal batch size: why (esc closes)"

    def action_close(self) -> None:
        self.dismiss()


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, mode: str, output_log: Path | None, quit_ends_job: bool = False) -> None:
        super().__init__()
        self._mode = mode
        self._output_log = output_log
        self._quit_ends_job = quit_ends_job

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(keys_help(self._mode, self._output_log, self._quit_ends_job), id="help-keys")
            yield Static(NUMBERS_HELP, id="help-numbers")

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "bsmon help"

    def action_close(self) -> None:
        self.dismiss()


BRANCH_HELP = f"""\
[b]How it is measured[/b] (bsmon.branch_check, docs/branch-check.md)
From one snapshot, branches at the job's batch B and at larger batches b train on the same samples N, \
each at its best of a few learning rates; then the exact state is restored. [b]E/E_base[/b]: samples the \
base branch needed to reach the loss branch b reached on N, divided into N (MKA's E(b)/E(B)); \
[b]S/S_base[/b] the same for steps. A branch is within tolerance while E/E_base <= {TOLERANCE_RATIO:g} \
(its loss no worse than the base's at N/{TOLERANCE_RATIO:g}). Under MKA's model E/E_base = (b + B_crit)/(B + B_crit), \
so that crossing lies at B_crit + 2B: the measured critical batch is the crossing minus 2B. \
The interval is a bootstrap over the evaluation (held-out items, or repeated evaluations); it does not \
cover the branches' own data-order noise.
[b]Calibration[/b] (opt-in, branch_check(..., calibrate=True)): the advice uses B_noise = B_simple/r, \
r = (B_simple/B_crit measured)^w, w halving every {CALIBRATION_HALF_LIFE:g}x the samples trained before the check.
"""


def branch_details(checks: list[BranchCheck], calibration: float | None) -> str:
    """Every branch check of the session, newest first, with its branches."""
    if not checks:
        return ("No branch check in this session. Call bsmon.branch_check(step_fn, eval_fn) in the job to "
                "measure the critical batch directly.")
    parts = []
    for check in reversed(checks):
        head = f"[b]step {check.step:,}[/b] (after {check.samples_seen:,} samples), base batch {check.base_batch:,}, " \
               f"{check.samples:,} samples per branch: "
        if check.b_crit is not None:
            head += f"measured critical batch [b]{check.b_crit:,.0f}[/b]"
            if check.b_crit_low is not None and check.b_crit_high is not None:
                head += escape(f" [{check.b_crit_low:,.0f}, {check.b_crit_high:,.0f}]") + \
                        f" ({check.confidence:.0%}, {escape(check.interval or '')})"
        else:
            head += escape(check.reason or "no number")
        if check.b_simple is not None:
            head += f"; B_simple then {check.b_simple:,.0f}"
            if check.ratio is not None:
                head += f", ratio {check.ratio:.2f}"
        head += (f"\ncost {check.cost_samples:,} samples, {check.cost_steps:,} steps, {check.cost_evals:,} "
                 f"evaluations, {check.cost_s:.1f} s; calibrates the advice: {'yes' if check.calibrate else 'no'}")
        if check.tolerance_loss is not None:
            head += f"; tolerance {check.tolerance_loss:.4g} (loss units)"
        rows = [f"{'batch':>9} {'steps':>6} {'best lr':>9} {'loss':>10} {'E/E_base':>9} {'S/S_base':>9}   losses at each lr"]
        for run in check.branches:
            ratio = "base" if run.samples_ratio is None else f"{run.samples_ratio:.2f}"
            steps = "" if run.steps_ratio is None else f"{run.steps_ratio:.3f}"
            losses = ", ".join(f"{lr:.3g}: {loss:.4g}" for lr, loss in zip(run.lrs, run.losses))
            lr = f"{run.lr:.3g}" + ("*" if run.lr_at_edge else "")
            rows.append(f"{run.batch_size:>9,} {run.steps:>6,} {lr:>9} {run.loss:>10.5g} {ratio:>9} "
                        f"{steps:>9}   {escape(losses)}")
        if any(run.lr_at_edge for run in check.branches):
            rows.append("* best rate at the edge of those tried: the optimum may lie beyond (widen lrs=)")
        parts.append(head + "\n" + "\n".join(rows))
    if calibration is not None:
        parts.insert(0, f"[b]The advice is calibrated now:[/b] B_noise = B_simple/{calibration:.3g}.")
    return "\n\n".join(parts)


class DetailScreen(ModalScreen[None]):
    """A scrollable detail view behind a key: a table of numbers and how they are measured.

    Subclasses name the view and its table (``VIEW``, ``TABLE``: the ids its styles use), its title
    and its help text."""

    VIEW = TABLE = TITLE = HELP = ""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id=self.VIEW):
            yield Static(self._text, id=self.TABLE)
            yield Static(self.HELP, id=f"{self.VIEW}-help")

    def on_mount(self) -> None:
        self.query_one(f"#{self.VIEW}").border_title = self.TITLE

    def action_close(self) -> None:
        self.dismiss()


class BranchScreen(DetailScreen):
    BINDINGS = [Binding("escape,b,q", "close", "Close")]
    VIEW, TABLE, TITLE, HELP = "branch", "branch-checks", "Branch checks", BRANCH_HELP

    def __init__(self, checks: list[BranchCheck], calibration: float | None) -> None:
        super().__init__(branch_details(checks, calibration))


LAYERS_HELP = """\
[b]How it is measured[/b]: the micro-batch estimator's squared norms of .grad after each backward pass, \
or the per-example estimator's per-example squared norms and the batch gradient's, summed per module \
from the same per-parameter norms, give each module's |G|² and tr(Σ); they add up to the whole model's, \
so the shares below add to 100%. Every row covers all of its modules' parameters: the per-example \
estimator runs only when it covers the whole model. The largest modules have rows of their own, smaller \
ones are grouped by type. The data-parallel estimator has no breakdown: it measures DDP's gradient \
buckets, flattened, which do not follow module boundaries. [b]params[/b]: share of the trainable parameters. [b]|G|²[/b], [b]tr(Σ)[/b]: \
the module's share of the whole model's. Gray et al. (2024, nanoGNS) find that a transformer's LayerNorm \
parameters alone track the whole model's noise scale: compare the norm layers' line with the whole model's."""


def _share(part: float | None, whole: float | None) -> str:
    return f"{part / whole:5.0%}" if part is not None and whole and whole > 0 else "    –"


def _scale(noise) -> str:
    return escape(fmt.band(noise.b_simple, noise.b_simple_low, noise.b_simple_high)) if noise.b_simple is not None \
        else "no estimate"


def layers_details(stats: Stats) -> str:
    """The per-module B_simple with bands, coverage and shares, and the norm layers against the whole."""
    if not stats.noise_modules:
        return f"[b]No per-layer breakdown[/b]: {escape(_no_breakdown_reason(stats))}."
    width = max(len(label) for label, _, _ in stats.noise_modules)
    lines = [f"{stats.noise_estimator} estimator, each row covering all of its modules' parameters "
             f"({stats.noise_covered_fraction or 0:.0%} of the trainable parameters covered)\n",
             f"[b]{'module':<{width}}  params  |G|²  tr(Σ)  B_simple [95%][/b]"]
    lines.append(f"{'whole model':<{width}}    100%  100%   100%  {_scale(stats)}")
    for label, share, noise in stats.noise_modules:
        lines.append(f"{escape(label):<{width}}   {share:5.0%} {_share(noise.grad_sq, stats.grad_sq)}  "
                     f"{_share(noise.trace_sigma, stats.trace_sigma)}  {_scale(noise)}")
    norms = [noise for label, _, noise in stats.noise_modules if "Norm" in label]
    grad = sum(n.grad_sq or 0.0 for n in norms)
    if norms and grad > 0 and stats.b_simple:
        ratio = sum(n.trace_sigma or 0.0 for n in norms) / grad / stats.b_simple
        lines.append(f"\nnorm layers together: B_simple {fmt.si(ratio * stats.b_simple)}, "
                     f"{ratio:.2f}x the whole model's (nanoGNS: close to 1x)")
    return "\n".join(lines)


def _no_breakdown_reason(stats: Stats) -> str:
    if stats.noise_estimator is None:
        return f"no noise estimator: {stats.noise_reason or 'no measured step yet'}"
    if stats.noise_estimator == "ddp":
        return ("the data-parallel estimator measures DDP's gradient buckets inside its all-reduce hook: "
                "flattened, in DDP's order, and not along module boundaries, so bsmon keeps no per-module sums "
                "there. For the per-layer view, measure a single-process run (micro-batch or per-example)")
    return (f"the {stats.noise_estimator} estimator recorded no per-module rows: the model has one module "
            "(its row is the whole model), or the session was recorded by a bsmon without the breakdown "
            "for this estimator")


class LayersScreen(DetailScreen):
    BINDINGS = [Binding("escape,l,q", "close", "Close")]
    VIEW, TABLE, TITLE, HELP = "layers", "layers-table", "Noise scale per layer", LAYERS_HELP

    def __init__(self, stats: Stats) -> None:
        super().__init__(layers_details(stats))
