"""How an image is committed to a store, safely beside other writers, and how strays are removed.

The protocol (the contract is in docs/store.md, "Several writers"):

1. The image's two arrays are written under names no other write can use,
   ``<stem>.<token>.logits.npy`` and ``<stem>.<token>.labels.npy`` (a random
   token per write), each through a temporary file, fsynced and renamed.
2. The record, naming those exact files with their sizes and sha256 hashes, is
   written in full to a temporary file and fsynced.
3. The record is committed: a new image with ``os.link(tmp, <stem>.json)``,
   which fails if the record exists, so of two writers of one name exactly one
   wins and the other is refused (its files are removed); a replacement
   (``overwrite=True``, or an image whose record is damaged) with
   ``os.replace``, atomic, so readers see the old image or the new one, whole.

Data files are never written in place, so no interleaving of writers can pair
the logits of one with the labels of another: a record is the commit of one
writer's two files. A writer killed at any step leaves at most files no record
names, which ``LogitStore.clean`` deletes once they are older than a grace
period.

May import: the standard library, numpy, :mod:`sksegcal._files` and ``._format``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np

from .._files import TMP_PREFIX, HashingWriter, atomic_write, fsync_dir
from ._format import IMAGES, KINDS, data_file_name, is_data_file_of, stem


class ImageConflictError(ValueError):
    """Another writer committed the same image name first."""


def _write_npy(path: Path, array: np.ndarray) -> tuple[str, int]:
    array = np.ascontiguousarray(array)
    return atomic_write(path, lambda f: np.lib.format.write_array(f, array, allow_pickle=False))


def _write_tmp(folder: Path, data: bytes, suffix: str) -> Path:
    """A complete, fsynced temporary file holding ``data``."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            HashingWriter(f).write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _link_exclusive(tmp: Path, target: Path) -> bool:
    """Create ``target`` with the content of ``tmp`` only if it does not exist.

    ``os.link`` is atomic and fails with EEXIST; where a filesystem has no hard
    links, ``O_CREAT | O_EXCL`` claims the name and the content is written
    after (a reader can then, for a moment, see an incomplete record, which it
    reports as damaged). Returns False when ``target`` already exists.
    """
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                             errno.EXDEV, errno.ENOSYS):
            raise
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(tmp.read_bytes())
        f.flush()
        os.fsync(f.fileno())
    return True


def commit_image(
    store_path: Path,
    name: int | str,
    arrays: dict[str, np.ndarray],
    fields: dict,
    *,
    replace: bool,
) -> dict:
    """Write an image's arrays and commit its record; return the record.

    Raises :class:`ImageConflictError` when ``replace`` is False and another
    writer committed the name first; nothing of this write is left then.
    """
    images = store_path / IMAGES
    stem_ = stem(name)
    rec_path = images / f"{stem_}.json"
    token = secrets.token_hex(8)
    written: list[Path] = []
    tmp = None
    try:
        files = {}
        for kind in KINDS:
            file = images / data_file_name(stem_, token, kind)
            written.append(file)
            digest, nbytes = _write_npy(file, arrays[kind])
            files[kind] = {"file": file.name, "bytes": nbytes, "sha256": digest}
        record = {"name": name, **fields, "files": files}
        data = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
        tmp = _write_tmp(images, data, ".part")
        if replace:
            os.replace(tmp, rec_path)
            tmp = None
        elif not _link_exclusive(tmp, rec_path):
            raise ImageConflictError(
                f"Image {name!r} was added to the store {store_path} by another writer while "
                f"this one was writing it ({rec_path.name} appeared); this write is discarded "
                "and the store keeps the other writer's complete image. Pass overwrite=True "
                "to replace it, or give each writer its own image names."
            )
    except BaseException:
        for file in written:
            with contextlib.suppress(OSError):
                file.unlink()
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    fsync_dir(images)
    return record


def remove_files_of(store_path: Path, record, keep: dict) -> None:
    """Delete the data files of a replaced record (only plain names of its own image)."""
    try:
        stem_ = stem(record["name"])
        old = {kind: record["files"][kind]["file"] for kind in KINDS}
    except (KeyError, TypeError, ValueError):
        return
    keep_files = {keep[kind]["file"] for kind in KINDS}
    for kind, file in old.items():
        if isinstance(file, str) and is_data_file_of(file, stem_, kind) and file not in keep_files:
            with contextlib.suppress(OSError):
                (store_path / IMAGES / file).unlink()


def stray_candidates(store_path: Path, grace_seconds: float) -> list[Path]:
    """Files that may be strays: temporary files and arrays, older than the grace period.

    List these *before* reading the records; a file is a stray if it is in this
    list and no record read after it names it.
    """
    now = time.time()
    found = []
    for folder, arrays_too in ((store_path, False), (store_path / IMAGES, True)):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            is_tmp = entry.name.startswith(TMP_PREFIX)
            if not is_tmp and not (arrays_too and entry.name.endswith(".npy")):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if age > grace_seconds:
                found.append(Path(entry.path))
    return found
