"""Temperature scaling and the paper's other post-hoc baselines."""

from __future__ import annotations

import numbers

import numpy as np
from scipy.optimize import minimize
from sklearn.utils._param_validation import Interval, StrOptions

from ._base import (
    LOG_PROBA_FLOOR,
    BaseLogitCalibrator,
    fit_temperature,
    iter_chunks,
    scale_logits,
    warn_fit,
)
from .features import log_softmax

__all__ = [
    "DirichletScaling",
    "EnsembleTemperatureScaling",
    "MetaCalScaling",
    "TemperatureScaling",
    "VectorScaling",
]


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
        self.temperature_, fit = fit_temperature(
            Z, y, sample_weight=sample_weight, bounds=(low, high), chunk_size=self.chunk_size
        )
        self.n_iter_, self.converged_ = fit.n_iter, fit.converged
        warn_fit(fit, ["the temperature"], (low, high), owner=type(self).__name__, stacklevel=4)

    def _row_inverse_temperatures(self, z):
        return z.dtype.type(1.0 / self.temperature_)

    def _scale_chunk(self, z):
        return scale_logits(z, self._row_inverse_temperatures(z))


def _check_bounds(bounds, name: str) -> tuple[float, float]:
    if (
        len(bounds) != 2
        or not all(isinstance(b, numbers.Real) for b in bounds)
        or not 0 < bounds[0] < bounds[1] < np.inf
    ):
        raise ValueError(f"{name} must be (low, high) with 0 < low < high < inf, got {bounds}.")
    return float(bounds[0]), float(bounds[1])


# --------------------------------------------------------------------------
# Affine maps of the logits (vector and Dirichlet scaling), fitted by L-BFGS
# --------------------------------------------------------------------------
def _softmax_ce_grad(z: np.ndarray, y: np.ndarray, w: np.ndarray | None):
    """Summed cross-entropy of logits ``z`` and its gradient with respect to ``z``."""
    lp = log_softmax(z.astype(np.float64))
    loss = -lp[np.arange(len(y)), y]
    g = np.exp(lp)
    g[np.arange(len(y)), y] -= 1.0
    if w is not None:
        loss = loss * w
        g *= w[:, None]
    return loss.sum(), g


class _AffineLogitCalibrator(BaseLogitCalibrator):
    """An affine map of per-pixel inputs, fitted by (regularised) NLL with L-BFGS."""

    def _inputs(self, z: np.ndarray) -> np.ndarray:
        return z

    def _fit_calibration(self, X, y, sample_weight, groups=None):
        n_classes = X.shape[1]
        theta0 = self._initial_parameters(n_classes)
        total_weight = float(len(y) if sample_weight is None else sample_weight.sum())

        def objective(theta):
            return self._loss_and_grad(theta, X, y, sample_weight, total_weight)

        with np.errstate(over="ignore", invalid="ignore"):
            start_loss, start_grad = objective(theta0)
        if not (np.isfinite(start_loss) and np.isfinite(start_grad).all()):
            raise ValueError(
                f"{type(self).__name__}: the NLL of these logits overflows float64 (largest "
                f"|logit| {float(np.max(np.abs(X))):.3g}); divide the logits by a constant "
                "before calibrating."
            )

        result = minimize(
            objective,
            theta0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": 1e-8, "ftol": 1e-13},
        )
        self.n_iter_ = int(result.nit)
        self._store_parameters(result.x, n_classes)

    def _loss_and_grad(self, theta, X, y, sample_weight, total_weight):
        """Mean (weighted) NLL plus penalty, and its gradient, streamed in chunks."""
        loss, grad = 0.0, np.zeros_like(theta)
        for part in iter_chunks(len(y), self.chunk_size):
            x = self._inputs(self._to_logits(X[part]).astype(np.float64))
            w = None if sample_weight is None else sample_weight[part]
            chunk_loss, g = _softmax_ce_grad(self._apply(theta, x), y[part], w)
            loss += chunk_loss
            grad += self._parameter_gradient(theta, x, g)
        reg_loss, reg_grad = self._penalty(theta, X.shape[1])
        return loss / total_weight + reg_loss, grad / total_weight + reg_grad

    def _penalty(self, theta, n_classes):
        return 0.0, np.zeros_like(theta)

    def _scale_chunk(self, z):
        theta = self._parameters()
        x = self._inputs(z.astype(np.float64))
        with np.errstate(over="ignore", invalid="ignore"):
            v = self._apply(theta, x)
        if not np.isfinite(v).all():
            # logits near the top of float64: the map of z / 2^k, shifted by its row maximum,
            # then scaled back (the top is 0, the rest at worst -inf: probability 0)
            big = float(np.max(np.abs(x)))
            k = float(2.0 ** np.ceil(np.log2(big)))
            v = self._apply_scaled(theta, x / k, k)
            with np.errstate(over="ignore"):
                v = (v - v.max(axis=1, keepdims=True)) * k
            if np.isnan(v).any():
                raise ValueError(
                    f"{type(self).__name__}: the calibrated logits of these inputs overflow "
                    "float64; divide the logits by a constant before calibrating."
                )
            return v.astype(z.dtype)
        # shifted by the row maximum in float64, so the cast to float32 cannot overflow
        v -= v.max(axis=1, keepdims=True)
        return v.astype(z.dtype)

    def _top_index(self, z, scaled):
        return np.argmax(scaled, axis=1)

    def predict(self, X):
        """The calibrated argmax. Unlike temperature scaling, an affine map can move it.

        It is the argmax of :meth:`predict_proba` on every row.
        """
        X = self._validate_predict_data(X)
        out = np.empty(X.shape[0], dtype=np.int64)
        for part in iter_chunks(X.shape[0], self.chunk_size):
            z = self._to_logits(X[part]).astype(self._work_dtype(X), copy=False)
            out[part] = np.argmax(self._scale_chunk(z), axis=1)
        return self.classes_[out]


class VectorScaling(_AffineLogitCalibrator):
    """Vector scaling: ``softmax(w * logits + b)`` with a weight and a bias per class.

    Called "logistic scaling" in the selective-scaling paper. It may change the
    predicted class (its ``predict`` is the calibrated argmax).

    Parameters
    ----------
    input_type : {"logits", "probabilities"}, default="logits"
    ignore_index : int or None, default=255
    max_iter : int, default=200
        L-BFGS iterations.
    chunk_size : int, default=65536

    Attributes
    ----------
    coef_ : ndarray of shape (n_classes,)
    intercept_ : ndarray of shape (n_classes,)

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal import VectorScaling
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=2000)
    >>> logits = 5.0 * (np.eye(3)[y] + rng.normal(size=(2000, 3)))
    >>> VectorScaling().fit(logits, y).coef_.round(1).tolist()
    [0.2, 0.2, 0.2]
    """

    _parameter_constraints: dict = {
        **BaseLogitCalibrator._parameter_constraints,
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
    }

    def __init__(self, *, input_type="logits", ignore_index=255, max_iter=200, chunk_size=65536):
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.max_iter = max_iter
        self.chunk_size = chunk_size

    def _initial_parameters(self, n_classes):
        return np.r_[np.ones(n_classes), np.zeros(n_classes)]

    @staticmethod
    def _apply(theta, x):
        c = x.shape[1]
        return x * theta[:c] + theta[c:]

    @staticmethod
    def _parameter_gradient(theta, x, g):
        return np.r_[(g * x).sum(axis=0), g.sum(axis=0)]

    @staticmethod
    def _apply_scaled(theta, x, k):
        """``_apply(theta, x * k) / k`` without forming ``x * k``."""
        c = x.shape[1]
        return x * theta[:c] + theta[c:] / k

    def _store_parameters(self, theta, n_classes):
        self.coef_, self.intercept_ = theta[:n_classes], theta[n_classes:]

    def _parameters(self):
        return np.r_[self.coef_, self.intercept_]


class DirichletScaling(_AffineLogitCalibrator):
    """Dirichlet (matrix) scaling with ODIR regularisation (Kull et al., NeurIPS 2019).

    Calibrated logits are ``W @ log_softmax(logits) + b``. ODIR penalises the
    off-diagonal entries of ``W`` and the biases, which keeps the C x C matrix
    from over-fitting:
    ``NLL + l2_offdiag * sum_{i != j} W_ij^2 / (C (C - 1)) + l2_intercept * sum b^2 / C``.
    It may change the predicted class.

    Parameters
    ----------
    l2_offdiag : float, default=1e-3
    l2_intercept : float, default=1e-3
    input_type, ignore_index, max_iter, chunk_size
        As in :class:`VectorScaling`.

    Attributes
    ----------
    coef_ : ndarray of shape (n_classes, n_classes)
    intercept_ : ndarray of shape (n_classes,)

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal import DirichletScaling
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=2000)
    >>> logits = 5.0 * (np.eye(3)[y] + rng.normal(size=(2000, 3)))
    >>> DirichletScaling().fit(logits, y).coef_.shape
    (3, 3)
    """

    _parameter_constraints: dict = {
        **VectorScaling._parameter_constraints,
        "l2_offdiag": [Interval(numbers.Real, 0, None, closed="left")],
        "l2_intercept": [Interval(numbers.Real, 0, None, closed="left")],
    }

    def __init__(
        self,
        *,
        l2_offdiag=1e-3,
        l2_intercept=1e-3,
        input_type="logits",
        ignore_index=255,
        max_iter=200,
        chunk_size=65536,
    ):
        self.l2_offdiag = l2_offdiag
        self.l2_intercept = l2_intercept
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.max_iter = max_iter
        self.chunk_size = chunk_size

    def _inputs(self, z):
        # floored where exp underflows to 0 anyway, so that W @ x stays finite
        return np.maximum(log_softmax(z), LOG_PROBA_FLOOR)

    @staticmethod
    def _apply_scaled(theta, x, k):
        c = x.shape[1]
        return x @ theta[: c * c].reshape(c, c).T + theta[c * c :] / k

    def _initial_parameters(self, n_classes):
        return np.r_[np.eye(n_classes).ravel(), np.zeros(n_classes)]

    @staticmethod
    def _apply(theta, x):
        c = x.shape[1]
        return x @ theta[: c * c].reshape(c, c).T + theta[c * c :]

    @staticmethod
    def _parameter_gradient(theta, x, g):
        return np.r_[(g.T @ x).ravel(), g.sum(axis=0)]

    def _penalty(self, theta, n_classes):
        c = n_classes
        W = theta[: c * c].reshape(c, c)
        off = W - np.diag(np.diag(W))
        b = theta[c * c :]
        scale_w = self.l2_offdiag / max(c * (c - 1), 1)
        scale_b = self.l2_intercept / c
        loss = scale_w * (off**2).sum() + scale_b * (b**2).sum()
        return loss, np.r_[(2 * scale_w * off).ravel(), 2 * scale_b * b]

    def _store_parameters(self, theta, n_classes):
        c = n_classes
        self.coef_, self.intercept_ = theta[: c * c].reshape(c, c), theta[c * c :]

    def _parameters(self):
        return np.r_[self.coef_.ravel(), self.intercept_]


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

    _bounds = (0.01, 100.0)

    def __init__(self, *, input_type="logits", ignore_index=255, chunk_size=65536):
        self.input_type = input_type
        self.ignore_index = ignore_index
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
        self.temperature_, fit = fit_temperature(
            Z, y, sample_weight=sample_weight, bounds=self._bounds, chunk_size=self.chunk_size
        )
        self.n_iter_ = fit.n_iter
        warn_fit(fit, ["the temperature"], self._bounds, owner=type(self).__name__,
                 stacklevel=4)
        # the labelled class's probability under each term: all the weight fit needs
        Q = np.empty((len(y), 3))
        Q[:, 2] = 1.0 / Z.shape[1]
        for part in iter_chunks(len(y), self.chunk_size):
            tempered, original = self._terms(Z[part], self.temperature_)
            r = np.arange(tempered.shape[0])
            Q[part, 0], Q[part, 1] = tempered[r, y[part]], original[r, y[part]]
        self.weights_ = _simplex_mixture_weights(Q, sample_weight)

    def _scale_chunk(self, z):
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
    likely errors and get the temperature ``t_reject`` (by default 1e10, a
    uniform distribution, as the selective-scaling paper's Meta-Cal column);
    the others are temperature-scaled by NLL. The threshold is the entropy
    quantile that rejects ``rejection_rate`` of the fit pixels.

    Parameters
    ----------
    rejection_rate : float in (0, 1), default=0.05
    t_reject : float or "auto", default=1e10
        "auto" fits it by NLL on the rejected fit pixels.
    input_type, ignore_index, chunk_size
        As in :class:`TemperatureScaling`.

    Attributes
    ----------
    entropy_threshold_ : float
    temperature_ : float
        Temperature of the accepted pixels.
    t_reject_ : float

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
        "t_reject": [Interval(numbers.Real, 0, None, closed="neither"), StrOptions({"auto"})],
    }

    def __init__(
        self,
        *,
        rejection_rate=0.05,
        t_reject=1e10,
        input_type="logits",
        ignore_index=255,
        chunk_size=65536,
    ):
        self.rejection_rate = rejection_rate
        self.t_reject = t_reject
        self.input_type = input_type
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    @staticmethod
    def _entropy(z):
        # log-probabilities floored where exp underflows to 0 anyway: 0 * log 0 is 0, not NaN
        with np.errstate(over="ignore"):  # float32 logit gaps beyond 3e38 become -inf
            lp = np.maximum(log_softmax(z), LOG_PROBA_FLOOR)
        return -(np.exp(lp) * lp).sum(axis=1)

    def _fit_calibration(self, X, y, sample_weight, groups=None):
        Z = self._to_logits(X).astype(self._work_dtype(X), copy=False)
        entropy = np.concatenate(
            [self._entropy(Z[p]) for p in iter_chunks(len(y), self.chunk_size)]
        )
        self.entropy_threshold_ = _weighted_quantile(
            entropy, 1 - self.rejection_rate, sample_weight
        )
        reject = entropy > self.entropy_threshold_
        owner = type(self).__name__
        bounds = (0.01, 100.0)
        self.temperature_, fit = fit_temperature(
            Z, y, sample_weight=sample_weight, rows=~reject, bounds=bounds,
            chunk_size=self.chunk_size,
        )
        warn_fit(fit, ["the temperature of accepted pixels"], bounds, owner=owner, stacklevel=4)
        self.n_iter_ = fit.n_iter
        if self.t_reject != "auto":
            self.t_reject_ = float(self.t_reject)
        elif reject.any():
            bounds = (0.01, 1e10)
            self.t_reject_, fit = fit_temperature(
                Z, y, sample_weight=sample_weight, rows=reject, bounds=bounds,
                chunk_size=self.chunk_size,
            )
            warn_fit(fit, ["t_reject"], bounds, owner=owner, stacklevel=4)
            self.n_iter_ += fit.n_iter
        else:
            self.t_reject_ = self.temperature_

    def rejected(self, X) -> np.ndarray:
        """Whether each pixel falls above the entropy threshold."""
        X = self._validate_predict_data(X)
        return np.concatenate(
            [
                self._entropy(self._to_logits(X[p]).astype(self._work_dtype(X)))
                > self.entropy_threshold_
                for p in iter_chunks(X.shape[0], self.chunk_size)
            ]
        )

    def _row_inverse_temperatures(self, z):
        return np.where(
            self._entropy(z) > self.entropy_threshold_,
            1.0 / self.t_reject_,
            1.0 / self.temperature_,
        ).astype(z.dtype)

    def _scale_chunk(self, z):
        return scale_logits(z, self._row_inverse_temperatures(z))
