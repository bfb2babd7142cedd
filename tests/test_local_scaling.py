"""LocalTemperatureScaling: reduction to TS, a context signal, gradient, sklearn contracts."""

import io

import joblib
import numpy as np
import pytest
from scipy.optimize import approx_fprime
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks
from test_estimator_checks import _COMMON, _LOGITS

from conftest import make_logits, real_context_rows, uniform_context
from sksegcal import TemperatureScaling
from sksegcal.calibrators._solver import softplus_nll
from sksegcal.context import CONTEXT_FEATURES, n_context_features
from sksegcal.local_scaling import LocalTemperatureScaling
from sksegcal.pixels import flatten_segmentation

K = n_context_features()


# the informative column of _context_signal; the others are real context drawn at random
SIGNAL = CONTEXT_FEATURES.index("margin_mean_5x5")


def _context_signal(n=16000, seed=0):
    """Logits whose over-confidence grows with the margin column; the others carry nothing.

    The rows are real context rows drawn at random (in range and consistent, as the
    calibrator checks), with the margin column, which no relation ties to the others,
    replaced by a uniform draw in its range [0, 1] that scales the logits.
    """
    X, y = make_logits(n, 4, seed=seed)
    rng = np.random.default_rng(seed + 100)
    c = rng.random(n)
    Z = X * (1.0 + 3.0 * c[:, None]).astype(np.float32)
    ctx = real_context_rows(n, 4, seed=seed + 200).copy()
    ctx[:, SIGNAL] = c
    return np.hstack([Z, ctx]), y


def test_constant_context_reduces_to_ts():
    X, y = make_logits(8000, 4)
    A = np.hstack([X, np.repeat(real_context_rows(1, 4), len(y), axis=0)])
    lts = LocalTemperatureScaling(confidence_features=False).fit(A, y)
    ts = TemperatureScaling().fit(X, y)
    np.testing.assert_allclose(lts.temperatures(A), ts.temperature_, rtol=1e-4)
    np.testing.assert_array_equal(lts.temperature_coef_, 0.0)
    np.testing.assert_allclose(lts.predict_proba(A), ts.predict_proba(X), atol=1e-5)


def test_noise_context_stays_near_ts():
    X, y = make_logits(20000, 4, seed=3)
    A = np.hstack([X, uniform_context(len(y), 4, seed=0)])
    lts = LocalTemperatureScaling(confidence_features=False).fit(A, y)
    ts = TemperatureScaling().fit(X, y)
    t = lts.temperatures(A)
    assert abs(np.median(t) / ts.temperature_ - 1) < 0.01
    assert np.abs(lts.temperature_coef_).max() < 0.05


def test_beats_ts_when_overconfidence_depends_on_context():
    A, y = _context_signal()
    train, test = slice(0, 8000), slice(8000, None)
    C = A.shape[1] - K
    lts = LocalTemperatureScaling().fit(A[train], y[train])
    ts = TemperatureScaling().fit(A[train, :C], y[train])
    assert lts.converged_ and lts.n_iter_ > 0
    assert lts.score(A[test], y[test]) > ts.score(A[test, :C], y[test]) + 0.01
    # the learned beta falls with the informative column (larger scale -> larger temperature)
    coef = lts.temperature_coef_
    assert coef[SIGNAL] < 0 and abs(coef[SIGNAL]) > 5 * np.abs(np.delete(coef[:K], SIGNAL)).max()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_gradient_matches_finite_differences():
    A, y = _context_signal(600)
    lts = LocalTemperatureScaling(l2=0.1, chunk_size=128, max_iter=3).fit(A, y)
    w = np.linspace(0.5, 1.5, len(y))
    theta = np.r_[np.linspace(-0.3, 0.3, len(lts.temperature_coef_)), 0.2]

    A64 = A.astype(np.float64)
    C = A.shape[1] - K

    def loss(t, hessian=False):
        # the objective LocalTemperatureScaling minimises (the shared softplus-temperature NLL)
        return softplus_nll(
            t,
            A64[:, :C],
            y,
            lambda part: lts._model().standardise(lts._inputs(A64[part, :C], A64[part, C:])),
            sample_weight=w,
            l2=lts.l2,
            hessian=hessian,
            chunk_size=128,
        )

    grad = loss(theta)[1]

    def f(t):
        return loss(t)[0]

    np.testing.assert_allclose(grad, approx_fprime(theta, f, 1e-6), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_argmax_never_changes(dtype):
    A, y = _context_signal(3000)
    lts = LocalTemperatureScaling(temperature_bounds=(0.01, 1e4)).fit(A, y)
    C = A.shape[1] - K
    B = A.astype(dtype).copy()
    # near-ties a small beta would round away, and exact ties
    B[:100, 1] = B[:100, 0] + np.abs(B[:100, 0]) * np.finfo(dtype).eps * 2 + 1e-30
    B[100:200, 1] = B[100:200, 0]
    B[200:300, :C] *= 1e3
    lts.temperature_coef_ = lts.temperature_coef_.copy()
    lts.temperature_intercept_ = -30.0  # beta ~ 1e-13: everything leans on the caps
    proba = lts.predict_proba(B)
    assert proba.dtype == dtype and proba.shape == (len(B), C)
    np.testing.assert_array_equal(proba.argmax(axis=1), lts.predict(B))
    np.testing.assert_array_equal(lts.predict(B), B[:, :C].argmax(axis=1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(lts.temperatures(B) <= 1e4 * (1 + 1e-12))


def test_ignored_labels_and_sample_weight():
    A, y = _context_signal(4000)
    y_ign = y.copy()
    y_ign[:500] = 255
    a = LocalTemperatureScaling().fit(A, y_ign)
    b = LocalTemperatureScaling().fit(A[500:], y[500:])
    np.testing.assert_allclose(a.temperature_coef_, b.temperature_coef_, rtol=1e-6, atol=1e-9)
    w = np.ones(len(y))
    w[:500] = 0
    c = LocalTemperatureScaling().fit(A, y, sample_weight=w)
    np.testing.assert_allclose(c.temperature_coef_, b.temperature_coef_, rtol=1e-5, atol=1e-7)
    assert a.score(A, y_ign) == pytest.approx(b.score(A[500:], y[500:]))


def test_layout_errors():
    with pytest.raises(ValueError, match="context"):
        LocalTemperatureScaling().fit(np.zeros((10, K + 1)), np.zeros(10, int))
    A, y = _context_signal(500)
    with pytest.raises(ValueError, match="labels outside"):
        LocalTemperatureScaling().fit(A, np.full(len(y), 4))


def test_on_segmentation_maps(segmentation_data):
    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits, labels, context="spatial")
    lts = LocalTemperatureScaling().fit(X, y)
    assert lts.n_features_in_ == 4 + K and lts.classes_.tolist() == [0, 1, 2, 3]
    assert lts.temperature_inputs_[0] == "disagree_3x3"
    assert lts.predict_proba(X).shape == (len(y), 4)


def test_grid_search_pipeline_joblib(segmentation_data):
    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits, labels, context="spatial")
    search = GridSearchCV(
        make_pipeline(FunctionTransformer(), LocalTemperatureScaling()),
        {"localtemperaturescaling__l2": [1e-4, 1.0]},
        cv=GroupKFold(3),
    )
    search.fit(X, y, groups=groups)
    assert search.best_score_ < 0  # negative NLL
    buf = io.BytesIO()
    joblib.dump(search.best_estimator_, buf)
    buf.seek(0)
    loaded = joblib.load(buf)
    np.testing.assert_array_equal(loaded.predict_proba(X), search.best_estimator_.predict_proba(X))


# the estimator checks use 2-10 columns: context=None runs them on logits alone, exactly like
# the other calibrators (the context columns go through the same code as the confidence ones)
_LTS_FAILURES = {
    **_COMMON,
    **{
        f"check_classifiers_train(readonly_memmap=True{suffix})": _LOGITS
        for suffix in ("", ",X_dtype=float32")
    },
}


@parametrize_with_checks(
    [LocalTemperatureScaling(context=None)], expected_failed_checks=lambda e: _LTS_FAILURES
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
