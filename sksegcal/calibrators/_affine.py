"""Vector and Dirichlet scaling: affine maps of the logits, fitted by L-BFGS.

Unlike the temperature models they can change the predicted class.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy.optimize import minimize
from sklearn.utils._param_validation import Interval

from ..features import log_softmax
from ._base import LOG_PROBA_FLOOR, BaseLogitCalibrator
from ._solver import iter_chunks

__all__ = ["DirichletScaling", "VectorScaling"]


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

    def _scale_chunk(self, z, extra=None):
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


