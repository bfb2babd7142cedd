"""The paper's baselines, each against an independent reference."""

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression

from conftest import make_logits
from sksegcal import (
    DirichletScaling,
    EnsembleTemperatureScaling,
    MetaCalScaling,
    TemperatureScaling,
    VectorScaling,
)
from sksegcal.features import log_softmax


def _torch_loss_and_grad(theta, X, y, kind, l2=(0.0, 0.0)):
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    x = torch.tensor(X, dtype=torch.float64)
    c = X.shape[1]
    if kind == "vector":
        z = x * t[:c] + t[c:]
    else:
        W, b = t[: c * c].reshape(c, c), t[c * c :]
        z = torch.log_softmax(x, dim=1) @ W.T + b
        off = W - torch.diag(torch.diag(W))
    loss = torch.nn.functional.cross_entropy(z, torch.tensor(y))
    if kind == "dirichlet":
        loss = loss + l2[0] * (off**2).sum() / (c * (c - 1)) + l2[1] * (b**2).sum() / c
    loss.backward()
    return loss.item(), t.grad.numpy()


@pytest.mark.parametrize("kind", ["vector", "dirichlet"])
def test_loss_and_gradient_match_autograd(kind):
    X, y = make_logits(n=500, n_classes=4, seed=1, dtype=np.float64)
    rng = np.random.default_rng(0)
    if kind == "vector":
        est = VectorScaling(chunk_size=37)
        theta = rng.normal(size=8)
        l2 = (0.0, 0.0)
    else:
        est = DirichletScaling(l2_offdiag=0.3, l2_intercept=0.2, chunk_size=37)
        theta = rng.normal(size=20)
        l2 = (0.3, 0.2)
    loss, grad = est._loss_and_grad(theta, X, y, None, float(len(y)))
    ref_loss, ref_grad = _torch_loss_and_grad(theta, X, y, kind, l2)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_dirichlet_without_penalty_is_multinomial_regression_on_log_probs():
    X, y = make_logits(n=4000, n_classes=3, seed=2, dtype=np.float64)
    ours = DirichletScaling(l2_offdiag=0.0, l2_intercept=0.0, max_iter=1000).fit(X, y)
    ref = LogisticRegression(C=np.inf, max_iter=5000, tol=1e-10).fit(log_softmax(X), y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(log_softmax(X)),
                               atol=2e-4)


def test_vector_scaling_reduces_to_temperature_scaling_shape():
    X, y = make_logits(n=6000, n_classes=4, seed=3)
    vs = VectorScaling().fit(X, y)
    ts = TemperatureScaling().fit(X, y)
    # symmetric synthetic classes: per-class weights close to the single 1/T
    np.testing.assert_allclose(vs.coef_, 1 / ts.temperature_, rtol=0.1)
    assert vs.score(X, y) >= ts.score(X, y) - 1e-6  # more parameters, fit data


def test_ensemble_temperature_scaling():
    X, y = make_logits(n=5000, seed=4)
    ets = EnsembleTemperatureScaling().fit(X, y)
    ts = TemperatureScaling().fit(X, y)
    assert ets.temperature_ == pytest.approx(ts.temperature_)
    assert ets.weights_.sum() == pytest.approx(1) and (ets.weights_ >= 0).all()
    assert ets.score(X, y) >= ts.score(X, y) - 1e-6  # TS is the weights (1, 0, 0)
    w = ets.weights_
    expected = (w[0] * softmax(X / ets.temperature_, axis=1) + w[1] * softmax(X, axis=1)
                + w[2] / X.shape[1])
    np.testing.assert_allclose(ets.predict_proba(X), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ets.predict(X), X.argmax(1))


def test_metacal_rejects_high_entropy_pixels():
    X, y = make_logits(n=5000, seed=5)
    cal = MetaCalScaling(rejection_rate=0.1).fit(X, y)
    rejected = cal.rejected(X)
    assert rejected.mean() == pytest.approx(0.1, abs=0.002)
    proba = cal.predict_proba(X)
    np.testing.assert_allclose(proba[rejected], 0.25, atol=1e-6)
    np.testing.assert_allclose(proba[~rejected],
                               softmax(X[~rejected] / cal.t1_, axis=1), rtol=1e-5)
    auto = MetaCalScaling(rejection_rate=0.1, t2="auto").fit(X, y)
    assert 1 < auto.t2_ < 1e10
    np.testing.assert_array_equal(auto.predict(X), X.argmax(1))
