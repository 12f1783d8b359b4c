import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SMALL = Path(__file__).resolve().parent / "jobs" / "train_small.py"


@pytest.fixture(autouse=True)
def bsmon_home(tmp_path, monkeypatch):
    """Every test gets its own BSMON_HOME so sessions never leak between tests."""
    home = tmp_path / "bsmon-home"
    monkeypatch.setenv("BSMON_HOME", str(home))
    for var in ("BSMON_SESSION_ID", "BSMON_NAME", "BSMON_RUN_NAME", "BSMON_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    return home


def bsmon_cli(*args, timeout=120, **kwargs):
    """Run the real `bsmon` command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "bsmon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def train_command(*args):
    return [sys.executable, str(TRAIN_SMALL), *args]


def start_job(*args, **kwargs):
    """Start the small training job as a plain process (not under `bsmon run`)."""
    return subprocess.Popen(train_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ), **kwargs)
