"""Which of the processes NVML lists belong to the job: PID namespaces and parent chains.

NVML reports PIDs as the driver sees them, in the initial (host) PID namespace: NVIDIA's
maintainers say the driver does not translate PIDs into a container's namespace. So a PID from
NVML means the process of that number in /proc only where this monitor runs in the initial
namespace, and the job's PID from its hello means the job only where the job and the monitor
share a namespace. :func:`pid_namespace` names a process's namespace for those comparisons.

The job's processes are the job's PID and its descendants. Rather than scan all of /proc every
sample (1.7 ms for 72 processes, 25-50 ms on a busy node, holding the GIL against the UI),
:class:`JobProcesses` walks up the parent chain of each PID NVML lists, usually a handful.
"""

from __future__ import annotations

import os
import re

# PROC_PID_INIT_INO in the kernel's include/linux/proc_ns.h: the initial PID namespace, fixed
# since Linux 3.8, which is the one NVML's PIDs belong to.
ROOT_PID_NAMESPACE = "pid:[4026531836]"
DEVICE_NODE = "/dev/nvidia{minor}"  # the character device a CUDA process holds open per GPU
_MAX_CHAIN = 4096  # parent links followed at most; a chain never loops, this only bounds a race


def pid_namespace(pid: int | str = "self") -> str | None:
    """The PID namespace of process ``pid``, as ``'pid:[<inode>]'``; None when unreadable."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def parent_of(pid: int) -> int | None:
    """The parent PID of ``pid``, or None when there is no such process here."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so cut at the last ")".
    after_comm = stat[stat.rfind(b")") + 2:].split()
    return int(after_comm[1]) if len(after_comm) >= 2 else None


class JobProcesses:
    """The job's process tree as seen from this PID namespace, for one sample.

    ``owns(pid)`` answers by walking ``pid``'s parent chain and remembers every process on the
    way, so a sample reads /proc/<pid>/stat about once per listed process and ancestor.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.alive = os.path.exists(f"/proc/{pid}")
        self._owned: dict[int, bool] = {pid: self.alive}

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is the job's process or one of its descendants (False when gone)."""
        chain: list[int] = []
        current: int | None = pid
        while current is not None and current not in self._owned and len(chain) < _MAX_CHAIN:
            chain.append(current)
            current = parent_of(current) if current > 1 else None
        answer = current is not None and self._owned.get(current, False)
        for member in chain:
            self._owned[member] = answer
        return answer

    @staticmethod
    def visible(pid: int) -> bool:
        """Whether this PID namespace has a process ``pid``."""
        return os.path.exists(f"/proc/{pid}")

    def open_device_minors(self) -> frozenset[int]:
        """Minor numbers of the NVIDIA device nodes the job's own process holds open.

        Only the job's process (the one that called ``bsmon.watch``, which holds its CUDA
        context), not its descendants: this is asked only when PIDs cannot be matched.
        """
        pattern = re.compile(re.escape(DEVICE_NODE).replace(r"\{minor\}", r"(\d+)") + "$")
        minors = set()
        try:
            descriptors = os.listdir(f"/proc/{self.pid}/fd")
        except OSError:
            return frozenset()
        for descriptor in descriptors:
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{descriptor}")
            except OSError:  # closed meanwhile
                continue
            found = pattern.match(target)
            if found:
                minors.add(int(found.group(1)))
        return frozenset(minors)
