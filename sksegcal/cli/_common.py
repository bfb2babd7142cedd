"""What the commands share: the user-fixable error, messages, inputs, outputs, threads."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._safety import bounded_threads, folder_write_problem

UNCALIBRATED = "uncalibrated"


class CommandError(Exception):
    """An error the user can fix; reported as one line, exit status 1."""


def say(args, message: str) -> None:
    """A progress message on stderr (none with ``--quiet``)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def need_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{what} {path} does not exist (or is not a file).")
    return path


def load_npy(path, what: str, expected: str) -> np.ndarray:
    """A memory-mapped ``.npy`` array, or a one-line error saying what the file should be."""
    path = need_file(path, what)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        # np.load's own message ("... when allow_pickle=False") suggests unpickling the file:
        # say what the file should be instead
        raise CommandError(
            f"{what} {path} is not a .npy array file (numpy.save format, no pickled objects); "
            f"it should hold {expected}."
        ) from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        if hasattr(array, "close"):
            array.close()
        raise CommandError(
            f"{what} {path} is an .npz archive, not a .npy array; it should "
            f"hold {expected} (numpy.save)."
        )
    if array.dtype.kind not in "biuf":
        raise CommandError(f"{what} {path} holds {array.dtype} values; it should hold {expected}.")
    return array


def open_store(path, *, n_classes: int | None = None):
    from ..store import LogitStore

    path = Path(path)
    if not path.exists():
        raise CommandError(f"the store {path} does not exist; create it with 'sksegcal extract'.")
    try:
        return LogitStore.open(path, n_classes=n_classes)
    except ValueError as exc:  # a damaged store, or one of another model: the user's to fix
        raise CommandError(str(exc)) from None


def load_calibrator(path, *, trusted: bool = False):
    """A calibrator file through :func:`sksegcal.persistence.load`: skops, or a pickle if trusted.

    A joblib/pickle file runs any code it contains when loaded, so it is opened
    only with ``--trusted``; everything else is refused with one line that names
    the file.
    """
    from ..persistence import detect_format, load

    path = need_file(path, "the calibrator")
    try:
        fmt = detect_format(path)
    except (ValueError, OSError):
        raise CommandError(
            f"cannot load the calibrator {path}: it is not a calibrator file written by "
            "'sksegcal fit', sksegcal.persistence.save, joblib.dump or skops.io.dump."
        ) from None
    if fmt == "joblib" and not trusted:
        raise CommandError(
            f"the calibrator {path} is a joblib/pickle file, and loading a pickle runs any "
            "code it contains: pass --trusted if you made it or trust its source, or use a "
            "skops file ('sksegcal fit -o NAME.skops')."
        )
    try:
        return load(path, trusted=True if trusted else None)
    except TypeError as exc:  # not a calibrator, or (skops) types that are not trusted
        message = str(exc)
        if "not trusted" in message and not trusted:
            message += " (or pass --trusted)"
        raise CommandError(f"cannot load the calibrator {path}: {message}") from None
    except (ValueError, OSError, ImportError) as exc:
        raise CommandError(f"cannot load the calibrator {path}: {exc}") from None


def calibrator_names(paths: Sequence, reserved: Sequence[str] = (UNCALIBRATED,)) -> list[str]:
    """Unique method names for calibrator files: the file stem, then more of the path.

    ``a/ts.joblib`` and ``b/ts.joblib`` become ``a/ts`` and ``b/ts``, and
    ``ts.skops`` beside ``ts.joblib`` keep their suffixes; a stem that is a
    reserved name (``uncalibrated``) takes its folder too. The same file given
    twice is an error.
    """
    resolved = [Path(p).resolve() for p in paths]
    seen: dict[Path, str] = {}
    for given, path in zip(paths, resolved):
        if path in seen:
            raise CommandError(f"the calibrator {given} is given twice (as {seen[path]} too).")
        seen[path] = str(given)

    def name(i: int, depth: int) -> str:
        parts = Path(paths[i]).with_suffix("").parts
        if depth > len(parts):  # the whole path as given, suffix included
            return str(paths[i])
        return "/".join(parts[-depth:])

    depth = [1] * len(paths)
    while True:
        names = [name(i, d) for i, d in enumerate(depth)]
        clash = [i for i, n in enumerate(names) if n in reserved or names.count(n) > 1]
        if not clash:
            return names
        for i in clash:
            depth[i] += 1


def _folder_problem(path: Path) -> str | None:
    """Why no folder can be at ``path`` (None: it is one, or can be created)."""
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a folder"
        return folder_write_problem(path)
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return folder_write_problem(parent)


def check_output_dir(path, option: str = "--output") -> Path:
    """Check, before any work, that ``path`` is or can become a folder (nothing is created)."""
    path = Path(path)
    problem = _folder_problem(path)
    if problem is not None:
        raise CommandError(
            f"cannot write the {option} folder {path}: {problem}; choose another {option}."
        )
    return path


def check_output_file(path, option: str = "--output") -> Path:
    """Check, before any work, that a file can be written at ``path`` (nothing is created)."""
    path = Path(path)
    problem = (
        f"{path} is a folder (give a file name, e.g. {path / 'calibrator.skops'})"
        if path.is_dir()
        else _folder_problem(path.parent)
    )
    if problem is not None:
        raise CommandError(f"cannot write the {option} file {path}: {problem}.")
    return path


def image_ids(store, images: str) -> np.ndarray:
    """Store image ids of 'all', 'train', 'validation', 'test' (the recorded split)."""
    if images == "all":
        return np.arange(store.n_images)
    split = store.split
    if split is None:
        raise CommandError(
            f"the store {store.path} has no recorded split, so there is no {images!r} part; "
            "run 'sksegcal fit' (which records one) or pass --images all."
        )
    return np.asarray(getattr(split, images))


@contextlib.contextmanager
def threads(n: int | None):
    """Limit BLAS/OpenMP and torch threads to ``n`` (None: leave them alone).

    On a small shared machine, OpenMP spin-waiting makes 2 threads several
    times slower than 1 (gradient boosting: 24 s instead of 4 s on a loaded
    2-core machine), so the demo defaults to one thread.
    """
    if n is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    n = bounded_threads(n)  # more threads than CPUs only oversubscribe (and may crash OpenMP)
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(previous)


def fmt_value(value) -> str:
    if isinstance(value, float):  # 1e10 as 1e+10, not 10000000000.0
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k}: {v}" for k, v in value.items()) + ")"
    return str(value)


def fmt_t(value):
    """A temperature for display: 3 significant digits, 1e10 as 1e+10."""
    if isinstance(value, str):
        return value
    return f"{value:.3g}" if value < 1e6 else f"{value:.0e}"
