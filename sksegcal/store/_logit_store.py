"""The LogitStore: a directory of per-image logits and labels, read in bounded memory.

This module holds the class and its file handling: creating, opening and
refreshing (manifest and records checked through ``._format``), adding images
(committed through ``._commit``), verifying and cleaning, the block readers and
the recorded split. The pixel sampler is ``._sampling``.

May import: numpy, the standard library, :mod:`sksegcal._files`,
:mod:`sksegcal._validation`, :mod:`sksegcal._safety`, :mod:`sksegcal.pixels` and the store's own
``._format``, ``._commit`` and ``._sampling``. Never the engine (``._engine``)
or the calibrators.
"""

from __future__ import annotations

import datetime
import json
import numbers
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._files import atomic_write_json, fsync_dir
from .._safety import check_finite_block, npy_reason, read_failure_advice, refuse_symlinks
from .._validation import check_finite, check_ignore_index, check_labels
from ..pixels import ImageSplit, split_images
from ._commit import ImageConflictError, commit_image, remove_files_of, stray_candidates
from ._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGES,
    KINDS,
    MANIFEST,
    SPLIT_PARTS,
    VALUE_DTYPE,
    VALUES,
    StoreFormatError,
    check_manifest,
    check_name,
    check_record,
    file_sha256,
    is_record_file,
    label_dtype,
    npy_header,
    read_json,
    sort_key,
    stem,
)
from ._sampling import argmax_planes, sample_store

# values (pixels x classes) per chunk: 16 MB as float32, whatever the class count
DEFAULT_CHUNK_VALUES = 1 << 22
#: Default age (seconds) before :meth:`LogitStore.clean` removes a stray file.
DEFAULT_GRACE_SECONDS = 3600.0
_HASHED_STEM = re.compile(r".*-[0-9a-f]{12}")


class StoredImage(NamedTuple):
    """One image of a store: its id, name and memory-mapped arrays.

    ``logits`` is (C, H, W) and ``labels`` (H, W); for a volume (C, D, H, W)
    and (D, H, W).
    """

    id: int
    name: int | str
    logits: np.ndarray
    labels: np.ndarray


class ImageInfo(NamedTuple):
    """What the record of one stored image says: its name, size and pixel counts."""

    name: Any
    height: int
    width: int
    n_valid: int
    n_correct: int
    depth: int | None = None  # volumes only

    @property
    def shape(self) -> tuple[int, ...]:
        """(H, W), or (D, H, W) for a volume: the labels' shape."""
        if self.depth is None:
            return (self.height, self.width)
        return (self.depth, self.height, self.width)

    @property
    def n_pixels(self) -> int:
        """Every pixel of the image, ignored ones included."""
        return (self.depth or 1) * self.height * self.width


def _name_of_stem(rec_path: Path):
    """The image name a damaged record file stands for, where that can be told, else None."""
    try:  # a record that parses and names the image of its own file
        name = check_name(json.loads(rec_path.read_bytes())["name"])
        if f"{stem(name)}.json" == rec_path.name:
            return name
    except Exception:  # noqa: BLE001 - any damage: fall back on the file name
        pass
    text = rec_path.stem
    if text.isdigit():
        return int(text)
    if _HASHED_STEM.fullmatch(text):
        return None
    return text


class LogitStore:
    """A directory of per-image logits and labels, read in bounded memory.

    Create one with :meth:`create`, open one with :meth:`open`; do not call
    the constructor. See :mod:`sksegcal.store` for the layout and the
    crash-safety guarantees, and docs/store.md for the contract between
    several writers.

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
    damaged : list of int or str
        Names of the images left out because their record or files are damaged
        (with ``on_damaged="missing"``); :meth:`missing` lists them, so they are
        written again on resume.
    damaged_records : dict of str to str
        Every damaged record's file name (in ``images/``) and what is wrong with
        it, including records too broken to tell the image's name.

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
        self.damaged_records: dict[str, str] = {}
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
            A writer's handle: damaged images (see :meth:`open`) are left out
            with a warning and listed by :meth:`missing`, so a resume writes
            them again.
        """
        path = Path(path)
        if (
            isinstance(n_classes, (bool, np.bool_))
            or not isinstance(n_classes, numbers.Integral)
            or n_classes < 2
        ):
            raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}.")
        n_classes = int(n_classes)
        ignore_index = check_ignore_index(ignore_index)
        if values not in VALUES:
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
                "values": VALUE_DTYPE.str,
                "labels": label_dtype(n_classes, ignore_index).str,
            },
            "checksum": "sha256",
            "source": source,
            "split": None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise FileExistsError(
                    f"{path} already holds a LogitStore; open it with LogitStore.open, or "
                    "pass exist_ok=True to resume writing into it."
                )
            # a damaged image must not stop a resume: it is left out and written again
            store = cls.open(path, on_damaged="missing")
            if store.damaged_records:
                warnings.warn(
                    f"Resuming {path}: {len(store.damaged_records)} damaged image record(s) "
                    f"left out and listed by missing(): {store._damage_summary()}",
                    UserWarning,
                    stacklevel=2,
                )
            for key in ("n_classes", "class_names", "ignore_index", "values"):
                if store._manifest[key] != manifest[key]:
                    raise ValueError(
                        f"The store at {path} has {key}={store._manifest[key]!r} but "
                        f"{manifest[key]!r} was asked for; write to a new directory."
                    )
            store._resume_source(source, match_source)
            return store
        (path / IMAGES).mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / MANIFEST, manifest)
        fsync_dir(path)
        store = cls(path, manifest, {})
        store._on_damaged = "missing"
        return store

    def _resume_source(self, source: dict, match_source) -> None:
        recorded = self._manifest.get("source") or {}
        if not len(self):
            if source and source != recorded:
                self._manifest["source"] = source
                atomic_write_json(self.path / MANIFEST, self._manifest)
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
            What to do with an image whose record is corrupt or invalid, or
            whose files are missing or have the wrong size: raise a ValueError
            naming the image, the file and the field, or leave the image out
            of the store (listed by :meth:`missing`, in :attr:`damaged` and
            :attr:`damaged_records`) so that it can be added again while the
            rest stays usable. A corrupt manifest always raises.

        Returns
        -------
        LogitStore
        """
        if on_damaged not in ("raise", "missing"):
            raise ValueError(f"on_damaged must be 'raise' or 'missing', got {on_damaged!r}.")
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(
                f"{path} is not a LogitStore: {MANIFEST} is missing. Create one with "
                "LogitStore.create (an interrupted create leaves no manifest; create again)."
            )
        manifest = check_manifest(read_json(manifest_path, "manifest"), manifest_path)
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
        """Re-read the image records, e.g. while another process writes.

        Every record is checked (fields, types, file names inside the store,
        file sizes). A damaged one raises a ValueError naming the image, the
        file and the field, or with ``on_damaged="missing"`` is left out and
        reported in :attr:`damaged` and :attr:`damaged_records`.
        """
        records, damaged, problems = {}, set(), {}
        for rec_path in sorted((self.path / IMAGES).glob("*.json")):
            if not is_record_file(rec_path):
                continue
            try:
                record = self._load_record(rec_path)
            except FileNotFoundError:  # gone between the listing and the read
                continue
            except ValueError as exc:
                name = _name_of_stem(rec_path)
                message = str(exc)
                if self._on_damaged == "raise":
                    raise ValueError(
                        f"The store {self.path} has a damaged image"
                        f"{'' if name is None else f' {name!r}'}: {message} Open the store "
                        "with on_damaged='missing' to leave the image out (the rest stays "
                        "usable), then add it again."
                    ) from None
                problems[rec_path.name] = message
                if name is not None:
                    damaged.add(name)
                continue
            records[record["name"]] = record
        self._records = records
        self.damaged = sorted(damaged, key=sort_key)
        self.damaged_records = problems
        self._reindex()
        return self

    def _load_record(self, rec_path: Path) -> dict:
        """A checked record, or a ValueError naming the file and what is wrong."""
        refuse_symlinks(rec_path)
        try:
            record = read_json(rec_path, "image record")
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise StoreFormatError(f"The image record {rec_path} cannot be read: {exc}.") from None
        record = check_record(record, rec_path, self.n_classes, self.labels_dtype)
        self._check_files(record, rec_path)
        return record

    def _damage_summary(self, limit: int = 5) -> str:
        items = list(self.damaged_records.items())
        text = "; ".join(f"{file}: {problem}" for file, problem in items[:limit])
        return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")

    def _record_path(self, name) -> Path:
        return self.path / IMAGES / f"{stem(name)}.json"

    def _check_files(self, record: dict, where) -> None:
        for kind, info in record["files"].items():
            file = self.path / IMAGES / info["file"]
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                raise StoreFormatError(
                    f"{kind} file {file.name} of image {record['name']!r} is missing "
                    f"(named by field files.{kind}.file of {where})."
                ) from None
            if size != info["bytes"]:
                raise StoreFormatError(
                    f"{kind} file {file.name} of image {record['name']!r} has {size} bytes, "
                    f"field files.{kind}.bytes of {where} says {info['bytes']} (truncated or "
                    "overwritten)."
                )

    def _reindex(self) -> None:
        self._names = sorted(self._records, key=sort_key)
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

        Safe beside other writers (processes or machines sharing the store):
        writers of different names never block each other, and of two writers
        of the same name exactly one commits its image and the other gets a
        ValueError (see docs/store.md, "Several writers").

        Parameters
        ----------
        name : int or str
            The image's name, e.g. its index or file stem in the dataset.
        logits : array-like of shape (C, H, W), or (C, D, H, W) for a volume
            Logits (or probabilities for a ``values="probabilities"`` store);
            stored as float16. Every spatial axis must be at least 1 long.
            Pixel tables read a volume's voxels in (D, H, W) row-major order,
            as :func:`~sksegcal.pixels.flatten_segmentation` does.
        labels : array-like of shape (H, W), or (D, H, W)
            Class indices or the ignore index.
        overwrite : bool, default=False
            Replace an image of the same name instead of raising. The
            replacement is atomic: readers see the old image or the new one,
            whole; of several concurrent overwrites the last to commit wins.
            An image whose record is damaged is replaced without it.

        Returns
        -------
        image_id : int
            Position of the image in :attr:`image_names` (ids of later-sorted
            images shift when an image is inserted before them).
        """
        name = check_name(name)
        if name in self._records and not overwrite:
            raise ValueError(
                f"Image {name!r} is already in {self.path}; pass overwrite=True to replace "
                "it, or skip the names that store.missing() does not list."
            )
        z = np.asarray(logits)
        t = np.asarray(labels)
        c = self.n_classes
        if z.ndim not in (3, 4) or z.shape[0] != c:
            raise ValueError(
                f"logits of image {name!r} must have shape ({c}, H, W), or ({c}, D, H, W) "
                f"for a volume, in this {c}-class store; got {z.shape}."
            )
        if min(z.shape[1:]) < 1:
            raise ValueError(
                f"logits of image {name!r} have shape {z.shape}: an image must have at least "
                "one row and one column of pixels."
            )
        if t.shape != z.shape[1:]:
            raise ValueError(
                f"labels of image {name!r} have shape {t.shape} but its logits are "
                f"{z.shape[1:]} (H, W); resize the labels (nearest) or the logits first."
            )
        t = check_labels(t, c, self.ignore_index, where=f"labels of image {name!r}")
        with np.errstate(over="ignore"):
            z16 = np.ascontiguousarray(z, dtype=VALUE_DTYPE)
        check_finite(z16, where=f"logits of image {name!r} (after the cast to float16)")
        t = np.ascontiguousarray(t, dtype=self.labels_dtype)
        keep = self.labelled(t)
        n_valid = int(keep.sum())
        # correctness counts let sample() allocate a stratified sample in one pass
        n_correct = int(((argmax_planes(z16) == t) & keep).sum())

        rec_path = self._record_path(name)
        replace, old = self._existing(name, rec_path, overwrite)
        fields = {
            "height": int(z.shape[-2]),
            "width": int(z.shape[-1]),
            **({"depth": int(z.shape[1])} if z.ndim == 4 else {}),
            "n_valid": n_valid,
            "n_correct": n_correct,
        }
        try:
            record = commit_image(
                self.path, name, {"logits": z16, "labels": t}, fields, replace=replace
            )
        except ImageConflictError:
            self.refresh()
            raise
        if old is not None:
            remove_files_of(self.path, old, record["files"])
        self._records[name] = record
        if name in self.damaged:
            self.damaged.remove(name)
        self.damaged_records.pop(rec_path.name, None)
        self._reindex()
        return self._ids[name]

    def _existing(self, name, rec_path: Path, overwrite: bool) -> tuple[bool, dict | None]:
        """Whether to replace the record at ``rec_path``, and the record being replaced.

        An existing valid record of ``name`` is replaced only with ``overwrite``;
        a damaged one always; one of another name (e.g. "A" and "a" on a
        case-insensitive filesystem) never.
        """
        try:
            raw = read_json(rec_path, "image record")
        except FileNotFoundError:
            return overwrite, None
        except (OSError, ValueError):
            return True, None  # unreadable: damaged, replace it
        other = raw.get("name") if isinstance(raw, dict) else None
        try:
            other = check_name(other)
        except (TypeError, ValueError):
            return True, None
        if other != name:
            raise ValueError(
                f"Image names {name!r} and {other!r} map to the same file {rec_path.name} in "
                f"{self.path}; rename one of them."
            )
        try:
            record = self._load_record(rec_path)
        except FileNotFoundError:
            return overwrite, None
        except ValueError:
            return True, raw  # damaged: replace it, and remove its own files
        if not overwrite:  # written by another process since this handle last looked
            raise ValueError(
                f"Image {name!r} is already in {self.path} (written by another handle or "
                "process); pass overwrite=True to replace it."
            )
        return True, record

    def missing(self, expected: Iterable) -> list:
        """The names in ``expected`` that the store does not hold (in their order).

        Use it to resume an interrupted extraction::

            for name in store.missing(dataset_names):
                store.add_image(name, *extract(name))
        """
        self.refresh()
        return [name for name in expected if check_name(name) not in self._records]

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
            without a record (:meth:`clean` removes them). Damaged records,
            even of a store opened with ``on_damaged="missing"``, are problems.
        """
        total = 0
        self.refresh()
        # damaged records (left out by on_damaged="missing") are problems too
        problems = [f"{file}: {problem}" for file, problem in self.damaged_records.items()]
        for name in self._names:
            record = self._records[name]
            for kind, info in record["files"].items():
                file = self.path / IMAGES / info["file"]
                total += info["bytes"]
                try:
                    refuse_symlinks(file)
                    with open(file, "rb") as f:
                        shape, dtype, fortran, _ = npy_header(f)
                except (OSError, ValueError) as exc:
                    problems.append(f"{file.name}: unreadable header ({npy_reason(exc)})")
                    continue
                want = self._expected_array(record, kind)
                if (shape, dtype, fortran) != want:
                    problems.append(f"{file.name}: header {shape} {dtype} differs from {want}")
                elif checksums and file_sha256(file) != info["sha256"]:
                    problems.append(f"{file.name}: checksum mismatch (content corrupted)")
        if problems:
            raise ValueError(
                f"The store {self.path} is corrupt; {len(problems)} problem(s): "
                + "; ".join(problems[:10])
                + ". Re-add the affected images with add_image(..., overwrite=True)."
            )
        known = self._referenced_files()
        stray = sorted(p.name for p in (self.path / IMAGES).iterdir() if p.name not in known)
        return {"n_images": self.n_images, "bytes": total, "stray_files": stray}

    def _referenced_files(self) -> set[str]:
        """Names in images/ that a record (valid or damaged) uses: never strays."""
        known = set()
        for rec_path in (self.path / IMAGES).glob("*.json"):
            if not is_record_file(rec_path):
                continue
            known.add(rec_path.name)
            try:
                record = json.loads(rec_path.read_bytes())
                files = [record["files"][kind]["file"] for kind in KINDS]
            except Exception:  # noqa: BLE001 - a damaged record names nothing usable
                continue
            known.update(f for f in files if isinstance(f, str))
        return known

    def clean(
        self, *, grace_seconds: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False
    ) -> list[str]:
        """Remove what killed or refused writers left: temporary files and orphaned arrays.

        A writer killed mid-image leaves ``.tmp-*`` files and arrays that no
        record names (so does an overwrite that another overwrite replaced).
        This removes such files, in the store folder and in ``images/``, once
        they are older than ``grace_seconds`` (by modification time). It is
        safe beside live writers: a file is removed only if no record names
        it, the records being read *after* the files were listed, and a live
        writer's files are younger than the grace period (they are written
        and committed within moments of each other). Choose ``grace_seconds``
        longer than any writer can stall between writing an image's arrays
        and its record; the default is an hour. Records are never removed.

        Parameters
        ----------
        grace_seconds : float, default=3600
            Minimum age of a file to remove.
        dry_run : bool, default=False
            List what would be removed, remove nothing.

        Returns
        -------
        removed : list of str
            Paths relative to the store folder, e.g. ``images/.tmp-x1y2.part``.
        """
        if not isinstance(grace_seconds, numbers.Real) or grace_seconds < 0:
            raise ValueError(f"grace_seconds must be a number >= 0, got {grace_seconds!r}.")
        candidates = stray_candidates(self.path, float(grace_seconds))
        known = self._referenced_files()  # read after the listing: see the docstring
        removed = []
        for path in candidates:
            if path.parent == self.path / IMAGES and path.name in known:
                continue
            if not dry_run:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
            removed.append(path.relative_to(self.path).as_posix())
        return sorted(removed)

    def _expected_array(self, record, kind):
        spatial = (record["depth"],) if "depth" in record else ()
        spatial += (record["height"], record["width"])
        if kind == "logits":
            return (self.n_classes, *spatial), VALUE_DTYPE, False
        return spatial, self.labels_dtype, False

    # ------------------------------------------------------------------ reading
    # The public read interface (image_ids, image_info, labelled, chunk_size,
    # iter_blocks, iter_tables, sample) is what the engine, the sampler and the
    # conformal store path use; nothing outside this class reads its fields.
    def labelled(self, labels: np.ndarray) -> np.ndarray:
        """The boolean mask of the labelled (not ``ignore_index``) pixels of ``labels``."""
        if self.ignore_index is None:
            return np.ones(np.shape(labels), bool)
        return np.asarray(labels) != self.ignore_index

    def image_ids(self, images=None) -> np.ndarray:
        """Image ids (int64) from None (all), a split part name, ids or a boolean mask."""
        return self._as_ids(images)

    def image_info(self, image_id: int) -> ImageInfo:
        """The name, size and labelled/correct pixel counts of one image, from its record."""
        record = self._records[self._names[int(image_id)]]
        return ImageInfo(
            record["name"],
            int(record["height"]),
            int(record["width"]),
            int(record["n_valid"]),
            int(record["n_correct"]),
            int(record["depth"]) if "depth" in record else None,
        )

    def _as_ids(self, images) -> np.ndarray:
        """Image ids from None, a split part name, ids or a boolean mask."""
        if images is None:
            return np.arange(self.n_images)
        if isinstance(images, str):
            split = self.split
            if images not in SPLIT_PARTS:
                raise ValueError(
                    f"images={images!r}: a string must name a split part {SPLIT_PARTS}."
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
        if ids.ndim != 1:
            raise ValueError(f"images must be a 1-D array of image ids, got shape {ids.shape}.")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_images):
            raise ValueError(f"image ids must be in [0, {self.n_images}), got {ids}.")
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != len(ids):
            # counting an image twice would weigh it twice in every metric and sample
            raise ValueError(
                f"images holds image id(s) {unique[counts > 1][:10].tolist()} more than once; "
                "pass each image once (e.g. np.unique(ids))."
            )
        return ids.astype(np.int64)

    def _paths(self, image_id: int) -> tuple[dict, Path, Path]:
        record = self._records[self._names[image_id]]
        images = self.path / IMAGES
        paths = (images / record["files"]["logits"]["file"],
                 images / record["files"]["labels"]["file"])
        refuse_symlinks(*paths)
        return (record, *paths)

    def load_image(self, image_id: int) -> StoredImage:
        """The memory-mapped arrays of one image."""
        (image_id,) = self._as_ids(image_id)
        record, logits_path, labels_path = self._paths(image_id)
        try:
            z = np.load(logits_path, mmap_mode="r", allow_pickle=False)
            t = np.load(labels_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(
                f"Image {record['name']!r} of {self.path} cannot be read ({npy_reason(exc)}); "
                f"{read_failure_advice(self._record_path(record['name']), record)}."
            ) from None
        for kind, a, file in (("logits", z, logits_path), ("labels", t, labels_path)):
            if (a.shape, a.dtype, np.isfortran(a)) != self._expected_array(record, kind):
                raise ValueError(
                    f"{kind} file {file} of image {record['name']!r} has shape {a.shape} and "
                    f"dtype {a.dtype}, not what fields height, width of its record "
                    f"{self._record_path(record['name']).name} say; run store.verify()."
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

    def iter_blocks(self, image_id: int, block_pixels: int | None = None):
        """Yield (logits (C, rows, W) float16, labels (rows, W)) row blocks of an image.

        About ``block_pixels`` pixels a block (whole rows, at least one; default as
        :meth:`chunk_size`). The logits block is a buffer the next block reuses:
        copy what you keep. Reads each class plane's rows with ``readinto`` rather than through a
        memory map, so memory (and RSS, which counts mapped pages) stays at one
        block however large the image.
        """
        block_pixels = self.chunk_size(block_pixels)
        record, logits_path, labels_path = self._paths(image_id)
        # a volume (C, D, H, W) is read as the (C, D * H, W) image its bytes also are
        c, h, w = self.n_classes, record.get("depth", 1) * record["height"], record["width"]
        labels_shape = self._expected_array(record, "labels")[0]
        rows = max(1, min(h, block_pixels // max(w, 1)))
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(
                f"labels file {labels_path} of image {record['name']!r} cannot be read "
                f"({npy_reason(exc)}); "
                f"{read_failure_advice(self._record_path(record['name']), record)}."
            ) from None
        if labels.shape != labels_shape or labels.dtype != self.labels_dtype:
            raise ValueError(
                f"labels file {labels_path} of image {record['name']!r} has shape "
                f"{labels.shape} {labels.dtype}, its record's fields say {labels_shape} "
                f"{self.labels_dtype}; run "
                "store.verify()."
            )
        # a label file edited after the commit (add_image checked the original)
        where = f"image {record['name']!r} ({labels_path.name})"
        check_labels(labels, c, self.ignore_index, where=where)
        itemsize = VALUE_DTYPE.itemsize
        try:
            f = open(logits_path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ValueError(
                f"logits file {logits_path} of image {record['name']!r} cannot be read "
                f"({exc}); {read_failure_advice(self._record_path(record['name']), record)}."
            ) from None
        with f:
            try:
                shape, dtype, fortran, offset = npy_header(f)
            except ValueError as exc:
                raise ValueError(
                    f"logits file {logits_path} of image {record['name']!r} has no valid "
                    f".npy header ({npy_reason(exc)}); run store.verify() and re-add the image."
                ) from None
            if shape != (c, *labels_shape) or dtype != VALUE_DTYPE or fortran:
                raise ValueError(
                    f"logits file {logits_path} of image {record['name']!r} has shape {shape}, "
                    f"dtype {dtype}; its record says {(c, *labels_shape)} float16. Run "
                    "store.verify()."
                )
            labels = labels.reshape(h, w)
            buf = np.empty((c, rows, w), dtype=VALUE_DTYPE)
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                block = buf[:, : r1 - r0]
                for k in range(c):
                    f.seek(offset + (k * h + r0) * w * itemsize)
                    view = memoryview(block[k]).cast("B")
                    if f.readinto(view) != view.nbytes:
                        raise ValueError(
                            f"logits file {logits_path} of image {record['name']!r} is "
                            "truncated; run store.verify() and re-add the image."
                        )
                check_finite_block(block, record["name"], logits_path)
                yield block, labels[r0:r1]

    def chunk_size(self, chunk_pixels: int | None = None) -> int:
        """Pixels per chunk: ``chunk_pixels`` checked, or 4M values (``4194304 // n_classes``)."""
        if chunk_pixels is None:
            return max(1, DEFAULT_CHUNK_VALUES // self.n_classes)
        if (
            isinstance(chunk_pixels, (bool, np.bool_))
            or not isinstance(chunk_pixels, numbers.Integral)
            or chunk_pixels < 1
        ):
            raise ValueError(f"chunk_pixels must be an integer >= 1, got {chunk_pixels!r}.")
        return int(chunk_pixels)

    def _read_image(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """One image's logits (C, H, W) float16 and labels (H, W), in memory, read in one block."""
        info = self.image_info(image_id)
        z = np.empty((self.n_classes, *info.shape), dtype=VALUE_DTYPE)
        rows = z.reshape(self.n_classes, -1, info.width)  # a volume's (D * H) rows
        labels = []
        r0 = 0
        # the block reader validates the files; its buffer is reused, hence the copy
        for block, t in self.iter_blocks(image_id, info.n_pixels):
            rows[:, r0 : r0 + block.shape[1]] = block
            labels.append(t)
            r0 += block.shape[1]
        return z, np.concatenate(labels).reshape(info.shape)

    def iter_tables(
        self,
        image_id: int,
        chunk_pixels: int | None = None,
        *,
        context: str | None = None,
        ignored: str = "drop",
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (X, y) tables of one image's pixels, in row blocks, in row-major order.

        Parameters
        ----------
        image_id : int
        chunk_pixels : int, optional
            About how many pixels a table holds (whole image rows); default as
            :meth:`chunk_size`.
        context : None or str, default=None
            The context the rows carry after the C logit columns, as
            :func:`sksegcal.context.estimator_context` names it for a calibrator:
            the columns of :func:`sksegcal.context.iter_image_rows`, computed on
            the whole image (one image in memory), so a row is the same bit for
            bit as the row ``flatten_segmentation(..., context=context)`` gives.
            Without context an image is read block by block.
        ignored : {"drop", "keep"}, default="drop"
            "drop" leaves out the pixels labelled ``ignore_index``; "keep" gives
            every pixel (for inference, or metrics that skip those labels).

        Yields
        ------
        X : ndarray of shape (n, C) or (n, C + K), float32
        y : ndarray of shape (n,), int64
        """
        if ignored not in ("drop", "keep"):
            raise ValueError(f"ignored must be 'drop' or 'keep', got {ignored!r}.")
        drop = ignored == "drop"
        chunk_pixels = self.chunk_size(chunk_pixels)
        if context is not None:
            from ..context import iter_image_rows

            z, t = self._read_image(image_id)
            keep = self.labelled(t) if drop else None
            for rows, X in iter_image_rows(z, context, keep=keep, chunk_pixels=chunk_pixels):
                y = t[rows] if keep is None else t[rows][keep[rows]]
                yield X, y.reshape(-1).astype(np.int64)
            return
        import torch

        for z, t in self.iter_blocks(image_id, chunk_pixels):
            # one pass from class-major float16 to pixel-major float32: torch casts
            # while it transposes, ~2x numpy's cast then transposing copy
            x = np.empty((t.size, self.n_classes), dtype=np.float32)
            torch.from_numpy(x).copy_(torch.from_numpy(z.reshape(self.n_classes, -1)).t())
            y = t.ravel().astype(np.int64)
            keep = self.labelled(y)
            yield (x, y) if not drop or keep.all() else (x[keep], y[keep])

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
        chunk_pixels = self.chunk_size(chunk_pixels)
        c = self.n_classes
        out = None  # the chunk being filled: each pixel is copied into it once
        pos = 0
        for image_id in self._as_ids(images):
            for x, y in self.iter_tables(image_id, chunk_pixels):
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
        missing = [n for part in SPLIT_PARTS for n in split[part] if n not in self._ids]
        if missing:
            raise ValueError(
                f"{self.path / MANIFEST}: field 'split' names images the store lacks "
                f"({missing[:5]}); finish the extraction or make a new split."
            )
        return ImageSplit(
            *(
                np.array(sorted(self._ids[n] for n in split[p]), dtype=np.int64)
                for p in SPLIT_PARTS
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
                self._as_ids(np.asarray(getattr(split, p), dtype=np.int64)) for p in SPLIT_PARTS
            ]
            all_ids = np.concatenate(parts)
            if len(np.unique(all_ids)) != len(all_ids):
                raise ValueError("The split's train/validation/test parts overlap.")
            recorded = {p: [self._names[i] for i in ids] for p, ids in zip(SPLIT_PARTS, parts)}
            recorded["params"] = params
        manifest = self.manifest
        manifest["split"] = recorded
        atomic_write_json(self.path / MANIFEST, manifest)
        self._manifest = manifest

    def make_split(
        self, *, validation_size: float = 0.25, test_size: float = 0.25, random_state=0,
        groups=None,
    ) -> ImageSplit:
        """Split the images with :func:`~sksegcal.pixels.split_images` and record it.

        Every later ``images="train"`` (or "validation", "test") and every
        process that opens the store then uses the same split. ``groups`` (one
        label per image, in :attr:`image_names` order) keeps each group's images
        in one part.

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
            groups=groups,
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
        context: str | None = None,
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
        context : None or str, default=None
            The context columns each row carries after its C logits (see
            :meth:`iter_tables`); the rows drawn do not depend on it (correctness
            is the argmax of the logit columns).

        Returns
        -------
        X : ndarray of shape (n, C) or (n, C + K), float32
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
        return sample_store(
            self,
            max_pixels,
            images=images,
            stratify_by_correctness=stratify_by_correctness,
            max_per_image=max_per_image,
            random_state=random_state,
            chunk_pixels=chunk_pixels,
            context=context,
        )
