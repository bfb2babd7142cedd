"""The LogitStore's on-disk format: names, file names, and the checks of manifests and records.

Everything here is pure: it reads and validates JSON documents and ``.npy``
headers, and never writes. A manifest or record is untrusted input (a store can
come from anywhere), so each field is checked for its type and range, and every
error names the file and the field.

May import: numpy, the standard library, :mod:`sksegcal._files` and
:mod:`sksegcal._validation`. Nothing else of sksegcal.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._files import TMP_PREFIX

FORMAT_NAME = "sksegcal.LogitStore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGES = "images"
VALUE_DTYPE = np.dtype("<f2")
SPLIT_PARTS = ("train", "validation", "test")
KINDS = ("logits", "labels")
VALUES = ("logits", "probabilities")
# names usable as file stems as they are; anything else is escaped + hashed
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# a data file of image <stem>: <stem>.<kind>.npy (written before 0.1: one writer per
# name) or <stem>.<token>.<kind>.npy (a random token per write: see _commit.py)
_TOKEN = r"(?:\.[0-9a-f]{8,64})?"


class StoreFormatError(ValueError):
    """A manifest or record that is not valid; the message names the file and the field."""


def check_name(name) -> int | str:
    """An image name: an int or a non-empty str without surrounding whitespace."""
    if isinstance(name, (bool, np.bool_)) or not isinstance(name, (numbers.Integral, str)):
        raise TypeError(f"an image name must be an int or a str, got {name!r}.")
    if isinstance(name, str):
        if not name or name != name.strip():
            raise ValueError(f"image name {name!r} is empty or has surrounding whitespace.")
        return name
    return int(name)


def stem(name: int | str) -> str:
    """The file stem of an image name (its record is ``images/<stem>.json``)."""
    text = str(name)
    # ints and strs that print alike ("5" and 5) must not share files: digit strings
    # take the hashed form
    if _SAFE_NAME.fullmatch(text) and (isinstance(name, int) or not text.isdigit()):
        return text
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:60].lstrip(".")
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def sort_key(name: int | str):
    # integer names in numeric order, then strings; independent of writing order
    return (0, name, "") if isinstance(name, int) else (1, 0, name)


def data_file_name(stem_: str, token: str, kind: str) -> str:
    return f"{stem_}.{token}.{kind}.npy"


def is_data_file_of(file: str, stem_: str, kind: str) -> bool:
    """Whether ``file`` is a plain file name that image ``stem_`` may use for ``kind``."""
    return re.fullmatch(re.escape(stem_) + _TOKEN + re.escape(f".{kind}.npy"), file) is not None


def label_dtype(n_classes: int, ignore_index: int | None) -> np.dtype:
    lo = min(0, ignore_index if ignore_index is not None else 0)
    hi = max(n_classes - 1, ignore_index if ignore_index is not None else 0)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype).newbyteorder("<")
    raise ValueError(f"labels in [{lo}, {hi}] do not fit a 32-bit integer.")


def npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an open .npy file."""
    try:
        version = np.lib.format.read_magic(f)
    except EOFError as exc:  # an empty or cut file: what every other bad header raises
        raise ValueError(f"not a .npy file ({exc})") from None
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype, fortran, f.tell()


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, with a StoreFormatError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise StoreFormatError(f"The {what} {path} is corrupt (not JSON: {exc}).") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(where: Path, key: str, problem: str) -> StoreFormatError:
    return StoreFormatError(f"{where}: field {key!r} {problem}.")


# --------------------------------------------------------------------------- manifest
def check_manifest(manifest: Any, where: Path) -> dict:
    """Validate a manifest's fields; return it with the optional ones filled in.

    Optional (filled with their defaults): ``class_names`` (None), ``source``
    ({}), ``split`` (None), ``checksum`` ("sha256").
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreFormatError(
            f"{where} is not a {FORMAT_NAME} manifest (field 'format' is not {FORMAT_NAME!r})."
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(
            f"{where}: field 'format_version' is {manifest.get('format_version')!r}; this "
            f"sksegcal reads version {FORMAT_VERSION}."
        )
    for key in ("n_classes", "ignore_index", "values", "dtypes"):
        if key not in manifest:
            raise _field(where, key, "is missing")
    n_classes = manifest["n_classes"]
    if not _is_int(n_classes) or n_classes < 2:
        raise _field(where, "n_classes", f"must be an integer >= 2, got {n_classes!r}")
    ignore_index = manifest["ignore_index"]
    if ignore_index is not None and not _is_int(ignore_index):
        raise _field(where, "ignore_index", f"must be an integer or null, got {ignore_index!r}")
    if manifest["values"] not in VALUES:
        raise _field(where, "values", f"must be one of {VALUES}, got {manifest['values']!r}")
    manifest.setdefault("class_names", None)
    names = manifest["class_names"]
    if names is not None and (
        not isinstance(names, list)
        or len(names) != n_classes
        or not all(isinstance(c, str) for c in names)
    ):
        raise _field(where, "class_names", f"must be null or {n_classes} strings")
    dtypes = manifest["dtypes"]
    if not isinstance(dtypes, dict) or dtypes.get("values") != VALUE_DTYPE.str:
        raise _field(where, "dtypes", f"must hold 'values': {VALUE_DTYPE.str!r}")
    want = label_dtype(n_classes, ignore_index).str
    if dtypes.get("labels") != want:
        raise _field(
            where,
            "dtypes",
            f"has labels {dtypes.get('labels')!r}; {n_classes} classes with ignore index "
            f"{ignore_index} are stored as {want!r}",
        )
    manifest.setdefault("checksum", "sha256")
    if manifest["checksum"] != "sha256":
        raise _field(where, "checksum", f"must be 'sha256', got {manifest['checksum']!r}")
    manifest.setdefault("source", {})
    if not isinstance(manifest["source"], dict):
        raise _field(where, "source", f"must be an object, got {manifest['source']!r}")
    manifest.setdefault("split", None)
    split = manifest["split"]
    if split is not None:
        if not isinstance(split, dict):
            raise _field(where, "split", f"must be null or an object, got {split!r}")
        for part in SPLIT_PARTS:
            names_ = split.get(part)
            if not isinstance(names_, list) or not all(
                _is_int(n) or isinstance(n, str) for n in names_
            ):
                raise _field(where, f"split.{part}", "must be a list of image names")
    return manifest


# --------------------------------------------------------------------------- records
def check_record(record: Any, where: Path, n_classes: int, labels_dtype: np.dtype) -> dict:
    """Validate an image record (``images/<stem>.json``); return it.

    Checks every field's type and range, that the record sits at its name's
    file (a second record of the same name would hide an image), and that the
    data files are plain file names of this image inside ``images/`` (a record
    must never point outside the store).
    """
    if not isinstance(record, dict):
        raise StoreFormatError(f"The image record {where} is not a JSON object.")
    for key in ("name", "height", "width", "n_valid", "n_correct", "files"):
        if key not in record:
            raise _field(where, key, "is missing")
    try:
        name = check_name(record["name"])
    except (TypeError, ValueError) as exc:
        raise _field(where, "name", f"is not an image name ({exc})") from None
    if isinstance(name, str) and not isinstance(record["name"], str):
        raise _field(where, "name", f"is not an image name: {record['name']!r}")
    stem_ = stem(name)
    if where.name != f"{stem_}.json":
        raise _field(
            where,
            "name",
            f"is {name!r}, whose record is {stem_}.json, not {where.name} (a copied or "
            "renamed record would hide or duplicate an image)",
        )
    # "depth" only in the records of volumes (C, D, H, W); images have none
    for key in ("height", "width", "depth"):
        if key in record and (not _is_int(record[key]) or record[key] < 1):
            raise _field(where, key, f"must be an integer >= 1, got {record[key]!r}")
    n = record.get("depth", 1) * record["height"] * record["width"]
    if not _is_int(record["n_valid"]) or not 0 <= record["n_valid"] <= n:
        raise _field(
            where, "n_valid", f"must be an integer in [0, height*width={n}], got "
            f"{record['n_valid']!r}"
        )
    if not _is_int(record["n_correct"]) or not 0 <= record["n_correct"] <= record["n_valid"]:
        raise _field(
            where, "n_correct", f"must be an integer in [0, n_valid={record['n_valid']}], "
            f"got {record['n_correct']!r}"
        )
    files = record["files"]
    if not isinstance(files, dict) or set(files) != set(KINDS):
        raise _field(where, "files", f"must have exactly the keys {list(KINDS)}")
    expected_data = {
        "logits": n_classes * n * VALUE_DTYPE.itemsize,
        "labels": n * labels_dtype.itemsize,
    }
    for kind in KINDS:
        info = files[kind]
        key = f"files.{kind}"
        if not isinstance(info, dict):
            raise _field(where, key, "must be an object with file, bytes and sha256")
        file = info.get("file")
        if not isinstance(file, str) or not is_data_file_of(file, stem_, kind):
            raise _field(
                where,
                f"{key}.file",
                f"is {file!r}; an image's files must be plain file names in images/ "
                f"({stem_}.{kind}.npy or {stem_}.<token>.{kind}.npy), never a path",
            )
        nbytes = info.get("bytes")
        # a .npy header is 64 bytes or a few multiples of it
        if not _is_int(nbytes) or not 0 < nbytes - expected_data[kind] <= 65536:
            raise _field(
                where,
                f"{key}.bytes",
                f"is {nbytes!r}; a {kind} array of this image's shape holds "
                f"{expected_data[kind]} bytes plus a header",
            )
        digest = info.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _field(where, f"{key}.sha256", f"must be 64 hex digits, got {digest!r}")
    if files["logits"]["file"] == files["labels"]["file"]:
        raise _field(where, "files", "names one file for both arrays")
    return record


def is_record_file(path: Path) -> bool:
    return path.suffix == ".json" and not path.name.startswith(TMP_PREFIX)
