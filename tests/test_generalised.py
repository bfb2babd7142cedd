"""The generalised selective temperature beta(x) = softplus(w . phi(x) + b).

Checked against independent references: an objective written with scipy's log_softmax and
differentiated by torch (autograd) and minimised by scipy, temperature scaling, and finite
differences of the streamed gradient and Hessian.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import approx_fprime, minimize
from scipy.special import log_softmax, softmax
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression

from conftest import make_logits, two_populations, uniform_context
from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
from sksegcal.calibrators._selective import _GENERALISED_L2
from sksegcal.calibrators._solver import (
    fit_softplus_temperature,
    softplus_inverse,
    softplus_nll,
    standardisation,
)


def _problem(n=3000, c=4, k=3, seed=0):
    """Logits whose over-confidence grows with input 0; inputs 1.. are noise."""
    X, y = make_logits(n, c, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    phi = rng.normal(size=(n, k))
    X = X * (1.0 + 0.8 * (phi[:, :1] > 0))
    w = rng.uniform(0.5, 1.5, n)
    return X, y, phi, w


def _torch_objective(Z, y, phi, w, l2):
    """The same objective, written independently: scipy-free torch, autograd for the gradient."""
    Zt, Pt = torch.tensor(Z), torch.tensor(phi)
    yt, wt = torch.tensor(y), torch.tensor(w / w.sum())

    def f(theta):
        t = torch.tensor(theta, requires_grad=True)
        beta = torch.nn.functional.softplus(Pt @ t[:-1] + t[-1])
        lp = torch.log_softmax(beta[:, None] * Zt, dim=1)
        loss = -(wt * lp[torch.arange(len(yt)), yt]).sum() + 0.5 * l2 * (t[:-1] ** 2).sum()
        loss.backward()
        return loss.item(), t.grad.numpy().copy()

    return f


def test_fit_matches_scipy_on_the_same_objective():
    Z, y, phi, w = _problem()
    l2 = 1e-3
    ts = TemperatureScaling().fit(Z, y, sample_weight=w)
    theta0 = np.r_[np.zeros(phi.shape[1]), softplus_inverse(1.0 / ts.temperature_)]
    fit = fit_softplus_temperature(
        lambda t, h: softplus_nll(t, Z, y, phi, sample_weight=w, l2=l2, hessian=h, chunk_size=512),
        theta0,
    )
    ref = minimize(
        _torch_objective(Z, y, phi, w, l2),
        theta0,
        jac=True,
        method="BFGS",
        options={"gtol": 1e-11, "maxiter": 1000},
    )
    assert fit.converged and fit.n_iter < 20
    np.testing.assert_allclose(fit.theta, ref.x, atol=1e-6)
    assert fit.loss == pytest.approx(ref.fun, rel=1e-12, abs=1e-12)
    # the signal input got the weight, the noise inputs almost none
    assert fit.theta[0] < -0.1 and np.abs(fit.theta[1:-1]).max() < 0.05
    # L-BFGS reaches the same point, in more passes
    slow = fit_softplus_temperature(
        lambda t, h: softplus_nll(t, Z, y, phi, sample_weight=w, l2=l2, hessian=h),
        theta0,
        method="lbfgs",
        tol=1e-10,
        max_iter=500,
    )
    np.testing.assert_allclose(slow.theta, ref.x, atol=1e-5)


def test_gradient_and_hessian_match_finite_differences():
    Z, y, phi, w = _problem(n=400, seed=3)
    theta = np.array([0.3, -0.2, 0.1, 0.4])
    f, g, H = softplus_nll(theta, Z, y, phi, sample_weight=w, l2=0.1, hessian=True, chunk_size=64)
    ref_f, ref_g = _torch_objective(Z, y, phi, w, 0.1)(theta)
    assert f == pytest.approx(ref_f, rel=1e-12)
    np.testing.assert_allclose(g, ref_g, rtol=1e-9, atol=1e-12)
    num_h = np.array(
        [
            approx_fprime(
                theta,
                lambda t, j=j: softplus_nll(t, Z, y, phi, sample_weight=w, l2=0.1)[1][j],
                1e-6,
            )
            for j in range(len(theta))
        ]
    )
    np.testing.assert_allclose(H, num_h, rtol=1e-4, atol=1e-6)


def test_constant_inputs_reduce_to_temperature_scaling():
    X, y = make_logits(6000, 5, seed=1, dtype=np.float64)
    raw = np.column_stack([np.full(len(y), 0.7), np.full(len(y), -3.0)])
    weights = np.ones(len(y))
    mean, scale, constant = standardisation(lambda p: raw[p], len(y), 2, weights, 1000)
    assert constant.all() and (scale == 1).all()
    np.testing.assert_allclose(mean, [0.7, -3.0])
    phi = (raw - mean) / scale
    fit = fit_softplus_temperature(
        lambda t, h: softplus_nll(t, X, y, phi, l2=_GENERALISED_L2, hessian=h),
        np.array([0.3, -0.1, 0.0]),
        constant=constant,
    )
    ts = TemperatureScaling().fit(X, y)
    np.testing.assert_array_equal(fit.theta[:-1], 0.0)
    beta = np.logaddexp(0.0, fit.theta[-1])
    assert beta == pytest.approx(1.0 / ts.temperature_, rel=1e-7)


def test_standardisation_is_the_weighted_mean_and_deviation():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(5000, 3)) * [1.0, 1e3, 1e-3] + [0.0, 1e4, -5.0]
    w = rng.uniform(0, 2, 5000)
    mean, scale, constant = standardisation(lambda p: u[p], 5000, 3, w, 777)
    np.testing.assert_allclose(mean, np.average(u, axis=0, weights=w), rtol=1e-10)
    np.testing.assert_allclose(
        scale, np.sqrt(np.cov(u.T, aweights=w, bias=True).diagonal()), rtol=1e-6
    )
    assert not constant.any()


# ------------------------------------------------------------------ the estimator
def _fixed_scores(monkeypatch, detector):
    """The out-of-fold P(correct) of every fit row is ``detector``'s (known to the test)."""

    def scores(self, features, target, weight, folds, seed):
        return detector.predict_proba(features)[:, 1]

    monkeypatch.setattr(SelectiveScalingCalibrator, "_out_of_fold_p_correct", scores)


def _reference_inputs(detector, X):
    """P(correct), max log-probability, entropy, margin: computed here, with scipy."""
    lp = log_softmax(X, axis=1)
    top = -np.sort(-lp, axis=1)
    k = min(5, X.shape[1])
    features = np.column_stack(
        [top[:, :k], -(np.exp(lp) * lp).sum(1), np.exp(top[:, 0]) - np.exp(top[:, 1])]
    )
    p = detector.predict_proba(features)[:, 1]
    return np.column_stack([p, top[:, 0], features[:, k], features[:, k + 1]])


def test_estimator_fit_is_the_minimum_of_the_out_of_fold_nll(monkeypatch):
    X, y = make_logits(4000, 4, seed=7, dtype=np.float64)
    X[2000:3000] *= 2.5  # a visibly over-confident population
    order = np.random.default_rng(0).permutation(len(y))
    X, y = X[order], y[order]
    detector = SelectiveScalingCalibrator(
        LogisticRegression(), t1=1.0, t2=2.0, random_state=0
    ).fit(X[:2000], y[:2000]).classifier_
    _fixed_scores(monkeypatch, detector)
    cal = SelectiveScalingCalibrator(
        LogisticRegression(), mode="generalised", guard=None, max_fit_pixels=10**6, random_state=0
    ).fit(X, y)
    assert cal.temperature_inputs_ == ("p_correct", "max_log_proba", "entropy", "margin")
    # every row is a temperature row (max_fit_pixels above n), with its out-of-fold score
    held = slice(None)
    u = _reference_inputs(detector, X[held])
    mean, std = u.mean(0), u.std(0)
    np.testing.assert_allclose(cal.temperature_mean_, mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cal.temperature_scale_, std, rtol=1e-6)
    phi = (u - mean) / std
    theta = np.r_[cal.temperature_coef_, cal.temperature_intercept_]
    ref = minimize(
        _torch_objective(X[held], y[held], phi, np.ones(len(phi)), _GENERALISED_L2),
        theta + 0.05,
        jac=True,
        method="BFGS",
        options={"gtol": 1e-10},
    )
    assert ref.nit < 200
    np.testing.assert_allclose(theta, ref.x, atol=1e-6)
    # and predictions use that beta, with the final detector's P(correct): softmax(beta z)
    u = _reference_inputs(cal.classifier_, X[held])
    beta = np.logaddexp(0.0, ((u - mean) / std) @ theta[:-1] + theta[-1])
    np.testing.assert_allclose(cal.temperatures(X[held]), 1.0 / beta, rtol=1e-6)
    np.testing.assert_allclose(
        cal.predict_proba(X[held]), softmax(beta[:, None] * X[held], 1), rtol=1e-6, atol=1e-12
    )
    assert cal.converged_ and cal.n_iter_ > 0


def test_generalised_beats_ts_and_the_guard_keeps_it():
    X, y, groups = two_populations()
    cal = SelectiveScalingCalibrator(LogisticRegression(), mode="generalised", random_state=0).fit(
        X, y, groups=groups
    )
    assert cal.guard_choice_ == "selective"
    scores = cal.guard_scores_
    assert scores["by"] == "image" and scores["n_units"] == 30 and scores["n_folds"] == 5
    assert scores["wins"] == 30  # every calibration image, out of fold
    assert cal.t2_ > 10 * cal.t1_  # flagged pixels get flatter probabilities
    Xt, yt, _ = two_populations(seed=1)
    assert cal.score(Xt, yt) > TemperatureScaling().fit(X, y).score(Xt, yt) + 0.05
    assert "mode=generalised" in cal.summary() and "p_correct" in cal.summary()


def _ts_world(n, seed):
    """Labels drawn from softmax(z / 2): temperature scaling is the true model."""
    rng = np.random.default_rng(seed)
    z = 6.0 * rng.normal(size=(n, 4))
    p = softmax(z / 2.0, axis=1)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z.astype(np.float32), y


def test_guard_falls_back_to_ts_where_the_generalised_form_can_only_overfit():
    X, y = _ts_world(3000, seed=0)
    groups = np.repeat(np.arange(30), 100)
    cal = SelectiveScalingCalibrator(LogisticRegression(), mode="generalised", random_state=0).fit(
        X, y, groups=groups
    )
    raw = SelectiveScalingCalibrator(
        LogisticRegression(), mode="generalised", guard=None, random_state=0
    ).fit(X, y, groups=groups)
    assert cal.guard_choice_ == "ts"
    scores = cal.guard_scores_
    # the images do not support it: no significant mean gain over them
    from scipy.stats import t as student_t

    critical = student_t.ppf(0.95, scores["n_units"] - 1)
    assert scores["mean_improvement"] <= 0 or scores["t_statistic"] < critical
    assert np.abs(raw.temperature_coef_).max() > 0  # without the guard it did move off TS
    np.testing.assert_array_equal(cal.temperature_coef_, 0.0)
    ts = TemperatureScaling().fit(X, y)
    assert cal.t1_ == cal.t2_ == pytest.approx(ts.temperature_, rel=1e-6)
    np.testing.assert_allclose(cal.temperatures(X), ts.temperature_, rtol=1e-6)
    np.testing.assert_allclose(cal.predict_proba(X), ts.predict_proba(X), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(
        cal.guard_scores_["replaced"]["theta"],
        np.r_[raw.temperature_coef_, raw.temperature_intercept_],
    )


def test_affine_change_of_a_context_input_leaves_the_temperatures_unchanged():
    """Standardisation: an input in other units (x 1e4, + 1e4) gives the same beta(x).

    The input is the distance column, whose range ([0, inf)) holds both units; the other
    context columns are uniform noise in their ranges.
    """
    from sksegcal.context import CONTEXT_FEATURES, n_context_features

    k = n_context_features()
    X, y = make_logits(6000, 4, seed=2)
    rng = np.random.default_rng(3)
    signal = rng.random(len(y))
    X = X * (1.0 + 2.0 * signal[:, None]).astype(np.float32)
    ctx = uniform_context(len(y), 4, seed=4).astype(np.float64)
    distance = CONTEXT_FEATURES.index("boundary_distance")
    ctx[:, distance] = 1.0 + 15.0 * signal  # interior pixels (disagree_3x3 = 0): from 1 to 16
    moved = ctx.copy()
    moved[:, distance] = 1e4 * moved[:, distance] + 1e4

    def fitted(context):
        A = np.hstack([X.astype(np.float64), context])
        cal = SelectiveScalingCalibrator(
            DummyClassifier(), mode="generalised", guard=None, context="spatial", random_state=0
        ).fit(A, y)
        return cal, cal.temperatures(A)

    cal, t = fitted(ctx)
    assert len(cal.temperature_inputs_) == 4 + k
    _, t_moved = fitted(moved)
    assert np.ptp(t) > 0.3 * np.median(t)  # the context does move the temperature
    np.testing.assert_allclose(t_moved, t, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@settings(max_examples=30, deadline=None)
@given(
    X=arrays(
        np.float64,
        st.tuples(st.integers(12, 40), st.integers(2, 6)),
        elements=st.floats(-30, 30, width=32),
    ),
    intercept=st.sampled_from([None, -60.0, 30.0]),
)
def test_argmax_of_predict_proba_is_predict_in_float32(X, intercept):
    X = X.astype(np.float32)
    y = np.argmax(X, axis=1)
    y[::3] = (y[::3] + 1) % X.shape[1]
    cal = SelectiveScalingCalibrator(
        LogisticRegression(), mode="generalised", random_state=0, on_single_class="constant"
    ).fit(X, y)
    if intercept is not None:  # beta ~ 1e-26 (flat rows) or 30 (sharp rows)
        cal.temperature_coef_ = np.zeros_like(cal.temperature_coef_)
        cal.temperature_intercept_ = intercept
    pred = cal.predict(X)
    np.testing.assert_array_equal(cal.predict_proba(X).argmax(1), pred)
    np.testing.assert_array_equal(cal.predict_log_proba(X).argmax(1), pred)


def test_the_paper_features_and_weights_work_too():
    X, y, groups = two_populations(n=6000)
    w = np.random.default_rng(0).uniform(0.5, 1.5, len(y))
    cal = SelectiveScalingCalibrator(
        LogisticRegression(), mode="generalised", features="log_softmax", random_state=0
    )
    cal.fit(X, y, sample_weight=w, groups=groups)
    assert cal.guard_choice_ == "selective"
    proba = cal.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(proba.argmax(1), cal.predict(X))
