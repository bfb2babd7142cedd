"""Calibration and segmentation metrics that scale to billions of pixels.

The centre of this module is :class:`CalibrationAccumulator`: a fixed-size,
mergeable, picklable tally of per-pixel predictions, from which every metric
is derived (top-label ECE / RMS / MCE with equal-width or equal-mass bins,
classwise ECE, static and adaptive calibration error, NLL, multi-class Brier
score, pixel accuracy, mIoU, mean per-image ECE, reliability curve).

The one-shot functions (:func:`expected_calibration_error`,
:func:`negative_log_likelihood`, :func:`brier_score`, ...) feed their input
through an accumulator in bounded-memory chunks, so one-shot and streaming
results agree exactly. The scikit-learn scorers (:data:`ece_scorer`,
:data:`nll_scorer`, :data:`brier_scorer`, :func:`get_scorer`) wrap them for
``GridSearchCV``; they ignore pixels whose label is the ignore index (255).

Conventions (see ``docs/metrics.md`` for every formula and where each name
comes from):

* Probabilities are computed on in float32 (float16 / float64 input is
  converted chunk by chunk, so a float64 0.9 is binned as float32
  0.89999998, as torchmetrics does with float32 input); all tallies are
  float64 (exact for integer counts up to 2**53, far beyond a billion pixels).
* A bin ``b`` of ``n`` equal-width bins holds confidences in
  ``[b / n, (b + 1) / n)``; the last bin also holds a confidence of exactly
  1.0 (torchmetrics instead puts 1.0 in an extra bin of its own).
* The log of a probability is taken after clipping it from below at
  ``NLL_EPS = finfo(float32).eps`` (about 1.19e-7), so one pixel contributes
  at most about 15.9 nats.
"""

from __future__ import annotations

import copy
import numbers
import sys
import uuid
from collections.abc import Hashable
from typing import Any, NamedTuple

import numpy as np
from sklearn.metrics import make_scorer
from sklearn.utils import Bunch

from ._kernels import argmax_rows, can_tally, shifted_exp, softmax_stats, tally

__all__ = [
    "NLL_EPS",
    "CalibrationAccumulator",
    "adaptive_calibration_error",
    "brier_score",
    "brier_scorer",
    "calibration_error",
    "classwise_calibration_error",
    "ece_scorer",
    "expected_calibration_error",
    "get_scorer",
    "get_scorer_names",
    "maximum_calibration_error",
    "mean_iou",
    "misprediction_detection_scores",
    "negative_log_likelihood",
    "nll_scorer",
    "pixel_accuracy",
    "reliability_curve",
    "rms_calibration_error",
    "static_calibration_error",
]

#: Lower clip of a probability before its log is taken (float32 machine epsilon).
NLL_EPS: float = float(np.finfo(np.float32).eps)

# Default resolution of the fixed confidence grid. 3600 is divisible by every
# common bin count (2-6, 8-10, 12, 15, 16, 18, 20, 24, 25, 30, 36, 40, 45, 50,
# 60, 75, 90, 100, ...), so equal-width bins built from it are exact.
DEFAULT_BASE_BINS = 3600

# Pixels processed at once by update() (larger chunks are cut): bounds the
# float32 / float64 temporaries to a few tens of MB whatever the input size.
_CHUNK_ROWS = 1 << 18

# Tolerance on the row sums of probabilities, by input dtype.
_ROW_SUM_ATOL = {np.dtype(np.float16): 1e-2}
_ROW_SUM_ATOL_DEFAULT = 1e-3


# ---------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------


def _is_tensor(a: Any) -> bool:
    # torch is only looked at when the caller already imported it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def _to_numpy(a: Any, name: str) -> np.ndarray:
    """Array-like or torch tensor -> NumPy array, without copying where possible."""
    if _is_tensor(a):
        torch = sys.modules["torch"]
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:  # NumPy has no bfloat16
            a = a.to(torch.float32)
        return a.numpy()
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array; got dtype {arr.dtype}.")
    return arr


def _prepare_probs(
    y_prob: Any, name: str = "y_prob"
) -> tuple[np.ndarray, np.dtype, tuple[int, ...] | None]:
    """Return C-contiguous float32 (n, C) values, the input dtype, the image shape.

    (N, C, *spatial) input is moved to (N * prod(spatial), C) (a chunk-sized
    copy); the returned shape is (N, *spatial) so labels can be checked.
    ``name`` is "y_prob" (probabilities) or "logits".
    """
    p = _to_numpy(y_prob, name)
    if p.dtype.kind != "f":
        what = "probabilities" if name == "y_prob" else "logits"
        raise TypeError(
            f"{name} must hold floating-point {what}; got dtype {p.dtype}. "
            "Pass the network's scores, not labels."
        )
    in_dtype = p.dtype
    spatial = None
    if p.ndim == 1 and name == "y_prob":
        # Binary problem given as P(class 1), as scikit-learn scorers pass it.
        p1 = p.astype(np.float32)
        p = np.empty((p1.size, 2), dtype=np.float32)
        p[:, 1] = p1
        p[:, 0] = 1.0 - p1
    elif p.ndim == 2:
        p = np.ascontiguousarray(p, dtype=np.float32)
    elif p.ndim >= 3:
        spatial = (p.shape[0], *p.shape[2:])
        p = np.ascontiguousarray(np.moveaxis(p, 1, -1), dtype=np.float32).reshape(-1, p.shape[1])
    else:
        shapes = "1-D, 2-D" if name == "y_prob" else "2-D"
        raise ValueError(
            f"{name} must be {shapes} (n, C) or (N, C, H, W); got shape {p.shape}."
        )
    return p, in_dtype, spatial


def _inverse_temperature(temperature: Any, n: int, spatial, dtype) -> np.ndarray:
    """1 / temperature as a (1,) or (n,) array, checked positive and finite."""
    t = _to_numpy(temperature, "temperature")
    if t.ndim == 0:
        t = t.reshape(1)
    elif spatial is not None and tuple(t.shape) == spatial or t.shape == (n,):
        t = t.reshape(-1)
    else:
        expected = f"(n,) = ({n},)" if spatial is None else f"(N, *spatial) = {spatial}"
        raise ValueError(
            f"temperature must be a number or one per pixel of shape {expected}; got "
            f"shape {tuple(t.shape)}."
        )
    t = t.astype(np.float64)
    if not (np.isfinite(t).all() and (t > 0).all()):
        raise ValueError("temperature must be positive and finite.")
    return (1.0 / t).astype(dtype)


_NON_FINITE_LOGITS = "logits contain NaN or +inf values (in non-ignored pixels)."


class _Chunk(NamedTuple):
    x: np.ndarray  # (n, C) float32: probabilities or logits
    in_dtype: np.dtype
    spatial: tuple[int, ...] | None
    y: np.ndarray  # (n,) int64 labels
    yv: np.ndarray  # labels of the kept rows
    rows: np.ndarray | None  # kept rows, None when all are kept
    w: np.ndarray | None
    ids: Any


def _prepare_labels(
    y_true: Any, n_rows: int, spatial: tuple[int, ...] | None, name: str = "y_true"
) -> np.ndarray:
    """Return int64 labels of shape (n_rows,), checking the shape."""
    if _is_tensor(y_true):
        y = y_true.detach().cpu().numpy()
    else:
        y = np.asarray(y_true)
    if y.dtype.kind == "f":
        if not np.all(y == np.round(y)):
            raise ValueError(
                f"{name} must hold integer class indices; got non-integer floats."
            )
    elif y.dtype.kind not in "biu":
        raise TypeError(f"{name} must hold integer class indices; got dtype {y.dtype}.")
    if spatial is not None:
        if tuple(y.shape) != spatial:
            raise ValueError(
                f"Shape mismatch: y_prob has images of shape (N, *spatial) = {spatial} "
                f"(from (N, C, H, W) input) but {name} has shape {tuple(y.shape)}."
            )
    elif y.ndim != 1 or y.shape[0] != n_rows:
        raise ValueError(
            f"Shape mismatch: y_prob has {n_rows} rows but {name} has shape "
            f"{tuple(y.shape)}; expected ({n_rows},)."
        )
    return y.reshape(-1).astype(np.int64, copy=False)


def _key(k: Any) -> Hashable:
    k = k.item() if isinstance(k, np.generic) else k
    if not isinstance(k, Hashable):
        raise TypeError(f"image_id values must be hashable; got {type(k).__name__}.")
    return k


def _check_image_id(image_id: Any, n_rows: int, spatial: tuple[int, ...] | None):
    """Return None or ``(keys, codes)``: image ids and each pixel's index into them.

    ``codes`` is None when one id covers the whole chunk.
    """
    if image_id is None:
        return None
    if isinstance(image_id, (str, bytes)) or np.ndim(image_id) == 0:
        return [_key(image_id)], None
    ids = _to_numpy(image_id, "image_id") if _is_tensor(image_id) else np.asarray(image_id)
    if spatial is not None and ids.shape == (spatial[0],):
        # One id per image of an (N, C, H, W) chunk: pixels are image-contiguous.
        per = int(np.prod(spatial[1:], dtype=np.int64))
        return [_key(k) for k in ids], np.repeat(np.arange(ids.size), per)
    if ids.ndim >= 1 and ids.size == n_rows:
        ids = ids.reshape(-1)
        if ids.dtype == object:
            # tuples / mixed ids: factorise through a dict
            lookup: dict = {}
            codes = np.fromiter(
                (lookup.setdefault(_key(k), len(lookup)) for k in ids), np.int64, ids.size
            )
            return list(lookup), codes
        uniq, codes = np.unique(ids, return_inverse=True)
        return [_key(k) for k in uniq], codes.reshape(-1)
    expected = f"({spatial[0]},) or {spatial}" if spatial is not None else f"({n_rows},)"
    raise ValueError(
        f"Shape mismatch: image_id has shape {ids.shape}; expected a scalar or {expected}."
    )


def _check_sample_weight(sample_weight: Any, n_rows: int, spatial) -> np.ndarray | None:
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.size != n_rows:
        raise ValueError(
            f"Shape mismatch: sample_weight has {w.size} values but y_prob has "
            f"{n_rows} pixels."
        )
    w = w.reshape(-1)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("sample_weight must be finite and non-negative.")
    return w


# ---------------------------------------------------------------------------
# binning helpers (pure functions of the fine-grid tallies)
# ---------------------------------------------------------------------------


def _fine_to_coarse_uniform(n_fine: int, n_bins: int) -> np.ndarray:
    """Map fine bins to ``n_bins`` equal-width bins.

    Exact when ``n_fine % n_bins == 0``; otherwise each fine bin goes to the
    coarse bin holding its midpoint (edges off by at most ``1 / n_fine``).
    """
    if n_fine % n_bins == 0:
        return np.arange(n_fine) // (n_fine // n_bins)
    return np.minimum(((np.arange(n_fine) + 0.5) * n_bins / n_fine).astype(np.int64), n_bins - 1)


def _fine_to_coarse_quantile(weight: np.ndarray, n_bins: int) -> np.ndarray:
    """Map fine bins to ~equal-mass bins, row by row for a 2-D ``weight``.

    A fine bin goes to the coarse bin in which the middle of its mass falls,
    so coarse bins are runs of whole fine bins: the edges are the exact
    quantiles rounded to the fine grid (off by at most one fine bin).
    """
    weight = np.atleast_2d(weight)
    total = weight.sum(axis=1, keepdims=True)
    mid = np.cumsum(weight, axis=1) - 0.5 * weight
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, mid / np.where(total > 0, total, 1.0), 0.0)
    return np.clip((frac * n_bins).astype(np.int64), 0, n_bins - 1)


def _coarsen(stats: np.ndarray, n_bins: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate fine tallies ``stats`` (..., 3, G) into (..., 3, n_bins).

    Returns the coarse stats and the coarse bin edges (..., n_bins + 1) in
    confidence units (for ``quantile``, edges of empty bins repeat).
    """
    *lead, three, n_fine = stats.shape
    if not isinstance(n_bins, numbers.Integral) or isinstance(n_bins, bool):
        raise TypeError(f"n_bins must be an integer; got {n_bins!r}.")
    if not 1 <= n_bins <= n_fine:
        raise ValueError(
            f"n_bins={n_bins} is out of range: it must be between 1 and the base grid "
            f"resolution n_base_bins={n_fine}."
        )
    flat = stats.reshape(-1, three, n_fine)
    k = flat.shape[0]
    if strategy == "uniform":
        m = _fine_to_coarse_uniform(n_fine, n_bins)
        maps = np.broadcast_to(m, (k, n_fine))
        edges = np.broadcast_to(np.linspace(0.0, 1.0, n_bins + 1), (k, n_bins + 1))
    elif strategy == "quantile":
        maps = _fine_to_coarse_quantile(flat[:, 0, :], n_bins)
        # left edge of coarse bin j = left edge of its first fine bin
        edges = np.empty((k, n_bins + 1))
        fine_edges = np.arange(n_fine + 1) / n_fine
        for r in range(k):
            first = np.searchsorted(maps[r], np.arange(n_bins), side="left")
            edges[r, :n_bins] = fine_edges[first]
        edges[:, n_bins] = 1.0
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile'; got {strategy!r}.")
    offs = (np.arange(k) * n_bins)[:, None]
    idx = (maps + offs).ravel()
    out = np.empty((k, three, n_bins))
    for s in range(three):
        out[:, s, :] = np.bincount(
            idx, weights=flat[:, s, :].ravel(), minlength=k * n_bins
        ).reshape(k, n_bins)
    return out.reshape(*lead, three, n_bins), edges.reshape(*lead, n_bins + 1)


def _ce_from_bins(stats: np.ndarray, norm: str, total: np.ndarray | float | None = None):
    """Calibration error from coarse (..., 3, B) tallies: weight, confidence sum, hits.

    ``total`` is the weight each bin's share is taken of (defaults to the sum
    of the bin weights).
    """
    w, s, h = stats[..., 0, :], stats[..., 1, :], stats[..., 2, :]
    if total is None:
        total = w.sum(axis=-1)
    total = np.asarray(total, dtype=np.float64)
    gap = np.abs(h - s)  # = w * |acc - conf|
    with np.errstate(invalid="ignore", divide="ignore"):
        if norm == "l1":
            return gap.sum(axis=-1) / total
        if norm == "l2":
            return np.sqrt(np.where(w > 0, gap**2 / np.where(w > 0, w, 1), 0).sum(-1) / total)
        if norm == "max":
            return np.where(w > 0, gap / np.where(w > 0, w, 1), -np.inf).max(axis=-1)
    raise ValueError(f"norm must be 'l1', 'l2' or 'max'; got {norm!r}.")


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.shape) if hasattr(a, "shape") else np.shape(a)


def _split_large_chunk(y_true, y_prob, image_id, sample_weight, y_pred=None):
    """Cut a chunk of more than ``_CHUNK_ROWS`` pixels into pieces, or return None.

    2-D input is cut by rows, (N, C, *spatial) input by whole images; labels,
    per-pixel or per-image ids, weights and predictions are cut alongside.
    """
    shp = _shape(y_prob)
    if len(shp) <= 2:
        n = shp[0] if shp else 0
        if n <= _CHUNK_ROWS:
            return None
        if len(_shape(y_true)) != 1 or _shape(y_true)[0] != n:
            raise ValueError(
                f"Shape mismatch: y_prob has {n} rows but y_true has shape "
                f"{_shape(y_true)}; expected ({n},)."
            )
        per, n_units, step = 1, n, _CHUNK_ROWS
    else:
        n_units = shp[0]
        per = int(np.prod(shp[2:], dtype=np.int64))
        if n_units * per <= _CHUNK_ROWS or n_units < 2:
            return None
        if _shape(y_true)[:1] != (n_units,):
            raise ValueError(
                f"Shape mismatch: y_prob has {n_units} images (shape {shp}) but y_true "
                f"has shape {_shape(y_true)}; expected {(n_units, *shp[2:])}."
            )
        step = max(1, _CHUNK_ROWS // max(per, 1))

    def cut(a, s, e):
        if isinstance(a, tuple):  # several per-pixel arguments riding together
            return tuple(cut(part, s, e) for part in a)
        if a is None or isinstance(a, (str, bytes)) or np.ndim(a) == 0:
            return a  # one id for the whole chunk
        a = a if _is_tensor(a) else np.asarray(a)
        if per == 1 or _shape(a)[:1] == (n_units,):
            return a[s:e]
        # per-pixel values given flat for (N, C, H, W) input
        return a.reshape(n_units, -1)[s:e]

    return [
        (
            y_true[s:e],
            y_prob[s:e],
            cut(image_id, s, e),
            cut(sample_weight, s, e),
            cut(y_pred, s, e),
        )
        for s in range(0, n_units, step)
        for e in [min(s + step, n_units)]
    ]


# ---------------------------------------------------------------------------
# the accumulator
# ---------------------------------------------------------------------------


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
        to 1 (within 1e-3; 1e-2 for float16 input). Turning it off saves
        one pass over the chunk (the row sums) and one global minimum: a
        quarter to a third of the time of :meth:`update`.

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

    def copy(self) -> CalibrationAccumulator:
        """Deep copy (e.g. ``merged = a.copy().merge(b)`` keeps ``a`` intact)."""
        return copy.deepcopy(self)

    def _config(self) -> tuple:
        return (self.n_classes, self.ignore_index, self.n_base_bins, self.classwise,
                self.per_image_n_bins)

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
            ``n_base_bins``, ``classwise`` and ``per_image_n_bins``. It is
            not modified.

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
            names = ("n_classes", "ignore_index", "n_base_bins", "classwise", "per_image_n_bins")
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
        return self

    def __repr__(self) -> str:
        return (
            f"CalibrationAccumulator(n_classes={self.n_classes}, ignore_index="
            f"{self.ignore_index}, n_base_bins={self.n_base_bins}, classwise="
            f"{self.classwise}; n_pixels_={self.n_pixels_})"
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
            self._update_chunk, y_true, y_prob, image_id, sample_weight, y_pred
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
        image_id, sample_weight
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
            (temperature, y_pred),
        )

    def _update_in_pieces(self, update_chunk, y_true, values, image_id, sample_weight, extra):
        pieces = _split_large_chunk(y_true, values, image_id, sample_weight, extra)
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

    def _prepare_chunk(self, y_true, values, image_id, sample_weight, name):
        """Validated (n, C) float array, labels, weights, ids and the kept rows."""
        x, in_dtype, spatial = _prepare_probs(values, name)
        n, c = x.shape
        if c != self.n_classes:
            raise ValueError(
                f"{name} has {c} classes (columns) but this accumulator was built with "
                f"n_classes={self.n_classes}."
            )
        y = _prepare_labels(y_true, n, spatial)
        w = _check_sample_weight(sample_weight, n, spatial)
        ids = _check_image_id(image_id, n, spatial)
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
        return _Chunk(x, in_dtype, spatial, y, yv, rows, w, ids)

    def _update_chunk(self, y_true, y_prob, image_id, sample_weight, y_pred=None) -> None:
        chunk = self._prepare_chunk(y_true, y_prob, image_id, sample_weight, "y_prob")
        p, rows, yv = chunk.x, chunk.rows, chunk.yv
        n, c = p.shape
        if y_pred is not None:
            y_pred = _prepare_labels(y_pred, n, chunk.spatial, name="y_pred")
            if y_pred.size and (int(y_pred.min()) < 0 or int(y_pred.max()) >= c):
                raise ValueError(
                    f"y_pred holds classes outside [0, {c - 1}]; it must be predicted "
                    "class indices (e.g. logits.argmax(axis=1))."
                )
        if yv.size == 0:
            return  # a chunk of ignored pixels only: nothing to count

        if self._compiled_tally(chunk, p, normalise=False, pred=y_pred):
            return
        # Passes over the (n, C) chunk: argmax (unless given) and sum of squares
        # (plus, when checking, the row sums and one global min). Everything after
        # works on n-vectors.
        pred_all = argmax_rows(p) if y_pred is None else y_pred
        sumsq_all = np.einsum("ij,ij->i", p, p)
        pred = pred_all if rows is None else pred_all[rows]
        flat = p.reshape(-1)
        base = np.arange(n, dtype=np.int64) * c if rows is None else rows * c
        conf32 = flat[base + pred]
        py32 = flat[base + yv]
        sumsq = (sumsq_all if rows is None else sumsq_all[rows]).astype(np.float64)
        if self.check_input:
            self._check_probs(p, rows, conf32, sumsq, chunk.in_dtype)
        self._tally(
            chunk, pred, conf32.astype(np.float64), py32.astype(np.float64), sumsq, p
        )

    def _update_logits_chunk(
        self, y_true, logits, image_id, sample_weight, extra=(1.0, None)
    ) -> None:
        temperature, y_pred = extra
        chunk = self._prepare_chunk(y_true, logits, image_id, sample_weight, "logits")
        z, rows, yv = chunk.x, chunk.rows, chunk.yv
        n, c = z.shape
        beta = _inverse_temperature(temperature, n, chunk.spatial, z.dtype)
        if y_pred is not None:
            y_pred = _prepare_labels(y_pred, n, chunk.spatial, name="y_pred")
            if y_pred.size and (int(y_pred.min()) < 0 or int(y_pred.max()) >= c):
                raise ValueError(f"y_pred holds classes outside [0, {c - 1}].")
        if yv.size == 0:
            return
        if not self.classwise and can_tally(z):
            pred_all, e = shifted_exp(z, beta, reuse=True, pred=y_pred)
            self._compiled_tally(chunk, e, normalise=True, pred=pred_all)
            return
        pred, e, total_all, squares = softmax_stats(z, beta, pred=y_pred)
        total = total_all
        if rows is not None:
            pred, total, squares = pred[rows], total_all[rows], squares[rows]
        # a NaN or +inf logit makes its row's sums NaN (-inf is a probability of 0)
        if not (np.isfinite(total).all() and np.isfinite(squares).all()):
            raise ValueError(_NON_FINITE_LOGITS)
        inv_total = 1.0 / total
        base = np.arange(n, dtype=np.int64) * c if rows is None else rows * c
        flat = e.reshape(-1)
        # probabilities in the working dtype, as update() would see them
        conf = (flat[base + pred] * inv_total).astype(z.dtype).astype(np.float64)
        py = (flat[base + yv] * inv_total).astype(z.dtype).astype(np.float64)
        sumsq = squares * inv_total**2
        probs = e / total_all[:, None].astype(e.dtype) if self.classwise else None
        self._tally(chunk, pred, conf, py, sumsq, probs)

    def _compiled_tally(self, chunk, values, *, normalise, pred) -> bool:
        """Tally the chunk in one compiled pass; False where only NumPy can."""
        if self.classwise or not can_tally(values):
            return False
        keys, codes = chunk.ids if chunk.ids is not None else ([None], None)
        top, cm, img, sums, check = tally(
            values,
            normalise=normalise,
            pred=pred,
            y=chunk.y,
            ignore_index=self.ignore_index,
            weights=chunk.w,
            codes=codes,
            n_keys=len(keys),
            n_bins=self.n_base_bins,
            n_image_bins=self.per_image_n_bins,
            nll_eps=NLL_EPS,
        )
        lo, hi, worst_sum, non_finite = check
        if non_finite:
            raise ValueError(
                _NON_FINITE_LOGITS
                if normalise
                else "y_prob contains NaN or infinite values (in non-ignored pixels)."
            )
        if self.check_input and not normalise:
            self._check_prob_range(lo, hi)
            self._check_row_sums(worst_sum, chunk.in_dtype)
        self._top += top
        self.confusion_matrix_ += cm
        self._nll_sum += float(sums[0])
        self._brier_sum += float(sums[1])
        self.total_weight_ += float(sums[2])
        self.n_pixels_ += int(sums[3])
        if chunk.ids is not None:
            self._add_image_tallies(keys, img)
        return True

    def _tally(self, chunk, pred, conf, py, sumsq, probs) -> None:
        """Add the kept pixels' prediction, confidence, p(label), sum of p**2."""
        c = self.n_classes
        yv, rows, w = chunk.yv, chunk.rows, chunk.w
        wv = None if w is None else (w if rows is None else w[rows])
        correct = pred == yv

        g = self.n_base_bins
        # conf (float32, 24-bit mantissa) * g (< 2**29) is exact in float64, so
        # the floor is the exact bin: coarse equal-width bins that divide the
        # grid agree exactly with binning the raw confidence directly.
        fine = np.minimum((conf * g).astype(np.int64), g - 1)
        hits_split = np.bincount(2 * fine + correct, weights=wv, minlength=2 * g)
        hits_split = hits_split.reshape(g, 2)
        self._top[0] += hits_split.sum(axis=1)
        self._top[2] += hits_split[:, 1]
        self._top[1] += np.bincount(fine, weights=conf if wv is None else conf * wv, minlength=g)

        nll = -np.log(np.maximum(py, NLL_EPS))
        brier = sumsq - 2.0 * py + 1.0
        cm = np.bincount(yv * c + pred, weights=wv, minlength=c * c).reshape(c, c)
        self.confusion_matrix_ += cm
        if wv is None:
            self._nll_sum += float(nll.sum())
            self._brier_sum += float(brier.sum())
            self.total_weight_ += float(yv.size)
        else:
            self._nll_sum += float(nll @ wv)
            self._brier_sum += float(brier @ wv)
            self.total_weight_ += float(wv.sum())
        self.n_pixels_ += int(yv.size)

        if self.classwise:
            self._update_classwise(probs if rows is None else probs[rows], yv, wv)
        if chunk.ids is not None:
            keys, codes = chunk.ids
            if codes is not None and rows is not None:
                codes = codes[rows]
            self._update_images(keys, codes, conf, correct, wv)

    def _check_probs(self, p, rows, conf32, sumsq, in_dtype) -> None:
        # NaN/inf propagate into the sum of squares and the argmax picks NaN,
        # so finiteness needs no extra pass over the chunk.
        if not (np.isfinite(sumsq).all() and np.isfinite(conf32).all()):
            raise ValueError("y_prob contains NaN or infinite values (in non-ignored pixels).")
        # A global min over contiguous memory is cheap; only when it is
        # negative are the non-ignored rows looked at one by one.
        if p.size and p.min() < 0:
            pv = p if rows is None else p[rows]
            rmin = float(pv.min())
        else:
            rmin = 0.0
        self._check_prob_range(rmin, float(conf32.max()))
        rsum = np.einsum("ij->i", p)
        if rows is not None:
            rsum = rsum[rows]
        self._check_row_sums(float(np.abs(rsum - 1.0).max()), in_dtype)

    @staticmethod
    def _check_prob_range(lowest: float, highest: float) -> None:
        if highest > 1.0 + 1e-6 or lowest < 0:
            raise ValueError(
                f"y_prob must be probabilities in [0, 1]; got values in [{lowest:.4g}, "
                f"{highest:.4g}]. Pass softmax(logits), not logits."
            )

    @staticmethod
    def _check_row_sums(worst: float, in_dtype) -> None:
        atol = _ROW_SUM_ATOL.get(np.dtype(in_dtype), _ROW_SUM_ATOL_DEFAULT)
        if worst > atol:
            raise ValueError(
                f"Rows of y_prob must sum to 1; the largest deviation is {worst:.3g} "
                f"(tolerance {atol}). Pass normalised probabilities (softmax over classes)."
            )

    def _update_classwise(self, pv, yv, wv) -> None:
        g, c = self.n_base_bins, self.n_classes
        pv64 = pv.astype(np.float64)
        fine = np.minimum((pv64 * g).astype(np.int64), g - 1)
        fine += (np.arange(c, dtype=np.int64) * g)[None, :]
        flat = fine.ravel()
        if wv is None:
            cnt = np.bincount(flat, minlength=c * g)
            psum = np.bincount(flat, weights=pv64.ravel(), minlength=c * g)
        else:
            cnt = np.bincount(flat, weights=np.repeat(wv, c), minlength=c * g)
            psum = np.bincount(flat, weights=(pv64 * wv[:, None]).ravel(), minlength=c * g)
        lab = np.bincount(fine[np.arange(yv.size), yv], weights=wv, minlength=c * g)
        self._cls[:, 0, :] += cnt.reshape(c, g)
        self._cls[:, 1, :] += psum.reshape(c, g)
        self._cls[:, 2, :] += lab.reshape(c, g)

    def _update_images(self, keys, codes, conf, correct, wv) -> None:
        b = self.per_image_n_bins
        bins = np.minimum((conf * b).astype(np.int64), b - 1)
        w = np.ones_like(conf) if wv is None else wv
        inv = np.zeros(conf.size, dtype=np.int64) if codes is None else codes
        k = len(keys)
        idx = inv * b + bins
        st = np.stack(
            [
                np.bincount(idx, weights=w, minlength=k * b),
                np.bincount(idx, weights=w * conf, minlength=k * b),
                np.bincount(idx, weights=w * correct, minlength=k * b),
            ],
            axis=0,
        ).reshape(3, k, b)
        self._add_image_tallies(keys, st)

    def _add_image_tallies(self, keys, st) -> None:
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
        coarse, _ = _coarsen(self._top, n_bins, strategy)
        return float(_ce_from_bins(coarse, norm))

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
        coarse, _ = _coarsen(self._cls, n_bins, strategy)
        per_class = _ce_from_bins(coarse, norm)
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
        """Mean NLL ``-log(max(p_y, NLL_EPS))`` over the counted pixels."""
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
            k: float(_ce_from_bins(v, "l1")) for k, v in self._images.items() if v[0].sum() > 0
        }

    def mean_per_image_ece(self) -> float:
        """Mean over images of the per-image ECE (NaN when no image ids were given)."""
        vals = list(self.per_image_ece().values())
        return float(np.mean(vals)) if vals else float("nan")

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
        coarse, edges = _coarsen(self._top, n_bins, strategy)
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
        coarse, edges = _coarsen(self._cls, n_bins, strategy)
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


# ---------------------------------------------------------------------------
# one-shot functions
# ---------------------------------------------------------------------------


def _n_classes_of(y_prob) -> int:
    shape = tuple(y_prob.shape) if hasattr(y_prob, "shape") else np.shape(y_prob)
    if len(shape) == 1:
        return 2
    if len(shape) < 1:
        raise ValueError("y_prob must be 1-D, 2-D (n, C) or (N, C, H, W); got a scalar.")
    return int(shape[1])


def _accumulate(
    y_true, y_prob, *, ignore_index, sample_weight=None, classwise=False, n_base_bins=None
) -> CalibrationAccumulator:
    acc = CalibrationAccumulator(
        _n_classes_of(y_prob),
        ignore_index=ignore_index,
        classwise=classwise,
        n_base_bins=DEFAULT_BASE_BINS if n_base_bins is None else n_base_bins,
    )
    if not _is_tensor(y_prob):
        y_prob = np.asarray(y_prob)
    if not _is_tensor(y_true):
        y_true = np.asarray(y_true)
    # update() cuts large input into bounded pieces itself.
    return acc.update(y_true, y_prob, sample_weight=sample_weight)


def _base_for(n_bins: int) -> int:
    # Make the fixed grid a multiple of n_bins so that equal-width bins are exact.
    return DEFAULT_BASE_BINS if DEFAULT_BASE_BINS % n_bins == 0 else n_bins * max(
        1, DEFAULT_BASE_BINS // n_bins
    )


def calibration_error(
    y_true: Any,
    y_prob: Any,
    *,
    n_bins: int = 15,
    norm: str = "l1",
    strategy: str = "uniform",
    ignore_index: int | None = 255,
    sample_weight: Any = None,
) -> float:
    """Top-label calibration error with the chosen norm and binning.

    Parameters
    ----------
    y_true : array-like of shape (n,) or (N, H, W)
        Integer labels; ``ignore_index`` pixels are skipped.
    y_prob : array-like of shape (n, C), (n,) or (N, C, H, W)
        Probabilities (a 1-D array is P(class 1) of a binary problem).
    n_bins : int, default=15
        Number of bins.
    norm : {"l1", "l2", "max"}, default="l1"
        ECE, RMS calibration error or MCE.
    strategy : {"uniform", "quantile"}, default="uniform"
        Equal-width bins (exact) or equal-mass bins (approximated on a grid
        of 3600 bins; see :class:`CalibrationAccumulator`).
    ignore_index : int or None, default=255
        Label of pixels to skip.
    sample_weight : array-like of shape (n,), default=None
        Per-pixel weights.

    Returns
    -------
    error : float

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import calibration_error
    >>> p = np.array([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65]])
    >>> round(calibration_error([0, 1, 1], p, n_bins=10, norm="max"), 3)
    0.85
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight,
        n_base_bins=_base_for(n_bins) if strategy == "uniform" else None,
    )
    return acc.calibration_error(n_bins, norm=norm, strategy=strategy)


def expected_calibration_error(
    y_true: Any,
    y_prob: Any,
    *,
    n_bins: int = 15,
    ignore_index: int | None = 255,
    strategy: str = "uniform",
    sample_weight: Any = None,
) -> float:
    """Top-label expected calibration error (ECE, L1), pooled over pixels.

    ``ECE = sum_b (n_b / n) * |acc_b - conf_b|`` over equal-width bins of the
    top-label confidence ``max_k p_k`` (Guo et al. 2017), the bin ``b`` being
    ``[b / n_bins, (b + 1) / n_bins)`` and the last bin including 1.0.

    Parameters
    ----------
    y_true : array-like of shape (n,) or (N, H, W)
        Integer labels; ``ignore_index`` pixels are skipped.
    y_prob : array-like of shape (n, C), (n,) or (N, C, H, W)
        Probabilities.
    n_bins : int, default=15
        Number of bins.
    ignore_index : int or None, default=255
        Label of pixels to skip.
    strategy : {"uniform", "quantile"}, default="uniform"
        Equal-width bins, or approximately equal-mass bins (the "adaptive
        ECE" of Nguyen & O'Connor 2015 / Mukhoti et al. 2020).
    sample_weight : array-like of shape (n,), default=None
        Per-pixel weights.

    Returns
    -------
    ece : float

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import expected_calibration_error
    >>> p = np.array([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65], [0.5, 0.5]])
    >>> y = np.array([0, 1, 1, 255])
    >>> round(expected_calibration_error(y, p, n_bins=10), 4)
    0.4167
    """
    return calibration_error(
        y_true, y_prob, n_bins=n_bins, norm="l1", strategy=strategy,
        ignore_index=ignore_index, sample_weight=sample_weight,
    )


def rms_calibration_error(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, ignore_index: int | None = 255,
    strategy: str = "uniform", sample_weight: Any = None,
) -> float:
    """Top-label RMS calibration error ``sqrt(sum_b n_b/n (acc_b - conf_b)**2)``.

    Examples
    --------
    >>> from sksegcal.metrics import rms_calibration_error
    >>> round(rms_calibration_error([0, 1], [[0.95, 0.05], [0.75, 0.25]], n_bins=10), 4)
    0.5315
    """
    return calibration_error(
        y_true, y_prob, n_bins=n_bins, norm="l2", strategy=strategy,
        ignore_index=ignore_index, sample_weight=sample_weight,
    )


def maximum_calibration_error(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, ignore_index: int | None = 255,
    strategy: str = "uniform", sample_weight: Any = None,
) -> float:
    """Top-label maximum calibration error ``max_b |acc_b - conf_b|`` (non-empty bins).

    Examples
    --------
    >>> from sksegcal.metrics import maximum_calibration_error
    >>> round(maximum_calibration_error([0, 1], [[0.95, 0.05], [0.75, 0.25]], n_bins=10), 3)
    0.75
    """
    return calibration_error(
        y_true, y_prob, n_bins=n_bins, norm="max", strategy=strategy,
        ignore_index=ignore_index, sample_weight=sample_weight,
    )


def classwise_calibration_error(
    y_true: Any,
    y_prob: Any,
    *,
    n_bins: int = 15,
    norm: str = "l1",
    strategy: str = "uniform",
    ignore_index: int | None = 255,
    sample_weight: Any = None,
    average: bool = True,
) -> float | np.ndarray:
    """Classwise calibration error (Kull et al. 2019), mean over all classes.

    ``(1/C) sum_k sum_b (n_bk / n) |freq_bk - conf_bk|`` where bin ``b`` of
    class ``k`` holds the pixels whose ``p_k`` falls in it, ``conf_bk`` is
    their mean ``p_k`` and ``freq_bk`` the fraction of them labelled ``k``.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import classwise_calibration_error
    >>> p = np.array([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65]])
    >>> round(classwise_calibration_error([0, 1, 1], p, n_bins=10), 4)
    0.4167
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight,
        classwise=True, n_base_bins=_base_for(n_bins) if strategy == "uniform" else None,
    )
    return acc.classwise_calibration_error(n_bins, norm=norm, strategy=strategy, average=average)


def static_calibration_error(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, ignore_index: int | None = 255,
    sample_weight: Any = None,
) -> float:
    """Static calibration error, SCE (Nixon et al. 2019): classwise L1, equal-width bins.

    Not the "SCE" of other libraries (e.g. a "smooth" or "squared" error):
    see ``docs/metrics.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import static_calibration_error
    >>> p = np.array([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65]])
    >>> round(static_calibration_error([0, 1, 1], p, n_bins=10), 4)
    0.4167
    """
    return classwise_calibration_error(
        y_true, y_prob, n_bins=n_bins, norm="l1", strategy="uniform",
        ignore_index=ignore_index, sample_weight=sample_weight,
    )


def adaptive_calibration_error(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, ignore_index: int | None = 255,
    sample_weight: Any = None,
) -> float:
    """Adaptive calibration error, ACE (Nixon et al. 2019): classwise, equal-mass bins.

    Equal-mass bins are approximated on a grid of 3600 bins (see
    :class:`CalibrationAccumulator`). Not netcal's ACE ("average calibration
    error") nor the top-label "adaptive ECE"; see ``docs/metrics.md``.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import adaptive_calibration_error
    >>> p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    >>> ace = adaptive_calibration_error([0, 1, 1], p, n_bins=3)
    >>> 0 <= ace <= 1
    True
    """
    return classwise_calibration_error(
        y_true, y_prob, n_bins=n_bins, norm="l1", strategy="quantile",
        ignore_index=ignore_index, sample_weight=sample_weight,
    )


def negative_log_likelihood(
    y_true: Any, y_prob: Any, *, ignore_index: int | None = 255, sample_weight: Any = None
) -> float:
    """Mean negative log-likelihood of the true labels (natural log).

    ``-mean(log(max(p_y, NLL_EPS)))`` with ``NLL_EPS = finfo(float32).eps``.
    Equals :func:`sklearn.metrics.log_loss` on the non-ignored pixels up to
    float32 rounding (log_loss also clips from above at ``1 - eps``).

    Examples
    --------
    >>> from sksegcal.metrics import negative_log_likelihood
    >>> round(negative_log_likelihood([0, 1, 255], [[0.5, 0.5], [0.2, 0.8], [1, 0]]), 4)
    0.4581
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight, n_base_bins=1
    )
    return acc.negative_log_likelihood()


def brier_score(
    y_true: Any, y_prob: Any, *, ignore_index: int | None = 255, sample_weight: Any = None
) -> float:
    """Multi-class Brier score ``mean_i sum_k (p_ik - [y_i == k])**2`` (range [0, 2]).

    Same as :func:`sklearn.metrics.brier_score_loss` with multi-class input
    (``scale_by_half=False``); for two classes it is twice the usual binary
    Brier score.

    Examples
    --------
    >>> from sksegcal.metrics import brier_score
    >>> round(brier_score([0, 1, 255], [[0.5, 0.5], [0.2, 0.8], [1, 0]]), 4)
    0.29
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight, n_base_bins=1
    )
    return acc.brier_score()


def pixel_accuracy(
    y_true: Any, y_prob: Any, *, ignore_index: int | None = 255, sample_weight: Any = None
) -> float:
    """Fraction of non-ignored pixels whose argmax equals the label.

    Examples
    --------
    >>> from sksegcal.metrics import pixel_accuracy
    >>> pixel_accuracy([0, 1, 255], [[0.6, 0.4], [0.7, 0.3], [1, 0]])
    0.5
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight, n_base_bins=1
    )
    return acc.accuracy()


def mean_iou(
    y_true: Any, y_prob: Any, *, ignore_index: int | None = 255, sample_weight: Any = None
) -> float:
    """Mean intersection over union of the argmax segmentation.

    Classes that are neither in the labels nor predicted are left out of the
    mean (mmsegmentation's convention).

    Examples
    --------
    >>> from sksegcal.metrics import mean_iou
    >>> round(mean_iou([0, 1, 1, 255], [[0.6, 0.4], [0.7, 0.3], [0.1, 0.9], [1, 0]]), 4)
    0.5
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight, n_base_bins=1
    )
    return acc.mean_iou()


def reliability_curve(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, strategy: str = "uniform",
    ignore_index: int | None = 255, sample_weight: Any = None,
) -> Bunch:
    """Top-label reliability curve; see :meth:`CalibrationAccumulator.reliability_curve`.

    Examples
    --------
    >>> from sksegcal.metrics import reliability_curve
    >>> curve = reliability_curve([0, 1], [[0.95, 0.05], [0.75, 0.25]], n_bins=10)
    >>> curve.count[[7, 9]].tolist(), curve.accuracy[[7, 9]].tolist()
    ([1.0, 1.0], [0.0, 1.0])
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight,
        n_base_bins=_base_for(n_bins) if strategy == "uniform" else None,
    )
    return acc.reliability_curve(n_bins, strategy=strategy)


# ---------------------------------------------------------------------------
# misprediction detection
# ---------------------------------------------------------------------------


def misprediction_detection_scores(
    correct: Any, p_correct: Any, *, sample_weight: Any = None, tpr_level: float = 0.95
) -> dict[str, float]:
    """How well a score separates correct from mispredicted pixels.

    Parameters
    ----------
    correct : array-like of shape (n,)
        1 (or True) where the segmentation model's argmax equals the label.
    p_correct : array-like of shape (n,)
        The correctness classifier's score that a pixel is correct (higher
        means more likely correct; need not be a probability).
    sample_weight : array-like of shape (n,), default=None
        Per-pixel weights.
    tpr_level : float, default=0.95
        True-positive rate at which ``fpr_at_95_tpr`` is read.

    Returns
    -------
    scores : dict
        ``auroc``: area under the ROC curve with "correct" as the positive
        class (what the paper reports); ``aupr_error``: average precision of
        detecting mispredictions from ``-p_correct``; ``aupr_correct``: average
        precision of "correct"; ``fpr_at_95_tpr``: fraction of mispredicted
        pixels accepted as correct at the first threshold accepting at least
        95% of the correct ones (Hendrycks & Gimpel 2017); ``error_rate``:
        weighted fraction of mispredicted pixels.

    Examples
    --------
    >>> from sksegcal.metrics import misprediction_detection_scores
    >>> s = misprediction_detection_scores([1, 1, 0, 1, 0], [0.9, 0.8, 0.3, 0.6, 0.7])
    >>> round(s["auroc"], 4), round(s["aupr_error"], 4), s["fpr_at_95_tpr"]
    (0.8333, 0.8333, 0.5)
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    c = np.asarray(correct).reshape(-1)
    s = np.asarray(p_correct, dtype=np.float64).reshape(-1)
    if c.shape != s.shape:
        raise ValueError(
            f"Shape mismatch: correct has {c.size} values but p_correct has {s.size}."
        )
    if c.dtype.kind == "f" and not np.all((c == 0) | (c == 1)):
        raise ValueError("correct must be binary (0/1 or bool).")
    c = c.astype(bool)
    if not np.all(np.isfinite(s)):
        raise ValueError("p_correct contains NaN or infinite values.")
    if c.all() or not c.any():
        raise ValueError(
            "Misprediction detection needs both correct and mispredicted pixels; "
            f"got only {'correct' if c.any() else 'mispredicted'} ones."
        )
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    fpr, tpr, _ = roc_curve(c, s, sample_weight=w, drop_intermediate=False)
    i = int(np.searchsorted(tpr, tpr_level, side="left"))
    return {
        "auroc": float(roc_auc_score(c, s, sample_weight=w)),
        "aupr_error": float(average_precision_score(~c, -s, sample_weight=w)),
        "aupr_correct": float(average_precision_score(c, s, sample_weight=w)),
        "fpr_at_95_tpr": float(fpr[min(i, fpr.size - 1)]),
        "error_rate": float(np.average(~c, weights=w)),
    }


# ---------------------------------------------------------------------------
# scikit-learn scorers
# ---------------------------------------------------------------------------

#: Scorer for ``GridSearchCV(scoring=ece_scorer)``: minus the 15-bin top-label ECE.
ece_scorer = make_scorer(
    expected_calibration_error, response_method="predict_proba", greater_is_better=False
)
#: Scorer: minus the mean NLL of the non-ignored pixels.
nll_scorer = make_scorer(
    negative_log_likelihood, response_method="predict_proba", greater_is_better=False
)
#: Scorer: minus the multi-class Brier score of the non-ignored pixels.
brier_scorer = make_scorer(brier_score, response_method="predict_proba", greater_is_better=False)
_mce_scorer = make_scorer(
    maximum_calibration_error, response_method="predict_proba", greater_is_better=False
)
_rms_scorer = make_scorer(
    rms_calibration_error, response_method="predict_proba", greater_is_better=False
)
_sce_scorer = make_scorer(
    static_calibration_error, response_method="predict_proba", greater_is_better=False
)
_acc_scorer = make_scorer(pixel_accuracy, response_method="predict_proba")
_miou_scorer = make_scorer(mean_iou, response_method="predict_proba")

_SCORERS = {
    "neg_expected_calibration_error": ece_scorer,
    "neg_negative_log_likelihood": nll_scorer,
    "neg_brier_score": brier_scorer,
    "neg_maximum_calibration_error": _mce_scorer,
    "neg_rms_calibration_error": _rms_scorer,
    "neg_static_calibration_error": _sce_scorer,
    "pixel_accuracy": _acc_scorer,
    "mean_iou": _miou_scorer,
}
_ALIASES = {
    "ece": "neg_expected_calibration_error",
    "neg_ece": "neg_expected_calibration_error",
    "expected_calibration_error": "neg_expected_calibration_error",
    "nll": "neg_negative_log_likelihood",
    "neg_nll": "neg_negative_log_likelihood",
    "negative_log_likelihood": "neg_negative_log_likelihood",
    "brier": "neg_brier_score",
    "brier_score": "neg_brier_score",
    "mce": "neg_maximum_calibration_error",
    "neg_mce": "neg_maximum_calibration_error",
    "rmsce": "neg_rms_calibration_error",
    "neg_rmsce": "neg_rms_calibration_error",
    "sce": "neg_static_calibration_error",
    "neg_sce": "neg_static_calibration_error",
    "accuracy": "pixel_accuracy",
    "miou": "mean_iou",
}


def get_scorer_names() -> list[str]:
    """Names :func:`get_scorer` resolves to sksegcal scorers (aliases included)."""
    return sorted([*_SCORERS, *_ALIASES])


def get_scorer(scoring: Any):
    """Return a scorer by name: ours first, then scikit-learn's.

    Our scorers ignore pixels labelled 255 and are negated losses (greater is
    better), ready for ``GridSearchCV``. Pass them as objects, not strings,
    since scikit-learn's string registry does not know them::

        GridSearchCV(est, grid, scoring=get_scorer("ece"))
        GridSearchCV(est, grid, scoring={"ece": get_scorer("ece"),
                                         "nll": get_scorer("nll")}, refit="ece")

    Parameters
    ----------
    scoring : str, callable or None
        A name from :func:`get_scorer_names` (e.g. ``"ece"``,
        ``"neg_expected_calibration_error"``, ``"nll"``,
        ``"neg_negative_log_likelihood"``, ``"brier"``), any name
        :func:`sklearn.metrics.get_scorer` knows (those do *not* skip label
        255), or a callable / None, returned as scikit-learn would.

    Returns
    -------
    scorer : callable

    Examples
    --------
    >>> from sksegcal.metrics import get_scorer, ece_scorer
    >>> get_scorer("ece") is ece_scorer
    True
    """
    if isinstance(scoring, str):
        key = _ALIASES.get(scoring, scoring)
        if key in _SCORERS:
            return _SCORERS[key]
        try:
            from sklearn.metrics import get_scorer as _sk_get_scorer

            return _sk_get_scorer(scoring)
        except ValueError:
            raise ValueError(
                f"{scoring!r} is not a valid scoring name. sksegcal names: "
                f"{get_scorer_names()}; or any sklearn.metrics.get_scorer_names() entry."
            ) from None
    from sklearn.metrics import get_scorer as _sk_get_scorer

    return _sk_get_scorer(scoring)

