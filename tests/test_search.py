"""CalibratorSearchCV: the choice equals a brute-force loop; never worse than TS on the folds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import config_context
from sklearn.base import clone
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline

from conftest import real_context_rows
from sksegcal import (
    CalibratorSearchCV,
    EnsembleTemperatureScaling,
    LocalTemperatureScaling,
    MetaCalScaling,
    SelectiveScalingCalibrator,
    TemperatureScaling,
    VectorScaling,
)
from sksegcal.calibrators._search import _paired_support, _support, image_folds


def _data(seed=0, n_images=10, per_image=200, c=4, noise=1.0):
    """Over-confident logits whose errors a detector partly sees (per-pixel hardness)."""
    rng = np.random.default_rng(seed)
    n = n_images * per_image
    y = rng.integers(0, c, n)
    hardness = rng.gamma(2.0, 0.5, n) * noise
    X = 6.0 * (np.eye(c)[y] + hardness[:, None] * rng.normal(size=(n, c)))
    return X.astype(np.float32), y, np.repeat(np.arange(n_images) * 7 + 3, per_image)


def _candidates():
    return [
        ("metacal", MetaCalScaling()),
        ("ets", EnsembleTemperatureScaling()),
        ("selective", SelectiveScalingCalibrator(guard=None, random_state=0)),
    ]


def _brute_force(search, candidates, X, y, groups, alpha):
    """The rule, written out: same folds, per-image NLL from sklearn's log_loss."""
    ids = np.unique(groups)
    fold_of = dict(zip(ids, search.image_fold_))
    row_fold = np.array([fold_of[g] for g in groups])
    names = ["TS"] + [n for n, _ in candidates]
    ests = [TemperatureScaling()] + [e for _, e in candidates]
    nll = np.zeros((len(ests), len(ids)))
    for k in range(search.n_splits_):
        train, test = row_fold != k, row_fold == k
        for i, est in enumerate(ests):
            fitted = clone(est)
            if "groups" in fitted.fit.__code__.co_varnames:
                fitted.fit(X[train], y[train], groups=groups[train])
            else:
                fitted.fit(X[train], y[train])
            p = fitted.predict_proba(X[test]).astype(np.float64)
            p /= p.sum(axis=1, keepdims=True)  # float32 rows sum to 1 within rounding
            for j, image in enumerate(ids):
                rows = groups[test] == image
                if rows.any():
                    nll[i, j] = log_loss(y[test][rows], p[rows], labels=np.arange(X.shape[1]))
    best = 0
    for i in range(1, len(ests)):
        res = stats.ttest_rel(nll[0], nll[i], alternative="greater")
        if (
            nll[i].mean() < nll[0].mean()
            and res.pvalue < alpha
            and (nll[i].mean() < nll[best].mean())
        ):
            best = i
    return names[best], nll


def test_choice_equals_brute_force_loop():
    X, y, groups = _data()
    search = CalibratorSearchCV(_candidates(), cv=2, max_cv_pixels=None, random_state=0).fit(
        X, y, groups=groups
    )
    name, nll = _brute_force(search, _candidates(), X, y, groups, 0.05)
    np.testing.assert_allclose(search.image_nll_, nll, rtol=2e-4)
    assert search.best_name_ == name
    assert search.best_name_ != "TS"  # a real gain here: the test must not pass by falling back
    # the refit winner is the candidate fitted on every pixel
    ref = dict(_candidates())[name]
    ref = ref.fit(X, y, groups=groups) if name == "selective" else ref.fit(X, y)
    np.testing.assert_allclose(
        search.predict_proba(X[:500]), ref.predict_proba(X[:500]), rtol=1e-5, atol=1e-6
    )
    assert search.score(X, y) == pytest.approx(ref.score(X, y), rel=1e-5)


def test_folds_are_by_image_balanced_and_seeded():
    groups = np.repeat([5, 1, 9, 2, 7, 3, 8], 3)
    fold = image_folds(groups, 3, 0)
    assert np.bincount(fold).tolist() == [3, 2, 2]
    assert np.array_equal(fold, image_folds(groups, 3, 0))
    assert not np.array_equal(fold, image_folds(groups, 3, 1))


def test_never_worse_than_ts_on_the_folds():
    # well calibrated already: noise a detector cannot see, nothing to win over TS
    rng = np.random.default_rng(3)
    n, c = 2000, 3
    y = rng.integers(0, c, n)
    X = (2.0 * np.eye(c)[y] + rng.normal(size=(n, c))).astype(np.float32)
    groups = np.repeat(np.arange(10), n // 10)
    for seed in (0,):
        search = CalibratorSearchCV(_candidates(), cv=3, random_state=seed).fit(
            X, y, groups=groups
        )
        means = np.nanmean(search.image_nll_, axis=1)
        assert means[search.best_index_] <= means[0]
        assert search.best_index_ == 0 or search.cv_results_["supported"][search.best_index_]


def test_support_is_a_one_sided_paired_t_test():
    rng = np.random.default_rng(0)
    for d in (rng.normal(0.1, 1, 12), rng.normal(-0.1, 1, 5), rng.normal(1, 0.3, 3)):
        t, p = _paired_support(d)
        ref = stats.ttest_1samp(d, 0.0, alternative="greater")
        assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert _paired_support(np.full(4, 0.2)) == (np.inf, 0.0)
    assert _paired_support(np.zeros(4)) == (0.0, 1.0)
    assert _paired_support(np.array([0.5])) == (0.0, 1.0)


def test_support_needs_a_positive_gain_and_the_test():
    ts = np.array([1.0, 1.2, 0.9, 1.1, 1.0, 1.3])
    steady = ts - 0.01 * np.array([1.0, 1.2, 0.9, 1.1, 1.0, 1.3])  # small, on every image
    lucky = ts - np.array([0.9, -0.8, 0.7, -0.6, 0.5, -0.5])  # larger mean gain, by chance
    assert _support(ts, steady, 0.05)[3]
    gain, _, p, supported = _support(ts, lucky, 0.05)
    assert gain > 0.01 and p > 0.05 and not supported
    assert not _support(ts, ts + 0.01, 0.05)[3]  # worse on every image
    assert not _support(ts, ts, 0.05)[3]  # a tie


def test_a_tie_with_ts_keeps_ts():
    X, y, groups = _data(n_images=6, per_image=300)
    search = CalibratorSearchCV([("ts-again", TemperatureScaling())], cv=3, random_state=0).fit(
        X, y, groups=groups
    )
    assert search.cv_results_["mean_improvement"][1] == pytest.approx(0.0, abs=1e-9)
    assert search.best_name_ == "TS" and not search.cv_results_["supported"][1]
    assert "CHOSEN" in search.summary().splitlines()[2]


def test_two_images_and_more_folds_than_images():
    X, y, groups = _data(n_images=2, per_image=500)
    search = CalibratorSearchCV([("metacal", MetaCalScaling())], cv=5, random_state=0).fit(
        X, y, groups=groups
    )
    assert search.n_splits_ == 2
    assert search.best_name_ == "TS"  # two images give no support (p of a t-test on 2 values)
    # forwarded only where the winner has it
    assert hasattr(search, "temperatures") == hasattr(search.best_estimator_, "temperatures")
    lts = CalibratorSearchCV([("lts", LocalTemperatureScaling(context=None))], alpha=0.99)
    lts.fit(X, y, groups=groups)
    if lts.best_name_ == "lts":
        np.testing.assert_allclose(
            lts.temperatures(X[:10]), lts.best_estimator_.temperatures(X[:10])
        )


def test_bad_input_is_refused():
    X, y, groups = _data(n_images=4, per_image=100)
    search = CalibratorSearchCV([("metacal", MetaCalScaling())])
    with pytest.raises(ValueError, match="needs groups"):
        search.fit(X, y)
    with pytest.raises(ValueError, match="at least 2 images"):
        search.fit(X, y, groups=np.zeros(len(y)))
    with pytest.raises(ValueError, match="outside"):
        search.fit(X, np.full(len(y), 7), groups=groups)
    with pytest.raises(ValueError, match="ignore index"):
        search.fit(X, np.full(len(y), 255), groups=groups)
    with pytest.raises(ValueError, match="reserved"):
        CalibratorSearchCV([("TS", MetaCalScaling())]).fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="unique"):
        CalibratorSearchCV([("a", MetaCalScaling()), ("a", TemperatureScaling())]).fit(
            X, y, groups=groups
        )
    with pytest.raises(ValueError, match="allow_label_change"):
        CalibratorSearchCV([("vector", VectorScaling())]).fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="context"):
        CalibratorSearchCV([("lts", LocalTemperatureScaling(context="spatial"))]).fit(
            X, y, groups=groups
        )
    with pytest.raises(ValueError, match="X_perturbed"):
        CalibratorSearchCV(shift_check=0.0).fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="row for row"):
        search.fit(X, y, groups=groups, X_perturbed=X[:10])
    with pytest.raises(ValueError, match="cv"):
        CalibratorSearchCV(cv=1).fit(X, y, groups=groups)
    fitted = search.fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="columns"):
        fitted.predict_proba(X[:, :3])


def test_label_changing_candidates_report_the_change():
    X, y, groups = _data(n_images=6, per_image=300, c=3)
    X[:, 2] += 3.0  # a class bias that vector scaling removes: it re-labels pixels
    search = CalibratorSearchCV(
        [("vector", VectorScaling())], cv=3, allow_label_change=True, random_state=0
    ).fit(X, y, groups=groups)
    r = search.cv_results_
    # the reference: held-out predictions of vector scaling against the model's argmax
    fold_of = dict(zip(np.unique(groups), search.image_fold_))
    row_fold = np.array([fold_of[g] for g in groups])
    changed = correct_new = 0
    for k in range(3):
        tr, te = row_fold != k, row_fold == k
        pred = VectorScaling().fit(X[tr], y[tr]).predict(X[te])
        changed += np.sum(pred != X[te].argmax(1))
        correct_new += np.sum(pred == y[te])
    assert r["changed_share"][1] == pytest.approx(changed / len(y))
    assert r["accuracy_change"][1] == pytest.approx(
        correct_new / len(y) - np.mean(X.argmax(1) == y)
    )
    assert r["changed_share"][0] == 0.0 and r["changed_share"][1] > 0.01
    assert "relabels" in search.summary()


class _ShapeSpy(TemperatureScaling):
    """TS that records the width of every X it is fitted on."""

    seen: list = []

    def fit(self, X, y, sample_weight=None):
        _ShapeSpy.seen.append(np.asarray(X).shape[1])
        return super().fit(X, y, sample_weight)


def test_context_columns_reach_only_the_candidates_that_read_them():
    from sksegcal.context import n_context_features

    X, y, groups = _data(n_images=6, per_image=300, c=3)
    k = n_context_features()
    Xc = np.hstack([X, real_context_rows(len(y), 3, seed=0)])  # drawn apart from X, y
    _ShapeSpy.seen = []
    search = CalibratorSearchCV(
        [
            ("spy", _ShapeSpy()),
            ("lts-spatial", LocalTemperatureScaling(context="spatial", max_iter=5)),
        ],
        cv=2,
        context="spatial",
        random_state=0,
    )
    assert search.reads_context == "spatial"
    search.fit(Xc, y, groups=groups)
    assert _ShapeSpy.seen == [3, 3, 3] or _ShapeSpy.seen == [3, 3]
    assert search.n_features_in_ == 3 + k
    if search.best_name_ == "lts-spatial":
        assert search.reads_context == "spatial"
    else:  # a winner without context also takes the logit columns alone
        assert search.reads_context is None
        np.testing.assert_allclose(search.predict_proba(Xc[:20]), search.predict_proba(X[:20]))


def test_shift_check_excludes_a_candidate_worse_than_ts_on_perturbed_copies():
    X, y, groups = _data(seed=1)
    # perturbed copies on which the in-domain winner sharpens the wrong pixels: the
    # hardness signal the detector learnt is reversed
    rng = np.random.default_rng(2)
    Xp = (6.0 * np.eye(4)[y] + 6.0 * rng.normal(size=X.shape)).astype(np.float32)
    plain = CalibratorSearchCV(_candidates(), cv=3, random_state=0).fit(X, y, groups=groups)
    checked = CalibratorSearchCV(_candidates(), cv=3, shift_check=0.0, random_state=0).fit(
        X, y, groups=groups, X_perturbed=Xp
    )
    r = checked.cv_results_
    assert checked.choice_without_shift_check_ == plain.best_name_ != "TS"
    np.testing.assert_allclose(checked.image_nll_, plain.image_nll_)
    assert r["perturbed_ratio_to_ts"][checked.best_index_] <= 1.0
    assert not r["passes_shift_check"][plain.best_index_]
    assert checked.best_name_ != plain.best_name_


def test_a_failing_candidate_is_left_out_or_raises():
    class Broken(TemperatureScaling):
        def fit(self, X, y, sample_weight=None):
            raise RuntimeError("no")

    X, y, groups = _data(n_images=4, per_image=200)
    with pytest.warns(UserWarning, match="failed"):
        search = CalibratorSearchCV([("broken", Broken())], cv=2, random_state=0).fit(
            X, y, groups=groups
        )
    assert search.best_name_ == "TS" and "RuntimeError" in search.cv_results_["error"][1]
    with pytest.raises(RuntimeError):
        CalibratorSearchCV([("broken", Broken())], cv=2, error_score="raise").fit(
            X, y, groups=groups
        )


def test_sklearn_conventions_and_metadata_routing():
    search = CalibratorSearchCV(_candidates(), cv=3, random_state=0)
    twin = clone(search)
    assert twin.get_params(deep=False).keys() == search.get_params(deep=False).keys()
    assert twin.set_params(alpha=0.1).alpha == 0.1 and search.alpha == 0.05
    assert "CalibratorSearchCV" in repr(search)
    X, y, groups = _data(n_images=6, per_image=300)
    with config_context(enable_metadata_routing=True):
        pipe = Pipeline([("search", clone(search))]).fit(X, y, groups=groups)
    direct = clone(search).fit(X, y, groups=groups)
    np.testing.assert_allclose(pipe[-1].image_nll_, direct.image_nll_)  # same seed, same fit
    assert pipe.predict(X[:50]).tolist() == X[:50].argmax(1).tolist()
    np.testing.assert_allclose(
        np.exp(direct.predict_log_proba(X[:50])), direct.predict_proba(X[:50]), rtol=1e-5
    )


@pytest.mark.parametrize("fmt", ["skops", "joblib"])
def test_a_fitted_search_saves_and_loads(tmp_path, fmt):
    from sksegcal.persistence import load, save

    X, y, groups = _data(n_images=4, per_image=200)
    search = CalibratorSearchCV([("metacal", MetaCalScaling())], cv=2, random_state=0)
    search.fit(X, y, groups=groups)
    path = save(search, tmp_path / f"search.{fmt}", format=fmt)
    loaded = load(path, trusted=True if fmt == "joblib" else None)
    np.testing.assert_array_equal(loaded.predict_proba(X[:50]), search.predict_proba(X[:50]))
    assert loaded.best_name_ == search.best_name_
