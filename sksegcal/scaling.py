"""Temperature scaling and the paper's other post-hoc baselines."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils._param_validation import Interval

from ._base import BaseLogitCalibrator, fit_temperature

__all__ = ["TemperatureScaling"]


class TemperatureScaling(BaseLogitCalibrator):
    """One temperature for every pixel, fitted by negative log-likelihood.

    Calibrated probabilities are ``softmax(logits / T)``. ``T`` is the exact
    minimiser of the NLL on the fit data, found by a bounded search over
    ``log T`` with the data streamed in chunks, so memory stays at one chunk
    however many pixels are given.

    Parameters
    ----------
    input_type : {"logits", "probabilities"}, default="logits"
        What ``X`` holds. Probabilities are turned into log-probabilities,
        which are logits up to a per-row constant.
    ignore_index : int or None, default=255
        Label of unlabelled pixels; they are left out of ``fit`` and ``score``.
    temperature_bounds : tuple of float, default=(0.01, 100.0)
        Interval searched for ``T``.
    chunk_size : int, default=65536
        Rows processed at a time.

    Attributes
    ----------
    temperature_ : float
        The fitted temperature.
    classes_ : ndarray of shape (n_classes,)
        ``arange(n_classes)``.
    n_features_in_ : int
        Number of classes (columns of ``X``).

    See Also
    --------
    SelectiveScalingCalibrator : A temperature per pixel, chosen by a
        misprediction detector.
    sklearn.calibration.CalibratedClassifierCV : ``method="temperature"`` fits
        the same model on a classifier's outputs.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal import TemperatureScaling
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=2000)
    >>> logits = 5.0 * (np.eye(3)[y] + rng.normal(size=(2000, 3)))
    >>> ts = TemperatureScaling().fit(logits, y)
    >>> bool(ts.temperature_ > 1)  # over-confident logits get T > 1
    True
    >>> ts.predict_proba(logits).sum(axis=1)[:2].round(6).tolist()
    [1.0, 1.0]
    """

    _parameter_constraints: dict = {
        **BaseLogitCalibrator._parameter_constraints,
        "temperature_bounds": [tuple],
    }

    def __init__(
        self,
        *,
        input_type: str = "logits",
        ignore_index: int | None = 255,
        temperature_bounds: tuple[float, float] = (0.01, 100.0),
        chunk_size: int = 65536,
    ):
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.temperature_bounds = temperature_bounds
        self.chunk_size = chunk_size

    def _fit_calibration(self, X, y, sample_weight, groups=None):
        low, high = _check_bounds(self.temperature_bounds, "temperature_bounds")
        Z = self._to_logits(X)
        self.temperature_ = fit_temperature(
            Z, y, sample_weight=sample_weight, bounds=(low, high), chunk_size=self.chunk_size
        )

    def _scale_chunk(self, z):
        return z * np.float32(1.0 / self.temperature_)


def _check_bounds(bounds, name: str) -> tuple[float, float]:
    if (
        len(bounds) != 2
        or not all(isinstance(b, numbers.Real) for b in bounds)
        or not 0 < bounds[0] < bounds[1] < np.inf
    ):
        raise ValueError(f"{name} must be (low, high) with 0 < low < high < inf, got {bounds}.")
    return float(bounds[0]), float(bounds[1])


# keep Interval importable for subclasses declaring numeric constraints
_ = Interval
