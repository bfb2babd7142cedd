"""What both conformal estimators share: inputs, probabilities, score levels, sets.

The estimators take the pixel tables our calibrators take: X (n_pixels, C)
logits (or probabilities), y class indices with an ignore index, and an
optional *fitted* calibrator in front (anything with ``predict_proba``; it is
used, never refitted). Subclasses say what state the calibration scores go
into and how a threshold is read from it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from abc import abstractmethod
from fractions import Fraction

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from .._safety import empty_state_reason
from .._validation import check_calibrator_classes, check_labels
from ..features import softmax
from ..store._engine import calibrator_fingerprint as fingerprint
from ._histogram import check_alpha
from ._scores import class_scores, to_levels

_PROBA_TOL = 1e-3


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class BaseConformal(BaseEstimator):
    """Shared machinery of the conformal estimators; not for direct use."""

    _parameter_constraints: dict = {
        "alpha": [Interval(numbers.Real, 0, 1, closed="neither")],
        "conformity_score": [StrOptions({"lac", "aps"})],
        "calibrator": [HasMethods(["predict_proba"]), None],
        "input_type": [StrOptions({"logits", "probabilities"})],
        "ignore_index": [numbers.Integral, None],
        "randomized": ["boolean"],
        "n_bins": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "chunk_size": [Interval(numbers.Integral, 1, None, closed="left")],
    }

    # ------------------------------------------------------------ parameters
    def _check_settings(self) -> None:
        self._validate_params()
        if self.randomized and self.conformity_score != "aps":
            raise ValueError(
                "randomized=True applies to conformity_score='aps' only (got "
                f"conformity_score={self.conformity_score!r}); the LAC score needs no "
                "randomisation."
            )
        if self.calibrator is not None:
            try:
                check_is_fitted(self.calibrator)
            except NotFittedError:
                raise NotFittedError(
                    f"calibrator {type(self.calibrator).__name__} is not fitted: fit it first "
                    "on other images than the conformal calibration ones (it is used as it "
                    "is, never refitted)."
                ) from None
            except TypeError:  # not a scikit-learn estimator: its predict_proba will tell
                pass

    def _seed(self) -> int:
        """One integer seed per fit, from ``random_state`` (fresh entropy for None)."""
        rs = self.random_state
        if rs is None:
            return int(np.random.SeedSequence().entropy % (2**63))
        if isinstance(rs, numbers.Integral):
            return int(rs)
        if isinstance(rs, np.random.Generator):
            return int(rs.integers(2**63))
        return int(rs.randint(np.iinfo(np.int32).max))

    def _rng(self, *key: int) -> np.random.Generator | None:
        """The uniform draws of randomised APS for one stream (None when not randomised)."""
        if not self.randomized:
            return None
        return np.random.default_rng([self.seed_, *key])

    # --------------------------------------------------------------- inputs
    def _validate_X(self, X, *, reset: bool) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            # after the first fit the feature count check (reset=False) says what is wrong
            return validate_data(
                self,
                X,
                reset=reset,
                dtype=[np.float32, np.float64],
                ensure_min_features=2 if reset else 1,
            )

    def _start(self, n_features: int) -> None:
        """Validate the settings and set the fitted attributes that do not depend on data."""
        self._check_settings()
        n_classes = n_features
        if self.calibrator is not None:
            classes = getattr(self.calibrator, "classes_", None)
            if classes is not None:
                n_classes = len(classes)
            # the calibrator takes X as it is (context columns included)
            check_calibrator_classes(self.calibrator, n_features, what="the calibrator", where="X")
        self.classes_ = np.arange(n_classes)
        self.seed_ = self._seed()
        self.state_ = self._new_state()
        self._images_seen: set = set()

    def _proba(self, X: np.ndarray) -> np.ndarray:
        """Probabilities (n, C) of a validated chunk, through the calibrator if any."""
        if self.calibrator is not None:
            p = np.asarray(self.calibrator.predict_proba(X))
        elif self.input_type == "logits":
            p = softmax(X.astype(np.float32, copy=False) if X.dtype != np.float64 else X)
        else:
            p = X
            if p.size and (p.min() < 0 or p.max() > 1 + _PROBA_TOL):
                raise ValueError(
                    "input_type='probabilities' but X has values outside [0, 1]; pass "
                    "input_type='logits' for raw network outputs."
                )
        if p.ndim != 2 or p.shape[1] != len(self.classes_):
            raise ValueError(
                f"the probabilities have shape {p.shape}, expected (n, {len(self.classes_)}); "
                "the calibrator must return one column per class."
            )
        return p

    def _labels(self, y, n: int) -> np.ndarray:
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y "
                "is None: give the calibration pixels' labels."
            )
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"X has {n} rows but y has {y.shape[0]} entries.")
        return check_labels(y, len(self.classes_), self.ignore_index).astype(np.int64)

    # --------------------------------------------------------------- levels
    def _all_levels(self, p: np.ndarray, rng) -> np.ndarray:
        u = None if rng is None else rng.random(p.shape[0])
        return to_levels(class_scores(p, self.conformity_score, u), self.n_bins)

    def _true_levels(self, p: np.ndarray, y: np.ndarray, rng) -> np.ndarray:
        """The level of each pixel's true class."""
        if self.conformity_score == "lac":  # one column only: no (n, C) score table
            return to_levels(1.0 - p[np.arange(len(y)), y], self.n_bins)
        return self._all_levels(p, rng)[np.arange(len(y)), y]

    def _image_histogram(self, chunks, rng) -> np.ndarray:
        """Counts of the counted pixels' true-class levels over (X, y) chunks of one image."""
        counts = np.zeros(self.n_bins + 1)
        for X, y in chunks:
            keep = self._counted(y)
            if not keep.any():
                continue
            Xk, yk = (X, y) if keep.all() else (X[keep], y[keep])
            for part in _chunks(len(yk), self.chunk_size):
                p = self._proba(Xk[part])
                counts += np.bincount(
                    self._true_levels(p, yk[part], rng), minlength=self.n_bins + 1
                )
        return counts

    def _counted(self, y: np.ndarray) -> np.ndarray:
        """Which pixels enter the calibration (not ignored; subclasses may narrow it)."""
        if self.ignore_index is None:
            return np.ones(len(y), bool)
        return y != self.ignore_index

    # -------------------------------------------------------------- images
    def _fit_images(self, X, y, groups):
        """Add whole images (``groups``: the image of each pixel), one state entry each."""
        if groups is None:
            raise ValueError(
                f"groups is required by {self._units_owner()}: the image of each pixel, "
                "because images are the exchangeable units of an image-level guarantee. "
                "Give image ids (fit_maps does it for (N, C, ...) maps)"
                + (", or pass guarantee='pixel'." if hasattr(self, "guarantee") else ".")
            )
        first = not hasattr(self, "state_")
        X = self._validate_X(X, reset=first)
        if first:
            self._start(X.shape[1])
        y = self._labels(y, X.shape[0])
        groups = np.asarray(groups).reshape(-1)
        if groups.shape[0] != X.shape[0]:
            raise ValueError(
                f"groups has {groups.shape[0]} entries but X has {X.shape[0]} "
                "rows; give one image id per pixel."
            )
        ids, inverse = np.unique(groups, return_inverse=True)
        again = [g for g in ids.tolist() if g in self._images_seen]
        if again:
            raise ValueError(
                f"images {again[:5]} were already added by an earlier call; "
                "each image must come whole in one call."
            )
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
        for j, image in enumerate(ids.tolist()):
            rows = order[bounds[j] : bounds[j + 1]]
            rng = self._rng(0, len(self._images_seen))
            self._add_image(self.state_, self._image_histogram([(X[rows], y[rows])], rng))
            self._images_seen.add(image)
        return self._finish()

    def _units_owner(self) -> str:
        return type(self).__name__

    def _merge_images_seen(self, other) -> None:
        both = self._images_seen & other._images_seen
        if both:
            raise ValueError(
                f"Both estimators saw images {sorted(both, key=repr)[:5]}: an "
                "image must be calibrated on whole, by one of them."
            )
        self._images_seen |= other._images_seen

    # ------------------------------------------------------------ the state
    @abstractmethod
    def _new_state(self): ...

    @abstractmethod
    def _add_image(self, state, counts: np.ndarray) -> None:
        """Add one image's (or, for pixel sets, any pixels') level counts to ``state``."""

    @abstractmethod
    def _threshold_level(self) -> int | None: ...

    def _finish(self):
        level = self._threshold_level()
        self.threshold_level_ = self.n_bins if level is None else level
        self.threshold_ = np.inf if level is None else level / self.n_bins
        if level is None:
            reason = empty_state_reason(self)
            extra = f" Why: {reason.rstrip('; ')}." if reason else ""
            warnings.warn(too_few_message(self) + extra, UserWarning, stacklevel=3)
        return self

    def merge(self, other):
        """Add the calibration state of ``other`` (fitted on other data), in place.

        ``other`` must be the same kind of estimator with the same ``conformity_score``,
        ``n_bins``, ``randomized`` and inputs; merging states filled on
        disjoint parts of the calibration data gives the state one pass over
        all of it gives, and the threshold is read again (at this estimator's
        ``alpha``).

        Returns
        -------
        self
        """
        check_is_fitted(self)
        check_is_fitted(other)
        if type(other) is not type(self):
            raise TypeError(f"Can only merge a {type(self).__name__}; got {type(other).__name__}.")
        keys = (
            "conformity_score",
            "n_bins",
            "randomized",
            "input_type",
            "ignore_index",
        ) + self._merge_keys
        diff = [k for k in keys if getattr(self, k) != getattr(other, k)]
        # states filled through two calibrators are scores of two models: never one state
        if fingerprint(self.calibrator) != fingerprint(other.calibrator):
            diff.append("calibrator (class, parameters or fitted state)")
        if diff or other.n_features_in_ != self.n_features_in_:
            raise ValueError(
                "Cannot merge estimators with different settings "
                f"({', '.join(diff) or 'n_features_in_'}); fit both with the same ones."
            )
        self._merge_state(other)
        return self._finish()

    _merge_keys: tuple = ()

    def _merge_state(self, other) -> None:
        self.state_.merge(other.state_)

    # ------------------------------------------------------------ prediction
    def _validate_predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self._validate_X(X, reset=False)

    def _set_chunk(self, p: np.ndarray, rng) -> np.ndarray:
        return self._all_levels(p, rng) <= self.threshold_level_

    def predict_set(self, X) -> np.ndarray:
        """Prediction sets: which classes each pixel's set holds.

        Parameters
        ----------
        X : array-like of shape (n_pixels, n_features)
            Logits (or what the calibrator takes).

        Returns
        -------
        sets : ndarray of shape (n_pixels, n_classes), bool
            ``sets[i, k]`` is True when class ``k`` is in the set of pixel
            ``i``: its score level is at most ``threshold_level_``.
        """
        X = self._validate_predict(X)
        out = np.empty((X.shape[0], len(self.classes_)), dtype=bool)
        rng = self._rng(1)
        for part in _chunks(X.shape[0], self.chunk_size):
            out[part] = self._set_chunk(self._proba(X[part]), rng)
        return out

    def predict_set_size(self, X) -> np.ndarray:
        """The number of classes in each pixel's set, shape (n_pixels,), int."""
        X = self._validate_predict(X)
        out = np.empty(X.shape[0], dtype=np.int64)
        rng = self._rng(1)
        for part in _chunks(X.shape[0], self.chunk_size):
            out[part] = self._set_chunk(self._proba(X[part]), rng).sum(axis=1)
        return out

    def _table(self, maps) -> tuple[np.ndarray, tuple]:
        """``(N, C, *spatial)`` maps as an ``(n, C)`` table, and the shape ``(N, *spatial)``."""
        maps = np.asarray(maps)
        if maps.ndim < 3:
            raise ValueError(
                f"maps must have shape (N, C, H, W) or (N, C, D, H, W), got {maps.shape}."
            )
        c = maps.shape[1]
        shape = (maps.shape[0], *maps.shape[2:])
        return np.moveaxis(maps, 1, -1).reshape(-1, c), shape

    def predict_set_maps(self, maps) -> np.ndarray:
        """Prediction sets of ``(N, C, *spatial)`` logit maps, as boolean masks of that shape."""
        X, shape = self._table(maps)
        return np.moveaxis(self.predict_set(X).reshape(*shape, -1), -1, 1)

    def predict_set_size_maps(self, maps) -> np.ndarray:
        """Set sizes of ``(N, C, *spatial)`` logit maps, as an ``(N, *spatial)`` int array."""
        X, shape = self._table(maps)
        return self.predict_set_size(X).reshape(shape)

    @staticmethod
    def _map_groups(groups, shape) -> np.ndarray:
        """One group id per pixel of ``(N, *spatial)`` maps: the map's, or its unit's."""
        per_map = np.arange(shape[0]) if groups is None else np.asarray(groups).reshape(-1)
        if per_map.shape[0] != shape[0]:
            raise ValueError(
                f"groups must hold one unit per map ({shape[0]}), got {len(per_map)}."
            )
        return np.repeat(per_map, int(np.prod(shape[1:], dtype=np.int64)))

    def _map_labels(self, labels, shape) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.shape != shape:
            raise ValueError(f"labels must have shape {shape} (N, *spatial), got {labels.shape}.")
        return labels.reshape(-1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.target_tags.required = True
        return tags


def images_needed(alpha, bound: float = 1.0) -> int:
    """The fewest calibration units for which a finite threshold exists at ``alpha``.

    Split conformal needs ``ceil((n + 1)(1 - alpha)) <= n`` and conformal risk
    control with a loss bounded by ``B`` needs ``B <= alpha (n + 1)``; with
    ``B = 1`` both read ``n >= 1 / alpha - 1``, computed on the exact decimal
    ``alpha`` (``n >= 9`` at 0.1, 19 at 0.05, 99 at 0.01).
    """
    a = check_alpha(alpha)
    return max(1, math.ceil(Fraction(bound) / a - 1))


def too_few_message(est) -> str:
    """What a user reads when the calibration units cannot support ``alpha``."""
    unit = getattr(est, "_unit", "image")
    n = int(getattr(est, "n_calibration_", 0))
    need = images_needed(est.alpha)
    return (
        f"{type(est).__name__}: {n} calibration {unit}{'s' if n != 1 else ''} cannot support "
        f"alpha={est.alpha}: at least {need} {unit}s are needed (n >= 1/alpha - 1). The "
        f"threshold is infinite and every set holds every class. Add calibration {unit}s, or "
        f"raise alpha to at least {1 / (n + 1):.3g} (1/(n + 1))."
    )
