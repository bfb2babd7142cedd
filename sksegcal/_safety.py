"""Guards against hostile or careless inputs, shared by the paths that read and write files.

Each function is one check with an error that says what was wrong, where, and
what to do: names written into a folder stay inside it, the store's values
match what the calibrator takes, counts and widths are bounded by what the
data and the machine can use, stored arrays are finite and plain files, and
fitted values loaded from a file are finite and in range.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- file names
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def file_slug(text: Any, fallback: str) -> str:
    """A file-name part made of ``[A-Za-z0-9_-]`` from ``text`` (``fallback`` if none left).

    Separators, dots and every other character are replaced, so the slug
    names one file in one folder whatever ``text`` holds.
    """
    slug = _UNSAFE.sub("_", str(text)).strip("_")[:64]
    return slug or fallback


def inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, after checking that it resolves to a file directly inside ``folder``."""
    folder = Path(folder)
    path = folder / name
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a plain file name; refusing to write it in {folder}.")
    if path.resolve().parent != folder.resolve():
        raise ValueError(f"{path} resolves outside {folder} (a link?); refusing to write it.")
    return path


# --------------------------------------------------------------------------- output folders
def folder_write_problem(folder: Path) -> str | None:
    """Why no file can be written in the existing folder ``folder`` (None: one can).

    Tries: a probe file is created and removed at once, which also catches
    read-only mounts and access rules that permission bits do not show.
    """
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".sksegcal-probe-"):
            pass
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror or exc})"
    return None


# --------------------------------------------------------------------------- counts
def bounded_threads(n: int) -> int:
    """``n`` threads, at most the machine's CPU count (more only oversubscribes)."""
    return max(1, min(int(n), os.cpu_count() or 1))


def bounded_jobs(n_jobs: int | None, n_tasks: int, backend: Any = None) -> int | None:
    """joblib's ``n_jobs`` bounded by the tasks there are and, on this machine, its CPUs.

    No more workers than tasks ever run; with a local backend (processes or
    threads of this machine) no more than ``os.cpu_count()``. A remote backend
    (dask) keeps the count the user gave, up to the number of tasks.
    """
    from joblib import effective_n_jobs
    from joblib.parallel import get_active_backend

    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral) or n_jobs == 0:
        raise ValueError(f"n_jobs must be a nonzero integer or None, got {n_jobs!r}.")
    if n_tasks <= 1:
        return 1
    if backend is None:
        backend = get_active_backend()[0]
    active = backend if isinstance(backend, str) else type(backend).__name__
    local = str(active).lower().replace("backend", "") in (
        "loky",
        "threading",
        "multiprocessing",
        "sequential",
    )
    n = effective_n_jobs(n_jobs) if n_jobs < 0 else int(n_jobs)
    n = min(n, n_tasks)
    return max(1, min(n, os.cpu_count() or 1) if local else n)


def exact_int(value: Any, what: str, *, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int, refusing fractions, NaN, bools and values outside [low, high]."""
    ok = not isinstance(value, (bool, np.bool_))
    if ok and not isinstance(value, numbers.Integral):
        ok = isinstance(value, numbers.Real) and math.isfinite(value) and value == int(value)
    if ok:
        value = int(value)
        ok = value >= low and (high is None or value <= high)
    if not ok:
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{what} must be a whole number {span}, got {value!r}.")
    return value


def check_counts(counts: np.ndarray, what: str) -> np.ndarray:
    """Counts as float64: finite, non-negative whole numbers (a state read from a file)."""
    counts = np.asarray(counts, dtype=np.float64)
    if not (np.all(np.isfinite(counts)) and np.all(counts >= 0) and np.all(counts % 1 == 0)):
        raise ValueError(f"{what} must hold finite, non-negative whole numbers.")
    return counts


def check_class_index(target_class: Any, n_classes: int, what: str = "target_class") -> int:
    """A class index in ``0 .. n_classes - 1`` (negative indices are not classes)."""
    return exact_int(target_class, what, low=0, high=n_classes - 1)


# --------------------------------------------------------------------------- stored arrays
def check_finite_block(block: np.ndarray, image: Any, file: Any) -> None:
    """Refuse a non-finite value in a block of stored values, naming the image and file."""
    if not np.isfinite(block).all():
        raise ValueError(
            f"image {image!r} holds NaN or infinite values (file {file}); the network's "
            "outputs were not finite there. Re-add the image with finite values "
            "(add_image(..., overwrite=True)) or leave it out (images=...)."
        )


def refuse_symlinks(*paths: Path) -> None:
    """Refuse array files that are symbolic links: a store reads only its own files."""
    for path in paths:
        if os.path.islink(path):
            raise ValueError(
                f"{path} is a symbolic link (to {os.readlink(path)}); a store reads only "
                "its own files. Re-add the image (add_image(..., overwrite=True))."
            )


def npy_reason(exc: BaseException) -> str:
    """numpy's reason a .npy file cannot be read, without its advice to trust the file.

    numpy suggests ``allow_pickle=True`` for oversized or object headers;
    for a store's arrays that advice is wrong (they are plain numbers) and
    unsafe, so only the first sentence is kept.
    """
    text = str(exc)
    if "allow_pickle" in text or "max_header_size" in text:
        return "not a plain numeric .npy array (header too large or of objects)"
    return text


# --------------------------------------------------------------------------- calibrators
def estimator_context(estimator, *, where: str = "this path") -> str | None:
    """The context the rows given to ``estimator`` carry (None: logits only)."""
    try:
        from .context import estimator_context as reader
    except ImportError:
        from .pixels import _estimator_context as reader

        return reader(estimator, where=where)
    return reader(estimator)


def check_calibrator_columns(estimator, n_classes: int, *, what: str, where: str, path: str):
    """The one check of a calibrator's columns: C classes plus the context it reads."""
    from .pixels import _check_context_calibrator

    return _check_context_calibrator(estimator, n_classes, what=what, where=where, path=path)


def _input_types(estimator) -> set[str]:
    """The ``input_type`` values the final calibrator of ``estimator`` may have."""
    if getattr(estimator, "best_estimator_", None) is not None:  # a fitted search
        return _input_types(estimator.best_estimator_)
    steps = getattr(estimator, "steps", None)
    if isinstance(steps, list) and steps and isinstance(steps[-1], tuple):  # a Pipeline
        return _input_types(steps[-1][-1])
    inner = getattr(estimator, "estimator", None)
    if hasattr(inner, "get_params") and not isinstance(inner, type):  # a search or meta
        found = _input_types(inner)
        for attr in ("param_grid", "param_distributions"):
            grids = getattr(estimator, attr, None)
            for grid in [grids] if isinstance(grids, dict) else list(grids or []):
                for key, values in grid.items():
                    if key.rpartition("__")[2] == "input_type":
                        found |= set(values) if isinstance(values, (list, tuple)) else {values}
        return found
    value = getattr(estimator, "input_type", None)
    return {value} if isinstance(value, str) else set()


def check_input_type(estimator, values: str, *, what: str, where: str) -> None:
    """Refuse a calibrator whose ``input_type`` is not what the store holds.

    A calibrator fitted on logits reads probabilities as logits (and the other
    way round) without any error; this looks through pipelines and searches.
    """
    if estimator is None:
        return
    other = sorted(_input_types(estimator) - {values})
    if other:
        raise ValueError(
            f"{what} takes input_type={other[0]!r} but {where} holds {values}; give it a "
            f"store of {other[0]} (e.g. the store the logits were extracted into, not the "
            f"output of predict_store), or a calibrator fitted with input_type={values!r}."
        )


# --------------------------------------------------------------------------- loaded values
#: fitted attributes that may hold +inf: a conformal threshold with too few calibration units
_MAY_BE_INFINITE = frozenset({"threshold_"})


def _bad_float(name: str, value) -> str | None:
    a = np.asarray(value)
    if a.dtype.kind != "f" or a.size == 0:
        return None
    if np.isnan(a).any():
        return "NaN"
    if name not in _MAY_BE_INFINITE and not np.isfinite(a).all():
        return "an infinite value"
    if re.search(r"(^|_)temperatures?_$", name) and not (a > 0).all():
        return "a temperature <= 0"
    return None


def check_fitted_values(obj, where: str, _seen: set | None = None) -> None:
    """Refuse a loaded estimator whose fitted values are NaN, infinite or out of range.

    Looks at every public attribute ending in ``_`` (floats, float arrays,
    and those inside dicts, lists and nested estimators): they must be
    finite, temperatures positive. A file edited by hand or corrupted would
    otherwise load and predict NaN everywhere.
    """
    seen = set() if _seen is None else _seen
    if id(obj) in seen or obj is None:
        return
    seen.add(id(obj))
    if getattr(obj, "best_estimator_", None) is not None:  # a search: its results are a report
        check_fitted_values(obj.best_estimator_, where, seen)
        return
    for _, step in getattr(obj, "steps", None) or []:
        check_fitted_values(step, where, seen)
    for attr, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if attr.startswith("_") or (not attr.endswith("_") and attr != "calibrator"):
            continue
        items = value.items() if isinstance(value, dict) else [(attr, value)]
        if isinstance(value, (list, tuple)):
            items = [(attr, v) for v in value]
        for _, item in items:
            if hasattr(item, "get_params"):
                check_fitted_values(item, where, seen)
                continue
            if isinstance(item, (numbers.Real, np.ndarray, np.generic)) and not isinstance(
                item, bool
            ):
                why = _bad_float(attr, item)
                if why:
                    raise ValueError(
                        f"{where}: fitted attribute {attr} of {type(obj).__name__} holds "
                        f"{why}; the file is corrupt or was edited. Refit and save again."
                    )


def read_failure_advice(record_path: Path, record: dict) -> str:
    """What to do when an image's files cannot be read, after looking at its record on disk.

    A handle that read the record before another process replaced the image
    (``add_image(..., overwrite=True)``) finds the old files gone: re-opening
    picks up the new record. Otherwise the store is damaged.
    """
    import json

    try:
        on_disk = json.loads(Path(record_path).read_bytes())["files"]
        changed = {k: v["file"] for k, v in on_disk.items()} != {
            k: v["file"] for k, v in record["files"].items()
        }
    except FileNotFoundError:
        changed = True
    except Exception:  # a damaged record: verify says what is wrong
        changed = False
    if changed:
        return (
            "the image was replaced or removed since this handle read its record; re-open "
            "the store (LogitStore.open) or call store.refresh()"
        )
    return "run store.verify() and re-add the image"


def empty_state_reason(estimator) -> str:
    """Why a conformal estimator counted no calibration unit ("" when it counted some)."""
    state = getattr(estimator, "state_", None)
    units = getattr(state, "n_", getattr(state, "n_images_", None))
    if units != 0:
        return ""
    why = (
        "no calibration pixel was counted: every label is ignore_index="
        f"{getattr(estimator, 'ignore_index', None)}"
    )
    if getattr(estimator, "loss", None) == "fnr":
        why += f" or no calibration image holds target_class={estimator.target_class}"
    return f"{why}; "
