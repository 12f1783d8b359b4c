"""The FLOPs of one training step, counted once per micro-batch size, for FLOP/s and MFU.

``torch.utils.flop_counter.FlopCounterMode`` is entered at the first forward of a step and left
when the optimizer step ends, so it sees every micro-batch's forward and backward. It dispatches
every op through Python, which makes that one step several times slower, so:

* it runs at most once per micro-batch size (a new size is in the live throughput warm-up
  anyway), and the step record it ran on carries the count, so its time can be left out;
* it prefers a step the noise probe does not measure (the probe's own norms are not the
  model's FLOPs), waiting up to ``WAIT_FOR_UNMEASURED`` steps at that size for one;
* it is off for a ``torch.compile``d model (a dispatch mode would make it recompile) and when
  the user gave ``watch(flops_per_sample=...)``;
* any error turns it off for the run, with the reason recorded; training is unaffected.

What it finds travels in fields the protocol already allows (docs/protocol.md): the hello's
``flops_per_sample``/``flops_dtype``/``flops_tf32``/``flops_reason``, and a step record's
``flops`` object ``{"total", "dtype", "tf32", "reason"}`` (the whole step on this rank).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Steps at a new micro-batch size that may pass, measured by the noise probe, before one is counted anyway.
WAIT_FOR_UNMEASURED = 20
REASON_COMPILED = "not counted for a torch.compile'd model: pass watch(flops_per_sample=...)"


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


class FlopCounter:
    """Counts one step's FLOPs per micro-batch size; ``hello_fields`` go into the session's hello."""

    def __init__(self, model: nn.Module, flops_per_sample: float | None) -> None:
        self._model = model
        self.counted: set[int] = set()  # micro-batch sizes counted so far (or whose count failed)
        self._waited: dict[int, int] = {}
        self._mode: Any = None
        self._size = 0
        self._dtype: tuple[str | None, bool] = (None, False)
        self._failed: dict[str, Any] | None = None  # a failure at start, for the step record
        self.off = flops_per_sample is not None or hasattr(model, "_orig_mod")  # torch.compile's wrapper
        self.hello_fields: dict[str, Any] = {}
        if flops_per_sample is not None:
            dtype, tf32 = compute_dtype(model)
            self.hello_fields = {"flops_per_sample": float(flops_per_sample), "flops_dtype": dtype, "flops_tf32": tf32}
        elif self.off:
            self.hello_fields = {"flops_reason": REASON_COMPILED}

    def start(self, micro_size: int | None, measured: bool) -> None:
        """At the first forward of a step: count this step if its size was not counted yet."""
        if self.off or micro_size is None or micro_size in self.counted or self._mode is not None:
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
            self._failed = self._failure(exc)
            return
        self._mode, self._size = mode, micro_size

    def stop(self) -> dict[str, Any] | None:
        """When the step ends: leave the counting mode; the step record's ``flops`` object, if any."""
        failed, self._failed = self._failed, None
        mode, self._mode = self._mode, None
        if mode is None:
            return failed
        self.counted.add(self._size)
        try:
            mode.__exit__(None, None, None)
            total = float(mode.get_total_flops())
        except Exception as exc:
            return self._failure(exc)
        dtype, tf32 = self._dtype
        return {"total": total, "dtype": dtype, "tf32": tf32, "reason": None}

    def close(self) -> None:
        """Leave a counting mode left open (the monitor closes or pauses), recording nothing."""
        mode, self._mode = self._mode, None
        if mode is not None:
            try:
                mode.__exit__(None, None, None)
            except Exception:
                pass

    def _failure(self, exc: BaseException) -> dict[str, Any]:
        self.off = True
        return {"total": None, "dtype": None, "tf32": False,
                "reason": f"FLOP counting failed ({type(exc).__name__}: {exc}); pass watch(flops_per_sample=...)"}
