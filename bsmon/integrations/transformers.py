"""bsmon for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[BsmonCallback()])``.

What the Trainer does, and where the callback fits (transformers 5.x, ``Trainer._inner_training_loop``):

* the optimizer is created and wrapped by accelerate (``AcceleratedOptimizer``) *before*
  ``on_train_begin``; the callback watches the Trainer's model and that optimizer there
  (``bsmon.watch`` unwraps it and hooks the torch optimizer inside). Under DDP (torchrun)
  it watches ``Trainer.model_wrapped``, the DistributedDataParallel wrapper, so the noise
  scale comes from its all-reduce and rank 0 records the one session of the job;
* each optimizer step runs ``gradient_accumulation_steps`` forward and backward passes of
  the model, so bsmon sees the micro-batches and uses the micro-batch noise estimator;
* ``Trainer.log`` hands one ``logs`` dict to every callback in turn. The callback records
  the Trainer's numbers (loss, learning_rate, grad_norm, ...) in the session and adds
  bsmon's headline numbers to that dict as ``bsmon/...``, so every logger the Trainer
  reports to (TensorBoard, W&B, ...) receives them. For that it must come before them:
  at ``on_train_begin`` it moves itself to the front of the Trainer's callback list.
* ``profile=True``: at ``on_train_begin``, once watching, the callback times a sweep of
  micro-batch sizes (bsmon/integrations/_profile.py) on batches of ``Trainer.train_dataset``
  through the collator the training dataloader uses (``Trainer._get_collator_with_removed_columns``,
  or ``_remove_unused_columns`` on a ``datasets.Dataset``), each step being ``Trainer.training_step``
  (autocast, loss, ``accelerator.backward``), clipping at ``max_grad_norm`` and the Trainer's
  optimizer's ``step``/``zero_grad`` (the LR scheduler is not stepped);
  the training dataloader already exists but has not been iterated, and nothing of it is used;
* the Trainer's closing summary log (``train_runtime``, ...) closes the session and carries
  bsmon's final numbers; ``on_train_end`` closes it if that log did not come.
"""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler

import bsmon
from bsmon.integrations._profile import indexed_batches, profile_options, run_profile
from bsmon.probe import distributed
from bsmon.probe.monitor import unwrap_optimizer
from bsmon.profiling import Profile

#: The Trainer's closing summary (train_runtime, train_loss, ...) is not a step's numbers.
SUMMARY_KEY = "train_runtime"


class BsmonCallback(TrainerCallback):
    """Watches a ``transformers.Trainer`` run with :func:`bsmon.watch`.

    Keyword arguments go to ``bsmon.watch()`` (``name``, ``noise``, ``noise_budget``,
    ``batch_size``, ...). ``unit="tokens"`` counts tokens: ``tokens_per_sample`` is then
    read from the first training batch's ``input_ids`` (its sequence length) unless given.
    ``profile=True`` (or a dict of ``max_batch``, ``batch_sizes``, ``start``, ``warmup``, ``steps``)
    times micro-batch sizes on the job's own training step before the first step and restores
    the training state exactly (docs/integrations.md). ``monitor`` is the :class:`bsmon.Monitor`
    while training runs; ``profile`` the :class:`bsmon.profiling.Profile` once measured.
    """

    def __init__(self, *, profile: Any = False, **watch_options: Any) -> None:
        self.profile_options = profile_options(profile)
        self.profile: Profile | None = None
        self.watch_options = watch_options
        self.monitor: bsmon.Monitor | None = None
        self._pending: Any = None  # the hook that watches at the first forward (unit="tokens")
        self._length_check: Any = None
        self._in_front = False

    # -- Trainer events ---------------------------------------------------------
    def on_train_begin(self, args, state, control, model: nn.Module = None, optimizer=None, **kwargs) -> None:
        self._close()
        trainer = _calling_trainer(sys._getframe(1))
        self._in_front = trainer is not None and self._move_to_front(trainer.callback_handler)
        if trainer is not None and distributed.is_ddp(trainer.model_wrapped):
            model = trainer.model_wrapped  # DDP: its all-reduce gives the noise scale, as under torchrun
        options = dict(self.watch_options)
        make_batch = None
        if self.profile_options is not None:
            if trainer is None:
                raise RuntimeError("BsmonCallback(profile=True) could not find the Trainer that called it")
            make_batch = _trainer_batches(trainer)
        if options.get("unit") == "tokens" and options.get("tokens_per_sample") is None:
            if make_batch is None:
                self._pending = model.register_forward_pre_hook(
                    lambda module, a, kw: self._watch_at_first_forward(module, optimizer, a, kw), with_kwargs=True)
                return
            # The profile needs the session now: the length comes from the dataset's first sample,
            # the first training batch's is checked against it.
            with _rng_kept():  # a collator may draw random numbers (masking): training's must not move
                length = _sequence_length((), make_batch(1))
            if length is None:
                raise ValueError("BsmonCallback(unit='tokens') reads tokens per sample from the batch's input_ids "
                                 "([batch, sequence]), and this dataset's batches have none: pass "
                                 "tokens_per_sample=<tokens in one sample> to BsmonCallback")
            options["tokens_per_sample"] = length
            self._length_check = model.register_forward_pre_hook(
                lambda m, a, kw: self._check_length(length, m, a, kw), with_kwargs=True)
        self._watch(model, optimizer, options)
        if make_batch is not None:
            self._profile(trainer, model, make_batch)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs) -> None:
        if self.monitor is None or not logs:
            return
        if SUMMARY_KEY in logs:  # training is over: the loggers get bsmon's final numbers with the summary
            monitor = self.monitor
            self._close()
            logs.update(monitor.metrics())  # after close(): up to the last step
            return
        self.monitor.log(**{name: value for name, value in logs.items() if _is_number(value)
                            and not name.startswith("bsmon/")})
        if "loss" in logs:  # a training log, not an evaluation's
            logs.update(self.monitor.metrics())

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._close()

    # -- helpers ------------------------------------------------------------------
    def _move_to_front(self, handler: CallbackHandler) -> bool:
        """Put this callback first in the Trainer's list, so the logs it extends reach the loggers.

        The handler is iterating over that list (this is its ``on_train_begin``): moving the
        current item to index 0 neither skips nor repeats a callback.
        """
        if self not in handler.callbacks:
            return False
        handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        return True

    def _watch(self, model: nn.Module, optimizer, options: dict[str, Any]) -> None:
        self.monitor = bsmon.watch(model, optimizer, **options)
        if not self._in_front:
            self.monitor.warn("BsmonCallback could not put itself before the Trainer's loggers, so its "
                              "bsmon/ numbers reach only the loggers after it in Trainer.callback_handler")

    def _profile(self, trainer: Trainer, model: nn.Module, make_batch) -> None:
        """The sweep, each step as the Trainer's: ``training_step`` (one micro-batch, so no
        accumulation scaling), gradient clipping at ``max_grad_norm``, then its optimizer's
        ``step`` and ``zero_grad``."""
        if distributed.is_ddp(trainer.model_wrapped) or trainer.args.world_size > 1:
            self.monitor.warn("BsmonCallback(profile=True) profiles a single process; this job has "
                              f"{trainer.args.world_size} processes, so no profile was taken")
            return
        gradient_state = trainer.accelerator.gradient_state
        had_accumulation = "current_gradient_accumulation_steps" in vars(trainer)
        saved = (trainer.__dict__.get("current_gradient_accumulation_steps"), gradient_state.sync_gradients)
        trainer.current_gradient_accumulation_steps = 1
        gradient_state._set_sync_gradients(True)  # each sweep step is a whole optimizer step

        max_norm = trainer.args.max_grad_norm

        def step(batch) -> None:
            trainer.training_step(trainer.model_wrapped, batch)  # the model the loop steps (compiled, say)
            if max_norm is not None and max_norm > 0:  # as the Trainer's loop clips, before its step
                trainer.accelerator.clip_grad_norm_(model.parameters(), max_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()

        try:
            self.profile = run_profile(self.monitor, model, unwrap_optimizer(trainer.optimizer), make_batch, step,
                                       self.profile_options, scaler=trainer.accelerator.scaler)
        finally:
            gradient_state._set_sync_gradients(saved[1])
            if had_accumulation:
                trainer.current_gradient_accumulation_steps = saved[0]
            else:
                del trainer.current_gradient_accumulation_steps

    def _watch_at_first_forward(self, module: nn.Module, optimizer, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self._pending.remove()
        self._pending = None
        length = _sequence_length(args, kwargs)
        if length is None:
            raise ValueError("BsmonCallback(unit='tokens') reads tokens per sample from the batch's input_ids "
                             "([batch, sequence]), and this model's training forward has none: pass "
                             "tokens_per_sample=<tokens in one sample> to BsmonCallback")
        self._watch(module, optimizer, {**self.watch_options, "tokens_per_sample": length})
        # This forward's pre-hooks were collected before watch() added its own: count it by hand.
        self.monitor._on_forward_pre(module, args, kwargs)
        self._length_check = module.register_forward_pre_hook(
            lambda m, a, kw: self._check_length(length, m, a, kw), with_kwargs=True)

    def _check_length(self, length: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Tokens are counted as samples x the first batch's length: say so once if a batch differs."""
        current = _sequence_length(args, kwargs) if module.training else length
        if current is not None and current != length and self.monitor is not None:
            self.monitor.warn(f"a training batch has {current} tokens per sample where the first had {length}; "
                              f"bsmon counts {length} per sample. Pad to one length (padding='max_length') "
                              "or pass tokens_per_sample= to BsmonCallback")
            self._length_check.remove()
            self._length_check = None

    def _close(self) -> None:
        for handle in (self._pending, self._length_check):
            if handle is not None:
                handle.remove()
        self._pending = self._length_check = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


def _calling_trainer(frame) -> Trainer | None:
    """The Trainer whose training loop called this event, found up the call stack.

    Callbacks are not given the Trainer, and two things need it: its callback list (to
    run before the loggers) and ``model_wrapped`` (the DDP wrapper). None if not found.
    """
    for _ in range(8):  # call_event <- CallbackHandler.on_train_begin <- Trainer._inner_training_loop
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None


@contextlib.contextmanager
def _rng_kept():
    """Python's, NumPy's and torch's CPU random generators as they were, after the block."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def _trainer_batches(trainer: Trainer):
    """``make_batch(size)`` from the Trainer's training dataset and collator, with unused columns
    removed as its training dataloader removes them."""
    dataset, collator = trainer.train_dataset, trainer.data_collator
    if dataset is None:
        raise ValueError("BsmonCallback(profile=True) builds batches from Trainer.train_dataset, and it is None")
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="bsmon profile")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="bsmon profile")
    return indexed_batches(dataset, collator)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)


def _sequence_length(args: tuple, kwargs: dict) -> int | None:
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
