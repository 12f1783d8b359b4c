"""bsmon for Lightning under its older package name: ``pytorch_lightning.Trainer(callbacks=[BsmonCallback()])``.

The same callback as bsmon.integrations.lightning, on ``pytorch_lightning.Callback``.
"""

from pytorch_lightning import Callback

from bsmon.integrations._lightning import LightningAdapter


class BsmonCallback(LightningAdapter, Callback):
    """Watches a ``pytorch_lightning.Trainer`` run with :func:`bsmon.watch`; ``monitor`` while it trains."""


__all__ = ["BsmonCallback"]
