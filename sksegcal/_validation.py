"""Input checks shared by the estimators, the metrics and the pixel helpers.

Every error names what was wrong, where it was found and what to do about it.
"""

from __future__ import annotations

import numbers

import numpy as np


def check_labels(
    y: np.ndarray,
    n_classes: int,
    ignore_index: int | None,
    *,
    where: str = "y",
) -> np.ndarray:
    """Return ``y`` as an integer array after checking its values.

    Labels must be integers in ``[0, n_classes)`` or equal to ``ignore_index``.
    """
    y = np.asarray(y)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise ValueError(f"{where} contains NaN or infinity; labels must be integers.")
        if np.any(y != np.round(y)):
            raise ValueError(
                f"Unknown label type: continuous. {where} contains non-integer values; "
                "labels must be class indices."
            )
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iub":
        raise ValueError(
            f"Unknown label type: {where} must hold integer class indices in "
            f"[0, {n_classes}), got dtype "
            f"{y.dtype}. Encode string labels as indices of the logit columns first."
        )
    bad = (y < 0) | (y >= n_classes)
    if ignore_index is not None:
        bad &= y != ignore_index
    if np.any(bad):
        values = np.unique(y[bad])[:5]
        raise ValueError(
            f"{where} has labels outside [0, {n_classes}) that are not the ignore index "
            f"({ignore_index}): {values.tolist()}. The model has {n_classes} classes (columns); "
            "set ignore_index to the label your dataset uses for unlabelled pixels."
        )
    return y


def check_calibrator_classes(calibrator, n_classes: int, *, what: str, where: str) -> None:
    """Refuse a calibrator fitted on another number of classes than the logits it is given.

    The one class-count check of the store engine, the CLI and the mmseg bridge;
    calibrators without ``n_features_in_`` (foreign estimators) pass.
    """
    n_features = getattr(calibrator, "n_features_in_", None)
    if n_features is not None and n_features != n_classes:
        raise ValueError(
            f"{what} was fitted on {n_features} classes but {where} has {n_classes}; fit it "
            "on logits of the same model."
        )


def check_ignore_index(ignore_index) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer or None, got {ignore_index!r}.")
    return int(ignore_index)


def check_finite(a: np.ndarray, *, where: str) -> None:
    # the sum is a cheap first test; only on failure do we pay for the mask
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(a, dtype=np.float64)
    if not np.isfinite(total) and not np.all(np.isfinite(a)):
        raise ValueError(
            f"{where} contains NaN or infinity. Check the model's output (a diverged "
            "network or a float16 overflow) before calibrating."
        )


def check_random_state_int(random_state) -> np.random.Generator:
    """A numpy Generator from an int, None, a Generator or a RandomState."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(np.iinfo(np.int32).max))
    return np.random.default_rng(random_state)
