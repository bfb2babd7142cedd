"""Local temperature scaling: a temperature per pixel from its neighbourhood (logits only)."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions

from .._uncertainty import entropy
from ..context import CONTEXT_FEATURES, n_context_features
from ..features import log_softmax
from ._base import BaseLogitCalibrator, check_temperature_bounds
from ._models import GlobalTemperature, SoftplusTemperature
from ._solver import softplus_inverse, standardisation

__all__ = ["LocalTemperatureScaling"]

# the working precision's epsilon times this is the least scaled gap between the top two
# logits of a row: p1 / p2 >= 1 + 4 eps survives the rounding of the softmax, so the top
# class stays strictly first (see _beta)
_GAP_ULPS = 4.0
_CONFIDENCE_NAMES = ("max_log_proba", "entropy")


def _confidence_stats(z: np.ndarray) -> np.ndarray:
    """Max log-probability and entropy of softmax(z), (n, 2) float64."""
    lp = log_softmax(np.asarray(z, dtype=np.float64))
    return np.column_stack([lp.max(axis=1), entropy(lp, axis=1)])


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
    by trust-region Newton with the exact Hessian, the data streamed in row
    chunks and accumulated in float64, starting from temperature scaling
    (``w = 0``, ``softplus(b) = 1 / T_TS``): with context that carries no
    signal it stays temperature scaling. It is the softplus-linear temperature
    model that ``SelectiveScalingCalibrator(mode="generalised")`` fits too,
    with the same solver, attribute names and ``context`` switch; the
    generalised mode adds the detector's P(correct) and the margin to the
    inputs.

    How it differs from LTS (Ding et al., ICCV 2021): theirs is a small CNN
    that reads the logits *and the RGB image* and outputs a temperature map;
    ours reads the logits only, through fixed hand-made neighbourhood
    features and a generalised linear model (a dozen parameters, convex in
    nothing but cheap and stable). It needs no image, no GPU and no
    architecture choice, and it cannot learn image appearance cues.

    A positive temperature never changes the predicted class: ``predict`` is
    the argmax of the logit columns and ``predict_proba``'s argmax equals it
    on every row, in float32 too. For that ``beta`` is kept in
    ``[1 / high, 1 / low]`` of ``temperature_bounds`` and, per row, above the
    value where the top two logits are so close that a smaller ``beta`` would
    round them to a tie.

    Parameters
    ----------
    context : {"spatial"} or None, default="spatial"
        ``"spatial"``: ``X`` is the output of
        ``flatten_segmentation(..., context="spatial")``, the C logit columns
        followed by the spatial context columns of
        :func:`sksegcal.context.spatial_context`. None: ``X`` holds the logits
        only and the temperature depends on the confidence features alone.
    confidence_features : bool, default=True
        Also feed the pixel's max log-probability and entropy to ``beta``.
    l2 : float, default=1e-4
        Ridge penalty on ``w`` (not on ``b``), on standardised features.
    max_iter : int, default=100
        Newton iterations.
    tol : float, default=1e-9
        Newton's tolerance on the gradient norm.
    temperature_bounds : tuple of float, default=(0.01, 100.0)
        Range of every temperature (``1 / beta``), and of the TS start.
    ignore_index : int or None, default=255
        Label of unlabelled pixels; left out of ``fit`` and ``score``.
    chunk_size : int, default=65536
        Rows processed at a time.
    n_context : int or None
        Deprecated: the number of context columns (None: the spatial ones, 0:
        none, k > 0: k columns of your own, the last ones of ``X``). Use
        ``context``; a context of your own remains possible through this
        parameter for a release.
    max_temperature : float
        Deprecated: use ``temperature_bounds=(0.01, max_temperature)``.

    Attributes
    ----------
    temperature_coef_ : ndarray of shape (n_inputs,)
        ``w``, on the standardised inputs (context columns, then the
        confidence features); was ``coef_``.
    temperature_intercept_ : float
        ``b``; was ``intercept_``.
    temperature_mean_, temperature_scale_ : ndarray of shape (n_inputs,)
        The standardisation (a constant input gets scale 1, hence weight 0);
        were ``feature_mean_``, ``feature_scale_``.
    temperature_inputs_ : tuple of str
        Names of the inputs of ``beta``; was ``input_names_``.
    ts_temperature_ : float
        Temperature scaling's temperature on the fit data (the start).
    n_iter_ : int
        Newton iterations taken.
    converged_ : bool
        Whether the fit met its tolerance (a ConvergenceWarning otherwise).
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
        "context": [StrOptions({"spatial"}), None],
        "confidence_features": ["boolean"],
        "l2": [Interval(numbers.Real, 0, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="neither")],
        "temperature_bounds": [tuple, list],
        "n_context": [
            Interval(numbers.Integral, 0, None, closed="left"),
            None,
            StrOptions({"deprecated"}),
        ],
        "max_temperature": [
            Interval(numbers.Real, 0, None, closed="neither"),
            StrOptions({"deprecated"}),
        ],
    }
    _parameter_constraints.pop("input_type", None)
    _renamed_attributes = {
        "coef_": "temperature_coef_",
        "intercept_": "temperature_intercept_",
        "feature_mean_": "temperature_mean_",
        "feature_scale_": "temperature_scale_",
        "input_names_": "temperature_inputs_",
    }

    def __init__(
        self,
        *,
        context: str | None = "spatial",
        confidence_features: bool = True,
        l2: float = 1e-4,
        max_iter: int = 100,
        tol: float = 1e-9,
        temperature_bounds: tuple[float, float] = (0.01, 100.0),
        ignore_index: int | None = 255,
        chunk_size: int = 65536,
        n_context="deprecated",
        max_temperature="deprecated",
    ):
        self.context = context
        self.confidence_features = confidence_features
        self.l2 = l2
        self.max_iter = max_iter
        self.tol = tol
        self.temperature_bounds = temperature_bounds
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.n_context = n_context
        self.max_temperature = max_temperature

    # the base class reads it; this calibrator takes logits only
    input_type = "logits"

    @classmethod
    def _migrate_state(cls, state: dict) -> dict:
        # saved before the context switch: n_context=None meant the spatial context, 0 none
        if "context" not in state and "n_context" in state:
            n_context = state["n_context"]
            if n_context is None or n_context == 0:
                state["context"] = "spatial" if n_context is None else None
                state["n_context"] = "deprecated"
        if "temperature_bounds" not in state and "max_temperature" in state:
            high = state["max_temperature"]
            if high != "deprecated":
                state["temperature_bounds"] = (min(0.01, high / 2.0), float(high))
            state["max_temperature"] = "deprecated"
        return super()._migrate_state(state)

    # ---------------------------------------------------------------- inputs
    @property
    def reads_context(self) -> str | None:
        """None, ``"spatial"``, or ``"custom"`` for the deprecated ``n_context=k`` columns.

        No path computes a ``"custom"`` context: those pixel tables are the user's own.
        """
        if self.n_context != "deprecated":
            if self.n_context is None:
                return "spatial"
            return None if self.n_context == 0 else "custom"
        return self.context

    def _n_extra_columns(self) -> int:
        if self.n_context not in ("deprecated", None):
            return int(self.n_context)
        return n_context_features() if self.reads_context == "spatial" else 0

    def _bounds(self) -> tuple[float, float]:
        if self.max_temperature != "deprecated":
            high = float(self.max_temperature)
            return (min(0.01, high / 2.0), high)
        return check_temperature_bounds(self.temperature_bounds)

    def _inputs(self, z: np.ndarray, extra) -> np.ndarray:
        """Unstandardised inputs of beta for a chunk of rows, (n, n_inputs) float64."""
        parts = [] if extra is None else [np.asarray(extra, dtype=np.float64)]
        if self.confidence_features:
            parts.append(_confidence_stats(z))
        if not parts:
            return np.zeros((z.shape[0], 0))
        return np.concatenate(parts, axis=1)

    def _model(self) -> SoftplusTemperature:
        return SoftplusTemperature(
            self.temperature_coef_,
            self.temperature_intercept_,
            self.temperature_mean_,
            self.temperature_scale_,
            self._bounds(),
        )

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
        return super().fit(X, y, sample_weight)

    def _fit_calibration(self, X, y, sample_weight, groups=None):
        for name, use in (
            ("n_context", "context"),
            ("max_temperature", "temperature_bounds=(0.01, max_temperature)"),
        ):
            if getattr(self, name) != "deprecated":
                warnings.warn(
                    f"LocalTemperatureScaling({name}=...) is deprecated and will be removed in "
                    f"a future release; use {use}.",
                    FutureWarning,
                    stacklevel=4,
                )
        bounds = self._bounds()
        n_context = self._n_extra_columns()
        n_classes = X.shape[1] - n_context
        self.n_classes_ = n_classes
        if not n_context:
            names = ()
        elif self.reads_context == "spatial":
            names = tuple(CONTEXT_FEATURES)
        else:
            names = tuple(f"context_{j}" for j in range(n_context))
        self.temperature_inputs_ = names + (_CONFIDENCE_NAMES if self.confidence_features else ())

        w = np.ones(len(y)) if sample_weight is None else sample_weight
        if not float(w.sum()) > 0:
            raise ValueError("sample_weight sums to zero; give some pixels a positive weight.")

        def inputs(part):
            cols, extra = self._split_chunk(X[part])
            return self._inputs(cols, extra)

        n_inputs = len(self.temperature_inputs_)
        mean, scale, constant = standardisation(inputs, len(y), n_inputs, w, self.chunk_size)
        Z = X[:, :n_classes]
        ts = GlobalTemperature.fit(
            Z, y, sample_weight=sample_weight, bounds=bounds, chunk_size=self.chunk_size
        )
        self.ts_temperature_ = ts.temperature
        start = SoftplusTemperature(
            np.zeros(n_inputs), softplus_inverse(1.0 / ts.temperature), mean, scale
        )
        model = SoftplusTemperature.fit(
            Z,
            y,
            lambda part: (inputs(part) - mean) / scale,
            mean=mean,
            scale=scale,
            constant=constant,
            sample_weight=sample_weight,
            l2=self.l2,
            bounds=bounds,
            start=start,
            tol=self.tol,
            max_iter=self.max_iter,
            chunk_size=self.chunk_size,
        )
        self.temperature_coef_ = model.coef.copy()
        self.temperature_intercept_ = model.intercept
        self.temperature_mean_, self.temperature_scale_ = mean, scale
        ((_, result),) = model.fits
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        if not self.converged_:
            warnings.warn(
                f"LocalTemperatureScaling did not converge in {self.n_iter_} Newton "
                f"iterations ({result.message}); raise max_iter or l2.",
                ConvergenceWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------ prediction
    def _beta(self, z, extra=None):
        """Inverse temperatures of a chunk, kept where the top class stays first."""
        if self._n_extra_columns() and extra is None:
            return None
        beta = self._model().inverse_temperatures(self._inputs(z, extra))
        if z.shape[1] > 1:
            # gap between the top two logits (0 for a tie, which stays a tie)
            top2 = -np.partition(-z, 1, axis=1)[:, :2]
            gap = (top2[:, 0] - top2[:, 1]).astype(np.float64)
            floor = _GAP_ULPS * np.finfo(z.dtype).eps / np.where(gap > 0, gap, np.inf)
            beta = np.maximum(beta, floor)
        return beta

    def _top_index(self, z, scaled):
        return np.argmax(z, axis=1)

    def _torch_module(self):
        from ..deployment._convert import local_temperature_scaling_module

        return local_temperature_scaling_module(self)
