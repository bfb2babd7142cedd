"""Temperature scaling and ensemble temperature scaling: one temperature for every pixel."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from ..features import log_softmax
from ._base import BaseLogitCalibrator, check_temperature_bounds
from ._models import GlobalTemperature
from ._solver import iter_chunks, warn_fit

__all__ = ["EnsembleTemperatureScaling", "TemperatureScaling"]


class TemperatureScaling(BaseLogitCalibrator):
    """One temperature for every pixel, fitted by negative log-likelihood.

    Calibrated probabilities are ``softmax(logits / T)``. ``T`` is the exact
    minimiser of the NLL on the fit data: the NLL is convex in ``1/T``, and a
    bounded Newton iteration with its analytic first and second derivatives
    finds the minimum to a relative precision of 1e-10, in a few passes over
    the data streamed in float64 blocks, so memory stays at one block however
    many pixels are given. When the minimum lies outside
    ``temperature_bounds`` the fit stops at the bound with a
    ``ConvergenceWarning`` naming it.

    Parameters
    ----------
    input_type : {"logits", "probabilities"}, default="logits"
        What ``X`` holds. Probabilities are turned into log-probabilities,
        which are logits up to a per-row constant.
    ignore_index : int or None, default=255
        Label of unlabelled pixels; they are left out of ``fit`` and ``score``.
    temperature_bounds : tuple of float, default=(0.01, 100.0)
        Interval searched for ``T``. A fit that ends on a bound warns.
    chunk_size : int, default=65536
        Rows processed at a time.

    Attributes
    ----------
    temperature_ : float
        The fitted temperature.
    n_iter_ : int
        Newton iterations of the fit.
    converged_ : bool
        Whether the fit met its tolerance (or stopped on a bound it would
        cross).
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
        "temperature_bounds": [tuple, list],
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
        bounds = check_temperature_bounds(self.temperature_bounds)
        model = GlobalTemperature.fit(
            self._to_logits(X), y, sample_weight=sample_weight, bounds=bounds,
            chunk_size=self.chunk_size,
        )
        self.temperature_ = model.temperature
        (_, fit), = model.fits
        self.n_iter_, self.converged_ = fit.n_iter, fit.converged
        warn_fit(fit, ["the temperature"], bounds, owner=type(self).__name__, stacklevel=4)

    def _beta(self, z, extra=None):
        return GlobalTemperature(self.temperature_).inverse_temperatures()



# --------------------------------------------------------------------------
# Temperature-based baselines that keep the predicted class
# --------------------------------------------------------------------------
class EnsembleTemperatureScaling(BaseLogitCalibrator):
    """Ensemble temperature scaling (Zhang, Kailkhura & Han, ICML 2020).

    ``p = w1 softmax(z / T) + w2 softmax(z) + w3 / C`` with ``T`` from temperature
    scaling and the weights (on the simplex) fitted by NLL. Every term keeps the
    order of the logits, so the predicted class is unchanged.

    The NLL of the mixture depends on each pixel only through the labelled
    class's probability under the three terms, so the weights are fitted
    exactly on those (one streamed pass gathers them): the NLL is convex in
    the weights, and SLSQP with the analytic gradient solves it on the
    simplex, zero weights included. A temperature on its bound warns.

    Parameters
    ----------
    temperature_bounds : tuple of float, default=(0.01, 100.0)
        Interval searched for ``T``.
    input_type, ignore_index, chunk_size
        As in :class:`TemperatureScaling`.

    Attributes
    ----------
    temperature_ : float
    weights_ : ndarray of shape (3,)
        Weights of the tempered, the original and the uniform distribution.
    n_iter_ : int
        Newton iterations of the temperature fit.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal import EnsembleTemperatureScaling
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=2000)
    >>> logits = 5.0 * (np.eye(3)[y] + rng.normal(size=(2000, 3)))
    >>> round(float(EnsembleTemperatureScaling().fit(logits, y).weights_.sum()), 6)
    1.0
    """

    _parameter_constraints: dict = {
        **BaseLogitCalibrator._parameter_constraints,
        "temperature_bounds": [tuple, list],
    }

    def __init__(self, *, input_type="logits", ignore_index=255,
                 temperature_bounds=(0.01, 100.0), chunk_size=65536):
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.temperature_bounds = temperature_bounds
        self.chunk_size = chunk_size

    @staticmethod
    def _terms(z, T):
        """softmax(z / T) and softmax(z), float64, from the row-max-shifted logits."""
        d = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        with np.errstate(over="ignore"):
            tempered = np.exp(log_softmax(d / T))
        return tempered, np.exp(log_softmax(d))

    def _mixture_log_proba(self, z, T, weights):
        tempered, original = self._terms(z, T)
        mix = weights[0] * tempered + weights[1] * original + weights[2] / z.shape[1]
        return np.log(np.maximum(mix, np.finfo(np.float64).tiny))

    def _fit_calibration(self, X, y, sample_weight, groups=None):
        Z = self._to_logits(X)
        bounds = check_temperature_bounds(self.temperature_bounds)
        model = GlobalTemperature.fit(Z, y, sample_weight=sample_weight, bounds=bounds,
                                      chunk_size=self.chunk_size)
        self.temperature_ = model.temperature
        (_, fit), = model.fits
        self.n_iter_ = fit.n_iter
        warn_fit(fit, ["the temperature"], bounds, owner=type(self).__name__, stacklevel=4)
        # the labelled class's probability under each term: all the weight fit needs
        Q = np.empty((len(y), 3))
        Q[:, 2] = 1.0 / Z.shape[1]
        for part in iter_chunks(len(y), self.chunk_size):
            tempered, original = self._terms(Z[part], self.temperature_)
            r = np.arange(tempered.shape[0])
            Q[part, 0], Q[part, 1] = tempered[r, y[part]], original[r, y[part]]
        self.weights_ = _simplex_mixture_weights(Q, sample_weight)

    def _scale_chunk(self, z, extra=None):
        return self._mixture_log_proba(z, self.temperature_, self.weights_).astype(z.dtype)


def _simplex_mixture_weights(Q: np.ndarray, sample_weight=None) -> np.ndarray:
    """Weights on the simplex maximising the weighted mean ``log(Q @ w)`` (convex NLL)."""
    w_rows = np.ones(len(Q)) if sample_weight is None else np.asarray(sample_weight, float)
    w_rows = w_rows / w_rows.sum()
    tiny = np.finfo(np.float64).tiny

    def objective(w):
        mix = np.maximum(Q @ w, tiny)
        return -float(w_rows @ np.log(mix)), -(Q * (w_rows / mix)[:, None]).sum(axis=0)

    k = Q.shape[1]
    starts = [np.full(k, 1.0 / k), np.r_[0.98, np.full(k - 1, 0.02 / (k - 1))]]
    best = None
    for start in starts:
        result = minimize(
            objective,
            start,
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * k,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                          "jac": lambda w: np.ones_like(w)}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        if best is None or result.fun < best.fun:
            best = result
    weights = np.clip(best.x, 0.0, None)
    return weights / weights.sum()


