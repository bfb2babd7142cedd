"""Local temperature scaling: a temperature per pixel from its neighbourhood (logits only)."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ._base import BaseLogitCalibrator, iter_chunks
from ._softplus_temperature import (
    fit_softplus_temperature,
    softplus,
    softplus_inverse,
    softplus_nll,
    standardisation,
)
from ._validation import check_finite, check_labels
from .context import CONTEXT_FEATURES, n_context_features
from .features import log_softmax, softmax

__all__ = ["LocalTemperatureScaling"]

# the working precision's epsilon times this is the least scaled gap between the top two
# logits of a row: p1 / p2 >= 1 + 4 eps survives the rounding of the softmax, so the top
# class stays strictly first (see _row_betas)
_GAP_ULPS = 4.0
_CONFIDENCE_NAMES = ("max_log_proba", "entropy")


def _confidence_stats(z: np.ndarray) -> np.ndarray:
    """Max log-probability and entropy of softmax(z), (n, 2) float64."""
    lp = log_softmax(np.asarray(z, dtype=np.float64))
    entropy = -(np.exp(lp) * lp).sum(axis=1)
    return np.column_stack([lp.max(axis=1), entropy])


class LocalTemperatureScaling(BaseLogitCalibrator):
    """A temperature per pixel, predicted from the pixel's local context.

    Calibrated probabilities are ``softmax(beta(x) * z)`` with the inverse
    temperature ``beta(x) = softplus(w . phi(x) + b)``, where ``z`` are the
    pixel's C logits and ``phi(x)`` its standardised context features (the
    columns :func:`~sksegcal.pixels.flatten_segmentation` appends with
    ``context="spatial"``: neighbour disagreement, distance to the predicted
    boundary, local entropy and margin; see :mod:`sksegcal.context`) and,
    with ``confidence_features=True``, the pixel's own max log-probability
    and entropy. ``w`` and ``b`` minimise the mean NLL plus ``l2 / 2 * |w|^2``
    by L-BFGS with an analytic gradient, the data streamed in row chunks and
    accumulated in float64, starting from temperature scaling (``w = 0``,
    ``softplus(b) = 1 / T_TS``): with context that carries no signal it stays
    temperature scaling.

    How it differs from LTS (Ding et al., ICCV 2021): theirs is a small CNN
    that reads the logits *and the RGB image* and outputs a temperature map;
    ours reads the logits only, through fixed hand-made neighbourhood
    features and a generalised linear model (a dozen parameters, convex in
    nothing but cheap and stable). It needs no image, no GPU and no
    architecture choice, and it cannot learn image appearance cues.

    A positive temperature never changes the predicted class: ``predict`` is
    the argmax of the logit columns and ``predict_proba``'s argmax equals it
    on every row, in float32 too. For that ``beta`` is capped from below, at
    ``1 / max_temperature`` and, per row, where the top two logits are so
    close that a smaller ``beta`` would round them to a tie.

    Parameters
    ----------
    n_context : int or None, default=None
        Number of context columns, the last ones of ``X``; the first
        ``C = n_features - n_context`` columns are the logits. None: the
        ``sksegcal.context.n_context_features()`` (6) spatial columns, i.e.
        ``X`` is the output of ``flatten_segmentation(..., context="spatial")``.
        An int takes a context of your own (0: no context, the temperature
        then depends on the confidence features alone). The context width,
        not the class count, is the parameter: it does not change with the
        segmentation model, so one configuration serves every model.
    confidence_features : bool, default=True
        Also feed the pixel's max log-probability and entropy to ``beta``.
    l2 : float, default=1e-4
        Ridge penalty on ``w`` (not on ``b``), on standardised features.
    max_iter : int, default=100
        L-BFGS iterations.
    tol : float, default=1e-7
        L-BFGS tolerance on the projected gradient.
    max_temperature : float, default=100
        Upper cap of every temperature (lower cap of ``beta``).
    ignore_index : int or None, default=255
        Label of unlabelled pixels; left out of ``fit`` and ``score``.
    chunk_size : int, default=65536
        Rows processed at a time.

    Attributes
    ----------
    coef_ : ndarray of shape (n_inputs,)
        ``w``, on the standardised inputs (context columns, then the
        confidence features).
    intercept_ : float
        ``b``.
    feature_mean_, feature_scale_ : ndarray of shape (n_inputs,)
        The standardisation (a constant input gets scale 1, hence weight 0).
    input_names_ : tuple of str
        Names of the inputs of ``beta``.
    ts_temperature_ : float
        Temperature scaling's temperature on the fit data (the start).
    n_iter_ : int
        L-BFGS iterations taken.
    converged_ : bool
        Whether L-BFGS met its tolerance (a ConvergenceWarning otherwise).
    n_classes_ : int
        C.
    classes_ : ndarray of shape (C,)
        ``arange(C)``.
    n_features_in_ : int
        C plus the number of context columns.

    See Also
    --------
    TemperatureScaling : one temperature for every pixel.
    SelectiveScalingCalibrator : a temperature chosen by a misprediction detector.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal import LocalTemperatureScaling
    >>> from sksegcal.pixels import flatten_segmentation
    >>> rng = np.random.default_rng(0)
    >>> labels = np.zeros((4, 16, 16), dtype=int)
    >>> labels[:, :, 8:] = 1
    >>> logits = 4.0 * (np.moveaxis(np.eye(2)[labels], -1, 1) + rng.normal(size=(4, 2, 16, 16)))
    >>> X, y, groups = flatten_segmentation(logits.astype(np.float32), labels, context="spatial")
    >>> lts = LocalTemperatureScaling().fit(X, y)
    >>> lts.predict_proba(X).shape
    (1024, 2)
    >>> bool((lts.predict_proba(X).argmax(axis=1) == lts.predict(X)).all())
    True
    """

    _parameter_constraints: dict = {
        **BaseLogitCalibrator._parameter_constraints,
        "n_context": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "confidence_features": ["boolean"],
        "l2": [Interval(numbers.Real, 0, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="neither")],
        "max_temperature": [Interval(numbers.Real, 0, None, closed="neither")],
    }
    _parameter_constraints.pop("input_type", None)

    def __init__(
        self,
        *,
        n_context: int | None = None,
        confidence_features: bool = True,
        l2: float = 1e-4,
        max_iter: int = 100,
        tol: float = 1e-7,
        max_temperature: float = 100.0,
        ignore_index: int | None = 255,
        chunk_size: int = 65536,
    ):
        self.n_context = n_context
        self.confidence_features = confidence_features
        self.l2 = l2
        self.max_iter = max_iter
        self.tol = tol
        self.max_temperature = max_temperature
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    # the base class reads it; this calibrator takes logits only
    input_type = "logits"

    @property
    def reads_context(self) -> str | None:
        """``"spatial"`` for ``n_context=None``, None for 0, ``"custom"`` for columns of your own.

        No path computes a ``"custom"`` context: build those pixel tables yourself.
        """
        if self.n_context is None:
            return "spatial"
        return None if self.n_context == 0 else "custom"

    # ---------------------------------------------------------------- inputs
    def _split_width(self, n_features: int) -> int:
        """The number of logit columns C."""
        n_context = n_context_features() if self.n_context is None else int(self.n_context)
        n_classes = n_features - n_context
        if n_classes < 2:
            layout = (
                "the spatial context columns of flatten_segmentation(..., context='spatial')"
                if self.n_context is None
                else "the context columns"
            )
            raise ValueError(
                f"X has {n_features} feature(s) (columns) but LocalTemperatureScaling(n_context="
                f"{self.n_context}) expects C >= 2 logit columns followed by {n_context} "
                f"context columns ({layout}); set n_context to the number of context columns."
            )
        return n_classes

    def _inputs(self, X: np.ndarray) -> np.ndarray:
        """Unstandardised inputs of beta for a chunk of rows, (n, n_inputs) float64."""
        parts = [np.asarray(X[:, self.n_classes_ :], dtype=np.float64)]
        if self.confidence_features:
            parts.append(_confidence_stats(X[:, : self.n_classes_]))
        return np.concatenate(parts, axis=1)

    def _phi(self, X: np.ndarray) -> np.ndarray:
        return (self._inputs(X) - self.feature_mean_) / self.feature_scale_

    # --------------------------------------------------------------- fitting
    def fit(self, X, y, sample_weight=None):
        """Fit ``w`` and ``b`` by penalised NLL, starting from temperature scaling.

        Parameters
        ----------
        X : array-like of shape (n_pixels, C + K)
            Logits followed by the context columns.
        y : array-like of shape (n_pixels,)
            Class indices in ``[0, C)``; ``ignore_index`` pixels are left out.
        sample_weight : array-like of shape (n_pixels,), default=None

        Returns
        -------
        self : object
        """
        self._validate_params()
        X, y = validate_data(
            self, X, y, dtype=[np.float32, np.float64], ensure_min_features=1, y_numeric=False
        )
        check_finite(X, where="X")
        n_classes = self._split_width(X.shape[1])
        y = check_labels(y, n_classes, self.ignore_index)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
        if self.ignore_index is not None:
            keep = y != self.ignore_index
            if not keep.any():
                raise ValueError(
                    f"Every pixel has the ignore index {self.ignore_index}; nothing to fit on."
                )
            if not keep.all():
                X, y = X[keep], y[keep]
                sample_weight = None if sample_weight is None else sample_weight[keep]
        y = y.astype(np.int64, copy=False)
        self.n_classes_ = n_classes
        self.classes_ = np.arange(n_classes)
        n_context = X.shape[1] - n_classes
        names = (
            CONTEXT_FEATURES
            if self.n_context is None
            else tuple(f"context_{j}" for j in range(n_context))
        )
        self.input_names_ = names + (_CONFIDENCE_NAMES if self.confidence_features else ())

        w = np.ones(len(y)) if sample_weight is None else sample_weight
        total_weight = float(w.sum())
        if not total_weight > 0:
            raise ValueError("sample_weight sums to zero; give some pixels a positive weight.")

        # standardisation (weighted), chunk by chunk
        n_inputs = len(self.input_names_)
        self.feature_mean_, self.feature_scale_, constant = standardisation(
            lambda part: self._inputs(X[part]), len(y), n_inputs, w, self.chunk_size
        )

        # start: temperature scaling on the same rows
        from .scaling import TemperatureScaling

        ts = TemperatureScaling(
            ignore_index=None,
            chunk_size=self.chunk_size,
            temperature_bounds=(1.0 / (1e4 * self.max_temperature), self.max_temperature),
        )
        ts.fit(np.ascontiguousarray(X[:, :n_classes]), y, sample_weight=sample_weight)
        self.ts_temperature_ = float(ts.temperature_)
        theta0 = np.zeros(n_inputs + 1)
        theta0[-1] = softplus_inverse(1.0 / self.ts_temperature_)

        def objective(theta, hessian):
            return softplus_nll(
                theta,
                X[:, :n_classes],
                y,
                lambda part: self._phi(X[part]),
                sample_weight=sample_weight,
                l2=self.l2,
                hessian=hessian,
                chunk_size=self.chunk_size,
            )

        result = fit_softplus_temperature(
            objective,
            theta0,
            constant=constant,
            method="lbfgs",
            max_iter=self.max_iter,
            tol=self.tol,
        )
        theta = result.theta
        self.coef_ = theta[:-1].copy()
        self.intercept_ = float(theta[-1])
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        if not self.converged_:
            warnings.warn(
                f"LocalTemperatureScaling did not converge in {self.n_iter_} L-BFGS "
                f"iterations ({result.message}); raise max_iter or l2.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    # not used: fit and prediction are overridden, but the base declares them
    def _fit_calibration(self, X, y, sample_weight, groups=None):  # pragma: no cover
        raise NotImplementedError

    def _scale_chunk(self, z):  # pragma: no cover
        raise NotImplementedError

    def _softmax_temperatures(self, X):
        # X holds context columns besides the logits: no shortcut through softmax(X / T)
        return None

    # ------------------------------------------------------------ prediction
    def _validate_predict_data(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float32, np.float64])

    def _row_betas(self, X: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Inverse temperatures of a chunk, capped so that the top class stays first.

        ``z`` holds the chunk's logits shifted by their row maximum, in the
        working precision.
        """
        beta = softplus(self._phi(X) @ self.coef_ + self.intercept_)
        beta = np.maximum(beta, 1.0 / self.max_temperature)
        if z.shape[1] > 1:
            # gap between the top two logits (0 for a tie, which stays a tie)
            second = -np.partition(-z, 1, axis=1)[:, 1]
            gap = -second.astype(np.float64)
            floor = _GAP_ULPS * np.finfo(z.dtype).eps / np.where(gap > 0, gap, np.inf)
            beta = np.maximum(beta, floor)
        return beta

    def _calibrated_logits(self, X: np.ndarray, dtype) -> np.ndarray:
        z = X[:, : self.n_classes_].astype(dtype, copy=True)
        z -= z.max(axis=1, keepdims=True)
        z *= self._row_betas(X, z).astype(dtype)[:, None]
        return z

    def temperatures(self, X) -> np.ndarray:
        """The temperature ``1 / beta`` of each row (float64), caps included."""
        X = self._validate_predict_data(X)
        out = np.empty(X.shape[0])
        dtype = self._work_dtype(X)
        for part in iter_chunks(X.shape[0], self.chunk_size):
            z = X[part, : self.n_classes_].astype(dtype, copy=True)
            z -= z.max(axis=1, keepdims=True)
            out[part] = 1.0 / self._row_betas(X[part], z)
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities (n_pixels, C), chunk by chunk.

        float64 for float64 input, float32 otherwise. The argmax of every
        row is :meth:`predict`'s class.
        """
        X = self._validate_predict_data(X)
        dtype = self._work_dtype(X)
        out = np.empty((X.shape[0], self.n_classes_), dtype=dtype)
        for part in iter_chunks(X.shape[0], self.chunk_size):
            softmax(self._calibrated_logits(X[part], dtype), out=out[part])
        return out

    def predict_log_proba(self, X) -> np.ndarray:
        """Calibrated log-probabilities (n_pixels, C), chunk by chunk."""
        X = self._validate_predict_data(X)
        dtype = self._work_dtype(X)
        out = np.empty((X.shape[0], self.n_classes_), dtype=dtype)
        for part in iter_chunks(X.shape[0], self.chunk_size):
            log_softmax(self._calibrated_logits(X[part], dtype), out=out[part])
        return out

    def predict(self, X) -> np.ndarray:
        """The class the segmentation model predicted: the argmax of the logit columns."""
        X = self._validate_predict_data(X)
        return self.classes_[np.argmax(X[:, : self.n_classes_], axis=1)]

    def score(self, X, y, sample_weight=None) -> float:
        """Negative mean log loss of the calibrated probabilities (greater is better).

        Pixels whose label is ``ignore_index`` are left out.
        """
        X = self._validate_predict_data(X)
        y = check_labels(y, self.n_classes_, self.ignore_index)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}.")
        w = None if sample_weight is None else _check_sample_weight(sample_weight, X)
        keep = np.ones(len(y), bool) if self.ignore_index is None else y != self.ignore_index
        if not keep.any():
            raise ValueError(f"Every pixel has the ignore index {self.ignore_index}.")
        dtype = self._work_dtype(X)
        total, weight = 0.0, 0.0
        for part in iter_chunks(X.shape[0], self.chunk_size):
            k = keep[part]
            lp = log_softmax(self._calibrated_logits(X[part][k], dtype))
            picked = lp[np.arange(lp.shape[0]), y[part][k]].astype(np.float64)
            if w is None:
                total += picked.sum()
                weight += picked.shape[0]
            else:
                total += picked @ w[part][k]
                weight += w[part][k].sum()
        return float(total / weight)
