"""ConformalPixelSets: split-conformal prediction sets per pixel (LAC or APS)."""

from __future__ import annotations

import numpy as np

from ._base import BaseConformal
from ._histogram import DEFAULT_N_BINS, ScoreHistogram


class ConformalPixelSets(BaseConformal):
    """Split-conformal prediction sets per pixel, from a streaming score histogram.

    The threshold is the ``ceil((n + 1)(1 - alpha))``-th smallest of the
    ``n`` calibration pixels' true-class scores (Vovk et al. 2005; Lei et al.
    2018), read from a fixed-size :class:`ScoreHistogram` and rounded up to
    its grid, so never below the exact one. A pixel's set holds the classes
    whose score is at most the threshold.

    **What is guaranteed, over what.** If the calibration pixels and a test
    pixel are exchangeable, ``P(y in set) >= 1 - alpha`` for that test pixel.
    Pixels of one image are correlated, so with calibration and test split by
    *image* (the only honest split) this is a guarantee over pixels only in
    the limit of many images: the pooled coverage of new images is close to
    ``1 - alpha`` on average, not bounded below in finite samples. For a
    finite-sample guarantee over images use :class:`ConformalRiskControl`
    (``docs/conformal.md``).

    Parameters
    ----------
    alpha : float, default=0.1
        Target miscoverage, in (0, 1).
    conformity_score : {"lac", "aps"}, default="lac"
        ``"lac"``: ``1 - p_k``, the smallest sets on average (Sadinle et al.
        2019; sets may be empty). ``"aps"``: the mass ranked up to the class
        (Romano et al. 2020); deterministic, the top class always in the set,
        unless ``randomized``.
    calibrator : estimator or None, default=None
        A *fitted* calibrator (``predict_proba`` on X), e.g.
        :class:`~sksegcal.TemperatureScaling` or
        :class:`~sksegcal.SelectiveScalingCalibrator`, fitted on other images
        than these. Used as is, never refitted (``sklearn.base.clone`` clones
        it unfitted: wrap it in ``sklearn.frozen.FrozenEstimator`` to clone
        safely). None: the softmax of X.
    input_type : {"logits", "probabilities"}, default="logits"
        What X holds when there is no calibrator.
    ignore_index : int or None, default=255
        Label of pixels left out of calibration.
    randomized : bool, default=False
        Romano et al.'s randomised APS (a uniform draw per pixel; sets may be
        empty; coverage exact rather than at least). Only with
        ``conformity_score="aps"``.
    n_bins : int, default=65536
        Grid steps of the score histogram: the threshold is at most
        ``1 / n_bins`` above the exact one.
    random_state : int, Generator, RandomState or None, default=None
        Seeds the draws of randomised APS (fit and predict use separate
        streams; an int gives the same sets on every call).
    chunk_size : int, default=65536
        Pixels per chunk: temporaries stay a few ``chunk_size x C`` arrays.

    Attributes
    ----------
    threshold_ : float
        The score threshold (a multiple of ``1 / n_bins``; inf when there are
        fewer than ``1 / alpha - 1`` calibration pixels).
    threshold_level_ : int
        The threshold as a level of the grid (``n_bins`` when infinite).
    state_ : ScoreHistogram
        The calibration scores' histogram.
    n_calibration_ : int
        Calibration pixels counted.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    seed_ : int
        The seed the randomised draws used.

    See Also
    --------
    ConformalRiskControl : the image-level guarantee.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import ConformalPixelSets
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=2000)
    >>> X = 3.0 * (np.eye(3)[y] + rng.normal(size=(2000, 3)))
    >>> sets = ConformalPixelSets(alpha=0.1).fit(X[:1000], y[:1000])
    >>> covered = sets.predict_set(X[1000:])[np.arange(1000), y[1000:]]
    >>> bool(covered.mean() >= 0.85)
    True
    """

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        conformity_score: str = "lac",
        calibrator=None,
        input_type: str = "logits",
        ignore_index: int | None = 255,
        randomized: bool = False,
        n_bins: int = DEFAULT_N_BINS,
        random_state=None,
        chunk_size: int = 65536,
    ) -> None:
        self.alpha = alpha
        self.conformity_score = conformity_score
        self.calibrator = calibrator
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.randomized = randomized
        self.n_bins = n_bins
        self.random_state = random_state
        self.chunk_size = chunk_size

    def _new_state(self) -> ScoreHistogram:
        return ScoreHistogram(self.n_bins)

    def _add_image(self, state, counts) -> None:
        state.counts_ += counts
        state.n_ += int(counts.sum())

    def _threshold_level(self):
        self.n_calibration_ = self.state_.n_
        return self.state_.threshold_level(self.alpha)

    def fit(self, X, y):
        """Calibrate the threshold on calibration pixels.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_features)
            Logits (probabilities with ``input_type="probabilities"``; what
            the calibrator takes when there is one).
        y : array-like of shape (n_pixels,)
            Class indices; ``ignore_index`` pixels are left out.

        Returns
        -------
        self
        """
        for attr in ("state_", "n_features_in_"):
            self.__dict__.pop(attr, None)
        return self.partial_fit(X, y)

    def partial_fit(self, X, y):
        """Add calibration pixels to the histogram and read the threshold again.

        Any chunking gives the same threshold as one :meth:`fit` on all the
        pixels (for randomised APS, the same in distribution).

        Returns
        -------
        self
        """
        first = not hasattr(self, "state_")
        X = self._validate_X(X, reset=first)
        if first:
            self._start(X.shape[1])
        y = self._labels(y, X.shape[0])
        rng = self._rng(0, self.state_.n_)
        self._add_image(self.state_, self._image_histogram([(X, y)], rng))
        return self._finish()

    def fit_maps(self, maps, labels):
        """:meth:`fit` on (N, C, H, W) logit maps and (N, H, W) labels (or volumes)."""
        X, shape = self._table(maps)
        labels = np.asarray(labels)
        if labels.shape != shape:
            raise ValueError(f"labels must have shape {shape} (N, *spatial), got {labels.shape}.")
        return self.fit(X, labels.reshape(-1))
