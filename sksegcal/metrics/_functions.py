"""One-shot metric functions: one accumulator filled with the whole input, then read.

Each function feeds its input through a :class:`CalibrationAccumulator` (in
bounded-memory pieces), so one-shot and streaming results agree exactly. The
equal-width ones build a fine grid that ``n_bins`` divides, so their bins are
exact whatever ``n_bins``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.utils import Bunch

from ._accumulator import CalibrationAccumulator
from ._binning import DEFAULT_BASE_BINS, base_bins_for
from ._inputs import check_n_bins, is_tensor, n_classes_of


def _accumulate(
    y_true,
    y_prob,
    *,
    ignore_index,
    sample_weight=None,
    y_pred=None,
    classwise=False,
    n_base_bins=None,
) -> CalibrationAccumulator:
    acc = CalibrationAccumulator(
        n_classes_of(y_prob),
        ignore_index=ignore_index,
        classwise=classwise,
        n_base_bins=DEFAULT_BASE_BINS if n_base_bins is None else n_base_bins,
    )
    if not is_tensor(y_prob):
        y_prob = np.asarray(y_prob)
    if not is_tensor(y_true):
        y_true = np.asarray(y_true)
    # update() cuts large input into bounded pieces itself.
    return acc.update(y_true, y_prob, sample_weight=sample_weight, y_pred=y_pred)


def calibration_error(
    y_true: Any,
    y_prob: Any,
    *,
    n_bins: int = 15,
    norm: str = "l1",
    strategy: str = "uniform",
    ignore_index: int | None = 255,
    sample_weight: Any = None,
    y_pred: Any = None,
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
        Non-negative per-pixel weights.
    y_pred : array-like of shape (n,) or (N, H, W), default=None
        The predicted class of each pixel; by default the argmax of
        ``y_prob``. Pass the model's own prediction when calibration keeps it
        (every temperature method does): a calibrated row that is exactly
        uniform then keeps the model's class instead of class 0. The
        confidence is the probability of this class.

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
    n_bins = check_n_bins(n_bins)
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight,
        y_pred=y_pred, n_base_bins=base_bins_for(n_bins) if strategy == "uniform" else None,
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
    y_pred: Any = None,
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
        Non-negative per-pixel weights.
    y_pred : array-like of shape (n,) or (N, H, W), default=None
        The predicted class of each pixel (default: the argmax of ``y_prob``);
        see :func:`calibration_error`.

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
        ignore_index=ignore_index, sample_weight=sample_weight, y_pred=y_pred,
    )


def rms_calibration_error(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, ignore_index: int | None = 255,
    strategy: str = "uniform", sample_weight: Any = None, y_pred: Any = None,
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
        ignore_index=ignore_index, sample_weight=sample_weight, y_pred=y_pred,
    )


def maximum_calibration_error(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, ignore_index: int | None = 255,
    strategy: str = "uniform", sample_weight: Any = None, y_pred: Any = None,
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
        ignore_index=ignore_index, sample_weight=sample_weight, y_pred=y_pred,
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
    n_bins = check_n_bins(n_bins)
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight,
        classwise=True, n_base_bins=base_bins_for(n_bins) if strategy == "uniform" else None,
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

    ``-mean(log(max(p_y, tiny)))`` with ``tiny = np.finfo(y_prob.dtype).tiny``,
    the smallest normal number of the input's dtype (1.18e-38 for float32,
    2.2e-308 for float64, 6.1e-5 for float16): an over-confident model's
    NLL is not capped by the clip. Equals :func:`sklearn.metrics.log_loss`
    on the non-ignored pixels wherever ``eps <= p_y <= 1 - eps`` (log_loss
    clips at the dtype's ``eps``), up to float32 rounding of ``p_y``.

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
    y_true: Any,
    y_prob: Any,
    *,
    ignore_index: int | None = 255,
    sample_weight: Any = None,
    y_pred: Any = None,
) -> float:
    """Fraction of non-ignored pixels whose predicted class equals the label.

    The prediction is ``y_pred`` when given (pass the model's own prediction:
    an exactly uniform calibrated row then keeps it), else the argmax of
    ``y_prob``.

    Examples
    --------
    >>> from sksegcal.metrics import pixel_accuracy
    >>> pixel_accuracy([0, 1, 255], [[0.6, 0.4], [0.7, 0.3], [1, 0]])
    0.5
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight, y_pred=y_pred,
        n_base_bins=1,
    )
    return acc.accuracy()


def mean_iou(
    y_true: Any,
    y_prob: Any,
    *,
    ignore_index: int | None = 255,
    sample_weight: Any = None,
    y_pred: Any = None,
) -> float:
    """Mean intersection over union of the predicted segmentation.

    The prediction is ``y_pred`` when given, else the argmax of ``y_prob``
    (see :func:`pixel_accuracy`).

    Classes that are neither in the labels nor predicted are left out of the
    mean (mmsegmentation's convention).

    Examples
    --------
    >>> from sksegcal.metrics import mean_iou
    >>> round(mean_iou([0, 1, 1, 255], [[0.6, 0.4], [0.7, 0.3], [0.1, 0.9], [1, 0]]), 4)
    0.5
    """
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight, y_pred=y_pred,
        n_base_bins=1,
    )
    return acc.mean_iou()


def reliability_curve(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, strategy: str = "uniform",
    ignore_index: int | None = 255, sample_weight: Any = None, y_pred: Any = None,
) -> Bunch:
    """Top-label reliability curve; see :meth:`CalibrationAccumulator.reliability_curve`.

    Examples
    --------
    >>> from sksegcal.metrics import reliability_curve
    >>> curve = reliability_curve([0, 1], [[0.95, 0.05], [0.75, 0.25]], n_bins=10)
    >>> curve.count[[7, 9]].tolist(), curve.accuracy[[7, 9]].tolist()
    ([1.0, 1.0], [0.0, 1.0])
    """
    n_bins = check_n_bins(n_bins)
    acc = _accumulate(
        y_true, y_prob, ignore_index=ignore_index, sample_weight=sample_weight,
        y_pred=y_pred, n_base_bins=base_bins_for(n_bins) if strategy == "uniform" else None,
    )
    return acc.reliability_curve(n_bins, strategy=strategy)
