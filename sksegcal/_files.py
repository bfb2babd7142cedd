"""Atomic file writes: the one way sksegcal puts a file on disk.

A reader (or a crash) must never see half a file, and a failed write must never
destroy the file it was replacing. Everything is written to a temporary file in
the target's own folder (so the final ``os.replace`` is a rename, atomic on
POSIX and Windows), flushed and fsynced, then renamed over the target; the
folder is fsynced so that the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

#: Prefix of the temporary files; a store's clean-up removes leftovers of killed writers.
TMP_PREFIX = ".tmp-"


class HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._hash = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        self._hash.update(data)
        self.nbytes += len(data)
        return self._f.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames in a folder durable (a no-op where the OS cannot)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[HashingWriter], Any]
) -> tuple[str, int]:
    """Write ``path`` through ``write(file)`` atomically; return (sha256, size in bytes).

    ``write`` receives a binary file-like object with a ``write`` method. If it
    raises (or the process dies), ``path`` keeps its previous content and the
    temporary file is removed (a killed process leaves a ``.tmp-*`` file
    behind, never a partial ``path``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # durability of the rename; the data is already safe
        fsync_dir(path.parent)
    return writer.hexdigest(), writer.nbytes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> tuple[str, int]:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> tuple[str, int]:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    return atomic_write_bytes(path, data)


def atomic_write_via_path(path: str | os.PathLike, write_to: Callable[[Path], Any]) -> Path:
    """Atomic write for libraries that insist on writing to a path themselves.

    ``write_to(tmp_path)`` writes a temporary file beside ``path`` (joblib.dump,
    skops' dump, torch.save, np.savez ...); it is then fsynced and renamed over
    ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix or ".part",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)
    return path
