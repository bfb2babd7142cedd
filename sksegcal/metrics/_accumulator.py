"""CalibrationAccumulator: the fixed-size, mergeable tally every metric is read from."""

from __future__ import annotations

import copy
import numbers
import uuid
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from sklearn.utils import Bunch

from ._binning import DEFAULT_BASE_BINS, ce_from_bins, coarsen
from ._counting import Counted, Settings, Tallies, count_logits, count_probabilities
from ._inputs import (
    Chunk,
    check_image_id,
    check_region,
    check_sample_weight,
    inverse_temperature,
    prepare_labels,
    prepare_values,
    split_large_chunk,
)
from ._state import from_state, to_state


def _check_regions(regions: Any) -> tuple[str, ...] | None:
    """None, or at least two distinct non-empty region names as a tuple."""
    if regions is None:
        return None
    if isinstance(regions, str) or not isinstance(regions, Sequence):
        raise TypeError(
            f"regions must be a sequence of region names such as ('boundary', 'interior'); "
            f"got {regions!r}."
        )
    names = tuple(regions)
    if len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"regions must hold at least two non-empty names; got {regions!r}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"regions must be distinct names; got {regions!r}.")
    return names


class CalibrationAccumulator:
    """Streaming, mergeable tallies for calibration and segmentation metrics.

    Feed it any number of chunks with :meth:`update` (in any order, any
    chunking), combine accumulators filled in other processes with
    :meth:`merge`, then read any metric. Its state has a fixed size that does
    not depend on the number of pixels: float64 tallies (weight, confidence
    sum, correct count) on a fine grid of ``n_base_bins`` confidence bins, the
    NLL and Brier sums, and a float64 ``(n_classes, n_classes)`` confusion
    matrix; optionally per-class tallies on the same grid (``classwise=True``)
    and a 3 x ``per_image_n_bins`` tally per image seen with an ``image_id``
    (this part grows with the number of images, not pixels).

    Parameters
    ----------
    n_classes : int
        Number of classes C; ``y_prob`` chunks must have C columns.
    ignore_index : int or None, default=255
        Label of pixels to skip in every metric. ``None`` skips nothing.
    n_base_bins : int, default=3600
        Resolution of the fixed confidence grid. Equal-width bins of any
        count dividing it are exact; other counts and equal-mass bins are
        approximated to within one base bin (``1 / n_base_bins`` in
        confidence).
    classwise : bool, default=False
        Also tally every class's probability (not only the top one) so that
        classwise ECE, static calibration error (SCE) and adaptive
        calibration error (ACE) are available. Off by default because it
        costs one histogram over all ``n * C`` probabilities per chunk (2-4x
        a softmax pass) and ``3 * C * n_base_bins`` float64 of state.
    per_image_n_bins : int, default=15
        Equal-width bin count of the per-image ECE (tracked for chunks given
        an ``image_id``, and automatically for (N, C, H, W) chunks).
    check_input : bool, default=True
        Check that probabilities are finite, within [0, 1] and that rows sum
        to 1 (within 1e-3; 1e-2 for float16 and 8e-2 for bfloat16 input, about
        ten machine epsilons of those precisions). Turning it off saves
        one pass over the chunk (the row sums) and one global minimum: a
        quarter to a third of the time of :meth:`update`.
    regions : sequence of str, default=None
        Names of disjoint pixel regions (at least two, e.g.
        :data:`~sksegcal.metrics.BOUNDARY_REGIONS`, ``("boundary",
        "interior")``) to tally apart beside the pooled tallies: every
        :meth:`update` then takes ``region=``, each pixel's region, and
        :meth:`region` returns one region's tallies as an accumulator of its
        own (every metric, per-image ECE included). The state grows by one
        copy of the pooled tallies per region, still independent of the
        pixel count; the pooled metrics are exactly those of an accumulator
        without regions.

    Attributes
    ----------
    total_weight_ : float
        Sum of the weights of the pixels counted (their number when no
        ``sample_weight`` is given).
    n_pixels_ : int
        Number of non-ignored pixels counted.
    confusion_matrix_ : ndarray of shape (n_classes, n_classes)
        Weighted confusion matrix, rows are true classes, columns predictions.

    See Also
    --------
    expected_calibration_error : one-shot top-label ECE.

    Notes
    -----
    Equal-mass ("adaptive", ``strategy="quantile"``) bins are built from the
    fixed grid, so their edges are the exact quantiles rounded to the grid:
    approximate, with an error bounded by the grid resolution. When a single
    confidence value carries more than ``1 / n_bins`` of the mass (e.g. many
    pixels at exactly 1.0) several equal-mass bins collapse into one, as they
    would with exact quantiles.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import CalibrationAccumulator
    >>> rng = np.random.default_rng(0)
    >>> logits = rng.normal(size=(1000, 3)).astype(np.float32)
    >>> probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    >>> y = rng.integers(0, 3, size=1000)
    >>> y[:10] = 255  # ignored pixels
    >>> acc = CalibrationAccumulator(n_classes=3)
    >>> _ = acc.update(y[:500], probs[:500]).update(y[500:], probs[500:])
    >>> acc.n_pixels_
    990
    >>> s = acc.summary()
    >>> sorted(s)[:4]
    ['accuracy', 'brier', 'ece', 'ece_equal_mass']
    >>> round(s["ece"], 4) == round(acc.expected_calibration_error(15), 4)
    True
    """

    def __init__(
        self,
        n_classes: int,
        *,
        ignore_index: int | None = 255,
        n_base_bins: int = DEFAULT_BASE_BINS,
        classwise: bool = False,
        per_image_n_bins: int = 15,
        check_input: bool = True,
        regions: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(n_classes, numbers.Integral) or n_classes < 2:
            raise ValueError(f"n_classes must be an integer >= 2; got {n_classes!r}.")
        if not isinstance(n_base_bins, numbers.Integral) or n_base_bins < 1:
            raise ValueError(f"n_base_bins must be a positive integer; got {n_base_bins!r}.")
        if not isinstance(per_image_n_bins, numbers.Integral) or per_image_n_bins < 1:
            raise ValueError(
                f"per_image_n_bins must be a positive integer; got {per_image_n_bins!r}."
            )
        if ignore_index is not None and not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}.")
        self.n_classes = int(n_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.n_base_bins = int(n_base_bins)
        self.classwise = bool(classwise)
        self.per_image_n_bins = int(per_image_n_bins)
        self.check_input = bool(check_input)
        self.regions = _check_regions(regions)
        self.reset()

    # -- state -------------------------------------------------------------

    def reset(self) -> CalibrationAccumulator:
        """Clear every tally (keeps the configuration). Returns self."""
        self._reset_tallies()
        # Auto image ids of (N, C, H, W) chunks must not collide with those of
        # another accumulator this one is merged with.
        self._uid = uuid.uuid4().hex
        self._n_auto_images = 0
        return self

    def _reset_tallies(self) -> None:
        g, c = self.n_base_bins, self.n_classes
        # rows: weight, sum of w * confidence, sum of w * correct
        self._top = np.zeros((3, g))
        self._nll_sum = 0.0
        self._brier_sum = 0.0
        self.total_weight_ = 0.0
        self.n_pixels_ = 0
        self.confusion_matrix_ = np.zeros((c, c))
        # per class k: weight, sum of w * p_k, sum of w * [y == k], binned by p_k
        self._cls = np.zeros((c, 3, g)) if self.classwise else None
        self._images: dict[Hashable, np.ndarray] = {}
        # one accumulator without regions per region, filled with that region's
        # tallies of every chunk (the pooled ones above stay as without regions)
        self._region_accs: dict[str, CalibrationAccumulator] | None = (
            None
            if self.regions is None
            else {name: self._twin() for name in self.regions}
        )

    def _twin(self) -> CalibrationAccumulator:
        """An empty accumulator with these settings and no regions."""
        return CalibrationAccumulator(
            self.n_classes,
            ignore_index=self.ignore_index,
            n_base_bins=self.n_base_bins,
            classwise=self.classwise,
            per_image_n_bins=self.per_image_n_bins,
            check_input=self.check_input,
        )

    def copy(self) -> CalibrationAccumulator:
        """Deep copy (e.g. ``merged = a.copy().merge(b)`` keeps ``a`` intact)."""
        return copy.deepcopy(self)

    def _config(self) -> tuple:
        return (self.n_classes, self.ignore_index, self.n_base_bins, self.classwise,
                self.per_image_n_bins, self.regions)

    def merge(self, other: CalibrationAccumulator) -> CalibrationAccumulator:
        """Add the tallies of ``other`` into this accumulator, in place.

        Merging is exact and associative: accumulators filled on disjoint
        parts of the data (other processes, dask partitions) merge into the
        accumulator that would have seen all of it. Per-image tallies with the
        same ``image_id`` are added together (an image split across workers
        is fine; the same pixels fed to two accumulators are counted twice).

        Parameters
        ----------
        other : CalibrationAccumulator
            Accumulator with the same ``n_classes``, ``ignore_index``,
            ``n_base_bins``, ``classwise``, ``per_image_n_bins`` and
            ``regions`` (each region's tallies merge with the same region's).
            It is not modified.

        Returns
        -------
        self : CalibrationAccumulator
            This accumulator (modified). Use ``a.copy().merge(b)`` for a new one.
        """
        if not isinstance(other, CalibrationAccumulator):
            raise TypeError(
                f"Can only merge a CalibrationAccumulator; got {type(other).__name__}."
            )
        if other._config() != self._config():
            names = ("n_classes", "ignore_index", "n_base_bins", "classwise", "per_image_n_bins",
                     "regions")
            diff = [
                f"{n}: {a!r} vs {b!r}"
                for n, a, b in zip(names, self._config(), other._config())
                if a != b
            ]
            raise ValueError(
                "Cannot merge accumulators with different settings (" + "; ".join(diff) + ")."
            )
        self._top += other._top
        self._nll_sum += other._nll_sum
        self._brier_sum += other._brier_sum
        self.total_weight_ += other.total_weight_
        self.n_pixels_ += other.n_pixels_
        self.confusion_matrix_ += other.confusion_matrix_
        if self.classwise:
            self._cls += other._cls
        for key, val in other._images.items():
            if key in self._images:
                self._images[key] = self._images[key] + val
            else:
                self._images[key] = val.copy()
        if self._region_accs is not None:
            for name, acc in self._region_accs.items():
                acc.merge(other._region_accs[name])
        return self

    def state_dict(self) -> dict[str, Any]:
        """The configuration and tallies as plain values, for saving without pickle.

        Returns
        -------
        state : dict
            Values are NumPy float64 arrays, str, int, float or bool only (no
            object arrays, no None: ``ignore_index=None`` is left out), so
            ``np.savez(path, **state, allow_pickle=False)`` stores it.
            :meth:`from_state_dict` rebuilds an identical accumulator.
        """
        return to_state(self)

    @classmethod
    def from_state_dict(cls, state: Any) -> CalibrationAccumulator:
        """Rebuild an accumulator from :meth:`state_dict` output, checking everything.

        Parameters
        ----------
        state : dict
            As :meth:`state_dict` returned it, or as read back by
            ``dict(np.load(path, allow_pickle=False))`` (scalars as 0-d arrays).

        Returns
        -------
        acc : CalibrationAccumulator

        Raises
        ------
        ValueError
            Naming the key, when a key is missing or unknown, or a value has
            the wrong type, shape or dtype, or the tallies are inconsistent
            (negative or non-finite counts, a confusion matrix that does not
            sum to the total weight, ...).
        """
        return from_state(cls, state)

    def __repr__(self) -> str:
        return (
            f"CalibrationAccumulator(n_classes={self.n_classes}, ignore_index="
            f"{self.ignore_index}, n_base_bins={self.n_base_bins}, classwise="
            f"{self.classwise}"
            + ("" if self.regions is None else f", regions={self.regions}")
            + f"; n_pixels_={self.n_pixels_})"
        )

    # -- update ------------------------------------------------------------

    def update(
        self,
        y_true: Any,
        y_prob: Any,
        *,
        image_id: Any = None,
        sample_weight: Any = None,
        y_pred: Any = None,
        region: Any = None,
    ) -> CalibrationAccumulator:
        """Add one chunk of pixels.

        Parameters
        ----------
        y_true : array-like of shape (n,) or (N, H, W)
            Integer class labels; pixels equal to ``ignore_index`` are skipped.
        y_prob : array-like of shape (n, C), (n,) or (N, C, H, W)
            Probabilities (numpy array or torch tensor; float16, float32 or
            float64; computed on in float32). A 1-D array is P(class 1) of a
            binary problem, as scikit-learn scorers pass it.
        image_id : hashable, array-like of shape (n,) or (N,), default=None
            Image of the pixels, for the mean per-image ECE: one id for the
            whole chunk, one per pixel, or one per image of an (N, C, H, W)
            chunk. With (N, C, H, W) input and no ``image_id`` every image of
            the chunk gets a fresh id.
        sample_weight : array-like of shape (n,) or (N, H, W), default=None
            Non-negative per-pixel weights.
        y_pred : array-like of shape (n,) or (N, H, W), default=None
            The predicted class of each pixel. By default the argmax of
            ``y_prob``; pass the model's own prediction (the argmax of its
            logits) when calibration keeps it, as temperature scaling does.
            Accuracy, mIoU and the reliability tallies then follow the
            model's prediction even where calibrated rows tie (a
            near-uniform row from a very large temperature), the confidence
            is the calibrated probability of that class, and one argmax pass
            per chunk is saved.
        region : array-like of shape (n,) or (N, H, W), default=None
            Each pixel's region, required when the accumulator was built with
            ``regions`` (and refused otherwise): integer codes indexing
            ``regions``, or a boolean mask when there are two regions
            (``True``: the first, e.g. ``"boundary"`` for a
            :func:`~sksegcal.metrics.boundary_mask`; ``False``: the second).

        Returns
        -------
        self : CalibrationAccumulator

        Notes
        -----
        A chunk larger than 262,144 pixels is processed in pieces of that
        size (whole images for (N, C, H, W) input), so temporaries stay
        bounded whatever the chunk size. The update is all or nothing: when
        a piece fails validation, nothing of the chunk is counted.
        """
        return self._update_in_pieces(
            self._update_chunk, y_true, y_prob, image_id, sample_weight, (y_pred, region)
        )

    def update_logits(
        self,
        y_true: Any,
        logits: Any,
        *,
        temperature: Any = 1.0,
        image_id: Any = None,
        sample_weight: Any = None,
        y_pred: Any = None,
        region: Any = None,
    ) -> CalibrationAccumulator:
        """Add one chunk of logits: the probabilities are ``softmax(logits / temperature)``.

        The same tallies as ``update(y_true, softmax(logits / temperature),
        y_pred=logits.argmax(axis=1))`` (to float rounding), without
        materialising the probabilities: the confidence, the probability of
        the label and the sum of squared probabilities come from one pass of
        exponentials. This is how :func:`~sksegcal.store.evaluate_store`
        scores the uncalibrated model and temperature-based calibrators.

        Parameters
        ----------
        y_true : array-like of shape (n,) or (N, H, W)
            Integer class labels; pixels equal to ``ignore_index`` are skipped.
        logits : array-like of shape (n, C) or (N, C, H, W)
            Logits (numpy array or torch tensor), computed on in float32. NaN
            or +inf in a non-ignored pixel raises; -inf is a masked class
            (probability 0).
        temperature : float or array-like of shape (n,) or (N, H, W), default=1.0
            Positive temperature, one for the chunk or one per pixel (as
            selective scaling gives). The prediction is the argmax of the
            logits, which a positive temperature keeps.
        image_id, sample_weight, region
            As in :meth:`update`.
        y_pred : array-like of shape (n,) or (N, H, W), default=None
            ``logits.argmax(axis=1)`` when it is already at hand (evaluating
            several temperatures of the same chunk computes it once). It must
            be an argmax of each row (ties may go to any of the tied classes);
            a class whose logit is below its row's maximum raises.

        Returns
        -------
        self : CalibrationAccumulator
        """
        return self._update_in_pieces(
            self._update_logits_chunk,
            y_true,
            logits,
            image_id,
            sample_weight,
            (temperature, y_pred, region),
        )

    def _update_in_pieces(self, update_chunk, y_true, values, image_id, sample_weight, extra):
        pieces = split_large_chunk(y_true, values, image_id, sample_weight, extra)
        if pieces is None:
            update_chunk(y_true, values, image_id, sample_weight, extra)
            return self
        # Tally into an empty twin (sharing the auto image-id source) and merge
        # only when every piece went through.
        scratch = copy.copy(self)
        scratch._reset_tallies()
        for piece in pieces:
            update_chunk.__func__(scratch, *piece)
        self.merge(scratch)
        self._n_auto_images = scratch._n_auto_images
        return self

    def _prepare_chunk(self, y_true, values, image_id, sample_weight, name) -> Chunk:
        """Validated (n, C) float array, labels, weights, ids and the kept rows."""
        x, precision, spatial, source = prepare_values(values, name)
        n, c = x.shape
        if c != self.n_classes:
            raise ValueError(
                f"{name} has {c} classes (columns) but this accumulator was built with "
                f"n_classes={self.n_classes}."
            )
        y = prepare_labels(y_true, n, spatial)
        w = check_sample_weight(sample_weight, n)
        ids = check_image_id(image_id, n, spatial)
        if ids is None and spatial is not None and spatial[0] > 0:
            # (N, C, H, W) chunk without ids: every image gets a fresh id, unique
            # across accumulators thanks to the uid.
            n_img = spatial[0]
            keys = [(self._uid, self._n_auto_images + i) for i in range(n_img)]
            ids = keys, np.repeat(np.arange(n_img), n // n_img)
            self._n_auto_images += n_img

        if self.ignore_index is not None:
            valid = y != self.ignore_index
            rows = None if bool(valid.all()) else np.flatnonzero(valid)
        else:
            rows = None
        yv = y if rows is None else y[rows]
        if yv.size:
            lo, hi = int(yv.min()), int(yv.max())
            if lo < 0 or hi >= c:
                bad = np.unique(yv[(yv < 0) | (yv >= c)])[:5]
                raise ValueError(
                    f"y_true contains labels {bad.tolist()} outside [0, {c - 1}] that are "
                    f"not the ignore_index ({self.ignore_index}); set ignore_index to the "
                    "label of unlabelled pixels."
                )
        return Chunk(x, precision, spatial, y, yv, rows, w, ids, source)

    def _settings(self) -> Settings:
        return Settings(self.n_classes, self.ignore_index, self.n_base_bins, self.classwise,
                        self.per_image_n_bins, self.check_input)

    def _regions_of(self, region, chunk: Chunk):
        """``(codes, n_regions)`` of the chunk's rows, or None without regions."""
        if self.regions is None:
            if region is not None:
                raise ValueError(
                    "region= was given but this accumulator tracks no regions: build it "
                    "with CalibrationAccumulator(..., regions=('boundary', 'interior'))."
                )
            return None
        if region is None:
            raise ValueError(
                f"This accumulator tallies the regions {self.regions}: pass region= "
                "(each pixel's region code, or a boolean mask of the first region) to "
                "every update."
            )
        codes = check_region(region, chunk.x.shape[0], chunk.spatial, len(self.regions))
        return codes, len(self.regions)

    def _check_y_pred(self, y_pred, chunk: Chunk, hint: str) -> np.ndarray | None:
        if y_pred is None:
            return None
        n, c = chunk.x.shape
        y_pred = prepare_labels(y_pred, n, chunk.spatial, name="y_pred")
        if y_pred.size and (int(y_pred.min()) < 0 or int(y_pred.max()) >= c):
            raise ValueError(f"y_pred holds classes outside [0, {c - 1}]{hint}.")
        return y_pred

    def _update_chunk(self, y_true, y_prob, image_id, sample_weight, extra=(None, None)) -> None:
        y_pred, region = extra
        chunk = self._prepare_chunk(y_true, y_prob, image_id, sample_weight, "y_prob")
        y_pred = self._check_y_pred(
            y_pred, chunk, "; it must be predicted class indices (e.g. logits.argmax(axis=1))"
        )
        regions = self._regions_of(region, chunk)
        if chunk.yv.size:  # else a chunk of ignored pixels only: nothing to count
            self._add(count_probabilities(chunk, y_pred, self._settings(), regions))

    def _update_logits_chunk(
        self, y_true, logits, image_id, sample_weight, extra=(1.0, None, None)
    ) -> None:
        temperature, y_pred, region = extra
        chunk = self._prepare_chunk(y_true, logits, image_id, sample_weight, "logits")
        n = chunk.x.shape[0]
        beta = inverse_temperature(temperature, n, chunk.spatial, chunk.x.dtype)
        y_pred = self._check_y_pred(y_pred, chunk, "")
        regions = self._regions_of(region, chunk)
        if chunk.yv.size:
            self._add(count_logits(chunk, beta, y_pred, self._settings(), regions))

    def _add(self, counted: Counted | Tallies) -> None:
        """Add one chunk's tallies (computed in full before anything is added)."""
        if isinstance(counted, Counted):
            if counted.regions is not None:
                for acc, part in zip(self._region_accs.values(), counted.regions):
                    acc._add(part)
            t = counted.pool
        else:
            t = counted
        self._top += t.top
        self.confusion_matrix_ += t.confusion
        self._nll_sum += t.nll
        self._brier_sum += t.brier
        self.total_weight_ += t.weight
        self.n_pixels_ += t.pixels
        if t.classwise is not None:
            self._cls += t.classwise
        if t.images is not None:
            keys, st = t.images
            for j, key in enumerate(keys):
                if key in self._images:
                    self._images[key] += st[:, j, :]
                else:
                    self._images[key] = st[:, j, :].copy()

    # -- metrics -----------------------------------------------------------

    def _require_data(self) -> None:
        if self.total_weight_ <= 0:
            raise ValueError(
                "No pixels to score: every pixel seen so far was ignored (label "
                f"{self.ignore_index}) or had zero weight. Check ignore_index and the labels."
            )

    def _require_classwise(self) -> None:
        if not self.classwise:
            raise ValueError(
                "Classwise metrics need per-class tallies: build the accumulator with "
                "CalibrationAccumulator(..., classwise=True)."
            )

    def calibration_error(
        self, n_bins: int = 15, *, norm: str = "l1", strategy: str = "uniform"
    ) -> float:
        """Top-label calibration error.

        Parameters
        ----------
        n_bins : int, default=15
            Number of bins (at most ``n_base_bins``).
        norm : {"l1", "l2", "max"}, default="l1"
            ``"l1"``: ECE; ``"l2"``: RMS calibration error; ``"max"``: MCE.
        strategy : {"uniform", "quantile"}, default="uniform"
            Equal-width or (approximately) equal-mass bins.

        Returns
        -------
        error : float
        """
        self._require_data()
        coarse, _ = coarsen(self._top, n_bins, strategy)
        return float(ce_from_bins(coarse, norm))

    def expected_calibration_error(self, n_bins: int = 15, *, strategy: str = "uniform") -> float:
        """Top-label ECE (L1). See :meth:`calibration_error`."""
        return self.calibration_error(n_bins, norm="l1", strategy=strategy)

    def rms_calibration_error(self, n_bins: int = 15, *, strategy: str = "uniform") -> float:
        """Top-label RMS calibration error (L2). See :meth:`calibration_error`."""
        return self.calibration_error(n_bins, norm="l2", strategy=strategy)

    def maximum_calibration_error(self, n_bins: int = 15, *, strategy: str = "uniform") -> float:
        """Top-label MCE (max over non-empty bins). See :meth:`calibration_error`."""
        return self.calibration_error(n_bins, norm="max", strategy=strategy)

    def classwise_calibration_error(
        self,
        n_bins: int = 15,
        *,
        norm: str = "l1",
        strategy: str = "uniform",
        average: bool = True,
    ) -> float | np.ndarray:
        """Classwise calibration error (Kull et al. 2019 "classwise-ECE").

        For every class k the probabilities p_k of all pixels are binned and
        compared with the frequency of label k in each bin; the result is the
        mean over all ``n_classes`` classes (``average=True``) or the
        per-class array. With ``norm="l1"`` and uniform bins this is also the
        static calibration error (SCE) of Nixon et al. 2019; with
        ``strategy="quantile"`` it is their adaptive calibration error (ACE).

        Requires ``classwise=True`` at construction.
        """
        self._require_data()
        self._require_classwise()
        coarse, _ = coarsen(self._cls, n_bins, strategy)
        per_class = ce_from_bins(coarse, norm)
        return float(per_class.mean()) if average else per_class

    def static_calibration_error(self, n_bins: int = 15) -> float:
        """SCE (Nixon et al. 2019): classwise L1 error, equal-width bins."""
        return self.classwise_calibration_error(n_bins, norm="l1", strategy="uniform")

    def adaptive_calibration_error(self, n_bins: int = 15) -> float:
        """ACE (Nixon et al. 2019): classwise L1 error, equal-mass bins per class.

        Not the top-label "adaptive ECE" of other libraries: for that use
        ``expected_calibration_error(strategy="quantile")``.
        """
        return self.classwise_calibration_error(n_bins, norm="l1", strategy="quantile")

    def negative_log_likelihood(self) -> float:
        """Mean NLL ``-log p_y`` over the counted pixels (natural log).

        Exact from logits (:meth:`update_logits`: ``logsumexp(z / T) - z_y / T``);
        from probabilities, ``p_y`` is clipped from below at the smallest normal
        number of the input's dtype (``np.finfo(dtype).tiny``).
        """
        self._require_data()
        return self._nll_sum / self.total_weight_

    def brier_score(self) -> float:
        """Multi-class Brier score ``mean(sum_k (p_k - [y == k])**2)``, in [0, 2]."""
        self._require_data()
        return self._brier_sum / self.total_weight_

    def accuracy(self) -> float:
        """Pixel accuracy (fraction of counted pixels whose argmax is the label)."""
        self._require_data()
        return float(np.trace(self.confusion_matrix_) / self.total_weight_)

    def iou_per_class(self) -> np.ndarray:
        """Intersection over union per class; NaN for a class neither present nor predicted."""
        self._require_data()
        cm = self.confusion_matrix_
        inter = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)

    def mean_iou(self) -> float:
        """Mean IoU over classes with a non-empty union (mmseg's convention)."""
        return float(np.nanmean(self.iou_per_class()))

    def per_image_ece(self) -> dict:
        """ECE of each image (``per_image_n_bins`` equal-width bins), by image id."""
        return {
            k: float(ce_from_bins(v, "l1")) for k, v in self._images.items() if v[0].sum() > 0
        }

    def mean_per_image_ece(self) -> float:
        """Mean over images of the per-image ECE (NaN when no image ids were given)."""
        vals = list(self.per_image_ece().values())
        return float(np.mean(vals)) if vals else float("nan")

    def region(self, name: str) -> CalibrationAccumulator:
        """The tallies of one region, as an accumulator of their own (a copy).

        Every metric reads from it: ``acc.region("boundary").expected_calibration_error()``,
        ``.negative_log_likelihood()``, ``.per_image_ece()`` (by image id; an
        image with no pixel in the region is left out), ...

        Parameters
        ----------
        name : str
            One of :attr:`regions`.

        Returns
        -------
        acc : CalibrationAccumulator
            Without regions; its pooled tallies are the region's. Updating it
            leaves this accumulator unchanged.
        """
        if self._region_accs is None:
            raise ValueError(
                "This accumulator tracks no regions: build it with "
                "CalibrationAccumulator(..., regions=('boundary', 'interior'))."
            )
        if name not in self._region_accs:
            raise ValueError(f"Unknown region {name!r}; this accumulator has {self.regions}.")
        return self._region_accs[name].copy()

    def region_summary(self, n_bins: int = 15) -> dict[str, dict[str, float]]:
        """:meth:`summary` of every region, by region name.

        A region without pixels gets ``n_pixels`` 0 and NaN for every other key.
        """
        if self._region_accs is None:
            raise ValueError(
                "This accumulator tracks no regions: build it with "
                "CalibrationAccumulator(..., regions=('boundary', 'interior'))."
            )
        out = {}
        for name, acc in self._region_accs.items():
            if acc.total_weight_ > 0:
                out[name] = acc.summary(n_bins)
                if self._images and "mean_per_image_ece" not in out[name]:
                    out[name]["mean_per_image_ece"] = float("nan")
            else:
                keys = self._pixels_free_summary_keys()
                out[name] = {k: (0.0 if k == "n_pixels" else float("nan")) for k in keys}
        return out

    def _pixels_free_summary_keys(self) -> list[str]:
        keys = ["n_pixels", "ece", "ece_equal_mass", "rmsce", "mce", "nll", "brier",
                "accuracy", "miou"]
        if self._images:
            keys.append("mean_per_image_ece")
        if self.classwise:
            keys += ["classwise_ece", "sce", "ace"]
        return keys

    def reliability_curve(self, n_bins: int = 15, *, strategy: str = "uniform") -> Bunch:
        """Per-bin mean confidence, accuracy and weight of the top-label prediction.

        Returns
        -------
        curve : Bunch
            ``bin_edges`` (n_bins + 1,), ``confidence``, ``accuracy`` (NaN for
            empty bins), ``count`` (weight per bin), ``fraction`` (share of
            the total weight), each of shape (n_bins,).
        """
        self._require_data()
        coarse, edges = coarsen(self._top, n_bins, strategy)
        w, s, h = coarse
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(w > 0, s / np.where(w > 0, w, 1), np.nan)
            acc = np.where(w > 0, h / np.where(w > 0, w, 1), np.nan)
        return Bunch(
            bin_edges=edges, confidence=conf, accuracy=acc, count=w, fraction=w / w.sum()
        )

    def classwise_reliability_curve(
        self, n_bins: int = 15, *, strategy: str = "uniform"
    ) -> Bunch:
        """Per-class reliability curves of p_k against the frequency of label k.

        Returns a Bunch like :meth:`reliability_curve` whose arrays have a
        leading ``n_classes`` axis (``accuracy`` is the frequency of the class).
        Requires ``classwise=True``.
        """
        self._require_data()
        self._require_classwise()
        coarse, edges = coarsen(self._cls, n_bins, strategy)
        w, s, h = coarse[:, 0], coarse[:, 1], coarse[:, 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(w > 0, s / np.where(w > 0, w, 1), np.nan)
            acc = np.where(w > 0, h / np.where(w > 0, w, 1), np.nan)
        return Bunch(
            bin_edges=edges, confidence=conf, accuracy=acc, count=w,
            fraction=w / w.sum(axis=1, keepdims=True), support=self.confusion_matrix_.sum(1),
        )

    def summary(self, n_bins: int = 15) -> dict[str, float]:
        """Headline numbers as a dict of floats (keys lower-case).

        Keys: ``n_pixels``, ``ece``, ``ece_equal_mass``, ``rmsce``, ``mce``,
        ``nll``, ``brier``, ``accuracy``, ``miou``; ``mean_per_image_ece``
        when image ids were tracked; ``classwise_ece`` (= ``sce``) and
        ``ace`` when ``classwise=True``.
        """
        out = {
            "n_pixels": float(self.n_pixels_),
            "ece": self.calibration_error(n_bins, norm="l1"),
            "ece_equal_mass": self.calibration_error(n_bins, norm="l1", strategy="quantile"),
            "rmsce": self.calibration_error(n_bins, norm="l2"),
            "mce": self.calibration_error(n_bins, norm="max"),
            "nll": self.negative_log_likelihood(),
            "brier": self.brier_score(),
            "accuracy": self.accuracy(),
            "miou": self.mean_iou(),
        }
        if self._images:
            out["mean_per_image_ece"] = self.mean_per_image_ece()
        if self.classwise:
            out["classwise_ece"] = self.classwise_calibration_error(n_bins)
            out["sce"] = out["classwise_ece"]
            out["ace"] = self.adaptive_calibration_error(n_bins)
        return out

    compute = summary


