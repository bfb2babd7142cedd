"""The compiled row kernels against NumPy, and the NumPy fallback itself.

Every test runs once per counting path (the ``counting_path`` fixture of
tests/conftest.py) unless marked ``one_counting_path``: those compare the paths.
"""

import numpy as np
import pytest

from sksegcal import _kernels

# every test runs once per counting path (numba and NumPy): tests/conftest.py
pytestmark = pytest.mark.counting_paths


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_argmax_rows_is_numpy_argmax_ties_included(counting_path, dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(5000, 7)).astype(dtype)  # many ties
    np.testing.assert_array_equal(_kernels.argmax_rows(x), x.argmax(axis=1))
    # a non-contiguous view takes the NumPy path with the same answer
    np.testing.assert_array_equal(_kernels.argmax_rows(x[:, ::2]), x[:, ::2].argmax(axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_row", [False, True])
def test_softmax_stats_match_the_direct_formula(counting_path, dtype, per_row):
    rng = np.random.default_rng(1)
    x = (rng.normal(scale=8.0, size=(3000, 11)) + 500.0).astype(dtype)  # no overflow
    beta = rng.uniform(0.01, 3.0, size=3000) if per_row else 0.7
    pred, e, total, squares = _kernels.softmax_stats(x, beta)
    x64 = x.astype(np.float64) * np.reshape(beta, (-1, 1))
    p = np.exp(x64 - x64.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(pred, x.argmax(axis=1))
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(e / total[:, None], p, rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(1.0 / total, p.max(axis=1), rtol=rtol)
    np.testing.assert_allclose(squares / total**2, (p**2).sum(axis=1), rtol=rtol)
    assert e.dtype == dtype and total.dtype == squares.dtype == np.float64


def test_softmax_stats_of_a_nan_row_are_not_finite(counting_path):
    x = np.zeros((3, 4), dtype=np.float32)
    x[1, 2] = np.nan
    _, _, total, squares = _kernels.softmax_stats(x, 1.0)
    assert np.isfinite(total[[0, 2]]).all() and not np.isfinite(total[1])


def _accumulate(rng_seed, compiled, monkeypatch, logits_path, **acc_kwargs):
    from sksegcal.metrics import CalibrationAccumulator

    monkeypatch.setattr(_kernels, "HAVE_NUMBA", compiled and _kernels.HAVE_NUMBA)
    rng = np.random.default_rng(rng_seed)
    acc = CalibrationAccumulator(6, **acc_kwargs)
    for part in range(3):
        n = 700 + 100 * part
        z = rng.normal(scale=3.0, size=(n, 6)).astype(np.float32)
        y = rng.integers(0, 6, n)
        y[rng.random(n) < 0.1] = 255
        kwargs = dict(image_id=rng.integers(0, 3, n), sample_weight=rng.random(n))
        if logits_path:
            acc.update_logits(y, z, temperature=rng.uniform(0.5, 2.0, n), **kwargs)
        else:
            p = np.exp(z - z.max(1, keepdims=True))
            acc.update(y, p / p.sum(1, keepdims=True), **kwargs)
    return acc


@pytest.mark.one_counting_path
@pytest.mark.skipif(not _kernels.HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("logits_path", [False, True])
def test_compiled_and_numpy_accumulators_agree(monkeypatch, logits_path):
    compiled = _accumulate(3, True, monkeypatch, logits_path)
    plain = _accumulate(3, False, monkeypatch, logits_path)
    a, b = compiled.summary(), plain.summary()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    np.testing.assert_allclose(compiled.confusion_matrix_, plain.confusion_matrix_)
    curve_a, curve_b = compiled.reliability_curve(), plain.reliability_curve()
    assert curve_a.keys() == curve_b.keys()
    for key in curve_a:
        np.testing.assert_allclose(curve_a[key], curve_b[key], rtol=1e-6, atol=1e-9)
    ece_a, ece_b = compiled.per_image_ece(), plain.per_image_ece()
    assert ece_a.keys() == ece_b.keys() == {0, 1, 2}
    for key in ece_a:
        assert ece_a[key] == pytest.approx(ece_b[key], rel=1e-6, abs=1e-12)


def test_bad_probabilities_count_nothing_on_either_path(counting_path):
    from sksegcal.metrics import CalibrationAccumulator

    y = np.array([0, 1, 2, 255])
    good = np.full((4, 3), 1 / 3)
    for bad, match in [
        (np.nan, "NaN"),
        (1.5, r"\[0, 1\]"),
        (-0.2, r"\[0, 1\]"),
    ]:
        p = good.copy()
        p[1, 0] = bad
        acc = CalibrationAccumulator(3)
        with pytest.raises(ValueError, match=match):
            acc.update(y, p)
        assert acc.n_pixels_ == 0
        p = good.copy()
        p[3, 0] = bad  # an ignored pixel's values are not looked at
        acc.update(y, p)
        assert acc.n_pixels_ == 3
    acc = CalibrationAccumulator(3)
    with pytest.raises(ValueError, match="sum to 1"):
        acc.update(y, good * 1.1)
    assert acc.n_pixels_ == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes, top_k", [(2, 5), (3, 1), (3, 2), (7, 5), (19, 5), (19, 19)])
def test_agnostic_features_from_logits_match_make_features(counting_path, dtype, n_classes, top_k):
    from sksegcal.features import features_from_logits, log_softmax, make_features

    rng = np.random.default_rng(n_classes * 10 + top_k)
    z = rng.normal(scale=4.0, size=(2000, n_classes)).astype(dtype)
    z[:50] = np.round(z[:50])  # ties
    z[50:60] = 0.0  # uniform rows
    z[60:70] += 1e4  # large logits
    ref = make_features(log_softmax(z), "agnostic", top_k=top_k)
    got = features_from_logits(z, "agnostic", top_k=top_k)
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    tol = 2e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    # the input is left alone, and the log_softmax set is the log-probabilities
    np.testing.assert_allclose(features_from_logits(z, "log_softmax"), log_softmax(z))


@pytest.mark.one_counting_path
@pytest.mark.skipif(not _kernels.HAVE_NUMBA, reason="numba is not installed")
def test_evaluate_store_same_with_and_without_numba(monkeypatch, tmp_path):
    from sksegcal.scaling import MetaCalScaling, TemperatureScaling
    from sksegcal.store import LogitStore, evaluate_store

    rng = np.random.default_rng(7)
    store = LogitStore.create(tmp_path / "s", n_classes=4)
    for name in range(4):
        z = rng.normal(scale=3.0, size=(4, 12, 10))
        t = np.where(rng.random((12, 10)) < 0.7, z.argmax(0), rng.integers(0, 4, (12, 10)))
        t[rng.random((12, 10)) < 0.1] = 255
        store.add_image(name, z, t)
    X, y, _ = (np.concatenate(p) for p in zip(*store.iter_chunks()))
    calibrators = {
        "uncalibrated": None,
        "ts": TemperatureScaling().fit(X, y),
        "metacal": MetaCalScaling(rejection_rate=0.2).fit(X, y),
    }
    compiled = evaluate_store(store, calibrators, chunk_pixels=70)
    monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)  # the probability-table path
    plain = evaluate_store(store, calibrators, chunk_pixels=70)
    for name in calibrators:
        a, b = compiled[name].summary(), plain[name].summary()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (name, key)


def test_y_pred_decides_tied_rows_on_either_path(counting_path):
    from sksegcal.metrics import CalibrationAccumulator

    y = np.array([2, 2, 1, 0])
    p = np.full((4, 3), 1 / 3, dtype=np.float32)
    acc = CalibrationAccumulator(3).update(y, p, y_pred=np.array([2, 2, 0, 0]))
    assert acc.summary()["accuracy"] == 0.75
    z = np.zeros((4, 3), dtype=np.float32)  # tied logits: any class is an argmax
    acc = CalibrationAccumulator(3).update_logits(y, z, y_pred=np.array([2, 2, 0, 0]))
    assert acc.summary()["accuracy"] == 0.75
