"""Where a training step enters the watched model, when the model's own forward never runs.

A Lightning ``training_step`` that calls ``self.net(x)``, or any loop that calls a part
of the watched module directly, never runs the watched module's forward: its
forward pre-hook sees nothing, so bsmon would count no samples and find no backward
pass. Until the watched module's forward runs in training mode, every submodule with
trainable parameters carries a forward pre-hook that notes its calls. The watched
module's first training forward removes them all (before any submodule runs), so a
model whose forward does run pays for these hooks only until its first forward. Under
torch.compile (watch, then compile) the traced hooks do nothing, and they stay, idle:
removing a hook from a module dynamo traced would recompile it.

When an optimizer step comes without that forward, the first of these submodules to
run in the step is the entry: the outermost module the training step called. The probe
then counts samples, micro-batches and backward passes there (Monitor._adopt_entry).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from bsmon.probe.per_example import is_compiling


def first_batch_dim(args: tuple, kwargs: dict) -> int | None:
    """Samples in a forward call: the first dimension of the first tensor argument,
    looking inside tuples, lists and dicts (a Lightning batch ``(x, y)``)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() > 0 else None
        if isinstance(value, (tuple, list, dict)):
            inner = value.values() if isinstance(value, dict) else value
            size = first_batch_dim(tuple(inner), {})
            if size is not None:
                return size
    return None


class EntryFinder:
    """Notes the training-mode calls of every trainable submodule of ``model`` (not ``model``)."""

    def __init__(self, model: nn.Module, guard: Callable[[Callable], Callable] = lambda hook: hook) -> None:
        """``guard`` wraps the hook (the Monitor's Guard: a bsmon bug never reaches the training)."""
        self.calls: dict[nn.Module, list[int | None]] = {}  # first caller first (dicts keep order)
        self.started: float | None = None  # perf_counter() of the first call since reset()
        self.active = True  # False: hooks left in place but idle (see Monitor._settle_entry)
        self._names: dict[nn.Module, str] = {}
        self._handles = []
        for name, module in model.named_modules():
            if module is model or not any(p.requires_grad for p in module.parameters()):
                continue
            self._names[module] = name
            self._handles.append(module.register_forward_pre_hook(guard(self._on_call), with_kwargs=True))

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Traced into a compiled graph (so the model's forward runs: nothing to find), this
        # returns before anything dynamo would guard on or break at.
        if is_compiling() or not self.active:
            return
        if module.training and torch.is_grad_enabled():
            if self.started is None:
                self.started = time.perf_counter()
            self.calls.setdefault(module, []).append(first_batch_dim(args, kwargs))

    def entry(self) -> tuple[str, nn.Module, list[int]] | None:
        """The first submodule called since reset(): its name, itself, and the sizes of its calls."""
        for module, sizes in self.calls.items():
            return self._names[module], module, [size for size in sizes if size is not None]
        return None

    def reset(self) -> None:
        self.calls.clear()
        self.started = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
