"""ConformalRiskControl: a per-image loss held below alpha on new images (CRC)."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import BaseConformal, images_needed
from ._histogram import DEFAULT_N_BINS
from ._risk import ImageRiskTally


class ConformalRiskControl(BaseConformal):
    """Conformal risk control over images: a per-image loss at most ``alpha`` in expectation.

    Each calibration image ``i`` contributes a loss ``L_i(lambda)`` that does
    not grow with the threshold ``lambda`` (larger thresholds, larger sets) and
    is at most ``B = 1``; the threshold is (Angelopoulos, Bates, Fisch, Lei &
    Schuster 2022, "Conformal Risk Control", Theorem 1)::

        lambda_hat = inf{ lambda : n / (n + 1) * R_hat(lambda) + B / (n + 1) <= alpha },

    with ``R_hat`` the mean loss over the ``n`` calibration images, searched
    on the fixed grid of ``n_bins + 1`` levels (the theorem holds on any
    grid containing a loss-free point, here the last level). If the
    calibration images and a new image are exchangeable,
    ``E[L_new(lambda_hat)] <= alpha``. The unit is the image: pixels may be
    as correlated as they are.

    Losses:

    - ``"miscoverage"``: the fraction of an image's labelled pixels whose
      true class is not in their set (so the mean per-image coverage is at
      least ``1 - alpha``);
    - ``"fnr"``: the false-negative rate of ``target_class``: the fraction of
      the image's pixels of that class that the mask "``target_class`` is in
      the set" misses. Images without a pixel of the class are left out, in
      calibration as in the guarantee: it holds for new images that contain
      the class.

    Parameters
    ----------
    alpha : float, default=0.1
        The risk bound, in (0, 1).
    loss : {"miscoverage", "fnr"}, default="miscoverage"
    target_class : int or None, default=None
        The class of ``loss="fnr"`` (required there, not allowed otherwise).
    conformity_score, calibrator, input_type, ignore_index, randomized, n_bins
        As in :class:`ConformalPixelSets`.
    random_state, chunk_size
        As in :class:`ConformalPixelSets`.

    Attributes
    ----------
    threshold_ : float
        ``lambda_hat`` on the score scale (inf when the bound cannot be met
        with so few images: ``n < 1 / alpha - 1``).
    threshold_level_ : int
        ``lambda_hat`` as a grid level.
    state_ : ImageRiskTally
    n_calibration_ : int
        Calibration images counted.
    n_required_ : int
        The fewest calibration images that support ``alpha`` (``1/alpha - 1``).
    calibration_risk_ : float
        ``R_hat(lambda_hat)``, the mean calibration loss at the threshold.
    classes_, n_features_in_, seed_
        As in :class:`ConformalPixelSets`.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.conformal import ConformalRiskControl
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 3, size=(40, 8, 8))
    >>> maps = 3.0 * (np.moveaxis(np.eye(3)[labels], -1, 1) + rng.normal(size=(40, 3, 8, 8)))
    >>> crc = ConformalRiskControl(alpha=0.1, loss="fnr", target_class=1)
    >>> crc = crc.fit_maps(maps[:20], labels[:20])
    >>> crc.n_calibration_
    20
    >>> masks = crc.predict_mask_maps(maps[20:])  # where class 1 is in the set
    >>> masks.shape
    (20, 8, 8)
    """

    _parameter_constraints: dict = {
        **BaseConformal._parameter_constraints,
        "loss": [StrOptions({"miscoverage", "fnr"})],
        "target_class": [Interval(numbers.Integral, 0, None, closed="left"), None],
    }
    _merge_keys = ("loss", "target_class")
    # images are the exchangeable units: metadata routing passes groups to fit
    __metadata_request__fit = {"groups": True}
    __metadata_request__partial_fit = {"groups": True}

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        loss: str = "miscoverage",
        target_class: int | None = None,
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
        self.loss = loss
        self.target_class = target_class
        self.conformity_score = conformity_score
        self.calibrator = calibrator
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.randomized = randomized
        self.n_bins = n_bins
        self.random_state = random_state
        self.chunk_size = chunk_size

    def _check_settings(self) -> None:
        super()._check_settings()
        if self.loss == "fnr" and self.target_class is None:
            raise ValueError(
                "loss='fnr' needs target_class, the class whose false-negative rate is controlled."
            )
        if self.loss != "fnr" and self.target_class is not None:
            raise ValueError(f"target_class applies to loss='fnr' only (got loss={self.loss!r}).")

    def _start(self, n_features: int) -> None:
        super()._start(n_features)
        if self.target_class is not None and self.target_class >= len(self.classes_):
            raise ValueError(
                f"target_class={self.target_class} but there are {len(self.classes_)} classes."
            )

    def _counted(self, y):
        keep = super()._counted(y)
        if self.loss == "fnr":
            keep &= y == self.target_class
        return keep

    def _new_state(self) -> ImageRiskTally:
        return ImageRiskTally(self.n_bins)

    def _add_image(self, state, counts) -> None:
        state.add_image_histogram(counts)

    def _threshold_level(self):
        self.n_required_ = images_needed(self.alpha)
        self.n_calibration_ = self.state_.n_images_
        level = self.state_.lambda_level(self.alpha)
        risk = (
            self.state_.risk()[self.n_bins if level is None else level]
            if (self.state_.n_images_)
            else np.nan
        )
        self.calibration_risk_ = float(risk)
        return level

    def _merge_state(self, other) -> None:
        self._merge_images_seen(other)
        super()._merge_state(other)

    def fit(self, X, y, groups=None):
        """Calibrate ``lambda_hat`` on whole calibration images.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_features)
            Logits (or what the calibrator takes).
        y : array-like of shape (n_pixels,)
            Class indices; ``ignore_index`` pixels are left out.
        groups : array-like of shape (n_pixels,)
            The image of each pixel. Every image's pixels must all be here.

        Returns
        -------
        self
        """
        for attr in ("state_", "n_features_in_"):
            self.__dict__.pop(attr, None)
        return self.partial_fit(X, y, groups)

    def partial_fit(self, X, y, groups=None):
        """Add whole calibration images and read ``lambda_hat`` again.

        Each image must come whole in one call: an image id seen in an earlier
        call is refused (its loss is a fraction over all its pixels).

        Returns
        -------
        self
        """
        return self._fit_images(X, y, groups)

    def fit_maps(self, maps, labels, groups=None):
        """:meth:`fit` on ``(N, C, *spatial)`` logit maps and ``(N, *spatial)`` labels.

        ``groups`` (N,): the unit of each map (several acquisitions of one
        scene are one unit); None: each map is an image of its own.
        """
        X, shape = self._table(maps)
        y = self._map_labels(labels, shape)
        return self.fit(X, y, self._map_groups(groups, shape))

    def predict_mask(self, X) -> np.ndarray:
        """With ``loss="fnr"``: the pixels whose set holds ``target_class``, shape (n,), bool."""
        check_is_fitted(self)
        if self.loss != "fnr":
            raise ValueError("predict_mask needs loss='fnr' (a target class); use predict_set.")
        return self.predict_set(X)[:, self.target_class]

    def predict_mask_maps(self, maps) -> np.ndarray:
        """:meth:`predict_mask` of ``(N, C, *spatial)`` maps, as ``(N, *spatial)`` bool."""
        check_is_fitted(self)
        if self.loss != "fnr":
            raise ValueError("predict_mask_maps needs loss='fnr'; use predict_set_maps.")
        return self.predict_set_maps(maps)[:, self.target_class]
