"""ImageRiskTally: per-image losses summed on a fixed threshold grid, and the CRC choice.

Conformal risk control (Angelopoulos, Bates, Fisch, Lei & Schuster 2022)
needs, for every candidate threshold ``lambda``, the mean over calibration
images of a loss that does not grow with ``lambda``. Here the candidates are
the ``n_bins + 1`` levels of the score grid, the loss of an image at level
``t`` is the fraction of its counted pixels whose true-class level is above
``t`` (the pixels the set at ``t`` misses), and the state is the sum of those
fractions at every level plus the image count: fixed-size and mergeable. An
image enters as a whole, so a state never holds half an image's loss.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._safety import check_counts, exact_int
from ._histogram import check_alpha, check_n_bins


class ImageRiskTally:
    """Sums of per-image miss fractions at every level of a fixed grid.

    Parameters
    ----------
    n_bins : int, default=65536
        Levels ``0 .. n_bins`` (the candidate thresholds ``t / n_bins``).

    Attributes
    ----------
    loss_sums_ : ndarray of shape (n_bins + 1,), float64
        ``sum_i L_i(t)`` over the images added.
    n_images_ : int
        Images added (those with at least one counted pixel).

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import ImageRiskTally
    >>> tally = ImageRiskTally(n_bins=4)
    >>> _ = tally.add_image(np.array([0, 1, 4, 4]))   # true-class levels of one image
    >>> _ = tally.add_image(np.array([2]))
    >>> tally.loss_sums_.tolist()  # image 1: 3/4, 2/4, 2/4, 2/4, 0; image 2: 1, 1, 0, 0, 0
    [1.75, 1.5, 0.5, 0.5, 0.0]
    """

    def __init__(self, n_bins: int = 2**16) -> None:
        self.n_bins = check_n_bins(n_bins)
        self.loss_sums_ = np.zeros(self.n_bins + 1)
        self.n_images_ = 0

    def add_image_histogram(self, counts: np.ndarray) -> ImageRiskTally:
        """Add one whole image from the counts of its pixels' true-class levels. Returns self."""
        counts = check_counts(counts, "counts")
        if counts.shape != self.loss_sums_.shape:
            raise ValueError(f"counts must have shape ({self.n_bins + 1},).")
        n = counts.sum()
        if n > 0:  # an image with nothing counted has no loss to speak of
            # L(t) = #{level > t} / n; the last entry is exactly 0
            self.loss_sums_ += 1.0 - np.cumsum(counts) / n
            self.n_images_ += 1
        return self

    def add_image(self, levels: np.ndarray) -> ImageRiskTally:
        """Add one whole image from its pixels' true-class levels. Returns self."""
        levels = np.asarray(levels).ravel()
        if levels.size and (levels.min() < 0 or levels.max() > self.n_bins):
            raise ValueError(f"levels must lie in [0, {self.n_bins}].")
        return self.add_image_histogram(np.bincount(levels, minlength=self.n_bins + 1))

    def merge(self, other: ImageRiskTally) -> ImageRiskTally:
        """Add the images of ``other`` (same ``n_bins``), in place. Returns self."""
        if not isinstance(other, ImageRiskTally):
            raise TypeError(f"Can only merge an ImageRiskTally; got {type(other).__name__}.")
        if other.n_bins != self.n_bins:
            raise ValueError(
                f"Cannot merge tallies of {self.n_bins} and {other.n_bins} bins; build both "
                "with the same n_bins."
            )
        self.loss_sums_ += other.loss_sums_
        self.n_images_ += other.n_images_
        return self

    def risk(self) -> np.ndarray:
        """The empirical risk ``R_hat(t)`` (mean loss over images) at every level."""
        if self.n_images_ == 0:
            raise ValueError("No image was added; there is no risk to read.")
        return self.loss_sums_ / self.n_images_

    def lambda_level(self, alpha, bound: float = 1.0) -> int | None:
        """The CRC level ``min{t : n/(n+1) R_hat(t) + B/(n+1) <= alpha}``, or None.

        None when even the largest level (loss 0) fails, i.e. ``n < B / alpha - 1``.
        ``B`` (``bound``) is the loss's upper bound, 1 for a fraction.
        """
        a = float(check_alpha(alpha))
        n = self.n_images_
        if n == 0:
            return None
        # n/(n+1) R + B/(n+1) <= alpha  <=>  sum_i L_i + B <= alpha (n + 1); a relative 1e-12
        # of slack on the left, in the conservative direction, absorbs the sums' rounding
        ok = self.loss_sums_ * (1 + 1e-12) + bound <= a * (n + 1)
        if not ok.any():
            return None
        return int(np.argmax(ok))

    def lambda_(self, alpha, bound: float = 1.0) -> float:
        """:meth:`lambda_level` as a score threshold in [0, 1] (inf if none)."""
        level = self.lambda_level(alpha, bound)
        return math.inf if level is None else level / self.n_bins

    def state_dict(self) -> dict[str, Any]:
        """The sums and settings as plain values (``np.savez`` stores them without pickle)."""
        return {
            "n_bins": self.n_bins,
            "n_images": self.n_images_,
            "loss_sums": self.loss_sums_.copy(),
        }

    @classmethod
    def from_state_dict(cls, state) -> ImageRiskTally:
        """Rebuild a tally from :meth:`state_dict`, checking every value."""
        try:
            n_bins = exact_int(state["n_bins"], "n_bins", low=1)
            n = exact_int(state["n_images"], "n_images")
            sums = np.asarray(state["loss_sums"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an ImageRiskTally state ({exc!r}).") from None
        out = cls(n_bins)
        if (
            sums.shape != out.loss_sums_.shape
            or not np.all(np.isfinite(sums))
            or np.any(sums < 0)
            or np.any(sums > n * (1 + 1e-9))
            or n < 0
            or np.any(np.diff(sums) > 1e-9 * max(n, 1))
        ):
            raise ValueError(
                f"ImageRiskTally state: loss_sums must be {n_bins + 1} finite, non-increasing "
                f"values in [0, n_images={n}]."
            )
        out.loss_sums_[:] = sums
        out.n_images_ = n
        return out

    def __repr__(self) -> str:
        return f"ImageRiskTally(n_bins={self.n_bins}; n_images_={self.n_images_})"
