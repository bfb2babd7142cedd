import os
import subprocess
import sys
import textwrap
import warnings

import joblib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import softmax
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, GroupShuffleSplit, PredefinedSplit
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import LinearSVC

from conftest import make_logits, two_populations
from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
from sksegcal.features import log_softmax
from sksegcal.pixels import flatten_segmentation, split_images

# every test runs once per counting path (numba and NumPy): tests/conftest.py
pytestmark = pytest.mark.counting_paths


def _cal(**kwargs):
    kwargs.setdefault("random_state", 0)
    return SelectiveScalingCalibrator(LogisticRegression(), **kwargs)


SETTINGS = [
    {},
    {"t1": 1.0, "t2": 1e10, "threshold": 0.5, "mode": "hard"},  # the paper's recipe
    {"t2": 2.0, "mode": "hard"},
    {"t1": "auto"},
    {"mode": "soft"},
    {"mode": "soft", "t1": "auto"},
    {"features": "agnostic"},
    {"threshold": 0.8, "t2": 1e10},
]


@pytest.mark.parametrize("params", SETTINGS)
def test_predict_is_the_logit_argmax_and_rows_sum_to_one(params, logits_data):
    X, y = logits_data
    cal = _cal(**params).fit(X, y)
    np.testing.assert_array_equal(cal.predict(X), X.argmax(axis=1))
    proba = cal.predict_proba(X)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.exp(cal.predict_log_proba(X)), proba, rtol=1e-5, atol=1e-8)
    # whatever the temperatures, the calibrated argmax is the input argmax unless a row
    # became uniform (a tie)
    not_tied = proba.max(axis=1) - np.sort(proba, axis=1)[:, -2] > 1e-6
    np.testing.assert_array_equal(proba[not_tied].argmax(1), X[not_tied].argmax(1))


def test_fixed_temperatures_match_direct_formula(logits_data):
    X, y = logits_data
    cal = _cal(t1=1.5, t2=3.0, threshold=0.5, mode="hard").fit(X, y)
    p = cal.predict_correctness(X)
    T = np.where(p >= 0.5, 1.5, 3.0)
    np.testing.assert_allclose(
        cal.predict_proba(X), softmax(X / T[:, None], axis=1), rtol=1e-5, atol=1e-7
    )
    soft = _cal(t1=1.5, t2=3.0, mode="soft").fit(X, y)
    beta = p / 1.5 + (1 - p) / 3.0
    np.testing.assert_allclose(
        soft.predict_proba(X), softmax(X * beta[:, None], axis=1), rtol=1e-5, atol=1e-7
    )


def test_unit_temperatures_are_the_identity(logits_data):
    X, y = logits_data
    cal = _cal(t1=1.0, t2=1.0).fit(X, y)
    np.testing.assert_allclose(cal.predict_proba(X), softmax(X, axis=1), rtol=1e-5, atol=1e-7)


def test_huge_t2_gives_uniform_rows_without_overflow():
    X, y = make_logits(n=3000, scale=3000.0, seed=1)  # logits in the thousands
    cal = _cal(t1=1.0, t2=1e10, threshold=0.6, mode="hard").fit(X, y)
    flagged = cal.predict_correctness(X) < 0.6
    assert flagged.any()
    proba = cal.predict_proba(X)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba[flagged], 1 / X.shape[1], atol=1e-6)
    np.testing.assert_array_equal(cal.predict(X), X.argmax(axis=1))


def test_score_is_negative_log_loss(logits_data):
    X, y = logits_data
    cal = _cal().fit(X, y)
    expected = -log_loss(y, cal.predict_proba(X).astype(np.float64), labels=range(4))
    assert cal.score(X, y) == pytest.approx(expected, rel=1e-5)
    y_ign = y.copy()
    y_ign[:100] = 255
    assert cal.score(X, y_ign) == pytest.approx(cal.score(X[100:], y[100:]), rel=1e-6)


def test_fitted_t2_beats_paper_recipe_on_overconfident_logits():
    X, y = make_logits(n=20_000, seed=2)
    Xt, yt = make_logits(n=20_000, seed=3)
    auto = _cal(guard=None).fit(X, y)
    assert auto.t1_ < auto.t2_ < 1e10
    assert auto.detection_auroc_ > 0.6
    paper = _cal(t1=1.0, t2=1e10, threshold=0.5, mode="hard").fit(X, y)
    assert auto.score(Xt, yt) > paper.score(Xt, yt)
    assert auto.score(Xt, yt) > -log_loss(yt, softmax(Xt.astype(float), axis=1))


@settings(max_examples=25, deadline=None)
@given(
    X=arrays(np.float64, st.tuples(st.integers(20, 60), st.integers(2, 5)),
             elements=st.floats(-30, 30)),
    chunk=st.integers(1, 25),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_properties_on_random_logits(X, chunk, dtype):
    X = X.astype(dtype)
    y = np.argmax(X, axis=1)
    y[::3] = (y[::3] + 1) % X.shape[1]  # some wrong predictions, some right
    # fixed temperatures: the chunked prediction must not depend on the chunk size at all
    cal = _cal(t1=1.0, t2=1e10, threshold=0.5, mode="hard", chunk_size=chunk).fit(X, y)
    proba = cal.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(cal.predict(X), np.argmax(X, axis=1))
    big = clone(cal).set_params(chunk_size=10_000).fit(X, y)
    np.testing.assert_allclose(big.predict_proba(X), proba, rtol=1e-6, atol=1e-7)


def test_probability_input_matches_logit_input(logits_data):
    X, y = logits_data
    X = X.astype(np.float64)  # the same precision on both paths
    a = _cal().fit(X, y)
    b = _cal(input_type="probabilities").fit(softmax(X.astype(np.float64), axis=1), y)
    assert b.t2_ == pytest.approx(a.t2_, rel=1e-3)
    np.testing.assert_allclose(
        b.predict_proba(softmax(X.astype(np.float64), axis=1)), a.predict_proba(X), atol=1e-4
    )


def test_cross_fitting_folds_are_whole_images(segmentation_data):
    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits, labels)
    seen = []

    class Recording(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            seen.append(X.copy())
            return super().fit(X, y)

    SelectiveScalingCalibrator(Recording(), features="log_softmax",
                               random_state=0).fit(X, y, groups=groups)
    features = log_softmax(X.astype(np.float32))
    n_images = len(np.unique(groups))
    assert len(seen) == min(5, n_images) + 1  # the final detector, then one per fold
    used_by_fold = []
    for trained in seen:
        rows = np.flatnonzero((features[:, None, :] == trained[None, :, :]).all(-1).any(1))
        used = np.unique(groups[rows])
        # every pixel of a used image trained the detector; no pixel of another one did
        assert set(rows.tolist()) == set(np.flatnonzero(np.isin(groups, used)).tolist())
        used_by_fold.append(set(used.tolist()))
    final, *folds = used_by_fold  # the final detector is fitted first
    assert final == set(np.unique(groups).tolist())
    # each image is left out by exactly one fold's detector
    left_out = [set(final) - used for used in folds]
    assert sorted(i for fold in left_out for i in fold) == sorted(final)


def test_max_fit_pixels_caps_classifier_training(logits_data):
    X, y = logits_data
    seen = {}

    class Recording(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            seen["n"] = len(X)
            seen["wrong"] = int((y == 0).sum())
            return super().fit(X, y)

    # fixed temperatures and threshold: no hold-out, every pixel may train the classifier
    SelectiveScalingCalibrator(Recording(), max_fit_pixels=500, t1=1.0, t2=2.0,
                               threshold=0.5, mode="hard", random_state=0).fit(X, y)
    assert seen["n"] == 500
    wrong_share = 1 - (X.argmax(1) == y).mean()
    assert abs(seen["wrong"] - 500 * wrong_share) <= 1


def test_seed_gives_identical_results(logits_data):
    X, y = logits_data
    a = _cal(random_state=3).fit(X, y)
    b = _cal(random_state=3).fit(X, y)
    assert a.t2_ == b.t2_
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


# ------------------------------------------------------------- composition
# worker processes do not see conftest's counting-path switch: run once, on the default path
@pytest.mark.one_counting_path
def test_grid_search_by_image_chooses_by_nll(segmentation_data):
    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits, labels)
    grid = {"t2": [1.5, 2.0, 4.0, 1e10]}
    cv = GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=0)
    search = GridSearchCV(_cal(), grid, cv=cv, n_jobs=2).fit(X, y, groups=groups)
    train, test = next(cv.split(X, y, groups))
    nll = {
        t2: log_loss(y[test], _cal(t2=t2).fit(X[train], y[train]).predict_proba(X[test])
                     .astype(np.float64), labels=range(4))
        for t2 in grid["t2"]
    }
    assert search.best_params_["t2"] == min(nll, key=nll.get)
    np.testing.assert_allclose(-search.cv_results_["mean_test_score"],
                               [nll[t] for t in grid["t2"]], rtol=1e-5)


def test_predefined_split_by_image(segmentation_data):
    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits, labels)
    split = split_images(groups, random_state=0)
    fold = split.test_fold(groups)
    fit_rows = fold > -2
    search = GridSearchCV(_cal(), {"t2": [2.0, "auto"]}, cv=PredefinedSplit(fold[fit_rows]))
    search.fit(X[fit_rows], y[fit_rows])
    assert search.best_params_["t2"] in (2.0, "auto")
    assert search.best_estimator_.predict_proba(X[fold == -2]).shape == ((fold == -2).sum(), 4)


def test_pipeline_composition(logits_data):
    X, y = logits_data
    # a Pipeline as the correctness classifier, and the calibrator inside a Pipeline that
    # takes probabilities and feeds log-probabilities
    inner = make_pipeline(StandardScaler(), LogisticRegression())
    pipe = Pipeline([
        ("to_logits", FunctionTransformer(lambda P: np.log(np.clip(P, 1e-12, 1)))),
        ("calibrate", SelectiveScalingCalibrator(inner, random_state=0)),
    ])
    P = softmax(X.astype(np.float64), axis=1)
    pipe.fit(P, y)
    np.testing.assert_array_equal(pipe.predict(P), X.argmax(1))
    assert pipe.predict_proba(P).shape == X.shape
    pipe.set_params(calibrate__t2=3.0).fit(P, y)
    assert pipe.named_steps["calibrate"].t2_ == 3.0


def test_clone_get_set_params():
    cal = _cal(t2=4.0)
    params = cal.get_params()
    assert params["t2"] == 4.0 and "classifier__C" in params
    other = clone(cal).set_params(t2=2.0, classifier__C=0.1)
    assert other.t2 == 2.0 and other.classifier.C == 0.1 and cal.classifier.C == 1.0


@pytest.mark.one_counting_path  # the fresh process takes the default path
def test_joblib_round_trip_in_a_fresh_process(tmp_path, logits_data):
    X, y = logits_data
    cal = _cal().fit(X, y)
    path = tmp_path / "calibrator.joblib"
    joblib.dump(cal, path)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "expected.npy", cal.predict_proba(X))
    code = textwrap.dedent(f"""
        import joblib, numpy as np
        cal = joblib.load({str(path)!r})
        X = np.load({str(tmp_path / 'X.npy')!r})
        assert np.array_equal(cal.predict_proba(X), np.load({str(tmp_path / 'expected.npy')!r}))
        print("same")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    assert "same" in out.stdout


# ------------------------------------------------------------------ caching
_FITS = []


class CountingLogisticRegression(LogisticRegression):
    def fit(self, X, y, sample_weight=None):
        _FITS.append(len(X))
        return super().fit(X, y)


def test_memory_fits_the_classifier_once_per_setting(tmp_path, segmentation_data):
    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits, labels)
    cv = GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=0)
    grid = {"t2": [1.5, 2.0, 4.0, 1e10], "threshold": [0.3, 0.5]}
    base = SelectiveScalingCalibrator(CountingLogisticRegression(), random_state=0)

    _FITS.clear()
    GridSearchCV(base, grid, cv=cv).fit(X, y, groups=groups)
    uncached = len(_FITS)
    # per candidate and for the refit: one detector per cross-fitting fold, and the final one
    folds = base.cv
    assert uncached == (8 + 1) * (folds + 1)

    _FITS.clear()
    cached = clone(base).set_params(memory=str(tmp_path / "cache"))
    search = GridSearchCV(cached, grid, cv=cv).fit(X, y, groups=groups)
    # once per fold and once more on the split's train part, the same for the refit
    assert len(_FITS) == 2 * (folds + 1)
    # and the cached search chooses and predicts exactly as the uncached one
    reference = GridSearchCV(base, grid, cv=cv).fit(X, y, groups=groups)
    assert search.best_params_ == reference.best_params_
    np.testing.assert_array_equal(search.predict_proba(X), reference.predict_proba(X))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.array([[np.nan, 1.0], [0.0, 1.0]]), [0, 1], "NaN"),
        (np.array([[np.inf, 1.0], [0.0, 1.0]]), [0, 1], "infinity"),
        (np.zeros(5), np.zeros(5, int), "2D array"),
        (np.zeros((5, 3, 2)), np.zeros(5, int), "dim 3"),
        (np.zeros((5, 3)), np.zeros(4, int), "inconsistent numbers of samples"),
        (np.zeros((5, 3)), [0, 1, 2, 3, 0], r"outside \[0, 3\).*\[3\]"),
        (np.zeros((5, 3)), [255] * 5, "Every pixel has the ignore index"),
    ],
)
@pytest.mark.parametrize("estimator", [TemperatureScaling(), _cal()])
def test_bad_input_is_named(estimator, X, y, match):
    with pytest.raises(ValueError, match=match):
        clone(estimator).fit(X, y)


@pytest.mark.parametrize("estimator", [TemperatureScaling(), _cal()])
def test_class_count_at_predict_must_match_fit(estimator, logits_data):
    X, y = logits_data
    fitted = clone(estimator).fit(X, y)
    with pytest.raises(ValueError, match="expecting 4 features"):
        fitted.predict_proba(X[:, :3])


def test_classifier_without_predict_proba():
    X, y = make_logits(n=200)
    with pytest.raises(ValueError, match="predict_proba"):
        SelectiveScalingCalibrator(LinearSVC()).fit(X, y)


@pytest.mark.parametrize("all_correct", [True, False])
def test_single_correctness_class(all_correct):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    y = X.argmax(1) if all_correct else (X.argmax(1) + 1) % 3
    with pytest.raises(ValueError, match="correct" if all_correct else "mispredicted"):
        _cal().fit(X, y)
    cal = _cal(on_single_class="constant", t1=1.0, t2=7.0).fit(X, y)
    expected_T = 1.0 if all_correct else 7.0
    np.testing.assert_allclose(cal.predict_proba(X), softmax(X / expected_T, axis=1), rtol=1e-5)


def test_groups_length_must_match():
    X, y = make_logits(n=100)
    with pytest.raises(ValueError, match="groups has 99 entries"):
        _cal().fit(X, y, groups=np.zeros(99))


def test_loading_under_other_versions_warns(logits_data):
    import pickle

    X, y = logits_data
    ts = TemperatureScaling().fit(X, y)
    state = ts.__getstate__()
    assert state["_sksegcal_versions"]["sksegcal"]
    state["_sksegcal_versions"] = {**state["_sksegcal_versions"], "sksegcal": "0.0.1"}
    fresh = TemperatureScaling.__new__(TemperatureScaling)
    with pytest.warns(UserWarning, match=r"sksegcal 0.0.1 -> "):
        fresh.__setstate__(state)
    np.testing.assert_array_equal(fresh.predict_proba(X), ts.predict_proba(X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(ts))  # same versions: silent


def test_grid_search_with_calibration_scorers(segmentation_data):
    from sksegcal.metrics import ece_scorer, expected_calibration_error, get_scorer

    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits, labels)
    cv = GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=0)
    grid = {"t2": [1.5, 4.0, 1e10]}
    search = GridSearchCV(_cal(), grid, cv=cv, scoring={"ece": ece_scorer,
                                                        "nll": get_scorer("nll")},
                          refit="ece").fit(X, y, groups=groups)
    train, test = next(cv.split(X, y, groups))
    ece = {t2: expected_calibration_error(y[test], _cal(t2=t2).fit(X[train], y[train])
                                          .predict_proba(X[test]))
           for t2 in grid["t2"]}
    assert search.best_params_["t2"] == min(ece, key=ece.get)
    np.testing.assert_allclose(-search.cv_results_["mean_test_ece"],
                               [ece[t] for t in grid["t2"]], rtol=1e-6)


def test_empty_t2_group_falls_back_to_t1():
    from sklearn.dummy import DummyClassifier

    X, y = make_logits(n=2000, scale=4.0, noise=0.3, seed=0)  # mostly correct
    cal = SelectiveScalingCalibrator(DummyClassifier(strategy="prior"), t1="auto",
                                     threshold=0.5, mode="hard", random_state=0)
    with pytest.warns(UserWarning, match="No out-of-fold pixel falls in the t2 group"):
        cal.fit(X, y)
    assert cal.t2_ == cal.t1_
    np.testing.assert_allclose(cal.predict_proba(X), softmax(X / cal.t1_, axis=1), rtol=1e-5)


# -------------------------------------------------------------------- the TS guard
class _NoSkill(LogisticRegression):
    """A detector whose P(correct) is noise, unrelated to the pixel: no skill at all."""

    def predict_proba(self, X):
        p = np.random.default_rng(len(X)).uniform(0.2, 0.8, len(X))
        return np.column_stack([1 - p, p])


def test_guard_falls_back_to_ts_for_a_detector_without_skill():
    X, y = make_logits(n=12_000, seed=2)
    groups = np.repeat(np.arange(30), 400)
    cal = SelectiveScalingCalibrator(_NoSkill(), guard="ts", random_state=0)
    cal.fit(X, y, groups=groups)
    assert cal.guard_choice_ == "ts"
    scores = cal.guard_scores_
    assert scores["by"] == "image" and scores["n_folds"] == 5 and scores["n_units"] == 30
    # no evidence over the 30 images: at most a noise-sized mean gain, far from significant
    assert scores["t_statistic"] < 1.0 and abs(scores["mean_improvement"]) < 1e-4
    assert cal.t1_ == cal.t2_ == scores["ts_temperature_all_rows"]
    np.testing.assert_allclose(cal.predict_proba(X), softmax(X / cal.t1_, axis=1),
                               rtol=1e-5, atol=1e-7)
    assert "kept temperature scaling" in cal.summary()
    # without the guard the same fit keeps its (over-fitted) selective temperatures
    raw = SelectiveScalingCalibrator(_NoSkill(), random_state=0, guard=None)
    raw.fit(X, y, groups=groups)
    assert raw.guard_choice_ is None and raw.t1_ != raw.t2_
    assert "guard: did not run (guard=None)" in raw.summary()


def test_shrink_guard_keeps_ts_for_a_detector_without_skill():
    X, y = make_logits(n=12_000, seed=2)
    groups = np.repeat(np.arange(30), 400)
    cal = SelectiveScalingCalibrator(_NoSkill(), random_state=0).fit(X, y, groups=groups)
    scores = cal.guard_scores_
    # the least-NLL blend keeps some of the noise; within one standard error of it, none
    assert scores["shrinkage_least_nll"] > 0.0 and scores["shrinkage"] == 0.0
    assert cal.guard_choice_ == "ts" and cal.t1_ == cal.t2_ == scores["ts_temperature"]
    np.testing.assert_allclose(cal.predict_proba(X), softmax(X / cal.t1_, axis=1),
                               rtol=1e-5, atol=1e-7)
    assert "lambda = 0 " in cal.summary()


@pytest.mark.parametrize("guard", ["shrink", "ts"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_guard_keeps_selective_scaling_where_it_wins(mode, guard):
    X, y, groups = two_populations()
    cal = _cal(mode=mode, guard=guard).fit(X, y, groups=groups)
    scores = cal.guard_scores_
    if guard == "ts":
        assert cal.guard_choice_ == "selective"
        assert "kept selective scaling" in cal.summary()
    else:
        # most of the gain survives the one-standard-error shrinkage
        assert cal.guard_choice_ in ("selective", "shrunk") and scores["shrinkage"] > 0.5
        assert scores["mean_improvement_shrunk"] > 0.5 * scores["mean_improvement"]
    # selective scaling is better on (nearly) every calibration image, out of fold
    assert scores["n_units"] == 30 and scores["wins"] >= 28
    assert cal.t2_ > 2 * cal.t1_
    # and it is better than TS on new images
    Xt, yt, _ = two_populations(seed=1)
    assert cal.score(Xt, yt) > TemperatureScaling().fit(X, y).score(Xt, yt) + 0.01


def test_guard_by_rows_without_groups_and_not_with_fixed_temperatures():
    X, y, _ = two_populations(n=6000)
    cal = _cal().fit(X, y)
    assert cal.guard_scores_["by"] == "rows" and cal.guard_choice_ in ("selective", "shrunk")
    fixed = _cal(t2=4.0).fit(X, y)
    assert fixed.guard_choice_ is None and fixed.t2_ == 4.0


def test_guard_rule():
    from sksegcal.selective import _guard_keeps

    # one paired improvement per calibration image; one-sided t-test at 5%
    assert _guard_keeps(np.array([0.01, 0.02, -0.001, 0.03, 0.01]))
    assert not _guard_keeps(np.array([0.5, -0.01, -0.01, -0.01, -0.01]))  # one lucky image
    assert not _guard_keeps(np.array([0.001, 0.001, 0.001, -0.01, -0.01]))  # mean < 0
    # t = 0.21 over 5 images: not evidence
    assert not _guard_keeps(1e-4 * np.array([10.56, 17.86, 11.87, -2.71, -28.81]))
    # t = 2.65 > t_0.95(4) = 2.13
    assert _guard_keeps(1e-4 * np.array([5.57, -1.6, 4.29, 3.82, 4.86]))
    # t = 1.9 over 20 images: t_0.95(19) = 1.73
    gains = np.r_[np.full(10, 2.0), np.full(10, -0.9)] * 1e-4
    assert _guard_keeps(gains) == (gains.mean() / (gains.std(ddof=1) / np.sqrt(20)) >= 1.7291)
    assert _guard_keeps(np.full(5, 1e-4)) and not _guard_keeps(np.full(5, -1e-4))
    assert not _guard_keeps(np.array([1e-3]))  # one image: no test


def test_guard_t_statistic_is_scipys_paired_test():
    from scipy.stats import ttest_1samp

    from sksegcal.selective import _guard_keeps, _guard_t_statistic

    rng = np.random.default_rng(0)
    checked = 0
    for size in (5, 12, 30):
        for _ in range(20):
            imp = rng.normal(0.0005, 0.002, size=size)
            want = ttest_1samp(imp, 0.0, alternative="greater")
            assert _guard_t_statistic(imp) == pytest.approx(want.statistic, rel=1e-12)
            if imp.mean() > 0:  # the rule's other condition holds
                assert _guard_keeps(imp) == (want.pvalue <= 0.05)
                checked += 1
    assert checked >= 20


def test_guard_fallback_is_the_temperature_scaling_of_all_fit_rows():
    """Once the guard picks TS, the temperature is TS fitted on every fit row."""
    from sksegcal import TemperatureScaling

    X, y = make_logits(n=6000, n_classes=4, seed=5)
    groups = np.repeat(np.arange(30), 200)
    noise = SelectiveScalingCalibrator(
        _NoSkill(), guard="ts", random_state=0, max_fit_pixels=10**6
    ).fit(X, y, groups=groups)
    assert noise.guard_choice_ == "ts"
    ts = TemperatureScaling().fit(X, y)
    assert noise.t1_ == noise.t2_
    np.testing.assert_allclose(noise.t1_, ts.temperature_, rtol=1e-6)
    assert noise.guard_scores_["ts_temperature_all_rows"] == pytest.approx(noise.t1_)
    np.testing.assert_allclose(noise.predict_proba(X), ts.predict_proba(X), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------- spatial context
def _boundary_error_maps(n=20, c=4, size=24, seed=0):
    """Blocky label maps whose logits are noisy: the errors sit near region boundaries."""
    from scipy.ndimage import uniform_filter

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.repeat(rng.integers(0, c, (n, size // 4, size // 4)), 4, 1), 4, 2)
    onehot = np.moveaxis(np.eye(c)[labels], -1, 1).astype(np.float64)
    # smoothing blurs the evidence across boundaries: interiors stay confident and right
    evidence = uniform_filter(onehot, size=(1, 1, 5, 5))
    logits = 6.0 * evidence + 0.8 * rng.normal(size=onehot.shape)
    return logits.astype(np.float32), labels


def test_spatial_context_reaches_the_detector_and_only_it():
    from sksegcal.context import n_context_features
    from sksegcal.pixels import flatten_segmentation

    logits, labels = _boundary_error_maps()
    X, y, groups = flatten_segmentation(logits, labels, context="spatial")
    X0, y0, _ = flatten_segmentation(logits, labels)
    c = logits.shape[1]
    assert X.shape[1] == c + n_context_features()
    kw = dict(classifier=LogisticRegression(max_iter=1000), random_state=0, guard=None)
    spatial = SelectiveScalingCalibrator(context="spatial", **kw).fit(X, y, groups=groups)
    plain = SelectiveScalingCalibrator(**kw).fit(X0, y0, groups=groups)
    # the context carries where the errors are: the detector finds them better with it
    assert spatial.detection_auroc_ > plain.detection_auroc_ + 0.02
    assert spatial.n_features_in_ == X.shape[1]
    np.testing.assert_array_equal(spatial.classes_, np.arange(c))
    p = spatial.predict_proba(X)
    assert p.shape == (len(X), c)
    np.testing.assert_array_equal(spatial.predict(X), X0.argmax(1))
    np.testing.assert_array_equal(p.argmax(1), spatial.predict(X))
    # the temperatures scale the logit columns only: softmax(beta * z), beta from the detector
    beta = spatial._row_inverse_temperatures(X[:, :c], X[:, c:])
    np.testing.assert_allclose(p, softmax(beta[:, None] * X[:, :c], axis=1), rtol=1e-5,
                               atol=1e-6)
    assert spatial.score(X, y) == pytest.approx(
        np.mean(np.log(p[np.arange(len(y)), y])), rel=1e-5)  # the negative NLL
    # without the context columns there is no per-row shortcut (the store's fast path)
    assert spatial._row_inverse_temperatures(X[:, :c]) is None
    assert spatial._softmax_temperatures(X) is None


def test_spatial_context_input_errors_and_round_trips(tmp_path):
    import joblib
    from sklearn.model_selection import GridSearchCV, GroupKFold

    from sksegcal.pixels import flatten_segmentation

    logits, labels = _boundary_error_maps(n=12)
    X, y, groups = flatten_segmentation(logits, labels, context="spatial")
    X0, _, _ = flatten_segmentation(logits, labels)
    cal = SelectiveScalingCalibrator(LogisticRegression(max_iter=500), context="spatial",
                                     random_state=0)
    with pytest.raises(ValueError, match="context"):
        cal.fit(X[:, :7], y)  # 7 columns, 6 of them context: one class column left
    cal.fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="features"):
        cal.predict_proba(X0)  # the logits alone, without the context columns
    with pytest.raises(ValueError, match="context"):
        SelectiveScalingCalibrator(context="spatil").fit(X, y)
    joblib.dump(cal, tmp_path / "cal.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "cal.joblib").predict_proba(X),
                                  cal.predict_proba(X))
    search = GridSearchCV(cal, {"t2": [2.0, "auto"]}, cv=GroupKFold(n_splits=2))
    search.fit(X, y, groups=groups)
    assert search.best_estimator_.predict_proba(X).shape == (len(X), logits.shape[1])


# ------------------------------------------------------------- the default detector
def test_default_detector_is_a_standardised_logistic_regression(logits_data):
    from sklearn.pipeline import Pipeline

    from sksegcal.selective import default_detector

    X, y = logits_data
    cal = SelectiveScalingCalibrator(random_state=0).fit(X, y)
    assert isinstance(cal.classifier_, Pipeline)
    steps = [type(step).__name__ for _, step in cal.classifier_.steps]
    assert steps == ["StandardScaler", "LogisticRegression"]
    assert cal.classifier_[-1].max_iter == 500
    # the same as passing it explicitly
    explicit = SelectiveScalingCalibrator(default_detector(), random_state=0).fit(X, y)
    np.testing.assert_array_equal(cal.predict_proba(X), explicit.predict_proba(X))
    # and a detector with skill: it ranks the mispredicted pixels low
    correct = X.argmax(1) == y
    assert cal.detection_auroc_ > 0.65  # on noise-only errors (make_logits): a weak signal
    assert cal.predict_correctness(X)[~correct].mean() < cal.predict_correctness(X)[correct].mean()
    assert not cal.__sklearn_tags__().non_deterministic
