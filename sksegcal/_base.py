"""The estimator base every calibrator of this package shares.

A calibrator here maps a pixel table of logits (n_pixels, n_classes) to
calibrated probabilities without ever changing the predicted class. This
base holds the input conventions (logits or probabilities, the ignore index),
the chunked prediction loop and the calibration-aware ``score``; subclasses
only say how to rescale one chunk of logits.
"""

from __future__ import annotations

import numbers
import sys
import warnings
from abc import abstractmethod
from collections.abc import Iterator

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ._validation import (
    check_finite,
    check_labels,
    check_pixel_table,
    warn_float_labels,
    warn_probabilities_as_logits,
)
from .features import log_softmax, softmax

# probabilities are floored here before the log; about exp(-69)
_PROBA_FLOOR = 1e-30


def iter_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


# log-probabilities are floored here where a model of log-probabilities takes them as input
# (Dirichlet scaling, entropies): exp(-1e4) is exactly 0 in every float format, so nothing but
# an overflow (-inf, then 0 * -inf = NaN) changes
LOG_PROBA_FLOOR = -1e4


def make_top_strict(values: np.ndarray, top: np.ndarray, *, log: bool = False) -> np.ndarray:
    """Make ``values[i, top[i]]`` the strict first maximum of each row, in place.

    ``values`` are probabilities, or log-probabilities with ``log=True``.
    Rows where rounding tied (or reordered) the class ``top`` with another get
    it raised to the next representable value above the row's largest other
    entry: one unit in the last place, so probabilities still sum to one to
    rounding and ``values.argmax(1) == top``.
    """
    first = np.argmax(values, axis=1)
    bad = first != top
    # a tie with a later class leaves argmax right but the class not strictly first; a tie
    # needs the top value to be at most half the row's mass (a probability <= 1/2)
    r = np.arange(values.shape[0])
    half = np.log(0.5) if log else 0.5
    maybe = np.flatnonzero(~bad & (values[r, top] <= half))
    if maybe.size:
        last = values.shape[1] - 1 - np.argmax(values[maybe, ::-1], axis=1)
        bad[maybe[last != top[maybe]]] = True
    bad = np.flatnonzero(bad)
    if bad.size:
        values[bad, top[bad]] = np.nextafter(
            values[bad, first[bad]], np.asarray(np.inf, dtype=values.dtype)
        )
    return values


def scale_logits(z: np.ndarray, beta) -> np.ndarray:
    """``beta * z`` (``beta`` a scalar or one per row) up to a per-row shift, never overflowing.

    Softmax ignores a constant per row. When ``beta * z`` could overflow the
    chunk's dtype, the row maximum is subtracted first (the top becomes 0 and
    the rest go to -inf at worst, probability 0, which is right).
    """
    b = beta if np.ndim(beta) == 0 else np.asarray(beta)[:, None]
    if z.size == 0:
        return z * b
    big = float(max(abs(float(z.max())), abs(float(z.min()))))
    if big * float(np.max(beta)) < np.finfo(z.dtype).max / 8:
        return z * b
    with np.errstate(over="ignore", invalid="ignore"):
        d = z - z.max(axis=1, keepdims=True)
        return d * b


class BaseLogitCalibrator(ClassifierMixin, BaseEstimator):
    """Shared machinery; not for direct use.

    Subclasses implement ``_fit_calibration(Z, y, sample_weight, **fit_params)``
    on validated logits and ``_scale_chunk(z)`` returning rescaled logits of
    one chunk.
    """

    _parameter_constraints: dict = {
        "input_type": [StrOptions({"logits", "probabilities"})],
        "ignore_index": [numbers.Integral, None],
        "chunk_size": [Interval(numbers.Integral, 1, None, closed="left")],
    }

    # ----------------------------------------------------------- input handling
    def _n_extra_columns(self) -> int:
        """Columns after the C class columns of X that only the calibrator reads (context).

        0 for every calibrator but those given spatial context columns: X is then
        (n, C + K), the probabilities (n, C), and only ``_scale_chunk`` sees the K columns.
        """
        return 0

    def _split_chunk(self, X: np.ndarray):
        """(class columns, extra columns or None) of a validated chunk."""
        k = self._n_extra_columns()
        if not k:
            return X, None
        return X[:, : X.shape[1] - k], X[:, X.shape[1] - k:]

    def _scale_with(self, z: np.ndarray, extra) -> np.ndarray:
        return self._scale_chunk(z) if extra is None else self._scale_chunk(z, extra)

    def _to_logits(self, X: np.ndarray) -> np.ndarray:
        """Logits from the input chunk, as float32 or float64."""
        if self.input_type == "logits":
            return X
        if np.any(X < 0) or np.any(X > 1 + 1e-3):
            raise ValueError(
                "input_type='probabilities' but X has values outside [0, 1]; pass "
                "input_type='logits' for raw network outputs."
            )
        # log-probabilities are logits up to a per-row constant
        return np.log(np.maximum(X, _PROBA_FLOOR))

    def _validate_fit_data(self, X, y, sample_weight=None, groups=None):
        """Validated X, y, sample_weight and groups with ignored pixels removed."""
        # scikit-learn's finiteness test sums X: logits near the float maximum overflow in that
        # sum (a warning, then an exact element-wise test), which is no fault of the data
        check_pixel_table(X, owner=type(self).__name__)
        warn_float_labels(y, owner=type(self).__name__)
        with np.errstate(over="ignore", invalid="ignore"):
            X, y = validate_data(
                self,
                X,
                y,
                dtype=[np.float32, np.float64],
                ensure_min_features=2,
                ensure_min_samples=1,
                y_numeric=False,
            )
        n_classes = X.shape[1] - self._n_extra_columns()
        if n_classes < 2:
            raise ValueError(
                f"X has {X.shape[1]} columns, {self._n_extra_columns()} of them context: "
                "fewer than 2 class columns are left."
            )
        y = check_labels(y, n_classes, self.ignore_index)
        warn_probabilities_as_logits(X, n_classes, self.input_type, owner=type(self).__name__)
        if sample_weight is not None:
            # negative weights would reward a worse fit (scikit-learn rejects them the same way)
            sample_weight = _check_sample_weight(
                sample_weight, X, dtype=np.float64, ensure_non_negative=True
            )
        if groups is not None:
            groups = np.asarray(groups).reshape(-1)
            if groups.shape[0] != X.shape[0]:
                raise ValueError(
                    f"groups has {groups.shape[0]} entries but X has {X.shape[0]} rows; "
                    "give one image id per pixel."
                )
        self.classes_ = np.arange(n_classes)
        if self.ignore_index is not None:
            keep = y != self.ignore_index
            if not keep.any():
                raise ValueError(
                    f"Every pixel has the ignore index {self.ignore_index}; there is nothing "
                    "to fit on."
                )
            if not keep.all():
                X, y = X[keep], y[keep]
                if sample_weight is not None:
                    sample_weight = sample_weight[keep]
                if groups is not None:
                    groups = groups[keep]
        return X, y.astype(np.int64, copy=False), sample_weight, groups

    def _validate_predict_data(self, X) -> np.ndarray:
        check_is_fitted(self)
        check_pixel_table(X, owner=type(self).__name__)
        with np.errstate(over="ignore", invalid="ignore"):  # as in _validate_fit_data
            X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return X

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y, sample_weight=None):
        """Fit the calibrator.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes)
            Logits (or probabilities with ``input_type="probabilities"``).
        y : array-like of shape (n_pixels,)
            Class indices in ``[0, n_classes)``; pixels equal to
            ``ignore_index`` are left out.
        sample_weight : array-like of shape (n_pixels,), default=None
            Per-pixel weights.

        Returns
        -------
        self : object
            The fitted calibrator.
        """
        self._validate_params()
        X, y, sample_weight, _ = self._validate_fit_data(X, y, sample_weight)
        self._fit_calibration(X, y, sample_weight)
        return self

    @abstractmethod
    def _fit_calibration(self, X, y, sample_weight, groups=None): ...

    @abstractmethod
    def _scale_chunk(self, z: np.ndarray) -> np.ndarray:
        """Calibrated logits of one chunk of logits, in the chunk's dtype."""

    def _row_inverse_temperatures(self, z: np.ndarray):
        """``beta`` (one, or one per row) with ``_scale_chunk(z) == beta * z``, or None.

        Temperature-based calibrators define it, so that the calibrated
        probabilities are ``softmax(z / T)`` and evaluation can score them
        straight from the logits (``CalibrationAccumulator.update_logits``).
        """
        return None

    def _softmax_temperatures(self, X: np.ndarray):
        """T (a float or one per row) with ``predict_proba(X) == softmax(X / T)``, or None.

        ``X`` is a validated (n, C) float chunk of logits.
        """
        if self.input_type != "logits" or self._n_extra_columns():
            return None
        parts = iter_chunks(len(X), self.chunk_size)
        betas = [self._row_inverse_temperatures(X[part]) for part in parts]
        if not betas or betas[0] is None:
            return None
        if np.ndim(betas[0]) == 0:
            return 1.0 / float(betas[0])
        return 1.0 / np.concatenate(betas).astype(np.float64)

    # --------------------------------------------------------------- prediction
    @staticmethod
    def _work_dtype(X: np.ndarray) -> type:
        # float64 input is computed and returned in float64 (exact, row-order independent
        # to the last bit); everything else, float16 included, in float32 to save memory
        return np.float64 if X.dtype == np.float64 else np.float32

    def _calibrated_log_proba(self, X: np.ndarray, out: np.ndarray, strict=False) -> np.ndarray:
        for part in iter_chunks(X.shape[0], self.chunk_size):
            cols, extra = self._split_chunk(X[part])
            z = self._to_logits(cols).astype(out.dtype, copy=False)
            scaled = self._scale_with(z, extra)
            log_softmax(scaled, out=out[part])
            if strict:
                make_top_strict(out[part], self._top_index(z, scaled), log=True)
        return out

    def _top_index(self, z: np.ndarray, scaled: np.ndarray) -> np.ndarray:
        """The class ``predict`` returns for each row of a chunk (here the input argmax)."""
        return np.argmax(z, axis=1)

    def predict_log_proba(self, X) -> np.ndarray:
        """Calibrated log-probabilities, computed chunk by chunk.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes)

        Returns
        -------
        log_proba : ndarray of shape (n_pixels, n_classes)
            float64 for float64 input, float32 otherwise. Its argmax is
            ``predict(X)`` on every row (see :meth:`predict_proba`).
        """
        X = self._validate_predict_data(X)
        out = np.empty((X.shape[0], len(self.classes_)), dtype=self._work_dtype(X))
        return self._calibrated_log_proba(X, out, strict=True)

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities, computed chunk by chunk.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes)

        Returns
        -------
        proba : ndarray of shape (n_pixels, n_classes)
            float64 for float64 input, float32 otherwise. Rows sum to one
            (to rounding). The argmax of every row is ``predict(X)``: where
            rounding in the working precision would tie the predicted class
            with another (a nearly flat row, a near-tie in the logits), its
            probability is raised to the next representable value above the
            other's, so ``predict_proba(X).argmax(1) == predict(X)`` always
            (exact ties in ``X`` resolve to the first class, as argmax does).
        """
        X = self._validate_predict_data(X)
        out = np.empty((X.shape[0], len(self.classes_)), dtype=self._work_dtype(X))
        for part in iter_chunks(X.shape[0], self.chunk_size):
            cols, extra = self._split_chunk(X[part])
            z = self._to_logits(cols).astype(out.dtype, copy=False)
            scaled = self._scale_with(z, extra)
            # softmax directly (one exp per entry) rather than exp(log_softmax): this loop is
            # the hot path of evaluating a store
            softmax(scaled, out=out[part])
            make_top_strict(out[part], self._top_index(z, scaled))
        return out

    def predict(self, X) -> np.ndarray:
        """The class the segmentation model predicted: the argmax of ``X``.

        Calibration never changes it, whatever the temperatures: dividing
        logits by a positive temperature preserves their order.
        """
        X = self._validate_predict_data(X)
        return self.classes_[np.argmax(X[:, : len(self.classes_)], axis=1)]

    def score(self, X, y, sample_weight=None) -> float:
        """Negative mean log loss (NLL) of the calibrated probabilities.

        scikit-learn's classifiers score by accuracy, but a calibrator never
        changes the predicted class, so accuracy cannot tell two calibrators
        apart. The log loss is a proper scoring rule that rewards calibration
        and sharpness; greater is better, as scikit-learn expects, so
        ``GridSearchCV(scoring=None)`` chooses the lowest NLL. Pixels whose label
        is ``ignore_index`` are left out.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes)
        y : array-like of shape (n_pixels,)
        sample_weight : array-like of shape (n_pixels,), default=None

        Returns
        -------
        score : float
            ``-mean(log p_calibrated[y])`` over the non-ignored pixels.
        """
        X = self._validate_predict_data(X)
        y = check_labels(y, len(self.classes_), self.ignore_index)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}.")
        w = (
            None
            if sample_weight is None
            else _check_sample_weight(sample_weight, X, ensure_non_negative=True)
        )
        keep = np.ones(len(y), bool) if self.ignore_index is None else y != self.ignore_index
        if not keep.any():
            raise ValueError(f"Every pixel has the ignore index {self.ignore_index}.")
        total, weight = 0.0, 0.0
        buf = np.empty((min(self.chunk_size, X.shape[0]), len(self.classes_)),
                       dtype=self._work_dtype(X))
        for part in iter_chunks(X.shape[0], self.chunk_size):
            k = keep[part]
            lp = self._calibrated_log_proba(X[part][k], buf[: k.sum()])
            picked = lp[np.arange(lp.shape[0]), y[part][k]].astype(np.float64)
            if w is None:
                total += picked.sum()
                weight += picked.shape[0]
            else:
                total += (picked * w[part][k]).sum()
                weight += w[part][k].sum()
        return float(total / weight)

    # -------------------------------------------------------------- persistence
    def __getstate__(self):
        state = super().__getstate__()
        state["_sksegcal_versions"] = _library_versions()
        return state

    def __setstate__(self, state):
        saved = state.pop("_sksegcal_versions", None)
        if saved is not None:
            current = _library_versions()
            changed = {
                k: (v, current[k]) for k, v in saved.items() if k in current and current[k] != v
            }
            if changed:
                details = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
                warnings.warn(
                    f"This {type(self).__name__} was saved with other library versions "
                    f"({details}). It will usually work, but check its predictions; refit it "
                    "with the current versions to be sure.",
                    UserWarning,
                    stacklevel=2,
                )
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # predict is the argmax of the input logits: a calibrator cannot learn
        # to classify, so scikit-learn's accuracy checks do not apply
        tags.classifier_tags.poor_score = True
        tags.input_tags.allow_nan = False
        return tags


def _library_versions() -> dict[str, str]:
    """Versions that decide whether a saved calibrator behaves the same when loaded."""
    import sklearn

    from . import __version__

    versions = {"sksegcal": __version__, "scikit-learn": sklearn.__version__}
    # torch is recorded only when loaded (by the MLP); a saved baseline never needs it
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__.split("+")[0]
    return versions


# ------------------------------------------------------------- temperature fits
# Every temperature in this package is fitted through one solver. For a row z with label y and
# inverse temperature beta, NLL(beta) = logsumexp(beta z) - beta z_y is convex in beta, with
#     d/dbeta NLL = E_q[z] - z_y,    d2/dbeta2 NLL = Var_q[z],    q = softmax(beta z).
# The calibrators make beta affine in their parameters x (one inverse temperature; or
# beta_i = a p_i + b (1 - p_i) in soft selective scaling), so the mean NLL is convex in x and a
# bounded Newton iteration finds its minimum to the stated tolerance in a handful of passes.

#: relative tolerance on each inverse temperature (hence on each temperature)
TEMPERATURE_RTOL = 1e-10
# float64 working block of the fit: about 512 kB per (rows, C) array, so that the dozen passes
# over a block run in cache (8 MB blocks made an evaluation 5x slower)
_FIT_BLOCK_ELEMENTS = 1 << 16
_MAX_RATIO = 8.0


class TemperatureFit:
    """The result of :func:`fit_inverse_temperatures`.

    Attributes
    ----------
    x : ndarray of shape (k,)
        The fitted parameters (inverse temperatures).
    nll : float
        Weighted mean NLL at ``x``.
    n_iter : int
        Newton iterations taken.
    converged : bool
        Whether the tolerance was met (or every parameter rests on a bound
        with the NLL still falling beyond it) within ``max_iter``.
    at_bound : list of tuple (int, str)
        Parameters that rest on a bound the NLL would cross: ``(index,
        "lower" | "upper")`` in terms of ``x`` (a lower bound on an inverse
        temperature is an upper bound on the temperature).
    gradient : ndarray of shape (k,)
        Gradient of the mean NLL at ``x``.
    """

    def __init__(self, x, nll, n_iter, converged, at_bound, gradient):
        self.x, self.nll, self.n_iter = x, nll, n_iter
        self.converged, self.at_bound, self.gradient = converged, at_bound, gradient

    def __repr__(self) -> str:
        return (
            f"TemperatureFit(x={self.x.tolist()}, nll={self.nll:.6g}, n_iter={self.n_iter}, "
            f"converged={self.converged}, at_bound={self.at_bound})"
        )


def _fit_rows(n_classes: int, chunk_size: int) -> int:
    return max(1, min(chunk_size, _FIT_BLOCK_ELEMENTS // max(n_classes, 1)))


def nll_derivatives(
    Z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    *,
    basis: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    scale: float = 1.0,
    chunk_size: int = 65536,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted mean NLL of ``softmax(beta_i z_i)``, its gradient and Hessian in ``x``.

    ``beta_i = offset_i + basis_i . x`` (``basis`` of shape (n, k)); without
    ``basis``, ``beta_i = x[0]`` for every row. ``rows`` (a boolean mask)
    restricts the sum to some rows. The logits are streamed in float64 blocks
    of about 512 kB, shifted by their row maximum (so ``beta z <= 0``: no
    overflow) and divided by ``scale``; every sum is a float64 accumulator,
    divided by the total weight as it goes so that huge losses do not
    overflow the sum.
    """
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[0]
    n = Z.shape[0]
    w_all = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if rows is None:
        total = float(n) if w_all is None else float(w_all.sum())
    else:
        total = float(rows.sum()) if w_all is None else float(w_all[rows].sum())
    if not total > 0:
        raise ValueError("The rows to fit a temperature on have total weight 0.")
    f, g, H = 0.0, np.zeros(k), np.zeros((k, k))
    for part in iter_chunks(n, _fit_rows(Z.shape[1], chunk_size)):
        sel = None if rows is None else rows[part]
        if sel is not None and not sel.any():
            continue
        z = np.array(Z[part] if sel is None else Z[part][sel], dtype=np.float64)
        yy = y[part] if sel is None else y[part][sel]
        if scale != 1.0:
            z *= 1.0 / scale
        z -= z.max(axis=1, keepdims=True)
        zy = z[np.arange(z.shape[0]), yy]
        if basis is None:
            beta = np.full(z.shape[0], x[0])
            B = None
        else:
            B = basis[part] if sel is None else basis[part][sel]
            beta = B @ x
            if offset is not None:
                beta += offset[part] if sel is None else offset[part][sel]
        e = np.multiply(z, beta[:, None])
        np.exp(e, out=e)
        S = e.sum(axis=1)
        np.multiply(e, z, out=e)
        m1 = e.sum(axis=1) / S
        np.multiply(e, z, out=e)
        m2 = e.sum(axis=1) / S
        loss = np.log(S) - beta * zy
        d1 = m1 - zy
        d2 = np.maximum(m2 - m1 * m1, 0.0)
        w = np.full(z.shape[0], 1.0 / total)
        if w_all is not None:
            w *= w_all[part] if sel is None else w_all[part][sel]
        f += float(w @ loss)
        if B is None:
            g[0] += float(w @ d1)
            H[0, 0] += float(w @ d2)
        else:
            g += (w * d1) @ B
            H += (B * (w * d2)[:, None]).T @ B
    return f, g, H


# a Newton step whose predicted decrease of the mean NLL (nats per pixel) is below this,
# relative to the NLL (or absolute below 1 nat), changes nothing representable
_NEGLIGIBLE_DECREASE = 1e-15


def fit_inverse_temperatures(
    Z: np.ndarray,
    y: np.ndarray,
    *,
    basis: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    bounds: tuple[float, float] = (1e-2, 1e2),
    x0=None,
    rtol: float = TEMPERATURE_RTOL,
    max_iter: int = 100,
    chunk_size: int = 65536,
) -> TemperatureFit:
    """Minimise the mean NLL over inverse temperatures in a box: bounded Newton.

    ``beta_i = offset_i + basis_i . x`` as in :func:`nll_derivatives`, each
    ``x_j`` in ``bounds`` (inverse temperatures). The NLL is convex in ``x``.
    Each iteration minimises the quadratic model (analytic gradient and
    Hessian) exactly over the box intersected with a one-sided trust region
    (no parameter falls by more than a factor of 8), then backtracks along
    that step (Armijo). It stops when the next step moves no parameter by
    more than ``rtol`` relative to its value (about the distance to the
    minimum: Newton converges quadratically), or when every parameter rests
    on a bound the NLL would cross. One pass over the data per iteration;
    typically 4-8 from ``x0`` (default 1, i.e. T = 1), 1-3 from a warm start.
    """
    check_finite(Z, where="logits")
    k = 1 if basis is None else basis.shape[1]
    lo = np.full(k, float(bounds[0]))
    hi = np.full(k, float(bounds[1]))
    x = np.clip(np.ones(k) if x0 is None else np.asarray(x0, dtype=np.float64), lo, hi)
    scale = 1.0

    def evaluate(point):
        # in the scaled problem, beta' = beta * scale on z / scale: the offset scales too
        return nll_derivatives(
            Z, y, point, basis=basis,
            offset=offset if offset is None or scale == 1.0 else offset * scale,
            sample_weight=sample_weight, rows=rows, scale=scale, chunk_size=chunk_size,
        )

    with np.errstate(over="ignore", invalid="ignore"):
        f, g, H = evaluate(x)
    if not (np.isfinite(f) and np.isfinite(g).all() and np.isfinite(H).all()):
        # logits near the top of float64: fit on z / scale (a power of two, exact) and
        # beta * scale, the same NLL at every point
        span = max(
            (float(np.max(Z[p], initial=0.0)) - float(np.min(Z[p], initial=0.0)))
            for p in iter_chunks(Z.shape[0], chunk_size)
        )
        scale = float(2.0 ** np.ceil(np.log2(max(span, 1.0))))
        lo, hi, x = lo * scale, hi * scale, x * scale
        with np.errstate(over="ignore", invalid="ignore"):
            f, g, H = evaluate(x)
        if not (np.isfinite(f) and np.isfinite(g).all()):
            raise ValueError(
                f"The NLL of these logits overflows float64 (largest row span {span:.3g}): "
                "no temperature can be fitted. Divide the logits by a constant (the "
                "temperature absorbs it) or check the model's output."
            )

    def held(point, grad):
        return ((point <= lo) & (grad > 0)) | ((point >= hi) & (grad < 0))

    converged, n_iter = False, 0
    while n_iter < max_iter:
        n_iter += 1
        if not (~held(x, g)).any():
            converged = True
            break
        # the Newton step of the box-constrained quadratic model; the box is the bounds and a
        # one-sided trust region: no inverse temperature falls by more than a factor of
        # _MAX_RATIO per iteration (far from the minimum an over-confident model's NLL has
        # little curvature and a full Newton step overshoots to the bound); rises are left
        # to the line search (the NLL grows at most linearly there)
        step = _box_newton_step(g, H, np.maximum(lo, x / _MAX_RATIO) - x, hi - x)
        if np.all(np.abs(step) <= rtol * np.abs(x)):
            # the next step is below the tolerance: x is the minimum to within it (Newton
            # converges quadratically, so the step is about the remaining distance)
            converged = True
            break
        if abs(float(g @ step)) <= _NEGLIGIBLE_DECREASE * max(abs(float(f)), 1.0):
            # the step would lower the mean NLL by less than its rounding (e.g. a group of
            # pixels all correct, whose NLL still falls towards 0 as beta grows, with a
            # gradient of 1e-45): no representable progress is left
            converged = True
            break
        accepted, t = False, 1.0
        pg = np.where(held(x, g), 0.0, g)
        while t > 1e-12:
            trial = np.clip(x + t * step, lo, hi)
            with np.errstate(over="ignore", invalid="ignore"):
                f_new, g_new, H_new = evaluate(trial)
            if np.isfinite(f_new) and (
                f_new <= f + 1e-4 * t * (g @ step)
                # near the minimum the decrease of f drowns in its rounding: a full step
                # that shrinks the (projected) gradient is then the better test
                or (t == 1.0 and np.all(np.isfinite(g_new))
                    and np.linalg.norm(np.where(held(trial, g_new), 0.0, g_new))
                    < np.linalg.norm(pg))
            ):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            # no decrease is representable any more: x is the minimum to rounding
            converged = True
            break
        moved = np.abs(trial - x)
        x, f, g, H = trial, f_new, g_new, H_new
        if np.all(moved <= rtol * np.abs(x)):
            converged = True
            break
    at_bound = [
        (j, "lower" if x[j] <= lo[j] else "upper") for j in np.flatnonzero(held(x, g))
    ]
    return TemperatureFit(x / scale, float(f), n_iter, converged, at_bound, g * scale)


def _box_newton_step(g, H, lo, hi) -> np.ndarray:
    """The minimiser of ``g.s + s.H.s / 2`` over the box ``lo <= s <= hi`` (``lo <= 0 <= hi``).

    Exact for the one or two parameters of a temperature fit: every choice of
    each parameter at its lower bound, its upper bound or free is tried (3^k
    faces), the free ones solved on their face, and the best feasible point
    kept. ``H`` is positive semi-definite, so that point is the box minimum.
    """
    k = len(g)
    best, best_q = np.zeros(k), 0.0
    for pattern in np.ndindex(*(3,) * k):
        state = np.array(pattern)
        s = np.where(state == 1, lo, np.where(state == 2, hi, 0.0))
        free = state == 0
        if free.any():
            rhs = -(g[free] + H[np.ix_(free, ~free)] @ s[~free])
            Hf = H[np.ix_(free, free)]
            if not np.all(np.isfinite(Hf)) or np.linalg.det(Hf) <= 1e-300 * max(
                np.abs(Hf).max(), 1.0
            ):
                continue
            s[free] = np.linalg.solve(Hf, rhs)
        if np.any(s < lo - 1e-15 * np.abs(lo)) or np.any(s > hi + 1e-15 * np.abs(hi)):
            continue
        s = np.clip(s, lo, hi)
        q = g @ s + 0.5 * s @ H @ s
        if np.isfinite(q) and q < best_q:
            best, best_q = s, q
    if best_q == 0.0 and np.any(g != 0):
        # a singular quadratic model: a scaled gradient step, clipped to the box
        diag = np.diag(H)
        best = np.clip(-g / np.where(diag > 0, diag, 1.0), lo, hi)
    return best


def warn_fit(fit: TemperatureFit, names, bounds, *, owner: str, stacklevel: int = 3) -> None:
    """A ConvergenceWarning naming each temperature left on a bound, or the failed fit.

    ``names`` names each parameter (a temperature, e.g. "t2"); ``bounds`` are
    the *temperature* bounds (low, high).
    """
    from sklearn.exceptions import ConvergenceWarning

    for j, side in fit.at_bound:
        # a lower bound on the inverse temperature is the upper bound on the temperature
        which, value = ("upper", bounds[1]) if side == "lower" else ("lower", bounds[0])
        what = (
            "the NLL keeps falling towards flatter probabilities"
            if which == "upper"
            else "the NLL keeps falling towards sharper probabilities"
        )
        warnings.warn(
            f"{owner}: {names[j]} stopped at the {which} end of its range ({value:g}): "
            f"{what} beyond it, so the fitted value is the bound, not the NLL minimum. "
            + (
                "The logits carry little information about the labels (for the pixels "
                "concerned); widen the range if that is expected."
                if which == "upper"
                else "Widen the range if that is expected."
            ),
            ConvergenceWarning,
            stacklevel=stacklevel,
        )
    if not fit.converged:
        warnings.warn(
            f"{owner}: the temperature fit did not converge in {fit.n_iter} Newton "
            f"iterations (gradient {fit.gradient.tolist()}); the temperatures are the last "
            "iterate.",
            ConvergenceWarning,
            stacklevel=stacklevel,
        )


def nll_at_inverse_temperature(
    Z: np.ndarray,
    y: np.ndarray,
    beta: float | np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    chunk_size: int = 65536,
) -> float:
    """Weighted mean NLL of ``softmax(beta * Z)`` for labels ``y``, in float64 chunks.

    ``beta`` is a scalar or a per-row array of inverse temperatures.
    """
    if np.ndim(beta) == 0:
        return nll_derivatives(
            Z, y, np.array([float(beta)]), sample_weight=sample_weight, chunk_size=chunk_size
        )[0]
    basis = np.asarray(beta, dtype=np.float64)[:, None]
    return nll_derivatives(
        Z, y, np.ones(1), basis=basis, sample_weight=sample_weight, chunk_size=chunk_size
    )[0]


def fit_temperature(
    Z: np.ndarray,
    y: np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    bounds: tuple[float, float] = (1e-2, 1e10),
    rows: np.ndarray | None = None,
    chunk_size: int = 65536,
) -> tuple[float, TemperatureFit]:
    """The temperature T minimising the NLL of ``softmax(Z / T)``, and the fit's record.

    Newton on ``1/T`` in ``[1/high, 1/low]`` (:func:`fit_inverse_temperatures`),
    to a relative precision of ``TEMPERATURE_RTOL``. ``bounds`` may reach
    1e10, where the rows are uniform: that is the optimum when the logits
    carry no information about the labels.
    """
    fit = fit_inverse_temperatures(
        Z, y, sample_weight=sample_weight, rows=rows,
        bounds=(1.0 / bounds[1], 1.0 / bounds[0]), chunk_size=chunk_size,
    )
    return float(1.0 / fit.x[0]), fit
