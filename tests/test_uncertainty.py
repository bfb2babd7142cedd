"""The one predictive entropy and top-2 margin, against scipy and sorting, and every path to it.

``sksegcal._uncertainty`` defines both numbers once; the compiled row loops (context
statistics, class-agnostic features) keep their own loops and must give the same numbers
to float rounding; every NumPy site (features, context, Meta-Cal, LTS) must agree with an
independent reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax as scipy_log_softmax
from scipy.special import softmax as scipy_softmax
from scipy.stats import entropy as scipy_entropy

from sksegcal import _kernels
from sksegcal import context as cx
from sksegcal._uncertainty import entropy, entropy_from_sums, margin_from_sums, top2_margin
from sksegcal.calibrators._local import _confidence_stats
from sksegcal.calibrators._metacal import MetaCalScaling
from sksegcal.features import features_from_logits, log_softmax, make_features

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _logits(n_classes: int, dtype, seed: int = 0) -> np.ndarray:
    """(300, C) logits of mixed sharpness, with ties and rows whose other classes underflow."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.1, 2.0, 30.0], size=(300, 1))
    z = rng.normal(size=(300, n_classes)) * scale
    z[:4] = 0.0  # uniform rows
    if n_classes > 1:
        z[4:8, 0] = 900.0  # p = (1, 0, ...): 0 log 0
        z[8:12, :2] = 5.0  # a tie at the top
    return z.astype(dtype)


def _reference(z: np.ndarray):
    """scipy's entropy (natural log, 0 log 0 = 0) and the sorted gap, in float64."""
    p = scipy_softmax(z.astype(np.float64), axis=1)
    top = np.sort(p, axis=1)[:, ::-1]
    margin = top[:, 0] - (top[:, 1] if p.shape[1] > 1 else 0.0)
    return scipy_entropy(p, axis=1), margin


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [1, 2, 5, 150])
def test_definition_against_scipy_and_sorting(dtype, n_classes):
    z = _logits(n_classes, dtype)
    lp = log_softmax(z)
    h_ref, m_ref = _reference(z)
    h, m = entropy(lp, axis=1), top2_margin(lp, axis=1)
    assert h.dtype == dtype and m.dtype == dtype  # computed in the input's dtype
    np.testing.assert_allclose(h, h_ref, **TOL[dtype])
    np.testing.assert_allclose(m, m_ref, **TOL[dtype])
    # along another axis: the same numbers (to the order of the sum)
    np.testing.assert_allclose(entropy(lp.T.copy(), axis=0), h, **TOL[dtype])
    np.testing.assert_array_equal(top2_margin(lp.T.copy(), axis=0), m)


def test_zero_probabilities_count_zero():
    # a log-probability of -inf is an exact 0: 0 log 0 = 0, not NaN
    lp = np.array([[0.0, -np.inf, -np.inf], [np.log(0.5), np.log(0.5), -np.inf]])
    np.testing.assert_allclose(entropy(lp, axis=1), [0.0, np.log(2)], rtol=1e-15)
    np.testing.assert_allclose(top2_margin(lp, axis=1), [1.0, 0.0])
    # the uniform distribution has the largest entropy, log C
    uniform = np.full((1, 7), -np.log(7.0))
    np.testing.assert_allclose(entropy(uniform, axis=1), np.log(7.0), rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [1, 2, 19])
def test_the_sums_give_the_definition(dtype, n_classes):
    z = _logits(n_classes, dtype, seed=1).astype(np.float64)
    d = z - z.max(axis=1, keepdims=True)
    e = np.exp(d)
    second = np.sort(e, axis=1)[:, -2] if n_classes > 1 else 0.0
    lp = scipy_log_softmax(z, axis=1)
    np.testing.assert_allclose(
        entropy_from_sums(e.sum(axis=1), (e * d).sum(axis=1)), entropy(lp, axis=1), atol=1e-12
    )
    np.testing.assert_allclose(
        margin_from_sums(e.sum(axis=1), second), top2_margin(lp, axis=1), atol=1e-14
    )


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_context_statistics_equal_the_definition(compiled, dtype):
    if compiled and not cx.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    z = _logits(9, dtype, seed=2)
    pred, h, m = cx._pixel_stats(np.ascontiguousarray(z.T), compiled=compiled)
    lp = log_softmax(z.astype(np.float64))
    np.testing.assert_array_equal(pred, z.argmax(axis=1))
    # float32 output of float32 or float64 sums
    np.testing.assert_allclose(h, entropy(lp, axis=1), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(m, top2_margin(lp, axis=1), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("top_k", [1, 5])
def test_agnostic_features_equal_the_definition(monkeypatch, numba, dtype, top_k):
    if numba and not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_kernels, "HAVE_NUMBA", numba)
    z = _logits(12, dtype, seed=3)
    out = features_from_logits(z, "agnostic", top_k=top_k)
    lp = log_softmax(z)
    h_ref, m_ref = _reference(z)
    np.testing.assert_allclose(out[:, top_k], h_ref, **TOL[dtype])
    if top_k == 1:  # one column kept: its probability alone
        m_ref = np.exp(lp.max(axis=1).astype(np.float64))
    np.testing.assert_allclose(out[:, top_k + 1], m_ref, **TOL[dtype])
    # the NumPy path is the definition, bit for bit
    numpy_path = make_features(lp, "agnostic", top_k=top_k)
    np.testing.assert_array_equal(numpy_path[:, top_k], entropy(lp, axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metacal_and_lts_read_the_definition(dtype):
    z = _logits(6, dtype, seed=4)
    h_ref, _ = _reference(z)
    np.testing.assert_allclose(MetaCalScaling._entropy(z), h_ref, **TOL[dtype])
    stats = _confidence_stats(z)  # float64 whatever the input
    np.testing.assert_allclose(stats[:, 1], h_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(
        stats[:, 0], scipy_log_softmax(z.astype(np.float64), axis=1).max(axis=1), atol=1e-13
    )


def test_the_torch_twins_equal_the_definition():
    torch = pytest.importorskip("torch")
    from sksegcal.deployment._functional import agnostic_features

    z = _logits(7, np.float32, seed=5)
    h_ref, m_ref = _reference(z)
    # (N, C, H, W) maps: the 300 pixels as one 15 x 20 image
    maps = torch.from_numpy(z.T.reshape(1, 7, 15, 20).copy())
    out = agnostic_features(maps, top_k=5).numpy().reshape(7, -1)
    np.testing.assert_allclose(out[5], h_ref, **TOL[np.float32])
    np.testing.assert_allclose(out[6], m_ref, **TOL[np.float32])
