"""The part of bsmon that runs inside the training job (torch, numpy, stdlib only)."""

from bsmon.probe.monitor import BsmonWarning, Monitor, active_monitor, watch

__all__ = ["BsmonWarning", "Monitor", "active_monitor", "watch"]
