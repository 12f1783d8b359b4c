"""The controlling terminal going away (an SSH drop, a closed window, ``tmux kill-session``).

After a hang-up the terminal's fds stay open but every read returns end-of-file
or EIO and every write fails with EIO. A loop that keeps selecting on it spins
(Textual's input thread does: 100% of a core), and a write that fails can kill
the thread that drains the screen's output queue. So a view that sees the
hang-up points its output at /dev/null first, then leaves.
"""

from __future__ import annotations

import os
import select


def hung_up(fd: int) -> bool:
    """True if ``fd`` is a terminal (or pipe) whose other end is gone; never blocks."""
    poller = select.poll()
    try:
        poller.register(fd, 0)  # no events asked for: poll still reports hang-up and error
    except (OSError, ValueError):
        return True  # closed
    return any(mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, mask in poller.poll(0))


def silence_output() -> None:
    """Send whatever bsmon still writes (the screen's last frames, the detach message) to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)
