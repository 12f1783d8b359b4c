"""Reading small device tensors on the host without stalling the training thread."""

from __future__ import annotations

import torch


class Deferred:
    """A 1-D float tensor whose values are read on the host later, without a sync.

    On CUDA the training thread only queues an asynchronous copy into pinned
    host memory and records an event; the values are read once the event has
    completed (:meth:`ready`), or by the publisher's background thread, which may
    wait on it outside the GIL. CPU tensors are simply kept (their values exist).
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
            # Other accelerators: tolist() waits, so only the background thread reads them.
            self._host = tensor
            self._ready = None

    def ready(self) -> bool:
        """Whether :meth:`values` would return without waiting for the device."""
        if self._ready is not None:
            return self._ready.query()
        return self._host.device.type == "cpu"

    def values(self) -> list[float] | dict[str, float]:
        if self._ready is not None:
            self._ready.synchronize()
        values = self._host.tolist()
        if self._names is None:
            return values
        return {**(self._known or {}), **dict(zip(self._names, values))}


class DeferredElapsed:
    """Seconds from one CUDA event to each of several later ones, read once they have completed.

    The training thread only records events on the device's stream (no sync); like
    :class:`Deferred`, :meth:`ready` asks without waiting and :meth:`values` may wait (the
    publisher's background thread).
    """

    __slots__ = ("_start", "_marks")

    def __init__(self, start: torch.cuda.Event, marks: list[torch.cuda.Event]) -> None:
        self._start = start
        self._marks = marks

    def ready(self) -> bool:
        return self._marks[-1].query()

    def values(self) -> list[float]:
        self._marks[-1].synchronize()
        return [round(self._start.elapsed_time(mark) / 1e3, 6) for mark in self._marks]


def resolve(record: dict, *, wait: bool = True) -> bool:
    """Replace Deferred values (at any depth) in ``record`` by their host values.

    Without ``wait``, a value still on its way from the device is left in place and
    the result is False; call again later. True once the record holds no Deferred.
    """
    complete = True
    for key, value in record.items():
        if isinstance(value, (Deferred, DeferredElapsed)):
            if wait or value.ready():
                record[key] = value.values()
            else:
                complete = False
        elif isinstance(value, dict):
            complete = resolve(value, wait=wait) and complete
    return complete
