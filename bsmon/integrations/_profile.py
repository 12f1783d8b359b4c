"""``BsmonCallback(profile=...)``: the throughput sweep both callbacks run before training's first step.

Each callback supplies ``make_batch(size)`` (samples from its trainer's own dataset and collate
function, read by index: the training sampler and its data stream are not touched) and
``step(batch)`` (one training step through its framework's own forward, loss, backward and
optimizer step); :func:`run_profile` runs :func:`bsmon.profiling.profile_training`, which restores
the model, optimizer, GradScaler and RNG state exactly, and says what it will cost before and what
it cost after.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sized
from typing import Any

import torch

import bsmon
from bsmon.profiling import SIZE_CEILING, Profile, profile_training

#: What ``profile=dict(...)`` may set; each goes to bsmon.profile_training.
PROFILE_OPTIONS = ("batch_sizes", "max_batch", "start", "warmup", "steps")


def profile_options(profile: Any) -> dict[str, Any] | None:
    """The sweep's options from ``profile=`` (False/None: no sweep; True: the defaults; a dict)."""
    if profile is None or profile is False:
        return None
    if profile is True:
        return {}
    if isinstance(profile, dict):
        unknown = sorted(set(profile) - set(PROFILE_OPTIONS))
        if unknown:
            raise ValueError(f"BsmonCallback(profile=...) got unknown option(s) {unknown}; "
                             f"it takes {', '.join(PROFILE_OPTIONS)}")
        return dict(profile)
    raise TypeError(f"BsmonCallback(profile=...) takes True, False or a dict of {', '.join(PROFILE_OPTIONS)}; "
                    f"got {type(profile).__name__}")


def indexed_batches(dataset: Any, collate: Callable[[list], Any]) -> Callable[[int], Any]:
    """``make_batch(size)``: samples 0, 1, ... (wrapping round a small dataset) through ``collate``.

    Read by index, so no sampler is advanced and no data-loader worker is started."""
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if iterable or not (hasattr(dataset, "__getitem__") and isinstance(dataset, Sized)) or len(dataset) == 0:
        raise ValueError(f"BsmonCallback(profile=True) builds batches from the training dataset by index, and "
                         f"this one ({type(dataset).__name__}) is iterable-only or empty: "
                         "profile with bsmon.profile_training(model, optimizer, make_batch, step) instead")
    return lambda size: collate([dataset[i % len(dataset)] for i in range(size)])


def run_profile(monitor: bsmon.Monitor, model, optimizer, make_batch: Callable[[int], Any],
                step: Callable[[Any], object], options: dict[str, Any], *, scaler=None) -> Profile:
    """Run the sweep, saying its cost before (planned sizes and steps) and after (measured)."""
    warmup, steps = options.get("warmup", 1), options.get("steps", 3)
    if options.get("batch_sizes") is not None:
        limit = options.get("max_batch") or SIZE_CEILING
        sizes = [size for size in sorted(set(options["batch_sizes"])) if size <= limit]
        planned = (f"micro-batch sizes {', '.join(str(size) for size in sizes)} "
                   f"({len(sizes) * (warmup + steps)} steps of {sum(sizes) * (warmup + steps)} samples in all)")
    else:
        cap = f"max_batch={options['max_batch']}" if options.get("max_batch") else "no size limit"
        planned = (f"micro-batch sizes doubling from {options.get('start', 1)} until out of memory, a throughput "
                   f"plateau or {cap}")
    _say(monitor, f"profiling {planned}: {warmup} untimed + {steps} timed steps per size, before training; "
                  "the training state is restored afterwards")
    began = time.perf_counter()
    result = profile_training(model, optimizer, make_batch, step, scaler=scaler, **options)
    sizes = ", ".join(f"{p.batch_size} ({p.samples_per_s:.4g}/s)" for p in result.points) or "none"
    print(f"bsmon: profile took {time.perf_counter() - began:.1f} s: {sizes}; stopped: "
          f"{result.stop_reason.replace('_', ' ')}", file=sys.stderr)  # the session has it as an event
    return result


def _say(monitor: bsmon.Monitor, message: str) -> None:
    monitor.record_event("info", message)
    print(f"bsmon: {message}", file=sys.stderr)
