"""Between segmentation maps and pixel tables.

Models produce logits of shape (N, C, H, W) and labels (N, H, W); the
estimators of this package work on a pixel table ``X`` (n_pixels, C) with
labels ``y`` (n_pixels,) and the image each pixel came from, ``groups``.
Everything that must respect images (splits, sampling caps) lives here.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ._validation import (
    check_calibrator_classes,
    check_channels_first,
    check_finite,
    check_ignore_index,
    check_labels,
    check_random_state_int,
)

__all__ = [
    "ImageSplit",
    "flatten_segmentation",
    "predict_proba_maps",
    "sample_pixels",
    "split_images",
    "unflatten_segmentation",
]


def _split_images(maps, ndims: tuple[int, ...], what: str, shape: str) -> list[np.ndarray]:
    """One array per image, from a stacked array or a sequence of arrays."""
    if isinstance(maps, Sequence):
        return [np.asarray(a) for a in maps]
    maps = np.asarray(maps)
    if maps.ndim not in ndims:
        raise ValueError(
            f"{what} must have shape {shape}, got an array of shape {maps.shape}. "
            "For a single image add a leading axis: [None]."
        )
    return list(maps)


def _as_image_list(logits, labels):
    """Normalise array or list input into lists of (C,H,W) and (H,W) arrays (or volumes)."""
    logit_list = _split_images(logits, (4, 5), "logits", "(N, C, H, W) or (N, C, D, H, W)")
    label_list = _split_images(labels, (3, 4), "labels", "(N, H, W) or (N, D, H, W)")
    if len(logit_list) != len(label_list):
        raise ValueError(
            f"logits hold {len(logit_list)} images but labels hold {len(label_list)}."
        )
    if not logit_list:
        raise ValueError("No images were given.")
    n_classes = logit_list[0].shape[0] if logit_list[0].ndim in (3, 4) else None
    ndim = logit_list[0].ndim
    for i, (z, t) in enumerate(zip(logit_list, label_list)):
        if z.ndim != ndim or ndim not in (3, 4):
            raise ValueError(
                f"logits of image {i} must have shape (C, H, W), or (C, D, H, W) for volumes, "
                f"like image 0; got {z.shape}."
            )
        if z.shape[0] != n_classes:
            raise ValueError(f"image {i} has {z.shape[0]} classes but image 0 has {n_classes}.")
        check_channels_first(z.shape, t.shape, where=f"image {i}")
        if t.shape != z.shape[1:]:
            raise ValueError(
                f"labels of image {i} have shape {t.shape} but its logits are "
                f"{z.shape[1:]} (H, W); resize the labels (nearest) or the logits first."
            )
    return logit_list, label_list, n_classes


def flatten_segmentation(
    logits: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[np.ndarray],
    *,
    ignore_index: int | None = 255,
    context: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn segmentation maps into a pixel table, dropping ignored pixels.

    Parameters
    ----------
    logits : ndarray of shape (N, C, H, W) or list of (C, H_i, W_i) arrays
        Per-pixel logits (or probabilities) of N images; for volumes
        (N, C, D, H, W) or a list of (C, D_i, H_i, W_i) arrays.
    labels : ndarray of shape (N, H, W) or list of (H_i, W_i) arrays
        Ground-truth class indices (for volumes (N, D, H, W)); ``ignore_index``
        marks unlabelled pixels.
    ignore_index : int or None, default=255
        Label of pixels to drop. None keeps every pixel.
    context : {None, "spatial"}, default=None
        None: ``X`` holds the C logit columns. ``"spatial"``: the C logit
        columns followed by the K = ``sksegcal.context.n_context_features()``
        spatial context columns of :func:`sksegcal.context.spatial_context`
        (computed on the whole image, ignored pixels included, before they
        are dropped), all float32; the rows are the same pixels either way.

    Returns
    -------
    X : ndarray of shape (n_pixels, C) or (n_pixels, C + K)
        One row per kept pixel, in image then row-major pixel order, with the
        dtype of ``logits`` (float32 with ``context="spatial"``).
    y : ndarray of shape (n_pixels,)
        The pixels' labels (int64).
    groups : ndarray of shape (n_pixels,)
        The index of the image each pixel came from (int64); pass it as
        ``groups`` to image-level splitters such as ``GroupShuffleSplit``.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.pixels import flatten_segmentation
    >>> logits = np.zeros((2, 3, 4, 4), dtype=np.float32)
    >>> labels = np.ones((2, 4, 4), dtype=np.uint8)
    >>> labels[0, 0, 0] = 255
    >>> X, y, groups = flatten_segmentation(logits, labels)
    >>> X.shape, y.shape, np.bincount(groups).tolist()
    ((31, 3), (31,), [15, 16])
    >>> flatten_segmentation(logits, labels, context="spatial")[0].shape
    (31, 9)
    """
    from .context import iter_image_rows

    ignore_index = check_ignore_index(ignore_index)
    if context is not None:
        from .context import context_width

        context_width(context)  # raises for a context no path computes
    logit_list, label_list, n_classes = _as_image_list(logits, labels)
    xs, ys, gs = [], [], []
    for i, (z, t) in enumerate(zip(logit_list, label_list)):
        t = check_labels(t, n_classes, ignore_index, where=f"labels of image {i}")
        keep = None if ignore_index is None else t != ignore_index
        ((_, x),) = iter_image_rows(z, context, keep=keep)
        check_finite(x[:, :n_classes], where=f"logits of image {i}")
        xs.append(x)
        ys.append((t if keep is None else t[keep]).reshape(-1).astype(np.int64, copy=False))
        gs.append(np.full(x.shape[0], i, dtype=np.int64))
    X = np.concatenate(xs)
    if X.shape[0] == 0:
        raise ValueError(
            f"Every pixel has the ignore index {ignore_index}; there is nothing to calibrate."
        )
    return X, np.concatenate(ys), np.concatenate(gs)


def _check_context_calibrator(calibrator, n_classes: int, *, what: str, where: str, path: str):
    """The context ``calibrator`` reads, after checking its width against ``n_classes``.

    Without context the check is :func:`~sksegcal._validation.check_calibrator_classes`;
    with it the calibrator must have been fitted on C + K columns. ``what`` names
    the calibrator, ``where`` the logits, ``path`` the function or command.
    """
    from .context import context_width, estimator_context

    context = estimator_context(calibrator, where=path)
    k = context_width(context)
    if not k:
        check_calibrator_classes(calibrator, n_classes, what=what, where=where)
        return context
    n_features = getattr(calibrator, "n_features_in_", None)
    if n_features is not None and n_features != n_classes + k:
        raise ValueError(
            f"{what} reads the {context} context: the {n_classes} class columns of {where} "
            f"followed by {k} context columns, {n_classes + k} in all, but it was fitted on "
            f"{n_features} columns; fit it on logits of the same model (fit_store, or "
            f"flatten_segmentation(..., context={context!r}))."
        )
    return context


def unflatten_segmentation(
    values: np.ndarray,
    labels: np.ndarray,
    *,
    ignore_index: int | None = 255,
    fill_value: float = np.nan,
) -> np.ndarray:
    """Put pixel-table rows back into maps; the inverse of :func:`flatten_segmentation`.

    Parameters
    ----------
    values : ndarray of shape (n_pixels, K) or (n_pixels,)
        Rows in the order :func:`flatten_segmentation` produced them, e.g.
        calibrated probabilities.
    labels : ndarray of shape (N, H, W) or (N, D, H, W)
        The labels given to :func:`flatten_segmentation`; they tell which pixels
        were kept.
    ignore_index : int or None, default=255
        Must be the value used when flattening.
    fill_value : float, default=nan
        Value written at ignored pixels.

    Returns
    -------
    maps : ndarray of shape (N, K, H, W) or (N, H, W); (N, K, D, H, W) or (N, D, H, W) for volumes

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.pixels import flatten_segmentation, unflatten_segmentation
    >>> logits = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    >>> labels = np.zeros((2, 4, 4), dtype=int)
    >>> X, y, groups = flatten_segmentation(logits, labels)
    >>> np.array_equal(unflatten_segmentation(X, labels), logits)
    True
    """
    ignore_index = check_ignore_index(ignore_index)
    labels = np.asarray(labels)
    if labels.ndim not in (3, 4):
        raise ValueError(f"labels must have shape (N, H, W) or (N, D, H, W), got {labels.shape}.")
    keep = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    values = np.asarray(values)
    if values.shape[0] != keep.sum():
        raise ValueError(
            f"values has {values.shape[0]} rows but the labels keep {int(keep.sum())} pixels; "
            "pass the same labels and ignore_index used by flatten_segmentation."
        )
    dtype = np.result_type(values.dtype, np.float32) if np.isnan(fill_value) else values.dtype
    if values.ndim == 1:
        out = np.full(labels.shape, fill_value, dtype=dtype)
        out[keep] = values
        return out
    out = np.full(labels.shape + values.shape[1:], fill_value, dtype=dtype)
    out[keep] = values
    return np.moveaxis(out, -1, 1)


def predict_proba_maps(estimator, logits: np.ndarray) -> np.ndarray:
    """Calibrated probability maps (N, C, H, W) from logit maps (N, C, H, W).

    Volumes (N, C, D, H, W) give (N, C, D, H, W). Works image by image so
    that memory stays at one image's worth. An
    estimator that reads the spatial context (``SelectiveScalingCalibrator(
    context="spatial")``, ``LocalTemperatureScaling()``, or a pipeline or
    search ending in one) gets each image's context columns appended, as
    ``flatten_segmentation(..., context="spatial")`` appends them.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal import TemperatureScaling
    >>> from sksegcal.pixels import flatten_segmentation, predict_proba_maps
    >>> rng = np.random.default_rng(0)
    >>> logits = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    >>> labels = rng.integers(0, 3, size=(2, 8, 8))
    >>> ts = TemperatureScaling().fit(*flatten_segmentation(logits, labels)[:2])
    >>> predict_proba_maps(ts, logits).shape
    (2, 3, 8, 8)
    """
    logits = np.asarray(logits)
    if logits.ndim not in (4, 5):
        raise ValueError(
            f"logits must have shape (N, C, H, W) or (N, C, D, H, W), got {logits.shape}."
        )
    from .context import estimator_context, image_rows

    context = estimator_context(estimator, where="predict_proba_maps")
    n, c, spatial = logits.shape[0], logits.shape[1], logits.shape[2:]
    out = np.empty(logits.shape, dtype=np.float32)
    for i in range(n):
        table = image_rows(logits[i], context)
        out[i] = np.moveaxis(estimator.predict_proba(table).reshape(*spatial, c), -1, 0)
    return out


class ImageSplit(NamedTuple):
    """Image ids of the calibrator-train, calibrator-validation and test sets."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def masks(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boolean pixel masks (train, validation, test) for a ``groups`` array."""
        groups = np.asarray(groups)
        return (
            np.isin(groups, self.train),
            np.isin(groups, self.validation),
            np.isin(groups, self.test),
        )

    def test_fold(self, groups: np.ndarray) -> np.ndarray:
        """The ``test_fold`` of a :class:`~sklearn.model_selection.PredefinedSplit`.

        Train pixels get -1 (always in training), validation pixels 0 (the one
        validation fold) and test pixels -2; select the train+validation rows
        with ``test_fold > -2`` before passing it on.
        """
        train, validation, test = self.masks(groups)
        fold = np.full(len(groups), -2, dtype=np.int64)
        fold[train] = -1
        fold[validation] = 0
        return fold


def split_images(
    images: int | np.ndarray,
    *,
    validation_size: float = 0.25,
    test_size: float = 0.25,
    random_state=None,
    groups=None,
) -> ImageSplit:
    """Split images (never pixels) into calibrator-train, validation and test sets.

    Neighbouring pixels are strongly correlated, so a split by pixel would
    leak; the paper and this package split by image.

    Parameters
    ----------
    images : int or array-like
        The number of images (ids ``0..n-1``) or the image ids, e.g. the
        ``groups`` array of :func:`flatten_segmentation` (duplicates allowed).
    validation_size, test_size : float
        Fractions of the images; the rest is the calibrator-train set. Each
        non-empty fraction gets at least one image.
    random_state : int, Generator or None
        Seed of the shuffle.
    groups : array-like, optional
        A group label per entry of ``images`` (per image id ``0..n-1`` when
        ``images`` is a count): the acquisitions of one slice, the slices of one
        patient, the frames of one video. Whole groups are then split, the
        fractions counting groups, and no group has images in two parts.

    Returns
    -------
    ImageSplit
        Sorted image ids of each set.

    Examples
    --------
    >>> from sksegcal.pixels import split_images
    >>> split = split_images(8, validation_size=0.25, test_size=0.25, random_state=0)
    >>> [len(part) for part in split]
    [4, 2, 2]
    """
    if groups is not None:
        return _split_groups(images, groups, validation_size, test_size, random_state)
    if np.isscalar(images):
        if isinstance(images, (bool, np.bool_)) or not isinstance(images, numbers.Integral):
            raise TypeError(
                f"images must be an integer number of images or an array of image ids, got "
                f"{images!r}; a count must be a whole number (e.g. int(n))."
            )
        ids = np.arange(int(images))
    else:
        ids = np.unique(np.asarray(images))
    for name, size in (("validation_size", validation_size), ("test_size", test_size)):
        if not 0 <= size < 1:
            raise ValueError(f"{name} must be in [0, 1), got {size}.")
    if validation_size + test_size >= 1:
        raise ValueError("validation_size + test_size must leave images for training (< 1).")
    n = len(ids)
    n_val = max(int(round(validation_size * n)), 1 if validation_size > 0 else 0)
    n_test = max(int(round(test_size * n)), 1 if test_size > 0 else 0)
    if n - n_val - n_test < 1:
        raise ValueError(
            f"{n} images cannot be split into train/validation/test with sizes "
            f"{validation_size}/{test_size}; give more images or smaller fractions."
        )
    perm = check_random_state_int(random_state).permutation(ids)
    return ImageSplit(
        train=np.sort(perm[n_val + n_test :]),
        validation=np.sort(perm[:n_val]),
        test=np.sort(perm[n_val : n_val + n_test]),
    )


def _largest_remainder(weights, total: int, minimum=0) -> np.ndarray:
    """Integers proportional to ``weights`` that sum to ``total`` (largest remainder rounding).

    Each share is floored and raised to ``minimum`` (a scalar or one per weight);
    what flooring left is handed out to the largest remainders first, and what the
    minimum overspent is taken back from the largest shares. ``weights`` must have
    a positive sum. Shared by :func:`sample_pixels` and the LogitStore's sampler.
    """
    exact = np.asarray(weights) * (total / np.sum(weights))
    take = np.maximum(np.floor(exact).astype(np.int64), minimum)
    short = total - int(take.sum())
    if short > 0:
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        take[order[:short]] += 1
    while short < 0:
        take[int(np.argmax(take))] -= 1
        short += 1
    return take


def sample_pixels(
    n_pixels: int,
    max_samples: int,
    *,
    strata: np.ndarray | None = None,
    random_state=None,
) -> np.ndarray:
    """Indices of a seeded random subset of at most ``max_samples`` pixels.

    Parameters
    ----------
    n_pixels : int
        Number of pixels to choose from.
    max_samples : int
        Size of the subset; all pixels are returned when there are fewer.
    strata : array-like of shape (n_pixels,), optional
        Labels of strata, e.g. the correctness of each pixel. Each stratum
        keeps its share of the subset (largest remainder rounding, at least one
        pixel per non-empty stratum), so rare mispredictions are not lost to
        chance.
    random_state : int, Generator or None

    Returns
    -------
    indices : ndarray of int64, sorted

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.pixels import sample_pixels
    >>> correct = np.r_[np.ones(90, bool), np.zeros(10, bool)]
    >>> idx = sample_pixels(100, 20, strata=correct, random_state=0)
    >>> int((~correct[idx]).sum())
    2
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}.")
    if n_pixels <= max_samples:
        return np.arange(n_pixels, dtype=np.int64)
    rng = check_random_state_int(random_state)
    if strata is None:
        return np.sort(rng.choice(n_pixels, size=max_samples, replace=False)).astype(np.int64)
    strata = np.asarray(strata)
    if strata.shape != (n_pixels,):
        raise ValueError(f"strata must have shape ({n_pixels},), got {strata.shape}.")
    values, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    # every stratum keeps a pixel when the budget allows
    take = _largest_remainder(counts, max_samples, int(len(counts) <= max_samples))
    take = np.minimum(take, counts)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    chosen = [
        order[start + rng.choice(count, size=k, replace=False)]
        for start, count, k in zip(starts, counts, take)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _split_groups(images, groups, validation_size, test_size, random_state) -> ImageSplit:
    """:func:`split_images` of whole groups: split the group labels, then map them to images."""
    ids = np.arange(int(images)) if np.isscalar(images) else np.asarray(images).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    if groups.shape != ids.shape:
        raise ValueError(
            f"groups has {groups.shape[0]} entries but images has {ids.shape[0]}; give one "
            "group label per image (per entry of images)."
        )
    image_ids, first = np.unique(ids, return_index=True)
    owner = groups[first]
    # an image listed twice (a pixel-level ids array) must name one group
    mismatch = groups != owner[np.searchsorted(image_ids, ids)]
    if mismatch.any():
        bad = ids[mismatch][0]
        raise ValueError(f"image {bad!r} is given two groups; each image belongs to one group.")
    parts = split_images(
        np.unique(owner),
        validation_size=validation_size,
        test_size=test_size,
        random_state=random_state,
    )
    return ImageSplit(*(np.sort(image_ids[np.isin(owner, part)]) for part in parts))
