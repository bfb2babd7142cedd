"""ConformalMargins: inner and outer masks around a predicted mask, valid over images.

For one class (a lesion, a tumour, a road) the predicted mask is where the
model's most probable class is that class. Its *outer* mask is the predicted
mask dilated ``k_out`` times, its *inner* mask the predicted mask eroded
``k_in`` times, by the structuring element of ``connectivity``. Each
calibration image gives two integer scores (the morphological scores of
the ConSeMa research code):

- ``outer``: the fewest dilations after which the dilated mask holds every
  labelled pixel of the class (infinite when the class is present and the
  predicted mask is empty);
- ``inner``: the fewest erosions after which the eroded mask holds no
  labelled pixel of another class.

Both are read from one distance transform per image (``scipy.ndimage``,
N-D): a pixel is in the ``k``-th dilation iff its distance to the mask is at
most ``k``, and survives ``k`` erosions iff its distance to the outside
(beyond the image border too) exceeds ``k``, in the metric whose unit ball is
the structuring element. The margin is the split-conformal quantile of the
scores over images, so the promise is over images: for a new image
exchangeable with the calibration images, ``P(truth within the outer mask)
>= 1 - alpha``, and likewise for the inner mask; with ``margin="both"``,
each side at ``alpha / 2``, so that ``P(inner within truth within outer) >=
1 - alpha``.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
from scipy import ndimage
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._validation import check_labels
from ._base import images_needed
from ._histogram import conformal_rank


def _metric(ndim: int, connectivity: int):
    """The distance whose unit ball is ``generate_binary_structure(ndim, connectivity)``."""
    if connectivity == 1:
        return "taxicab"
    if connectivity >= ndim:
        return "chessboard"
    return ndimage.generate_binary_structure(ndim, connectivity)


def dilation_distance(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """How many dilations of ``mask`` reach each pixel (0 inside; -1 everywhere if empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, -1, dtype=np.int64)
    return ndimage.distance_transform_cdt(~mask, metric=_metric(mask.ndim, connectivity)).astype(
        np.int64
    )


def erosion_depth(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """How many erosions each pixel of ``mask`` survives, plus one (0 outside the mask).

    Outside the image counts as background (``binary_erosion``'s default
    ``border_value=0``): the mask is padded by one pixel of background.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    if padded.all():  # pragma: no cover - the padding is background
        raise AssertionError
    depth = ndimage.distance_transform_cdt(padded, metric=_metric(mask.ndim, connectivity))
    return depth[(slice(1, -1),) * mask.ndim].astype(np.int64)


def margin_scores(
    pred: np.ndarray, truth: np.ndarray, labelled: np.ndarray, connectivity: int = 1
) -> tuple[float, float]:
    """(outer, inner) morphological scores of one image.

    ``pred``: the predicted mask; ``truth``: the class's pixels; ``labelled``:
    the pixels whose label counts (not ignored). Outer: the fewest dilations
    of ``pred`` holding every labelled truth pixel (inf if ``pred`` is empty
    and some is missed). Inner: the fewest erosions of ``pred`` holding no
    labelled pixel outside the truth.
    """
    missed = truth & labelled & ~pred
    if not missed.any():
        outer = 0.0
    elif not pred.any():
        outer = math.inf
    else:
        outer = float(dilation_distance(pred, connectivity)[missed].max())
    wrong = pred & labelled & ~truth
    inner = float(erosion_depth(pred, connectivity)[wrong].max()) if wrong.any() else 0.0
    return outer, inner


def _quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest score, or inf."""
    n = len(scores)
    k = conformal_rank(n, alpha)
    if n == 0 or k > n:
        return math.inf
    return float(np.sort(scores)[k - 1])


class ConformalMargins(BaseEstimator):
    """Inner and outer masks around one class's predicted mask, valid over new images.

    The predicted mask of ``target_class`` is where it is the most probable
    class (with one channel, where its sigmoid exceeds 1/2). The outer mask
    is that mask dilated ``outer_margin_`` times, the inner mask that mask
    eroded ``inner_margin_`` times, by the structuring element of
    ``connectivity`` (``scipy.ndimage.generate_binary_structure``), in 2-D or
    N-D. Each calibration image gives the fewest dilations that cover its
    labelled pixels of the class and the fewest erosions that leave no
    labelled pixel of another class (ConSeMa's morphological scores); the
    margins are the split-conformal quantiles of those scores over images.

    **What is guaranteed, over what.** If the calibration images and a new
    image are exchangeable, with ``margin="outer"``: ``P(every labelled pixel
    of the class lies in the outer mask) >= 1 - alpha``; ``"inner"``: ``P(no
    labelled pixel of another class lies in the inner mask) >= 1 - alpha``;
    ``"both"`` (default): each side at ``alpha / 2``, so both hold together
    with probability at least ``1 - alpha`` (Bonferroni). The probability is
    over the calibration images and the new image; the unit is the image,
    however correlated its pixels. It needs ``n >= 1/alpha - 1`` images
    (``2/alpha - 1`` for ``"both"``); with fewer, a warning says how many and
    the margins are infinite (the outer mask is the whole image, the inner
    mask empty). For a bound on the *fraction* of the class missed, see
    ``ConformalRiskControl(loss="fnr")``.

    Parameters
    ----------
    alpha : float, default=0.1
        The probability that the promise fails on a new image, in (0, 1).
    target_class : int, default=1
        The class of the mask (the foreground of a binary model).
    margin : {"both", "outer", "inner"}, default="both"
    connectivity : int, default=1
        Of the structuring element: 1 (a cross: 4 neighbours in 2-D, 6 in
        3-D) up to the number of spatial dimensions (a full square or cube).
    calibrator : estimator or None, default=None
        A *fitted* calibrator whose ``predict_proba`` gives the probabilities
        the predicted mask is the argmax of (used as it is, never refitted).
    input_type : {"logits", "probabilities"}, default="logits"
    ignore_index : int or None, default=255
        Pixels with this label count neither as the class nor as another.

    Attributes
    ----------
    outer_margin_, inner_margin_ : float
        Dilations and erosions (integers; inf when too few images; NaN for
        the side that ``margin`` leaves out).
    outer_scores_, inner_scores_ : ndarray of shape (n_calibration_,)
        Each calibration image's scores (memory grows with images, not pixels).
    n_calibration_ : int
    n_required_ : int
        The fewest calibration images that support ``alpha``.
    n_features_in_ : int
        Channels of the maps.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import ConformalMargins
    >>> rng = np.random.default_rng(0)
    >>> truth = np.zeros((30, 16, 16), int)
    >>> for i in range(30):
    ...     r, c = rng.integers(4, 12, size=2)
    ...     truth[i, r - 3 : r + 3, c - 3 : c + 3] = 1
    >>> logits = np.stack([-truth, truth], 1) * 4.0 + rng.normal(size=(30, 2, 16, 16)) * 3
    >>> m = ConformalMargins(alpha=0.2).fit(logits[:20], truth[:20])
    >>> inner, outer = m.predict_masks(logits[20:])
    >>> inner.shape, outer.shape, bool((inner <= outer).all())
    ((10, 16, 16), (10, 16, 16), True)
    """

    _parameter_constraints: dict = {
        "alpha": [Interval(numbers.Real, 0, 1, closed="neither")],
        "target_class": [Interval(numbers.Integral, 0, None, closed="left")],
        "margin": [StrOptions({"both", "outer", "inner"})],
        "connectivity": [Interval(numbers.Integral, 1, None, closed="left")],
        "calibrator": [HasMethods(["predict_proba"]), None],
        "input_type": [StrOptions({"logits", "probabilities"})],
        "ignore_index": [numbers.Integral, None],
    }

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        target_class: int = 1,
        margin: str = "both",
        connectivity: int = 1,
        calibrator=None,
        input_type: str = "logits",
        ignore_index: int | None = 255,
    ) -> None:
        self.alpha = alpha
        self.target_class = target_class
        self.margin = margin
        self.connectivity = connectivity
        self.calibrator = calibrator
        self.input_type = input_type
        self.ignore_index = ignore_index

    # ------------------------------------------------------------- checks
    def _side_alpha(self) -> float:
        return self.alpha / 2 if self.margin == "both" else self.alpha

    def _check_maps(self, maps, *, reset: bool) -> np.ndarray:
        maps = np.asarray(maps)
        if maps.ndim < 3 or not np.issubdtype(maps.dtype, np.number):
            raise ValueError(
                f"maps must be numeric (N, C, H, W) or (N, C, D, H, W) arrays, got {maps.shape}."
            )
        if reset:
            self._validate_params()
            c = maps.shape[1]
            if self.calibrator is not None:
                try:
                    check_is_fitted(self.calibrator)
                except NotFittedError:
                    raise NotFittedError(
                        f"calibrator {type(self.calibrator).__name__} is not fitted: fit it on "
                        "other images first (it is used as it is, never refitted)."
                    ) from None
                except TypeError:
                    pass
            n_classes = 2 if c == 1 else c
            if self.target_class >= n_classes or (c == 1 and self.target_class != 1):
                raise ValueError(
                    f"target_class={self.target_class} is not a class of {c}-channel maps"
                    + (" (one channel: the foreground, target_class=1)." if c == 1 else ".")
                )
            if c == 1 and self.calibrator is not None:
                raise ValueError("one-channel maps take no calibrator; give two-channel logits.")
            if self.connectivity > maps.ndim - 2:
                raise ValueError(
                    f"connectivity={self.connectivity} exceeds the {maps.ndim - 2} spatial "
                    "dimensions of the maps."
                )
            self.n_features_in_ = c
        else:
            check_is_fitted(self)
            if maps.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"maps have {maps.shape[1]} channels; the estimator was fitted on "
                    f"{self.n_features_in_}."
                )
        return maps

    # ------------------------------------------------------------ the mask
    def _predicted(self, z: np.ndarray) -> np.ndarray:
        """The predicted mask of one ``(C, *spatial)`` map."""
        c = z.shape[0]
        if c == 1:
            cut = 0.0 if self.input_type == "logits" else 0.5
            return z[0] > cut
        if self.calibrator is not None:
            X = self._rows(z)
            p = np.asarray(self.calibrator.predict_proba(X))
            return (np.argmax(p, axis=1) == self.target_class).reshape(z.shape[1:])
        # the softmax keeps the argmax: no probabilities needed
        return np.argmax(z, axis=0) == self.target_class

    def _rows(self, z: np.ndarray) -> np.ndarray:
        """The calibrator's rows for every pixel of one map (with its context if it reads one)."""
        from ..context import estimator_context, image_rows

        context = estimator_context(self.calibrator, where="ConformalMargins")
        return image_rows(np.asarray(z, dtype=np.float32), context)

    def predict_mask(self, maps) -> np.ndarray:
        """The predicted masks of ``target_class``, shape ``(N, *spatial)``, bool."""
        maps = self._check_maps(maps, reset=False)
        return (
            np.stack([self._predicted(z) for z in maps])
            if len(maps)
            else np.zeros((0, *maps.shape[2:]), bool)
        )

    # ----------------------------------------------------------- fitting
    def _image_scores(self, z, t) -> tuple[float, float]:
        t = np.asarray(t)
        labelled = np.ones(t.shape, bool) if self.ignore_index is None else t != self.ignore_index
        return margin_scores(
            self._predicted(z), t == self.target_class, labelled, self.connectivity
        )

    def fit(self, maps, labels, groups=None):
        """Calibrate the margins on calibration images.

        Parameters
        ----------
        maps : array-like of shape ``(N, C, *spatial)``
            Logits (or probabilities) of N whole images, 2-D or N-D; C = 1
            for a one-channel (sigmoid) binary model.
        labels : array-like of shape ``(N, *spatial)``
            Class indices (0/1 for a binary model); ``ignore_index`` pixels
            count neither way.
        groups : array-like of shape (N,), optional
            The exchangeable unit of each map (e.g. a patient or a scene with
            several acquisitions): a unit's scores are the largest of its
            maps', so the promise covers all of a new unit's maps at once.
            None: each map is its own unit. A unit must come whole in one call.

        Returns
        -------
        self
        """
        for attr in ("outer_scores_", "n_features_in_"):
            self.__dict__.pop(attr, None)
        return self.partial_fit(maps, labels, groups)

    fit_maps = fit

    def partial_fit(self, maps, labels, groups=None):
        """Add whole calibration images (units) and read the margins again. Returns self."""
        first = not hasattr(self, "outer_scores_")
        maps = self._check_maps(maps, reset=first)
        labels = np.asarray(labels)
        if labels.shape != (maps.shape[0], *maps.shape[2:]):
            raise ValueError(
                f"labels must have shape {(maps.shape[0], *maps.shape[2:])}, got {labels.shape}."
            )
        n_classes = max(2, maps.shape[1])
        scores = np.array(
            [
                self._image_scores(z, check_labels(t, n_classes, self.ignore_index))
                for z, t in zip(maps, labels)
            ],
            dtype=np.float64,
        ).reshape(-1, 2)
        if groups is not None:
            groups = np.asarray(groups).reshape(-1)
            if groups.shape[0] != len(scores):
                raise ValueError(f"groups must hold one unit per map ({len(scores)}).")
            _, inverse = np.unique(groups, return_inverse=True)
            unit = np.full((inverse.max() + 1, 2), -np.inf)
            np.maximum.at(unit, inverse, scores)  # a unit is covered when all its maps are
            scores = unit
        self._add_scores(scores, first)
        return self._finish()

    def _add_scores(self, scores, first: bool) -> None:
        new = np.asarray(scores, dtype=np.float64).reshape(-1, 2)
        if first:
            self.outer_scores_, self.inner_scores_ = new[:, 0].copy(), new[:, 1].copy()
        else:
            self.outer_scores_ = np.concatenate([self.outer_scores_, new[:, 0]])
            self.inner_scores_ = np.concatenate([self.inner_scores_, new[:, 1]])

    def _finish(self):
        n = len(self.outer_scores_)
        a = self._side_alpha()
        self.n_calibration_ = n
        self.n_required_ = images_needed(a)
        self.outer_margin_ = (
            _quantile(self.outer_scores_, a) if self.margin != "inner" else math.nan
        )
        self.inner_margin_ = (
            _quantile(self.inner_scores_, a) if self.margin != "outer" else math.nan
        )
        if n < self.n_required_:
            side = " (alpha/2 on each side, margin='both')" if self.margin == "both" else ""
            warnings.warn(
                f"ConformalMargins: {n} calibration image{'s' if n != 1 else ''} cannot "
                f"support alpha={self.alpha}{side}: at least {self.n_required_} images are "
                "needed. The margins are infinite: the outer mask is the whole image and the "
                "inner mask is empty. Add calibration images or raise alpha.",
                UserWarning,
                stacklevel=3,
            )
        return self

    def merge(self, other):
        """Add the calibration images of ``other`` (same settings), in place. Returns self."""
        check_is_fitted(self)
        check_is_fitted(other)
        if not isinstance(other, ConformalMargins):
            raise TypeError(f"Can only merge a ConformalMargins; got {type(other).__name__}.")
        keys = ("target_class", "connectivity", "input_type", "ignore_index")
        diff = [k for k in keys if getattr(self, k) != getattr(other, k)]
        if diff or other.n_features_in_ != self.n_features_in_:
            raise ValueError(
                f"Cannot merge margins with different settings ({', '.join(diff) or 'channels'})."
            )
        self._add_scores(np.stack([other.outer_scores_, other.inner_scores_], 1), False)
        return self._finish()

    # --------------------------------------------------------- prediction
    def _masks_of(self, z) -> tuple[np.ndarray, np.ndarray]:
        pred = self._predicted(z)
        if self.margin == "outer" or not math.isfinite(self.inner_margin_):
            inner = np.zeros_like(pred) if self.margin != "outer" else pred.copy()
        else:
            inner = erosion_depth(pred, self.connectivity) > self.inner_margin_
        if self.margin == "inner":
            outer = pred.copy()
        elif not math.isfinite(self.outer_margin_):
            outer = np.ones_like(pred)
        else:
            d = dilation_distance(pred, self.connectivity)
            outer = (d >= 0) & (d <= self.outer_margin_)
        return inner, outer

    def predict_masks(self, maps) -> tuple[np.ndarray, np.ndarray]:
        """(inner, outer) masks of ``(N, C, *spatial)`` maps, each ``(N, *spatial)`` bool.

        The side that ``margin`` leaves out is the predicted mask itself.
        """
        maps = self._check_maps(maps, reset=False)
        pairs = [self._masks_of(z) for z in maps]
        if not pairs:
            empty = np.zeros((0, *maps.shape[2:]), bool)
            return empty, empty.copy()
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags


class MarginAccumulator:
    """Per-image tallies of how inner and outer masks did (streaming, mergeable).

    For each image: whether every labelled pixel of the class lies in the
    outer mask, whether no labelled pixel of another class lies in the inner
    mask, the fraction of the class the outer mask misses (its FNR), and the
    sizes of the predicted, inner and outer masks. Memory grows with images.

    Parameters
    ----------
    target_class : int
    ignore_index : int or None, default=255
    """

    def __init__(self, target_class: int, *, ignore_index: int | None = 255) -> None:
        self.target_class = int(target_class)
        self.ignore_index = ignore_index
        self.rows_: list[tuple] = []

    def update(self, labels, pred, inner, outer) -> MarginAccumulator:
        """Add images: ``(N, *spatial)`` labels and masks. Returns self."""
        labels = np.asarray(labels)
        for t, p, i, o in zip(labels, pred, inner, outer):
            lab = np.ones(t.shape, bool) if self.ignore_index is None else t != self.ignore_index
            truth = (t == self.target_class) & lab
            n_truth = int(truth.sum())
            self.rows_.append(
                (
                    bool(not (truth & ~o).any()),
                    bool(not (i & lab & ~truth).any()),
                    float((truth & ~o).sum() / n_truth) if n_truth else math.nan,
                    int(p.sum()),
                    int(i.sum()),
                    int(o.sum()),
                    n_truth,
                )
            )
        return self

    def merge(self, other: MarginAccumulator) -> MarginAccumulator:
        self.rows_ += other.rows_
        return self

    def summary(self) -> dict[str, float]:
        """``n_images``, ``outer_covers`` (fraction of images whose class is inside the
        outer mask), ``inner_inside`` (inner mask inside the class), ``both``,
        ``mean_outer_fnr`` (over images with the class), mean mask areas."""
        if not self.rows_:
            raise ValueError("No image was added.")
        r = np.array(self.rows_, dtype=np.float64)
        return {
            "n_images": float(len(r)),
            "outer_covers": float(r[:, 0].mean()),
            "inner_inside": float(r[:, 1].mean()),
            "both": float((r[:, 0] * r[:, 1]).mean()),
            "mean_outer_fnr": float(np.nanmean(r[:, 2]))
            if np.isfinite(r[:, 2]).any()
            else math.nan,
            "mean_predicted_area": float(r[:, 3].mean()),
            "mean_inner_area": float(r[:, 4].mean()),
            "mean_outer_area": float(r[:, 5].mean()),
            "mean_true_area": float(r[:, 6].mean()),
        }


def _fit_margins_block(estimator, store, ids):
    scores = []
    for image_id in ids:
        image = store.load_image(int(image_id))
        t = check_labels(np.asarray(image.labels), store.n_classes, estimator.ignore_index)
        scores.append(estimator._image_scores(np.asarray(image.logits, dtype=np.float32), t))
    return scores


def fit_margins_store(estimator, store, ids, *, n_jobs=1, backend=None, blocks=None):
    """:meth:`ConformalMargins.fit` over a store's images, one whole image at a time."""
    from joblib import Parallel, delayed

    if estimator.calibrator is None and estimator.input_type != store.values:
        raise ValueError(
            f"the store {store.path} holds {store.values} but the estimator has input_type="
            f"{estimator.input_type!r}; set input_type={store.values!r}."
        )
    first = store.load_image(int(ids[0]))
    shape = (1, store.n_classes, *np.shape(first.labels))
    for attr in ("outer_scores_", "n_features_in_"):
        estimator.__dict__.pop(attr, None)
    estimator._check_maps(np.zeros((1, store.n_classes) + (1,) * (len(shape) - 2)), reset=True)
    parts = Parallel(n_jobs=n_jobs, backend=backend)(
        delayed(_fit_margins_block)(estimator, store, block) for block in blocks
    )
    estimator._add_scores([s for part in parts for s in part], True)
    return estimator._finish()


def _evaluate_margins_block(estimator, store, ids):
    acc = MarginAccumulator(estimator.target_class, ignore_index=estimator.ignore_index)
    for image_id in ids:
        image = store.load_image(int(image_id))
        z = np.asarray(image.logits, dtype=np.float32)
        inner, outer = estimator._masks_of(z)
        acc.update(np.asarray(image.labels)[None], [estimator._predicted(z)], [inner], [outer])
    return acc


__all__ = ["ConformalMargins", "MarginAccumulator", "dilation_distance", "erosion_depth"]
