"""bsmon's terminal UI (Textual). Only the monitor imports this; the training job never does."""

from bsmon.tui.app import BsmonApp, JobControl

__all__ = ["BsmonApp", "JobControl"]
