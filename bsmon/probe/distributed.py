"""Multi-process jobs (torchrun, DistributedDataParallel) inside the probe.

Three pieces, described in docs/distributed.md:

* :func:`rank_identity`: which rank this process is, from torch.distributed or torchrun's
  environment. Only global rank 0 records the session and serves monitors.
* :class:`RankReporter`: per-rank step statistics reach rank 0 through the job's own
  rendezvous key-value store, from a background thread, once a second. Every rank sets one
  small key; rank 0 reads them all with one ``multi_get`` and submits a ``ranks`` record.
  Nothing is added to the training thread and no collective is issued.
* :class:`DdpNormHook`: the DistributedDataParallel communication hook that takes each
  gradient bucket's squared norm before the all-reduce (this rank's local gradient) and after
  it (the gradient averaged over the data-parallel group). The norms stay on the device.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

#: Each rank writes its summary, and rank 0 gathers, this often (seconds)...
REPORT_INTERVAL_S = 1.0
#: ...and rank 0 writes a ``ranks`` record at most this often, slower for big jobs
#: (one record a second up to this many ranks) so the session file grows by ~3 kB/s at most.
RANKS_PER_RECORD_SECOND = 64
#: close() waits this long for the reporter thread (a store op may hang if the master died).
JOIN_TIMEOUT_S = 2.0

#: What each rank reports about its recent steps (see RankReporter._report).
SUMMARY_FIELDS = ("step", "dt", "dt95", "busy", "n")
#: One reporter per watch(): every rank of an SPMD job numbers its watch() calls alike, so
#: these numbers keep the keys of successive watches apart without sharing a session id.
_reporter_numbers = itertools.count()


@dataclass(frozen=True)
class RankIdentity:
    rank: int
    world_size: int


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; bsmon reads the rank from it "
                         "(torchrun sets it). Fix or unset it.") from None


def rank_identity() -> RankIdentity:
    """This process's rank: from torch.distributed when initialised, else torchrun's RANK/WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    return RankIdentity(rank=rank, world_size=world_size)


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def is_fsdp(model: nn.Module) -> bool:
    """FullyShardedDataParallel (FSDP1 wrapper or FSDP2 ``fully_shard``), without importing it."""
    return any(cls.__module__.startswith("torch.distributed.fsdp") for cls in type(model).__mro__)


def registered_comm_hooks(ddp: nn.parallel.DistributedDataParallel) -> list[tuple[Callable, Any]]:
    """(hook, state) pairs DDP has accepted (a private list; empty where torch lacks it)."""
    return list(getattr(ddp, "_comm_hooks", ()))


def data_parallel_size(model: nn.Module, world_size: int) -> int:
    """Ranks that split each batch: the DDP process group, else every rank."""
    return model.process_group.size() if is_ddp(model) else world_size


# -- per-rank statistics through the store -------------------------------------------------


@dataclass
class _Seen:
    """What rank 0 last saw of one rank, and when (rank 0's monotonic clock)."""

    seq: int
    step: int | None
    seq_changed: float
    step_changed: float


def _rounded(value: float | None) -> float | None:
    """Six significant digits: enough for a step time, and keeps the ranks record small."""
    return None if value is None else float(f"{value:.6g}")


class RankReporter:
    """Each rank's recent steps, written to the store; on rank 0 also gathered and submitted.

    ``observe`` takes the records the probe publishes (with each flush, usually on the
    training thread between steps: a deque append per step record). A daemon
    thread wakes every ``interval_s``: it sets this rank's key to a JSON summary of the steps
    since its last wake-up, and on rank 0 (``submit`` given) reads every rank's key and
    submits a ``ranks`` record. Ages are measured on rank 0's clock (when a rank's step or
    report counter last changed), so clocks of different nodes never need to agree.
    """

    def __init__(self, identity: RankIdentity, submit: Callable[[dict[str, Any]], None] | None, *,
                 store: dist.Store | None = None, interval_s: float = REPORT_INTERVAL_S,
                 key_prefix: str | None = None, guard: Callable[[Callable], Callable] = lambda f: f) -> None:
        """``store`` defaults to the default process group's; ``key_prefix`` to one per watch();
        ``guard`` wraps the thread (bsmon/probe/guard.py)."""
        self.identity = identity
        self._submit = submit
        self._store = store
        self._interval_s = interval_s
        self._prefix = key_prefix or f"bsmon/watch{next(_reporter_numbers)}/rank"
        self._steps: collections.deque = collections.deque()
        self._summary: dict[str, Any] = dict.fromkeys(SUMMARY_FIELDS)
        self._seq = 0
        self._seen: dict[int, _Seen] = {}
        self._started = time.monotonic()
        self._record_every = max(1, math.ceil(identity.world_size / RANKS_PER_RECORD_SECOND))
        self._ticks = 0
        self._said_unavailable = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=guard(self._run), name="bsmon-ranks", daemon=True)
        self._thread.start()

    def observe(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            if record["k"] == "step":
                self._steps.append((record["step"], record["dt"], record.get("busy"), record["n"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)

    def key(self, rank: int) -> str:
        return f"{self._prefix}{rank}"

    # -- background thread ----------------------------------------------------
    def _run(self) -> None:
        """Report every interval, and once more on close() so a short job still reports."""
        while True:
            stopping = self._stop.wait(self._interval_s)
            if not self._tick() or stopping:
                return

    def _tick(self) -> bool:
        """One report (and on rank 0 one gather); False once the store has failed."""
        store = self._store or self._default_store()
        if store is None:
            return True
        try:
            store.set(self.key(self.identity.rank), json.dumps(self._report()))
            self._ticks += 1
            if self._submit is not None and (self._ticks % self._record_every == 0 or self._stop.is_set()):
                self._submit(self._gather(store))
        except Exception as exc:  # the store's errors have no common type; the job must not see them
            self._event("warning", f"per-rank statistics stopped: the job's key-value store failed "
                                   f"({type(exc).__name__}: {exc}).")
            return False
        return True

    def _default_store(self) -> dist.Store | None:
        if dist.is_available() and dist.is_initialized():
            try:
                self._store = dist.distributed_c10d._get_default_store()
                return self._store
            except (AttributeError, RuntimeError, ValueError) as exc:
                why = f"the default process group has no key-value store ({exc})"
        else:
            why = "torch.distributed is not initialised (call bsmon.watch() after init_process_group)"
        if not self._said_unavailable:
            self._said_unavailable = True
            self._event("warning", f"per-rank statistics unavailable: {why}. Only rank 0's own steps are shown.")
        return None

    def _event(self, level: str, message: str) -> None:
        if self._submit is not None:
            self._submit({"k": "event", "t": time.time(), "level": level, "msg": message})

    def _report(self) -> dict[str, Any]:
        """This rank's summary: latest step, and step times since the last report (else the previous ones)."""
        steps = [self._steps.popleft() for _ in range(len(self._steps))]
        if steps:
            dts = np.array([dt for _, dt, _, _ in steps])
            busy = [b for _, _, b, _ in steps if b is not None]
            self._summary = {"step": steps[-1][0], "dt": _rounded(float(np.median(dts))),
                             "dt95": _rounded(float(np.percentile(dts, 95))),
                             "busy": _rounded(float(np.median(busy))) if busy else None, "n": steps[-1][3]}
        self._seq += 1
        return {**self._summary, "seq": self._seq}

    def _gather(self, store: dist.Store) -> dict[str, Any]:
        """The ``ranks`` record: every rank's latest summary and its ages on this clock.

        ``multi_get`` would wait for a key that does not exist yet, so a rank is read only
        once ``check`` has seen its key.
        """
        world_size = self.identity.world_size
        for rank in range(world_size):
            if rank not in self._seen and store.check([self.key(rank)]):
                self._seen[rank] = _Seen(seq=-1, step=None, seq_changed=0.0, step_changed=time.monotonic())
        known = sorted(self._seen)
        values = store.multi_get([self.key(rank) for rank in known]) if known else []
        now = time.monotonic()
        payloads: dict[int, dict[str, Any]] = {}
        for rank, raw in zip(known, values):
            payload = json.loads(raw)
            payloads[rank] = payload
            seen = self._seen[rank]
            if payload["seq"] != seen.seq:
                seen.seq, seen.seq_changed = payload["seq"], now
            if payload["step"] != seen.step:
                seen.step, seen.step_changed = payload["step"], now
        columns: dict[str, list] = {name: [] for name in (*SUMMARY_FIELDS, "since_step", "since_report")}
        unknown = dict.fromkeys(SUMMARY_FIELDS)
        for rank in range(world_size):
            payload, seen = payloads.get(rank, unknown), self._seen.get(rank)
            for name in SUMMARY_FIELDS:
                columns[name].append(payload[name])
            columns["since_report"].append(_rounded(now - (seen.seq_changed if seen else self._started)))
            columns["since_step"].append(_rounded(now - (seen.step_changed if seen else self._started)))
        return {"k": "ranks", "t": time.time(), "world_size": world_size, **columns}


# -- the data-parallel noise measurement ---------------------------------------------------


def _sq_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm as a float32 scalar; half precision is accumulated in float32 (no copy)."""
    wide = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(tensor, dtype=wide).square().float()


def _scaled_sq_norm(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum(scale * tensor^2) as a float32 scalar."""
    return torch.dot(tensor.float().square(), scale)


class DdpNormHook:
    """DDP communication hook: squared norm of each bucket before and after the inner hook.

    The inner hook does the all-reduce: DDP's standard ``allreduce_hook``, or the user's hook
    when it is registered after ``bsmon.watch()`` (``register_comm_hook`` on this DDP instance
    is redirected here, because DDP accepts one hook only). Before the inner hook the bucket
    holds this rank's local gradient; the inner hook's result is the gradient averaged over
    the data-parallel group. Both norms are device tensors collected per bucket; the step
    sums them. When inactive (after ``close()``) the hook only calls the inner hook.

    With ``rescale`` (bsmon/probe/precond.py: the optimizer's P^2 of a list of parameters) it
    also takes both norms in the optimizer's geometry, |P * bucket|^2: the bucket is its
    parameters' gradients flattened one after another, so P^2 of those parameters, flattened
    the same way, weights it element by element.

    The all-reduce is the training's, so it runs whatever happens to the measurement: the
    measuring parts run behind the monitor's guard (:meth:`use_guard`), and a bsmon bug there
    (or any time after) leaves just the inner hook, its result untouched.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel,
                 rescale: Callable[[list[nn.Parameter]], list[torch.Tensor] | None] | None = None) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._ddp_check = ddp._check_comm_hook
        self._inner: tuple[Callable, Any] = (allreduce_hook, ddp.process_group)
        self._user_hook = False
        self.active = True
        self.spent_s = 0.0  # host seconds spent measuring, for the probe's cost budget
        self._local: list[torch.Tensor] = []
        self._averaged: list[torch.Tensor] = []
        self.rescale = rescale
        # per bucket, in P's geometry: the local norm (None: no P for it) and the averaged one
        self._local_rescaled: list[torch.Tensor | None] = []
        self._averaged_rescaled: list[torch.Tensor] = []
        #: the last take()'s [local, averaged] squared norms of P * gradient; None without ``rescale``
        #: or where a bucket's parameters have no second moment yet
        self.rescaled: torch.Tensor | None = None
        self._fired = False
        self.use_guard(lambda measure: measure)  # until watch() gives its guard
        ddp.register_comm_hook(None, self.hook)
        ddp.register_comm_hook = self.register_inner  # this instance only

    @classmethod
    def of(cls, ddp: nn.parallel.DistributedDataParallel) -> "DdpNormHook | None":
        """The DdpNormHook registered on ``ddp`` by an earlier watch(), if any."""
        for hook, _ in registered_comm_hooks(ddp):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, cls):
                return owner
        return None

    def use_guard(self, guard: Callable[[Callable], Callable]) -> None:
        """Measure behind ``guard`` (bsmon/probe/guard.py): the current watch()'s; a DDP model keeps
        its hook from one watch() to the next."""
        self._measure_local = guard(self._measure_local_norm)
        self._measure_averaged = guard(self._measure_averaged_norm)

    def register_inner(self, state: object, hook: Callable) -> None:
        """``ddp.register_comm_hook`` after watch(): the user's hook runs inside bsmon's."""
        if self._user_hook:
            raise RuntimeError("register_comm_hook can only be called once (bsmon runs the first "
                               "hook registered after bsmon.watch() inside its own)")
        self._ddp_check(hook)
        self._inner = (hook, state)
        self._user_hook = True

    @property
    def inner_name(self) -> str:
        return getattr(self._inner[0], "__qualname__", type(self._inner[0]).__name__)

    def hook(self, state, bucket):  # no annotations: DDP compares them with the real types, not strings
        """Measure ``bucket`` and hand it to the inner hook (only hand it on when inactive, or
        when the guard returned None: measuring failed, now or before)."""
        inner, inner_state = self._inner
        after_reduce = self._measure_local(bucket) if self.active else None
        if after_reduce is None:
            return inner(inner_state, bucket)
        return inner(inner_state, bucket).then(after_reduce)

    def _measure_local_norm(self, bucket) -> Callable[[torch.futures.Future], Any]:
        """This rank's norms of ``bucket``; returns the callback that measures the averaged one."""
        start = time.perf_counter()
        local = bucket.buffer()
        self._local.append(_sq_norm(local))  # before the inner hook: it may divide in place
        scale = self._bucket_scale(bucket, local) if self.rescale is not None else None
        self._local_rescaled.append(None if scale is None else _scaled_sq_norm(local, scale))
        self._fired = True
        self.spent_s += time.perf_counter() - start
        return functools.partial(self._after_reduce, scale)

    def _bucket_scale(self, bucket, buffer: torch.Tensor) -> torch.Tensor | None:
        """P^2 of the bucket's parameters, flattened as the bucket lays out their gradients."""
        squares = self.rescale(bucket.parameters())
        if squares is None:
            return None
        scale = torch.cat([s.reshape(-1).to(buffer.device, torch.float32) for s in squares])
        return scale if scale.numel() == buffer.numel() else None  # else a layout this reading does not know

    def _after_reduce(self, scale: torch.Tensor | None, future: torch.futures.Future) -> Any:
        value = future.value()  # a failed all-reduce raises here, for DDP to report, as without bsmon
        self._measure_averaged(value if isinstance(value, torch.Tensor) else value[0], scale)
        return value

    def _measure_averaged_norm(self, averaged: torch.Tensor, scale: torch.Tensor | None) -> None:
        start = time.perf_counter()
        self._averaged.append(_sq_norm(averaged))
        if scale is not None:
            self._averaged_rescaled.append(_scaled_sq_norm(averaged, scale))
        self.spent_s += time.perf_counter() - start

    def synced(self) -> bool:
        """True when buckets went through the hook since the previous call (a synchronising pass)."""
        fired, self._fired = self._fired, False
        return fired

    def take(self) -> torch.Tensor | None:
        """[local, averaged] squared norms summed over this step's buckets, or None if none synced.

        Call after DDP has finished the backward pass: DDP waits for every bucket's future,
        so every ``_after_reduce`` has run by then.
        """
        local, averaged = self._local, self._averaged
        local_rescaled, averaged_rescaled = self._local_rescaled, self._averaged_rescaled
        self._local, self._averaged, self._local_rescaled, self._averaged_rescaled = [], [], [], []
        self.rescaled = None
        if not local or len(local) != len(averaged):
            return None
        if local_rescaled and all(r is not None for r in local_rescaled) and len(averaged_rescaled) == len(local):
            self.rescaled = torch.stack([torch.stack(local_rescaled).sum(), torch.stack(averaged_rescaled).sum()])
        return torch.stack(local + averaged).view(2, -1).sum(1)
