"""The temperature fits: exact minima of the NLL, to a stated tolerance, or a warning."""

import warnings

import numpy as np
import pytest
from scipy.optimize import brentq, minimize, minimize_scalar
from scipy.special import expit, logsumexp, softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from conftest import make_logits
from sksegcal import (
    EnsembleTemperatureScaling,
    MetaCalScaling,
    SelectiveScalingCalibrator,
    TemperatureScaling,
)
from sksegcal.calibrators._solver import fit_inverse_temperatures, fit_temperature, nll_derivatives


def _overconfident(n=20_000, n_classes=10, seed=0):
    """Over-confident logits and a detector score p that knows something of correctness."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    Z = 6.0 * (np.eye(n_classes)[y] + 1.2 * rng.normal(size=(n, n_classes)))
    top2 = np.sort(Z, axis=1)[:, -2:]
    p = expit(0.5 * (top2[:, 1] - top2[:, 0] - 3.0) + 0.5 * rng.normal(size=n))
    return Z, y, p


def _nll(Z, y, beta, w=None):
    s = Z.astype(np.float64) * np.reshape(beta, (-1, 1))
    loss = logsumexp(s, axis=1) - s[np.arange(len(y)), y]
    return np.average(loss, weights=w)


def _dnll(Z, y, beta):
    """d/dbeta of the mean NLL at one inverse temperature: mean(E_q[z] - z_y), q = softmax."""
    q = softmax(Z.astype(np.float64) * beta, axis=1)
    return np.mean((q * Z).sum(axis=1) - Z[np.arange(len(y)), y])


def _root(Z, y):
    # the zero of the derivative: far more precise than minimising the flat NLL itself
    return brentq(lambda b: _dnll(Z, y, b), 1e-3, 1e3, xtol=1e-15, rtol=1e-15)


def _soft_nll(x, Z, y, p, w=None):
    return _nll(Z, y, x[0] * p + x[1] * (1 - p), w)


def _scipy_soft(Z, y, p, w=None):
    # an independent route: derivative-free simplex search on the direct NLL
    return minimize(_soft_nll, [0.5, 0.5], args=(Z, y, p, w), method="Nelder-Mead",
                    options={"xatol": 1e-12, "fatol": 1e-16, "maxiter": 5000}).x


def _solve(cal, Z, y, w, p):
    """The temperature model ``cal`` fits on out-of-fold scores ``p`` (as a dict)."""
    from sksegcal.calibrators import TwoTemperatures
    from sksegcal.calibrators._selective import _candidate_thresholds

    auto = cal.mode == "hard" and cal.threshold == "auto"
    thresholds = _candidate_thresholds(p) if auto else [cal._fixed_threshold()]
    model = TwoTemperatures.fit(Z, y, p, kind=cal.mode, t1=cal.t1, t2=cal.t2,
                                thresholds=thresholds, sample_weight=w,
                                bounds=cal.temperature_bounds, chunk_size=cal.chunk_size)
    return {"t1": model.t1, "t2": model.t2, "nll": model.nll, "fits": model.fits}


def _soft_calibrator(**kwargs):
    return SelectiveScalingCalibrator(LogisticRegression(), chunk_size=999, **kwargs)


# ------------------------------------------------------------------ derivatives
def test_gradient_and_hessian_match_finite_differences():
    Z, y, p = _overconfident(n=3000)
    basis = np.column_stack([p, 1 - p])
    w = np.random.default_rng(1).uniform(0.1, 2.0, len(y))
    x = np.array([0.2, 0.07])
    f, g, H = nll_derivatives(Z, y, x, basis=basis, sample_weight=w, chunk_size=123)
    assert f == pytest.approx(_soft_nll(x, Z, y, p, w), rel=1e-12)
    h = 1e-6
    for j in range(2):
        e = np.eye(2)[j] * h
        fd = (_soft_nll(x + e, Z, y, p, w) - _soft_nll(x - e, Z, y, p, w)) / (2 * h)
        assert g[j] == pytest.approx(fd, rel=1e-6)
        g_plus = nll_derivatives(Z, y, x + e, basis=basis, sample_weight=w)[1]
        g_minus = nll_derivatives(Z, y, x - e, basis=basis, sample_weight=w)[1]
        np.testing.assert_allclose(H[:, j], (g_plus - g_minus) / (2 * h), rtol=1e-5)


# ------------------------------------------------------------------ soft selective (2-D)
@pytest.mark.parametrize("weighted", [False, True])
def test_soft_fit_is_the_joint_nll_minimum(weighted):
    Z, y, p = _overconfident()
    w = np.random.default_rng(2).uniform(0.2, 3.0, len(y)) if weighted else None
    solved = _solve(_soft_calibrator(mode="soft"), Z, y, w, p)
    ours = np.array([1 / solved["t1"], 1 / solved["t2"]])
    ref = _scipy_soft(Z, y, p, w)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert solved["nll"] == pytest.approx(_soft_nll(ours, Z, y, p, w), rel=1e-12)
    # and no point of a fine grid around it is lower
    steps = np.linspace(-1e-3, 1e-3, 11)
    grid = [_soft_nll(ours + [da, db], Z, y, p, w) for da in steps for db in steps]
    assert _soft_nll(ours, Z, y, p, w) <= min(grid) + 1e-15
    fit = solved["fits"][0][1]
    assert fit.converged and fit.at_bound == [] and 2 <= fit.n_iter < 30


def test_ill_conditioned_soft_fit_leaving_a_bound():
    # a detector whose scores barely vary (p in [0.35, 0.53]) makes the two columns of the
    # problem nearly collinear; the Newton step then points out of the box at b ~ 1e-10 while
    # the NLL falls into it (an earlier projected Newton crawled there for 100 iterations)
    Z, y, _ = _overconfident(n=6000, seed=11)
    p = np.random.default_rng(3).uniform(0.35, 0.53, len(y))
    solved = _solve(_soft_calibrator(mode="soft"), Z, y, None, p)
    fit = solved["fits"][0][1]
    assert fit.converged and fit.n_iter < 20
    np.testing.assert_allclose([1 / solved["t1"], 1 / solved["t2"]], _scipy_soft(Z, y, p),
                               atol=1e-6)


def test_soft_fit_beats_coordinate_descent():
    # the three rounds of coordinate descent shipped before stopped far from the minimum
    Z, y, p = _overconfident(seed=3)
    ours = _solve(_soft_calibrator(mode="soft"), Z, y, None, p)
    a, b = 1.0, 1e-10
    for _ in range(3):
        b = minimize_scalar(lambda v, a=a: _soft_nll([a, v], Z, y, p), bounds=(1e-10, 100),
                            method="bounded").x
        a = minimize_scalar(lambda v, b=b: _soft_nll([v, b], Z, y, p), bounds=(1e-10, 100),
                            method="bounded").x
    assert ours["nll"] <= _soft_nll([a, b], Z, y, p) + 1e-12


@pytest.mark.parametrize("which", ["t1", "t2"])
def test_soft_fit_with_one_fixed_temperature(which):
    Z, y, p = _overconfident(n=8000, seed=4)
    fixed = {"t1": 2.0} if which == "t2" else {"t2": 5.0}
    solved = _solve(_soft_calibrator(mode="soft", **fixed), Z, y, None, p)
    if which == "t2":
        ref = minimize_scalar(lambda b: _soft_nll([0.5, b], Z, y, p), bounds=(1e-10, 100),
                              method="bounded", options={"xatol": 1e-12}).x
        assert solved["t1"] == 2.0
        assert 1 / solved["t2"] == pytest.approx(ref, abs=1e-7)
    else:
        ref = minimize_scalar(lambda a: _soft_nll([a, 0.2], Z, y, p), bounds=(1e-10, 100),
                              method="bounded", options={"xatol": 1e-12}).x
        assert solved["t2"] == 5.0
        assert 1 / solved["t1"] == pytest.approx(ref, abs=1e-7)


def test_end_to_end_soft_fit_solves_the_out_of_fold_problem(out_of_fold_scores):
    X, y = make_logits(n=8000, seed=8)
    seen = out_of_fold_scores
    cal = _soft_calibrator(random_state=0, guard=None).fit(X, y)
    assert cal.converged_ and cal.n_iter_ >= 2
    # optimality (KKT) on every fit row with its out-of-fold score: the gradient of the NLL
    # in (1/t1, 1/t2) vanishes at the fit
    p = seen["p"]
    x = np.array([1 / cal.t1_, 1 / cal.t2_])
    _, g, H = nll_derivatives(X, y, x, basis=np.column_stack([p, 1 - p]))
    # one Newton step from the fit moves it by a negligible amount (the fit stops where the
    # next step's decrease of the NLL is below its rounding)
    assert np.all(np.abs(np.linalg.solve(H, g)) <= 1e-7 * x)


# ------------------------------------------------------------------ hard mode (1-D groups)
def test_hard_groups_are_each_their_nll_minimum():
    Z, y, p = _overconfident(n=10_000, seed=5)
    cal = _soft_calibrator(mode="hard", threshold=0.4)
    solved = _solve(cal, Z, y, None, p)
    for mask, t in ((p >= 0.4, solved["t1"]), (p < 0.4, solved["t2"])):
        assert 1 / t == pytest.approx(_root(Z[mask], y[mask]), rel=1e-9)
    total = (_nll(Z, y, np.where(p >= 0.4, 1 / solved["t1"], 1 / solved["t2"])))
    assert solved["nll"] == pytest.approx(total, rel=1e-10)


def test_hard_auto_threshold_takes_the_lowest_nll_candidate():
    Z, y, p = _overconfident(n=6000, seed=6)
    cal = _soft_calibrator(mode="hard")
    best = _solve(cal, Z, y, None, p)
    from sksegcal.calibrators._selective import _candidate_thresholds

    for thr in _candidate_thresholds(p):
        other = _solve(_soft_calibrator(mode="hard", threshold=thr), Z, y, None, p)
        assert best["nll"] <= other["nll"] + 1e-12


# ------------------------------------------------------------------ 1-D: TS and friends
@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])
def test_temperature_is_the_exact_minimum(scale):
    Z, y, _ = _overconfident(n=8000, seed=7)
    Z = Z * scale
    T, fit = fit_temperature(Z, y, bounds=(0.01, 100))
    assert 1 / T == pytest.approx(_root(Z, y), rel=1e-9)
    assert fit.converged and fit.n_iter <= 12


def test_rows_mask_equals_subsetting_and_weights_equal_repeats():
    Z, y, _ = _overconfident(n=3000, seed=8)
    mask = np.random.default_rng(0).random(len(y)) < 0.3
    a, _ = fit_temperature(Z, y, rows=mask)
    b, _ = fit_temperature(Z[mask], y[mask])
    assert a == pytest.approx(b, rel=1e-12)
    reps = np.random.default_rng(1).integers(1, 4, len(y))
    c, _ = fit_temperature(Z, y, sample_weight=reps.astype(float))
    d, _ = fit_temperature(np.repeat(Z, reps, axis=0), np.repeat(y, reps))
    assert c == pytest.approx(d, rel=1e-10)


def test_uninformative_logits_warn_at_the_bound():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 5)) * 3
    y = rng.integers(0, 5, 3000)  # labels independent of the logits: T -> infinity
    with pytest.warns(ConvergenceWarning, match=r"upper end of its range \(100\)"):
        ts = TemperatureScaling().fit(X, y)
    assert ts.temperature_ == pytest.approx(100.0)
    assert ts.converged_
    with pytest.warns(ConvergenceWarning, match=r"upper end of its range \(100\)"):
        ets = EnsembleTemperatureScaling().fit(X, y)
    assert ets.temperature_ == pytest.approx(100.0)
    # the uniform term explains random labels best
    assert ets.weights_[2] > 0.9
    with pytest.warns(ConvergenceWarning, match="accepted pixels stopped at the upper end"):
        MetaCalScaling(rejection_rate=0.2).fit(X, y)


def test_interior_fits_are_silent():
    X, y = make_logits(n=4000, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TemperatureScaling().fit(X, y)
        EnsembleTemperatureScaling().fit(X, y)
        _soft_calibrator(random_state=0).fit(X, y, groups=np.arange(len(y)) // 200)


def test_sharp_bound_warns_with_the_lower_end():
    X, y = make_logits(n=3000, seed=2)
    X = X.astype(np.float64) / 1000.0  # far under-confident: T wants to be about 1/400
    with pytest.warns(ConvergenceWarning, match=r"lower end of its range \(0.01\)"):
        ts = TemperatureScaling().fit(X, y)
    assert ts.temperature_ == pytest.approx(0.01)


def test_non_convergence_warns():
    Z, y, _ = _overconfident(n=2000, seed=9)
    fit = fit_inverse_temperatures(Z, y, max_iter=1)
    assert not fit.converged
    from sksegcal.calibrators._solver import warn_fit

    with pytest.warns(ConvergenceWarning, match="did not converge in 1 Newton"):
        warn_fit(fit, ["T"], (0.01, 100), owner="X")


def test_ensemble_weights_are_the_exact_mixture_minimum():
    X, y = make_logits(n=5000, seed=3, dtype=np.float64)
    ets = EnsembleTemperatureScaling().fit(X, y)
    w = ets.weights_
    lp = ets.predict_log_proba(X)
    nll = -lp[np.arange(len(y)), y].mean()
    # no other point of the simplex near it is better (KKT on the simplex by sampling)
    rng = np.random.default_rng(0)
    for _ in range(200):
        other = np.clip(w + rng.normal(scale=1e-3, size=3), 0, None)
        other /= other.sum()
        probe = EnsembleTemperatureScaling().fit(X[:10], y[:10])
        probe.temperature_, probe.weights_ = ets.temperature_, other
        lp2 = probe.predict_log_proba(X)
        assert -lp2[np.arange(len(y)), y].mean() >= nll - 1e-12


def test_huge_float64_logits_are_fitted_on_a_rescaled_problem():
    Z, y, _ = _overconfident(n=2000, seed=10)
    T, _ = fit_temperature(Z, y, bounds=(0.01, 100))
    big = Z * 2.0**1000  # about 1e301: the variance of a row overflows float64
    T_big, fit = fit_temperature(big, y, bounds=(0.01 * 2.0**1000, 100 * 2.0**1000))
    assert fit.converged
    assert T_big / 2.0**1000 == pytest.approx(T, rel=1e-9)


def test_all_correct_group_stops_when_no_decrease_is_representable():
    # every pixel correct by a wide margin: the NLL falls towards 0 as beta grows, with a
    # gradient that underflows (1e-45); the fit must stop there as converged, not run to
    # max_iter and warn (a hard-mode group of the clean pixels does exactly this)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 3000)
    Z = 12.0 * np.eye(4)[y] + 0.3 * rng.normal(size=(3000, 4))
    fit = fit_inverse_temperatures(Z, y, bounds=(1e-10, 1e10))
    assert fit.converged and fit.n_iter < 100
    assert fit.nll < 1e-14  # it went where the NLL is negligible (< 1e-15 nats to gain)
    # the reference: the direct NLL at the fitted beta, and no better point within reach
    beta = float(fit.x[0])
    # NLL = log(1 + sum_{k != y} exp(beta (z_k - z_y))), exact for tiny values via log1p
    gaps = beta * (Z - Z[np.arange(3000), y][:, None])
    gaps[np.arange(3000), y] = -np.inf
    direct = np.mean(np.log1p(np.exp(gaps).sum(axis=1)))
    assert direct == pytest.approx(fit.nll, rel=1e-3)
    for other in (0.5 * beta, 0.9 * beta):  # smaller beta: strictly worse
        g2 = other * (Z - Z[np.arange(3000), y][:, None])
        g2[np.arange(3000), y] = -np.inf
        assert np.mean(np.log1p(np.exp(g2).sum(axis=1))) > direct
