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
* the Trainer's closing summary log (``train_runtime``, ...) closes the session and carries
  bsmon's final numbers; ``on_train_end`` closes it if that log did not come.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler

import bsmon
from bsmon.probe import distributed

#: The Trainer's closing summary (train_runtime, train_loss, ...) is not a step's numbers.
SUMMARY_KEY = "train_runtime"


class BsmonCallback(TrainerCallback):
    """Watches a ``transformers.Trainer`` run with :func:`bsmon.watch`.

    Keyword arguments go to ``bsmon.watch()`` (``name``, ``noise``, ``noise_budget``,
    ``batch_size``, ...). ``unit="tokens"`` counts tokens: ``tokens_per_sample`` is then
    read from the first training batch's ``input_ids`` (its sequence length) unless given.
    ``monitor`` is the :class:`bsmon.Monitor` while training runs.
    """

    def __init__(self, **watch_options: Any) -> None:
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
        if options.get("unit") == "tokens" and options.get("tokens_per_sample") is None:
            self._pending = model.register_forward_pre_hook(
                lambda module, a, kw: self._watch_at_first_forward(module, optimizer, a, kw), with_kwargs=True)
            return
        self._watch(model, optimizer, options)

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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)


def _sequence_length(args: tuple, kwargs: dict) -> int | None:
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
