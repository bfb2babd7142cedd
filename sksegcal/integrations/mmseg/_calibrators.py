"""The calibrator a user names: loaded under the one trust policy, checked against the model.

Used by calibrated inference and by the evaluator metric, which also ask it
which context the calibrator reads (computed per image from ``seg_logits``). A path goes
through :func:`sksegcal.persistence.load` with the caller's ``trusted``: a
skops file loads safely by default, a joblib/pickle file only with
``trusted=True`` (unpickling runs whatever code the file holds). Imports
nothing else of the bridge.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

__all__ = ["calibrator_context", "check_calibrator_classes", "load_calibrator"]


def load_calibrator(calibrator: Any, trusted: bool | Iterable[str] | None = None) -> Any:
    """``calibrator`` itself, or the calibrator saved at that path; it must have predict_proba.

    Parameters
    ----------
    calibrator : estimator, str or path-like
    trusted : None, True or iterable of str
        Passed to :func:`sksegcal.persistence.load` for a path; ignored for an
        estimator.
    """
    if isinstance(calibrator, (str, os.PathLike)):
        from ...persistence import load

        calibrator = load(calibrator, trusted=trusted)
    if not hasattr(calibrator, "predict_proba"):
        raise TypeError(
            f"The calibrator must be a fitted estimator with predict_proba (or the path of "
            "one saved with sksegcal.persistence.save); got "
            f"{type(calibrator).__name__}."
        )
    return calibrator


def check_calibrator_classes(
    calibrator: Any, n_classes: int, path: str = "calibrate_model"
) -> str | None:
    """Refuse a calibrator fitted on another number of classes than the model predicts.

    Returns the context the calibrator reads beside the logits (None, or
    ``"spatial"``: the bridge then computes it per image from ``seg_logits``).
    """
    from ...pixels import _check_context_calibrator

    return _check_context_calibrator(
        calibrator, n_classes, what="The calibrator", where="the model's output", path=path
    )


def calibrator_context(calibrator: Any, where: str) -> str | None:
    """The context ``calibrator`` reads (None for no calibrator); raises where none can be."""
    from ...context import estimator_context

    return estimator_context(calibrator, where=where)
