"""Save fitted calibrators and load them back, safely when the file is untrusted.

Two formats:

- ``"joblib"`` (what :func:`save` writes unless the name ends in ``.skops``): a pickle written by
  :func:`joblib.dump`. It holds any estimator and reads back with a plain
  ``joblib.load`` too, but **loading a pickle runs whatever code it
  contains**, so :func:`load` opens one only with ``trusted=True``.
- ``"skops"``: a :mod:`skops.io` archive (JSON schema + ``.npy`` arrays, no
  pickle). :func:`load` opens it without executing code: it refuses any type
  that is neither in :data:`TRUSTED_TYPES`, nor trusted by skops itself
  (numpy, scipy and scikit-learn types), nor named in ``trusted``. This is
  the format to exchange calibrators with others. It needs the optional
  ``skops`` package (``pip install skops``).

Every calibrator records the sksegcal, scikit-learn (and, when loaded,
torch) versions it was saved with, in either format; loading it under other
versions warns (``UserWarning``). A fitted :class:`~sksegcal.TorchMLPClassifier`
holds numpy arrays only, so a calibrator trained on a GPU loads and predicts
in a CPU-only process. See ``docs/persistence.md``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._files import atomic_write_via_path
from ._safety import check_fitted_values
from ._validation import check_fitted_before_save, resolve_save_format

__all__ = ["TRUSTED_TYPES", "detect_format", "load", "save"]  # noqa: F822 - TRUSTED_TYPES: __getattr__

#: TRUSTED_TYPES (a module attribute, computed when read): the sksegcal types a skops
#: file may hold without ``trusted``: every estimator class of the package (the
#: calibrators, the correctness MLP, the conformal estimators) and the plain-data state
#: classes they hold, each by the module that defines it and every module that exports
#: it. Their state is numpy arrays and Python scalars, lists, tuples and dicts only:
#: loading them runs none of our code but ``__setstate__``, which compares the recorded
#: library versions.
_FORMATS = ("joblib", "skops")

# first bytes of a pickle (protocol >= 2) and of joblib's compressed containers
_PICKLE_MAGIC = b"\x80"
_COMPRESSED_MAGIC = (
    b"\x1f\x8b",  # gzip
    b"BZh",  # bz2
    b"\xfd7zXZ",  # xz
    b"]\x00\x00",  # lzma
    b"\x04\x22\x4d\x18",  # lz4
    b"ZF",  # joblib's zlib container
)


# The state classes a trusted estimator holds that are neither estimators nor numpy, scipy
# or scikit-learn types: plain data (arrays, scalars, lists, dicts) in each. Named as
# classes, so that a rename or a move updates the trusted names with them.
def _state_classes() -> tuple[type, ...]:
    from .conformal import ImageRiskTally, ScoreHistogram
    from .selective import _ConstantCorrectness

    return (_ConstantCorrectness, ScoreHistogram, ImageRiskTally)


def _estimator_classes(*, bases: bool = False) -> tuple[type, ...]:
    """Every estimator class the package defines: calibrators, the MLP, conformal estimators.

    Found, not listed: the subclasses of scikit-learn's ``BaseEstimator`` defined in
    ``sksegcal`` once the modules that export estimators are imported (the public names
    of ``sksegcal`` and :mod:`sksegcal.conformal`); private helpers left out, and the
    bases (``BaseLogitCalibrator``, ...) too unless ``bases``: an instance of a subclass of
    one (a calibrator of your own) is a sksegcal estimator, but not a trusted type.
    """
    import importlib

    from sklearn.base import BaseEstimator

    import sksegcal

    for module in sorted(set(sksegcal._LAZY.values())) + ["conformal"]:
        importlib.import_module(f"sksegcal.{module}")
    found, todo = set(), [BaseEstimator]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    own = [
        cls
        for cls in found
        if cls.__module__.partition(".")[0] == "sksegcal"
        and not cls.__name__.startswith("_")
        and (bases or not cls.__name__.startswith("Base"))
    ]
    return tuple(sorted(own, key=lambda c: (c.__module__, c.__qualname__)))


def _names_of(classes) -> tuple[str, ...]:
    """``module.Class`` of each class where it is defined and where the package exports it."""
    import sys

    names = set()
    for cls in classes:
        names.add(f"{cls.__module__}.{cls.__qualname__}")
        for name, module in list(sys.modules.items()):
            if name.partition(".")[0] == "sksegcal" and vars(module).get(cls.__name__) is cls:
                names.add(f"{name}.{cls.__name__}")
    return tuple(sorted(names))


def __getattr__(name: str):
    if name == "TRUSTED_TYPES":
        return _names_of(_estimator_classes() + _state_classes())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _calibrator_inside(obj: Any) -> Any | None:
    """The sksegcal estimator ``obj`` is or wraps (Pipeline, search), else None."""
    if isinstance(obj, _estimator_classes(bases=True)):
        return obj
    from sklearn.model_selection._search import BaseSearchCV
    from sklearn.pipeline import Pipeline

    if isinstance(obj, Pipeline) and len(obj.steps):
        return _calibrator_inside(obj.steps[-1][1])
    if isinstance(obj, BaseSearchCV):
        return _calibrator_inside(getattr(obj, "best_estimator_", obj.estimator))
    return None


def _describe(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_calibrator(obj: Any, where: str) -> None:
    if _calibrator_inside(obj) is None:
        names = ", ".join(cls.__name__ for cls in _estimator_classes())
        raise TypeError(
            f"{where} holds a {_describe(obj)}, not a sksegcal calibrator or conformal "
            f"estimator. Expected one of {names}, or a Pipeline / GridSearchCV ending in one."
        )


def _import_skops():
    try:
        import skops.io as sio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "format='skops' needs the optional skops package: pip install skops "
            "(or pip install 'sksegcal[docs]')."
        ) from exc
    return sio


def save(estimator: Any, path: str | os.PathLike, *, format: str | None = None) -> Path:
    """Write a (fitted) calibrator to a file.

    Parameters
    ----------
    estimator : estimator
        A sksegcal calibrator or :class:`~sksegcal.TorchMLPClassifier`, or a
        scikit-learn ``Pipeline`` / ``GridSearchCV`` ending in one.
    path : str or path-like
        File to write (overwritten). Conventional suffixes: ``.joblib``,
        ``.skops``.
    format : {"joblib", "skops"} or None, default=None
        None: from the file name (``.skops``: skops, anything else: joblib); a
        format the name contradicts (skops to ``x.joblib``) raises.
        ``"joblib"``: a pickle, for your own files (loading runs code).
        ``"skops"``: a pickle-free :mod:`skops.io` archive, safe to load from
        untrusted sources with :func:`load`.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Raises
    ------
    TypeError
        If ``estimator`` is not a sksegcal calibrator or conformal estimator.
    ValueError
        If ``format`` is unknown or contradicts the file name.
    sklearn.exceptions.NotFittedError
        If ``estimator`` is not fitted.

    Notes
    -----
    The file is written atomically: to a temporary file in the same folder,
    fsynced, then renamed over ``path``. A failed save leaves an existing file
    at ``path`` as it was.

    See Also
    --------
    load : Read the file back.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from sksegcal import TemperatureScaling
    >>> from sksegcal.persistence import load, save
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=500)
    >>> X = 4.0 * (np.eye(3)[y] + rng.normal(size=(500, 3)))
    >>> cal = TemperatureScaling().fit(X, y)
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> path = save(cal, folder / "ts.joblib")
    >>> same = load(path, trusted=True)  # a pickle: only files you trust
    >>> bool(np.array_equal(same.predict_proba(X), cal.predict_proba(X)))
    True
    """
    if format is not None and format not in _FORMATS:
        raise ValueError(f"format={format!r} is not one of {_FORMATS}.")
    _check_calibrator(estimator, "estimator")
    check_fitted_before_save(estimator, calibrator=_calibrator_inside(estimator))
    format = resolve_save_format(path, format)
    path = Path(path)
    if format == "joblib":
        import joblib

        def write_to(tmp):
            joblib.dump(estimator, tmp)
    else:
        sio = _import_skops()

        def write_to(tmp):
            sio.dump(estimator, tmp)

    # a temporary file beside the target, fsynced, then renamed over it: a save that
    # fails (full disk, a kill, an estimator that cannot be serialised) leaves the
    # previous file at ``path`` untouched
    return atomic_write_via_path(path, write_to)


def detect_format(path: str | os.PathLike) -> str:
    """Which format a file is in, from its first bytes (nothing is loaded).

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    format : {"joblib", "skops"}

    Raises
    ------
    ValueError
        If the file is neither a skops archive nor a (possibly compressed)
        pickle.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
            raise ValueError(
                f"{path} is a damaged zip archive ({type(exc).__name__}: {exc}); it cannot be "
                "a readable skops file. Save the calibrator again."
            ) from exc
        if "schema.json" in names:
            return "skops"
        raise ValueError(
            f"{path} is a zip archive without a skops schema.json: not a file written by "
            "sksegcal.persistence.save."
        )
    if head.startswith(_PICKLE_MAGIC) or head.startswith(_COMPRESSED_MAGIC):
        return "joblib"
    raise ValueError(
        f"{path} is neither a skops archive nor a joblib/pickle file (it starts with "
        f"{head!r}); it was not written by sksegcal.persistence.save or joblib.dump."
    )


def load(
    path: str | os.PathLike,
    *,
    trusted: bool | Iterable[str] | None = None,
) -> Any:
    """Read a calibrator written by :func:`save` (or by ``joblib.dump``).

    The format is detected from the file's content, not its name.

    Parameters
    ----------
    path : str or path-like
        The file.
    trusted : None, False, True or iterable of str, default=None
        What you vouch for.

        - ``None`` (or ``False``): safe loading only. A skops file loads when every type in
          it is in :data:`TRUSTED_TYPES` or trusted by skops (numpy, scipy,
          scikit-learn); a joblib/pickle file is refused, since unpickling
          runs arbitrary code.
        - iterable of str: as ``None``, and these extra type names (as
          ``"module.Class"``) may appear in a skops file too, e.g. a
          third-party correctness classifier.
        - ``True``: you trust the file entirely: a joblib/pickle file is
          unpickled, a skops file loads whatever types it holds.

    Returns
    -------
    estimator : estimator
        The calibrator (or the Pipeline / search object ending in one).

    Raises
    ------
    ValueError
        If the file is neither format, is corrupt, or is a pickle and
        ``trusted`` is not ``True``.
    TypeError
        If it holds something other than a sksegcal calibrator, or (skops) a
        type that is not trusted; the message names what was found.

    Warns
    -----
    UserWarning
        If the calibrator was saved under other sksegcal / scikit-learn /
        torch versions.

    See Also
    --------
    save : Write a calibrator.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from sksegcal import TemperatureScaling
    >>> from sksegcal.persistence import load, save
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=500)
    >>> X = 4.0 * (np.eye(3)[y] + rng.normal(size=(500, 3)))
    >>> cal = TemperatureScaling().fit(X, y)
    >>> path = save(cal, pathlib.Path(tempfile.mkdtemp()) / "ts.skops", format="skops")
    >>> same = load(path)  # no code runs: safe for files from others
    >>> round(same.temperature_, 6) == round(cal.temperature_, 6)
    True
    """
    trusted = _check_trusted(trusted)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No file at {path}.")
    fmt = detect_format(path)
    if fmt == "joblib":
        if trusted is not True:
            raise ValueError(
                f"{path} is a joblib/pickle file: loading it runs any code it contains. Load it "
                "with trusted=True only if you made it or trust its source; to exchange "
                "calibrators with others, save them with format='skops' and load those "
                "without trusted."
            )
        import joblib

        try:
            obj = joblib.load(path)
        except Exception as exc:
            raise ValueError(
                f"{path} looks like a joblib/pickle file but could not be loaded "
                f"({type(exc).__name__}: {exc})."
            ) from exc
    else:
        obj = _load_skops(path, trusted)
    _check_calibrator(obj, str(path))
    check_fitted_values(obj, str(path))  # an edited NaN temperature would predict NaN
    return obj


def _check_trusted(trusted) -> bool | frozenset[str] | None:
    """``trusted`` as True, None (safe loading) or a set of extra type names."""
    if trusted is None or trusted is False:  # False reads as "trust nothing extra"
        return None
    if trusted is True:
        return True
    if isinstance(trusted, str):
        return frozenset({trusted})
    try:
        names = frozenset(trusted)
    except TypeError:
        raise TypeError(
            f"trusted must be None, False, True or an iterable of type names such as "
            f"'module.Class'; got {trusted!r}."
        ) from None
    bad = [t for t in names if not isinstance(t, str)]
    if bad:
        raise TypeError(f"trusted type names must be strings; got {bad!r}.")
    return names


def _load_skops(path: Path, trusted: bool | Iterable[str] | None) -> Any:
    sio = _import_skops()
    try:
        found = sio.get_untrusted_types(file=path)
    except Exception as exc:
        raise ValueError(
            f"{path} is not a readable skops file ({type(exc).__name__}: {exc})."
        ) from exc
    if trusted is True:
        allowed = list(found)
    else:
        extra = set() if trusted is None else {str(t) for t in trusted}
        allowed_names = set(__getattr__("TRUSTED_TYPES")) | extra
        refused = [t for t in found if t not in allowed_names]
        if refused:
            raise TypeError(
                f"{path} holds types that are not trusted: {refused}. sksegcal trusts "
                "its own calibrators (sksegcal.persistence.TRUSTED_TYPES) and skops trusts "
                "numpy, scipy and scikit-learn types. If you trust these too, pass "
                f"trusted={refused!r}."
            )
        allowed = list(found)
    try:
        return sio.load(path, trusted=allowed)
    except Exception as exc:
        raise ValueError(
            f"{path} could not be loaded as a skops file ({type(exc).__name__}: {exc})."
        ) from exc
