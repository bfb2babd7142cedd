"""Per-image logits on disk: the LogitStore and out-of-core fitting/evaluation.

A segmentation validation set at full resolution does not fit in memory
(ADE20K: about 500M pixels x 150 classes, 150 GB in float16). A
:class:`LogitStore` keeps one ``.npy`` file per image on disk and reads it in
row blocks, so every pass over the data (sampling a training table,
evaluating calibrators, writing calibrated maps) holds one block at a time.

Layout of a store directory::

    manifest.json                 format, classes, ignore index, dtypes, source, split
    images/<stem>.logits.npy      float16 (C, H, W) logits (or probabilities)
    images/<stem>.labels.npy      uint8/uint16 (H, W) labels
    images/<stem>.json            the image's record: name, shape, pixel counts,
                                  size and sha256 of both arrays

Every file is written to a temporary file in the same directory, fsynced and
renamed into place, and an image's record is written last. A record is the
image's commit mark: a writer killed at any moment leaves either a complete
image or no image (plus, at worst, stray temporary files), and writing resumes
with :meth:`LogitStore.missing`. Records are one file per image rather than
one list in the manifest so that adding an image costs O(1) (rewriting a
growing manifest would be O(n_images) per image) and so that several
processes or machines can extract different images into one store on shared
storage without contending for one file.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import json
import numbers
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._kernels import argmax_rows
from ._validation import check_finite, check_ignore_index, check_labels, check_random_state_int
from .features import softmax
from .pixels import ImageSplit, split_images

__all__ = [
    "LogitStore",
    "StoredImage",
    "evaluate_store",
    "fit_store",
    "predict_store",
]

FORMAT_NAME = "sksegcal.LogitStore"
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_IMAGES = "images"
_TMP_PREFIX = ".tmp-"
_VALUE_DTYPE = np.dtype("<f2")
# names usable as file stems as they are; anything else is escaped + hashed
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_SPLIT_PARTS = ("train", "validation", "test")
# values (pixels x classes) per chunk: 16 MB as float32, whatever the class count
DEFAULT_CHUNK_VALUES = 1 << 22
DEFAULT_TASK_PIXELS = 4_000_000


class StoredImage(NamedTuple):
    """One image of a store: its id, name and memory-mapped arrays."""

    id: int
    name: int | str
    logits: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------- file helpers
class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, f):
        self._f = f
        self._hash = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        self._hash.update(data)
        self.nbytes += len(data)
        return self._f.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _fsync_dir(path: Path) -> None:
    # makes the renames in the directory durable; not possible (or needed) on Windows
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> tuple[str, int]:
    """Write ``path`` through ``write(file)`` atomically; return (sha256, size)."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return writer.hexdigest(), writer.nbytes


def _write_npy(path: Path, array: np.ndarray) -> tuple[str, int]:
    array = np.ascontiguousarray(array)
    return _atomic_write(path, lambda f: np.lib.format.write_array(f, array, allow_pickle=False))


def _write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


def _file_sha256(path: Path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an open .npy file."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype, fortran, f.tell()


def _label_dtype(n_classes: int, ignore_index: int | None) -> np.dtype:
    lo = min(0, ignore_index if ignore_index is not None else 0)
    hi = max(n_classes - 1, ignore_index if ignore_index is not None else 0)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype).newbyteorder("<")
    raise ValueError(f"labels in [{lo}, {hi}] do not fit a 32-bit integer.")


def _check_name(name) -> int | str:
    if isinstance(name, (bool, np.bool_)) or not isinstance(name, (numbers.Integral, str)):
        raise TypeError(f"an image name must be an int or a str, got {name!r}.")
    if isinstance(name, str):
        if not name or name != name.strip():
            raise ValueError(f"image name {name!r} is empty or has surrounding whitespace.")
        return name
    return int(name)


def _stem(name: int | str) -> str:
    text = str(name)
    # ints and strs that print alike ("5" and 5) must not share files: digit strings
    # take the hashed form
    if _SAFE_NAME.fullmatch(text) and (isinstance(name, int) or not text.isdigit()):
        return text
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:60].lstrip(".")
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _sort_key(name: int | str):
    # integer names in numeric order, then strings; independent of writing order
    return (0, name, "") if isinstance(name, int) else (1, 0, name)


def _argmax_planes(z: np.ndarray) -> np.ndarray:
    """``z.argmax(axis=0)`` of a (C, H, W) array, plane by plane.

    About 2x faster than numpy's strided float16 argmax; ``>`` keeps the first
    of tied maxima, as argmax does (sample() recounts with argmax and must agree).
    """
    best = z[0].astype(np.float32)
    arg = np.zeros(best.shape, dtype=np.int64)
    for k in range(1, z.shape[0]):
        plane = z[k].astype(np.float32)
        arg[plane > best] = k
        np.maximum(best, plane, out=best)
    return arg


def _resolve_seed(random_state) -> int:
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return int(random_state)
    return int(check_random_state_int(random_state).integers(2**63 - 1))


def _largest_remainder(weights: np.ndarray, total: int, minimum: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total``, at least ``minimum``."""
    exact = weights * (total / weights.sum())
    take = np.maximum(np.floor(exact).astype(np.int64), minimum)
    short = total - int(take.sum())
    if short > 0:
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        take[order[:short]] += 1
    return take


# --------------------------------------------------------------------------- the store
class LogitStore:
    """A directory of per-image logits and labels, read in bounded memory.

    Create one with :meth:`create`, open one with :meth:`open`; do not call
    the constructor. See the module docstring for the layout and the
    crash-safety guarantees.

    Attributes
    ----------
    path : Path
        The store directory.
    n_classes : int
    class_names : list of str or None
    ignore_index : int or None
        Label of unlabelled pixels, dropped by every pixel-table reader.
    values : {"logits", "probabilities"}
        What the float16 arrays hold; :func:`predict_store` writes probabilities.
    source : dict
        Free-form description of the model and data the arrays came from.
    image_names : list of int or str
        Names of the complete images, integers in numeric order then strings.
        An image's *id* is its position in this list; ids are what ``groups``
        arrays hold and what ``images=`` arguments take.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sksegcal.store import LogitStore
    >>> rng = np.random.default_rng(0)
    >>> path = tempfile.mkdtemp() + "/store"
    >>> store = LogitStore.create(path, n_classes=3, source={"model": "toy"})
    >>> for name in range(4):
    ...     logits = rng.normal(size=(3, 8, 8)).astype(np.float32)
    ...     labels = rng.integers(0, 3, size=(8, 8))
    ...     _ = store.add_image(name, logits, labels)
    >>> store = LogitStore.open(path)
    >>> len(store), store.n_pixels, store.missing(range(6))
    (4, 256, [4, 5])
    >>> sum(X.shape[0] for X, y, groups in store.iter_chunks(100))
    256
    """

    def __init__(self, path, manifest: dict, records: dict):
        self.path = Path(path)
        self._manifest = manifest
        self._records = records
        self._on_damaged = "raise"
        self.damaged: list = []
        self._reindex()

    # ------------------------------------------------------------- creating / opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        n_classes: int,
        class_names: Iterable[str] | None = None,
        ignore_index: int | None = 255,
        values: str = "logits",
        source: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
        match_source: bool | Iterable[str] = True,
    ) -> LogitStore:
        """Create an empty store, or with ``exist_ok`` resume an existing one.

        Parameters
        ----------
        path : str or path-like
            Directory of the store; created if absent.
        n_classes : int
            Number of classes (the logits' first axis).
        class_names : iterable of str, optional
            One name per class.
        ignore_index : int or None, default=255
            Label of unlabelled pixels.
        values : {"logits", "probabilities"}, default="logits"
        source : mapping, optional
            JSON-serialisable description of the model and data (config,
            checkpoint, dataset, resolution, ...), kept in the manifest.
        exist_ok : bool, default=False
            If the store exists, open it instead of failing, after checking
            that its class count, class names, ignore index and values agree:
            this is how an interrupted extraction resumes.
        match_source : bool or iterable of str, default=True
            When resuming a store that already holds images, which entries of
            ``source`` must equal the recorded ones: True, every key both
            have; a list, those keys (e.g. the checkpoint, but not a library
            version that may change between runs); False, none. A difference
            raises ValueError, since resuming would mix the logits of two
            models or datasets. A store without images takes the new source.

        Returns
        -------
        LogitStore
        """
        path = Path(path)
        if not isinstance(n_classes, numbers.Integral) or n_classes < 2:
            raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}.")
        n_classes = int(n_classes)
        ignore_index = check_ignore_index(ignore_index)
        if values not in ("logits", "probabilities"):
            raise ValueError(f"values must be 'logits' or 'probabilities', got {values!r}.")
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != n_classes:
                raise ValueError(
                    f"class_names has {len(class_names)} names for {n_classes} classes."
                )
        source = dict(source or {})
        try:
            json.dumps(source)
        except TypeError as exc:
            raise TypeError(f"source must be JSON-serialisable: {exc}") from None
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "n_classes": n_classes,
            "class_names": class_names,
            "ignore_index": ignore_index,
            "values": values,
            "dtypes": {
                "values": _VALUE_DTYPE.str,
                "labels": _label_dtype(n_classes, ignore_index).str,
            },
            "checksum": "sha256",
            "source": source,
            "split": None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        if (path / _MANIFEST).exists():
            if not exist_ok:
                raise FileExistsError(
                    f"{path} already holds a LogitStore; open it with LogitStore.open, or "
                    "pass exist_ok=True to resume writing into it."
                )
            store = cls.open(path)
            for key in ("n_classes", "class_names", "ignore_index", "values"):
                if store._manifest[key] != manifest[key]:
                    raise ValueError(
                        f"The store at {path} has {key}={store._manifest[key]!r} but "
                        f"{manifest[key]!r} was asked for; write to a new directory."
                    )
            store._resume_source(source, match_source)
            return store
        (path / _IMAGES).mkdir(parents=True, exist_ok=True)
        _write_json(path / _MANIFEST, manifest)
        _fsync_dir(path)
        return cls(path, manifest, {})

    def _resume_source(self, source: dict, match_source) -> None:
        recorded = self._manifest.get("source") or {}
        if not len(self):
            if source and source != recorded:
                self._manifest["source"] = source
                _write_json(self.path / _MANIFEST, self._manifest)
            return
        if match_source is True:
            keys = sorted(set(recorded) & set(source))
        elif match_source is False:
            keys = []
        elif isinstance(match_source, str):
            keys = [match_source]
        else:
            keys = list(match_source)
        for key in keys:
            if key in recorded and key in source and recorded[key] != source[key]:
                raise ValueError(
                    f"The store at {self.path} holds {len(self)} images from "
                    f"{key}={recorded[key]!r}, not {source[key]!r}; resuming would mix "
                    "the two. Write to a new directory (or pass match_source to compare "
                    "fewer keys)."
                )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        n_classes: int | None = None,
        on_damaged: str = "raise",
    ) -> LogitStore:
        """Open an existing store.

        Checks the manifest and that every recorded file exists with its
        recorded size (cheap: one ``stat`` per file), which catches missing and
        truncated files; :meth:`verify` checks the content against the
        checksums.

        Parameters
        ----------
        path : str or path-like
        n_classes : int, optional
            If given, the store must have this many classes.
        on_damaged : {"raise", "missing"}, default="raise"
            What to do with an image whose files are missing or have the wrong
            size: raise a ValueError, or leave it out of the store (listed by
            :meth:`missing`, in :attr:`damaged`) so that it can be added again.

        Returns
        -------
        LogitStore
        """
        if on_damaged not in ("raise", "missing"):
            raise ValueError(f"on_damaged must be 'raise' or 'missing', got {on_damaged!r}.")
        path = Path(path)
        manifest_path = path / _MANIFEST
        if not manifest_path.is_file():
            raise ValueError(
                f"{path} is not a LogitStore: {_MANIFEST} is missing. Create one with "
                "LogitStore.create (an interrupted create leaves no manifest; create again)."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"The manifest {manifest_path} is corrupt: {exc}.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{manifest_path} is not a {FORMAT_NAME} manifest.")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {manifest.get('format_version')}; this sksegcal "
                f"reads version {FORMAT_VERSION}."
            )
        if n_classes is not None and manifest["n_classes"] != n_classes:
            raise ValueError(
                f"The store at {path} holds {manifest['n_classes']} classes, not {n_classes}; "
                "it was extracted from another model or dataset."
            )
        store = cls(path, manifest, {})
        store._on_damaged = on_damaged
        store.refresh()
        return store

    def refresh(self) -> LogitStore:
        """Re-read the image records, e.g. while another process writes."""
        records, damaged = {}, set()
        for rec_path in sorted((self.path / _IMAGES).glob("*.json")):
            if rec_path.name.startswith(_TMP_PREFIX):
                continue
            try:
                record = json.loads(rec_path.read_text())
                name = _check_name(record["name"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"The image record {rec_path} is corrupt: {exc!r}.") from None
            try:
                self._check_files(record, rec_path)
            except ValueError:
                if self._on_damaged == "raise":
                    raise
                damaged.add(name)
                continue
            records[name] = record
        self._records = records
        self.damaged = sorted(damaged, key=_sort_key)
        self._reindex()
        return self

    def _check_files(self, record: dict, where) -> None:
        for kind, info in record["files"].items():
            file = self.path / _IMAGES / info["file"]
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                raise ValueError(
                    f"The store {self.path} is corrupt: {kind} file {file.name} of image "
                    f"{record['name']!r} is missing ({where}). Open the store with "
                    "on_damaged='missing' and add the image again."
                ) from None
            if size != info["bytes"]:
                raise ValueError(
                    f"The store {self.path} is corrupt: {kind} file {file.name} of image "
                    f"{record['name']!r} has {size} bytes, its record says {info['bytes']} "
                    "(truncated or overwritten). Open the store with on_damaged='missing' "
                    "and add the image again."
                )

    def _reindex(self) -> None:
        self._names = sorted(self._records, key=_sort_key)
        self._ids = {name: i for i, name in enumerate(self._names)}

    def __getstate__(self):
        # a store pickles as its path and records, never as arrays
        return {"path": str(self.path), "manifest": self._manifest, "records": self._records}

    def __setstate__(self, state):
        self.__init__(state["path"], state["manifest"], state["records"])

    # ------------------------------------------------------------------ properties
    @property
    def manifest(self) -> dict:
        """A copy of the manifest."""
        return json.loads(json.dumps(self._manifest))

    n_classes = property(lambda self: self._manifest["n_classes"])
    class_names = property(lambda self: self._manifest["class_names"])
    ignore_index = property(lambda self: self._manifest["ignore_index"])
    values = property(lambda self: self._manifest["values"])
    source = property(lambda self: dict(self._manifest["source"]))
    labels_dtype = property(lambda self: np.dtype(self._manifest["dtypes"]["labels"]))

    @property
    def image_names(self) -> list:
        return list(self._names)

    @property
    def n_images(self) -> int:
        return len(self._names)

    @property
    def n_pixels(self) -> int:
        """Number of labelled (not ignored) pixels over all images."""
        return sum(r["n_valid"] for r in self._records.values())

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._records

    def __repr__(self) -> str:
        return (
            f"LogitStore({str(self.path)!r}, n_images={self.n_images}, "
            f"n_classes={self.n_classes}, values={self.values!r})"
        )

    def image_id(self, name) -> int:
        """The id (position in :attr:`image_names`) of the image called ``name``."""
        try:
            return self._ids[name]
        except KeyError:
            raise KeyError(f"The store {self.path} has no image named {name!r}.") from None

    def record(self, image) -> dict:
        """A copy of the record (shape, pixel counts, files, checksums) of an image id."""
        return json.loads(json.dumps(self._records[self._names[self._as_ids(image)[0]]]))

    # ------------------------------------------------------------------ writing
    def add_image(self, name, logits, labels, *, overwrite: bool = False) -> int:
        """Write one image atomically and return its id.

        Parameters
        ----------
        name : int or str
            The image's name, e.g. its index or file stem in the dataset.
        logits : array-like of shape (C, H, W)
            Logits (or probabilities for a ``values="probabilities"`` store);
            stored as float16.
        labels : array-like of shape (H, W)
            Class indices or the ignore index.
        overwrite : bool, default=False
            Replace an image of the same name instead of raising.

        Returns
        -------
        image_id : int
            Position of the image in :attr:`image_names` (ids of later-sorted
            images shift when an image is inserted before them).
        """
        name = _check_name(name)
        if name in self._records and not overwrite:
            raise ValueError(
                f"Image {name!r} is already in {self.path}; pass overwrite=True to replace "
                "it, or skip the names that store.missing() does not list."
            )
        z = np.asarray(logits)
        t = np.asarray(labels)
        c = self.n_classes
        if z.ndim != 3 or z.shape[0] != c:
            raise ValueError(
                f"logits of image {name!r} must have shape ({c}, H, W) for this "
                f"{c}-class store, got {z.shape}."
            )
        if t.shape != z.shape[1:]:
            raise ValueError(
                f"labels of image {name!r} have shape {t.shape} but its logits are "
                f"{z.shape[1:]} (H, W); resize the labels (nearest) or the logits first."
            )
        t = check_labels(t, c, self.ignore_index, where=f"labels of image {name!r}")
        with np.errstate(over="ignore"):
            z16 = np.ascontiguousarray(z, dtype=_VALUE_DTYPE)
        check_finite(z16, where=f"logits of image {name!r} (after the cast to float16)")
        t = np.ascontiguousarray(t, dtype=self.labels_dtype)
        keep = self._keep(t)
        n_valid = int(keep.sum())
        # correctness counts let sample() allocate a stratified sample in one pass
        n_correct = int(((_argmax_planes(z16) == t) & keep).sum())

        stem = _stem(name)
        images = self.path / _IMAGES
        rec_path = images / f"{stem}.json"
        if rec_path.exists():
            other = json.loads(rec_path.read_text()).get("name")
            if other != name:
                # e.g. "A" and "a" on a case-insensitive filesystem
                raise ValueError(
                    f"Image names {name!r} and {other!r} map to the same file {rec_path.name} "
                    "here; rename one of them."
                )
            if not overwrite and name not in self.damaged:  # written by another process
                raise ValueError(
                    f"Image {name!r} is already in {self.path}; pass overwrite=True to replace it."
                )
        if overwrite and rec_path.exists():
            # un-commit first so a crash mid-overwrite leaves a missing image, not a mix
            rec_path.unlink()
            _fsync_dir(images)
        files = {}
        for kind, array in (("logits", z16), ("labels", t)):
            file = f"{stem}.{kind}.npy"
            digest, nbytes = _write_npy(images / file, array)
            files[kind] = {"file": file, "bytes": nbytes, "sha256": digest}
        _fsync_dir(images)
        record = {
            "name": name,
            "height": int(z.shape[1]),
            "width": int(z.shape[2]),
            "n_valid": n_valid,
            "n_correct": n_correct,
            "files": files,
        }
        _write_json(rec_path, record)
        _fsync_dir(images)
        self._records[name] = record
        self._reindex()
        return self._ids[name]

    def missing(self, expected: Iterable) -> list:
        """The names in ``expected`` that the store does not hold (in their order).

        Use it to resume an interrupted extraction::

            for name in store.missing(dataset_names):
                store.add_image(name, *extract(name))
        """
        self.refresh()
        return [name for name in expected if _check_name(name) not in self._records]

    # ------------------------------------------------------------------ checking
    def verify(self, *, checksums: bool = True) -> dict:
        """Check every image against its record; raise ValueError on any problem.

        Reads every byte of the store to recompute the sha256 checksums
        (about 1.5 GB/s per core with hardware SHA; 1-2 s per 2 GB). With
        ``checksums=False`` only sizes and headers are checked.

        Returns
        -------
        report : dict
            ``n_images``, ``bytes`` (total size of the arrays) and
            ``stray_files``: temporary files of interrupted writes and arrays
            without a record, safe to delete once no writer is running.
        """
        problems = []
        total = 0
        self.refresh()
        for name in self._names:
            record = self._records[name]
            for kind, info in record["files"].items():
                file = self.path / _IMAGES / info["file"]
                total += info["bytes"]
                try:
                    with open(file, "rb") as f:
                        shape, dtype, fortran, _ = _npy_header(f)
                except (OSError, ValueError) as exc:
                    problems.append(f"{file.name}: unreadable header ({exc})")
                    continue
                want = self._expected_array(record, kind)
                if (shape, dtype, fortran) != want:
                    problems.append(f"{file.name}: header {shape} {dtype} differs from {want}")
                elif checksums and _file_sha256(file) != info["sha256"]:
                    problems.append(f"{file.name}: checksum mismatch (content corrupted)")
        if problems:
            raise ValueError(
                f"The store {self.path} is corrupt; {len(problems)} problem(s): "
                + "; ".join(problems[:10])
                + ". Re-add the affected images with add_image(..., overwrite=True)."
            )
        known = {r["files"][k]["file"] for r in self._records.values() for k in r["files"]}
        known |= {f"{_stem(n)}.json" for n in self._records}
        stray = sorted(p.name for p in (self.path / _IMAGES).iterdir() if p.name not in known)
        return {"n_images": self.n_images, "bytes": total, "stray_files": stray}

    def _expected_array(self, record, kind):
        h, w = record["height"], record["width"]
        if kind == "logits":
            return (self.n_classes, h, w), _VALUE_DTYPE, False
        return (h, w), self.labels_dtype, False

    # ------------------------------------------------------------------ reading
    def _keep(self, t: np.ndarray) -> np.ndarray:
        if self.ignore_index is None:
            return np.ones(t.shape, bool)
        return t != self.ignore_index

    def _as_ids(self, images) -> np.ndarray:
        """Image ids from None, a split part name, ids or a boolean mask."""
        if images is None:
            return np.arange(self.n_images)
        if isinstance(images, str):
            split = self.split
            if images not in _SPLIT_PARTS:
                raise ValueError(
                    f"images={images!r}: a string must name a split part {_SPLIT_PARTS}."
                )
            if split is None:
                raise ValueError(
                    f"images={images!r} but {self.path} has no recorded split; call "
                    "store.make_split(...) or set store.split first."
                )
            return np.asarray(getattr(split, images))
        ids = np.atleast_1d(np.asarray(images))
        if ids.dtype == bool:
            if ids.shape != (self.n_images,):
                raise ValueError(f"a boolean images mask must have shape ({self.n_images},).")
            return np.flatnonzero(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(
                "images must hold integer image ids (positions in store.image_names); map "
                "names with store.image_id(name)."
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_images):
            raise ValueError(f"image ids must be in [0, {self.n_images}), got {ids}.")
        return ids.astype(np.int64)

    def _paths(self, image_id: int) -> tuple[dict, Path, Path]:
        record = self._records[self._names[image_id]]
        images = self.path / _IMAGES
        return (
            record,
            images / record["files"]["logits"]["file"],
            images / record["files"]["labels"]["file"],
        )

    def load_image(self, image_id: int) -> StoredImage:
        """The memory-mapped arrays of one image."""
        (image_id,) = self._as_ids(image_id)
        record, logits_path, labels_path = self._paths(image_id)
        try:
            z = np.load(logits_path, mmap_mode="r", allow_pickle=False)
            t = np.load(labels_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"Image {record['name']!r} of {self.path} cannot be read ({exc}); "
                "run store.verify() and re-add it."
            ) from None
        for kind, a in (("logits", z), ("labels", t)):
            if (a.shape, a.dtype, False) != self._expected_array(record, kind):
                raise ValueError(
                    f"{kind} of image {record['name']!r} in {self.path} have shape "
                    f"{a.shape} and dtype {a.dtype}, not what its record says."
                )
        return StoredImage(int(image_id), self._names[image_id], z, t)

    def iter_images(self, images=None) -> Iterator[StoredImage]:
        """Yield :class:`StoredImage` tuples (memory-mapped, read lazily).

        Parameters
        ----------
        images : None, "train", "validation", "test", array of ids or mask
            Which images; all by default.
        """
        for image_id in self._as_ids(images):
            yield self.load_image(image_id)

    def _iter_blocks(self, image_id: int, block_pixels: int):
        """Yield (logits (C, rows, W) float16, labels (rows, W)) row blocks of an image.

        Reads each class plane's rows with ``readinto`` rather than through a
        memory map, so memory (and RSS, which counts mapped pages) stays at one
        block however large the image.
        """
        record, logits_path, labels_path = self._paths(image_id)
        c, h, w = self.n_classes, record["height"], record["width"]
        rows = max(1, min(h, block_pixels // max(w, 1)))
        labels = np.load(labels_path, allow_pickle=False)
        if labels.shape != (h, w):
            raise ValueError(f"labels of image {record['name']!r} have shape {labels.shape}.")
        itemsize = _VALUE_DTYPE.itemsize
        with open(logits_path, "rb", buffering=0) as f:
            shape, dtype, _, offset = _npy_header(f)
            if shape != (c, h, w) or dtype != _VALUE_DTYPE:
                raise ValueError(
                    f"logits of image {record['name']!r} have shape {shape}, dtype {dtype}; "
                    f"its record says ({c}, {h}, {w}) float16. Run store.verify()."
                )
            buf = np.empty((c, rows, w), dtype=_VALUE_DTYPE)
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                block = buf[:, : r1 - r0]
                for k in range(c):
                    f.seek(offset + (k * h + r0) * w * itemsize)
                    view = memoryview(block[k]).cast("B")
                    if f.readinto(view) != view.nbytes:
                        raise ValueError(
                            f"logits of image {record['name']!r} are truncated; run "
                            "store.verify() and re-add the image."
                        )
                yield block, labels[r0:r1]

    def _chunk_pixels(self, chunk_pixels: int | None) -> int:
        if chunk_pixels is None:
            return max(1, DEFAULT_CHUNK_VALUES // self.n_classes)
        if not isinstance(chunk_pixels, numbers.Integral) or chunk_pixels < 1:
            raise ValueError(f"chunk_pixels must be an integer >= 1, got {chunk_pixels!r}.")
        return int(chunk_pixels)

    def _iter_image_tables(self, image_id: int, chunk_pixels: int, drop_ignored: bool = True):
        """Yield (X float32 (n, C), y int64) of the kept pixels of one image.

        ``drop_ignored=False`` keeps every pixel (labels ``ignore_index``
        included) and skips only blocks with nothing kept: metrics skip
        ignored labels themselves, and compacting costs a copy of the block.
        """
        import torch

        for z, t in self._iter_blocks(image_id, chunk_pixels):
            keep = self._keep(t).ravel()
            if not drop_ignored and not keep.any():
                continue
            # one pass from class-major float16 to pixel-major float32: torch casts
            # while it transposes, ~2x numpy's cast then transposing copy
            x = np.empty((keep.size, self.n_classes), dtype=np.float32)
            torch.from_numpy(x).copy_(torch.from_numpy(z.reshape(self.n_classes, -1)).t())
            y = t.ravel().astype(np.int64)
            yield (x, y) if not drop_ignored or keep.all() else (x[keep], y[keep])

    def iter_chunks(
        self, chunk_pixels: int | None = None, images=None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield the pixel table in chunks of ``chunk_pixels`` rows (the last may be shorter).

        Rows come in image order, then row-major pixel order, ignored pixels
        dropped: concatenating the chunks gives what
        :func:`~sksegcal.pixels.flatten_segmentation` gives on the stored
        (float16) arrays, with ``groups`` holding store image ids.

        Parameters
        ----------
        chunk_pixels : int, optional
            Default: 4M values per chunk, i.e. ``4194304 // n_classes`` pixels
            (220k at C=19, 28k at C=150), so memory does not grow with C.
        images : None, "train", "validation", "test", array of ids or mask

        Yields
        ------
        X : ndarray of shape (n, C), float32
        y : ndarray of shape (n,), int64
        groups : ndarray of shape (n,), int64
        """
        chunk_pixels = self._chunk_pixels(chunk_pixels)
        c = self.n_classes
        out = None  # the chunk being filled: each pixel is copied into it once
        pos = 0
        for image_id in self._as_ids(images):
            for x, y in self._iter_image_tables(image_id, chunk_pixels):
                start = 0
                while start < len(y):
                    m = min(len(y) - start, chunk_pixels - pos)
                    if pos == 0 and m == chunk_pixels:  # a whole chunk: no copy
                        yield (
                            x[start : start + m],
                            y[start : start + m],
                            np.full(m, image_id, dtype=np.int64),
                        )
                        start += m
                        continue
                    if out is None:
                        out = (
                            np.empty((chunk_pixels, c), dtype=np.float32),
                            np.empty(chunk_pixels, dtype=np.int64),
                            np.empty(chunk_pixels, dtype=np.int64),
                        )
                    out[0][pos : pos + m] = x[start : start + m]
                    out[1][pos : pos + m] = y[start : start + m]
                    out[2][pos : pos + m] = image_id
                    pos += m
                    start += m
                    if pos == chunk_pixels:
                        yield out
                        out, pos = None, 0
        if pos:
            yield tuple(a[:pos] for a in out)

    # ------------------------------------------------------------------ split
    @property
    def split(self) -> ImageSplit | None:
        """The recorded image-level split as image ids, or None.

        Recorded by name, so it survives images being added; set it with
        :meth:`make_split` or by assigning an :class:`~sksegcal.pixels.ImageSplit`
        of image ids.
        """
        split = self._manifest["split"]
        if split is None:
            return None
        missing = [n for part in _SPLIT_PARTS for n in split[part] if n not in self._ids]
        if missing:
            raise ValueError(
                f"The recorded split of {self.path} names images the store lacks "
                f"({missing[:5]}); finish the extraction or make a new split."
            )
        return ImageSplit(
            *(
                np.array(sorted(self._ids[n] for n in split[p]), dtype=np.int64)
                for p in _SPLIT_PARTS
            )
        )

    @split.setter
    def split(self, split: ImageSplit | None) -> None:
        self._set_split(split, params=None)

    def _set_split(self, split, params) -> None:
        if split is None:
            recorded = None
        else:
            parts = [
                self._as_ids(np.asarray(getattr(split, p), dtype=np.int64)) for p in _SPLIT_PARTS
            ]
            all_ids = np.concatenate(parts)
            if len(np.unique(all_ids)) != len(all_ids):
                raise ValueError("The split's train/validation/test parts overlap.")
            recorded = {p: [self._names[i] for i in ids] for p, ids in zip(_SPLIT_PARTS, parts)}
            recorded["params"] = params
        manifest = self.manifest
        manifest["split"] = recorded
        _write_json(self.path / _MANIFEST, manifest)
        self._manifest = manifest

    def make_split(
        self, *, validation_size: float = 0.25, test_size: float = 0.25, random_state=0
    ) -> ImageSplit:
        """Split the images with :func:`~sksegcal.pixels.split_images` and record it.

        Every later ``images="train"`` (or "validation", "test") and every
        process that opens the store then uses the same split.

        Returns
        -------
        ImageSplit
            Image ids of each part.
        """
        split = split_images(
            self.n_images,
            validation_size=validation_size,
            test_size=test_size,
            random_state=random_state,
        )
        params = {"validation_size": validation_size, "test_size": test_size}
        if isinstance(random_state, numbers.Integral):
            params["random_state"] = int(random_state)
        self._set_split(split, params)
        return split

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        max_pixels: int,
        *,
        images=None,
        stratify_by_correctness: bool = True,
        max_per_image: int | None = None,
        random_state=None,
        chunk_pixels: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A seeded random pixel table of at most ``max_pixels`` rows, in one pass.

        The sample is uniform over the labelled pixels of ``images``, except
        that (a) with ``stratify_by_correctness`` the correctly and wrongly
        predicted pixels keep exactly their share (as
        :func:`~sksegcal.pixels.sample_pixels` does), and (b) with
        ``max_per_image`` no image gives more than that many pixels (large
        images are thinned before sampling). Only the chosen rows are kept in
        memory: the per-image correctness counts recorded at writing time fix
        how many pixels each image gives before any image is read.

        Parameters
        ----------
        max_pixels : int
        images : None, "train", "validation", "test", array of ids or mask
        stratify_by_correctness : bool, default=True
        max_per_image : int, optional
        random_state : int, Generator or None
            Same seed, same rows, whatever the order images were written in.
        chunk_pixels : int, optional
            Default: 4M values per chunk, i.e. ``4194304 // n_classes`` pixels
            (220k at C=19, 28k at C=150), so memory does not grow with C.
            Pixels read per block.

        Returns
        -------
        X : ndarray of shape (n, C), float32
        y : ndarray of shape (n,), int64
        groups : ndarray of shape (n,), int64
            Store image ids.

        Examples
        --------
        >>> import tempfile
        >>> import numpy as np
        >>> from sksegcal.store import LogitStore
        >>> rng = np.random.default_rng(0)
        >>> store = LogitStore.create(tempfile.mkdtemp() + "/s", n_classes=3)
        >>> for name in range(3):
        ...     _ = store.add_image(name, rng.normal(size=(3, 10, 10)),
        ...                         rng.integers(0, 3, size=(10, 10)))
        >>> X, y, groups = store.sample(60, max_per_image=25, random_state=0)
        >>> X.shape, bool(np.bincount(groups).max() <= 25)
        ((60, 3), True)
        """
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}.")
        if max_per_image is not None and max_per_image < 1:
            raise ValueError(f"max_per_image must be >= 1 or None, got {max_per_image}.")
        ids = self._as_ids(images)
        chunk_pixels = self._chunk_pixels(chunk_pixels)
        records = [self._records[self._names[i]] for i in ids]
        # counts[i, s]: pixels of image i in stratum s (0 = wrong, 1 = correct)
        counts = np.array(
            [[r["n_valid"] - r["n_correct"], r["n_correct"]] for r in records], dtype=np.int64
        ).reshape(-1, 2)
        if not stratify_by_correctness:
            counts = counts.sum(axis=1, keepdims=True)
        avail = counts.copy()
        if max_per_image is not None:
            for i in np.flatnonzero(counts.sum(axis=1) > max_per_image):
                avail[i] = _largest_remainder(counts[i], max_per_image, np.zeros(1, np.int64))
                avail[i] = np.minimum(avail[i], counts[i])
        if avail.sum() == 0:
            raise ValueError("The selected images hold no labelled pixels to sample.")
        seed = _resolve_seed(random_state)
        rng = np.random.default_rng(np.random.SeedSequence(seed))
        if avail.sum() <= max_pixels:
            take = avail
        else:
            col = avail.sum(axis=0)
            totals = np.minimum(
                _largest_remainder(col.astype(float), max_pixels, (col > 0).astype(np.int64)),
                col,
            )
            while totals.sum() > max_pixels:  # fewer rows asked for than strata
                totals[np.argmax(totals)] -= 1
            # a uniform draw of totals[s] pixels from stratum s falls on the images
            # with a multivariate hypergeometric distribution
            take = np.stack(
                [
                    rng.multivariate_hypergeometric(avail[:, s], totals[s])
                    for s in range(avail.shape[1])
                ],
                axis=1,
            ).reshape(avail.shape)

        xs, ys, gs = [], [], []
        for image_id, n_s, k_s in zip(ids, counts, take):
            if k_s.sum() == 0:
                continue
            # per-image stream: the rows an image gives do not depend on the others
            irng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(image_id),)))
            # ranks (within each stratum, in pixel order) of the chosen pixels
            chosen = [np.sort(irng.choice(n, size=k, replace=False)) for n, k in zip(n_s, k_s)]
            seen = np.zeros(len(n_s), dtype=np.int64)
            for x, y in self._iter_image_tables(image_id, chunk_pixels):
                stratum = (
                    (x.argmax(axis=1) == y).astype(np.int64)
                    if stratify_by_correctness
                    else np.zeros(len(y), np.int64)
                )
                pick = np.zeros(len(y), bool)
                for s in range(len(n_s)):
                    where = np.flatnonzero(stratum == s)
                    lo, hi = np.searchsorted(chosen[s], [seen[s], seen[s] + len(where)])
                    pick[where[chosen[s][lo:hi] - seen[s]]] = True
                    seen[s] += len(where)
                xs.append(x[pick])
                ys.append(y[pick])
                gs.append(np.full(int(pick.sum()), image_id, dtype=np.int64))
            if not np.array_equal(seen, n_s):
                raise ValueError(
                    f"Image {self._names[image_id]!r} has {seen.tolist()} pixels per stratum "
                    f"but its record says {n_s.tolist()}; the store is corrupt (run verify)."
                )
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)


# --------------------------------------------------------------------------- out-of-core
def _image_blocks(store: LogitStore, ids: np.ndarray, task_pixels: int) -> list[np.ndarray]:
    """Consecutive image blocks of about ``task_pixels`` pixels each.

    The partition depends on the store only (not on n_jobs or the backend),
    and results are merged in block order, so every backend gives the same
    floating-point sums.
    """
    blocks, current, size = [], [], 0
    for i in ids:
        r = store._records[store._names[i]]
        current.append(int(i))
        size += r["height"] * r["width"]
        if size >= task_pixels:
            blocks.append(np.array(current))
            current, size = [], 0
    if current:
        blocks.append(np.array(current))
    return blocks


def _make_accumulator(store: LogitStore, params: dict | None = None):
    from .metrics import CalibrationAccumulator

    return CalibrationAccumulator(
        store.n_classes, ignore_index=store.ignore_index, **(params or {})
    )


def _check_calibrator(name, estimator, store: LogitStore) -> None:
    if estimator is None:
        return
    if not hasattr(estimator, "predict_proba"):
        raise TypeError(f"calibrator {name!r} has no predict_proba: {estimator!r}.")
    n_features = getattr(estimator, "n_features_in_", None)
    if n_features is not None and n_features != store.n_classes:
        raise ValueError(
            f"calibrator {name!r} was fitted on {n_features} classes but the store "
            f"{store.path} has {store.n_classes}."
        )


def _uncalibrated(store: LogitStore, x: np.ndarray) -> np.ndarray:
    if store.values == "logits":
        return softmax(x)
    # float16 rounding leaves stored probabilities a little off the simplex
    return x / x.sum(axis=1, keepdims=True)


def _keeps_prediction(estimator) -> bool:
    """Whether the calibrated argmax is, by construction, the argmax of the input.

    True for our calibrators that keep ``BaseLogitCalibrator.predict`` (every
    temperature-based one); an affine map, a pipeline or a foreign estimator
    may move the argmax, so its own probabilities decide.
    """
    from ._base import BaseLogitCalibrator

    return estimator is None or (
        isinstance(estimator, BaseLogitCalibrator)
        and type(estimator).predict is BaseLogitCalibrator.predict
    )


def _softmax_temperatures(store: LogitStore, estimator, x: np.ndarray):
    """T with probabilities ``softmax(x / T)`` (uncalibrated: 1), or None.

    Only with numba: NumPy alone is faster through torch's softmax and a
    probability table (its row argmax and sums cost more than they save).
    """
    from . import _kernels
    from ._base import BaseLogitCalibrator

    if store.values != "logits" or not _kernels.HAVE_NUMBA:
        return None
    if estimator is None:
        return 1.0
    if isinstance(estimator, BaseLogitCalibrator):
        return estimator._softmax_temperatures(x)
    return None


def _evaluate_block(store: LogitStore, calibrators: dict, ids, chunk_pixels: int, acc_params):
    accs = {name: _make_accumulator(store, acc_params) for name in calibrators}
    timings = dict.fromkeys(
        ["read", "argmax"]
        + [f"predict:{n}" for n in calibrators]
        + [f"metrics:{n}" for n in calibrators],
        0.0,
    )
    keeps = {name: _keeps_prediction(est) for name, est in calibrators.items()}
    n_keeping = sum(keeps.values())
    for image_id in ids:
        t0 = time.perf_counter()
        # ignored pixels stay in (the accumulators skip their labels): compacting
        # every block would cost a copy of it
        for x, y in store._iter_image_tables(image_id, chunk_pixels, drop_ignored=False):
            t1 = time.perf_counter()
            timings["read"] += t1 - t0
            # The model's prediction, once per chunk, for every method that keeps it:
            # one argmax pass, and accuracy/mIoU that tied near-uniform calibrated rows
            # (very large temperatures) cannot change.
            model_pred = argmax_rows(x) if n_keeping > 1 else None
            t2 = time.perf_counter()
            timings["argmax"] += t2 - t1
            t1 = t2
            for name, est in calibrators.items():
                # Temperature-based methods (and the uncalibrated model) are scored
                # straight from the logits: no probability table, one exp pass.
                temperature = _softmax_temperatures(store, est, x)
                if temperature is not None:
                    t2 = time.perf_counter()
                    accs[name].update_logits(
                        y, x, temperature=temperature, image_id=int(image_id), y_pred=model_pred
                    )
                else:
                    proba = _uncalibrated(store, x) if est is None else est.predict_proba(x)
                    t2 = time.perf_counter()
                    if keeps[name] and model_pred is None:
                        model_pred = argmax_rows(x)
                    accs[name].update(
                        y,
                        proba,
                        image_id=int(image_id),
                        y_pred=model_pred if keeps[name] else None,
                    )
                t3 = time.perf_counter()
                timings[f"predict:{name}"] += t2 - t1
                timings[f"metrics:{name}"] += t3 - t2
                t1 = t3
            t0 = time.perf_counter()
    return accs, timings


def _merge(into, other):
    merged = into.merge(other)
    return into if merged is None else merged


def evaluate_store(
    store: LogitStore,
    calibrators: Mapping[str, Any],
    *,
    images=None,
    n_jobs: int | None = 1,
    backend=None,
    chunk_pixels: int | None = None,
    task_pixels: int = DEFAULT_TASK_PIXELS,
    accumulator_params: Mapping[str, Any] | None = None,
    return_timings: bool = False,
):
    """Calibration metrics of several calibrators over a store, in bounded memory.

    Each image block is read once; each chunk goes through every calibrator
    and into one :class:`~sksegcal.metrics.CalibrationAccumulator` per method.
    Blocks run as joblib tasks (threads, processes, or a dask cluster through
    ``joblib.parallel_backend("dask")``) and their accumulators are merged in
    block order, so the result does not depend on ``n_jobs`` or the backend.

    With numba installed (the ``fast`` extra), the uncalibrated model and
    temperature-based calibrators (temperature scaling, selective scaling,
    Meta-Cal: probabilities ``softmax(z / T)`` with one or a per-pixel ``T``)
    are scored straight from the logits with
    :meth:`~sksegcal.metrics.CalibrationAccumulator.update_logits`, without
    a probability table. Other calibrators that keep the model's prediction
    (ensemble temperature scaling) are scored with the argmax of the logits,
    computed once per chunk and passed as ``y_pred``; the rest (vector and
    Dirichlet scaling, pipelines, foreign estimators) with the argmax of
    their own probabilities.

    Parameters
    ----------
    store : LogitStore
    calibrators : mapping of str to estimator or None
        Fitted objects with ``predict_proba`` on (n, C) float32 rows of the
        store's values; None means uncalibrated (softmax of the logits).
    images : None, "train", "validation", "test", array of ids or mask
    n_jobs : int or None, default=1
        joblib's ``n_jobs``; -1 uses every worker of the backend.
    backend : str or None
        joblib backend ("loky", "threading", "dask", ...); None uses the
        active ``joblib.parallel_backend`` context, else loky.
    chunk_pixels : int, optional
        Pixels per chunk; memory per worker is a few times
        ``chunk_pixels * n_classes * 4`` bytes. Default: ``4194304 // n_classes``
        (16 MB per float32 chunk whatever C).
    task_pixels : int, default=4000000
        Pixels per joblib task (consecutive images).
    accumulator_params : mapping, optional
        Keyword arguments of every
        :class:`~sksegcal.metrics.CalibrationAccumulator` (e.g.
        ``classwise=True``, ``n_base_bins``).
    return_timings : bool, default=False
        Also return seconds spent reading, taking the model's argmax,
        predicting and accumulating (summed over workers).

    Returns
    -------
    accumulators : dict of str to CalibrationAccumulator
        Call ``.summary()`` on each for the metrics.
    timings : dict of str to float
        Only with ``return_timings``.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sksegcal.store import LogitStore, evaluate_store
    >>> rng = np.random.default_rng(0)
    >>> store = LogitStore.create(tempfile.mkdtemp() + "/s", n_classes=3)
    >>> for name in range(3):
    ...     _ = store.add_image(name, rng.normal(size=(3, 10, 10)),
    ...                         rng.integers(0, 3, size=(10, 10)))
    >>> accs = evaluate_store(store, {"uncalibrated": None})
    >>> sorted(accs)
    ['uncalibrated']
    """
    from joblib import Parallel, delayed

    calibrators = dict(calibrators)
    if not calibrators:
        raise ValueError("calibrators is empty; pass e.g. {'uncalibrated': None}.")
    for name, est in calibrators.items():
        _check_calibrator(name, est, store)
    chunk_pixels = store._chunk_pixels(chunk_pixels)
    blocks = _image_blocks(store, store._as_ids(images), task_pixels)
    results = Parallel(n_jobs=n_jobs, backend=backend)(
        delayed(_evaluate_block)(store, calibrators, ids, chunk_pixels, accumulator_params)
        for ids in blocks
    )
    accs = {name: _make_accumulator(store, accumulator_params) for name in calibrators}
    timings = dict.fromkeys(
        ["read", "argmax"]
        + [f"predict:{n}" for n in calibrators]
        + [f"metrics:{n}" for n in calibrators],
        0.0,
    )
    for block_accs, block_timings in results:
        for name in calibrators:
            accs[name] = _merge(accs[name], block_accs[name])
        for key, seconds in block_timings.items():
            timings[key] += seconds
    return (accs, timings) if return_timings else accs


def _predict_block(calibrator, store: LogitStore, out: LogitStore, ids, chunk_pixels):
    # a private handle: threads of one process must not share the records cache
    out = LogitStore(out.path, out._manifest, {})
    c = store.n_classes
    for image_id in ids:
        record = store._records[store._names[image_id]]
        h, w = record["height"], record["width"]
        proba = np.empty((c, h, w), dtype=_VALUE_DTYPE)
        labels = []
        r0 = 0
        for z, t in store._iter_blocks(image_id, chunk_pixels):
            rows = z.shape[1]
            x = np.ascontiguousarray(z.reshape(c, -1).T, dtype=np.float32)
            p = _uncalibrated(store, x) if calibrator is None else calibrator.predict_proba(x)
            proba[:, r0 : r0 + rows] = np.asarray(p).T.reshape(c, rows, w)
            labels.append(t)
            r0 += rows
        out.add_image(record["name"], proba, np.concatenate(labels), overwrite=True)


def predict_store(
    calibrator,
    store: LogitStore,
    out_path: str | os.PathLike,
    *,
    images=None,
    n_jobs: int | None = 1,
    backend=None,
    chunk_pixels: int | None = None,
    task_pixels: int = DEFAULT_TASK_PIXELS,
) -> LogitStore:
    """Write calibrated probability maps of every image as a new store.

    The output holds float16 probabilities (C, H, W) of every pixel (ignored
    ones included, for inference) and the labels, with ``values=
    "probabilities"``, the same classes and split. An interrupted run resumes:
    images already in the output are skipped (the output's manifest records
    the input store and ``repr(calibrator)``; another calibrator is refused).

    Parameters
    ----------
    calibrator : estimator or None
        Fitted, with ``predict_proba``; None writes the softmax of the logits.
    store : LogitStore
    out_path : str or path-like
    images, n_jobs, backend, chunk_pixels, task_pixels
        As in :func:`evaluate_store`. Memory per worker is about one image
        in float16 plus a few chunks.

    Returns
    -------
    LogitStore
        The output store.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sksegcal.store import LogitStore, predict_store
    >>> rng = np.random.default_rng(0)
    >>> root = tempfile.mkdtemp()
    >>> store = LogitStore.create(root + "/logits", n_classes=3)
    >>> _ = store.add_image(0, rng.normal(size=(3, 4, 4)), rng.integers(0, 3, (4, 4)))
    >>> out = predict_store(None, store, root + "/proba")
    >>> out.values, bool(np.allclose(out.load_image(0).logits.sum(axis=0), 1, atol=1e-2))
    ('probabilities', True)
    """
    from joblib import Parallel, delayed

    _check_calibrator("calibrator", calibrator, store)
    source = {
        "calibrated_from": str(Path(store.path).resolve()),
        "calibrator": None if calibrator is None else repr(calibrator),
        "source": store.source,
    }
    out = LogitStore.create(
        out_path,
        n_classes=store.n_classes,
        class_names=store.class_names,
        ignore_index=store.ignore_index,
        values="probabilities",
        source=source,
        exist_ok=True,
    )
    if (
        out.source.get("calibrator") != source["calibrator"]
        or out.source.get("calibrated_from") != source["calibrated_from"]
    ):
        # resuming with another calibrator (or input) would mix two calibrations
        raise ValueError(
            f"{out.path} holds the output of {out.source.get('calibrator')!r} on "
            f"{out.source.get('calibrated_from')!r}, not of {source['calibrator']!r} on "
            f"{source['calibrated_from']!r}; write to a new directory."
        )
    ids = [i for i in store._as_ids(images) if store._names[i] not in out]
    chunk_pixels = store._chunk_pixels(chunk_pixels)
    blocks = _image_blocks(store, np.asarray(ids, dtype=np.int64), task_pixels)
    Parallel(n_jobs=n_jobs, backend=backend)(
        delayed(_predict_block)(calibrator, store, out, block, chunk_pixels) for block in blocks
    )
    out.refresh()
    split = store._manifest["split"]
    if split is not None and all(n in out for p in _SPLIT_PARTS for n in split[p]):
        manifest = out.manifest
        manifest["split"] = split
        _write_json(out.path / _MANIFEST, manifest)
        out._manifest = manifest
    return out


def fit_store(
    estimator,
    store: LogitStore,
    *,
    images="train",
    max_pixels: int = 1_000_000,
    stratify_by_correctness: bool = True,
    max_per_image: int | None = None,
    random_state=None,
    **fit_params,
):
    """Fit ``estimator`` on a seeded pixel sample of a store (see :meth:`LogitStore.sample`).

    Parameters
    ----------
    estimator : estimator
        Anything with ``fit(X, y, **fit_params)`` on (n, C) logits.
    store : LogitStore
    images : default="train"
        The recorded split's training images by default.
    max_pixels, stratify_by_correctness, max_per_image, random_state
        Passed to :meth:`LogitStore.sample`.
    **fit_params
        Passed to ``estimator.fit``; the sample's image ids go as ``groups``
        when ``fit`` takes a ``groups`` argument (as
        :class:`~sksegcal.SelectiveScalingCalibrator` does).

    Returns
    -------
    estimator
        The fitted estimator.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sksegcal import TemperatureScaling
    >>> from sksegcal.store import LogitStore, fit_store
    >>> rng = np.random.default_rng(0)
    >>> store = LogitStore.create(tempfile.mkdtemp() + "/s", n_classes=3)
    >>> for name in range(8):
    ...     _ = store.add_image(name, 3 * rng.normal(size=(3, 10, 10)),
    ...                         rng.integers(0, 3, size=(10, 10)))
    >>> split = store.make_split(random_state=0)
    >>> ts = fit_store(TemperatureScaling(), store, max_pixels=300, random_state=0)
    >>> bool(ts.temperature_ > 1)  # random labels: the logits are over-confident
    True
    """
    X, y, groups = store.sample(
        max_pixels,
        images=images,
        stratify_by_correctness=stratify_by_correctness,
        max_per_image=max_per_image,
        random_state=random_state,
    )
    if "groups" not in fit_params and _accepts_groups(estimator):
        # image ids let the estimator hold out whole images (pixels of one image correlate)
        fit_params["groups"] = groups
    return estimator.fit(X, y, **fit_params)


def _accepts_groups(estimator) -> bool:
    try:
        return "groups" in inspect.signature(estimator.fit).parameters
    except (TypeError, ValueError):
        return False
