"""Meta-Cal style rejection: two temperatures split at an entropy threshold."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from .._uncertainty import entropy
from ..features import log_softmax
from ._base import BaseLogitCalibrator, check_temperature_bounds
from ._models import TwoTemperatures
from ._solver import iter_chunks, warn_fit

__all__ = ["MetaCalScaling"]


def _weighted_quantile(values, q, weights=None) -> float:
    """The inverted-CDF quantile; weights count as repeated values."""
    order = np.argsort(values, kind="stable")
    w = np.ones(len(values)) if weights is None else np.asarray(weights)[order]
    cumulative = np.cumsum(w)
    position = np.searchsorted(cumulative, q * cumulative[-1], side="left")
    return float(values[order][min(position, len(values) - 1)])


class MetaCalScaling(BaseLogitCalibrator):
    """A Meta-Cal style rejector (Ma & Blaschko, ICML 2021) as used in the paper.

    Pixels whose predictive entropy is above a threshold are treated as
    likely errors and get the temperature ``t2`` (by default 1e10, a uniform
    distribution, as the selective-scaling paper's Meta-Cal column); the
    others get ``t1``, fitted by NLL (temperature scaling of the accepted
    pixels). The threshold is the entropy quantile that rejects
    ``rejection_rate`` of the fit pixels. It is the hard two-temperature model
    of :class:`SelectiveScalingCalibrator` (``mode="hard"``) with the entropy
    in place of a detector, under the same names: ``t1_`` for the pixels kept,
    ``t2_`` for the pixels flagged, ``threshold_`` for the split.

    Parameters
    ----------
    rejection_rate : float in (0, 1), default=0.05
    t2 : float or "auto", default=1e10
        Temperature of the rejected pixels. "auto" fits it by NLL on the
        rejected fit pixels.
    temperature_bounds : tuple of float, default=(0.01, 1e10)
        Interval searched for fitted temperatures.
    t_reject : float or "auto"
        Deprecated name of ``t2``.
    input_type, ignore_index, chunk_size
        As in :class:`TemperatureScaling`.

    Attributes
    ----------
    threshold_ : float
        Entropy above which a pixel is rejected (was ``entropy_threshold_``).
    t1_ : float
        Temperature of the accepted pixels (was ``temperature_``).
    t2_ : float
        Temperature of the rejected pixels (was ``t_reject_``).

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal import MetaCalScaling
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=2000)
    >>> logits = 5.0 * (np.eye(3)[y] + rng.normal(size=(2000, 3)))
    >>> cal = MetaCalScaling(rejection_rate=0.1).fit(logits, y)
    >>> float(np.mean(cal.rejected(logits))).__round__(2)
    0.1
    """

    _parameter_constraints: dict = {
        **BaseLogitCalibrator._parameter_constraints,
        "rejection_rate": [Interval(numbers.Real, 0, 1, closed="neither")],
        "t2": [Interval(numbers.Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "t_reject": [
            Interval(numbers.Real, 0, None, closed="neither"),
            StrOptions({"auto", "deprecated"}),
        ],
        "temperature_bounds": [tuple, list],
    }
    _renamed_attributes = {
        "t_reject": "t2",
        "temperature_": "t1_",
        "t_reject_": "t2_",
        "entropy_threshold_": "threshold_",
    }

    def __init__(
        self,
        *,
        rejection_rate=0.05,
        t2=1e10,
        temperature_bounds=(0.01, 1e10),
        input_type="logits",
        ignore_index=255,
        chunk_size=65536,
        t_reject="deprecated",
    ):
        self.rejection_rate = rejection_rate
        self.t2 = t2
        self.temperature_bounds = temperature_bounds
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.t_reject = t_reject

    @staticmethod
    def _entropy(z):
        with np.errstate(over="ignore"):  # float32 logit gaps beyond 3e38 become -inf
            lp = log_softmax(z)
        return entropy(lp, axis=1)  # 0 log 0 = 0 there, not NaN

    def _model(self) -> TwoTemperatures:
        # the split is "entropy <= threshold": the score is the negative entropy
        return TwoTemperatures("hard", self.t1_, self.t2_, -self.threshold_)

    def _fit_calibration(self, X, y, sample_weight, groups=None):
        t2 = self.t2
        if self.t_reject != "deprecated":
            warnings.warn(
                "MetaCalScaling(t_reject=...) was renamed t2 (the name selective scaling "
                "uses for the flagged pixels' temperature); t_reject will be removed in a "
                "future release.",
                FutureWarning,
                stacklevel=4,
            )
            t2 = self.t_reject
        bounds = check_temperature_bounds(self.temperature_bounds)
        Z = self._to_logits(X).astype(self._work_dtype(X), copy=False)
        entropy = np.concatenate(
            [self._entropy(Z[p]) for p in iter_chunks(len(y), self.chunk_size)]
        )
        self.threshold_ = _weighted_quantile(entropy, 1 - self.rejection_rate, sample_weight)
        model = TwoTemperatures.fit(
            Z,
            y,
            -entropy,
            kind="hard",
            t1="auto",
            t2=t2,
            thresholds=[-self.threshold_],
            sample_weight=sample_weight,
            bounds=bounds,
            chunk_size=self.chunk_size,
        )
        self.t1_, self.t2_ = model.t1, model.t2
        names = {"t1": "the temperature of accepted pixels", "t2": "t2"}
        for fit_names, fit in model.fits:
            warn_fit(
                fit, [names[n] for n in fit_names], bounds, owner=type(self).__name__, stacklevel=4
            )
        self.n_iter_ = sum(fit.n_iter for _, fit in model.fits)

    def rejected(self, X) -> np.ndarray:
        """Whether each pixel falls above the entropy threshold."""
        X = self._validate_predict_data(X)
        return np.concatenate(
            [
                self._entropy(self._to_logits(X[p]).astype(self._work_dtype(X))) > self.threshold_
                for p in iter_chunks(X.shape[0], self.chunk_size)
            ]
        )

    def _beta(self, z, extra=None):
        return self._model().inverse_temperatures(-self._entropy(z))

    def _torch_module(self):
        from ..deployment._convert import meta_cal_module

        return meta_cal_module(self)
