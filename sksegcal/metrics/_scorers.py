"""scikit-learn scorers of the metrics, for ``GridSearchCV(scoring=...)``.

A scorer is called as ``scorer(estimator, X, y_true, sample_weight=None)``.
It scores ``estimator.predict_proba(X)``; the metrics that depend on the
predicted class (ECE, MCE, RMS, accuracy, mIoU) take it from
``estimator.predict(X)``, which for sksegcal's calibrators is the model's own
prediction (the argmax of the logits), so an exactly uniform calibrated row
(a huge temperature) keeps the model's class rather than class 0. They ignore
pixels labelled 255.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._functions import (
    brier_score,
    expected_calibration_error,
    maximum_calibration_error,
    mean_iou,
    negative_log_likelihood,
    pixel_accuracy,
    rms_calibration_error,
    static_calibration_error,
)


def _predicted_classes(estimator, X) -> np.ndarray | None:
    """``estimator.predict(X)`` as class indices 0..C-1, or None where it cannot be."""
    predict = getattr(estimator, "predict", None)
    if predict is None:
        return None
    pred = np.asarray(predict(X)).reshape(-1)
    classes = getattr(estimator, "classes_", None)
    if classes is None or np.array_equal(classes, np.arange(len(classes))):
        return pred if pred.dtype.kind in "iu" else None
    # labels other than 0..C-1: their positions in classes_ (sorted, as scikit-learn keeps)
    classes = np.asarray(classes)
    idx = np.clip(np.searchsorted(classes, pred), 0, len(classes) - 1)
    return idx if np.array_equal(classes[idx], pred) else None


class _SegmentationScorer:
    """A picklable scorer: ``sign * score_func(y_true, predict_proba(X), ...)``.

    With ``uses_prediction`` the estimator's ``predict(X)`` goes in as
    ``y_pred`` (a ``y_pred=`` keyword given to the call takes precedence).
    """

    _response_method = "predict_proba"

    def __init__(self, score_func, *, greater_is_better: bool, uses_prediction: bool):
        self._score_func = score_func
        self._sign = 1 if greater_is_better else -1
        self._uses_prediction = uses_prediction
        self._kwargs: dict[str, Any] = {}

    def __call__(self, estimator, X, y_true, sample_weight=None, *, y_pred=None) -> float:
        y_prob = estimator.predict_proba(X)
        params: dict[str, Any] = {}
        if sample_weight is not None:
            params["sample_weight"] = sample_weight
        if self._uses_prediction:
            params["y_pred"] = _predicted_classes(estimator, X) if y_pred is None else y_pred
        return self._sign * float(self._score_func(y_true, y_prob, **params))

    def __repr__(self) -> str:
        sign = "" if self._sign > 0 else ", greater_is_better=False"
        pred = ", y_pred=estimator.predict" if self._uses_prediction else ""
        return f"scorer({self._score_func.__name__}{sign}, response_method='predict_proba'{pred})"


def _loss(func, uses_prediction=True):
    return _SegmentationScorer(func, greater_is_better=False, uses_prediction=uses_prediction)


#: Scorer for ``GridSearchCV(scoring=ece_scorer)``: minus the 15-bin top-label ECE.
ece_scorer = _loss(expected_calibration_error)
#: Scorer: minus the mean NLL of the non-ignored pixels.
nll_scorer = _loss(negative_log_likelihood, uses_prediction=False)
#: Scorer: minus the multi-class Brier score of the non-ignored pixels.
brier_scorer = _loss(brier_score, uses_prediction=False)

_SCORERS = {
    "neg_expected_calibration_error": ece_scorer,
    "neg_negative_log_likelihood": nll_scorer,
    "neg_brier_score": brier_scorer,
    "neg_maximum_calibration_error": _loss(maximum_calibration_error),
    "neg_rms_calibration_error": _loss(rms_calibration_error),
    "neg_static_calibration_error": _loss(static_calibration_error, uses_prediction=False),
    "pixel_accuracy": _SegmentationScorer(
        pixel_accuracy, greater_is_better=True, uses_prediction=True
    ),
    "mean_iou": _SegmentationScorer(mean_iou, greater_is_better=True, uses_prediction=True),
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
    from sklearn.metrics import get_scorer as _sk_get_scorer

    if isinstance(scoring, str):
        key = _ALIASES.get(scoring, scoring)
        if key in _SCORERS:
            return _SCORERS[key]
        try:
            return _sk_get_scorer(scoring)
        except ValueError:
            raise ValueError(
                f"{scoring!r} is not a valid scoring name. sksegcal names: "
                f"{get_scorer_names()}; or any sklearn.metrics.get_scorer_names() entry."
            ) from None
    return _sk_get_scorer(scoring)
