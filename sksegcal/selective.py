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

from ._base import (
    LOG_PROBA_FLOOR,
    BaseLogitCalibrator,
    fit_inverse_temperatures,
    iter_chunks,
    nll_derivatives,
    scale_logits,
    warn_fit,
)
from ._softplus_temperature import (
    SoftplusTemperatureFit,
    fit_softplus_temperature,
    softplus,
    softplus_inverse,
    softplus_nll,
    standardisation,
)
from ._validation import warn_no_groups
from .features import FEATURE_SETS, features_from_logits
from .pixels import sample_pixels

__all__ = ["SelectiveScalingCalibrator", "default_detector"]

# the paper's "uniform" temperature; also the top of the 'auto' search range
UNIFORM_TEMPERATURE = 1e10
_AUTO_BOUNDS = (1e-2, UNIFORM_TEMPERATURE)
# folds of the held-out pixels on which the guard compares selective scaling with TS
_GUARD_FOLDS = 5
# mode="generalised": what beta(x) = softplus(w . phi(x) + b) reads (then the context columns)
GENERALISED_INPUTS = ("p_correct", "max_log_proba", "entropy", "margin")
# its ridge on w (standardised inputs): keeps the non-convex fit well posed, costs nothing
_GENERALISED_L2 = 1e-4
# its trust-region Newton stops at this gradient norm (nats per pixel per unit of theta)
_GENERALISED_GTOL = 1e-9


# the guard keeps selective scaling only where a one-sided paired t-test over the folds
# rejects "no better than TS" at this level
_GUARD_LEVEL = 0.10


def _guard_t_statistic(improvement: np.ndarray) -> float:
    """The paired t statistic of the fold improvements (inf when they are all equal and > 0)."""
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


def _guard_keeps(improvement: np.ndarray) -> bool:
    """The guard's rule: selective scaling wins on average, in a strict majority of folds, and
    by a margin the folds support (one-sided paired t-test at ``_GUARD_LEVEL``).

    A mean gain carried by one or two lucky folds is not evidence: on the AAL demo selective
    scaling won 3 of 5 folds with a positive mean (t = 0.21) and then lost to TS on the test
    images (ECE 1.29x); the folds of the MNI152 demo seeds it keeps have t = 2.6-12.
    """
    from scipy.stats import t as student_t

    k = len(improvement)
    if k < 2 or not (improvement.mean() > 0 and (improvement > 0).sum() * 2 > k):
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


def _warn_generalised(fit, owner: str) -> None:
    """A ConvergenceWarning when the generalised temperature's Newton fit did not converge."""
    if fit.converged:
        return
    from sklearn.exceptions import ConvergenceWarning

    warnings.warn(
        f"{owner}: the generalised temperature fit did not converge in {fit.n_iter} "
        f"trust-region Newton iterations ({fit.message}); the temperatures are the last "
        "iterate.",
        ConvergenceWarning,
        stacklevel=5,
    )


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
        held-out part of the fit data; 1.0 is the paper's choice.
    t2 : float or "auto", default="auto"
        Temperature of pixels called mispredicted; 1e10 gives uniform rows.
        "auto" fits it by NLL on the held-out part of the fit data (in
        ``[0.01, 1e10]``). Fixed values reproduce the paper (1e10 for an
        accurate classifier, 2 for a moderate one); on real data they are
        often worse than temperature scaling, hence the fitted default.
    threshold : float in (0, 1) or "auto", default="auto"
        A pixel is called correct when the classifier's P(correct) is at
        least this (hard mode). "auto" chooses, on the held-out pixels, the
        threshold (among those flagging 0.5% to 50% of them, and 0.5) whose
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
        ``(w, b)`` fitted by NLL on the held-out pixels with a small ridge on
        ``w``, by trust-region Newton with the exact Hessian from temperature
        scaling (``w = 0``); it contains TS (``w = 0``) and, up to the
        softplus, soft selective scaling. ``t1``, ``t2`` and ``threshold``
        are unused in it (it always fits; the guard applies as to the others).
        Soft blending with both temperatures fitted is the default: it has
        no threshold to tune and was as good as or better than the hard split
        on this project's real cases (docs/quality.md). The paper's recipe is
        ``SelectiveScalingCalibrator(TorchMLPClassifier(class_weight="paper"),
        features="log_softmax", t1=1.0, t2=1e10, threshold=0.5, mode="hard")``.
    holdout_fraction : float in (0, 1), default=0.25
        Share of the fit data (of the images when ``groups`` is given to
        ``fit``) held out from the classifier to fit "auto" temperatures.
        Unused when no temperature is "auto" (always used in generalised
        mode).
    max_fit_pixels : int, default=500_000
        At most this many pixels train the classifier, and at most this many
        fit the temperatures; sampled with the seed, stratified by
        correctness so that rare mispredictions keep their share.
    guard : {"ts"} or None, default="ts"
        Never do worse than temperature scaling. With both temperatures
        "auto" (or in generalised mode), the held-out pixels are cut into 5 folds (by image when
        ``groups`` is given to ``fit``, else into contiguous blocks of rows,
        which in a pixel table are runs of whole images); on each fold the
        selective temperatures and a single TS temperature are fitted on the
        other folds and scored by NLL on it. Selective scaling is kept only
        when its mean fold improvement over TS is positive, it wins in a
        strict majority of the folds, and a one-sided paired t-test of the
        fold improvements rejects "no better than TS" at the 10% level (with
        5 folds: t >= 1.53); otherwise ``t1_ = t2_ =`` the TS
        temperature of every fit pixel (the detector stays fitted, but no
        longer changes any probability). Only the cheap temperature step is
        cross-fitted: the detector is trained once, on the pixels that are
        not held out, so its scores on every held-out fold are already out of
        sample and the guard costs a few passes over the held-out pixels, not
        five detector fits. In hard mode the threshold stays the one chosen
        on all held-out pixels. ``None`` switches the guard off. The evidence
        is in ``guard_scores_`` and :meth:`summary`.
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
    random_state : int, RandomState or None, default=None
        Seeds the pixel sampling, the hold-out split and the guard's folds
        (the default detector is deterministic).

    Attributes
    ----------
    classifier_ : estimator
        The fitted correctness classifier.
    t1_, t2_ : float
        The temperatures in use (fitted ones when "auto"). Generalised mode:
        a summary for display, the median fitted temperature of the held-out
        pixels with P(correct) >= 0.5 (``t1_``) and below (``t2_``).
    temperature_coef_, temperature_intercept_ : ndarray, float
        Generalised mode only: ``w`` and ``b`` (0 and TS's after a guard
        fallback).
    temperature_inputs_ : tuple of str
        Generalised mode only: the names of the inputs of ``beta``.
    temperature_mean_, temperature_scale_ : ndarray
        Generalised mode only: their standardisation (weighted, held-out
        pixels; a constant input gets scale 1 and weight 0).
    classes_ : ndarray of shape (n_classes,)
        ``arange(n_classes)``.
    n_features_in_ : int
        Number of classes (columns of ``X``).
    threshold_ : float
        The threshold in use (the chosen one when "auto").
    held_out_flagged_fraction_ : float or None
        Share of held-out pixels called mispredicted at ``threshold_``.
    fit_accuracy_ : float
        Share of correctly predicted pixels in the fit data.
    detection_auroc_ : float or None
        AUROC of P(correct) for the correct/mispredicted split on the
        held-out pixels (None without a hold-out or with one class).
    n_iter_ : int
        Newton iterations of the temperature fit (0 without "auto" ones;
        generalised mode: trust-region iterations).
    converged_ : bool
        Whether the temperature fit met its tolerance.
    guard_choice_ : {"selective", "ts"} or None
        What the guard kept; None when it did not run (``guard=None``, a
        fixed temperature, or too few held-out pixels for two folds).
    guard_scores_ : dict or None
        The guard's evidence: per fold, the held-out NLL of selective scaling
        (``"nll_selective"``) and of TS (``"nll_ts"``), their difference
        (``"improvement"``, positive where selective scaling is better), the
        fold sizes, the TS temperature of the fallback (``"ts_temperature"``)
        and the selective temperatures it replaced, if it did.

    See Also
    --------
    TemperatureScaling : One temperature for every pixel.
    TorchMLPClassifier : The paper's correctness classifier.
    default_detector : The default correctness classifier.

    Notes
    -----
    Fit data are split by image when ``groups`` is passed to ``fit``
    (recommended: neighbouring pixels are correlated, so a pixel-level hold-out
    is optimistic). ``score`` returns the negative mean NLL, so a grid search
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
    guard finds no held-out gain over temperature scaling and keeps TS:

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
        "holdout_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "max_fit_pixels": [Interval(numbers.Integral, 2, None, closed="left")],
        "guard": [StrOptions({"ts"}), None],
        "on_single_class": [StrOptions({"raise", "constant"})],
        "memory": [None, str, HasMethods(["cache"])],
        "random_state": ["random_state"],
    }

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
        holdout_fraction: float = 0.25,
        max_fit_pixels: int = 500_000,
        guard: str | None = "ts",
        context: str | None = None,
        on_single_class: str = "raise",
        ignore_index: int | None = 255,
        memory=None,
        chunk_size: int = 65536,
        random_state=None,
    ):
        self.classifier = classifier
        self.input_type = input_type
        self.features = features
        self.t1 = t1
        self.t2 = t2
        self.threshold = threshold
        self.mode = mode
        self.holdout_fraction = holdout_fraction
        self.max_fit_pixels = max_fit_pixels
        self.guard = guard
        self.context = context
        self.on_single_class = on_single_class
        self.ignore_index = ignore_index
        self.memory = memory
        self.chunk_size = chunk_size
        self.random_state = random_state

    # ---------------------------------------------------------------- features
    def _n_extra_columns(self) -> int:
        # context="spatial": X holds the C logit columns, then the spatial context columns of
        # flatten_segmentation(..., context="spatial"); only the detector reads them
        if self.context is None:
            return 0
        from .context import n_context_features

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
        proba = self.classifier_.predict_proba(features)
        # the classifier was trained on both targets 0 and 1 (one class only gives
        # _ConstantCorrectness, whose classes_ are [0, 1] too)
        return proba[:, np.flatnonzero(np.asarray(self.classifier_.classes_) == 1)[0]]

    def _inverse_temperature(
        self, p_correct: np.ndarray, t1: float, t2: float, threshold: float | None = None
    ) -> np.ndarray:
        if self.mode == "hard":
            threshold = self.threshold_ if threshold is None else threshold
            return np.where(p_correct >= threshold, 1.0 / t1, 1.0 / t2)
        return p_correct / t1 + (1.0 - p_correct) / t2

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

    def _generalised_beta(self, inputs, coef, intercept) -> np.ndarray:
        phi = (inputs - self.temperature_mean_) / self.temperature_scale_
        return softplus(phi @ coef + intercept)

    def _set_generalised(self, coef, intercept) -> None:
        self.temperature_coef_ = np.asarray(coef, dtype=np.float64)
        self.temperature_intercept_ = float(intercept)

    def temperatures(self, X) -> np.ndarray:
        """The temperature ``1 / beta`` each row of ``X`` gets (float64), in any mode.

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
            out[part] = 1.0 / np.asarray(self._beta(z, extra), dtype=np.float64)
        return out

    def _make_classifier(self, random_state: int):
        if self.classifier is not None:
            return clone(self.classifier)
        return default_detector()

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y, sample_weight=None, groups=None):
        """Fit the correctness classifier and the temperatures.

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
            Image id of each pixel. With "auto" temperatures, the hold-out is
            then a set of whole images.

        Returns
        -------
        self : object
            The fitted calibrator.
        """
        self._validate_params()
        X, y, sample_weight, groups = self._validate_fit_data(X, y, sample_weight, groups)
        self._fit_calibration(X, y, sample_weight, groups)
        return self

    def _fit_calibration(self, X, y, sample_weight, groups=None):
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        correct = np.argmax(self._split_chunk(X)[0], axis=1) == y
        self.fit_accuracy_ = float(correct.mean())
        needs_holdout = (
            "auto" in (self.t1, self.t2)
            or (self.mode == "hard" and self.threshold == "auto")
            or self.mode == "generalised"
        )
        warn_no_groups(groups, needs_holdout, owner=type(self).__name__)
        train_idx, holdout_idx = self._split_fit_rows(correct, groups, needs_holdout, rng)

        train_idx = train_idx[
            sample_pixels(
                len(train_idx), self.max_fit_pixels, strata=correct[train_idx], random_state=rng
            )
        ]
        self.classifier_ = self._fit_correctness(X, correct, sample_weight, train_idx, seed)

        self.threshold_ = 0.5 if self.threshold == "auto" else float(self.threshold)
        self.held_out_flagged_fraction_ = None
        self.t1_ = 1.0 if self.t1 == "auto" else float(self.t1)
        self.t2_ = UNIFORM_TEMPERATURE if self.t2 == "auto" else float(self.t2)
        self.detection_auroc_ = None
        self.n_iter_, self.converged_ = 0, True
        self.guard_choice_, self.guard_scores_ = None, None
        if self.mode == "generalised":
            # until fitted: temperature scaling at T = 1 (a single-row hold-out keeps it)
            names = GENERALISED_INPUTS + self._context_names()
            self.temperature_inputs_ = names
            self.temperature_mean_ = np.zeros(len(names))
            self.temperature_scale_ = np.ones(len(names))
            self._set_generalised(np.zeros(len(names)), softplus_inverse(1.0))
        if needs_holdout:
            holdout_idx = holdout_idx[
                sample_pixels(
                    len(holdout_idx),
                    self.max_fit_pixels,
                    strata=correct[holdout_idx],
                    random_state=rng,
                )
            ]
            fitted = self._fit_temperatures(X, y, correct, sample_weight, holdout_idx)
            if self.guard == "ts" and (
                self.mode == "generalised" or (self.t1 == "auto" and self.t2 == "auto")
            ):
                hold_groups = None if groups is None else groups[holdout_idx]
                self._apply_guard(*fitted, hold_groups, rng)
                if self.guard_choice_ == "ts":
                    self._refit_fallback_on_all_rows(X, y, correct, sample_weight, rng)
        return self

    def _refit_fallback_on_all_rows(self, X, y, correct, sample_weight, rng):
        """The fallback is plain TS: one parameter, so fit it on every fit row.

        The guard compares the two on the held-out rows only (the detector must
        not have seen them); once TS is chosen, the detector plays no part, and
        the held-out rows alone would give a noisier temperature than the
        ``TemperatureScaling`` a user would fit on the same data.
        """
        rows = sample_pixels(len(y), self.max_fit_pixels, strata=correct, random_state=rng)
        Z = self._to_logits(self._split_chunk(X[rows])[0]).astype(self._work_dtype(X),
                                                                   copy=False)
        w = None if sample_weight is None else sample_weight[rows]
        bounds = (1.0 / _AUTO_BOUNDS[1], 1.0 / _AUTO_BOUNDS[0])
        fit = fit_inverse_temperatures(Z, y[rows], sample_weight=w, bounds=bounds,
                                       chunk_size=self.chunk_size)
        warn_fit(fit, ("t1", "t2"), _AUTO_BOUNDS, owner=type(self).__name__, stacklevel=5)
        self.guard_scores_["ts_temperature_all_rows"] = float(1.0 / fit.x[0])
        self._fall_back_to_ts(1.0 / fit.x[0])

    def _split_fit_rows(self, correct, groups, needs_holdout, rng):
        n = correct.shape[0]
        if not needs_holdout:
            return np.arange(n), np.arange(0)
        if groups is not None:
            images = np.unique(groups)
            if images.shape[0] >= 2:
                n_hold = min(
                    max(int(round(self.holdout_fraction * len(images))), 1), len(images) - 1
                )
                held = rng.permutation(images)[:n_hold]
                is_held = np.isin(groups, held)
                return np.flatnonzero(~is_held), np.flatnonzero(is_held)
            warnings.warn(
                "groups holds a single image: the hold-out for 'auto' temperatures falls "
                "back to a random split of its pixels.",
                UserWarning,
                stacklevel=4,
            )
        if n < 2:
            raise ValueError(
                f"Got {n} sample (pixel): at least 2 are needed to hold some out for "
                "'auto' temperatures."
            )
        n_hold = min(max(int(round(self.holdout_fraction * n)), 1), n - 1)
        is_held = np.zeros(n, bool)
        is_held[rng.permutation(n)[:n_hold]] = True
        return np.flatnonzero(~is_held), np.flatnonzero(is_held)

    def _fit_correctness(self, X, correct, sample_weight, train_idx, seed):
        target = correct[train_idx].astype(np.int64)
        n_correct = int(target.sum())
        if n_correct in (0, len(target)):
            what = "correct" if n_correct else "mispredicted"
            if self.on_single_class == "raise":
                raise ValueError(
                    f"Every one of the {len(target)} pixels used to train the correctness "
                    f"classifier is {what}: one class only, nothing to tell apart. Calibrate on "
                    "more images (with both right and wrong predictions), or pass "
                    "on_single_class='constant' to give every pixel "
                    f"{'t1' if n_correct else 't2'}."
                )
            return _ConstantCorrectness(1.0 if n_correct else 0.0)
        features = self._features(X[train_idx])
        weight = None if sample_weight is None else sample_weight[train_idx]
        cached_fit = check_memory(self.memory).cache(_fit_classifier)
        return cached_fit(self._make_classifier(seed), features, target, weight)

    def _fit_temperatures(self, X, y, correct, sample_weight, holdout_idx):
        Z = self._to_logits(self._split_chunk(X[holdout_idx])[0]).astype(
            self._work_dtype(X), copy=False)
        y_hold = y[holdout_idx]
        w = None if sample_weight is None else sample_weight[holdout_idx]
        p, inputs = self._holdout_scores(X, holdout_idx)
        hold_correct = correct[holdout_idx]
        if 0 < hold_correct.sum() < len(hold_correct):
            self.detection_auroc_ = float(roc_auc_score(hold_correct, p))
        if inputs is not None:
            inputs = self._standardise_inputs(inputs, w)
        solved = self._solve_temperatures(Z, y_hold, w, p, inputs=inputs)
        self._take_solution(solved, p, inputs)
        self.n_iter_ = sum(fit.n_iter for _, fit in solved["fits"])
        self.converged_ = all(fit.converged for _, fit in solved["fits"])
        for names, fit in solved["fits"]:
            if self.mode == "generalised":
                _warn_generalised(fit, type(self).__name__)
            else:
                warn_fit(fit, names, _AUTO_BOUNDS, owner=type(self).__name__, stacklevel=5)
        if self.mode == "hard":
            n_flagged = int((p < self.threshold_).sum())
            if n_flagged in (0, len(p)) and "auto" in (self.t1, self.t2):
                warnings.warn(
                    f"No held-out pixel falls in the {'t2' if n_flagged == 0 else 't1'} "
                    f"group (threshold {self.threshold_:.4g}); its temperature takes the other "
                    f"group's value (t1={self.t1_:.4g}, t2={self.t2_:.4g}). With a very "
                    "accurate model use threshold='auto', weight the mispredicted class in "
                    "the classifier, or use mode='soft'.",
                    UserWarning,
                    stacklevel=4,
                )
            self.held_out_flagged_fraction_ = n_flagged / max(len(p), 1)
        return Z, y_hold, w, p, inputs

    def _context_names(self) -> tuple:
        if self.context is None:
            return ()
        from .context import CONTEXT_FEATURES

        return tuple(CONTEXT_FEATURES)

    def _standardise_inputs(self, inputs, w):
        """(standardised inputs, constant mask); the standardisation becomes fitted state."""
        weights = np.ones(len(inputs)) if w is None else w
        mean, scale, constant = standardisation(
            lambda part: inputs[part], len(inputs), inputs.shape[1], weights, self.chunk_size
        )
        self.temperature_mean_, self.temperature_scale_ = mean, scale
        return (inputs - mean) / scale, constant

    def _take_solution(self, solved, p, inputs) -> None:
        """Make a solution of :meth:`_solve_temperatures` the fitted state."""
        self.threshold_ = solved["threshold"]
        if self.mode != "generalised":
            self.t1_, self.t2_ = solved["t1"], solved["t2"]
            return
        theta = solved["theta"]
        self._set_generalised(theta[:-1], theta[-1])
        # t1_/t2_ summarise the fitted beta(x) for display: the median temperature of the
        # held-out pixels the detector calls correct (P >= 0.5), and of the others
        t = 1.0 / softplus(inputs[0] @ theta[:-1] + theta[-1])
        called = np.asarray(p) >= 0.5
        overall = float(np.median(t))
        self.t1_ = float(np.median(t[called])) if called.any() else overall
        self.t2_ = float(np.median(t[~called])) if (~called).any() else overall

    def _holdout_scores(self, X, holdout_idx):
        """P(correct) of the held-out rows; in generalised mode also beta's raw inputs."""
        if not len(holdout_idx):
            return np.zeros(0, np.float32), None
        ps, inputs = [], []
        for part in iter_chunks(len(holdout_idx), self.chunk_size):
            cols, extra = self._split_chunk(X[holdout_idx[part]])
            z = self._to_logits(cols).astype(self._work_dtype(X), copy=False)
            features = self._detector_input(z, extra)
            ps.append(self._p_correct(features))
            if self.mode == "generalised":
                inputs.append(self._temperature_inputs(z, features, extra, ps[-1]))
        return np.concatenate(ps), (np.concatenate(inputs) if inputs else None)

    def _solve_temperatures(self, Z, y, w, p, rows=None, start=None, inputs=None):
        """The "auto" temperatures (and threshold) minimising the NLL on (some) rows.

        Soft mode: ``beta = a p + b (1 - p)`` with ``a = 1/t1``, ``b = 1/t2`` is
        linear in ``(a, b)``, so the mean NLL is jointly convex and one bounded
        Newton solve gives both (:func:`~sksegcal._base.fit_inverse_temperatures`).
        Hard mode: the two groups do not interact, one 1-D convex solve each.
        Generalised mode: ``beta = softplus(w . phi + b)`` over the standardised
        ``inputs`` (``(phi, constant mask)``), from temperature scaling.
        Returns a dict with t1, t2, threshold (or theta, generalised), the NLL
        (weighted mean over the rows) and the fits with the names of their
        parameters.
        """
        if self.mode == "generalised":
            return self._solve_generalised(Z, y, w, inputs, rows, start)
        bounds = (1.0 / _AUTO_BOUNDS[1], 1.0 / _AUTO_BOUNDS[0])  # inverse temperatures
        t1 = 1.0 if self.t1 == "auto" else float(self.t1)
        t2 = UNIFORM_TEMPERATURE if self.t2 == "auto" else float(self.t2)
        p = np.asarray(p, dtype=np.float64)
        common = {"sample_weight": w, "rows": rows, "chunk_size": self.chunk_size}
        if self.mode == "soft":
            if self.t1 == "auto" and self.t2 == "auto":
                basis, offset, names = np.column_stack([p, 1.0 - p]), None, ["t1", "t2"]
            elif self.t2 == "auto":
                basis, offset, names = (1.0 - p)[:, None], p / t1, ["t2"]
            elif self.t1 == "auto":
                basis, offset, names = p[:, None], (1.0 - p) / t2, ["t1"]
            else:
                beta = p / t1 + (1.0 - p) / t2
                nll = nll_derivatives(Z, y, np.ones(1), basis=beta[:, None], **common)[0]
                return {"t1": t1, "t2": t2, "threshold": self._fixed_threshold(), "nll": nll,
                        "fits": []}
            x0 = None
            if start is not None:
                x0 = [1.0 / start[name] for name in names]
            fit = fit_inverse_temperatures(
                Z, y, basis=basis, offset=offset, bounds=bounds, x0=x0, **common
            )
            inverse = dict(zip(names, fit.x.tolist()))
            t1 = 1.0 / inverse["t1"] if "t1" in inverse else t1
            t2 = 1.0 / inverse["t2"] if "t2" in inverse else t2
            return {"t1": t1, "t2": t2, "threshold": self._fixed_threshold(), "nll": fit.nll,
                    "fits": [(names, fit)]}

        in_rows = np.ones(len(p), bool) if rows is None else rows
        weights = np.ones(len(p)) if w is None else w
        total_weight = float(weights[in_rows].sum())

        def group(mask, auto, fixed_t, name):
            """(temperature, weighted NLL sum, fit or None) of one group."""
            mass = float(weights[mask].sum())
            if not mask.any() or mass <= 0:
                return None, 0.0, None
            if not auto:
                nll = nll_derivatives(Z, y, np.array([1.0 / fixed_t]), sample_weight=w,
                                      rows=mask, chunk_size=self.chunk_size)[0]
                return fixed_t, nll * mass, None
            x0 = None if start is None else [1.0 / start[name]]
            fit = fit_inverse_temperatures(
                Z, y, sample_weight=w, rows=mask, bounds=bounds, x0=x0,
                chunk_size=self.chunk_size,
            )
            return 1.0 / fit.x[0], fit.nll * mass, fit

        def fit_split(threshold):
            called = p >= threshold
            ta, nll_a, fit_a = group(in_rows & called, self.t1 == "auto", t1, "t1")
            tb, nll_b, fit_b = group(in_rows & ~called, self.t2 == "auto", t2, "t2")
            # a group no pixel reaches takes the other group's (fitted) temperature
            ta = (tb if self.t1 == "auto" else t1) if ta is None else ta
            tb = (ta if self.t2 == "auto" else t2) if tb is None else tb
            fits = [(["t1"], fit_a)] * (fit_a is not None) + [(["t2"], fit_b)] * (
                fit_b is not None
            )
            return (nll_a + nll_b) / total_weight, ta, tb, fits

        if start is not None:
            candidates = [start["threshold"]]
        elif self.threshold == "auto":
            candidates = _candidate_thresholds(p[in_rows])
        else:
            candidates = [float(self.threshold)]
        best = min(((*fit_split(thr), thr) for thr in candidates), key=lambda f: f[0])
        nll, t1, t2, fits, threshold = best
        return {"t1": float(t1), "t2": float(t2), "threshold": float(threshold), "nll": nll,
                "fits": fits}

    def _solve_generalised(self, Z, y, w, inputs, rows=None, start=None):
        """Fit ``theta = (w, b)`` of ``beta = softplus(phi . w + b)`` on (some) rows.

        The start is temperature scaling on the same rows (``w = 0``), or
        ``start["theta"]`` (the guard's folds start from the full fit). Rows
        outside ``rows`` get weight 0.
        """
        phi, constant = inputs
        weights = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
        if rows is not None:
            weights = np.where(rows, weights, 0.0)
        if start is not None:
            theta0 = np.asarray(start["theta"], dtype=np.float64)
        else:
            bounds = (1.0 / _AUTO_BOUNDS[1], 1.0 / _AUTO_BOUNDS[0])
            ts = fit_inverse_temperatures(Z, y, sample_weight=w, rows=rows, bounds=bounds,
                                          chunk_size=self.chunk_size)
            theta0 = np.zeros(phi.shape[1] + 1)
            theta0[-1] = softplus_inverse(float(ts.x[0]))

        def objective(theta, hessian):
            return softplus_nll(theta, Z, y, phi, sample_weight=weights, l2=_GENERALISED_L2,
                                hessian=hessian, chunk_size=self.chunk_size)

        with np.errstate(over="ignore", invalid="ignore"):
            f0, g0, H0 = objective(theta0, True)
        # (a Hessian near the float64 maximum overflows the trust region's norms: refuse it)
        if not (np.isfinite(f0) and np.isfinite(g0).all()
                and np.all(np.abs(H0) < 1e100)):
            # logits near the top of float64 (row spans ~1e307): the NLL's curvature overflows
            # at every beta(x) but TS's, whose fit rescales the logits; stay there
            if start is None:
                warnings.warn(
                    f"{type(self).__name__}: the logits are too large for the generalised "
                    "temperature (its NLL overflows float64); it stays at temperature "
                    "scaling. Divide the logits by a constant to fit it.",
                    UserWarning,
                    stacklevel=6,
                )
            fit = SoftplusTemperatureFit(theta0, float("nan"), 0, True, "overflow: TS kept")
        else:
            fit = fit_softplus_temperature(objective, theta0, constant=constant,
                                           method="newton", tol=_GENERALISED_GTOL)
        return {"theta": fit.theta, "threshold": self._fixed_threshold(), "nll": fit.loss,
                "fits": [(list(self.temperature_inputs_), fit)]}

    # -------------------------------------------------------------------- guard
    def _solved_beta(self, solved, p, inputs):
        """Per-row inverse temperatures of a solution of :meth:`_solve_temperatures`."""
        if self.mode == "generalised":
            theta = solved["theta"]
            return softplus(inputs[0] @ theta[:-1] + theta[-1])
        return self._inverse_temperature(
            np.asarray(p, np.float64), solved["t1"], solved["t2"], solved["threshold"]
        )

    def _start(self) -> dict:
        if self.mode == "generalised":
            return {"theta": np.r_[self.temperature_coef_, self.temperature_intercept_],
                    "threshold": self.threshold_}
        return {"t1": self.t1_, "t2": self.t2_, "threshold": self.threshold_}

    def _fall_back_to_ts(self, temperature: float) -> None:
        """Every pixel gets the temperature-scaling temperature (the guard's fallback)."""
        self.t1_ = self.t2_ = float(temperature)
        if self.mode == "generalised":
            self._set_generalised(np.zeros_like(self.temperature_coef_),
                                  softplus_inverse(1.0 / float(temperature)))

    def _guard_folds(self, n, groups, rng):
        """Fold id of each held-out row: by image when groups are known, else row blocks."""
        if groups is not None:
            images = np.unique(groups)
            if len(images) >= 2:
                k = min(_GUARD_FOLDS, len(images))
                order = rng.permutation(len(images))
                image_fold = np.empty(len(images), np.int64)
                image_fold[order] = np.arange(len(images)) % k
                return image_fold[np.searchsorted(images, groups)], k
        k = min(_GUARD_FOLDS, n)
        return (np.arange(n) * k) // max(n, 1), k

    def _apply_guard(self, Z, y, w, p, inputs, groups, rng):
        """Cross-fit the temperatures against TS on the held-out folds; fall back to TS."""
        folds, k = self._guard_folds(len(y), groups, rng)
        if k < 2:
            return
        bounds = (1.0 / _AUTO_BOUNDS[1], 1.0 / _AUTO_BOUNDS[0])
        full = self._start()
        ts_all = fit_inverse_temperatures(
            Z, y, sample_weight=w, bounds=bounds, chunk_size=self.chunk_size
        )
        weights = np.ones(len(y)) if w is None else w
        nll_sel, nll_ts, sizes = [], [], []
        for fold in range(k):
            test = folds == fold
            train = ~test
            if not (weights[test].sum() > 0 and weights[train].sum() > 0):
                continue
            solved = self._solve_temperatures(Z, y, w, p, rows=train, start=full,
                                              inputs=inputs)
            beta = self._solved_beta(solved, p, inputs)
            nll_sel.append(nll_derivatives(
                Z, y, np.ones(1), basis=beta[:, None], sample_weight=w, rows=test,
                chunk_size=self.chunk_size,
            )[0])
            ts = fit_inverse_temperatures(
                Z, y, sample_weight=w, rows=train, bounds=bounds, x0=ts_all.x,
                chunk_size=self.chunk_size,
            )
            nll_ts.append(nll_derivatives(
                Z, y, ts.x, sample_weight=w, rows=test, chunk_size=self.chunk_size
            )[0])
            sizes.append(int(test.sum()))
        if len(nll_sel) < 2:
            return
        nll_sel, nll_ts = np.array(nll_sel), np.array(nll_ts)
        improvement = nll_ts - nll_sel
        wins = int((improvement > 0).sum())
        keep = _guard_keeps(improvement)
        t_ts = float(1.0 / ts_all.x[0])
        self.guard_scores_ = {
            "nll_selective": nll_sel,
            "nll_ts": nll_ts,
            "improvement": improvement,
            "mean_improvement": float(improvement.mean()),
            "wins": wins,
            "n_folds": len(improvement),
            "fold_sizes": np.array(sizes),
            "by": "image" if groups is not None and len(np.unique(groups)) >= 2 else "rows",
            "ts_temperature": t_ts,
            "t_statistic": _guard_t_statistic(improvement),
            "rule": "keep selective scaling if the mean fold improvement > 0, it wins in a "
                    "strict majority of folds and a one-sided paired t-test rejects 'no "
                    f"better than TS' at the {_GUARD_LEVEL:.0%} level",
        }
        if keep:
            self.guard_choice_ = "selective"
            return
        self.guard_choice_ = "ts"
        self.guard_scores_["replaced"] = {"t1": self.t1_, "t2": self.t2_}
        if self.mode == "generalised":
            self.guard_scores_["replaced"]["theta"] = full["theta"]
        self._fall_back_to_ts(t_ts)

    def summary(self) -> str:
        """A few lines on what was fitted and what the guard chose, with its evidence."""
        check_is_fitted(self)
        if self.mode == "generalised":
            terms = ", ".join(f"{c:+.3g} {name}" for name, c in
                              zip(self.temperature_inputs_, self.temperature_coef_))
            head = (f"{type(self).__name__}: mode=generalised, beta = softplus("
                    f"{self.temperature_intercept_:.4g} {terms}) on standardised inputs "
                    f"(median T {self.t1_:.4g} where P(correct) >= 0.5, {self.t2_:.4g} below)")
        else:
            head = (f"{type(self).__name__}: mode={self.mode}, t1={self.t1_:.4g}, "
                    f"t2={self.t2_:.4g}"
                    + (f", threshold={self.threshold_:.4g}" if self.mode == "hard" else ""))
        lines = [
            head,
            f"  fit accuracy {self.fit_accuracy_:.4f}; detector AUROC on held-out pixels "
            + ("n/a" if self.detection_auroc_ is None else f"{self.detection_auroc_:.4f}"),
        ]
        if self.guard_choice_ is None:
            lines.append("  guard: did not run"
                         + (" (guard=None)" if self.guard is None else ""))
        else:
            g = self.guard_scores_
            kept = "selective" if self.guard_choice_ == "selective" else "temperature"
            lines.append(
                f"  guard: kept {kept} scaling"
                f" ({g['n_folds']} folds by {g['by']}: selective better in {g['wins']}, mean "
                f"held-out NLL improvement {g['mean_improvement']:+.5f} nats/pixel over TS "
                f"T={g['ts_temperature']:.4g}"
                # calibrators saved before the t-test have no t statistic
                + (f", paired t = {g['t_statistic']:.2f})" if "t_statistic" in g else ")")
            )
            if self.guard_choice_ == "ts":
                r = g["replaced"]
                lines.append(f"  replaced t1={r['t1']:.4g}, t2={r['t2']:.4g} by TS's T")
        return "\n".join(lines)

    def _fixed_threshold(self) -> float:
        return 0.5 if self.threshold == "auto" else float(self.threshold)

    # --------------------------------------------------------------- prediction
    def _row_inverse_temperatures(self, z, extra=None):
        # features come from the unscaled chunk, which is already logits here. With spatial
        # context the detector needs the context columns, which a bare logit chunk (the
        # store's evaluation shortcut) does not carry: no shortcut then
        if self.context is not None and extra is None:
            return None
        return self._beta(z, extra).astype(z.dtype, copy=False)

    def _beta(self, z, extra):
        """Per-row inverse temperatures of a chunk of logits (and its context columns)."""
        features = self._detector_input(z, extra)
        p = self._p_correct(features)
        if self.mode == "generalised":
            inputs = self._temperature_inputs(z, features, extra, p)
            return self._generalised_beta(
                inputs, self.temperature_coef_, self.temperature_intercept_
            )
        return self._inverse_temperature(p, self.t1_, self.t2_)

    def _scale_chunk(self, z, extra=None):
        return scale_logits(z, self._row_inverse_temperatures(z, extra))

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
