"""ConformalSetAccumulator: streaming, mergeable tallies of how prediction sets did."""

from __future__ import annotations

import copy
import numbers
import uuid
from collections.abc import Hashable

import numpy as np

from .._safety import check_class_index
from .._validation import check_labels


class ConformalSetAccumulator:
    """Coverage, set sizes and per-image risks of prediction sets, chunk by chunk.

    The sibling of :class:`~sksegcal.metrics.CalibrationAccumulator` for
    sets: feed it (labels, sets) chunks with :meth:`update`, merge
    accumulators filled elsewhere with :meth:`merge`, then read the metrics.
    The pooled tallies have a fixed size (per class: pixels, covered pixels;
    a set-size histogram); per image seen with an ``image_id`` it keeps two
    counts per class (this part grows with the images, not the pixels).

    Parameters
    ----------
    n_classes : int
    ignore_index : int or None, default=255

    Attributes
    ----------
    n_pixels_ : int
        Labelled pixels counted.
    support_ : ndarray of shape (n_classes,)
        Pixels of each true class.
    covered_ : ndarray of shape (n_classes,)
        Of those, how many had their class in their set.
    size_counts_ : ndarray of shape (n_classes + 1,)
        How many pixels had a set of each size (0 .. n_classes).

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import ConformalSetAccumulator
    >>> sets = np.array([[True, False], [True, True], [False, False]])
    >>> acc = ConformalSetAccumulator(2).update(np.array([0, 1, 1]), sets)
    >>> acc.coverage(), acc.mean_set_size()
    (0.6666666666666666, 1.0)
    """

    def __init__(self, n_classes: int, *, ignore_index: int | None = 255) -> None:
        if (
            isinstance(n_classes, bool)
            or not isinstance(n_classes, numbers.Integral)
            or (n_classes < 2)
        ):
            raise ValueError(f"n_classes must be an integer >= 2; got {n_classes!r}.")
        if ignore_index is not None and not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}.")
        self.n_classes = int(n_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.reset()

    def reset(self) -> ConformalSetAccumulator:
        """Clear every tally. Returns self."""
        c = self.n_classes
        self.n_pixels_ = 0
        self.support_ = np.zeros(c)
        self.covered_ = np.zeros(c)
        self.size_counts_ = np.zeros(c + 1)
        self._images: dict[Hashable, np.ndarray] = {}
        # auto ids of (N, C, H, W) chunks must not collide with a merged accumulator's
        self._uid = uuid.uuid4().hex[:12]
        self._n_auto = 0
        return self

    def copy(self) -> ConformalSetAccumulator:
        return copy.deepcopy(self)

    def update(self, y_true, sets, *, image_id=None) -> ConformalSetAccumulator:
        """Add one chunk.

        Parameters
        ----------
        y_true : array-like of shape (n,) or (N, H, W)
        sets : array-like of shape (n, C) or (N, C, H, W), bool
            As :meth:`ConformalPixelSets.predict_set` (``_maps``) returns.
        image_id : hashable or array-like of shape (n,) or (N,), optional
            The image of the chunk, of each pixel, or of each map. (N, C, H, W)
            chunks without ids count each map as an image of its own.

        Returns
        -------
        self
        """
        sets = np.asarray(sets)
        y = np.asarray(y_true)
        keys = inverse = None  # the images of the chunk, and each pixel's index among them
        if sets.ndim == 4:
            n, c, h, w = sets.shape
            if y.shape != (n, h, w):
                raise ValueError(f"y_true must have shape {(n, h, w)}, got {y.shape}.")
            if image_id is None:  # a fresh id per map, unique across accumulators
                keys = [f"{self._uid}:{self._n_auto + i}" for i in range(n)]
                self._n_auto += n
            else:
                keys = np.asarray(image_id).reshape(-1).tolist()
                if len(keys) != n:
                    raise ValueError(f"image_id must hold one id per map ({n}), got {len(keys)}.")
            inverse = np.repeat(np.arange(n), h * w)
            sets = np.moveaxis(sets, 1, -1).reshape(-1, c)
            y = y.reshape(-1)
        if sets.ndim != 2 or sets.shape[1] != self.n_classes:
            raise ValueError(
                f"sets must have shape (n, {self.n_classes}) or (N, "
                f"{self.n_classes}, H, W), got {sets.shape}."
            )
        if sets.dtype != bool:
            raise TypeError(f"sets must be boolean masks, got dtype {sets.dtype}.")
        y = check_labels(y.reshape(-1), self.n_classes, self.ignore_index, where="y_true")
        if y.shape[0] != sets.shape[0]:
            raise ValueError(f"sets has {sets.shape[0]} rows but y_true {y.shape[0]}.")
        if keys is None and image_id is not None:
            if np.ndim(image_id) == 0:
                keys, inverse = [image_id], np.zeros(len(y), dtype=np.int64)
            else:
                ids = np.asarray(image_id).reshape(-1)
                if ids.shape[0] != len(y):
                    raise ValueError(
                        f"image_id has {ids.shape[0]} entries for {len(y)} "
                        "pixels; give one per pixel, or one for the chunk."
                    )
                keys, inverse = np.unique(ids, return_inverse=True)
                keys = keys.tolist()
        keep = np.ones(len(y), bool) if self.ignore_index is None else y != self.ignore_index
        y, sets = y[keep], sets[keep]
        hit = sets[np.arange(len(y)), y]
        c = self.n_classes
        self.n_pixels_ += int(len(y))
        self.support_ += np.bincount(y, minlength=c)
        self.covered_ += np.bincount(y, weights=hit, minlength=c)
        self.size_counts_ += np.bincount(sets.sum(axis=1), minlength=c + 1)
        if keys is not None:
            cell = inverse[keep] * c + y  # (image, class) of each pixel
            m = len(keys) * c
            support = np.bincount(cell, minlength=m).reshape(len(keys), c)
            covered = np.bincount(cell, weights=hit, minlength=m).reshape(len(keys), c)
            for j, key in enumerate(keys):
                tally = np.stack([support[j], covered[j]]).astype(np.float64)
                self._images[key] = self._images[key] + tally if key in self._images else tally
        return self

    def merge(self, other: ConformalSetAccumulator) -> ConformalSetAccumulator:
        """Add the tallies of ``other`` (same ``n_classes`` and ``ignore_index``). Returns self."""
        if not isinstance(other, ConformalSetAccumulator):
            raise TypeError(
                f"Can only merge a ConformalSetAccumulator; got {type(other).__name__}."
            )
        if (other.n_classes, other.ignore_index) != (self.n_classes, self.ignore_index):
            raise ValueError("Cannot merge accumulators with different n_classes or ignore_index.")
        self.n_pixels_ += other.n_pixels_
        self.support_ += other.support_
        self.covered_ += other.covered_
        self.size_counts_ += other.size_counts_
        for key, tally in other._images.items():
            self._images[key] = self._images[key] + tally if key in self._images else tally.copy()
        return self

    # -------------------------------------------------------------- metrics
    def _require(self) -> None:
        if self.n_pixels_ == 0:
            raise ValueError("No labelled pixel was counted; check ignore_index and the labels.")

    def coverage(self) -> float:
        """Fraction of pixels whose true class is in their set (pooled over pixels)."""
        self._require()
        return float(self.covered_.sum() / self.n_pixels_)

    def mean_set_size(self) -> float:
        """Mean number of classes per set."""
        self._require()
        return float(self.size_counts_ @ np.arange(self.n_classes + 1) / self.n_pixels_)

    def empty_fraction(self) -> float:
        """Fraction of pixels with an empty set."""
        self._require()
        return float(self.size_counts_[0] / self.n_pixels_)

    def per_class_coverage(self) -> np.ndarray:
        """Coverage of the pixels of each true class (NaN for a class never present)."""
        self._require()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(
                self.support_ > 0, self.covered_ / np.maximum(self.support_, 1), np.nan
            )

    def per_image_miscoverage(self) -> dict:
        """Each image's fraction of pixels whose true class is not in their set."""
        return {
            k: float(1 - t[1].sum() / t[0].sum())
            for k, t in self._images.items()
            if t[0].sum() > 0
        }

    def per_image_fnr(self, target_class: int) -> dict:
        """Each image's false-negative rate of ``target_class`` (images that contain it)."""
        target_class = check_class_index(target_class, self.n_classes)
        return {
            k: float(1 - t[1, target_class] / t[0, target_class])
            for k, t in self._images.items()
            if t[0, target_class] > 0
        }

    def mean_image_miscoverage(self) -> float:
        """Mean over images of :meth:`per_image_miscoverage` (NaN without image ids)."""
        vals = list(self.per_image_miscoverage().values())
        return float(np.mean(vals)) if vals else float("nan")

    def mean_image_fnr(self, target_class: int) -> float:
        """Mean over the images containing ``target_class`` of its FNR (NaN if none)."""
        vals = list(self.per_image_fnr(target_class).values())
        return float(np.mean(vals)) if vals else float("nan")

    def summary(self, target_class: int | None = None) -> dict[str, float]:
        """Headline numbers as a dict of floats.

        Keys: ``n_pixels``, ``coverage``, ``mean_set_size``, ``empty_fraction``,
        ``min_class_coverage``; with image ids also ``n_images`` and
        ``mean_image_coverage``; with ``target_class`` also ``mean_image_fnr``.
        """
        per_class = self.per_class_coverage()
        out = {
            "n_pixels": float(self.n_pixels_),
            "coverage": self.coverage(),
            "mean_set_size": self.mean_set_size(),
            "empty_fraction": self.empty_fraction(),
            "min_class_coverage": float(np.nanmin(per_class)),
        }
        if self._images:
            out["n_images"] = float(len(self.per_image_miscoverage()))
            out["mean_image_coverage"] = 1.0 - self.mean_image_miscoverage()
        if target_class is not None:
            out["mean_image_fnr"] = self.mean_image_fnr(target_class)
        return out

    def __repr__(self) -> str:
        return f"ConformalSetAccumulator(n_classes={self.n_classes}; n_pixels_={self.n_pixels_})"
