"""The help screen: the keys, and what the numbers mean (and do not mean)."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Static

NUMBERS_HELP = """\
[b]What the numbers mean[/b]
[b]B_simple[/b] = tr(Σ)/|G|²: per-example gradient variance over the squared true gradient. It \
estimates B_noise, the batch size at which the noise of a batch gradient equals its signal.
[b]band[/b]: 95% interval of the ratio of the averaged tr(Σ) and |G|² estimates (Fieller); ∞ while \
|G|² is not yet clearly above 0. Trust the band, not the point, when it is wide.
[b]estimator[/b]: where the two batch sizes come from: the micro-batches of gradient accumulation, \
per-example norms, or local and all-reduced gradients. "B_big << B_simple" means |G|² is a small \
difference of noisy norms: average longer or raise B_big.
[b]efficiency[/b] = 1/(1+B/B_simple): progress per sample at batch B relative to very small batches. \
Below B_simple larger batches are nearly free; above it most extra samples are wasted.

[b]Caveats[/b]
• B_simple equals B_noise only for a well-conditioned Hessian; they usually differ by a modest factor.
• It depends on the learning rate (the temperature lr/B): too small an lr inflates it, warm-up makes \
it fall.
• It grows as the loss falls, often more than 10x over a run.
• With Adam-like optimizers it is a guide to the batch size, not a law.
"""


def keys_help(mode: str, output_log: Path | None) -> str:
    where = escape(str(output_log)) if output_log else "the session's output.log"
    quit_line = (f"[b]q[/b]       detach: the job keeps running and is still recorded; its output goes to {where}"
                 if mode == "run" else "[b]q[/b]       quit")
    ctrl_c = ("[b]ctrl+c[/b]  send SIGINT to the job; this view stays open to show how it ends"
              if mode == "run" else "[b]ctrl+c[/b]  quit")
    return "\n".join([
        "[b]Keys[/b]", quit_line, ctrl_c,
        "[b]e[/b]       export the session as CSV (one row per step)",
        "[b]p[/b]       pause or resume redrawing; data keeps arriving",
        "[b]?[/b]       this help; esc closes it",
    ])


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, mode: str, output_log: Path | None) -> None:
        super().__init__()
        self._mode = mode
        self._output_log = output_log

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(keys_help(self._mode, self._output_log), id="help-keys")
            yield Static(NUMBERS_HELP, id="help-numbers")

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "bsmon help"

    def action_close(self) -> None:
        self.dismiss()
