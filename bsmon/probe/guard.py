"""One guard for every hook and background thread: a bug in bsmon never reaches the training.

Each hook (and each thread's main function) is wrapped once, where it is registered. The
wrapper costs one attribute check and one extra call; a ``try`` costs nothing until it
raises. The first unexpected exception trips the guard:

* every guarded hook returns at once from then on (returning None leaves the forward's
  inputs, outputs and gradients untouched), so bsmon is off for the rest of the job;
* ``on_failure(where, traceback)`` runs once, to record an event in the session and warn.

The methods the user calls (``Monitor.log()``, ``stats()``, ...) are guarded too
(:func:`guarded_method`): once the guard has tripped they return their fallback (nothing,
or numbers that say bsmon is off) instead of raising into the training loop.

Hooks are not removed when the guard trips, because the failure may happen while PyTorch
iterates over the very dict that holds them; ``Monitor.close()`` removes them later.
KeyboardInterrupt and SystemExit are not bsmon bugs and pass through.
"""

from __future__ import annotations

import functools
import threading
import traceback
from typing import Any, Callable


class Guard:
    def __init__(self, on_failure: Callable[[str, str], None]) -> None:
        self.tripped = False
        self._on_failure = on_failure
        self._lock = threading.Lock()

    def __call__(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook``, guarded."""
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.tripped:
                return None
            try:
                return hook(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the point of the guard
                self.trip(_name(hook), exc)
                return None

        guarded.__wrapped__ = hook
        return guarded

    def trip(self, where: str, exc: BaseException) -> None:
        """Turn bsmon off after ``exc`` in ``where``; only the first call reports."""
        with self._lock:
            if self.tripped:
                return
            self.tripped = True
        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            self._on_failure(where, details)
        except Exception:  # noqa: BLE001 - reporting must not become the second bug
            pass


def guarded_method(fallback: Callable[[Any], Any] = lambda owner: None) -> Callable[[Callable], Callable]:
    """Decorator: a public method of an object with a ``_guard`` (the user calls it, not PyTorch),
    behind that guard. A bsmon bug in it trips the guard; that call and every later one return
    ``fallback(owner)``."""
    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def guarded(owner: Any, *args: Any, **kwargs: Any) -> Any:
            guard = owner._guard
            if guard.tripped:
                return fallback(owner)
            try:
                return method(owner, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the point of the guard
                guard.trip(method.__qualname__, exc)
                return fallback(owner)
        return guarded
    return decorate


def _name(hook: Callable[..., Any]) -> str:
    """``Monitor._on_step``; a ``functools.partial`` by the function it binds."""
    function = getattr(hook, "func", hook)
    return getattr(function, "__qualname__", type(function).__name__)
