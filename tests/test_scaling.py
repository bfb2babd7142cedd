import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import log_loss

from conftest import make_logits
from sksegcal import TemperatureScaling


def _nll(Z, y, T):
    s = Z.astype(np.float64) / T
    return np.mean(logsumexp(s, axis=1) - s[np.arange(len(y)), y])


class _LogitPassThrough(ClassifierMixin, BaseEstimator):
    """A 'classifier' whose decision_function is its input: lets sklearn calibrate logits."""

    def fit(self, X, y):
        self.classes_ = np.arange(X.shape[1])
        return self

    def decision_function(self, X):
        return X

    def predict(self, X):
        return np.argmax(X, axis=1)


def test_agrees_with_sklearn_temperature_scaling():
    pytest.importorskip("sklearn", minversion="1.8")
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    X, y = make_logits(n=6000, n_classes=5, dtype=np.float64, seed=2)
    ours = TemperatureScaling().fit(X, y).temperature_
    frozen = FrozenEstimator(_LogitPassThrough().fit(X, y))
    cal = CalibratedClassifierCV(frozen, method="temperature").fit(X, y)
    theirs = 1.0 / float(cal.calibrated_classifiers_[0].calibrators[0].beta_)
    assert ours == pytest.approx(theirs, abs=1e-3)
    np.testing.assert_allclose(
        TemperatureScaling().fit(X, y).predict_proba(X), cal.predict_proba(X), atol=1e-4
    )


def test_temperature_is_the_nll_minimiser():
    X, y = make_logits(n=5000, seed=3)
    T = TemperatureScaling().fit(X, y).temperature_
    ref = minimize_scalar(lambda t: _nll(X, y, t), bounds=(0.05, 50), method="bounded",
                          options={"xatol": 1e-9}).x
    assert T == pytest.approx(ref, rel=1e-4)
    # under-confident logits get T < 1
    T_small = TemperatureScaling().fit(X / 20, y).temperature_
    assert T_small < 1


def test_predict_proba_is_softmax_of_scaled_logits_and_score_is_log_loss():
    X, y = make_logits(seed=4)
    ts = TemperatureScaling().fit(X, y)
    expected = softmax(X.astype(np.float64) / ts.temperature_, axis=1)
    np.testing.assert_allclose(ts.predict_proba(X), expected, rtol=1e-5, atol=1e-7)
    assert ts.score(X, y) == pytest.approx(-log_loss(y, expected, labels=range(4)), rel=1e-5)
    np.testing.assert_array_equal(ts.predict(X), X.argmax(axis=1))


def test_probability_input_gives_the_same_temperature():
    X, y = make_logits(seed=5, dtype=np.float64)
    T_logits = TemperatureScaling().fit(X, y).temperature_
    P = softmax(X, axis=1)
    ts = TemperatureScaling(input_type="probabilities").fit(P, y)
    assert ts.temperature_ == pytest.approx(T_logits, rel=1e-4)
    np.testing.assert_allclose(ts.predict_proba(P), softmax(X / T_logits, axis=1), atol=1e-4)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        TemperatureScaling(input_type="probabilities").fit(X, y)


def test_ignore_index_and_sample_weight():
    X, y = make_logits(seed=6)
    y_ign = y.copy()
    y_ign[::3] = 255
    T_ign = TemperatureScaling().fit(X, y_ign).temperature_
    T_sub = TemperatureScaling().fit(X[y_ign != 255], y[y_ign != 255]).temperature_
    assert T_ign == T_sub
    w = np.random.default_rng(0).integers(1, 4, size=len(y))
    T_w = TemperatureScaling().fit(X, y, sample_weight=w).temperature_
    T_rep = TemperatureScaling().fit(np.repeat(X, w, axis=0), np.repeat(y, w)).temperature_
    assert T_w == pytest.approx(T_rep, rel=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_and_chunking(dtype):
    X, y = make_logits(n=3000, seed=7)
    X = X.astype(dtype)
    a = TemperatureScaling(chunk_size=257).fit(X, y)
    b = TemperatureScaling(chunk_size=100_000).fit(X, y)
    assert a.temperature_ == pytest.approx(b.temperature_, rel=1e-5)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-5, atol=1e-7)
    assert a.predict_proba(X).dtype == (np.float64 if dtype == np.float64 else np.float32)


def test_bad_bounds():
    X, y = make_logits(n=100)
    with pytest.raises(ValueError, match="temperature_bounds"):
        TemperatureScaling(temperature_bounds=(2.0, 1.0)).fit(X, y)
