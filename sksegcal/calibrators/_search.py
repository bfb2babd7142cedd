"""Model selection among the calibrators by cross-validated per-image NLL.

:class:`CalibratorSearchCV` fits every candidate calibrator on the calibration
images of K-1 folds, scores it on the held-out fold image by image, and keeps a
candidate over temperature scaling only when its per-image gain is supported by
a paired test over every calibration image. The winner is refitted on all
images. Temperature scaling is always a candidate and the fallback, so the
search never picks something that was worse than TS on the folds.
"""

from __future__ import annotations

import numbers
import time
import warnings

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_array, check_is_fitted

from .._validation import check_finite, check_labels, check_random_state_int, requests_groups
from ..context import check_context_block

__all__ = ["CalibratorSearchCV"]

# the floor of a held-out log-probability: exp(-745) is the smallest positive double, so a
# probability that rounds to 0 counts as 745 nats (large, finite) instead of infinity
_LOG_FLOOR = -745.0


# --------------------------------------------------------------------------------------
# Context declaration of a candidate: THE ONE PLACE in this module that asks which context
# columns a calibrator reads. Every sksegcal calibrator answers through its ``reads_context``
# property; an estimator without it (a foreign one) reads none. A pipeline or a search that
# wraps a context reader needs the shared reader sksegcal.context.estimator_context, which
# replaces this function where it exists.
# --------------------------------------------------------------------------------------
def _candidate_context(estimator) -> str | None:
    """None, or the context kind (``"spatial"``) the candidate reads after its logits."""
    try:
        from ..context import estimator_context
    except ImportError:
        return getattr(estimator, "reads_context", None)
    return estimator_context(estimator)


def _default_candidates(context: str | None, seed: int) -> list[tuple[str, object]]:
    """The family searched by default (temperature scaling first: it wins ties)."""
    from ._local import LocalTemperatureScaling
    from ._scaling import TemperatureScaling
    from ._selective import SelectiveScalingCalibrator

    # the search is the guard: the candidates' own guards would only repeat it on fewer images
    out = [
        ("TS", TemperatureScaling()),
        ("selective", SelectiveScalingCalibrator(guard=None, random_state=seed)),
        (
            "selective-generalised",
            SelectiveScalingCalibrator(mode="generalised", guard=None, random_state=seed),
        ),
        ("LTS", LocalTemperatureScaling(context=None)),
    ]
    if context == "spatial":
        out.append(("LTS-spatial", LocalTemperatureScaling(context="spatial")))
    return out


def _keeps_prediction(estimator) -> bool:
    """Whether the candidate's predicted class is, by construction, the model's argmax.

    The temperature calibrators divide each row's logits by a positive temperature;
    anything else (an affine map, a pipeline, a foreign estimator) may move the argmax.
    """
    import sksegcal

    keepers = tuple(
        getattr(sksegcal, name)
        for name in (
            "TemperatureScaling",
            "EnsembleTemperatureScaling",
            "MetaCalScaling",
            "SelectiveScalingCalibrator",
            "LocalTemperatureScaling",
        )
    )
    return isinstance(estimator, keepers)


def image_folds(groups: np.ndarray, n_splits: int, random_state) -> np.ndarray:
    """Fold index (0..n_splits-1) of every distinct image id, images shuffled by the seed.

    The ids of ``np.unique(groups)`` are shuffled and dealt round robin, so folds
    differ by at most one image (not by pixel count: every image weighs the same
    in the per-image criterion).
    """
    n_images = len(np.unique(groups))
    order = check_random_state_int(random_state).permutation(n_images)
    fold = np.empty(n_images, dtype=np.int64)
    fold[order] = np.arange(n_images) % n_splits
    return fold


def _paired_support(improvement: np.ndarray) -> tuple[float, float]:
    """(t statistic, one-sided p value) of mean(improvement) > 0, paired over images.

    A zero spread gives t = +-inf (p 0 or 1) for a non-zero mean and t = 0 (p = 1) for
    a zero mean; fewer than two images give no evidence (p = 1).
    """
    n = len(improvement)
    if n < 2:
        return 0.0, 1.0
    mean = float(improvement.mean())
    # scale-free, as the mean of huge NLLs could overflow the variance
    scale = float(np.max(np.abs(improvement)))
    if scale == 0.0:
        return 0.0, 1.0
    sd = float((improvement / scale).std(ddof=1)) * scale
    if sd == 0.0:
        return (np.inf, 0.0) if mean > 0 else (-np.inf, 1.0)
    t = mean / (sd / np.sqrt(n))
    return float(t), float(stats.t.sf(t, n - 1))


def _support(ts: np.ndarray, own: np.ndarray, alpha: float) -> tuple[float, float, float, bool]:
    """(mean gain over TS, t, p, supported) of a candidate's per-image NLLs ``own``.

    Supported: a positive mean gain and a one-sided paired t-test p below ``alpha``.
    """
    gain = ts - own
    t, p = _paired_support(gain)
    return float(gain.mean()), t, p, bool(gain.mean() > 0 and p < alpha)


class CalibratorSearchCV(ClassifierMixin, BaseEstimator):
    """The calibrator family's best, chosen by cross-validated per-image NLL.

    Every candidate is fitted on the calibration images of K-1 folds (folds by
    image, from ``groups``) and scored on the held-out images: its mean NLL on
    each image. Every calibration image is held out once, so each candidate
    gets one NLL per image, and its improvement over temperature scaling (TS)
    is the per-image difference ``NLL_TS - NLL_candidate``.

    **Selection rule.** A candidate has *support* when its mean per-image
    improvement over TS is positive and a one-sided paired t-test over the
    images rejects "no improvement" at level ``alpha``. Among the supported
    candidates (and, with ``shift_check``, those that pass it) the one with the
    lowest mean per-image NLL wins (ties: the earlier candidate); without any,
    TS wins. The winner is refitted on every calibration pixel. The chosen
    calibrator's mean held-out NLL is therefore never above TS's on the folds.

    The default candidates are TS, ``SelectiveScalingCalibrator()`` (soft
    selective scaling), ``SelectiveScalingCalibrator(mode="generalised")``
    (both with ``guard=None``: the search is their guard) and
    ``LocalTemperatureScaling`` without context, plus, with
    ``context="spatial"``, ``LocalTemperatureScaling`` on the spatial context
    columns. All of them keep the model's predicted class. Calibrators that
    may change it (vector or Dirichlet scaling, a pipeline) are accepted as
    candidates only with ``allow_label_change=True``; the accuracy and mIoU
    change on the held-out folds is then reported in ``cv_results_`` and
    :meth:`summary`.

    Parameters
    ----------
    candidates : list of (name, estimator) or dict, default=None
        Calibrators to choose among; None: the default family above. TS
        (named ``"TS"``, a name no other candidate may take) is added when
        absent. Each is cloned; a candidate with a ``groups`` argument in its
        ``fit`` gets the image ids of its training folds.
    cv : int, default=3
        Number of folds by image (fewer when there are fewer images; at least
        2 images are needed). Every candidate is fitted ``cv`` times; the paired
        test is over images, not folds, so more folds buy training data per
        fit (closer to the refit), not more evidence, at the price of more fits.
    alpha : float in (0, 1), default=0.05
        Level of the one-sided paired t-test that gives a candidate support
        over TS.
    context : {"spatial"} or None, default=None
        What ``X`` carries after its C logit columns: None, nothing; "spatial",
        the context columns of ``flatten_segmentation(..., context="spatial")``.
        The candidates that read context then join (and get them); the others
        get the logit columns only.
    allow_label_change : bool, default=False
        Accept candidates whose predicted class may differ from the model's.
    shift_check : float >= 0 or None, default=None
        With ``X_perturbed`` given to :meth:`fit`: a candidate can win only if
        its mean per-image NLL on the held-out images' perturbed copies is at
        most ``(1 + shift_check)`` times TS's (0.0: not worse than TS under the
        perturbation). None: the perturbed copies are scored and reported, not
        used.
    max_cv_pixels : int or None, default=100_000
        Rows of the cross-validation (a seeded uniform subsample of the
        calibration pixels; every image keeps its share): what bounds the
        search's cost on large calibration sets. The refit uses every row.
        None: every row.
    error_score : "raise" or float, default=nan
        A candidate whose fit fails on a fold: "raise" re-raises; a number
        leaves it out of the choice (with a warning) and records the error.
        TS failing always raises.
    ignore_index : int or None, default=255
        Label of unlabelled pixels, left out everywhere.
    chunk_size : int, default=65536
        Rows scored at a time.
    random_state : int, Generator or None, default=None
        Seed of the folds, the subsample and the default candidates' own
        randomness.

    Attributes
    ----------
    best_estimator_ : estimator
        The winner, refitted on every calibration pixel.
    best_name_ : str
        Its name.
    best_index_ : int
        Its position in ``cv_results_``.
    cv_results_ : dict of lists
        One entry per candidate: ``name``, ``mean_image_nll`` and
        ``std_image_nll`` (over the held-out images), ``mean_improvement``
        (over TS, nats per image), ``t_statistic``, ``p_value``, ``supported``,
        ``split{k}_nll`` (mean per-image NLL of fold k's images),
        ``mean_fit_time`` (seconds per fold), ``error`` (the message of a
        failed fit or None); with ``X_perturbed``: ``mean_image_nll_perturbed``,
        ``perturbed_ratio_to_ts`` and ``passes_shift_check``; with candidates
        that may change the class: ``changed_share``, ``accuracy_change`` and
        ``miou_change`` (held-out pixels, against the model's argmax).
    image_nll_ : ndarray of shape (n_candidates, n_images)
        Held-out NLL of every candidate on every image (mean over its rows).
    image_ids_ : ndarray of shape (n_images,)
        The image ids of its columns (``np.unique(groups)``).
    image_fold_ : ndarray of shape (n_images,)
        Fold in which each image was held out.
    choice_without_shift_check_ : str
        The winner the rule picks with ``shift_check`` ignored.
    n_splits_ : int
        Folds used.
    refit_time_ : float
        Seconds of the winner's refit.
    classes_ : ndarray of shape (n_classes,)
        ``arange(n_classes)``.
    n_features_in_ : int
        Columns of ``X`` at fit (logits plus context).

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal import CalibratorSearchCV
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 3000)
    >>> X = (4.0 * np.eye(3)[y] + 3.0 * rng.normal(size=(3000, 3))).astype(np.float32)
    >>> groups = np.repeat(np.arange(10), 300)
    >>> search = CalibratorSearchCV(random_state=0).fit(X, y, groups=groups)
    >>> search.best_name_ in search.cv_results_["name"]
    True
    """

    # the image ids reach fit through scikit-learn's metadata routing (Pipeline, fit_store)
    __metadata_request__fit = {"groups": True, "X_perturbed": True}

    _parameter_constraints: dict = {
        "candidates": [list, dict, None],
        "cv": [Interval(numbers.Integral, 2, None, closed="left")],
        "alpha": [Interval(numbers.Real, 0, 1, closed="neither")],
        "context": [StrOptions({"spatial"}), None],
        "allow_label_change": ["boolean"],
        "shift_check": [Interval(numbers.Real, 0, None, closed="left"), None],
        "max_cv_pixels": [Interval(numbers.Integral, 2, None, closed="left"), None],
        "error_score": [StrOptions({"raise"}), numbers.Real],
        "ignore_index": [numbers.Integral, None],
        "chunk_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        candidates=None,
        *,
        cv: int = 3,
        alpha: float = 0.05,
        context: str | None = None,
        allow_label_change: bool = False,
        shift_check: float | None = None,
        max_cv_pixels: int | None = 100_000,
        error_score=np.nan,
        ignore_index: int | None = 255,
        chunk_size: int = 65536,
        random_state=None,
    ):
        self.candidates = candidates
        self.cv = cv
        self.alpha = alpha
        self.context = context
        self.allow_label_change = allow_label_change
        self.shift_check = shift_check
        self.max_cv_pixels = max_cv_pixels
        self.error_score = error_score
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.random_state = random_state

    # ------------------------------------------------------------------ the C1 property
    @property
    def reads_context(self) -> str | None:
        """The context kind the search needs after the logit columns of ``X``.

        Before fit: ``context`` (what ``fit`` takes). After fit: the winner's
        (forwarded): when it reads no context, ``predict_proba`` and the other
        methods also accept the C logit columns alone.
        """
        if hasattr(self, "best_estimator_"):
            return self._best_context_
        return self.context

    # ---------------------------------------------------------------------- helpers
    def _n_context(self) -> int:
        if self.context is None:
            return 0
        from ..context import n_context_features

        return n_context_features()

    def _resolved_candidates(self, seed: int) -> list[tuple[str, object]]:
        from ._scaling import TemperatureScaling

        if self.candidates is None:
            pairs = _default_candidates(self.context, seed)
        else:
            items = (
                list(self.candidates.items())
                if isinstance(self.candidates, dict)
                else list(self.candidates)
            )
            pairs = []
            for item in items:
                if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                    raise TypeError(
                        "candidates must be a dict or a list of (name, estimator) pairs, got "
                        f"{item!r} in the list."
                    )
                if not (hasattr(item[1], "fit") and hasattr(item[1], "predict_proba")):
                    raise TypeError(
                        f"candidate {item[0]!r} ({type(item[1]).__name__}) has no fit / "
                        "predict_proba."
                    )
                if item[0] == "TS":
                    raise ValueError(
                        "the candidate name 'TS' is reserved for the temperature scaling the "
                        "search always compares with; name your candidate otherwise."
                    )
                pairs.append(item)
            names = [n for n, _ in pairs]
            if len(set(names)) != len(names):
                raise ValueError(f"candidate names must be unique, got {names}.")
            pairs.insert(0, ("TS", TemperatureScaling()))
        for name, est in pairs:
            kind = _candidate_context(est)
            if kind is not None and kind != self.context:
                raise ValueError(
                    f"candidate {name!r} reads {kind!r} context columns but the search has "
                    f"context={self.context!r}; build X with flatten_segmentation(..., "
                    f"context={kind!r}) and pass context={kind!r}, or drop the candidate."
                )
            if not self.allow_label_change and not _keeps_prediction(est):
                raise ValueError(
                    f"candidate {name!r} ({type(est).__name__}) may change the predicted "
                    "class (and the accuracy and mIoU); pass allow_label_change=True to "
                    "search it, the change is then reported in cv_results_."
                )
        return [(name, clone(est)) for name, est in pairs]

    def _columns(self, X: np.ndarray, kind: str | None) -> np.ndarray:
        """The columns a calibrator reading context ``kind`` takes."""
        if kind is None and X.shape[1] != self.n_classes_:
            return X[:, : self.n_classes_]
        return X

    def _log_proba_true(self, est, X: np.ndarray, y: np.ndarray, keeps: bool):
        """(log p(y) per row, predicted class per row or None) of a fitted candidate."""
        logp = np.empty(len(y), dtype=np.float64)
        pred = None if keeps else np.empty(len(y), dtype=np.int64)
        has_log = hasattr(est, "predict_log_proba")
        for start in range(0, len(y), self.chunk_size):
            part = slice(start, start + self.chunk_size)
            if has_log:
                lp = np.asarray(est.predict_log_proba(X[part]))
            else:
                with np.errstate(divide="ignore"):
                    lp = np.log(np.asarray(est.predict_proba(X[part])))
            picked = lp[np.arange(lp.shape[0]), y[part]].astype(np.float64)
            logp[part] = np.where(np.isnan(picked), _LOG_FLOOR, np.maximum(picked, _LOG_FLOOR))
            if pred is not None:
                pred[part] = lp.argmax(axis=1)
        return logp, pred

    # -------------------------------------------------------------------------- fit
    def fit(self, X, y, groups=None, X_perturbed=None):
        """Cross-validate the candidates by image, choose, refit the winner.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_classes [+ n_context])
            Logits, then the context columns with ``context="spatial"``.
        y : array-like of shape (n_pixels,)
            Class indices; ``ignore_index`` pixels are left out.
        groups : array-like of shape (n_pixels,)
            Image id of every pixel (``flatten_segmentation`` returns them); the
            folds never split an image. Required.
        X_perturbed : array-like of the shape of X, default=None
            The same pixels, row for row, of perturbed copies of the same images
            (for example ``perturb_images`` run through the model, flattened
            with the same labels). Scored beside X on the held-out folds; used
            by ``shift_check``.

        Returns
        -------
        self : object
        """
        self._validate_params()
        if groups is None:
            raise ValueError(
                "CalibratorSearchCV needs groups, the image id of every pixel (the third "
                "output of flatten_segmentation): its folds are by image, because "
                "neighbouring pixels are correlated."
            )
        with np.errstate(over="ignore", invalid="ignore"):
            X = check_array(X, dtype=[np.float32, np.float64], ensure_min_features=2)
        check_finite(X, where="X")
        n_classes = X.shape[1] - self._n_context()
        if n_classes < 2:
            raise ValueError(
                f"X has {X.shape[1]} columns, {self._n_context()} of them context "
                f"(context={self.context!r}): fewer than 2 logit columns are left."
            )
        if self.context is not None:
            check_context_block(
                X, n_classes, self.context, where="the X given to CalibratorSearchCV.fit"
            )
        y = check_labels(y, n_classes, self.ignore_index)
        groups = np.asarray(groups).reshape(-1)
        if len(y) != X.shape[0] or len(groups) != X.shape[0]:
            raise ValueError(
                f"X has {X.shape[0]} rows, y {len(y)} and groups {len(groups)}; give one "
                "label and one image id per pixel."
            )
        if X_perturbed is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                X_perturbed = check_array(X_perturbed, dtype=[np.float32, np.float64])
            check_finite(X_perturbed, where="X_perturbed")
            if X_perturbed.shape != X.shape:
                raise ValueError(
                    f"X_perturbed has shape {X_perturbed.shape} but X has {X.shape}: it must "
                    "hold the same pixels, row for row, of perturbed copies of the images."
                )
            if self.context is not None:
                check_context_block(
                    X_perturbed,
                    n_classes,
                    self.context,
                    where="the X_perturbed given to CalibratorSearchCV.fit",
                )
        elif self.shift_check is not None:
            raise ValueError(
                "shift_check needs X_perturbed in fit: the pixel table of perturbed copies "
                "of the same images (sksegcal.datasets.perturb_images, then your model)."
            )
        if self.ignore_index is not None:
            keep = y != self.ignore_index
            if not keep.any():
                raise ValueError(f"Every pixel has the ignore index {self.ignore_index}.")
            if not keep.all():
                X, y, groups = X[keep], y[keep], groups[keep]
                X_perturbed = None if X_perturbed is None else X_perturbed[keep]
        self.n_classes_ = n_classes
        self.classes_ = np.arange(n_classes)
        self.n_features_in_ = X.shape[1]
        image_ids, image_of_row = np.unique(groups, return_inverse=True)
        n_images = len(image_ids)
        if n_images < 2:
            raise ValueError(
                f"groups holds {n_images} image; the search needs at least 2 images to "
                "hold some out."
            )
        rng = check_random_state_int(self.random_state)
        seed = int(rng.integers(np.iinfo(np.int32).max))
        pairs = self._resolved_candidates(seed)
        self.n_splits_ = min(self.cv, n_images)
        self.image_ids_ = image_ids
        self.image_fold_ = image_folds(groups, self.n_splits_, rng)
        rows = np.arange(len(y))
        if self.max_cv_pixels is not None and len(y) > self.max_cv_pixels:
            rows = np.sort(rng.choice(len(y), self.max_cv_pixels, replace=False))
        self._cross_validate(pairs, X, y, image_of_row, rows, X_perturbed)
        self._choose(pairs)
        name, est = pairs[self.best_index_]
        kind = _candidate_context(est)
        fit_kw = {"groups": groups} if requests_groups(est) else {}
        start = time.perf_counter()
        self.best_estimator_ = est.fit(self._columns(X, kind), y, **fit_kw)
        self.refit_time_ = time.perf_counter() - start
        self.best_name_ = name
        self._best_context_ = kind
        return self

    def _cross_validate(self, pairs, X, y, image_of_row, rows, X_perturbed) -> None:
        n_images, k = len(self.image_ids_), self.n_splits_
        row_fold = self.image_fold_[image_of_row[rows]]
        counts = np.bincount(image_of_row[rows], minlength=n_images).astype(np.float64)
        nll = np.full((len(pairs), n_images), np.nan)
        nll_p = np.full((len(pairs), n_images), np.nan) if X_perturbed is not None else None
        results = {"name": [n for n, _ in pairs], "error": [None] * len(pairs)}
        fit_time = np.zeros(len(pairs))
        labels_moved = [not _keeps_prediction(est) for _, est in pairs]
        moved = {
            i: {"changed": 0.0, "n": 0.0, "cm": None} for i, m in enumerate(labels_moved) if m
        }
        for fold in range(k):
            train, test = rows[row_fold != fold], rows[row_fold == fold]
            if len(train) == 0 or len(test) == 0:
                continue
            yt, img = y[test], image_of_row[test]
            # each fold's rows are copied once per column set, not once per candidate
            tables = {}

            def table(kind, train=train, test=test, tables=tables):
                if kind not in tables:

                    def cut(A, rows):
                        return np.ascontiguousarray(self._columns(A[rows], kind))

                    tables[kind] = (
                        cut(X, train),
                        cut(X, test),
                        None if X_perturbed is None else cut(X_perturbed, test),
                    )
                return tables[kind]

            for i, (name, template) in enumerate(pairs):
                if results["error"][i] is not None:
                    continue
                kind = _candidate_context(template)
                X_train, X_test, X_test_perturbed = table(kind)
                est = clone(template)
                fit_kw = {"groups": image_of_row[train]} if requests_groups(est) else {}
                start = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        # a fold's small fit may not converge; the held-out NLL judges it
                        warnings.simplefilter("ignore")
                        est.fit(X_train, y[train], **fit_kw)
                except Exception as exc:
                    if name == "TS" or self.error_score == "raise":
                        raise
                    results["error"][i] = f"fold {fold}: {type(exc).__name__}: {exc}"
                    warnings.warn(
                        f"CalibratorSearchCV: candidate {name!r} failed on fold {fold} and is "
                        f"left out ({type(exc).__name__}: {exc}).",
                        UserWarning,
                        stacklevel=3,
                    )
                    nll[i] = np.nan
                    if nll_p is not None:
                        nll_p[i] = np.nan
                    continue
                fit_time[i] += time.perf_counter() - start
                logp, pred = self._log_proba_true(est, X_test, yt, not labels_moved[i])
                per_image = np.bincount(img, weights=-logp, minlength=n_images)
                held = np.unique(img)
                nll[i, held] = per_image[held] / counts[held]
                if nll_p is not None:
                    logq, _ = self._log_proba_true(est, X_test_perturbed, yt, True)
                    per_image = np.bincount(img, weights=-logq, minlength=n_images)
                    nll_p[i, held] = per_image[held] / counts[held]
                if pred is not None:
                    self._tally_moves(moved[i], X[test, : self.n_classes_].argmax(1), pred, yt)
        self.image_nll_ = nll
        self._image_nll_perturbed = nll_p
        self._fit_time = fit_time / k
        self._moved = moved
        self._results = results

    def _tally_moves(self, tally, model_pred, pred, y) -> None:
        c = self.n_classes_
        tally["changed"] += float(np.sum(pred != model_pred))
        tally["n"] += len(y)
        both = np.stack(
            [
                np.bincount(y * c + model_pred, minlength=c * c),
                np.bincount(y * c + pred, minlength=c * c),
            ]
        ).reshape(2, c, c)
        tally["cm"] = both if tally["cm"] is None else tally["cm"] + both

    @staticmethod
    def _accuracy_miou(cm: np.ndarray) -> tuple[float, float]:
        tp = np.diag(cm).astype(np.float64)
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        return float(tp.sum() / cm.sum()), float(np.mean(tp[present] / union[present]))

    def _choose(self, pairs) -> None:
        nll, results = self.image_nll_, self._results
        scored = ~np.isnan(nll[0])  # images held out (all, unless the subsample missed one)
        ts = nll[0, scored]
        n = len(pairs)
        mean = np.full(n, np.nan)
        sd = np.full(n, np.nan)
        gain = np.full(n, np.nan)
        t_stat = np.full(n, np.nan)
        p_val = np.full(n, np.nan)
        supported = [False] * n
        for i in range(n):
            if results["error"][i] is not None:
                continue
            own = nll[i, scored]
            mean[i], sd[i] = own.mean(), own.std(ddof=1) if len(own) > 1 else 0.0
            if i == 0:
                continue
            gain[i], t_stat[i], p_val[i], supported[i] = _support(ts, own, self.alpha)
        results.update(
            mean_image_nll=mean.tolist(),
            std_image_nll=sd.tolist(),
            mean_improvement=gain.tolist(),
            t_statistic=t_stat.tolist(),
            p_value=p_val.tolist(),
            supported=supported,
            mean_fit_time=self._fit_time.tolist(),
        )
        for fold in range(self.n_splits_):
            in_fold = scored & (self.image_fold_ == fold)
            results[f"split{fold}_nll"] = (
                nll[:, in_fold].mean(axis=1) if in_fold.any() else np.full(n, np.nan)
            ).tolist()
        passes = [True] * n
        if self._image_nll_perturbed is not None:
            nll_p = self._image_nll_perturbed[:, scored]
            mean_p = nll_p.mean(axis=1)
            ratio = mean_p / mean_p[0]
            results["mean_image_nll_perturbed"] = mean_p.tolist()
            results["perturbed_ratio_to_ts"] = ratio.tolist()
            if self.shift_check is not None:
                passes = [bool(r <= 1.0 + self.shift_check) for r in ratio]
            results["passes_shift_check"] = passes
        if self._moved:
            changed, acc, miou = [0.0] * n, [0.0] * n, [0.0] * n
            for i, tally in self._moved.items():
                if tally["cm"] is None:
                    changed[i] = acc[i] = miou[i] = np.nan
                    continue
                a0, m0 = self._accuracy_miou(tally["cm"][0])
                a1, m1 = self._accuracy_miou(tally["cm"][1])
                changed[i], acc[i], miou[i] = tally["changed"] / tally["n"], a1 - a0, m1 - m0
            results.update(changed_share=changed, accuracy_change=acc, miou_change=miou)

        def winner(use_shift: bool) -> int:
            best = 0
            for i in range(1, n):
                if supported[i] and (passes[i] or not use_shift) and mean[i] < mean[best]:
                    best = i
            return best

        self.best_index_ = winner(True)
        self.choice_without_shift_check_ = pairs[winner(False)][0]
        self.cv_results_ = results
        del self._fit_time, self._moved, self._results

    # ---------------------------------------------------------------------- predict
    def _input(self, X) -> np.ndarray:
        check_is_fitted(self)
        with np.errstate(over="ignore", invalid="ignore"):
            X = check_array(X, dtype=[np.float32, np.float64])
        allowed = {self.n_features_in_}
        if self._best_context_ is None:
            allowed.add(self.n_classes_)
        if X.shape[1] not in allowed:
            raise ValueError(
                f"X has {X.shape[1]} columns; the search was fitted on {self.n_features_in_} "
                f"({self.n_classes_} logit columns"
                + (
                    f" then {self.n_features_in_ - self.n_classes_} context columns"
                    if self.n_features_in_ != self.n_classes_
                    else ""
                )
                + ")"
                + (
                    ", and its winner also takes the logit columns alone"
                    if len(allowed) > 1
                    else ""
                )
                + "."
            )
        if X.shape[1] == self.n_features_in_ > self.n_classes_ and self.context is not None:
            check_context_block(
                X, self.n_classes_, self.context, where="the X given to CalibratorSearchCV"
            )
        return self._columns(X, self._best_context_)

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities of the winner, shape (n_pixels, n_classes)."""
        return self.best_estimator_.predict_proba(self._input(X))

    def predict_log_proba(self, X) -> np.ndarray:
        """Calibrated log-probabilities of the winner."""
        X = self._input(X)
        if hasattr(self.best_estimator_, "predict_log_proba"):
            return self.best_estimator_.predict_log_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(self.best_estimator_.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The winner's predicted class (the model's argmax unless label changes are allowed)."""
        return self.best_estimator_.predict(self._input(X))

    def score(self, X, y, sample_weight=None) -> float:
        """Negative mean NLL of the winner's probabilities (greater is better).

        ``ignore_index`` pixels are left out, as in :meth:`fit`.
        """
        X = self._input(X)
        y = check_labels(y, self.n_classes_, self.ignore_index)
        keep = np.ones(len(y), bool) if self.ignore_index is None else y != self.ignore_index
        if not keep.any():
            raise ValueError(f"Every pixel has the ignore index {self.ignore_index}.")
        w = None if sample_weight is None else np.asarray(sample_weight, np.float64)[keep]
        logp, _ = self._log_proba_true(self.best_estimator_, X[keep], y[keep], True)
        return float(np.average(logp, weights=w))

    def _winner_has(name):
        def check(self):
            check_is_fitted(self)
            return hasattr(self.best_estimator_, name)

        return check

    @available_if(_winner_has("temperatures"))
    def temperatures(self, X) -> np.ndarray:
        """The winner's per-pixel temperatures (available when the winner has them)."""
        return self.best_estimator_.temperatures(self._input(X))

    @available_if(_winner_has("to_torch"))
    def to_torch(self, *args, **kwargs):
        """The winner's ``to_torch()``, forwarded (the search adds nothing at prediction)."""
        return self.best_estimator_.to_torch(*args, **kwargs)

    # ---------------------------------------------------------------------- summary
    def summary(self) -> str:
        """What was chosen and the evidence: one line per candidate."""
        check_is_fitted(self)
        r = self.cv_results_
        n_scored = int(np.sum(~np.isnan(self.image_nll_[0])))
        lines = [
            f"CalibratorSearchCV: chose {self.best_name_!r} "
            f"({type(self.best_estimator_).__name__}) by per-image NLL over {n_scored} "
            f"held-out images in {self.n_splits_} folds by image; a candidate beats TS "
            f"only with a positive mean gain and a one-sided paired t-test p < {self.alpha:g}"
            + (
                f" and a perturbed-copy NLL at most {1 + self.shift_check:g}x TS's"
                if self.shift_check is not None
                else ""
            ),
            f"  {'candidate':<24} {'NLL/image':>10} {'gain vs TS':>11} {'t':>7} {'p':>8}  note",
        ]
        for i, name in enumerate(r["name"]):
            notes = []
            if r["error"][i] is not None:
                notes.append("failed: " + r["error"][i][:60])
            if "perturbed_ratio_to_ts" in r:
                notes.append(f"perturbed NLL {r['perturbed_ratio_to_ts'][i]:.4f}x TS")
            if "changed_share" in r and r["changed_share"][i]:
                notes.append(
                    f"relabels {100 * r['changed_share'][i]:.1f}% of pixels, accuracy "
                    f"{100 * r['accuracy_change'][i]:+.2f} pt, mIoU "
                    f"{100 * r['miou_change'][i]:+.2f} pt"
                )
            if i == self.best_index_:
                notes.insert(0, "CHOSEN")
            elif r["supported"][i]:
                notes.insert(0, "supported")
            gain = r["mean_improvement"][i]
            lines.append(
                f"  {name:<24} {r['mean_image_nll'][i]:>10.5f} "
                + ("         --" if i == 0 else f"{gain:>+11.5f}")
                + ("        --" if i == 0 else f" {r['t_statistic'][i]:>7.2f}")
                + ("         " if i == 0 else f" {r['p_value'][i]:>8.3g}")
                + "  "
                + "; ".join(notes)
            )
        if self.choice_without_shift_check_ != self.best_name_:
            lines.append(
                f"  without the shift check the choice would be "
                f"{self.choice_without_shift_check_!r}"
            )
        return "\n".join(lines)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # a calibrator keeps the model's prediction: accuracy checks do not apply
        tags.classifier_tags.poor_score = True
        tags.input_tags.allow_nan = False
        return tags
