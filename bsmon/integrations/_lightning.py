"""The Lightning callback's body, shared by ``lightning.pytorch`` and ``pytorch_lightning``
(each package has its own ``Callback`` base class, which its Trainer checks for).

Where it fits in a Lightning run (2.x):

* ``on_train_start``: the optimizers exist and, under DDP, the process group and the
  DistributedDataParallel wrapper (``trainer.strategy.model``). The callback watches that
  wrapper under DDP, so the data-parallel noise estimator and one session per job work as
  under ``torchrun``; otherwise the LightningModule. A ``training_step`` that calls
  ``self.net(x)`` never runs the LightningModule's forward: bsmon then counts samples at
  the submodule it calls (bsmon/probe/entry.py).
* ``accumulate_grad_batches``: Lightning runs that many forward and backward passes per
  optimizer step, so bsmon sees the micro-batches as in a plain loop.
* ``on_train_batch_end`` after an optimizer step: what ``self.log`` logged in that step goes
  into the session, and bsmon's headline numbers go to Lightning's loggers through
  ``pl_module.log_dict`` as ``bsmon/...`` (sent at ``log_every_n_steps`` like the rest).
* ``profile=True``: at ``on_train_start``, once watching (the train dataloader exists there,
  not yet iterated), the callback times a sweep of micro-batch sizes
  (bsmon/integrations/_profile.py) on batches of the train dataloader's dataset through its
  ``collate_fn`` (read by index, as a Dataset's items: its sampler is not touched), moved by
  ``strategy.batch_to_device``; each step is the LightningModule's ``training_step`` under the
  precision plugin's ``train_step_context``, backward (through its GradScaler if any),
  ``configure_gradient_clipping`` when ``gradient_clip_val`` is set, and the optimizer's
  ``step``/``zero_grad``. Other hooks a loop step calls (``on_before_backward``,
  ``on_before_optimizer_step``, ...) are not called. The sweep runs outside Lightning's loops, so the step
  counters, loop state and LR schedulers are untouched; ``self.log`` calls in those steps are
  dropped (they are not training steps).
* ``on_train_end`` closes the session and sends bsmon's final numbers to the loggers;
  ``on_exception`` closes it as failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bsmon
from bsmon.integrations._profile import indexed_batches, profile_options, run_profile
from bsmon.probe import distributed
from bsmon.profiling import Profile


class LightningAdapter:
    """Mixed into each package's ``Callback``; see bsmon.integrations.lightning.BsmonCallback."""

    def __init__(self, *, profile: Any = False, **watch_options: Any) -> None:
        super().__init__()
        self.profile_options = profile_options(profile)
        self.profile: Profile | None = None
        self.watch_options = watch_options
        self.monitor: bsmon.Monitor | None = None
        self._global_step = 0
        self._logged: dict[str, Any] = {}  # name -> the value object last recorded

    def on_train_start(self, trainer, pl_module) -> None:
        self._close()
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ValueError("BsmonCallback needs an optimizer: configure_optimizers() returned none")
        model = trainer.strategy.model
        if not distributed.is_ddp(model):
            model = pl_module
        self.monitor = bsmon.watch(model, optimizers[0], **self.watch_options)
        if len(optimizers) > 1:
            first = optimizers[0]
            size = sum(p.numel() for group in first.param_groups for p in group["params"])
            self.monitor.warn(
                f"the LightningModule has {len(optimizers)} optimizers; bsmon watches the first "
                f"({type(first).__name__}, {size:,} parameters): its steps, its batch and the noise scale "
                "of its parameters")
        self._global_step = trainer.global_step
        self._logged = {}
        if self.profile_options is not None:
            self._profile(trainer, pl_module, optimizers[0])

    def _profile(self, trainer, pl_module, optimizer) -> None:
        if trainer.world_size > 1:
            self.monitor.warn("BsmonCallback(profile=True) profiles a single process; this job has "
                              f"{trainer.world_size} processes, so no profile was taken")
            return
        if not pl_module.automatic_optimization:
            raise ValueError("BsmonCallback(profile=True) runs training_step as a whole step, which needs "
                             "automatic optimization; with manual optimization use bsmon.profile_training")
        loader = trainer.train_dataloader
        if not hasattr(loader, "collate_fn"):
            raise ValueError("BsmonCallback(profile=True) builds batches from one train DataLoader's dataset and "
                             f"collate_fn, and this job's train dataloader is a {type(loader).__name__}")
        collated = indexed_batches(loader.dataset, loader.collate_fn)
        precision = trainer.precision_plugin
        scaler = getattr(precision, "scaler", None)

        def make_batch(size: int) -> Any:
            return trainer.strategy.batch_to_device(collated(size))

        def clip() -> None:  # Trainer(gradient_clip_val=...), through the module's own hook as Lightning does
            if trainer.gradient_clip_val:
                pl_module.configure_gradient_clipping(optimizer, trainer.gradient_clip_val,
                                                      trainer.gradient_clip_algorithm)

        def step(batch) -> None:
            with precision.train_step_context():
                output = pl_module.training_step(batch, 0)
            loss = output["loss"] if isinstance(output, Mapping) else output
            if loss is None:
                raise ValueError("BsmonCallback(profile=True): training_step returned no loss for a sweep batch")
            if scaler is None:
                loss.backward()
                clip()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                clip()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad()

        # The sweep's steps are not training steps: what training_step logs in them is dropped.
        pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
        try:
            self.profile = run_profile(self.monitor, pl_module, optimizer, make_batch, step, self.profile_options,
                                       scaler=scaler)
        finally:
            del pl_module.log, pl_module.log_dict

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None or trainer.global_step == self._global_step:
            return  # no optimizer step in this batch (accumulating)
        self._global_step = trainer.global_step
        logged = {name: value for name, value in trainer.logged_metrics.items()
                  if not name.startswith("bsmon/") and value is not self._logged.get(name)}
        self._logged.update(logged)
        if logged:
            self.monitor.log(**logged)
        metrics = self.monitor.metrics() if trainer.loggers else {}
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True)

    def on_train_end(self, trainer, pl_module) -> None:
        """Close the session, and give the loggers bsmon's final numbers (up to the last step:
        during training they are at most 0.25 s old, so a short run could end before them)."""
        monitor = self.monitor
        self._close()
        metrics = monitor.metrics() if monitor is not None else {}
        for logger in trainer.loggers if metrics else ():
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close(status="failed", error=f"{type(exception).__name__}: {exception}")
            self.monitor = None

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
