"""bsmon: which batch size should this job train at, right now, on this hardware?

In a training script::

    import bsmon
    monitor = bsmon.watch(model, optimizer)

then watch it with ``bsmon run -- python train.py`` or ``bsmon attach``.
Attributes load lazily so ``import bsmon`` stays cheap in the job.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "watch": "bsmon.probe",
    "Monitor": "bsmon.probe",
    "BsmonWarning": "bsmon.probe",
    "Stats": "bsmon.model",
    "profile": "bsmon.profiling",
    "Profile": "bsmon.profiling",
    "profile_training": "bsmon.profiling",
    "optimal_batch_size": "bsmon.stats.optimal",
    "Recommendation": "bsmon.stats.optimal",
    "branch_check": "bsmon.branch",
    "BranchCheck": "bsmon.stats.branch",
    "Snapshot": "bsmon.snapshot",
    "load": "bsmon.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bsmon' has no attribute {name!r}")
