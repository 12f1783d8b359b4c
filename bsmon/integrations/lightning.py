"""bsmon for Lightning 2.x: ``Trainer(callbacks=[BsmonCallback()])``.

Keyword arguments go to :func:`bsmon.watch` (``name``, ``noise``, ``noise_budget``,
``batch_size``, ...). How it fits into a Lightning run: bsmon/integrations/_lightning.py.
For the older package name, use ``bsmon.integrations.pytorch_lightning.BsmonCallback``.
"""

from lightning.pytorch import Callback

from bsmon.integrations._lightning import LightningAdapter


class BsmonCallback(LightningAdapter, Callback):
    """Watches a ``lightning.pytorch.Trainer`` run with :func:`bsmon.watch`; ``monitor`` while it trains."""


__all__ = ["BsmonCallback"]
