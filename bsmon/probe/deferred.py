"""Reading small device tensors on the host without stalling the training thread."""

from __future__ import annotations

import torch


class Deferred:
    """A 1-D float tensor whose values the background thread reads later.

    On CUDA the training thread only queues an asynchronous copy into pinned
    host memory and records an event; the background thread waits on that event
    (outside the GIL) before reading. No host-device synchronisation is added
    to the step. CPU tensors are simply kept (their values already exist).
    """

    __slots__ = ("_host", "_ready", "_names", "_known")

    def __init__(self, tensor: torch.Tensor, names: list[str] | None = None,
                 known: dict[str, float] | None = None) -> None:
        """With ``names``, :meth:`values` gives a dict (``known`` values merged in)."""
        self._names = names
        self._known = known
        tensor = tensor.detach().reshape(-1).float()
        if tensor.device.type == "cuda":
            self._host = tensor.to("cpu", non_blocking=True)
            self._ready: torch.cuda.Event | None = torch.cuda.Event()
            self._ready.record()
        else:
            # Other accelerators: the background thread's tolist() does the wait.
            self._host = tensor
            self._ready = None

    def values(self) -> list[float] | dict[str, float]:
        if self._ready is not None:
            self._ready.synchronize()
        values = self._host.tolist()
        if self._names is None:
            return values
        return {**(self._known or {}), **dict(zip(self._names, values))}


def resolve(record: dict) -> dict:
    """Replace Deferred values (at any depth) in a record by their host values."""
    for key, value in record.items():
        if isinstance(value, Deferred):
            record[key] = value.values()
        elif isinstance(value, dict):
            resolve(value)
    return record
