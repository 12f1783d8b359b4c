"""The job's session model on disk, so a monitor that attaches late starts where the job is.

A late monitor would otherwise rebuild the whole session from the records file before its
first full screen: about 6 s for a 1M-step backlog on a 2-core machine, and growing with the
run. The job keeps a ``SessionModel`` of its own anyway (``Monitor.stats()``; it ingests
every record the job publishes), with the charts' bounded history. Its background thread
writes that model here every few seconds (``publisher.MODEL_STATE_S``), with the byte offset of ``records.bsr``
that it covers; a late monitor loads it and asks the job for the records after that offset
only (the ``from`` of its attach record, docs/protocol.md).

The file is a first line ``bsmon-checkpoint``, a JSON header line (the code's fingerprint,
the session, the offset covered, the body's size and CRC32), then the body: the model,
pickled. Pickle, because the model's state (estimators, windows, binned history) is the
code's own objects: no other format would stay equal to it without a copy of every field.
A pickle runs code as it loads, so :func:`read` loads one only from a file that cannot be
anyone else's (owned by this user, writable by no one else, in the session's directory),
made by exactly this code (:func:`fingerprint`: objects pickled by other code do not mean
the same), whole (size and CRC), and naming only the classes the model is made of.
Anything else is refused with the reason, and the monitor reads the whole backlog instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bsmon.store import replace_file

if TYPE_CHECKING:
    from bsmon.model import SessionModel

CHECKPOINT_FILE = "model.ckpt"
MAGIC = b"bsmon-checkpoint\n"
#: What a checkpoint may name besides bsmon's classes and numpy's: numpy's array rebuilders, and containers.
_NUMPY_FUNCTIONS = frozenset(("_frombuffer", "_reconstruct", "scalar"))
_BUILTINS = frozenset(("set", "frozenset", "complex", "slice", "range", "bytearray"))
_COLLECTIONS = frozenset(("deque", "OrderedDict", "defaultdict", "Counter"))

_fingerprint: str | None = None


def fingerprint() -> str:
    """A hash of bsmon's own source files: a checkpoint is read only by the code that wrote it.
    The job hashes them when it starts (``Publisher``), so a bsmon upgraded in place under a
    running job does not pass for the code that job runs."""
    global _fingerprint
    if _fingerprint is None:
        digest = hashlib.sha256()
        package = Path(__file__).resolve().parent
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
        _fingerprint = digest.hexdigest()[:32]
    return _fingerprint


def encode(model_bytes: bytes, session: str, covers: int) -> bytes:
    """The checkpoint file's bytes for a pickled model covering ``covers`` bytes of the records."""
    header = {"fingerprint": fingerprint(), "session": session, "covers": covers,
              "size": len(model_bytes), "crc": zlib.crc32(model_bytes)}
    return MAGIC + json.dumps(header).encode() + b"\n" + model_bytes


def write(directory: Path, data: bytes) -> bool:
    """Replace the checkpoint atomically; False when it cannot be."""
    return replace_file(directory / CHECKPOINT_FILE, data)


def remove(directory: Path) -> None:
    """The job has ended: no monitor will attach to it (replay reads the records)."""
    try:
        (directory / CHECKPOINT_FILE).unlink()
    except OSError:
        pass


def read(directory: Path, session: str) -> "tuple[SessionModel, int] | str":
    """The job's model and the records' bytes it covers; or why there is none to use."""
    path = directory / CHECKPOINT_FILE
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return f"{path} is not this user's own file: not loaded"
            if handle.readline() != MAGIC:
                return f"{path} is not a bsmon checkpoint"
            header = json.loads(handle.readline())
            body = handle.read()
    except FileNotFoundError:
        return "the job has written no checkpoint yet"
    except (OSError, ValueError) as exc:
        return f"cannot read {path}: {exc}"
    if not isinstance(header, dict) or header.get("fingerprint") != fingerprint():
        return "the checkpoint was written by another bsmon release"
    if header.get("session") != session:
        return "the checkpoint is another session's"
    covers = header.get("covers")
    if type(covers) is not int or covers < 0 or header.get("size") != len(body) or header.get("crc") != zlib.crc32(body):
        return "the checkpoint is incomplete or damaged"
    from bsmon.model import SessionModel

    try:
        model = _Unpickler(io.BytesIO(body)).load()
    except Exception as exc:  # noqa: BLE001 - a damaged body can raise anything pickle can
        return f"the checkpoint does not load: {exc}"
    if not isinstance(model, SessionModel) or model.history is None:
        return "the checkpoint holds no session model with history"
    return model, covers


class _Unpickler(pickle.Unpickler):
    """Loads only what a session model is made of: classes (bsmon's, numpy's, a few containers) and
    numpy's array rebuilders, never another function (unpickling calls what it names)."""

    def find_class(self, module: str, name: str) -> Any:
        ours = module.startswith("bsmon.")
        numpy = module == "numpy" or module.startswith("numpy.")
        if ours or numpy or (module == "builtins" and name in _BUILTINS) or (module == "collections" and name in _COLLECTIONS):
            found = super().find_class(module, name)
            if isinstance(found, type) or (numpy and name in _NUMPY_FUNCTIONS):
                return found
        raise pickle.UnpicklingError(f"a checkpoint may not name {module}.{name}")
