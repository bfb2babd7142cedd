"""The abstract estimator base every calibrator of this package shares.

A calibrator here maps a pixel table of logits (n_pixels, n_classes) to
calibrated probabilities without ever changing the predicted class. This
base holds the input conventions (logits or probabilities, the ignore index),
the chunked prediction loop and the calibration-aware ``score``; subclasses
only say how to rescale one chunk of logits.
"""

from __future__ import annotations

import inspect
import numbers
import sys
import warnings
from abc import ABCMeta, abstractmethod

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .._validation import (
    check_labels,
    check_pixel_table,
    warn_float_labels,
    warn_probabilities_as_logits,
)
from ..context import CONTEXT_RANGES, check_context_block
from ..features import log_softmax, softmax
from ._solver import iter_chunks

# probabilities are floored here before the log; about exp(-69)
_PROBA_FLOOR = 1e-30


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


class BaseLogitCalibrator(ClassifierMixin, BaseEstimator, metaclass=ABCMeta):
    """Shared machinery; not for direct use.

    Subclasses implement ``_fit_calibration(X, y, sample_weight, groups)`` on
    validated rows and ``_scale_chunk(z, extra)`` returning the rescaled logits
    of one chunk (``extra``: the chunk's context columns, None without any).
    A calibrator that reads context columns after the C logit columns says so
    in :attr:`reads_context` and :meth:`_n_extra_columns`.
    """

    #: renamed parameters and fitted attributes, ``{old: new}``: reading an old
    #: name warns, and a calibrator saved under the old names loads (__setstate__)
    _renamed_attributes: dict = {}

    _parameter_constraints: dict = {
        "input_type": [StrOptions({"logits", "probabilities"})],
        "ignore_index": [numbers.Integral, None],
        "chunk_size": [Interval(numbers.Integral, 1, None, closed="left")],
    }

    # ----------------------------------------------------------- input handling
    @property
    def reads_context(self) -> str | None:
        """The context kind this calibrator reads after the C logit columns, or None.

        ``"spatial"``: X holds the columns of
        ``flatten_segmentation(..., context="spatial")``; every path that builds
        the rows itself (store engine, command line, integrations) computes them.
        """
        return None

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
        return X[:, : X.shape[1] - k], X[:, X.shape[1] - k :]

    def _scale_with(self, z: np.ndarray, extra) -> np.ndarray:
        return self._scale_chunk(z, extra)

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
                f"X has {X.shape[1]} columns, {self._n_extra_columns()} of them context "
                f"(reads_context={self.reads_context!r}): fewer than 2 class columns are left. "
                "X must hold the C logit columns followed by the context columns, as "
                "flatten_segmentation(..., context=...) builds it; set the calibrator's context "
                "to match X."
            )
        self._check_context(X, "fit")
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
        self._check_context(X, "predict")
        return X

    def _check_context(self, X: np.ndarray, stage: str) -> None:
        """Refuse a validated X whose context columns are not the context this calibrator reads.

        The calibrators' one test of the split of X into logit and context columns: a table
        built with another number of context columns would otherwise be read with a context
        column as a logit (or a logit as context), and fit that many classes.
        """
        kind = self.reads_context
        if kind in CONTEXT_RANGES:
            k = self._n_extra_columns()
            check_context_block(
                X, X.shape[1] - k, kind, where=f"the X given to {type(self).__name__}.{stage}"
            )

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
    def _fit_calibration(self, X, y, sample_weight, groups=None):
        """Fit on validated rows (ignored pixels removed); ``classes_`` is set."""

    def _beta(self, z: np.ndarray, extra=None):
        """float64 inverse temperatures (a scalar, or one per row) of a chunk, or None.

        Temperature calibrators define it: their calibrated probabilities are
        ``softmax(beta * z)``. None when the calibrator is not temperature-based,
        or needs ``extra`` (context columns) that the chunk lacks.
        """
        return None

    def _row_inverse_temperatures(self, z: np.ndarray, extra=None):
        """``beta`` in the chunk's dtype, with ``_scale_chunk(z) == beta * z``, or None.

        The calibrated probabilities are then ``softmax(z / T)`` and evaluation
        can score them straight from the logits (``CalibrationAccumulator.update_logits``).
        """
        beta = self._beta(z, extra)
        if beta is None:
            return None
        if np.ndim(beta) == 0:
            return z.dtype.type(beta)
        return np.asarray(beta).astype(z.dtype, copy=False)

    def _scale_chunk(self, z: np.ndarray, extra=None) -> np.ndarray:
        """Calibrated logits of one chunk of logits, in the chunk's dtype."""
        return scale_logits(z, self._row_inverse_temperatures(z, extra))

    def temperatures(self, X) -> np.ndarray:
        """The temperature ``1 / beta`` each row of ``X`` gets (float64).

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_features)
            The rows ``fit`` took (``n_features_in_`` columns).

        Returns
        -------
        temperatures : ndarray of shape (n_pixels,)
        """
        X = self._validate_predict_data(X)
        out = np.empty(X.shape[0])
        for part in iter_chunks(X.shape[0], self.chunk_size):
            cols, extra = self._split_chunk(X[part])
            z = self._to_logits(cols).astype(self._work_dtype(X), copy=False)
            beta = self._beta(z, extra)
            if beta is None:
                raise TypeError(f"{type(self).__name__} is not a temperature model.")
            out[part] = 1.0 / np.asarray(beta, dtype=np.float64)
        return out

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
        buf = np.empty(
            (min(self.chunk_size, X.shape[0]), len(self.classes_)), dtype=self._work_dtype(X)
        )
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
        state = self._migrate_state(dict(state))
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

    @classmethod
    def _migrate_state(cls, state: dict) -> dict:
        """The state of a calibrator saved under older names, in today's names.

        Parameters added since take their defaults.
        """
        for old, new in cls._renamed_attributes.items():
            if old in state and new not in state:
                state[new] = state.pop(old)
                if not old.endswith("_"):
                    # a renamed parameter stays a parameter, unset
                    state[old] = "deprecated"
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and param.default is not inspect.Parameter.empty:
                state.setdefault(name, param.default)
        return state

    def __getattr__(self, name: str):
        # renamed fitted attributes (the old name warns); only reached when the normal
        # lookup fails, so it costs nothing on the hot paths
        renamed = type(self)._renamed_attributes
        if name.endswith("_") and name in renamed:
            warnings.warn(
                f"{type(self).__name__}.{name} was renamed {renamed[name]}; the old name "
                "will be removed in a future release.",
                FutureWarning,
                stacklevel=2,
            )
            return getattr(self, renamed[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------- deployment
    def to_torch(self):
        """This fitted calibrator as a torch ``nn.Module`` (:mod:`sksegcal.deployment`).

        The module maps logits ``(N, C, *spatial)`` to the probabilities
        :meth:`predict_proba` gives for the same pixels (``log_proba`` to their
        logarithm), on any device and dtype, with the fitted numbers held as
        buffers; it scripts with ``torch.jit.script`` and exports to ONNX. A
        calibrator that reads spatial context computes it from the logits.

        Returns
        -------
        module : sksegcal.deployment.CalibratorModule
            In eval mode.
        """
        check_is_fitted(self)
        return self._torch_module().eval()

    def _torch_module(self):
        """The module of this fitted calibrator; each calibrator class defines it."""
        raise TypeError(f"{type(self).__name__} has no torch module.")

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

    from .. import __version__

    versions = {"sksegcal": __version__, "scikit-learn": sklearn.__version__}
    # torch is recorded only when loaded (by the MLP); a saved baseline never needs it
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__.split("+")[0]
    return versions


def check_temperature_bounds(bounds, name: str = "temperature_bounds") -> tuple[float, float]:
    """``(low, high)`` as floats with ``0 < low < high < inf``, else a ValueError."""
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or not all(isinstance(b, numbers.Real) for b in bounds)
        or not 0 < bounds[0] < bounds[1] < np.inf
    ):
        raise ValueError(f"{name} must be (low, high) with 0 < low < high < inf, got {bounds}.")
    return float(bounds[0]), float(bounds[1])
