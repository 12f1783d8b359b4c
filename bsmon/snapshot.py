"""Exact training-state snapshots: take one, train on a detour, put everything back bit for bit.

A :class:`Snapshot` holds copies of
- the model: parameters and buffers (by value, restored in place so every reference to a tensor,
  the optimizer's included, stays valid), each parameter's ``.grad`` (or its absence), and every
  module's train/eval mode;
- the optimizer: its ``state_dict()`` deep-copied (learning rates, momenta, Adam's moments and
  step counts); state created on the detour (a first Adam step) is dropped on restore;
- a ``torch.amp.GradScaler`` if given (scale, growth tracker);
- the random number generators: torch's CPU generator, every CUDA device's when CUDA is
  initialised, Python's ``random`` and NumPy's global generator;
- any ``extra`` objects with ``state_dict``/``load_state_dict`` (an LR scheduler) or
  ``get_state``/``set_state`` (a ``torch.Generator``).

``to_host=True`` keeps the copies in host memory, so the snapshot does not take a second copy of
the model and optimizer on the GPU; ``restore`` copies them back (one host-to-device copy per
tensor). Anything else the detour changes (a data iterator's position, an EMA of the weights held
outside the model) is the caller's to keep. Used by ``bsmon.branch_check`` and ``bsmon.profile_training``; torch, numpy and the
standard library only.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn


def _copy_tensors(value: Any, device: torch.device | None) -> Any:
    """A deep copy of nested dicts/lists/tuples whose tensors are cloned (onto ``device`` if given)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True) if device is not None else value.detach().clone()
    if isinstance(value, dict):
        return {key: _copy_tensors(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_tensors(item, device) for item in value)
    return copy.deepcopy(value)


class Snapshot:
    """The state of a training job at one moment; ``restore()`` may be called any number of times."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 scaler: Any = None, extra: Iterable[Any] = (), to_host: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Snapshot needs a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.extra = list(extra)
        for obj in [scaler, *self.extra]:
            if obj is not None and not (_has(obj, "state_dict", "load_state_dict") or _has(obj, "get_state", "set_state")):
                raise TypeError(f"cannot snapshot a {type(obj).__name__}: it has neither state_dict/load_state_dict "
                                "nor get_state/set_state")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.to_host = to_host
        device = torch.device("cpu") if to_host else None
        self._tensors = {name: _copy_tensors(t, device) for name, t in _named_state(model)}
        self._grads = {name: None if p.grad is None else _copy_tensors(p.grad, device)
                       for name, p in model.named_parameters()}
        self._training = {name: module.training for name, module in model.named_modules()}
        self._optimizer = None if optimizer is None else _copy_tensors(optimizer.state_dict(), device)
        self._scaler = None if scaler is None else _get(scaler)
        self._extra = [_get(obj) for obj in self.extra]
        self._rng = rng_state()

    @property
    def nbytes(self) -> int:
        """Bytes the copies of tensors take (model, gradients and optimizer state)."""
        total = 0

        def add(value: Any) -> None:
            nonlocal total
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                for item in value.values():
                    add(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    add(item)

        add(self._tensors)
        add(self._grads)
        add(self._optimizer)
        return total

    def restore(self) -> None:
        """Put every saved value back; tensors are written in place, so references stay valid."""
        with torch.no_grad():
            current = dict(_named_state(self.model))
            for name, saved in self._tensors.items():
                current[name].copy_(saved)
            for name, param in self.model.named_parameters():
                saved = self._grads.get(name)
                if saved is None:
                    param.grad = None
                elif param.grad is None or param.grad.shape != saved.shape:
                    param.grad = saved.to(param.device, copy=True)
                else:
                    param.grad.copy_(saved)
        for name, module in self.model.named_modules():
            if name in self._training:
                module.training = self._training[name]
        if self.optimizer is not None:
            # load_state_dict copies the values (and drops state the detour created); a second
            # restore must not share tensors with the first.
            self.optimizer.load_state_dict(_copy_tensors(self._optimizer, None))
        if self.scaler is not None:
            _set(self.scaler, self._scaler)
            # A step the detour abandoned mid-way (out of memory after unscale_) leaves per-optimizer
            # stages behind that would make the next real step refuse to unscale again.
            getattr(self.scaler, "_per_optimizer_states", {}).clear()
        for obj, state in zip(self.extra, self._extra):
            _set(obj, state)
        set_rng_state(self._rng)


def _named_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers by name (persistent or not: a detour may change either)."""
    return [*model.named_parameters(), *model.named_buffers()]


def _has(obj: Any, *names: str) -> bool:
    return all(callable(getattr(obj, name, None)) for name in names)


def _get(obj: Any) -> Any:
    if _has(obj, "state_dict", "load_state_dict"):
        return _copy_tensors(obj.state_dict(), None)
    return _copy_tensors(obj.get_state(), None)


def _set(obj: Any, state: Any) -> None:
    if _has(obj, "state_dict", "load_state_dict"):
        obj.load_state_dict(_copy_tensors(state, None))
    else:
        obj.set_state(state.clone())


def rng_state() -> dict[str, Any]:
    """Every global random generator's state: torch CPU, CUDA (when initialised), random, numpy."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
