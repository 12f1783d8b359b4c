"""Where a training step's time goes: four marks per step, for the in-run step-time fit.

Each step record carries ``ph`` = [first forward, last forward, optimizer.step() start, step end],
in seconds from the previous step's end. From these the session model separates the time that
gradient accumulation repeats (one micro-batch: the interval between two forward starts) from the
time it does not (the optimizer step, DDP's all-reduce wait, zero_grad, the data loading and logging
between steps); see bsmon.stats.throughput.split_step_time.

The clock is the one the step's work runs on. On the CPU that is ``time.perf_counter``: two calls
a micro-batch. On a GPU the host runs ahead of its kernels until something waits, so host times of
the marks describe when work was *queued*, not when it ran. There the marks are CUDA events
recorded on the model device's current stream (a few microseconds each, no synchronisation), read
later by :class:`~bsmon.probe.deferred.DeferredElapsed`: the device's own timeline, on which data
loading that overlaps the GPU's work costs nothing and a GPU waiting for its input shows as a gap
before the first forward. Work the job puts on other streams is seen only where the current stream
waits for it (DDP's all-reduce is: the stream waits for it before the optimizer step).
"""

from __future__ import annotations

from time import perf_counter

import torch

from bsmon.probe.deferred import DeferredElapsed


class StepPhases:
    """Marks the phases of each step on the training thread; ``end()`` gives the step's ``ph``."""

    def __init__(self, device: torch.device | None) -> None:
        self._cuda = device if device is not None and device.type == "cuda" else None
        self._previous_end = None  # a float (CPU) or a CUDA event
        self._first = self._last = self._optimizer = None

    def _event(self, event=None) -> torch.cuda.Event:
        event = event or torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._cuda))
        return event

    def forward(self) -> None:
        """The start of a training forward (a micro-batch)."""
        if self._cuda is None:
            self._last = perf_counter()
            if self._first is None:
                self._first = self._last
        elif self._first is None:
            self._first = self._event()
        else:
            self._last = self._event(self._last)  # re-recording one event keeps a step to four

    def optimizer(self) -> None:
        """The start of optimizer.step()."""
        self._optimizer = perf_counter() if self._cuda is None else self._event()

    def restart(self) -> None:
        """Forget the current step and the previous end (the next step starts a new interval)."""
        self._previous_end = self._first = self._last = self._optimizer = None

    def end(self) -> list[float] | DeferredElapsed | None:
        """The step's marks relative to the previous step's end, or None when one is missing."""
        end = perf_counter() if self._cuda is None else self._event()
        start, first, optimizer = self._previous_end, self._first, self._optimizer
        last = self._last if self._last is not None else first
        self._previous_end = end
        self._first = self._last = self._optimizer = None
        if start is None or first is None or optimizer is None:
            return None
        if self._cuda is not None:
            return DeferredElapsed(start, [first, last, optimizer, end])
        # Whole microseconds: half the bytes of full floats in every step record, finer than any split
        # needs. round(x * 1e6) / 1e6 is the same number as round(x, 6) to within a rounding of the
        # last microsecond, and about a third of its cost (round(x, 6) formats the float in decimal).
        return [round((first - start) * 1e6) / 1e6, round((last - start) * 1e6) / 1e6,
                round((optimizer - start) * 1e6) / 1e6, round((end - start) * 1e6) / 1e6]
