"""Raw gradient-norm measurements for the noise-scale estimators (training side).

This module only *measures*; every estimate is computed from the recorded
numbers by :mod:`bsmon.stats.noise`, the same code for live view, replay,
export and ``Monitor.stats()``.

Per optimizer step it produces one ``noise`` payload for the step record:

* ``microbatch`` (m >= 2 backward passes): the squared norm of the
  accumulated ``.grad`` after each pass, per parameter group — one fused norm
  per pass, no gradient copies.
* ``per_example`` (m == 1): the per-example squared norms summed inside
  backward by :class:`~bsmon.probe.per_example.PerExampleNorms`, plus the
  squared norm of ``.grad`` over the same parameters.
* ``ddp`` (a DistributedDataParallel model): the squared norms of the local and
  the all-reduced gradient, summed over DDP's buckets by
  :class:`~bsmon.probe.distributed.DdpNormHook`, plus ``.grad`` after each pass
  accumulated under ``no_sync()`` before the synchronising one.

The micro-batch and per-example payloads also break their norms down per row of
the bounded per-module partition (:mod:`bsmon.probe.modules`), from the same
per-parameter values: ``mod``, or ``mod_pe`` and ``mod_big``.

For an Adam-family optimizer each estimator also records ``pre``: the same
norms in the optimizer's geometry, of the gradients rescaled by its
1/(sqrt(v_hat) + eps) (:mod:`bsmon.probe.precond`), for B_pre.

All values stay on the device; :class:`~bsmon.probe.deferred.Deferred` brings
them to the host without a synchronisation.
"""

from __future__ import annotations

import time

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from bsmon.probe import distributed
from bsmon.probe.deferred import Deferred
from bsmon.probe.modules import module_partition
from bsmon.probe.precond import Preconditioner
from bsmon.stats.noise import MEASURE_GAP_STEPS, partial_coverage_reason

if TYPE_CHECKING:
    from bsmon.probe.per_example import PerExampleNorms

#: The share of the training thread's time the noise measurement may take (see NoiseProbe.end_step).
MEASURE_BUDGET = 0.01
#: Steps measured unconditionally at the start, so an estimate exists early (a one-off cost).
WARMUP_MEASUREMENTS = 30

MODES = ("auto", "microbatch", "per_example", "ddp", None)

REASON_OFF = "noise estimation is off (noise=None)"
REASON_NEEDS_ACCUMULATION = (
    "one backward pass per step: the micro-batch estimator needs >= 2. "
    "Accumulate >= 2 micro-batches per step, or use noise='per_example'")
REASON_NEEDS_SINGLE_PASS = (
    "{m} backward passes per step: per-example norms need exactly one. "
    "Use noise='microbatch' (or 'auto') with gradient accumulation")
REASON_NO_COVERAGE = (
    "no supported layer (Linear, transformers Conv1D, Conv1d/2d, LayerNorm, RMSNorm, Embedding) holds trainable "
    "parameters: accumulate >= 2 micro-batches per step and use noise='microbatch'")
REASON_MIXES_SAMPLES = (
    "{module} mixes the samples of a batch in its training forward, so the loss is not a sum of "
    "per-sample losses and per-example gradients do not exist. Accumulate >= 2 micro-batches per step: "
    "the micro-batch estimator then measures the noise of batch gradients at the micro-batch size used")
REASON_COMPILED = (
    "the model runs under torch.compile, which leaves bsmon's per-example hooks out of the compiled "
    "graph (running them inside would break it), so no per-example norms were taken. Accumulate >= 2 "
    "micro-batches per step: the micro-batch estimator needs only the norm of .grad after each backward "
    "pass and works compiled. Or measure per-example norms on the model without torch.compile")
REASON_DDP_NO_SYNC = (
    "{synced} of this step's {m} backward passes all-reduced: gradient accumulation under "
    "DistributedDataParallel without no_sync(). Every pass then pays an all-reduce, and the "
    "local gradient of one rank is never seen on its own. Run all but the last micro-batch "
    "inside `with model.no_sync():`")
REASON_HOOK_BEFORE_WATCH = (
    "this DistributedDataParallel model already had a communication hook ({hook}) when "
    "bsmon.watch() was called, and DDP accepts only one. Call bsmon.watch() before "
    "ddp.register_comm_hook(...): bsmon then runs your hook inside its own")
REASON_FSDP = (
    "FullyShardedDataParallel is not supported: each rank's .grad holds only its shard, so the "
    "gradient norms would need an all-reduce of partial squared norms every step. "
    "Use DistributedDataParallel to measure the noise scale")
REASON_PYTHON_REDUCER = (
    "DDP's Python reducer (compiled autograd) calls communication hooks per parameter, "
    "not per bucket, so bsmon cannot wrap its all-reduce")
REASON_NOT_DDP = (
    "the model is not DistributedDataParallel: pass the DDP-wrapped module to bsmon.watch(), "
    "not the module inside it")


def sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' squared L2 norms as one float32 device tensor (no sync), one fused norm."""
    # float32 accumulation for half precision; float64 cannot be narrowed inside the norm
    wide = None if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(tensors, 2, dtype=wide)
    return torch.stack([n.to(norms[0].device, torch.float32) for n in norms]).square()


def sq_norm_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the tensors' squared L2 norms as a 0-d float32 device tensor (no sync)."""
    return sq_norms(tensors).sum()


def grad_sq_norms(groups: Sequence[Sequence[nn.Parameter]], rows: ModuleRows | None = None) -> torch.Tensor:
    """Squared L2 norm of ``.grad`` per group, as one float32 device tensor (no sync).

    With ``rows`` (and every parameter holding a gradient) the per-module sums follow the
    group sums in the same tensor, from the same per-parameter norms.
    """
    sums, per_param = [], []
    device = None
    for params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            sums.append(None)
            continue
        squares = sq_norms(grads)
        per_param.append(squares)
        device = device or squares.device
        sums.append(squares.sum())
    if device is None:
        return torch.zeros(len(groups))
    totals = torch.stack([torch.zeros((), device=device) if s is None else s.to(device) for s in sums])
    if rows is None or sum(len(s) for s in per_param) != len(rows.row_of):
        return totals
    squares = torch.cat([s.to(device) for s in per_param])
    return torch.cat([totals, torch.zeros(len(rows.labels), device=device).index_add_(0, rows.index(device), squares)])


class ModuleRows:
    """The per-module breakdown's rows (bsmon.probe.modules) and their index on the device."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        self.labels, self.row_of, self.params = module_partition(model, params)
        #: the parameters of each row, the form PerExampleNorms(rows=...) takes
        self.members: list[list[nn.Parameter]] = [[] for _ in self.labels]
        for row, param in zip(self.row_of, params):
            self.members[row].append(param)
        self._index: dict[torch.device, torch.Tensor] = {}

    def index(self, device: torch.device) -> torch.Tensor:
        """The row of each parameter, on ``device``: copied there once, without a sync."""
        if device not in self._index:
            host = torch.tensor(self.row_of, dtype=torch.long)
            if device.type == "cuda":
                host = host.pin_memory()
            self._index[device] = host.to(device, non_blocking=True)
        return self._index[device]


def check_mode(model: nn.Module, mode: str | None) -> None:
    """Refuse, with a ValueError, a noise mode that cannot work on ``model``."""
    if mode not in MODES:
        raise ValueError(f"noise={mode!r} is not one of {MODES}")
    if mode == "ddp" and (reason := _ddp_unsupported(model)) is not None:
        raise ValueError(f"noise='ddp': {reason}.")


def _ddp_unsupported(model: nn.Module) -> str | None:
    """Why the data-parallel estimator cannot measure ``model``, or None when it can."""
    if distributed.is_fsdp(model):
        return REASON_FSDP
    if not distributed.is_ddp(model):
        return REASON_NOT_DDP
    if getattr(model, "_use_python_reducer", False):
        return REASON_PYTHON_REDUCER
    hooks = distributed.registered_comm_hooks(model)
    if hooks and distributed.DdpNormHook.of(model) is None:
        hook = hooks[0][0]
        return REASON_HOOK_BEFORE_WATCH.format(hook=getattr(hook, "__qualname__", repr(hook)))
    return None


def group_label(index: int, group: dict[str, Any]) -> str:
    lr = group.get("lr")
    size = sum(p.numel() for p in group["params"])
    lr_text = f", lr={float(lr):.3g}" if isinstance(lr, (int, float, torch.Tensor)) else ""
    return f"group {index} ({size:,} params{lr_text})"


class NoiseProbe:
    """Chooses the estimator and collects its raw norms, one payload per step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mode: str | None,
                 layers: str | tuple[type, ...], announce: Callable[[dict], None],
                 budget: float = MEASURE_BUDGET, mixes_samples: tuple[type, ...] = (),
                 guard: Callable[[Callable], Callable] = lambda f: f) -> None:
        check_mode(model, mode)
        self.mode = mode
        self._model = model
        self._guard = guard
        self._layers = layers
        self._mixes_samples = mixes_samples
        self._refusal: tuple[str, dict[str, Any]] | None = None  # why per-example norms cannot serve, for good
        self._announce = announce
        self._group_params = [[p for p in g["params"] if p.requires_grad] for g in optimizer.param_groups]
        self._group_labels = [group_label(i, g) for i, g in enumerate(optimizer.param_groups)]
        # the per-module breakdown (micro-batch and per-example estimators), in group order; None for one module
        rows = ModuleRows(model, [p for group in self._group_params for p in group])
        self._rows = rows if len(rows.labels) > 1 else None
        self._measured = self._group_params
        self._per_example = None
        self._ddp_hook: distributed.DdpNormHook | None = None
        self._passes: list[torch.Tensor | None] = []  # None: the pass that synchronised (ddp)
        self._precond = Preconditioner(optimizer)
        self._pre_passes: list[torch.Tensor | None] = []  # |P .grad|^2 after each pass not inside an all-reduce
        self._current: tuple | None = None  # (estimator, reason, coverage, precond_reason) last announced
        self.budget = budget
        self._measuring = True  # whether the current step is measured
        self._spent_s = 0.0  # host seconds spent measuring here and in charge()d hooks
        self._retired_spent_s = 0.0  # the same, by per-example hooks since removed
        self._trained_s = 0.0
        self._measured_steps = 0
        self._unmeasured_run = 0  # steps since the last measured one
        self._warmup_spent_s = 0.0  # what the warm-up cost, and the training time it covered:
        self._warmup_trained_s = 0.0  # a one-off, left out of the budget that follows
        if mode is None:
            self._set_estimator(None, REASON_OFF)
        elif mode == "per_example":
            self._install_per_example()
        elif mode == "ddp" or (mode == "auto" and (distributed.is_fsdp(model) or (
                distributed.is_ddp(model) and model.process_group.size() > 1))):
            self._install_ddp(model)

    @property
    def measuring(self) -> bool:
        """Whether the current step's backward passes are measured."""
        return self.mode is not None and self._measuring

    # -- training-thread hooks -------------------------------------------------
    def charge(self, seconds: float) -> None:
        """Count host time spent elsewhere for a measured step (the probe's output hooks)."""
        self._spent_s += seconds

    def after_backward(self) -> None:
        """Called once at the end of every backward pass."""
        if self.mode is None or not self._measuring:
            return
        start = time.perf_counter()
        if self._ddp_hook is not None and self._ddp_hook.synced():
            # .grad is mid-all-reduce here (before or after it, depending on DDP's settings)
            self._passes.append(None)
        else:
            # per module too, except inside DDP's buckets (not kept per module)
            self._passes.append(grad_sq_norms(self._measured, self._rows if self._ddp_hook is None else None))
            if self._precond.supported:
                rescaled = self._precond.rescaled(self._measured)
                self._pre_passes.append(None if rescaled is None else sq_norm_sum(rescaled))
        self._spent_s += time.perf_counter() - start

    def discard(self) -> None:
        """Forget what this step measured so far: its gradients were cleared without an optimizer step."""
        self._passes = []
        self._pre_passes = []
        if self._per_example is not None:
            self._per_example.pop()
        if self._ddp_hook is not None:
            self._ddp_hook.take()

    def end_step(self, micro_sizes: Sequence[int], step_time_s: float) -> dict | None:
        """The step's noise payload (values still on the device), or None.

        Measuring costs the training thread a norm per backward pass (and per-example or
        all-reduce hooks); on a CPU that can be a tenth of a step. So a step is measured only
        while the measuring time since the warm-up stays within MEASURE_BUDGET of the training
        time since then: a GPU job, whose measurements are tiny kernel launches, measures every
        step; a CPU job every k-th (k about the cost of one measurement over the budget). The
        first WARMUP_MEASUREMENTS steps are always measured, so an estimate exists early; their
        cost is a one-off, not a debt that later steps pay back (that starved small models of
        measurements for 1,000+ steps). And whatever the budget, after the warm-up at most
        MEASURE_GAP_STEPS - 1 steps in a row go unmeasured: a measurement dearer than
        MEASURE_GAP_STEPS * budget steps of training then costs 1/MEASURE_GAP_STEPS of its
        steps instead. Unmeasured steps still count towards the averaging horizon (in samples).
        """
        if self.mode is None:
            return None  # noise=None, or no estimator can work here: nothing to measure or budget
        measured, passes, self._passes = self._measuring, self._passes, []
        pre_passes, self._pre_passes = self._pre_passes, []
        self._trained_s += step_time_s
        payload = None
        if measured and self.mode is not None:
            start = time.perf_counter()
            payload = self._payload(passes, micro_sizes, pre_passes)
            self._spent_s += time.perf_counter() - start
        self._measured_steps += measured
        self._unmeasured_run = 0 if measured else self._unmeasured_run + 1
        if measured and self._measured_steps == WARMUP_MEASUREMENTS:
            self._warmup_spent_s, self._warmup_trained_s = self._measuring_cost(), self._trained_s
        self._measuring = (self.budget >= 1.0 or self._measured_steps < WARMUP_MEASUREMENTS
                           or self._unmeasured_run + 1 >= MEASURE_GAP_STEPS
                           or self._measuring_cost() - self._warmup_spent_s
                           <= self.budget * (self._trained_s - self._warmup_trained_s))
        self._set_hooks_active(self._measuring)
        return payload

    def _measuring_cost(self) -> float:
        """Host seconds spent measuring so far, by every part of the estimator."""
        cost = self._spent_s + self._retired_spent_s
        if self._per_example is not None:
            cost += self._per_example.spent_s
        if self._ddp_hook is not None:
            cost += self._ddp_hook.spent_s
        return cost

    def _payload(self, passes: list[torch.Tensor | None], micro_sizes: Sequence[int],
                 pre_passes: list[torch.Tensor | None]) -> dict | None:
        if self.mode == "ddp":
            return self._ddp_payload(passes, micro_sizes, pre_passes)
        m = len(passes)
        per_example = self._per_example.pop() if self._per_example is not None else None
        if m >= 2 and self.mode in ("auto", "microbatch"):
            if self._measured is not self._group_params and self.mode == "auto":
                self._remove_per_example()  # the job switched to accumulation
            self._set_estimator("microbatch", None)
            g = len(self._measured)
            payload = {"est": "microbatch", "micro": list(micro_sizes), "g": g}
            if self._rows is not None and all(len(p) == g + len(self._rows.labels) for p in passes):
                stacked = torch.stack(passes)  # passes x (groups, then modules)
                payload["acc"] = Deferred(stacked[:, :g])
                payload["mod"] = Deferred(stacked[:, g:])
            else:
                payload["acc"] = Deferred(torch.stack([p[:g] for p in passes]))
            if len(pre_passes) == m and all(p is not None for p in pre_passes):
                payload["pre"] = Deferred(torch.stack([p.to(pre_passes[0].device) for p in pre_passes]))
            return payload
        if m == 1 and self.mode in ("auto", "per_example"):
            if self._refusal is not None:
                self._set_estimator(None, self._refusal[0], **self._refusal[1])
                return None
            if self._per_example is None:
                self._install_per_example()  # auto: first single-pass step; data from the next one
                return None
            if per_example is None:
                self._after_skipped_step()
                return None
            if self._current[0] != "per_example":  # the step before was skipped, now one is not
                self._announce_per_example()
            batch, pe_groups = per_example
            g, big, per_row = len(self._measured), passes[0], self._per_example.per_row
            payload = {"est": "per_example", "batch": int(batch), "pe": Deferred(pe_groups), "big": Deferred(big[:g])}
            if per_row is not None and len(big) == g + len(per_row):  # every measured parameter had a gradient
                payload["mod_pe"] = Deferred(per_row)
                payload["mod_big"] = Deferred(big[g:])
            rescaled = self._per_example.rescaled
            if rescaled is not None and len(pre_passes) == 1 and pre_passes[0] is not None:
                payload["pre"] = Deferred(torch.stack([rescaled, pre_passes[0].to(rescaled.device)]))
            return payload
        if m == 1:
            self._set_estimator(None, REASON_NEEDS_ACCUMULATION)
        elif m >= 2:
            self._set_estimator(None, REASON_NEEDS_SINGLE_PASS.format(m=m))
        return None

    def pause(self) -> None:
        """Measure nothing until resume() (steps that are not training steps, e.g. a throughput sweep)."""
        self._set_hooks_active(False)

    def resume(self) -> None:
        self._set_hooks_active(self._measuring)

    def _set_hooks_active(self, active: bool) -> None:
        if self._per_example is not None:
            self._per_example.active = active
        if self._ddp_hook is not None:
            self._ddp_hook.active = active

    def set_entry(self, module: nn.Module) -> None:
        """Measure at ``module``, the submodule a forward-less training step calls
        (bsmon/probe/entry.py): per-example norms need its forward to run."""
        self._model = module
        if self._per_example is not None:
            self._remove_per_example()
            self._install_per_example()

    def close(self) -> None:
        self._remove_per_example()
        if self._ddp_hook is not None:
            self._ddp_hook.active = False  # DDP cannot unregister a hook; it now only calls the inner one

    def _ddp_payload(self, passes: list[torch.Tensor | None], micro_sizes: Sequence[int],
                     pre_passes: list[torch.Tensor | None]) -> dict | None:
        """The data-parallel payload: no_sync passes' .grad norms, then local and averaged norms.

        A step counts only when its last backward pass, and no other, synchronised.
        """
        norms = self._ddp_hook.take()
        synced = sum(p is None for p in passes)
        if synced > 1:
            self._set_estimator(None, REASON_DDP_NO_SYNC.format(synced=synced, m=len(passes)))
            return None
        if norms is None or not passes or passes[-1] is not None or any(p is None for p in passes[:-1]):
            return None
        self._set_estimator("ddp", None, groups=[], world_size=self._ddp_world,
                            inner_hook=self._ddp_hook.inner_name)
        rescaled = self._ddp_hook.rescaled
        if len(passes) > 1:
            norms = torch.cat([*(p.to(norms.device) for p in passes[:-1]), norms])
        payload = {"est": "ddp", "micro": list(micro_sizes), "world": self._ddp_world, "g": len(self._measured),
                   "norms": Deferred(norms)}
        if rescaled is not None and len(pre_passes) == len(passes) - 1 and all(p is not None for p in pre_passes):
            payload["pre"] = Deferred(torch.cat([*(p.to(rescaled.device).view(1) for p in pre_passes), rescaled]))
        return payload

    # -- estimator switching --------------------------------------------------
    def _install_ddp(self, model: nn.Module) -> None:
        """noise='ddp', or 'auto' on a multi-rank DDP or FSDP model: hook DDP's all-reduce, or say why not."""
        reason = _ddp_unsupported(model)  # None for noise='ddp': check_mode refused the rest
        if reason is None:
            self._ddp_hook = distributed.DdpNormHook.of(model) or distributed.DdpNormHook(model)
            self._ddp_hook.rescale = self._precond.squares if self._precond.supported else None
            self._ddp_hook.use_guard(self._guard)
            self._ddp_hook.active = True
            self._ddp_world = model.process_group.size()
            self.mode = "ddp"
        else:
            self.mode = None
            self._set_estimator(None, reason)

    def _install_per_example(self) -> None:
        from bsmon.probe.per_example import PerExampleNorms

        self._per_example = PerExampleNorms(self._model, layers=self._layers, param_groups=self._group_params,
                                            mixes_samples=self._mixes_samples, guard=self._guard,
                                            rescale=self._precond.squares if self._precond.supported else None,
                                            rows=self._rows.members if self._rows is not None else None)
        self._announce_per_example()

    def _announce_per_example(self) -> None:
        """Measure |.grad|^2 over exactly the covered parameters and announce the estimator, or
        refuse it for good (and remove its hooks) when it cannot give the whole model's number.

        A partial coverage is refused rather than shown or scaled: the noise scale of some
        parameters is not the model's, and nothing measured here says how far off it is.
        """
        norms = self._per_example
        covered = {id(p) for p in norms.covered_params}
        self._measured = [[p for p in group if id(p) in covered] for group in self._group_params]
        share = self._covered_share(norms)
        details = {"covered_fraction": share, "uncovered": norms.uncovered}
        if share >= 1.0:
            self._set_estimator("per_example", None, layers=self._layers_name(), **details)
            return
        mixer = norms.mixing_now()
        if mixer is not None:
            reason = REASON_MIXES_SAMPLES.format(module=mixer)
        elif not covered:
            reason = REASON_NO_COVERAGE
        else:
            reason = partial_coverage_reason(share, norms.uncovered)
        self._refusal = (reason, details)
        self._remove_per_example()
        self._set_estimator(None, reason, **details)

    def _after_skipped_step(self) -> None:
        """Say why a single-pass step gave no per-example norms, where the reason is the user's to fix."""
        norms = self._per_example
        if norms.compiled:
            self._refusal = (REASON_COMPILED, {})
            self._remove_per_example()
            self._set_estimator(None, REASON_COMPILED)
        elif norms.mixed_by is not None:
            self._set_estimator(None, REASON_MIXES_SAMPLES.format(module=norms.mixed_by),
                                covered_fraction=self._covered_share(norms), uncovered=norms.uncovered)
        elif len(norms.covered_params) != sum(len(group) for group in self._measured):
            self._announce_per_example()  # the step excluded layers that broke an assumption

    def _covered_share(self, norms: "PerExampleNorms") -> float:
        """Share of the optimizer's trainable parameters the per-example norms cover. Not the
        measured module's share: after set_entry() that module may hold only some of them."""
        total = sum(p.numel() for group in self._group_params for p in group)
        return sum(p.numel() for p in norms.covered_params) / total if total else 0.0

    def _remove_per_example(self) -> None:
        if self._per_example is not None:
            self._retired_spent_s += self._per_example.spent_s
            self._per_example.remove()
            self._per_example = None
        self._measured = self._group_params

    def _layers_name(self) -> str:
        return self._layers if isinstance(self._layers, str) else ",".join(t.__name__ for t in self._layers)

    def _set_estimator(self, name: str | None, reason: str | None, **details: Any) -> None:
        # every estimator measures B_pre where the optimizer has the state (from its first step on)
        precond_reason = self._precond.reason
        current = (name, reason, details.get("covered_fraction"), precond_reason)
        if self._current == current:
            return
        self._current = current
        # Per-example rows exist only while the estimator covers every parameter (it is refused
        # otherwise), so each row is its modules' whole gradient, never part of it.
        if name in ("microbatch", "per_example") and self._rows is not None:
            details = {**details, "modules": self._rows.labels, "module_params": self._rows.params}
        record = {"k": "estimator", "name": name, "reason": reason, "groups": self._group_labels,
                  "second_moment": self._precond.supported, "precond_reason": precond_reason}
        record.update(details)
        if name in ("microbatch", "ddp"):
            record["covered_fraction"] = 1.0
        self._announce(record)
