"""ScoreHistogram: the fixed-size, mergeable state that split-conformal thresholds come from.

The exact split-conformal threshold is an order statistic of the calibration
scores, which would mean keeping every pixel's score. Counting the scores'
integer levels (:func:`~sksegcal.conformal._scores.to_levels`) instead gives
the same order statistic of the levels exactly, from ``n_bins + 1`` counts
whatever the pixel count; two histograms filled on disjoint data add up to the
one a single pass would give.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any

import numpy as np

from .._safety import check_counts, exact_int

DEFAULT_N_BINS = 2**16


#: finer grids than float32 scores resolve only cost memory (2**24 bins: 128 MiB a state)
MAX_N_BINS = 2**24


def check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return exact_int(n_bins, "n_bins", low=1, high=MAX_N_BINS)


def check_alpha(alpha) -> Fraction:
    """``alpha`` as an exact fraction (0.1 is 1/10, not the binary float near it)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}.")
    # the decimal the user wrote: ceil((n + 1) * (1 - alpha)) must not be pushed over an
    # integer by the binary rounding of 0.1 or 0.05
    return Fraction(repr(float(alpha)))


def conformal_rank(n: int, alpha) -> int:
    """``ceil((n + 1) * (1 - alpha))``: the rank of the split-conformal quantile.

    Above ``n`` when there are too few calibration scores for ``alpha``
    (``n < 1 / alpha - 1``): the threshold is then infinite.
    """
    return math.ceil((n + 1) * (1 - check_alpha(alpha)))


class ScoreHistogram:
    """Counts of calibration scores on a fixed grid: the state of split-conformal sets.

    Parameters
    ----------
    n_bins : int, default=65536
        Grid steps on [0, 1]; a score ``s`` is counted at level
        ``ceil(s * n_bins)``. The state is ``n_bins + 1`` float64 counts
        (512 KiB at the default), independent of the number of scores.

    Attributes
    ----------
    counts_ : ndarray of shape (n_bins + 1,), float64
        How many scores fell on each level (exact integers up to 2**53).
    n_ : int
        Number of scores counted.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import ScoreHistogram
    >>> scores = np.array([0.05, 0.2, 0.4, 0.1, 0.3, 0.9, 0.15, 0.6, 0.25])
    >>> h = ScoreHistogram(n_bins=100).update(scores)
    >>> h.threshold(0.2)  # the ceil(10 * 0.8) = 8th smallest score
    0.6
    """

    def __init__(self, n_bins: int = DEFAULT_N_BINS) -> None:
        self.n_bins = check_n_bins(n_bins)
        self.counts_ = np.zeros(self.n_bins + 1)
        self.n_ = 0

    def update(self, scores: np.ndarray) -> ScoreHistogram:
        """Count scores in [0, 1] (values outside are clipped). Returns self."""
        from ._scores import to_levels

        return self.update_levels(to_levels(np.asarray(scores).ravel(), self.n_bins))

    def update_levels(self, levels: np.ndarray) -> ScoreHistogram:
        """Count integer levels in ``0 .. n_bins`` (as :func:`to_levels` gives). Returns self."""
        levels = np.asarray(levels).ravel()
        if levels.size:
            if levels.min() < 0 or levels.max() > self.n_bins:
                raise ValueError(f"levels must lie in [0, {self.n_bins}].")
            self.counts_ += np.bincount(levels, minlength=self.n_bins + 1)
            self.n_ += int(levels.size)
        return self

    def merge(self, other: ScoreHistogram) -> ScoreHistogram:
        """Add the counts of ``other`` (same ``n_bins``), in place. Returns self."""
        if not isinstance(other, ScoreHistogram):
            raise TypeError(f"Can only merge a ScoreHistogram; got {type(other).__name__}.")
        if other.n_bins != self.n_bins:
            raise ValueError(
                f"Cannot merge histograms of {self.n_bins} and {other.n_bins} bins; build "
                "both with the same n_bins."
            )
        self.counts_ += other.counts_
        self.n_ += other.n_
        return self

    def threshold_level(self, alpha) -> int | None:
        """The level of the ``ceil((n + 1)(1 - alpha))``-th smallest score, or None if infinite.

        None (no finite threshold: every class goes into every set) when
        ``n < 1 / alpha - 1``.
        """
        k = conformal_rank(self.n_, alpha)
        if self.n_ == 0 or k > self.n_:
            return None
        return int(np.searchsorted(np.cumsum(self.counts_), k, side="left"))

    def threshold(self, alpha) -> float:
        """The split-conformal threshold on the scores, rounded up to the grid (inf if none).

        Never below the exact ``ceil((n + 1)(1 - alpha)) / n`` empirical
        quantile of the scores counted, and less than one grid step above it.
        """
        level = self.threshold_level(alpha)
        return math.inf if level is None else level / self.n_bins

    def state_dict(self) -> dict[str, Any]:
        """The counts and settings as plain values (``np.savez`` stores them without pickle)."""
        return {"n_bins": self.n_bins, "n": self.n_, "counts": self.counts_.copy()}

    @classmethod
    def from_state_dict(cls, state) -> ScoreHistogram:
        """Rebuild a histogram from :meth:`state_dict`, checking every value."""
        try:
            n_bins, counts = exact_int(state["n_bins"], "n_bins", low=1), state["counts"]
            n = exact_int(state["n"], "n")
            counts = check_counts(counts, "counts")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a ScoreHistogram state ({exc!r}).") from None
        out = cls(n_bins)
        counts = np.asarray(counts, dtype=np.float64)
        if (
            counts.shape != out.counts_.shape
            or not np.all(np.isfinite(counts))
            or np.any(counts < 0)
            or counts.sum() != n
        ):
            raise ValueError(
                f"ScoreHistogram state: counts must be {n_bins + 1} finite non-negative "
                f"numbers summing to n={n}."
            )
        out.counts_[:] = counts
        out.n_ = n
        return out

    def __repr__(self) -> str:
        return f"ScoreHistogram(n_bins={self.n_bins}; n_={self.n_})"
