"""The in-job probe: hooks that time steps and count samples, and the Monitor handle.

Hot path, per training step, on the training thread:

* a forward pre-hook on the model reads the first dimension of the first
  tensor argument (samples of this micro-batch) and marks the micro-batch's
  start, and an optimizer step pre-hook marks the optimizer's (a perf_counter
  each, or a CUDA event for a model on a GPU: bsmon/probe/phases.py); a forward
  hook notes that the forward returned;
* a post-accumulate-grad hook on one parameter (the sentinel) counts the
  backward passes that reached it. A forward that starts while the sentinel's
  .grad is None although a pass reached it since the last optimizer step, or
  after a forward that never returned (it raised), begins a new attempt: the
  micro-batches before it never reach an optimizer step (a GradScaler overflow
  skipped optimizer.step(), a retry after an exception, or zero_grad() between
  micro-batches). They are recorded as skipped, not merged into the next step
  (docs/noise-scale.md, "Steps are steps");
* on steps the noise estimator measures (and in a multi-process job, on one
  step every 50 ms at most), the forward hook puts a gradient hook on the output,
  which queues one callback on the autograd engine: that callback marks the end
  of each backward pass and takes the gradient norms the noise estimator needs;
* an optimizer step post-hook closes the step and queues one record; every
  0.25 s it also encodes the queued records and hands them to the publisher's
  background thread, which writes and streams them (bsmon/probe/publisher.py).

Nothing here waits for the monitor, the disk or the device.

In a multi-process job only global rank 0 records the session and serves
monitors; every rank runs the hooks, and a background thread per rank reports
its steps to rank 0 through the job's key-value store (docs/distributed.md).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import getpass
import json
import numbers
import os
import pickle
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bsmon import store, wire
from bsmon.model import SessionModel, Stats, tracker_metrics
from bsmon.probe import distributed
from bsmon.probe.deferred import Deferred
from bsmon.probe.entry import EntryFinder, first_batch_dim
from bsmon.probe.flops import FlopCounter
from bsmon.probe.guard import Guard, guarded_method
from bsmon.probe.noise import MEASURE_BUDGET, NoiseProbe, check_mode
from bsmon.probe.per_example import is_compiling
from bsmon.probe.phases import StepPhases
from bsmon.probe.precond import second_moment_groups
from bsmon.probe.publisher import Publisher
from bsmon.stats.units import UNITS

#: watch(noise_geometry=...): which noise scale drives the advice (see SessionModel.noise_geometry).
NOISE_GEOMETRIES = ("auto", "sgd", "optimizer")

#: A multi-process job times "busy" (until this rank's gradients were ready) on a step at most
#: this often: the per-rank summary is a median over a second, and each timed step costs hooks.
BUSY_SAMPLE_INTERVAL_S = 0.05
#: The job's own model ingests published records when stats() asks, or once this many wait.
#: In batches the ingest runs warm, several times cheaper per record than a flush at a time.
INGEST_BATCH = 1024
#: The end of a traceback kept in the session's error event (the frame limit is far above it).
TRACEBACK_CHARS = 20000
#: stats() recomputes at most this often while the job runs: a computation takes about 0.5 ms
#: on a CPU, so a loop that asks every step (recommended_batch_size()) pays for four a second.
STATS_REFRESH_S = 0.25
#: Why stats() has no numbers once a bsmon bug has turned the monitor off (bsmon/probe/guard.py).
OFF_REASON = "bsmon turned itself off after an internal error (the session's events have the traceback)"
#: Training libraries named in the hello when the job has imported them: the session model words
#: its advice for them (e.g. gradient_accumulation_steps for a Hugging Face Trainer).
FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "accelerate")

ENTRY_FOUND = (
    "the watched model's forward did not run before optimizer step {step} (a training step that calls "
    "a submodule, such as Lightning's training_step calling self.net(x)): bsmon counts samples, "
    "micro-batches and backward passes at '{name}' ({kind}), the first submodule with trainable "
    "parameters that ran. If it runs more than once per micro-batch, pass batch_size= to bsmon.watch()")
ENTRY_MISSING = (
    "neither the watched model nor any of its trainable submodules ran a training forward before "
    "optimizer step {step}: bsmon cannot count samples or find the backward passes. Pass bsmon.watch() "
    "the module that is trained with this optimizer")

_active_lock = threading.Lock()
_active: "Monitor | None" = None


class BsmonWarning(UserWarning):
    """Something bsmon could not do; training is unaffected."""


def session_name(name: str | None) -> str:
    """The session's name, first given of: ``bsmon run --name`` (``$BSMON_RUN_NAME``),
    ``watch(name=)``, ``$BSMON_NAME``, the script's file name (docs/cli.md)."""
    return (os.environ.get(store.RUN_NAME_ENV) or name or os.environ.get("BSMON_NAME")
            or Path(sys.argv[0] or "python").stem or "job")


def active_monitor() -> "Monitor | None":
    """The Monitor of this process, if ``bsmon.watch()`` is active."""
    return _active


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper: accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``, or any object holding it as ``.optimizer``.

    A wrapper's ``step()`` calls the inner optimizer's, so hooking the inner one sees
    every real step (and not one that accelerate's GradScaler skips). An optimizer is
    taken as it is once it is a fully initialised torch optimizer (AcceleratedOptimizer
    subclasses Optimizer without initialising it, so it has no hook registry).
    """
    found = optimizer
    for _ in range(8):  # wrappers of wrappers; a cycle ends here
        if isinstance(found, torch.optim.Optimizer) and hasattr(found, "_optimizer_step_post_hooks"):
            return found
        inner = getattr(found, "optimizer", None)
        if inner is None or inner is found:
            break
        found = inner
    raise TypeError(f"bsmon.watch(..., optimizer) needs a torch.optim.Optimizer, or a wrapper that holds one "
                    f"as .optimizer (accelerate, Lightning); got {type(optimizer).__name__}")


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """Tensors in a forward's output that will receive a gradient."""
    if isinstance(output, torch.Tensor):
        return [output] if output.requires_grad else []
    if isinstance(output, dict):
        items = output.values()
    elif isinstance(output, (list, tuple)):
        items = output
    elif dataclasses.is_dataclass(output):
        items = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return []
    return [t for item in items for t in _output_tensors(item)]


def _model_device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


def _device_info(model: nn.Module) -> list[dict[str, Any]]:
    """The CUDA devices holding the model's parameters (no CUDA initialisation otherwise)."""
    indices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    devices = []
    for index in indices:
        props = torch.cuda.get_device_properties(index)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid and not uuid.startswith(("GPU-", "MIG-")):
            uuid = f"GPU-{uuid}"
        devices.append({"index": index, "uuid": uuid or None, "name": props.name,
                        "total_memory": props.total_memory})
    return devices


def _pid_namespace() -> str | None:
    """This process's PID namespace, 'pid:[<inode>]': the monitor's GPU sampler matches the job's
    PID only within the same namespace (bsmon.gpu.processes, which the probe must not import)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


class Monitor:
    """Handle returned by :func:`bsmon.watch`. Use ``close()`` or a ``with`` block.

    ``session_id`` is None on ranks > 0 of a job not started by ``bsmon run``: rank 0
    names and records the session. ``stats()`` gives this rank's own numbers.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        """All or nothing: a set-up that raises undoes what it had done (hooks, threads, socket,
        session files, excepthook, atexit handler) before the exception reaches the caller."""
        # What _remove_hooks() and _undo_set_up() look at, in place before _set_up() creates any of it.
        self._writer: store.RecordWriter | None = None
        self._publisher: Publisher | None = None
        self._noise: NoiseProbe | None = None
        self._ranks: distributed.RankReporter | None = None
        self._flops: FlopCounter | None = None
        self._handles: list = []
        self._entry_hooks: list = []
        self._finder: EntryFinder | None = None
        self._idle_finder: EntryFinder | None = None  # under torch.compile, removed at close()
        self._grad_hooks: list = []
        self._sentinel: nn.Parameter | None = None
        self._sentinel_hook = None
        try:
            self._set_up(model, optimizer, **options)
        except BaseException:
            self._undo_set_up()
            raise

    def _set_up(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, batch_size: int | None,
                unit: str, tokens_per_sample: int | None, name: str | None, noise: str | None,
                layers: str | tuple[type, ...], horizon_samples: float | None,
                profile: dict[str, Any] | None, noise_budget: float,
                mixes_samples: tuple[type, ...] = (), flops_per_sample: float | None = None,
                noise_geometry: str = "auto") -> None:
        self._model = model  # the watched model; samples are counted at self._entry (it or a submodule)
        self._optimizer = optimizer
        self._fixed_batch = batch_size
        self._step = 0
        self._micro_sizes: list[int] = []
        self._step_started: float | None = None
        self._last_step_end: float | None = None
        self._backward_end = 0.0
        self._busy_timed = -BUSY_SAMPLE_INTERVAL_S  # when a step last recorded "busy"
        self._backward_queued = False
        self._mid_iteration = False
        self._forward_open = False  # a forward started and has not returned (yet, or ever: it raised)
        self._skipped: list[dict[str, Any]] = []  # attempts abandoned since the last step
        self._sentinel_passes = 0  # backward passes that reached the sentinel since the last step or clear
        self._rejected_names: set[str] = set()
        self._closed = False
        self._paused = False
        self._step_depth = 0  # optimizer.step() calls under way (nested: a subclass calling super().step())
        self._phases = StepPhases(_model_device(model))
        self._state_lock = threading.Lock()
        self._latest = Stats(unit=unit)
        self._unread: list[dict] = []  # published, not yet ingested into _model_state
        self._unread_end = 0  # the stream's bytes up to the end of the last record published
        self._ingested_end = 0  # ... and of the last one ingested into _model_state
        self._stale = False  # ingested records newer than _latest
        self._latest_at = -STATS_REFRESH_S  # monotonic time _latest was last brought up to date
        self._guard = Guard(self._on_internal_error)  # wraps every hook and thread below

        home = store.bsmon_home()
        identity = distributed.rank_identity()
        leader = identity.rank == 0
        self.session_id = os.environ.get("BSMON_SESSION_ID") or (store.new_session_id() if leader else None)
        self.name = session_name(name)
        # Rank 0 records the session, so only it counts FLOPs (ranks run the same model).
        self._flops = FlopCounter(model, flops_per_sample) if leader else None
        writer = self._writer = self._open_record(home) if leader else None
        socket_path = self._socket_path(home) if leader else None
        command = json.loads(os.environ["BSMON_COMMAND"]) if os.environ.get("BSMON_COMMAND") else list(sys.orig_argv)
        hello = {
            "k": "hello", "v": wire.PROTOCOL_VERSION, "session": self.session_id, "name": self.name,
            "pid": os.getpid(), "t0": time.time(), "command": command, "host": socket.gethostname(),
            "user": getpass.getuser(), "python": sys.version.split()[0], "torch": str(torch.__version__),
            "devices": _device_info(model), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"), "pid_namespace": _pid_namespace(),
            "world_size": identity.world_size, "rank": identity.rank,
            "data_parallel": distributed.data_parallel_size(model, identity.world_size),
            "unit": unit, "tokens_per_sample": tokens_per_sample,
            "batch_size": batch_size, "noise_mode": noise, "horizon_samples": horizon_samples,
            "optimizer": type(optimizer).__name__, "noise_geometry": noise_geometry,
            "socket": socket_path, "frameworks": [name for name in FRAMEWORKS if name in sys.modules],
            **(self._flops.hello_fields if self._flops else {}),
        }
        # The job's own model: stats(), the summary's figures, and (with the charts' history) the
        # checkpoint a late monitor starts from (bsmon/checkpoint.py).
        self._model_state = SessionModel(keep_history=writer is not None, horizon_samples=horizon_samples)
        self._model_state.ingest(hello)
        self._publisher = Publisher(hello, writer, socket_path, self._on_published, guard=self._guard,
                                    summary_figures=self._summary_figures, pickled_model=self._pickled_model)
        if writer is not None and writer.error is not None:
            self._warn(f"cannot record the session in {writer.path.parent}: {writer.error}. "
                       "Training continues; attach a monitor to watch it live.")
        self._noise = NoiseProbe(model, optimizer, noise, layers, self._publisher.submit, noise_budget,
                                 mixes_samples=mixes_samples, guard=self._guard)
        self._ranks = (distributed.RankReporter(identity, self._publisher.submit if leader else None,
                                                guard=self._guard)
                       if identity.world_size > 1 else None)

        if profile is not None:
            self.record_profile(profile)
        self._entry = model  # where samples are counted: the model, or the submodule a step calls
        self._entry_hooks = self._hook_entry(model)
        self._finder = EntryFinder(model, self._guard)  # until the model's forward runs
        self._forward_ran = False
        self._entry_missing_warned = False
        # One at a time, so a failed set-up knows each hook to remove.
        self._handles.append(optimizer.register_step_pre_hook(self._guard(self._on_step_pre)))
        self._handles.append(optimizer.register_step_post_hook(self._guard(self._on_step)))
        self._compiled = False  # the model's forward has run under torch.compile
        self._compiled_size: int | None = None  # samples in the last compiled forward
        self._trainable = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._guarded_output_grad = self._guard(self._on_output_grad)  # wrapped once, used every measured step
        self._guarded_backward_end = self._guard(self._on_backward_end)
        self._sentinel_checked = False
        self._watch_sentinel(self._trainable[-1:])
        self._follow_backward = False
        self._follow_backward_ends(time.perf_counter())
        self._previous_excepthook = sys.excepthook
        self._failure: str | None = None
        sys.excepthook = self._excepthook
        atexit.register(self._atexit)

    def _remove_hooks(self) -> None:
        """Every hook on the model, its parameters and the optimizer (close(), or a failed set-up)."""
        for handle in [*self._handles, *self._entry_hooks]:
            handle.remove()
        self._handles, self._entry_hooks = [], []
        for finder in (self._finder, self._idle_finder):
            if finder is not None:
                finder.remove()
        self._finder = self._idle_finder = None
        self._remove_grad_hooks()
        self._watch_sentinel([])

    def _undo_set_up(self) -> None:
        """Remove whatever a failed ``_set_up()`` had put in place, in reverse order."""
        self._unregister()
        self._remove_hooks()
        if self._flops is not None:
            self._flops.close()
        if self._ranks is not None:
            self._ranks.close()
        if self._noise is not None:
            self._noise.close()
        if self._publisher is not None:
            self._publisher.close({"k": "bye", "t": time.time(), "status": "failed", "code": None,
                                   "error": "bsmon.watch() failed"})
        if self._writer is not None:
            self._writer.close()
            try:
                self._writer.path.unlink(missing_ok=True)
                (self._writer.path.parent / store.SUMMARY_FILE).unlink(missing_ok=True)
                self._writer.path.parent.rmdir()  # only if empty: `bsmon run` keeps output.log there
            except OSError:
                pass

    # -- set-up helpers -------------------------------------------------------
    def _open_record(self, home: Path) -> store.RecordWriter | None:
        directory = store.sessions_dir(home) / self.session_id
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._warn(f"cannot record the session under {home}: {exc}. "
                       "Training continues; set BSMON_HOME to a writable directory to record it.")
            return None
        path = directory / store.RECORDS_FILE
        if path.exists() and path.stat().st_size:
            # Another process already records under this id (two watched processes under one
            # `bsmon run`; never a second rank, which records nothing); keep both.
            self.session_id = f"{self.session_id}-{os.getpid()}"
            return self._open_record(home)
        return store.RecordWriter(path)

    def _socket_path(self, home: Path) -> str | None:
        try:
            return str(store.socket_dir(home) / f"{self.session_id}.sock")
        except OSError as exc:
            self._warn(f"cannot create the socket directory: {exc}. Monitors cannot attach live.")
            return None

    def _warn(self, message: str) -> None:
        warnings.warn(f"bsmon: {message}", BsmonWarning, stacklevel=4)

    def _on_internal_error(self, where: str, details: str) -> None:
        """The guard tripped (once): say so on stderr and in the session; the hooks are already off."""
        last_line = details.strip().splitlines()[-1]
        message = (f"internal error in {where} ({last_line}): bsmon turned itself off for the rest of this job; "
                   "training continues unchanged. This is a bug in bsmon: please report it with the traceback "
                   "recorded in the session.")
        print(f"bsmon: {message}", file=sys.stderr, flush=True)
        self._publisher.report({"k": "event", "t": time.time(), "level": "error", "msg": message,
                                "traceback": details[-TRACEBACK_CHARS:]})

    # -- the sentinel: which forwards start a new attempt ---------------------------
    def _watch_sentinel(self, candidates: list[nn.Parameter]) -> None:
        """Count backward passes reaching the last of ``candidates``. The optimizer's last parameter
        is usually the output layer's, among the first a backward computes: a backward that fails
        part-way has most likely reached it already."""
        if self._sentinel_hook is not None:
            self._sentinel_hook.remove()
            self._sentinel_hook = self._sentinel = None
        if candidates and hasattr(candidates[-1], "register_post_accumulate_grad_hook"):
            self._sentinel = candidates[-1]
            self._sentinel_hook = self._sentinel.register_post_accumulate_grad_hook(
                self._guard(self._on_sentinel_grad))

    def _on_sentinel_grad(self, param: torch.Tensor) -> None:
        self._sentinel_passes += 1
        if self._compiled and not self._grad_hooks and self._compiled_size is not None:
            # The first compiled step: its forwards ran traced, and the gradient hooks that count
            # backward passes (_follow_backward_ends) come only at its end. This hook runs outside
            # the graph once per backward pass, so it counts them until then.
            self._micro_sizes.append(self._compiled_size)

    def _check_sentinel(self) -> None:
        """At the first step: a sentinel without a gradient (unused, frozen path) would never see a
        clear, so watch the last parameter that has one."""
        self._sentinel_checked = True
        if self._sentinel is not None and self._sentinel.grad is None:
            self._watch_sentinel([p for p in self._trainable if p.grad is not None])

    def _abandon(self, why: str, micro_sizes: list[int]) -> None:
        """Record micro-batches whose gradients never reach an optimizer step as one skipped attempt."""
        self._skipped.append({"n": sum(micro_sizes), "mb": len(micro_sizes), "why": why})

    def _hook_entry(self, module: nn.Module) -> list:
        """Hook the module where samples are counted: each forward's start and return."""
        return [module.register_forward_pre_hook(self._guard(self._on_forward_pre), with_kwargs=True),
                module.register_forward_hook(self._guard(self._on_forward))]

    # -- hooks (training thread) ----------------------------------------------
    def _on_forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._step_depth = 0  # a forward runs: no optimizer step is under way (one that raised never ended)
        if self._paused or not (module.training and torch.is_grad_enabled()):
            return
        size = first_batch_dim(args, kwargs)
        self._mid_iteration = True
        self._forward_ran = True
        if is_compiling():
            # Traced into a compiled graph: dynamo replays attribute stores after each call
            # without a graph break (time.perf_counter() would break it), but it guards on a
            # list's length, so appending here would recompile for each micro-batch of a step.
            # The size is appended when the backward pass ends (_on_backward_end).
            self._compiled = True
            self._compiled_size = size
            return
        if self._finder is not None:  # the watched forward runs: no entry to look for
            self._finder.remove()
            self._finder = None
        cleared = self._sentinel_passes > 0 and self._sentinel is not None and self._sentinel.grad is None
        if self._forward_open and self._micro_sizes and self._sentinel_passes and not cleared:
            # The last forward raised and the job retries it inside the accumulation: only it is lost.
            self._abandon("raised", [self._micro_sizes.pop()])
        elif (self._forward_open or cleared) and self._micro_sizes:
            # Gradients cleared without an optimizer step, or the attempt raised: none of it trains.
            self._abandon("raised" if self._forward_open else "cleared", self._micro_sizes)
            self._micro_sizes = []
            self._sentinel_passes = 0
            self._noise.discard()
        self._forward_open = True
        if self._step_started is None:
            self._step_started = time.perf_counter()
        self._phases.forward()
        flops = self._flops
        if not self._micro_sizes and flops is not None and not flops.off and size not in flops.counted:
            flops.start(size, measured=self._noise.measuring)  # the step's first forward, at a new size
        if size is not None:
            self._micro_sizes.append(size)

    def _follow_backward_ends(self, now: float) -> None:
        """Hook the model's outputs, to catch each backward pass's end, only for the next step
        that needs it (a measured step, or a step that times a multi-process job's busy time):
        other steps pay one flag test."""
        self._follow_backward = self._noise.measuring or (
            self._ranks is not None and now - self._busy_timed >= BUSY_SAMPLE_INTERVAL_S)
        if self._compiled and not self._grad_hooks:
            # Under torch.compile the output hook's work is traced away. Hooks on the parameters'
            # accumulated gradients run outside the graph and recompile nothing; they stay, as
            # each backward's end counts a micro-batch.
            self._grad_hooks = [p.register_post_accumulate_grad_hook(self._guard(self._on_param_grad))
                                for p in self._trainable]

    def _remove_grad_hooks(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []

    def _on_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._paused or is_compiling():
            return
        self._forward_open = False
        if not self._follow_backward or self._compiled or not (module.training and torch.is_grad_enabled()):
            return
        start = time.perf_counter()
        for tensor in _output_tensors(output):
            tensor.register_hook(self._guarded_output_grad)
        if self._noise.measuring:
            self._noise.charge(time.perf_counter() - start)

    def _on_param_grad(self, param: torch.Tensor) -> None:
        self._on_output_grad(None)

    def _on_output_grad(self, grad: torch.Tensor | None) -> None:
        if not self._backward_queued:
            self._backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._guarded_backward_end)

    def _on_backward_end(self) -> None:
        self._backward_queued = False
        if self._compiled and self._compiled_size is not None:
            self._micro_sizes.append(self._compiled_size)
        self._backward_end = time.perf_counter()
        self._noise.after_backward()

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._step_depth += 1
        if self._step_depth == 1 and not self._paused:
            self._phases.optimizer()

    def _on_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # torch runs the step hooks around every patched ``step`` of the optimizer's class
        # hierarchy: a subclass whose step() calls super().step() fires them twice, nested.
        # Only the outermost call is the optimizer step.
        self._step_depth = max(0, self._step_depth - 1)
        if self._step_depth or self._paused:
            return
        now = time.perf_counter()
        if self._finder is not None and self._step_started is None:
            self._step_started = self._finder.started  # a forward-less first step began there
        start = self._last_step_end or self._step_started or now
        self._last_step_end = now
        self._step += 1
        if self._finder is not None:
            self._settle_entry()
        if self._forward_open and self._micro_sizes:  # the last forward raised; the step went on without it
            self._abandon("raised", [self._micro_sizes.pop()])
        micro = self._micro_sizes
        self._micro_sizes = []
        self._mid_iteration = False
        self._forward_open = False
        self._sentinel_passes = 0
        if not self._sentinel_checked:
            self._check_sentinel()
        samples = self._fixed_batch if self._fixed_batch is not None else sum(micro)
        record = {"k": "step", "step": self._step, "t": time.time(), "dt": now - start,
                  "n": samples, "mb": max(1, len(micro)), "dropped": self._publisher.dropped}
        phases = self._phases.end()
        if phases is not None:
            record["ph"] = phases
        flops = self._flops.stop() if self._flops is not None else None
        if flops is not None:
            record["flops"] = flops
        if self._skipped:
            record["skipped"], self._skipped = self._skipped, []
        noise = self._noise.end_step(micro, now - start)
        if noise is not None:
            record["noise"] = noise
        if self._ranks is not None and self._backward_end > start:
            # Until this rank's gradients were ready: where a straggler differs (DDP steps in lockstep).
            record["busy"] = self._backward_end - start
            self._busy_timed = now
        self._follow_backward_ends(now)
        self._publisher.submit(record)
        self._publisher.poll()

    def _settle_entry(self) -> None:
        """The first step(s): keep counting at the model if its forward ran (under torch.compile
        the traced pre-hook could not retire the finder's hooks: that happens here), else count
        from now on at the first trainable submodule the step called, this step included."""
        if self._forward_ran:
            if self._compiled:  # removing hooks from modules dynamo traced would recompile them
                self._finder.active = False
                self._idle_finder = self._finder
            else:
                self._finder.remove()
            self._finder = None
            return
        found = self._finder.entry()
        if found is None:
            if not self._entry_missing_warned:
                self._entry_missing_warned = True
                self.record_event("warning", ENTRY_MISSING.format(step=self._step))
            self._finder.reset()
            return
        name, module, sizes = found
        self._finder.remove()
        self._finder = None
        for handle in self._entry_hooks:
            handle.remove()
        self._entry = module
        self._entry_hooks = self._hook_entry(module)
        self._noise.set_entry(module)
        self._micro_sizes = sizes
        self.record_event("warning", ENTRY_FOUND.format(step=self._step, name=name, kind=type(module).__name__))

    # -- flushes (usually the training thread, between steps) -----------------
    def _on_published(self, records: list[dict], end: int) -> None:
        if self._ranks is not None:
            self._ranks.observe(records)
        with self._state_lock:
            self._unread.extend(records)
            self._unread_end = end
            if len(self._unread) >= INGEST_BATCH:
                self._ingest_unread()

    def _off_stats(self) -> Stats:
        """What stats() returns once the guard has tripped: no numbers, and why."""
        return Stats(unit=self._latest.unit, noise_reason=OFF_REASON, b_opt_reason=OFF_REASON)

    def _summary_figures(self) -> dict[str, Any] | None:
        """B* and B_simple for the session's summary (`bsmon ls`), asked by the publisher's background
        thread every few seconds; None while the training thread holds the model (asked again later)."""
        if not self._state_lock.acquire(blocking=False):
            return None
        try:
            self._ingest_unread()
            stats = self._model_state.stats()
        finally:
            self._state_lock.release()
        return {"b_opt": None if stats.b_opt is None else int(stats.b_opt),
                "b_simple": None if stats.b_simple is None else float(stats.b_simple), "unit": stats.unit}

    def _pickled_model(self) -> tuple[bytes, int] | None:
        """The model pickled, and the stream's bytes it covers, for late monitors (bsmon/checkpoint.py);
        asked by the publisher's background thread every few seconds, None while the training
        thread holds the model (asked again later)."""
        if not self._state_lock.acquire(blocking=False):
            return None
        try:
            self._ingest_unread()
            return pickle.dumps(self._model_state, protocol=pickle.HIGHEST_PROTOCOL), self._ingested_end
        finally:
            self._state_lock.release()

    def _ingest_unread(self) -> None:
        """Feed the waiting records to the model (the caller holds ``_state_lock``): steps in
        blocks, as a monitor reads them, so the charts' history costs the job little."""
        if self._unread:
            self._model_state.ingest_all(wire.in_blocks(self._unread))
            self._unread = []
            self._ingested_end = self._unread_end
            self._stale = True

    # -- public API -----------------------------------------------------------
    @guarded_method()
    def log(self, **scalars: Any) -> None:
        """Record scalars (loss, lr, ...) for the current step.

        Python numbers and one-element tensors are accepted. Tensors on an
        accelerator are copied to the host asynchronously, so logging a CUDA
        loss every step adds no synchronisation. A value that is not a number
        is refused with a warning (once per name) and training goes on.
        """
        step = self._step + 1 if self._mid_iteration else self._step
        values: dict[str, float] | Deferred = {}
        device_names: list[str] = []
        device_values: list[torch.Tensor] = []
        for key, value in scalars.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
                if value.device.type == "cpu":
                    values[key] = float(value.detach())
                else:
                    device_names.append(key)
                    device_values.append(value.detach().reshape(()).float())
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                values[key] = float(value)
            else:
                self._reject(key, value)
        if device_values:
            values = Deferred(torch.stack(device_values), names=device_names, known=values)
        self._publisher.submit({"k": "scalars", "step": step, "values": values})
        self._publisher.poll()

    def _reject(self, key: str, value: Any) -> None:
        shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
        message = (f"log({key}=...) ignored: a {type(value).__name__}{shape} is not a number. "
                   "Pass a Python number or a one-element tensor.")
        self.record_event("warning", message)
        if key not in self._rejected_names:
            self._rejected_names.add(key)
            warnings.warn(f"bsmon: {message}", BsmonWarning, stacklevel=4)  # _reject, log, its guard, the caller

    @guarded_method()
    def warn(self, message: str) -> None:
        """Record a warning in the session (the TUI's events, headless replay) and warn once here.

        For integrations that must say what they did: "watching the first of 2 optimizers"."""
        self.record_event("warning", message)
        self._warn(message)

    @guarded_method(lambda monitor: monitor._off_stats())
    def stats(self) -> Stats:
        """The latest numbers: up to the last step, or at most STATS_REFRESH_S old when
        asked again sooner than that (after close(), always up to the end).

        Computed on demand, so a job that never asks pays only for recording its steps.
        Device values still on their way to the host (a CUDA job's noise norms of the last
        step or two) are counted once they arrive.
        """
        now = time.monotonic()
        if now - self._latest_at < STATS_REFRESH_S and not self._closed:
            return self._latest
        self._publisher.poll(now=True)
        with self._state_lock:
            self._ingest_unread()
            if self._stale:
                self._latest = self._model_state.stats()
                self._stale = False
            self._latest_at = now
            return self._latest

    def recommended_batch_size(self) -> int | None:
        """The batch size that maximises goodput now (with 5% hysteresis), or None while unknown.

        For jobs that adapt their batch size as they train. Without a throughput profile it is
        the job's micro-batch times the best accumulation (``stats().b_opt_source == "in-run"``).
        ``stats().b_opt_reason`` says why there is none and what to do.
        """
        return self.stats().b_opt

    @contextlib.contextmanager
    def paused(self):
        """Steps run inside are not training steps (a throughput sweep): nothing records or measures them.

        The first step after it is timed from the end of the block, not from the last step before.
        """
        if self._paused:
            raise RuntimeError("this monitor is already paused")
        self._paused = True
        self._noise.pause()
        if self._flops is not None:
            self._flops.close()  # a step being counted is left uncounted: its size is counted later
        try:
            yield
        finally:
            self._noise.resume()
            self._micro_sizes = []
            if self._finder is not None:
                self._finder.reset()  # the sweep's calls say nothing about the training step
            self._skipped = []
            self._sentinel_passes = 0
            self._forward_open = False
            self._mid_iteration = False
            self._phases.restart()
            self._last_step_end = time.perf_counter()
            self._paused = False

    @guarded_method()
    def record_event(self, level: str, message: str) -> None:
        """Record something a person should see (a profile's cost, say)."""
        self._publisher.submit({"k": "event", "t": time.time(), "level": level, "msg": message})

    @guarded_method(lambda monitor: {})
    def metrics(self, prefix: str = "bsmon/") -> dict[str, float]:
        """The headline numbers, named ``prefix + name``, for a tracker: ``wandb.log(monitor.metrics())``.

        See :func:`bsmon.model.tracker_metrics`: numbers bsmon has no value for are left out.
        """
        return tracker_metrics(self.stats(), prefix)

    def record_profile_point(self, point: dict[str, Any]) -> None:
        """Stream one throughput-profile point (bsmon.profile calls this)."""
        self._publisher.submit({"k": "profile_point", **point})

    def record_profile(self, profile: dict[str, Any]) -> None:
        """Store a finished throughput profile in the session."""
        self._publisher.submit({"k": "profile", "profile": profile})

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @guarded_method(lambda monitor: [])
    def throughput_points(self) -> list:
        """The session's throughput points so far (profile and live), in its unit."""
        self._publisher.poll(now=True)
        with self._state_lock:
            self._ingest_unread()
            return self._model_state.throughput_points()

    @guarded_method()
    def record(self, record: dict[str, Any]) -> None:
        """Add a record (an event, a branch check) to the session."""
        self._publisher.submit(record)
        self._publisher.poll()

    @property
    def dropped(self) -> int:
        return self._publisher.dropped

    def close(self, *, status: str = "finished", error: str | None = None, code: int | None = None) -> None:
        """Remove every hook, flush, write the session's last record. Idempotent."""
        global _active
        if self._closed:
            return
        self._closed = True

        def say_goodbye() -> None:
            self._publisher.close({"k": "bye", "t": time.time(), "status": status, "code": code, "error": error})

        parts = [self._remove_hooks, self._noise.close, self._flops and self._flops.close,
                 self._ranks and self._ranks.close, self._unregister, say_goodbye]
        for part in filter(None, parts):
            # Each part behind the guard, and whatever fails the others still run: a bsmon bug
            # must not fail a job at its end, nor leave a hook, or the session without its bye.
            try:
                part()
            except Exception as exc:  # noqa: BLE001 - see above
                self._guard.trip("Monitor.close", exc)
        with _active_lock:
            if _active is self:
                _active = None

    def _unregister(self) -> None:
        """Give back the excepthook and the atexit handler (close())."""
        if sys.excepthook == self._excepthook:  # bound methods: equal, never identical
            sys.excepthook = self._previous_excepthook
        atexit.unregister(self._atexit)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.close(status="failed", error=f"{exc_type.__name__}: {exc}")

    def _excepthook(self, exc_type, exc, tb) -> None:
        self._failure = f"{exc_type.__name__}: {exc}"
        self._previous_excepthook(exc_type, exc, tb)

    def _atexit(self) -> None:
        if self._failure is not None:
            self.close(status="failed", error=self._failure, code=1)
        else:
            self.close()


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, *, batch_size: int | None = None,
          unit: str = "samples", tokens_per_sample: int | None = None, name: str | None = None,
          noise: str | None = "auto", layers: str | tuple[type, ...] = "all",
          horizon_samples: float | None = None, profile: Any = None,
          noise_budget: float = MEASURE_BUDGET, mixes_samples: tuple[type, ...] = (),
          flops_per_sample: float | None = None, noise_geometry: str = "auto") -> Monitor:
    """Instrument a training loop; returns the :class:`Monitor`.

    ``batch_size`` fixes the samples per optimizer step (otherwise inferred from
    the model's forward inputs, summed over micro-batches; in a multi-process job,
    this rank's share of the global batch). ``unit="tokens"``
    with ``tokens_per_sample`` reports tokens. ``noise`` picks the noise-scale
    estimator ("auto", "microbatch", "per_example", "ddp" or None; "auto" picks
    "ddp" for a DistributedDataParallel model on more than one rank); ``layers`` limits
    the per-example estimator ("all" or "norm_embed"); ``horizon_samples`` sets
    the averaging horizon of the noise scale. ``profile`` is a throughput profile
    (a ``bsmon.Profile``, or the id/path of one saved by ``bsmon sweep``; default:
    ``$BSMON_PROFILE``) that the optimal batch size uses from the first step.
    ``noise_budget`` is the share of training time the noise measurement may take
    (default 1%): steps are measured while it holds, so a cheap measurement (a GPU)
    runs every step and a costly one (a small CPU model) every k-th; 1.0 measures all.
    ``mixes_samples`` declares module types whose forward mixes the samples of a batch (like
    BatchNorm in training mode, which bsmon detects itself: in-batch negatives, say): per-example
    norms are not used in a step where one runs (docs/noise-scale.md).

    ``optimizer`` may be a wrapper (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer, anything holding the torch optimizer as ``.optimizer``). When
    ``model``'s own forward never runs (a training step that calls ``model.net(x)``),
    samples are counted at the first trainable submodule that does run (bsmon/probe/entry.py).
    ``flops_per_sample`` is the FLOPs of one training step (forward and backward) per sample, for
    FLOP/s and MFU; without it bsmon counts one step per micro-batch size with
    ``torch.utils.flop_counter.FlopCounterMode`` (docs/api.md).
    ``noise_geometry`` picks the noise scale the advice uses: "sgd" (B_simple, of the raw
    gradient), "optimizer" (B_pre, of the gradient rescaled by Adam's 1/(sqrt(v_hat)+eps)), or
    "auto": "optimizer" for an optimizer with a per-element second moment, else "sgd".
    """
    global _active
    if not isinstance(model, nn.Module):
        raise TypeError(f"bsmon.watch(model, ...) needs a torch.nn.Module, got {type(model).__name__}")
    optimizer = unwrap_optimizer(optimizer)
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}: use 'samples' or 'tokens'")
    if unit == "tokens" and not (isinstance(tokens_per_sample, int) and tokens_per_sample > 0):
        raise ValueError("unit='tokens' needs tokens_per_sample=<positive int> (tokens in one sample)")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size={batch_size!r}: give a positive int (samples per optimizer step) or None")
    if horizon_samples is not None and not horizon_samples > 0:
        raise ValueError(f"horizon_samples={horizon_samples!r} must be positive")
    if not (isinstance(noise_budget, (int, float)) and 0 < noise_budget <= 1):
        raise ValueError(f"noise_budget={noise_budget!r}: give the share of training time, in (0, 1]")
    if flops_per_sample is not None and not (isinstance(flops_per_sample, (int, float)) and flops_per_sample > 0):
        raise ValueError(f"flops_per_sample={flops_per_sample!r}: give the FLOPs of one step per sample (> 0)")
    check_mode(model, noise)
    if noise_geometry not in NOISE_GEOMETRIES:
        raise ValueError(f"noise_geometry={noise_geometry!r} is not one of {NOISE_GEOMETRIES}")
    if noise_geometry == "optimizer" and not second_moment_groups(optimizer):
        raise ValueError(f"noise_geometry='optimizer' needs an optimizer with a per-element second moment "
                         f"(Adam, AdamW, ...: betas and eps in every param group); "
                         f"{type(optimizer).__name__} has none. Use noise_geometry='sgd' or 'auto'")
    if not (isinstance(mixes_samples, tuple)
            and all(isinstance(t, type) and issubclass(t, nn.Module) for t in mixes_samples)):
        raise TypeError(f"mixes_samples={mixes_samples!r}: give a tuple of nn.Module subclasses, "
                        "e.g. mixes_samples=(MyContrastiveHead,)")
    profile_dict = _profile_dict(profile)
    with _active_lock:
        if _active is not None and not _active.closed:
            raise RuntimeError(
                f"bsmon.watch() is already active in this process (session {_active.session_id}); "
                "call close() on that monitor before watching again")
        _active = Monitor(model, optimizer, batch_size=batch_size, unit=unit,
                          tokens_per_sample=tokens_per_sample, name=name, noise=noise, layers=layers,
                          horizon_samples=horizon_samples, profile=profile_dict, noise_budget=noise_budget,
                          mixes_samples=mixes_samples, flops_per_sample=flops_per_sample,
                          noise_geometry=noise_geometry)
        return _active


def _profile_dict(profile: Any) -> dict[str, Any] | None:
    """A profile argument (Profile, saved id/path, or $BSMON_PROFILE JSON) as a Profile dict."""
    if profile is None:
        env = os.environ.get("BSMON_PROFILE")
        return json.loads(env) if env else None
    if hasattr(profile, "to_dict"):
        return profile.to_dict()
    if isinstance(profile, (str, os.PathLike)):
        return store.load_profile(str(profile))
    raise TypeError(f"profile= takes a bsmon.Profile or the id/path of a saved profile, got {type(profile).__name__}")
