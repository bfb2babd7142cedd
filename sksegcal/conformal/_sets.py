"""ConformalPixelSets: conformal prediction sets per pixel, valid over images by default."""

from __future__ import annotations

from sklearn.utils._param_validation import StrOptions

from ._base import BaseConformal, images_needed
from ._histogram import DEFAULT_N_BINS, ScoreHistogram
from ._risk import ImageRiskTally


class ConformalPixelSets(BaseConformal):
    """Conformal prediction sets per pixel, valid over new images by default.

    A pixel's set holds the classes whose score (LAC or APS) is at most a
    threshold read from the calibration images. What the threshold promises
    depends on ``guarantee``:

    - ``"image"`` (default): conformal risk control of each image's
      miscoverage fraction (Angelopoulos et al. 2022), i.e. the pooled-CDF
      quantile of Dunn, Wasserman & Ramdas (2023) at level
      ``(1 - alpha)(1 + 1/n)``, over the ``n`` calibration images. If the
      calibration images and a new image are exchangeable, a pixel drawn
      uniformly from the labelled pixels of the new image has its class in
      its set with probability at least ``1 - alpha`` (the mean coverage of
      new images is at least ``1 - alpha``), however correlated the pixels of
      an image are. It needs ``n >= 1/alpha - 1`` images (9 at 0.1); with
      fewer, a warning says how many, and every set holds every class.
      ``fit`` takes the image of each pixel as ``groups``.
    - ``"pixel"``: split conformal over pixels, the ``ceil((n + 1)(1 -
      alpha))``-th smallest of the ``n`` calibration pixels' true-class
      scores (Vovk et al. 2005; Lei et al. 2018). ``P(y in set) >= 1 -
      alpha`` for a test pixel exchangeable with the calibration pixels,
      which pixels of new images are not: across images it holds only on
      average over many calibration images (``docs/conformal.md``).

    Both states are fixed-size and mergeable (an :class:`ImageRiskTally` or a
    :class:`ScoreHistogram` on a grid of ``n_bins`` levels whose rounding only
    ever adds coverage).

    Parameters
    ----------
    alpha : float, default=0.1
        Target miscoverage, in (0, 1).
    guarantee : {"image", "pixel"}, default="image"
        Over what the promise holds (above): new images (``fit`` needs
        ``groups``) or exchangeable pixels.
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
        fewer than ``1 / alpha - 1`` calibration images, or pixels).
    threshold_level_ : int
        The threshold as a level of the grid (``n_bins`` when infinite).
    state_ : ImageRiskTally or ScoreHistogram
        Per-image miss fractions summed at every level (``"image"``), or the
        calibration pixels' score histogram (``"pixel"``).
    n_calibration_ : int
        Calibration images (``"image"``) or pixels (``"pixel"``) counted.
    n_required_ : int
        The fewest calibration images (or pixels) that support ``alpha``.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    seed_ : int
        The seed the randomised draws used.

    See Also
    --------
    ConformalRiskControl : other per-image losses (a class's false-negative rate).

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import ConformalPixelSets
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=4000)
    >>> X = 3.0 * (np.eye(3)[y] + rng.normal(size=(4000, 3)))
    >>> images = np.repeat(np.arange(40), 100)  # 40 images of 100 pixels
    >>> sets = ConformalPixelSets(alpha=0.1).fit(X[:2000], y[:2000], groups=images[:2000])
    >>> sets.n_calibration_, sets.n_required_
    (20, 9)
    >>> covered = sets.predict_set(X[2000:])[np.arange(2000), y[2000:]]
    >>> bool(covered.mean() >= 0.85)
    True
    """

    _parameter_constraints: dict = {
        **BaseConformal._parameter_constraints,
        "guarantee": [StrOptions({"image", "pixel"})],
    }
    _merge_keys = ("guarantee",)
    # images are the exchangeable units of the default guarantee: metadata routing
    # (Pipeline, fit_store, searches) passes groups to fit
    __metadata_request__fit = {"groups": True}
    __metadata_request__partial_fit = {"groups": True}

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        guarantee: str = "image",
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
        self.guarantee = guarantee
        self.conformity_score = conformity_score
        self.calibrator = calibrator
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.randomized = randomized
        self.n_bins = n_bins
        self.random_state = random_state
        self.chunk_size = chunk_size

    @property
    def _unit(self) -> str:
        return "image" if self.guarantee == "image" else "pixel"

    def _new_state(self):
        if self.guarantee == "image":
            return ImageRiskTally(self.n_bins)
        return ScoreHistogram(self.n_bins)

    def _add_image(self, state, counts) -> None:
        if self.guarantee == "image":
            state.add_image_histogram(counts)
        else:
            state.counts_ += counts
            state.n_ += int(counts.sum())

    def _threshold_level(self):
        self.n_required_ = images_needed(self.alpha)
        if self.guarantee == "image":
            self.n_calibration_ = self.state_.n_images_
            return self.state_.lambda_level(self.alpha)
        self.n_calibration_ = self.state_.n_
        return self.state_.threshold_level(self.alpha)

    def _merge_state(self, other) -> None:
        if self.guarantee == "image":
            self._merge_images_seen(other)
        super()._merge_state(other)

    def fit(self, X, y, groups=None):
        """Calibrate the threshold on calibration images.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_features)
            Logits (probabilities with ``input_type="probabilities"``; what
            the calibrator takes when there is one).
        y : array-like of shape (n_pixels,)
            Class indices; ``ignore_index`` pixels are left out.
        groups : array-like of shape (n_pixels,), optional
            The image of each pixel; required with ``guarantee="image"``
            (every image's pixels must all be here), unused with
            ``guarantee="pixel"``.

        Returns
        -------
        self
        """
        for attr in ("state_", "n_features_in_"):
            self.__dict__.pop(attr, None)
        return self.partial_fit(X, y, groups)

    def partial_fit(self, X, y, groups=None):
        """Add calibration images (or pixels) and read the threshold again.

        With ``guarantee="image"`` each image must come whole in one call (an
        image id seen in an earlier call is refused). Any chunking gives the
        threshold of one :meth:`fit` on all the data (for randomised APS, the
        same in distribution).

        Returns
        -------
        self
        """
        self._check_settings()
        if self.guarantee == "image":
            return self._fit_images(X, y, groups)
        first = not hasattr(self, "state_")
        X = self._validate_X(X, reset=first)
        if first:
            self._start(X.shape[1])
        y = self._labels(y, X.shape[0])
        rng = self._rng(0, self.state_.n_)
        self._add_image(self.state_, self._image_histogram([(X, y)], rng))
        return self._finish()

    def fit_maps(self, maps, labels, groups=None):
        """:meth:`fit` on ``(N, C, *spatial)`` logit maps and ``(N, *spatial)`` labels.

        ``groups`` (N,): the unit of each map (several acquisitions of one
        scene are one unit); None: each map is an image of its own.
        """
        X, shape = self._table(maps)
        y = self._map_labels(labels, shape)
        return self.fit(X, y, self._map_groups(groups, shape))
