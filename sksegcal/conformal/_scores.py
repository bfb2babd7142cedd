"""Nonconformity scores of one chunk of probabilities, and their integer levels.

A score ``s(x, k)`` in [0, 1] says how unusual class ``k`` is for pixel ``x``;
a prediction set holds the classes whose score is at most a threshold. Every
threshold in this package is an integer *level* of a fixed grid of
``n_bins`` steps: ``level(s) = ceil(s * n_bins)``, in ``0 .. n_bins``. A class is
in the set at level ``t`` when ``level(s(x, k)) <= t``. Calibration and
prediction apply the same map, so the level is itself a valid conformal score
(the finite-sample guarantee holds for it exactly), and since ``ceil`` never
rounds down, the set at the level of the exact quantile contains the set at the
exact quantile: the rounding can only add coverage (``docs/conformal.md``).
"""

from __future__ import annotations

import numpy as np

#: The score functions, by the names the estimators' ``score`` parameter takes.
SCORES = ("lac", "aps")


def lac_scores(proba: np.ndarray) -> np.ndarray:
    """LAC scores ``1 - p_k`` of every class (Sadinle, Lei & Wasserman 2019).

    Parameters
    ----------
    proba : ndarray of shape (n, C)
        Probabilities.

    Returns
    -------
    scores : ndarray of shape (n, C), in [0, 1]

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import lac_scores
    >>> lac_scores(np.array([[0.7, 0.2, 0.1]])).round(2).tolist()
    [[0.3, 0.8, 0.9]]
    """
    proba = np.asarray(proba)
    return np.clip(1.0 - proba, 0.0, 1.0)


def aps_scores(proba: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
    """APS scores: the probability mass ranked up to each class (Romano et al. 2020).

    Classes are ranked by decreasing probability (ties by class index). With
    ``u`` given (one uniform draw per row), the score of class ``k`` is the
    mass of the classes ranked before it plus ``u * p_k``: Romano, Sesia &
    Candès' randomised score, whose sets may be empty and whose coverage is
    exact up to ties. Without ``u`` the score is the mass up to and including
    ``k``, except for the top class, whose score is 0: the deterministic
    variant, whose sets always hold the predicted class.

    Parameters
    ----------
    proba : ndarray of shape (n, C)
    u : ndarray of shape (n,), optional
        Uniform draws in [0, 1).

    Returns
    -------
    scores : ndarray of shape (n, C), in [0, 1]

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import aps_scores
    >>> aps_scores(np.array([[0.2, 0.7, 0.1]])).round(2).tolist()
    [[0.9, 0.0, 1.0]]
    """
    proba = np.asarray(proba)
    order = np.argsort(-proba, axis=1, kind="stable")
    ranked = np.take_along_axis(proba, order, axis=1)
    cum = np.cumsum(ranked, axis=1)
    if u is None:
        cum[:, 0] = 0.0  # the top class is always in the set
    else:
        cum -= (1.0 - np.asarray(u, dtype=cum.dtype)[:, None]) * ranked
    scores = np.empty_like(cum)
    np.put_along_axis(scores, order, cum, axis=1)
    # rounding can carry the last cumulative sum a little above 1
    return np.clip(scores, 0.0, 1.0, out=scores)


def class_scores(proba: np.ndarray, score: str, u: np.ndarray | None = None) -> np.ndarray:
    """The scores of every class under the score function named ``score``."""
    if score == "lac":
        return lac_scores(proba)
    return aps_scores(proba, u)


def to_levels(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """``ceil(scores * n_bins)`` as int32 in ``0 .. n_bins``: never below the score.

    The product is taken in float64, exact for float32 scores and a power-of-two
    ``n_bins`` (the default 2**16).
    """
    levels = np.ceil(np.asarray(scores, dtype=np.float64) * n_bins)
    np.clip(levels, 0, n_bins, out=levels)
    return levels.astype(np.int32)
