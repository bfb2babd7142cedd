"""How well a correctness score separates correct from mispredicted pixels."""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np

from ._inputs import check_sample_weight, is_tensor, to_numpy


def _check_correct(correct: Any) -> np.ndarray:
    """A flat bool array, from bools or from numbers that are all 0 or 1."""
    c = to_numpy(correct, "correct") if is_tensor(correct) else np.asarray(correct)
    c = c.reshape(-1)
    if c.dtype.kind == "b":
        return c
    if c.dtype.kind in "iuf":
        if np.all((c == 0) | (c == 1)):
            return c.astype(bool)
        bad = np.unique(c[(c != 0) & (c != 1)])[:5].tolist()
        raise ValueError(
            f"correct must be binary (bool, or 0/1 numbers); got values {bad}. Pass "
            "y_pred == y_true, not the labels or the predictions themselves."
        )
    raise ValueError(
        f"correct must be binary (bool, or 0/1 numbers); got dtype {c.dtype}. Pass "
        "y_pred == y_true."
    )


def misprediction_detection_scores(
    correct: Any, p_correct: Any, *, sample_weight: Any = None, tpr_level: float = 0.95
) -> dict[str, float]:
    """How well a score separates correct from mispredicted pixels.

    Parameters
    ----------
    correct : array-like of shape (n,)
        True (or 1) where the segmentation model's argmax equals the label,
        False (or 0) elsewhere; anything else raises.
    p_correct : array-like of shape (n,)
        The correctness classifier's score that a pixel is correct (higher
        means more likely correct; need not be a probability).
    sample_weight : array-like of shape (n,), default=None
        Non-negative per-pixel weights.
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

    c = _check_correct(correct)
    s = np.asarray(p_correct, dtype=np.float64).reshape(-1)
    if c.shape != s.shape:
        raise ValueError(
            f"Shape mismatch: correct has {c.size} values but p_correct has {s.size}."
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("p_correct contains NaN or infinite values.")
    if isinstance(tpr_level, bool) or not (isinstance(tpr_level, Real) and 0 < tpr_level <= 1):
        raise ValueError(f"tpr_level must be a number in (0, 1]; got {tpr_level!r}.")
    if c.all() or not c.any():
        raise ValueError(
            "Misprediction detection needs both correct and mispredicted pixels; "
            f"got only {'correct' if c.any() else 'mispredicted'} ones."
        )
    w = None if sample_weight is None else check_sample_weight(sample_weight, c.size, "correct")
    fpr, tpr, _ = roc_curve(c, s, sample_weight=w, drop_intermediate=False)
    i = int(np.searchsorted(tpr, tpr_level, side="left"))
    return {
        "auroc": float(roc_auc_score(c, s, sample_weight=w)),
        "aupr_error": float(average_precision_score(~c, -s, sample_weight=w)),
        "aupr_correct": float(average_precision_score(c, s, sample_weight=w)),
        "fpr_at_95_tpr": float(fpr[min(i, fpr.size - 1)]),
        "error_rate": float(np.average(~c, weights=w)),
    }
