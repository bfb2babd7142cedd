"""Input checks shared by the estimators, the metrics and the pixel helpers.

Every error names what was wrong, where it was found and what to do about it.
"""

from __future__ import annotations

import numbers
import warnings

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
    if n_features is None or n_features == n_classes:
        return
    # a CalibratorSearchCV fitted with context columns whose winner reads none also takes
    # the logit columns alone: its n_classes_ is then the count to compare
    if (
        getattr(calibrator, "n_classes_", None) == n_classes
        and getattr(calibrator, "reads_context", "") is None
    ):
        return
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


# ------------------------------------------------------------------ mistakes caught with a hint
def check_pixel_table(X, *, owner: str) -> None:
    """Refuse maps given where a pixel table is expected, naming the function that converts.

    Calibrators take X of shape (n_pixels, n_classes [+ context]); a stack of
    logit maps (N, C, H, W) or volumes (N, C, D, H, W) would otherwise meet
    scikit-learn's bare "Found array with dim 4".
    """
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) < 3:
        return
    layout = {3: "(C, H, W) or (N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
    raise ValueError(
        f"{owner} takes a pixel table X of shape (n_pixels, n_classes), got an array with dim "
        f"{len(shape)}, of shape {tuple(shape)}, which looks like "
        f"{layout.get(len(shape), 'maps')} logit maps. Turn "
        "maps and labels into a table with X, y, groups = "
        "sksegcal.pixels.flatten_segmentation(logits, labels) and pass groups to fit; for "
        "maps of probabilities use sksegcal.pixels.predict_proba_maps(calibrator, logits)."
    )


def warn_float_labels(y, *, owner: str) -> None:
    """Warn when whole-number labels arrive as floats (read from an image file, say).

    They are used as class indices; the warning says so, because a float array
    is as often a probability map or a regression target given by mistake.
    """
    dtype = getattr(y, "dtype", None)
    if dtype is None or np.dtype(dtype).kind != "f":
        return
    warnings.warn(
        f"{owner}: y holds floats ({np.dtype(dtype)}); they are read as class indices. Pass "
        "integer labels (y.astype(np.int64)) to silence this; y must be class indices in "
        "[0, n_classes), not probabilities or one-hot rows.",
        UserWarning,
        stacklevel=4,
    )


def warn_probabilities_as_logits(
    X: np.ndarray, n_classes: int, input_type: str, *, owner: str
) -> None:
    """Warn when X, declared logits, holds rows on the probability simplex.

    Softmax outputs read as logits give a temperature far below 1 and a worse
    calibration than none; the fix is ``input_type="probabilities"``.
    """
    if input_type != "logits" or X.shape[0] == 0:
        return
    rows = X[: min(X.shape[0], 4096), :n_classes]  # a prefix is evidence enough
    if rows.min() < 0 or rows.max() > 1:
        return
    if not np.allclose(rows.sum(axis=1, dtype=np.float64), 1.0, atol=1e-3):
        return
    warnings.warn(
        f"{owner}: every row of X is non-negative and sums to 1: these look like "
        'probabilities (softmax outputs), not logits. Pass input_type="probabilities" '
        "(or give the network's logits); read as logits they calibrate badly.",
        UserWarning,
        stacklevel=4,
    )


def check_channels_first(logit_shape: tuple, label_shape: tuple, *, where: str) -> None:
    """Refuse channels-last logits (H, W, C) beside (H, W) labels, naming np.moveaxis."""
    if (
        len(logit_shape) == len(label_shape) + 1
        and tuple(logit_shape[:-1]) == tuple(label_shape)
        and tuple(logit_shape[1:]) != tuple(label_shape)
    ):
        raise ValueError(
            f"{where}: logits of shape {tuple(logit_shape)} beside labels of shape "
            f"{tuple(label_shape)} look channels-last (classes on the last axis). sksegcal "
            "takes the class axis first, (N, C, H, W): pass np.moveaxis(logits, -1, 1) for "
            "a stack (np.moveaxis(z, -1, 0) for one image)."
        )


def warn_no_groups(groups, splits_by_image: bool, *, owner: str) -> None:
    """Warn when a fit that holds out whole images was given no image ids.

    Without ``groups`` the hold-out and the guard's folds are made of pixels
    (random rows, row blocks), whose neighbours sit on the other side of the
    split: the held-out scores are optimistic and the choice can change.
    """
    if groups is not None or not splits_by_image:
        return
    warnings.warn(
        f"{owner}.fit got no groups: its hold-out and the guard's folds are made of random "
        "pixels and blocks of rows instead of whole images, so neighbouring pixels sit on "
        "both sides. Pass groups (one image id per pixel: the third output of "
        "sksegcal.pixels.flatten_segmentation) to split by image.",
        UserWarning,
        stacklevel=4,
    )


def check_fitted_before_save(estimator, *, calibrator) -> None:
    """Refuse to save an estimator that was never fitted."""
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    for obj in (estimator, calibrator):
        try:
            check_is_fitted(obj)
        except NotFittedError:
            raise NotFittedError(
                f"This {type(obj).__name__} is not fitted; saving it would write a file that "
                "cannot predict. Call fit(X, y) (or sksegcal.store.fit_store) first, then "
                "save the fitted estimator."
            ) from None


def resolve_save_format(path, format: str | None) -> str:
    """The format to save in: from the suffix when not given, and never against it.

    ``.skops`` means skops and ``.joblib``/``.pkl``/``.pickle`` mean a pickle; a file
    written in one format under the other's name would be refused or misread later.
    """
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    implied = {".skops": "skops", ".joblib": "joblib", ".pkl": "joblib", ".pickle": "joblib"}
    named = implied.get(suffix)
    if format is None:
        return named or "joblib"
    if named is not None and named != format:
        other = ".skops" if format == "skops" else ".joblib"
        raise ValueError(
            f"format={format!r} but the file name {Path(path).name!r} says {named}: name the "
            f"file {Path(path).with_suffix(other).name!r} or pass format={named!r} (or leave "
            "format out: it follows the suffix)."
        )
    return format


def requests_groups(estimator) -> bool:
    """Whether ``fit`` of the estimator, or of an estimator it routes to, requests ``groups``.

    scikit-learn's metadata routing is how an estimator says it takes image ids, wrapped
    (Pipeline, searches) or not; an object outside that routing requests none.
    """
    from sklearn.utils.metadata_routing import get_routing_for_object

    try:
        return bool(get_routing_for_object(estimator).consumes("fit", ["groups"]))
    except Exception:  # noqa: BLE001 - an object outside scikit-learn's routing
        return False
