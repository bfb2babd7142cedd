"""The predictive entropy and the top-2 margin of softmax probabilities, defined once.

Every NumPy computation of these two numbers in the package calls the functions here: the
detector's class-agnostic features (:func:`sksegcal.features.make_features`), Meta-Cal's
rejection score, local temperature scaling's confidence inputs and the spatial context's
per-pixel statistics.

- :func:`entropy` and :func:`top2_margin` take log-probabilities (a log-softmax), the
  package's form of a probability vector: ``H = -sum_k p_k log p_k`` in nats, with
  ``0 log 0 = 0``, and ``p1 - p2``, the gap between the two largest probabilities (``p1``
  for a single class). They compute in the dtype of their input.
- :func:`entropy_from_sums` and :func:`margin_from_sums` are the same two numbers from the
  sums of shifted exponentials that the compiled row loops (and their NumPy twin in
  :mod:`sksegcal.context`) accumulate without a log-softmax table: with ``d = z - max(z)``,
  ``S = sum exp(d)`` and ``W = sum exp(d) d``, ``H = log S - W / S`` and
  ``p1 - p2 = (1 - exp(d2)) / S``. They agree with the first pair to float rounding (tested).

The exported torch modules compute the same two numbers with tensor operations
(``sksegcal.deployment._functional``), since a TorchScript or ONNX graph cannot call NumPy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["entropy", "entropy_from_sums", "margin_from_sums", "top2_margin"]

# exp() of anything below is exactly 0 in float32 and float64 (float64 underflows near
# -745): flooring there changes no term p log p, and a log-probability of -inf (an exact 0)
# gives 0 log 0 = 0 instead of 0 * -inf = NaN
_LOG_ZERO = -1e4


def entropy(log_proba: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of the distributions ``exp(log_proba)`` along ``axis``.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal._uncertainty import entropy
    >>> entropy(np.log([[0.5, 0.5], [0.9, 0.1]])).round(6).tolist()
    [0.693147, 0.325083]
    """
    lp = np.maximum(log_proba, _LOG_ZERO)
    p = np.exp(lp)
    p *= lp
    return -p.sum(axis=axis)


def top2_margin(log_proba: np.ndarray, axis: int = -1) -> np.ndarray:
    """``p1 - p2`` of the distributions ``exp(log_proba)`` along ``axis``; ``p1`` for one class.

    Only the two largest entries matter: the columns of the top-k log-probabilities give
    the same margin as the whole vector.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal._uncertainty import top2_margin
    >>> top2_margin(np.log([[0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])).round(6).tolist()
    [0.5, 0.1]
    """
    lp = np.asarray(log_proba)
    n = lp.shape[axis]
    if n == 1:
        return np.exp(np.take(lp, 0, axis=axis))
    top = np.partition(lp, (n - 2, n - 1), axis=axis)
    return np.exp(np.take(top, n - 1, axis=axis)) - np.exp(np.take(top, n - 2, axis=axis))


def entropy_from_sums(total: np.ndarray, weighted: np.ndarray) -> np.ndarray:
    """:func:`entropy` from ``S = sum exp(d)`` and ``W = sum exp(d) d``, ``d = z - max(z)``."""
    return np.log(total) - weighted / total


def margin_from_sums(total: np.ndarray, second: np.ndarray | float) -> np.ndarray:
    """:func:`top2_margin` from ``S = sum exp(d)`` and ``second = exp(d2)``.

    ``d2`` is the second largest ``d = z - max(z)``; ``second`` is 0 for a single class.
    """
    return (1.0 - second) / total
