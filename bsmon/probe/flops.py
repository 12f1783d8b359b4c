"""The FLOPs of one training step, counted once per micro-batch size, for FLOP/s and MFU.

``torch.utils.flop_counter.FlopCounterMode`` is entered at the first forward of a step and left
when the optimizer step ends, so it sees every micro-batch's forward and backward. It dispatches
every op through Python, which makes that one step several times slower, so:

* it runs at most once per micro-batch size (a new size is in the live throughput warm-up
  anyway), and the step it ran on is named in the record so its time can be left out;
* it prefers a step the noise probe does not measure (the probe's own norms are not the
  model's FLOPs), waiting up to ``WAIT_FOR_UNMEASURED`` steps at that size for one;
* it is off for a ``torch.compile``d model (a dispatch mode would make it recompile) and when
  the user gave ``watch(flops_per_sample=...)``;
* any error turns it off for the run, with the reason recorded; training is unaffected.

Records: ``{"k": "flops", "t", "step", "batch_size", "flops", "dtype", "tf32", "source", "reason"}``,
``flops`` for the whole step on this rank (None with a ``reason`` when counting failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Steps at a new micro-batch size that may pass, measured by the noise probe, before one is counted anyway.
WAIT_FOR_UNMEASURED = 20


def compute_dtype(model: nn.Module) -> tuple[str | None, bool]:
    """(dtype a step computes in, whether float32 matmuls may use TF32): autocast's dtype when on."""
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    dtype = param.dtype if param is not None else None
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    tf32 = device == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                 or torch.get_float32_matmul_precision() != "highest")
    return (str(dtype).removeprefix("torch.") if dtype is not None else None), tf32


def _compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod")  # torch.compile's OptimizedModule wraps the original here


class FlopCounter:
    """Counts one step's FLOPs per micro-batch size; ``submit`` takes the records."""

    def __init__(self, model: nn.Module, submit: Callable[[dict[str, Any]], None],
                 flops_per_sample: float | None) -> None:
        self._model = model
        self._submit = submit
        self._counted: set[int] = set()
        self._waited: dict[int, int] = {}
        self._mode: Any = None
        self._size = 0
        self._dtype: tuple[str | None, bool] = (None, False)
        self.off = False
        if flops_per_sample is not None:
            dtype, tf32 = compute_dtype(model)
            self._record(0, 1, float(flops_per_sample), dtype, tf32, "given", None)
            self.off = True
        elif _compiled(model):
            self._record(0, 1, None, None, False, "counted",
                         "not counted for a torch.compile'd model: pass watch(flops_per_sample=...)")
            self.off = True

    def start(self, micro_size: int | None, measured: bool) -> None:
        """At the first forward of a step: count this step if its size was not counted yet."""
        if self.off or micro_size is None or micro_size in self._counted or self._mode is not None:
            return
        if measured:
            waited = self._waited[micro_size] = self._waited.get(micro_size, 0) + 1
            if waited <= WAIT_FOR_UNMEASURED:
                return
        try:
            from torch.utils.flop_counter import FlopCounterMode

            self._dtype = compute_dtype(self._model)
            mode = FlopCounterMode(display=False)
            mode.__enter__()
        except Exception as exc:  # an old torch, a model it cannot trace: no FLOPs, training goes on
            self._fail(exc, 0, micro_size)
            return
        self._mode, self._size = mode, micro_size

    def stop(self, step: int, samples: int) -> None:
        """When the step ends: leave the counting mode and record the step's FLOPs."""
        mode, self._mode = self._mode, None
        if mode is None:
            return
        self._counted.add(self._size)
        try:
            mode.__exit__(None, None, None)
            flops = float(mode.get_total_flops())
        except Exception as exc:
            self._fail(exc, step, samples)
            return
        self._record(step, samples, flops, *self._dtype, "counted", None)

    def close(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            try:
                mode.__exit__(None, None, None)
            except Exception:
                pass

    def _fail(self, exc: BaseException, step: int, samples: int) -> None:
        self.off = True
        self._record(step, max(1, samples), None, None, False, "counted",
                     f"FLOP counting failed ({type(exc).__name__}: {exc}); pass watch(flops_per_sample=...)")

    def _record(self, step: int, samples: int, flops: float | None, dtype: str | None, tf32: bool,
                source: str, reason: str | None) -> None:
        self._submit({"k": "flops", "t": time.time(), "step": step, "batch_size": samples, "flops": flops,
                      "dtype": dtype, "tf32": tf32, "source": source, "reason": reason})
