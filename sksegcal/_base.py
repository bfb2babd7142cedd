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
from collections.abc import Callable, Iterator

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ._validation import check_finite, check_labels
from .features import log_softmax, softmax

# probabilities are floored here before the log; about exp(-69)
_PROBA_FLOOR = 1e-30


def iter_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


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
        X, y = validate_data(
            self,
            X,
            y,
            dtype=[np.float32, np.float64],
            ensure_min_features=2,
            ensure_min_samples=1,
            y_numeric=False,
        )
        n_classes = X.shape[1]
        y = check_labels(y, n_classes, self.ignore_index)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
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
        if self.input_type != "logits":
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

    def _calibrated_log_proba(self, X: np.ndarray, out: np.ndarray) -> np.ndarray:
        for part in iter_chunks(X.shape[0], self.chunk_size):
            z = self._to_logits(X[part]).astype(out.dtype, copy=False)
            log_softmax(self._scale_chunk(z), out=out[part])
        return out

    def predict_log_proba(self, X) -> np.ndarray:
        """Calibrated log-probabilities, computed chunk by chunk.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes)

        Returns
        -------
        log_proba : ndarray of shape (n_pixels, n_classes)
            float64 for float64 input, float32 otherwise.
        """
        X = self._validate_predict_data(X)
        out = np.empty(X.shape, dtype=self._work_dtype(X))
        return self._calibrated_log_proba(X, out)

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities, computed chunk by chunk.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes)

        Returns
        -------
        proba : ndarray of shape (n_pixels, n_classes)
            float64 for float64 input, float32 otherwise. Rows sum to one;
            the argmax of each row is the argmax of ``X`` (ties aside, e.g. a
            uniform row).
        """
        X = self._validate_predict_data(X)
        out = np.empty(X.shape, dtype=self._work_dtype(X))
        for part in iter_chunks(X.shape[0], self.chunk_size):
            z = self._to_logits(X[part]).astype(out.dtype, copy=False)
            # softmax directly (one exp per entry) rather than exp(log_softmax): this loop is
            # the hot path of evaluating a store
            softmax(self._scale_chunk(z), out=out[part])
        return out

    def predict(self, X) -> np.ndarray:
        """The class the segmentation model predicted: the argmax of ``X``.

        Calibration never changes it, whatever the temperatures: dividing
        logits by a positive temperature preserves their order.
        """
        X = self._validate_predict_data(X)
        return self.classes_[np.argmax(X, axis=1)]

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
        y = check_labels(y, X.shape[1], self.ignore_index)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}.")
        w = None if sample_weight is None else _check_sample_weight(sample_weight, X)
        keep = np.ones(len(y), bool) if self.ignore_index is None else y != self.ignore_index
        if not keep.any():
            raise ValueError(f"Every pixel has the ignore index {self.ignore_index}.")
        total, weight = 0.0, 0.0
        buf = np.empty((min(self.chunk_size, X.shape[0]), X.shape[1]), dtype=self._work_dtype(X))
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
def nll_at_inverse_temperature(
    Z: np.ndarray,
    y: np.ndarray,
    beta: float | np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    chunk_size: int = 65536,
) -> float:
    """Weighted mean NLL of ``softmax(beta * Z)`` for labels ``y``, in chunks.

    ``beta`` is a scalar or a per-row array of inverse temperatures.
    """
    total, weight = 0.0, 0.0
    per_row = np.ndim(beta) > 0
    for part in iter_chunks(Z.shape[0], chunk_size):
        b = beta[part, None] if per_row else beta
        scaled = (Z[part] * np.asarray(b, dtype=np.float32)).astype(np.float32, copy=False)
        shift = scaled.max(axis=1)
        lse = np.log(np.exp(scaled - shift[:, None]).sum(axis=1)) + shift
        loss = lse.astype(np.float64) - scaled[np.arange(scaled.shape[0]), y[part]]
        if sample_weight is None:
            total += loss.sum()
            weight += loss.shape[0]
        else:
            total += (loss * sample_weight[part]).sum()
            weight += sample_weight[part].sum()
    return total / weight


def minimize_1d(
    objective: Callable[[float], float], *, lower: float, upper: float, xatol: float = 1e-7
) -> float:
    """Minimise a scalar function of log-temperature on [lower, upper] (Brent)."""
    result = minimize_scalar(
        objective, bounds=(lower, upper), method="bounded", options={"xatol": xatol}
    )
    if not result.success:  # pragma: no cover - bounded Brent always terminates
        raise RuntimeError(f"Temperature search failed: {result.message}")
    return float(result.x)


def fit_temperature(
    Z: np.ndarray,
    y: np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    bounds: tuple[float, float] = (1e-2, 1e10),
    chunk_size: int = 65536,
) -> float:
    """The temperature T minimising the NLL of ``softmax(Z / T)``.

    The NLL is convex in 1/T; a bounded Brent search over log T finds its
    minimum to about 1e-7 relative precision. ``bounds`` may reach 1e10,
    where the rows are uniform: that is the optimum when the logits carry no
    information about the labels.
    """
    check_finite(Z, where="logits")

    def objective(log_t: float) -> float:
        return nll_at_inverse_temperature(
            Z, y, np.exp(-log_t), sample_weight=sample_weight, chunk_size=chunk_size
        )

    return float(np.exp(minimize_1d(objective, lower=np.log(bounds[0]), upper=np.log(bounds[1]))))
