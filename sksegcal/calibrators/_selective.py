"""Selective scaling: a large temperature only where the model is likely wrong."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, check_memory

from .._validation import warn_no_groups
from ..features import FEATURE_SETS, features_from_logits
from ..pixels import sample_pixels
from ._base import LOG_PROBA_FLOOR, BaseLogitCalibrator, check_temperature_bounds
from ._models import GlobalTemperature, SoftplusTemperature, TwoTemperatures
from ._solver import (
    fold_derivatives,
    iter_chunks,
    newton_step,
    nll_derivatives,
    row_nll,
    softplus_inverse,
    standardisation,
    warn_fit,
)

__all__ = ["SelectiveScalingCalibrator", "default_detector"]

# the paper's "uniform" temperature; also the top of the default temperature range
UNIFORM_TEMPERATURE = 1e10
# mode="generalised": what beta(x) = softplus(w . phi(x) + b) reads (then the context columns)
GENERALISED_INPUTS = ("p_correct", "max_log_proba", "entropy", "margin")
# its ridge on w (standardised inputs): keeps the non-convex fit well posed, costs nothing
_GENERALISED_L2 = 1e-4
# its trust-region Newton stops at this gradient norm (nats per pixel per unit of theta)
_GENERALISED_GTOL = 1e-9


# the guard keeps selective scaling only where a one-sided paired t-test over the calibration
# images rejects "no better than TS" at this level
_GUARD_LEVEL = 0.05
# the shrinkage's Newton on lambda in [0, 1]: a change below this moves no probability that
# matters, and a convex 1-D problem needs a handful of steps
_SHRINK_TOL = 1e-3
_SHRINK_MAX_ITER = 20


def _guard_t_statistic(improvement: np.ndarray) -> float:
    """The paired t statistic of the per-image improvements (inf when all equal and > 0)."""
    k = len(improvement)
    # t is scale-free: divide by the largest gain first, so that the squares of NLL gains
    # of extreme logits (1e281 nats) cannot overflow
    top = float(np.max(np.abs(improvement), initial=0.0))
    if not np.isfinite(top):
        return float(np.sign(np.sum(np.sign(improvement)))) * np.inf
    improvement = improvement / top if top > 0 else improvement
    mean = float(improvement.mean())
    sd = float(improvement.std(ddof=1)) if k > 1 else 0.0
    if sd == 0.0:
        return np.inf if mean > 0 else (-np.inf if mean < 0 else 0.0)
    return mean / (sd / np.sqrt(k))


def _shrinkage(Z, y, unit_weight, beta_selective, beta_ts, chunk_size) -> tuple[float, float]:
    """(lambda, the mean NLL there): the blend ``beta_ts + lambda (beta_sel - beta_ts)``,
    lambda in [0, 1], of least out-of-fold NLL, every image weighing the same.

    Both per-row inverse temperatures come from fits without the row's fold, so the
    criterion estimates the NLL on new images of each blend. The NLL is convex in
    lambda (convex in beta, beta affine in lambda): a projected Newton with Armijo
    backtracking from lambda = 1 (where selective scaling is clearly better, one pass).
    """
    direction = np.asarray(beta_selective - beta_ts, dtype=np.float64)
    if not np.any(direction):
        return 1.0, float("nan")
    basis, offset = direction[:, None], np.asarray(beta_ts, dtype=np.float64)

    def evaluate(lam):
        f, g, h = nll_derivatives(
            Z,
            y,
            np.array([lam]),
            basis=basis,
            offset=offset,
            sample_weight=unit_weight,
            chunk_size=chunk_size,
        )
        return f, float(g[0]), float(h[0, 0])

    lam = 1.0
    f, g, h = evaluate(lam)
    for _ in range(_SHRINK_MAX_ITER):
        if not (np.isfinite(f) and np.isfinite(g)):
            return 0.0, float("nan")
        # at a bound with the gradient pointing out of [0, 1]: the minimum
        if (lam >= 1.0 and g <= 0.0) or (lam <= 0.0 and g >= 0.0):
            break
        step = -g / h if h > 0 else -np.sign(g)
        target = float(np.clip(lam + step, 0.0, 1.0))
        while True:
            f_new, g_new, h_new = evaluate(target)
            # Armijo on the projected step; halve towards lam otherwise
            if f_new <= f + 1e-4 * g * (target - lam) or abs(target - lam) < _SHRINK_TOL:
                break
            target = lam + 0.5 * (target - lam)
        moved = abs(target - lam)
        lam, f, g, h = target, f_new, g_new, h_new
        if moved < _SHRINK_TOL:
            break
    return float(lam), float(f)


def _gain_supported(gains: np.ndarray) -> bool:
    """Whether per-image NLL gains over TS exceed one standard error of their mean (t > 1).

    The screen a blend must pass to be kept: a mean gain within one standard error of
    nothing is what the spread of the images alone gives about one time in six.
    """
    n = len(gains)
    if n < 2:
        return False
    mean, se = float(gains.mean()), float(gains.std(ddof=1)) / np.sqrt(n)
    return bool(np.isfinite(mean) and np.isfinite(se) and mean > se)


def _guard_keeps(improvement: np.ndarray) -> bool:
    """The guard's rule: selective scaling wins on average over the images, by a margin the
    images support (one-sided paired t-test at ``_GUARD_LEVEL``).

    Every calibration image contributes one paired difference (its mean out-of-fold NLL under
    TS minus under selective scaling, both fitted without the image's fold), so the test has
    as many degrees of freedom as there are images less one, not the four of five folds.
    """
    from scipy.stats import t as student_t

    k = len(improvement)
    if k < 2 or not improvement.mean() > 0:
        return False
    return bool(_guard_t_statistic(improvement) >= student_t.ppf(1.0 - _GUARD_LEVEL, k - 1))


def default_detector():
    """The correctness classifier ``SelectiveScalingCalibrator(classifier=None)`` fits.

    ``make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))``: on
    the class-agnostic features (sorted top-5 log-probabilities, entropy,
    margin) a linear detector separated correct from mispredicted pixels as
    well as the paper's MLP and gradient boosting on every real case, for a
    fraction of their fit time and at a higher prediction throughput than
    gradient boosting (docs/detectors.md, ``benchmarks/bench_detectors.py``).

    Returns
    -------
    detector : sklearn.pipeline.Pipeline
        Unfitted.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))


def _fit_classifier(classifier, features, correct, sample_weight):
    """Fit a (cloned) correctness classifier; module level so joblib.Memory can cache it."""
    if sample_weight is None:
        return classifier.fit(features, correct)
    return classifier.fit(features, correct, sample_weight=sample_weight)


def _finite_features(z: np.ndarray, kind: str) -> np.ndarray:
    """Detector features of logits, finite even for logits near the top of their dtype.

    Logit gaps beyond the float range make log-probabilities -inf (and the
    entropy 0 * -inf = NaN). Only then are the features recomputed from
    logits whose distance below the row maximum is capped at 1e4, where every
    probability is exactly 0 anyway; every feature is floored at -1e4.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        out = features_from_logits(z, kind)
        if not np.isfinite(out).all():
            shifted = np.maximum(z - z.max(axis=1, keepdims=True), LOG_PROBA_FLOOR)
            out = features_from_logits(shifted.astype(z.dtype), kind)
    # and no log-probability below the floor (float64 ones would overflow a float32 detector)
    return np.maximum(out, LOG_PROBA_FLOOR, out=out)


def _p_correct_of(detector, features: np.ndarray) -> np.ndarray:
    """A fitted detector's P(correct): its probability of class 1."""
    proba = detector.predict_proba(features)
    # the classifier was trained on both targets 0 and 1 (one class only gives
    # _ConstantCorrectness, whose classes_ are [0, 1] too)
    return proba[:, np.flatnonzero(np.asarray(detector.classes_) == 1)[0]]


class _ConstantCorrectness:
    """Stands in for the classifier when the fit data hold one correctness class."""

    def __init__(self, p_correct: float):
        self.p_correct = p_correct

    def predict_proba(self, X):
        p = np.full(X.shape[0], self.p_correct)
        return np.column_stack([1 - p, p])

    classes_ = np.array([0, 1])


def _candidate_thresholds(p: np.ndarray) -> list[float]:
    """Thresholds flagging 0.5% to 50% of the held-out pixels, plus the paper's 0.5."""
    levels = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    quantiles = np.quantile(p, levels) if len(p) else np.zeros(0)
    # a threshold just above a quantile flags that quantile's share of pixels
    candidates = {0.5, *np.nextafter(quantiles.astype(np.float32), np.float32(2)).tolist()}
    return sorted(c for c in candidates if 0.0 < c <= 1.0)


class SelectiveScalingCalibrator(BaseLogitCalibrator):
    """Selective scaling (Wang, Gong & Wang, CVPR 2023) as a scikit-learn classifier.

    A binary classifier learns, from each pixel's log-probabilities, whether
    the segmentation model got that pixel right. Pixels it calls correct are
    divided by the temperature ``t1``; pixels it calls mispredicted by ``t2``
    (large: the paper uses 1e10, a uniform distribution). Dividing by a
    positive temperature never reorders a pixel's logits, so the predicted
    class, the accuracy and the mIoU are unchanged.

    Parameters
    ----------
    classifier : estimator with predict_proba, default=None
        The correctness classifier, trained on features of each pixel with
        target 1 for correct and 0 for mispredicted. Any scikit-learn
        classifier (a Pipeline included). None uses
        :func:`default_detector`: a logistic regression on the standardised
        features (measured on the real cases against the paper's MLP and
        gradient boosting, docs/detectors.md: the same detection AUROC and
        ECE to within the spread over seeds, a fraction of the fit time, no
        torch at fit or prediction). The paper's MLP is one argument away:
        ``classifier=TorchMLPClassifier(random_state=0)``.
    input_type : {"logits", "probabilities"}, default="logits"
        What ``X`` holds. Probabilities are taken as log-probabilities.
    features : {"agnostic", "log_softmax"}, default="agnostic"
        What the classifier sees: class-agnostic sorted top-5
        log-probabilities, entropy and margin (the default: on this project's
        real cases it detected mispredictions better, kept that skill under an
        acquisition shift, and gave lower ECE, docs/quality.md; it is also
        smaller and faster at many classes), or the paper's full
        log-probability vector.
    t1 : float or "auto", default="auto"
        Temperature of pixels called correct. "auto" fits it by NLL on the
        out-of-fold detector scores of every fit pixel (see ``cv``); 1.0 is
        the paper's choice.
    t2 : float or "auto", default="auto"
        Temperature of pixels called mispredicted; 1e10 gives uniform rows.
        "auto" fits it by NLL like ``t1`` (within ``temperature_bounds``).
        Fixed values reproduce the paper (1e10 for an accurate classifier, 2
        for a moderate one); on real data they are often worse than
        temperature scaling, hence the fitted default.
    threshold : float in (0, 1) or "auto", default="auto"
        A pixel is called correct when the classifier's P(correct) is at
        least this (hard mode). "auto" chooses, on the out-of-fold scores, the
        threshold (among those flagging 0.5% to 50% of the pixels, and 0.5) whose
        fitted temperatures give the lowest NLL: with a very accurate
        segmentation model a detector rarely says P(correct) < 0.5, and a
        fixed 0.5 then flags nothing.
    mode : {"soft", "hard", "generalised"}, default="soft"
        "hard" splits pixels at ``threshold`` as the paper does; "soft" gives
        each pixel the inverse temperature ``p / t1 + (1 - p) / t2`` with
        ``p`` its P(correct). "generalised" gives it
        ``beta(x) = softplus(w . phi(x) + b)`` over standardised inputs
        ``phi``: P(correct), the max log-probability, the entropy and the
        margin (and the spatial context columns with ``context="spatial"``),
        ``(w, b)`` fitted by NLL on the out-of-fold scores with a small ridge on
        ``w``, by trust-region Newton with the exact Hessian from temperature
        scaling (``w = 0``): the model of :class:`LocalTemperatureScaling`,
        with the same solver and attribute names. It contains TS (``w = 0``)
        and, up to the softplus, soft selective scaling. ``t1``, ``t2`` and ``threshold``
        are unused in it (it always fits; the guard applies as to the others).
        Soft blending with both temperatures fitted is the default: it has
        no threshold to tune and was as good as or better than the hard split
        on this project's real cases (docs/quality.md). The paper's recipe is
        ``SelectiveScalingCalibrator(TorchMLPClassifier(class_weight="paper"),
        features="log_softmax", t1=1.0, t2=1e10, threshold=0.5, mode="hard")``.
    cv : int, default=5
        Folds of the cross-fitting, over the images when ``groups`` is given
        to ``fit`` (else over contiguous blocks of rows, which in a pixel
        table are runs of whole images). A detector trained on the other
        folds scores each fold, so every fit pixel gets an out-of-fold
        P(correct); the temperatures are fitted on all of them, and the
        detector used for prediction is refitted on every fit pixel. Every
        image thus informs both the detector and the temperatures. Unused
        when no temperature is "auto" (the detector is then fitted once).
    max_fit_pixels : int, default=500_000
        At most this many pixels train the detectors and fit the
        temperatures; sampled with the seed, stratified by correctness so
        that rare mispredictions keep their share.
    guard : {"shrink", "ts"} or None, default="shrink"
        Never do worse than temperature scaling. With both temperatures
        "auto" (or in generalised mode), every fold's selective temperatures
        and a TS temperature are fitted on the other folds and scored by NLL
        on the fold's pixels (out-of-fold detector scores throughout), so
        every calibration image gets a paired improvement: its mean NLL
        under TS minus under selective scaling.

        - ``"shrink"``: the inverse temperatures become
          ``beta_TS + lambda (beta_selective - beta_TS)`` with ``lambda`` in
          [0, 1] minimising that out-of-fold NLL (every image weighing the
          same), kept if the blend's mean per-image gain over TS exceeds one
          standard error of it (t > 1), else ``lambda = 0`` (TS). 1 keeps
          selective scaling and a partial gain keeps its part. A blend of
          TS and a two-temperature model is a two-temperature model, so
          ``t1_`` and ``t2_`` are the blended temperatures and prediction is
          unchanged. In generalised mode (a softplus model, not closed
          under the blend) it acts as ``"ts"``.
        - ``"ts"``: all or nothing. Selective scaling is kept only when the
          mean improvement is positive and a one-sided paired t-test over
          the images rejects "no better than TS" at the 5% level (with 20
          images: t >= 1.73).

        Falling back gives ``t1_ = t2_ =`` the TS temperature of every fit
        pixel (the detector stays fitted, but no longer changes any
        probability). Without ``groups`` the units are ``4 * cv``
        contiguous blocks of rows. ``None`` switches the guard off. The
        evidence is in ``guard_scores_`` and :meth:`summary`.
    context : {"spatial"} or None, default=None
        ``"spatial"``: X is the output of
        ``flatten_segmentation(..., context="spatial")``, the C logit columns
        followed by the spatial context columns of
        :func:`sksegcal.context.spatial_context` (neighbour disagreement,
        distance to the predicted boundary, local entropy and margin). The
        correctness detector sees its usual features plus the context; the
        temperatures scale the C logit columns only, and ``predict_proba``
        returns (n, C). ``n_features_in_`` is then C + K and ``classes_`` is
        ``arange(C)``. The store engine (``fit_store``, ``evaluate_store``,
        ``predict_store``), mmseg's ``calibrate_model`` and
        ``CalibrationMetric`` and the command line compute the context per
        image themselves when the calibrator asks for it.
    on_single_class : {"raise", "constant"}, default="raise"
        What to do when every fit pixel is correct (or every one wrong):
        raise a ValueError, or use a constant classifier (everything gets
        ``t1``, resp. ``t2``).
    ignore_index : int or None, default=255
        Label of unlabelled pixels, left out of fit and score.
    memory : str, joblib.Memory or None, default=None
        Cache of fitted classifiers, as in scikit-learn's Pipeline: a grid
        over ``t1``/``t2``/``threshold``/``mode`` then fits the classifier once
        per distinct classifier setting and data.
    chunk_size : int, default=65536
        Rows processed at a time at prediction.
    temperature_bounds : tuple of float, default=(0.01, 1e10)
        Range of every fitted temperature (1e10: uniform rows).
    random_state : int, RandomState or None, default=None
        Seeds the pixel sampling and the folds (the default detector is
        deterministic).
    holdout_fraction : float
        Deprecated and without effect: every image is used, by
        cross-fitting (``cv``).

    Attributes
    ----------
    classifier_ : estimator
        The fitted correctness classifier.
    t1_, t2_ : float
        The temperatures in use (fitted ones when "auto"). Generalised mode:
        a summary for display, the median fitted temperature of the fit
        pixels with out-of-fold P(correct) >= 0.5 (``t1_``) and below (``t2_``).
    temperature_coef_, temperature_intercept_ : ndarray, float
        Generalised mode only: ``w`` and ``b`` (0 and TS's after a guard
        fallback).
    temperature_inputs_ : tuple of str
        Generalised mode only: the names of the inputs of ``beta``.
    temperature_mean_, temperature_scale_ : ndarray
        Generalised mode only: their standardisation (weighted, fit pixels;
        a constant input gets scale 1 and weight 0).
    classes_ : ndarray of shape (n_classes,)
        ``arange(n_classes)``.
    n_features_in_ : int
        Number of classes (columns of ``X``).
    threshold_ : float
        The threshold in use (the chosen one when "auto").
    held_out_flagged_fraction_ : float or None
        Hard mode: share of fit pixels whose out-of-fold P(correct) is below
        ``threshold_``.
    fit_accuracy_ : float
        Share of correctly predicted pixels in the fit data.
    detection_auroc_ : float or None
        AUROC of the out-of-fold P(correct) for the correct/mispredicted
        split (None without "auto" temperatures or with one class).
    n_iter_ : int
        Newton iterations of the temperature fit (0 without "auto" ones;
        generalised mode: trust-region iterations).
    converged_ : bool
        Whether the temperature fit met its tolerance.
    guard_choice_ : {"selective", "shrunk", "ts"} or None
        What the guard kept (``"shrunk"``: a blend, ``guard_scores_["shrinkage"]``
        is its ``lambda``); None when it did not run (``guard=None``, a fixed
        temperature).
    guard_scores_ : dict or None
        The guard's evidence: per image (or block of rows), the mean
        out-of-fold NLL of selective scaling (``"nll_selective"``) and of TS
        (``"nll_ts"``), their difference (``"improvement"``, positive where
        selective scaling is better), the paired t statistic, the pixels per
        unit (``"unit_sizes"``), the TS temperature of the fallback
        (``"ts_temperature"``) and the selective temperatures it replaced, if
        it did; with ``guard="shrink"`` also ``"shrinkage"`` (the ``lambda``
        used), ``"shrinkage_least_nll"`` (the least-NLL ``lambda``) and that
        blend's per-image NLL (``"nll_shrunk"``) and mean gain
        (``"mean_improvement_shrunk"``).

    See Also
    --------
    TemperatureScaling : One temperature for every pixel.
    TorchMLPClassifier : The paper's correctness classifier.
    default_detector : The default correctness classifier.

    Notes
    -----
    Folds are whole images when ``groups`` is passed to ``fit``
    (recommended: neighbouring pixels are correlated, so pixel-level folds
    are optimistic). ``score`` returns the negative mean NLL, so a grid search
    with ``scoring=None`` selects by calibration, not accuracy.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sksegcal import SelectiveScalingCalibrator
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, size=3000)
    >>> logits = 4.0 * (np.eye(3)[y] + rng.normal(size=(3000, 3)))
    >>> cal = SelectiveScalingCalibrator(LogisticRegression(), random_state=0)
    >>> cal = cal.fit(logits, y)
    >>> bool((cal.predict(logits) == logits.argmax(axis=1)).all())
    True

    Here the logits' errors are noise a detector can hardly see, so the
    guard finds no out-of-fold gain over temperature scaling and keeps TS:

    >>> cal.guard_choice_, bool(cal.t1_ == cal.t2_)
    ('ts', True)
    """

    _parameter_constraints: dict = {
        **BaseLogitCalibrator._parameter_constraints,
        "classifier": [HasMethods(["fit", "predict_proba"]), None],
        "features": [StrOptions(set(FEATURE_SETS))],
        "context": [StrOptions({"spatial"}), None],
        "t1": [Interval(numbers.Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "t2": [Interval(numbers.Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "threshold": [Interval(numbers.Real, 0, 1, closed="neither"), StrOptions({"auto"})],
        "mode": [StrOptions({"hard", "soft", "generalised"})],
        "cv": [Interval(numbers.Integral, 2, None, closed="left")],
        "max_fit_pixels": [Interval(numbers.Integral, 2, None, closed="left")],
        "guard": [StrOptions({"shrink", "ts"}), None],
        "temperature_bounds": [tuple, list],
        "on_single_class": [StrOptions({"raise", "constant"})],
        "memory": [None, str, HasMethods(["cache"])],
        "random_state": ["random_state"],
        "holdout_fraction": [
            Interval(numbers.Real, 0, 1, closed="neither"),
            StrOptions({"deprecated"}),
        ],
    }
    # image ids are requested through metadata routing by default: Pipeline, GridSearchCV
    # and fit_store pass them on
    __metadata_request__fit = {"groups": True}

    def __init__(
        self,
        classifier=None,
        *,
        input_type: str = "logits",
        features: str = "agnostic",
        t1: float | str = "auto",
        t2: float | str = "auto",
        threshold: float | str = "auto",
        mode: str = "soft",
        cv: int = 5,
        max_fit_pixels: int = 500_000,
        guard: str | None = "shrink",
        context: str | None = None,
        temperature_bounds: tuple[float, float] = (0.01, UNIFORM_TEMPERATURE),
        on_single_class: str = "raise",
        ignore_index: int | None = 255,
        memory=None,
        chunk_size: int = 65536,
        random_state=None,
        holdout_fraction="deprecated",
    ):
        self.classifier = classifier
        self.input_type = input_type
        self.features = features
        self.t1 = t1
        self.t2 = t2
        self.threshold = threshold
        self.mode = mode
        self.cv = cv
        self.max_fit_pixels = max_fit_pixels
        self.guard = guard
        self.context = context
        self.temperature_bounds = temperature_bounds
        self.on_single_class = on_single_class
        self.ignore_index = ignore_index
        self.memory = memory
        self.chunk_size = chunk_size
        self.random_state = random_state
        self.holdout_fraction = holdout_fraction

    @classmethod
    def _migrate_state(cls, state: dict) -> dict:
        # saved before cross-fitting: the hold-out share is no parameter any more
        if "cv" not in state:
            state["holdout_fraction"] = "deprecated"
        return super()._migrate_state(state)

    # ---------------------------------------------------------------- features
    @property
    def reads_context(self) -> str | None:
        return self.context

    def _n_extra_columns(self) -> int:
        # context="spatial": X holds the C logit columns, then the spatial context columns of
        # flatten_segmentation(..., context="spatial")
        if self.context is None:
            return 0
        from ..context import n_context_features

        return n_context_features()

    def _features(self, X: np.ndarray) -> np.ndarray:
        """Classifier features of validated input rows (float64 input stays float64)."""
        cols, extra = self._split_chunk(X)
        z = self._to_logits(cols).astype(self._work_dtype(X), copy=False)
        return self._detector_input(z, extra)

    def _detector_input(self, z: np.ndarray, extra) -> np.ndarray:
        features = _finite_features(z, self.features)
        if extra is None:
            return features
        return np.hstack([features, np.asarray(extra, dtype=features.dtype)])

    def _p_correct(self, features: np.ndarray) -> np.ndarray:
        return _p_correct_of(self.classifier_, features)

    # ------------------------------------------------------ temperature model
    def _model(self):
        """The fitted temperature model, rebuilt from the fitted attributes."""
        if self.mode == "generalised":
            return SoftplusTemperature(
                self.temperature_coef_,
                self.temperature_intercept_,
                self.temperature_mean_,
                self.temperature_scale_,
            )
        return TwoTemperatures(self.mode, self.t1_, self.t2_, self.threshold_)

    # ------------------------------------------------------- generalised mode
    def _temperature_inputs(self, z, features, extra, p_correct) -> np.ndarray:
        """Unstandardised inputs of beta(x) in generalised mode, (n, 4 + K) float64.

        P(correct), then the max log-probability, entropy and margin (read from
        the detector's agnostic features when it has them, else computed), then
        the spatial context columns when there are any.
        """
        if self.features == "agnostic":
            agnostic = features
        else:
            agnostic = _finite_features(z, "agnostic")
        k = min(5, z.shape[1])
        parts = [
            np.asarray(p_correct, dtype=np.float64)[:, None],
            np.asarray(agnostic[:, [0, k, k + 1]], dtype=np.float64),
        ]
        if extra is not None:
            parts.append(np.asarray(extra, dtype=np.float64))
        return np.concatenate(parts, axis=1)

    def _make_classifier(self, random_state: int):
        if self.classifier is not None:
            return clone(self.classifier)
        return default_detector()

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y, sample_weight=None, groups=None):
        """Fit the correctness classifier and the temperatures, cross-fitted by image.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes)
            Logits (or probabilities with ``input_type="probabilities"``).
        y : array-like of shape (n_pixels,)
            Class indices; pixels equal to ``ignore_index`` are left out.
        sample_weight : array-like of shape (n_pixels,), default=None
            Per-pixel weights, used for the temperatures and passed to the
            classifier when it accepts them.
        groups : array-like of shape (n_pixels,), default=None
            Image id of each pixel. The folds of the cross-fitting and the
            units of the guard's comparison are then whole images
            (recommended); without it, contiguous blocks of rows.

        Returns
        -------
        self : object
            The fitted calibrator.
        """
        self._validate_params()
        X, y, sample_weight, groups = self._validate_fit_data(X, y, sample_weight, groups)
        self._fit_calibration(X, y, sample_weight, groups)
        return self

    def _needs_temperatures(self) -> bool:
        return (
            "auto" in (self.t1, self.t2)
            or (self.mode == "hard" and self.threshold == "auto")
            or self.mode == "generalised"
        )

    def _fit_calibration(self, X, y, sample_weight, groups=None):
        if self.holdout_fraction != "deprecated":
            warnings.warn(
                "SelectiveScalingCalibrator(holdout_fraction=...) is deprecated and has no "
                "effect: the detector and the temperatures are cross-fitted over every "
                "calibration image (cv folds). It will be removed in a future release.",
                FutureWarning,
                stacklevel=4,
            )
        warn_no_groups(groups, self._needs_temperatures(), owner=type(self).__name__)
        bounds = check_temperature_bounds(self.temperature_bounds)
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        correct = np.argmax(self._split_chunk(X)[0], axis=1) == y
        self.fit_accuracy_ = float(correct.mean())
        self.threshold_ = 0.5 if self.threshold == "auto" else float(self.threshold)
        self.held_out_flagged_fraction_ = None
        self.t1_ = 1.0 if self.t1 == "auto" else float(self.t1)
        self.t2_ = UNIFORM_TEMPERATURE if self.t2 == "auto" else float(self.t2)
        self.detection_auroc_ = None
        self.n_iter_, self.converged_ = 0, True
        self.guard_choice_, self.guard_scores_ = None, None

        # the rows everything is fitted on: a sample stratified by correctness, kept in row
        # order (so that contiguous blocks stay runs of whole images)
        rows = np.sort(
            sample_pixels(len(y), self.max_fit_pixels, strata=correct, random_state=rng)
        )
        features = self._features(X[rows])
        target = correct[rows].astype(np.int64)
        weight = None if sample_weight is None else sample_weight[rows]
        self.classifier_ = self._fit_correctness(features, target, weight, seed)
        if self.mode == "generalised":
            # until fitted: temperature scaling at T = 1
            names = GENERALISED_INPUTS + self._context_names()
            self.temperature_inputs_ = names
            self.temperature_mean_ = np.zeros(len(names))
            self.temperature_scale_ = np.ones(len(names))
            self.temperature_coef_ = np.zeros(len(names))
            self.temperature_intercept_ = softplus_inverse(1.0)
        if not self._needs_temperatures():
            return self

        fold_groups = None if groups is None else groups[rows]
        folds, units, by = self._folds(len(rows), fold_groups, rng)
        if folds is None:
            return self
        # out-of-fold P(correct): each fold scored by a detector that never saw its images
        p = self._out_of_fold_p_correct(features, target, weight, folds, seed)
        if 0 < target.sum() < len(target):
            self.detection_auroc_ = float(roc_auc_score(target, p))
        cols, extra = self._split_chunk(X[rows])
        Z = self._to_logits(cols).astype(self._work_dtype(X), copy=False)
        yy = y[rows]
        signal, constant = p, None
        if self.mode == "generalised":
            inputs = self._temperature_inputs(Z, features, extra, p)
            w = np.ones(len(yy)) if weight is None else weight
            mean, scale, constant = standardisation(
                lambda part: inputs[part], len(inputs), inputs.shape[1], w, self.chunk_size
            )
            self.temperature_mean_, self.temperature_scale_ = mean, scale
            signal = (inputs - mean) / scale
        # temperature scaling on the same rows: the guard's reference, and the start of the
        # soft fit (both temperatures at TS's: a start a few Newton steps from the minimum)
        ts_all = GlobalTemperature.fit(
            Z, yy, sample_weight=weight, bounds=bounds, chunk_size=self.chunk_size
        )
        start = None
        if self.mode == "soft" and self.t1 == "auto" and self.t2 == "auto":
            start = TwoTemperatures("soft", ts_all.temperature, ts_all.temperature)
        model = self._fit_model(Z, yy, weight, signal, constant, bounds, start=start)
        self._take_model(model, p, signal)
        self.n_iter_ = sum(fit.n_iter for _, fit in model.fits)
        self.converged_ = all(fit.converged for _, fit in model.fits)
        self._warn_model(model, bounds)
        if self.mode == "hard":
            n_flagged = int((p < self.threshold_).sum())
            if n_flagged in (0, len(p)) and "auto" in (self.t1, self.t2):
                warnings.warn(
                    f"No out-of-fold pixel falls in the {'t2' if n_flagged == 0 else 't1'} "
                    f"group (threshold {self.threshold_:.4g}); its temperature takes the other "
                    f"group's value (t1={self.t1_:.4g}, t2={self.t2_:.4g}). With a very "
                    "accurate model use threshold='auto', weight the mispredicted class in "
                    "the classifier, or use mode='soft'.",
                    UserWarning,
                    stacklevel=4,
                )
            self.held_out_flagged_fraction_ = n_flagged / max(len(p), 1)
        if self.guard is not None and (
            self.mode == "generalised" or (self.t1 == "auto" and self.t2 == "auto")
        ):
            self._apply_guard(
                Z, yy, weight, signal, constant, model, ts_all, folds, units, by, bounds
            )
        return self

    def _folds(self, n, groups, rng):
        """(fold of each row, unit of each row, "image" | "rows"), or Nones with < 2 units.

        By image when ``groups`` holds two images or more: images are dealt to
        ``cv`` folds at random and each image is a unit of the guard. Else
        contiguous blocks of rows (in a pixel table, runs of whole images):
        ``cv`` folds, each cut into 4 units.
        """
        if groups is not None:
            images, unit = np.unique(groups, return_inverse=True)
            if len(images) >= 2:
                k = min(self.cv, len(images))
                image_fold = np.empty(len(images), np.int64)
                image_fold[rng.permutation(len(images))] = np.arange(len(images)) % k
                return image_fold[unit], unit, "image"
            warnings.warn(
                "groups holds a single image: the cross-fitting folds fall back to "
                "contiguous blocks of its pixels.",
                UserWarning,
                stacklevel=5,
            )
        if n < 2:
            raise ValueError(
                f"Got {n} sample (pixel): at least 2 are needed to cross-fit 'auto' temperatures."
            )
        k = min(self.cv, n)
        n_units = min(4 * k, n)
        unit = (np.arange(n) * n_units) // n
        return (unit * k) // n_units, unit, "rows"

    def _out_of_fold_p_correct(self, features, target, weight, folds, seed) -> np.ndarray:
        """P(correct) of every row from a detector trained on the other folds only."""
        p = np.empty(len(target))
        for fold in np.unique(folds):
            test = folds == fold
            train = ~test
            n_correct = int(target[train].sum())
            if n_correct in (0, int(train.sum())):
                p[test] = 1.0 if n_correct else 0.0
                continue
            detector = self._fit_correctness(
                features[train],
                target[train],
                None if weight is None else weight[train],
                seed,
                quiet=True,
            )
            p[test] = _p_correct_of(detector, features[test])
        return p

    def _fit_model(self, Z, y, w, signal, constant, bounds, rows=None, start=None):
        """The temperature model fitted on (some) rows of the out-of-fold signal."""
        common = {
            "sample_weight": w,
            "rows": rows,
            "bounds": bounds,
            "start": start,
            "chunk_size": self.chunk_size,
        }
        if self.mode == "generalised":
            return SoftplusTemperature.fit(
                Z,
                y,
                signal,
                mean=self.temperature_mean_,
                scale=self.temperature_scale_,
                constant=constant,
                l2=_GENERALISED_L2,
                tol=_GENERALISED_GTOL,
                **common,
            )
        if self.mode == "hard" and self.threshold == "auto":
            thresholds = _candidate_thresholds(signal if rows is None else signal[rows])
        else:
            thresholds = [self._fixed_threshold()]
        return TwoTemperatures.fit(
            Z, y, signal, kind=self.mode, t1=self.t1, t2=self.t2, thresholds=thresholds, **common
        )

    def _take_model(self, model, p, signal) -> None:
        """Make a fitted temperature model the fitted state."""
        if self.mode != "generalised":
            self.t1_, self.t2_, self.threshold_ = model.t1, model.t2, model.threshold
            return
        if model.overflow:
            warnings.warn(
                f"{type(self).__name__}: the logits are too large for the generalised "
                "temperature (its NLL overflows float64); it stays at temperature "
                "scaling. Divide the logits by a constant to fit it.",
                UserWarning,
                stacklevel=5,
            )
        self.temperature_coef_ = model.coef.copy()
        self.temperature_intercept_ = model.intercept
        # t1_/t2_ summarise the fitted beta(x) for display: the median temperature of the
        # pixels the detector calls correct (P >= 0.5), and of the others
        t = 1.0 / model.inverse_temperatures_of_phi(signal)
        called = np.asarray(p) >= 0.5
        overall = float(np.median(t))
        self.t1_ = float(np.median(t[called])) if called.any() else overall
        self.t2_ = float(np.median(t[~called])) if (~called).any() else overall

    def _warn_model(self, model, bounds) -> None:
        from sklearn.exceptions import ConvergenceWarning

        for names, fit in model.fits:
            if self.mode != "generalised":
                warn_fit(fit, names, bounds, owner=type(self).__name__, stacklevel=6)
            elif not fit.converged:
                warnings.warn(
                    f"{type(self).__name__}: the generalised temperature fit did not converge "
                    f"in {fit.n_iter} trust-region Newton iterations ({fit.message}); the "
                    "temperatures are the last iterate.",
                    ConvergenceWarning,
                    stacklevel=6,
                )

    def _fit_correctness(self, features, target, weight, seed, quiet=False):
        n_correct = int(target.sum())
        if n_correct in (0, len(target)):
            what = "correct" if n_correct else "mispredicted"
            if self.on_single_class == "raise" and not quiet:
                raise ValueError(
                    f"Every one of the {len(target)} pixels used to train the correctness "
                    f"classifier is {what}: one class only, nothing to tell apart. Calibrate on "
                    "more images (with both right and wrong predictions), or pass "
                    "on_single_class='constant' to give every pixel "
                    f"{'t1' if n_correct else 't2'}."
                )
            return _ConstantCorrectness(1.0 if n_correct else 0.0)
        cached_fit = check_memory(self.memory).cache(_fit_classifier)
        return cached_fit(self._make_classifier(seed), features, target, weight)

    def _context_names(self) -> tuple:
        if self.context is None:
            return ()
        from ..context import CONTEXT_FEATURES

        return tuple(CONTEXT_FEATURES)

    # -------------------------------------------------------------------- guard
    def _apply_guard(self, Z, y, w, signal, constant, model, ts_all, folds, units, by, bounds):
        """Compare with TS image by image on every row, out of fold; fall back to TS.

        For each fold, the selective temperatures and a TS temperature are
        fitted on the other folds' rows (out-of-fold detector scores) and
        scored by NLL on the fold's rows; each unit (image) then has a paired
        improvement, its mean NLL under TS minus under selective scaling.
        """
        betas = None
        if self.mode == "soft":
            # (the hard split's groups can be small: their one-step fits are refitted instead)
            betas = self._fold_betas_one_step(Z, y, w, signal, model, ts_all, folds, bounds)
        if betas is None:
            betas = self._fold_betas_refitted(
                Z, y, w, signal, constant, model, ts_all, folds, bounds
            )
        with np.errstate(over="ignore", invalid="ignore"):
            # (logits near the float maximum: infinite losses, which the t statistic handles)
            nll_sel = row_nll(Z, y, betas[0], chunk_size=self.chunk_size)
            nll_ts = row_nll(Z, y, betas[1], chunk_size=self.chunk_size)
        weights = np.ones(len(y)) if w is None else w
        mass = np.bincount(units, weights=weights)
        present = mass > 0
        per_unit = lambda v: np.bincount(units, weights=weights * v)[present] / mass[present]  # noqa: E731
        with np.errstate(over="ignore", invalid="ignore"):
            unit_sel, unit_ts = per_unit(nll_sel), per_unit(nll_ts)
        improvement = unit_ts - unit_sel
        t_ts = float(ts_all.temperature)
        shrink = self.guard == "shrink" and self.mode != "generalised"
        lam, unit_blend = None, None
        if shrink:
            # every image weighs the same and one whose rows all weigh 0 takes no part, as in
            # the comparison above
            unit_mass = mass[units]
            unit_weight = np.divide(
                weights,
                unit_mass,
                out=np.zeros_like(weights, dtype=np.float64),
                where=unit_mass > 0,
            )
            with np.errstate(over="ignore", invalid="ignore"):
                best = _shrinkage(Z, y, unit_weight, betas[0], betas[1], self.chunk_size)[0]
                unit_blend = per_unit(
                    row_nll(
                        Z, y, betas[1] + best * (betas[0] - betas[1]), chunk_size=self.chunk_size
                    )
                )
                lam = best if _gain_supported(unit_ts - unit_blend) else 0.0
        self.guard_scores_ = {
            "nll_selective": unit_sel,
            "nll_ts": unit_ts,
            "improvement": improvement,
            "mean_improvement": float(improvement.mean()),
            "wins": int((improvement > 0).sum()),
            "n_units": len(improvement),
            "n_folds": len(np.unique(folds)),
            "unit_sizes": np.bincount(units)[present],
            "by": by,
            "ts_temperature": t_ts,
            "ts_temperature_all_rows": t_ts,
            "t_statistic": _guard_t_statistic(improvement),
            "rule": "keep selective scaling if its mean out-of-fold NLL improvement over TS "
            f"per {'image' if by == 'image' else 'block of rows'} is positive and a "
            "one-sided paired t-test over them rejects 'no better than TS' at the "
            f"{_GUARD_LEVEL:.0%} level",
        }
        if shrink:
            self.guard_scores_.update(
                {
                    "shrinkage": lam,
                    "shrinkage_least_nll": best,
                    "nll_shrunk": unit_blend,
                    "mean_improvement_shrunk": float((unit_ts - unit_blend).mean()),
                    "rule": "blend the selective inverse temperatures with TS's, beta_TS + "
                    "lambda (beta_selective - beta_TS), lambda in [0, 1] of least mean "
                    "out-of-fold NLL per image, kept if its mean gain per image over TS "
                    "exceeds one standard error (else TS)",
                }
            )
            if lam >= 1.0:
                self.guard_choice_ = "selective"
                return
            self.guard_scores_["replaced"] = {"t1": self.t1_, "t2": self.t2_}
            if lam > 0.0:
                # the blend of two models linear in their inverse temperatures is one of them
                self.guard_choice_ = "shrunk"
                self.t1_ = 1.0 / ((1.0 - lam) / t_ts + lam / self.t1_)
                self.t2_ = 1.0 / ((1.0 - lam) / t_ts + lam / self.t2_)
                return
        elif _guard_keeps(improvement):
            self.guard_choice_ = "selective"
            return
        self.guard_choice_ = "ts"
        self.guard_scores_["replaced"] = {"t1": self.t1_, "t2": self.t2_}
        if self.mode == "generalised":
            self.guard_scores_["replaced"]["theta"] = model.theta
            self.temperature_coef_ = np.zeros_like(self.temperature_coef_)
            self.temperature_intercept_ = softplus_inverse(1.0 / t_ts)
        warn_fit(ts_all.fits[0][1], ("t1", "t2"), bounds, owner=type(self).__name__, stacklevel=5)
        self.t1_ = self.t2_ = t_ts

    def _fold_betas_one_step(self, Z, y, w, signal, model, ts_all, folds, bounds):
        """Each row's inverse temperature, selective and TS, fitted without its fold.

        Both models are linear in their inverse temperatures (``beta = x1 p + x2
        (1 - p)`` with ``p`` the P(correct); TS: ``beta = x``), so one streamed
        pass gives the NLL derivatives of every
        fold, and the fit without a fold is one bounded Newton step from the fit
        on all rows (exact to second order in the fold's share of the rows).
        None when the derivatives overflow (logits near the float maximum).
        """
        ib = (1.0 / bounds[1], 1.0 / bounds[0])
        basis = np.column_stack([signal, 1.0 - signal])
        n = int(folds.max()) + 1
        fits = []
        for x, B in (
            (np.array([1.0 / model.t1, 1.0 / model.t2]), basis),
            (np.array([ts_all.inverse_temperatures()]), None),
        ):
            with np.errstate(over="ignore", invalid="ignore"):
                W, _, G, H = fold_derivatives(
                    Z, y, x, folds, n, basis=B, sample_weight=w, chunk_size=self.chunk_size
                )
            if not (np.isfinite(G).all() and np.isfinite(H).all()):
                return None
            fits.append((x, W, G, H))
        out = (np.empty(len(y)), np.empty(len(y)))
        for fold in range(n):
            rows = folds == fold
            for which, (x, W, G, H) in enumerate(fits):
                rest = W.sum() - W[fold]
                x_fold = x
                if rest > 0:
                    with np.errstate(over="ignore", invalid="ignore"):
                        g_rest = (G.sum(0) - G[fold]) / rest
                        H_rest = (H.sum(0) - H[fold]) / rest
                    if not (np.isfinite(g_rest).all() and np.isfinite(H_rest).all()):
                        return None
                    x_fold = newton_step(x, g_rest, H_rest, ib)
                out[which][rows] = basis[rows] @ x_fold if which == 0 else x_fold[0]
        return out

    def _fold_betas_refitted(self, Z, y, w, signal, constant, model, ts_all, folds, bounds):
        """Each row's inverse temperature, selective and TS, refitted without its fold."""
        out = (np.empty(len(y)), np.empty(len(y)))
        weights = np.ones(len(y)) if w is None else w
        for fold in np.unique(folds):
            test = folds == fold
            train = ~test
            if not weights[train].sum() > 0:
                out[0][test] = out[1][test] = ts_all.inverse_temperatures()
                continue
            sel = self._fit_model(Z, y, w, signal, constant, bounds, rows=train, start=model)
            ts = GlobalTemperature.fit(
                Z,
                y,
                sample_weight=w,
                rows=train,
                bounds=bounds,
                start=ts_all,
                chunk_size=self.chunk_size,
            )
            if self.mode == "generalised":
                out[0][test] = sel.inverse_temperatures_of_phi(signal[test])
            else:
                out[0][test] = sel.inverse_temperatures(signal[test])
            out[1][test] = ts.inverse_temperatures()
        return out

    def summary(self) -> str:
        """A few lines on what was fitted and what the guard chose, with its evidence."""
        check_is_fitted(self)
        if self.mode == "generalised":
            terms = ", ".join(
                f"{c:+.3g} {name}"
                for name, c in zip(self.temperature_inputs_, self.temperature_coef_)
            )
            head = (
                f"{type(self).__name__}: mode=generalised, beta = softplus("
                f"{self.temperature_intercept_:.4g} {terms}) on standardised inputs "
                f"(median T {self.t1_:.4g} where P(correct) >= 0.5, {self.t2_:.4g} below)"
            )
        else:
            head = (
                f"{type(self).__name__}: mode={self.mode}, t1={self.t1_:.4g}, "
                f"t2={self.t2_:.4g}"
                + (f", threshold={self.threshold_:.4g}" if self.mode == "hard" else "")
            )
        lines = [
            head,
            f"  fit accuracy {self.fit_accuracy_:.4f}; detector AUROC out of fold "
            + ("n/a" if self.detection_auroc_ is None else f"{self.detection_auroc_:.4f}"),
        ]
        if self.guard_choice_ is None:
            lines.append("  guard: did not run" + (" (guard=None)" if self.guard is None else ""))
        else:
            g = self.guard_scores_
            kept = {
                "selective": "selective",
                "shrunk": "a blend of selective and temperature",
            }.get(self.guard_choice_, "temperature")
            # calibrators saved before the per-image guard compared folds
            units = g.get("n_units", g["n_folds"])
            what = {"image": "images", "rows": "row blocks"}.get(g["by"], g["by"])
            if "n_units" not in g:
                what = f"folds by {g['by']}"
            lines.append(
                f"  guard: kept {kept} scaling"
                f" ({units} {what}: selective better in {g['wins']}, mean "
                f"out-of-fold NLL improvement {g['mean_improvement']:+.5f} nats/pixel over TS "
                f"T={g['ts_temperature']:.4g}"
                + (f", paired t = {g['t_statistic']:.2f})" if "t_statistic" in g else ")")
            )
            if "shrinkage" in g:
                lines.append(
                    f"  shrinkage toward TS: lambda = {g['shrinkage']:.3g} (1: selective, 0: "
                    f"TS); the least-NLL blend lambda = {g['shrinkage_least_nll']:.3g} improves "
                    f"the out-of-fold NLL by {g['mean_improvement_shrunk']:+.5f} nats/pixel"
                )
            if self.guard_choice_ == "ts":
                r = g["replaced"]
                lines.append(f"  replaced t1={r['t1']:.4g}, t2={r['t2']:.4g} by TS's T")
            elif self.guard_choice_ == "shrunk":
                r = g["replaced"]
                lines.append(f"  blended from t1={r['t1']:.4g}, t2={r['t2']:.4g}")
        return "\n".join(lines)

    def _fixed_threshold(self) -> float:
        return 0.5 if self.threshold == "auto" else float(self.threshold)

    # --------------------------------------------------------------- prediction
    def _beta(self, z, extra=None):
        """Per-row inverse temperatures of a chunk of logits (and its context columns).

        None without the context columns the detector needs (a bare logit chunk,
        as the store's evaluation shortcut passes).
        """
        if self.context is not None and extra is None:
            return None
        features = self._detector_input(z, extra)
        p = self._p_correct(features)
        if self.mode == "generalised":
            return self._model().inverse_temperatures(
                self._temperature_inputs(z, features, extra, p)
            )
        return self._model().inverse_temperatures(p)

    def predict_correctness(self, X) -> np.ndarray:
        """The classifier's P(correct) for each pixel.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes)

        Returns
        -------
        p_correct : ndarray of shape (n_pixels,), float32
        """
        X = self._validate_predict_data(X)
        out = np.empty(X.shape[0], dtype=np.float32)
        for part in iter_chunks(X.shape[0], self.chunk_size):
            out[part] = self._p_correct(self._features(X[part]))
        return out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # the default detector (lbfgs logistic regression) is deterministic; a user's
        # classifier answers for itself through its own random_state
        tags.non_deterministic = False
        return tags

    def _torch_module(self):
        from ..deployment._convert import selective_scaling_module

        return selective_scaling_module(self)
