"""Tests of sksegcal.metrics against independent references."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score
from sklearn.model_selection import GridSearchCV, KFold

from sksegcal import metrics as M
from sksegcal.metrics import CalibrationAccumulator, _inputs

# every test runs once per counting path (numba and NumPy): tests/conftest.py
pytestmark = pytest.mark.counting_paths

IGNORE = 255


# ---------------------------------------------------------------------------
# data and direct NumPy references (written from the formulas in docs/metrics.md)
# ---------------------------------------------------------------------------


def make_data(n=5000, c=5, seed=0, ignore_frac=0.1, temp=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, c)) / temp
    y = np.where(
        rng.random(n) < 0.7, logits.argmax(1), rng.integers(0, c, size=n)
    ).astype(np.int64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if ignore_frac:
        y[rng.random(n) < ignore_frac] = IGNORE
    return y, p.astype(dtype)


def ref_bins(conf, n_bins):
    return np.minimum(np.floor(conf.astype(np.float64) * n_bins).astype(int), n_bins - 1)


def ref_ce(y, p, n_bins=15, norm="l1", w=None):
    """Top-label calibration error straight from the definition."""
    keep = y != IGNORE
    y, p = y[keep], p[keep].astype(np.float32)
    w = np.ones(len(y)) if w is None else w[keep]
    conf = p.max(1).astype(np.float64)
    correct = (p.argmax(1) == y).astype(float)
    b = ref_bins(p.max(1), n_bins)
    out, tot = [], w.sum()
    for k in range(n_bins):
        m = b == k
        if w[m].sum() == 0:
            continue
        acc = np.average(correct[m], weights=w[m])
        cf = np.average(conf[m], weights=w[m])
        out.append((w[m].sum() / tot, abs(acc - cf)))
    fr, gap = np.array(out).T
    if norm == "l1":
        return float((fr * gap).sum())
    if norm == "l2":
        return float(np.sqrt((fr * gap**2).sum()))
    return float(gap.max())


def ref_classwise(y, p, n_bins=15):
    keep = y != IGNORE
    y, p = y[keep], p[keep].astype(np.float32)
    n, c = p.shape
    total = 0.0
    for k in range(c):
        pk = p[:, k].astype(np.float64)
        b = ref_bins(p[:, k], n_bins)
        lab = (y == k).astype(float)
        for j in range(n_bins):
            m = b == j
            if m.any():
                total += m.sum() / n * abs(lab[m].mean() - pk[m].mean())
    return total / c


def ref_quantile_ece(y, p, n_bins):
    keep = y != IGNORE
    y, p = y[keep], p[keep].astype(np.float32)
    conf = p.max(1).astype(np.float64)
    correct = p.argmax(1) == y
    order = np.argsort(conf, kind="stable")
    return sum(
        len(ix) / len(y) * abs(correct[ix].mean() - conf[ix].mean())
        for ix in np.array_split(order, n_bins)
        if len(ix)
    )


def all_metrics(acc, n_bins=15):
    out = acc.summary(n_bins)
    out["rms_q"] = acc.calibration_error(n_bins, norm="l2", strategy="quantile")
    out["ece_7"] = acc.expected_calibration_error(7)
    if acc.classwise:
        out["cw_q_max"] = acc.classwise_calibration_error(n_bins, norm="max", strategy="quantile")
    return out


def assert_same(a, b, rtol=1e-10, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


# ---------------------------------------------------------------------------
# agreement with independent references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [10, 15, 7, 100])
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_top_label_matches_numpy_formula(n_bins, norm):
    y, p = make_data(n=4000, c=6, seed=n_bins)
    ours = M.calibration_error(y, p, n_bins=n_bins, norm=norm)
    assert ours == pytest.approx(ref_ce(y, p, n_bins, norm), abs=1e-9)


def test_sample_weight_matches_numpy_formula():
    y, p = make_data(n=3000, c=4, seed=3)
    w = np.random.default_rng(3).random(len(y))
    for norm in ("l1", "l2", "max"):
        ours = M.calibration_error(y, p, norm=norm, sample_weight=w)
        assert ours == pytest.approx(ref_ce(y, p, 15, norm, w), abs=1e-9)
    keep = y != IGNORE
    assert M.negative_log_likelihood(y, p, sample_weight=w) == pytest.approx(
        log_loss(y[keep], p[keep], labels=np.arange(4), sample_weight=w[keep]), abs=1e-6
    )


def test_nll_and_brier_match_sklearn():
    y, p = make_data(n=6000, c=7, seed=1)
    keep = y != IGNORE
    labels = np.arange(7)
    assert M.negative_log_likelihood(y, p) == pytest.approx(
        log_loss(y[keep], p[keep], labels=labels), abs=1e-6
    )
    assert M.brier_score(y, p) == pytest.approx(
        brier_score_loss(y[keep], p[keep], labels=labels, scale_by_half=False), abs=1e-6
    )
    onehot = np.eye(7)[y[keep]]
    direct = ((p[keep].astype(np.float64) - onehot) ** 2).sum(1).mean()
    assert M.brier_score(y, p) == pytest.approx(direct, abs=1e-6)
    assert M.pixel_accuracy(y, p) == pytest.approx(accuracy_score(y[keep], p[keep].argmax(1)))


def test_miou_matches_confusion_matrix():
    from sklearn.metrics import confusion_matrix, jaccard_score

    y, p = make_data(n=3000, c=5, seed=2)
    keep = y != IGNORE
    pred = p[keep].argmax(1)
    acc = CalibrationAccumulator(5).update(y, p)
    np.testing.assert_array_equal(
        acc.confusion_matrix_, confusion_matrix(y[keep], pred, labels=np.arange(5))
    )
    assert acc.mean_iou() == pytest.approx(
        jaccard_score(y[keep], pred, average="macro", labels=np.arange(5))
    )


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_matches_torchmetrics_without_confidence_one(norm):
    tm = pytest.importorskip("torchmetrics.classification")
    import torch

    y, p = make_data(n=20000, c=19, seed=4)
    assert p.max() < 1.0
    metric = tm.MulticlassCalibrationError(
        num_classes=19, n_bins=15, norm=norm, ignore_index=IGNORE
    )
    metric.update(torch.from_numpy(p), torch.from_numpy(y))
    ours = M.calibration_error(y, p, n_bins=15, norm=norm)
    assert ours == pytest.approx(float(metric.compute()), abs=1e-6)


def test_torchmetrics_confidence_one_edge_case():
    """torchmetrics puts a confidence of exactly 1.0 in an extra bin of its own.

    We keep 15 bins, the last one closed: [14/15, 1]. The two agree once the
    1.0 pixels are their own bin, i.e. with torchmetrics' phantom bin.
    """
    tm = pytest.importorskip("torchmetrics.classification")
    import torch

    p = np.array([[1.0, 0, 0]] * 4 + [[0.95, 0.05, 0]] * 4, dtype=np.float32)
    y = np.array([0, 0, 0, 1] + [0, 0, 0, 0])  # 1.0-pixels: 75% right; 0.95-pixels: 100%
    metric = tm.MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")
    metric.update(torch.from_numpy(p), torch.from_numpy(y))
    theirs = float(metric.compute())
    ours = M.expected_calibration_error(y, p, n_bins=15)
    # ours: one bin, conf 0.975, acc 0.875 -> 0.1
    assert ours == pytest.approx(0.1, abs=1e-6)
    assert ours == pytest.approx(ref_ce(y, p, 15), abs=1e-9)
    # torchmetrics: bin [14/15, 1) gap 0.05, phantom bin {1.0} gap 0.25 -> 0.15
    assert theirs == pytest.approx(0.5 * 0.05 + 0.5 * 0.25, abs=1e-6)


def test_classwise_matches_numpy_formula():
    y, p = make_data(n=3000, c=4, seed=5)
    assert M.classwise_calibration_error(y, p, n_bins=15) == pytest.approx(
        ref_classwise(y, p, 15), abs=1e-9
    )
    assert M.static_calibration_error(y, p, n_bins=10) == pytest.approx(
        ref_classwise(y, p, 10), abs=1e-9
    )
    per = M.classwise_calibration_error(y, p, average=False)
    assert per.shape == (4,)
    assert per.mean() == pytest.approx(ref_classwise(y, p, 15), abs=1e-9)


def test_equal_mass_close_to_exact_quantiles():
    y, p = make_data(n=50000, c=5, seed=6, temp=2.0)
    ours = M.expected_calibration_error(y, p, n_bins=15, strategy="quantile")
    exact = ref_quantile_ece(y, p, 15)
    assert ours == pytest.approx(exact, abs=5e-3)
    curve = M.reliability_curve(y, p, n_bins=15, strategy="quantile")
    # equal mass within what the 1/3600 grid allows
    assert curve.fraction.max() - curve.fraction.min() < 0.02
    assert np.all(np.diff(curve.bin_edges) >= 0)


def test_per_image_ece_matches_direct_mean():
    y, p = make_data(n=3000, c=4, seed=7)
    img = np.repeat(np.arange(6), 500)
    acc = CalibrationAccumulator(4)
    perm = np.random.default_rng(0).permutation(3000)  # pixels in any order
    for ch in np.array_split(perm, 7):
        acc.update(y[ch], p[ch], image_id=img[ch])
    direct = [ref_ce(y[img == i], p[img == i], 15) for i in range(6)]
    assert acc.mean_per_image_ece() == pytest.approx(np.mean(direct), abs=1e-9)
    assert set(acc.per_image_ece()) == set(range(6))
    assert acc.summary()["mean_per_image_ece"] == pytest.approx(np.mean(direct), abs=1e-9)


def test_four_d_input_equals_flattened():
    import torch

    y, p = make_data(n=2 * 3 * 8 * 8, c=3, seed=8)
    p4 = p.reshape(6, 8, 8, 3).transpose(0, 3, 1, 2)  # (N, C, H, W)
    y3 = y.reshape(6, 8, 8)
    a = CalibrationAccumulator(3).update(y3, p4)
    b = CalibrationAccumulator(3).update(y, p, image_id=np.repeat(np.arange(6), 64))
    assert_same(a.summary(), b.summary())
    assert M.expected_calibration_error(y3, p4) == pytest.approx(
        M.expected_calibration_error(y, p), abs=1e-12
    )
    # one id per image of the chunk
    c = CalibrationAccumulator(3).update(y3, torch.from_numpy(p4), image_id=list("abcdef"))
    assert sorted(c.per_image_ece()) == list("abcdef")


# ---------------------------------------------------------------------------
# streaming == one-shot, any chunking, any order, merged
# ---------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 600),
    c=st.integers(2, 6),
    n_splits=st.integers(1, 6),
    n_workers=st.integers(1, 3),
    weighted=st.booleans(),
)
def test_streaming_equals_one_shot(seed, n, c, n_splits, n_workers, weighted):
    y, p = make_data(n=n, c=c, seed=seed, ignore_frac=0.2)
    if (y == IGNORE).all():
        y[0] = 0
    rng = np.random.default_rng(seed)
    w = rng.random(n) if weighted else None
    img = rng.integers(0, 4, size=n)
    one = CalibrationAccumulator(c, classwise=True).update(y, p, image_id=img, sample_weight=w)

    perm = rng.permutation(n)
    cuts = np.sort(rng.integers(0, n + 1, size=n_splits - 1))
    chunks = np.split(perm, cuts)
    accs = [CalibrationAccumulator(c, classwise=True) for _ in range(n_workers)]
    for i, ch in enumerate(chunks):
        accs[i % n_workers].update(
            y[ch], p[ch], image_id=img[ch], sample_weight=None if w is None else w[ch]
        )
    merged = accs[0]
    for other in accs[1:]:
        merged = merged.merge(pickle.loads(pickle.dumps(other)))
    assert merged.n_pixels_ == one.n_pixels_
    assert_same(all_metrics(merged), all_metrics(one))


def test_merge_returns_self_and_copy_keeps_original():
    y, p = make_data(n=1000, c=3, seed=9)
    a = CalibrationAccumulator(3).update(y[:500], p[:500])
    b = CalibrationAccumulator(3).update(y[500:], p[500:])
    before = a.summary()
    m = a.copy().merge(b)
    assert_same(a.summary(), before)
    assert a.merge(b) is a
    assert_same(a.summary(), m.summary())
    with pytest.raises(ValueError, match="n_classes: 3 vs 4"):
        a.merge(CalibrationAccumulator(4))


def test_state_size_is_fixed_and_joblib_merge():
    from joblib import Parallel, delayed

    def fill(seed, n):
        y, p = make_data(n=n, c=5, seed=seed)
        return CalibrationAccumulator(5).update(y, p)

    small = len(pickle.dumps(fill(0, 100)))
    large = len(pickle.dumps(fill(0, 100_000)))
    assert abs(large - small) < 64  # only the integer pixel count grows (a few bytes)
    # bound methods travel to the loky workers with the accumulator itself
    data = [make_data(n=2000, c=5, seed=s) for s in range(4)]
    parts = Parallel(n_jobs=2)(
        delayed(CalibrationAccumulator(5).update)(y, p) for y, p in data
    )
    merged = parts[0]
    for other in parts[1:]:
        merged.merge(other)
    ys, ps = zip(*data)
    one = CalibrationAccumulator(5).update(np.concatenate(ys), np.concatenate(ps))
    assert_same(merged.summary(), one.summary())


# ---------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------


def test_confidences_exactly_zero_and_one():
    p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], dtype=np.float32)
    y = np.array([0, 1, 1, 0])
    acc = CalibrationAccumulator(2).update(y, p)
    curve = acc.reliability_curve(10)
    assert curve.count[-1] == 3  # 1.0 lands in the last bin, not a phantom one
    assert curve.count[5] == 1
    assert acc.expected_calibration_error(10) == pytest.approx((1 / 3 * 3 + 0.5) / 4)
    # log(0) is clipped at NLL_EPS
    assert acc.negative_log_likelihood() == pytest.approx(
        (-np.log(M.NLL_EPS) - np.log(0.5)) / 4
    )
    assert np.isfinite(acc.summary()["nll"])


@pytest.mark.parametrize("n_bins", [4, 8, 16])
def test_confidences_exactly_on_bin_edges_go_to_the_upper_bin(n_bins):
    # b / n_bins is exact in float32 for these n_bins: every confidence sits on an edge
    edges = np.arange(n_bins // 2, n_bins + 1) / n_bins  # top-label confidences >= 0.5
    conf = np.repeat(edges, 7).astype(np.float32)
    p = np.stack([conf, 1 - conf], axis=1)
    rng = np.random.default_rng(n_bins)
    y = rng.integers(0, 2, size=conf.size)
    expected = np.bincount(ref_bins(conf, n_bins), minlength=n_bins)
    ref = ref_ce(y, p, n_bins)
    np.testing.assert_array_equal(M.reliability_curve(y, p, n_bins=n_bins).count, expected)
    for classwise in (False, True):  # classwise tallies always take the NumPy path
        acc = CalibrationAccumulator(2, classwise=classwise, per_image_n_bins=n_bins)
        acc.update(y, p, image_id=0)
        np.testing.assert_array_equal(acc.reliability_curve(n_bins).count, expected)
        assert acc.expected_calibration_error(n_bins) == pytest.approx(ref, abs=1e-12)
        assert acc.per_image_ece()[0] == pytest.approx(ref, abs=1e-12)
    assert acc.classwise_calibration_error(n_bins) == pytest.approx(
        ref_classwise(y, p, n_bins), abs=1e-12
    )


def test_empty_bins_and_all_in_one_bin():
    p = np.tile(np.array([[0.62, 0.38]], dtype=np.float32), (50, 1))
    y = np.r_[np.zeros(40, int), np.ones(10, int)]
    acc = CalibrationAccumulator(2).update(y, p)
    curve = acc.reliability_curve(15)
    assert (curve.count > 0).sum() == 1
    assert np.isnan(curve.accuracy[curve.count == 0]).all()
    assert acc.expected_calibration_error() == pytest.approx(abs(0.8 - 0.62), abs=1e-6)
    assert acc.maximum_calibration_error() == pytest.approx(abs(0.8 - 0.62), abs=1e-6)
    assert acc.rms_calibration_error() == pytest.approx(abs(0.8 - 0.62), abs=1e-6)
    # equal-mass bins collapse onto the single occupied value
    assert acc.expected_calibration_error(strategy="quantile") == pytest.approx(0.18, abs=1e-6)


def test_chunk_of_only_ignored_pixels_and_missing_class():
    y, p = make_data(n=500, c=4, seed=10)
    y[y == 3] = 0  # class 3 never present
    acc = CalibrationAccumulator(4, classwise=True).update(y, p)
    ref = acc.summary()
    acc.update(np.full(100, IGNORE), np.full((100, 4), np.nan, dtype=np.float32))
    assert_same(acc.summary(), ref)
    iou = acc.iou_per_class()
    assert iou.shape == (4,)
    assert np.isfinite(ref["miou"]) and np.isfinite(ref["classwise_ece"])


def test_float16_and_torch_input():
    import torch

    y, p = make_data(n=3000, c=5, seed=11)
    p16 = p.astype(np.float16)
    ref = ref_ce(y, p16.astype(np.float32), 15)
    assert M.expected_calibration_error(y, p16) == pytest.approx(ref, abs=1e-9)
    acc = CalibrationAccumulator(5).update(torch.from_numpy(y), torch.from_numpy(p16))
    assert acc.expected_calibration_error() == pytest.approx(ref, abs=1e-9)
    assert M.negative_log_likelihood(y, p.astype(np.float64)) == pytest.approx(
        M.negative_log_likelihood(y, p), abs=1e-7
    )


def test_binary_one_dimensional_probabilities():
    rng = np.random.default_rng(12)
    p1 = rng.random(400)
    y = (rng.random(400) < p1).astype(int)
    two = np.c_[1 - p1, p1]
    assert M.expected_calibration_error(y, p1) == pytest.approx(
        M.expected_calibration_error(y, two), abs=1e-12
    )
    assert M.negative_log_likelihood(y, p1) == pytest.approx(log_loss(y, p1), abs=1e-6)


def test_ignore_index_none_and_negative():
    y, p = make_data(n=500, c=3, seed=13, ignore_frac=0)
    assert M.expected_calibration_error(y, p, ignore_index=None) == pytest.approx(
        ref_ce(y, p)
    )
    y2 = y.copy()
    y2[:50] = -1
    assert M.expected_calibration_error(y2, p, ignore_index=-1) == pytest.approx(
        M.expected_calibration_error(y[50:], p[50:])
    )


def test_bin_counts_not_dividing_grid_and_too_many():
    y, p = make_data(n=4000, c=4, seed=14)
    acc = CalibrationAccumulator(4)  # 3600 base bins: 7 does not divide it
    acc.update(y, p)
    assert acc.expected_calibration_error(7) == pytest.approx(ref_ce(y, p, 7), abs=2e-3)
    assert M.expected_calibration_error(y, p, n_bins=7) == pytest.approx(
        ref_ce(y, p, 7), abs=1e-9
    )  # one-shot builds a grid that 7 divides
    with pytest.raises(ValueError, match="between 1 and the base grid"):
        acc.expected_calibration_error(5000)


# ---------------------------------------------------------------------------
# errors that name the problem
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    y, p = make_data(n=100, c=3, seed=15)
    acc = CalibrationAccumulator(3)
    bad = p.copy()
    bad[y != IGNORE][:1] = np.nan
    bad[np.flatnonzero(y != IGNORE)[0], 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        acc.update(y, bad)
    with pytest.raises(ValueError, match="Shape mismatch"):
        acc.update(y[:-1], p)
    y_bad = y.copy()
    y_bad[0] = 7
    with pytest.raises(ValueError, match=r"labels \[7\] outside \[0, 2\]"):
        acc.update(y_bad, p)
    with pytest.raises(ValueError, match="n_classes=3"):
        acc.update(y, np.c_[p, np.zeros(100)])
    with pytest.raises(ValueError, match="not logits|softmax"):
        acc.update(y, p * 5 - 1)
    with pytest.raises(ValueError, match="sum to 1"):
        acc.update(y, p * 0.5)
    with pytest.raises(ValueError, match="ignored"):
        CalibrationAccumulator(3).update(np.full(100, IGNORE), p).summary()
    with pytest.raises(ValueError, match="every pixel"):
        M.expected_calibration_error(np.full(100, IGNORE), p)
    with pytest.raises(TypeError, match="floating-point"):
        acc.update(y, y)
    with pytest.raises(ValueError, match="classwise=True"):
        CalibrationAccumulator(3).update(y, p).static_calibration_error()
    with pytest.raises(ValueError, match="strategy"):
        CalibrationAccumulator(3).update(y, p).calibration_error(strategy="bogus")
    with pytest.raises(ValueError, match="norm"):
        CalibrationAccumulator(3).update(y, p).calibration_error(norm="l3")
    with pytest.raises(ValueError, match="sample_weight"):
        acc.update(y, p, sample_weight=-np.ones(100))
    # nothing was counted by the failed updates
    assert acc.n_pixels_ == 0


# ---------------------------------------------------------------------------
# scorers and misprediction detection
# ---------------------------------------------------------------------------


class SoftmaxTemperature(ClassifierMixin, BaseEstimator):
    """Minimal stand-in for the project's calibrators: X are logits."""

    def __init__(self, temperature=1.0):
        self.temperature = temperature

    def fit(self, X, y):
        self.classes_ = np.arange(X.shape[1])
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X):
        z = X / self.temperature
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def predict(self, X):
        return X.argmax(1)


def _logits(n=3000, c=4, seed=16):
    rng = np.random.default_rng(seed)
    X = rng.normal(scale=4.0, size=(n, c)).astype(np.float32)
    # over-confident logits: labels follow softmax(X / 3)
    pt = np.exp(X / 3)
    pt /= pt.sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in pt])
    y[rng.random(n) < 0.1] = IGNORE
    return X, y


def test_scorers_ignore_255_and_grid_search_by_object():
    X, y = _logits()
    est = SoftmaxTemperature().fit(X, y)
    keep = y != IGNORE
    probs = est.predict_proba(X)
    assert M.ece_scorer(est, X, y) == pytest.approx(
        -M.expected_calibration_error(y, probs), abs=1e-12
    )
    assert M.nll_scorer(est, X, y) == pytest.approx(
        -log_loss(y[keep], probs[keep], labels=np.arange(4)), abs=1e-6
    )
    assert M.get_scorer("neg_brier_score")(est, X, y) == pytest.approx(
        -M.brier_score(y, probs)
    )
    gs = GridSearchCV(
        SoftmaxTemperature(),
        {"temperature": [0.5, 1.0, 3.0, 10.0]},
        scoring={"ece": M.get_scorer("ece"), "nll": M.get_scorer("nll")},
        refit="nll",
        cv=KFold(3),
        n_jobs=2,
    )
    gs.fit(X, y)
    assert gs.best_params_["temperature"] == 3.0
    assert np.argmax(gs.cv_results_["mean_test_ece"]) in (1, 2)


def test_get_scorer_names_and_pickle():
    for name in ("ece", "neg_expected_calibration_error", "nll", "neg_negative_log_likelihood",
                 "brier", "mce", "rmsce", "sce", "miou", "accuracy"):
        assert callable(M.get_scorer(name))
    assert M.get_scorer("ece") is M.ece_scorer
    assert M.get_scorer("neg_log_loss") is not None  # scikit-learn's own names still work
    with pytest.raises(ValueError, match="sksegcal names"):
        M.get_scorer("ecee")
    for s in (M.ece_scorer, M.nll_scorer, M.brier_scorer):
        assert pickle.loads(pickle.dumps(s)) is not None


def test_binary_estimator_scorer():
    X, y = _logits(c=2, seed=17)
    est = SoftmaxTemperature().fit(X, y)
    # scikit-learn hands the scorer P(class 1) only; we rebuild both columns
    assert M.ece_scorer(est, X, y) == pytest.approx(
        -M.expected_calibration_error(y, est.predict_proba(X)), abs=1e-9
    )


def test_misprediction_detection_scores():
    rng = np.random.default_rng(18)
    correct = rng.random(5000) < 0.8
    score = np.clip(0.6 * correct + rng.normal(scale=0.3, size=5000), 0, 1)
    s = M.misprediction_detection_scores(correct, score)
    assert s["auroc"] == pytest.approx(roc_auc_score(correct, score))
    assert 0 < s["aupr_error"] < 1 and 0 < s["fpr_at_95_tpr"] < 1
    assert s["error_rate"] == pytest.approx(1 - correct.mean())
    # FPR at 95% TPR straight from the definition
    thr = np.sort(score[correct])[::-1][int(np.ceil(0.95 * correct.sum())) - 1]
    assert s["fpr_at_95_tpr"] == pytest.approx((score[~correct] >= thr).mean())
    with pytest.raises(ValueError, match="both correct and mispredicted"):
        M.misprediction_detection_scores(np.ones(5), np.ones(5))


def test_large_chunks_are_cut_into_pieces_all_or_nothing(monkeypatch):
    monkeypatch.setattr(_inputs, "_CHUNK_ROWS", 1000)
    y, p = make_data(n=4 * 3 * 20 * 20, c=4, seed=19)  # 4800 pixels: 5 pieces
    rng = np.random.default_rng(19)
    w = rng.random(y.size)
    ids = rng.integers(0, 5, size=y.size)
    ref = CalibrationAccumulator(4, classwise=True)
    for s in range(0, y.size, 300):  # small chunks: never cut
        ref.update(y[s:s + 300], p[s:s + 300], image_id=ids[s:s + 300],
                   sample_weight=w[s:s + 300])
    big = CalibrationAccumulator(4, classwise=True)
    big.update(y, p, image_id=ids, sample_weight=w)
    assert_same(all_metrics(big), all_metrics(ref))
    # (N, C, H, W): cut by whole images; flat per-pixel weights and ids follow
    p4 = p.reshape(12, 20, 20, 4).transpose(0, 3, 1, 2)
    big4 = CalibrationAccumulator(4, classwise=True)
    big4.update(y.reshape(12, 20, 20), p4, image_id=ids, sample_weight=w)
    assert_same(all_metrics(big4), all_metrics(ref))
    # a bad value in the last piece: nothing of the chunk is counted
    bad = p.copy()
    bad[np.flatnonzero(y != IGNORE)[-1], 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        big.update(y, bad)
    assert_same(all_metrics(big), all_metrics(ref))
    with pytest.raises(ValueError, match="Shape mismatch"):
        big.update(y[:-1], p)


def test_y_pred_given_equals_default_and_is_cut_with_the_chunk(monkeypatch):
    y, p = make_data(n=4800, c=4, seed=23)
    ref = CalibrationAccumulator(4, classwise=True).update(y, p, image_id=3)
    given = CalibrationAccumulator(4, classwise=True).update(
        y, p, image_id=3, y_pred=p.argmax(axis=1)
    )
    assert_same(all_metrics(given), all_metrics(ref))
    monkeypatch.setattr(_inputs, "_CHUNK_ROWS", 1000)
    cut = CalibrationAccumulator(4, classwise=True).update(
        y, p, image_id=3, y_pred=p.argmax(axis=1)
    )
    assert_same(all_metrics(cut), all_metrics(ref))
    # (N, C, H, W) probabilities take (N, H, W) predictions
    p4 = p.reshape(12, 20, 20, 4).transpose(0, 3, 1, 2)
    four = CalibrationAccumulator(4, classwise=True).update(
        y.reshape(12, 20, 20), p4, image_id=np.full(12, 3), y_pred=p4.argmax(axis=1)
    )
    assert_same(all_metrics(four), all_metrics(ref))


def test_y_pred_decides_accuracy_and_confidence_of_tied_rows():
    # uniform rows: argmax would say class 0; the model said otherwise
    y = np.array([2, 2, 1, 0])
    p = np.full((4, 3), 1 / 3, dtype=np.float32)
    y_pred = np.array([2, 2, 0, 0])
    default = CalibrationAccumulator(3).update(y, p).summary()
    given = CalibrationAccumulator(3).update(y, p, y_pred=y_pred).summary()
    assert default["accuracy"] == 0.25
    assert given["accuracy"] == accuracy_score(y, y_pred) == 0.75
    acc = CalibrationAccumulator(3).update(y, p, y_pred=y_pred)
    np.testing.assert_array_equal(acc.confusion_matrix_, np.array(
        [[1, 0, 0], [1, 0, 0], [0, 0, 2]]
    ))
    # the confidence is the probability of the given class
    p2 = np.array([[0.6, 0.3, 0.1]], dtype=np.float32)
    acc2 = CalibrationAccumulator(3).update([1], p2, y_pred=[1])
    assert acc2.summary()["ece"] == pytest.approx(1 - 0.3)


@pytest.mark.parametrize(
    "y_pred, match",
    [
        (np.array([0, 1, 3]), r"outside \[0, 2\]"),
        (np.array([0, -1, 2]), r"outside \[0, 2\]"),
        (np.array([0, 1]), "Shape mismatch.*y_pred"),
        (np.array([0.0, 1.5, 2.0]), "y_pred must hold integer"),
        (np.array(["a", "b", "c"]), "y_pred must hold integer"),
    ],
)
def test_bad_y_pred_raises_and_counts_nothing(y_pred, match):
    y = np.array([0, 1, 2])
    p = np.full((3, 3), 1 / 3)
    acc = CalibrationAccumulator(3)
    with pytest.raises((ValueError, TypeError), match=match):
        acc.update(y, p, y_pred=y_pred)
    assert acc.n_pixels_ == 0


def _softmax64(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / np.reshape(temperature, (-1, 1))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("per_pixel", [False, True])
def test_update_logits_equals_update_on_the_softmax(per_pixel, monkeypatch):
    rng = np.random.default_rng(31)
    n, c = 4800, 5
    z = rng.normal(scale=4.0, size=(n, c)).astype(np.float32)
    y = np.where(rng.random(n) < 0.7, z.argmax(1), rng.integers(0, c, n))
    y[rng.random(n) < 0.1] = IGNORE
    w = rng.random(n)
    ids = rng.integers(0, 4, n)
    t = rng.uniform(0.5, 3.0, n) if per_pixel else 1.7
    ref = CalibrationAccumulator(c, classwise=True).update(
        y, _softmax64(z, t).astype(np.float32), image_id=ids, sample_weight=w
    )
    got = CalibrationAccumulator(c, classwise=True).update_logits(
        y, z, temperature=t, image_id=ids, sample_weight=w
    )
    assert_same(all_metrics(got), all_metrics(ref), rtol=1e-6, atol=1e-7)
    # cut into pieces, and as (N, C, H, W) with per-pixel temperatures as (N, H, W)
    monkeypatch.setattr(_inputs, "_CHUNK_ROWS", 1000)
    z4 = z.reshape(12, 20, 20, c).transpose(0, 3, 1, 2)
    t4 = np.reshape(t, (12, 20, 20)) if per_pixel else t
    four = CalibrationAccumulator(c, classwise=True).update_logits(
        y.reshape(12, 20, 20), z4, temperature=t4, image_id=ids, sample_weight=w
    )
    assert_same(all_metrics(four), all_metrics(ref), rtol=1e-6, atol=1e-7)


def test_update_logits_nll_and_brier_match_sklearn():
    rng = np.random.default_rng(32)
    z = rng.normal(scale=1.5, size=(3000, 4)) + 200.0  # large logits: no overflow
    y = rng.integers(0, 4, 3000)
    acc = CalibrationAccumulator(4).update_logits(y, z, temperature=0.8)
    p = _softmax64(z, 0.8)
    assert acc.summary()["nll"] == pytest.approx(log_loss(y, p), rel=1e-5)
    assert acc.summary()["brier"] == pytest.approx(
        np.mean(np.sum((p - np.eye(4)[y]) ** 2, axis=1)), rel=1e-5
    )
    assert acc.summary()["accuracy"] == accuracy_score(y, z.argmax(1))


def test_update_logits_keeps_the_prediction_of_a_huge_temperature():
    rng = np.random.default_rng(33)
    z = rng.normal(size=(500, 3)).astype(np.float32)
    y = z.argmax(1)
    acc = CalibrationAccumulator(3).update_logits(y, z, temperature=1e10)
    assert acc.summary()["accuracy"] == 1.0
    assert acc.summary()["ece"] == pytest.approx(1 - 1 / 3, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "positive"),
        (dict(temperature=-1.0), "positive"),
        (dict(temperature=np.inf), "positive"),
        (dict(temperature=np.ones(5)), "one per pixel"),
        (dict(logits=np.zeros((6, 4))), "4 classes"),
        (dict(logits=np.zeros(6)), "2-D"),
        (dict(logits=np.arange(18).reshape(6, 3)), "floating-point logits"),
    ],
)
def test_update_logits_bad_input_counts_nothing(kwargs, match):
    rng = np.random.default_rng(34)
    args = dict(y_true=np.arange(6) % 3, logits=rng.normal(size=(6, 3)))
    args.update(kwargs)
    y_true, logits = args.pop("y_true"), args.pop("logits")
    acc = CalibrationAccumulator(3)
    with pytest.raises((ValueError, TypeError), match=match):
        acc.update_logits(y_true, logits, **args)
    assert acc.n_pixels_ == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_update_logits_rejects_nan_and_inf_logits(bad):
    z = np.zeros((6, 3))
    z[4, 1] = bad
    acc = CalibrationAccumulator(3)
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        acc.update_logits(np.zeros(6, dtype=int), z)
    assert acc.n_pixels_ == 0
    # in an ignored pixel it does not count
    acc.update_logits(np.array([0, 0, 0, 0, IGNORE, 0]), z)
    assert acc.n_pixels_ == 5


def test_update_logits_minus_inf_is_a_masked_class():
    rng = np.random.default_rng(35)
    z = rng.normal(size=(400, 4))
    z[::3, 2] = -np.inf
    y = rng.integers(0, 4, 400)
    y[::3] = np.where(y[::3] == 2, 0, y[::3])
    got = CalibrationAccumulator(4).update_logits(y, z)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = CalibrationAccumulator(4).update(y, p)
    assert_same(all_metrics(got), all_metrics(ref), rtol=1e-6, atol=1e-7)


def test_update_logits_with_y_pred_given():
    rng = np.random.default_rng(36)
    z = rng.normal(size=(300, 4)).astype(np.float32)
    y = rng.integers(0, 4, 300)
    ref = CalibrationAccumulator(4).update_logits(y, z, temperature=2.0)
    got = CalibrationAccumulator(4).update_logits(y, z, temperature=2.0, y_pred=z.argmax(1))
    assert_same(all_metrics(got), all_metrics(ref))
    wrong = z.argmin(1)
    acc = CalibrationAccumulator(4)
    with pytest.raises(ValueError, match="not the argmax"):
        acc.update_logits(y, z, y_pred=wrong)
    with pytest.raises(ValueError, match="outside"):
        acc.update_logits(y, z, y_pred=np.full(300, 4))
    assert acc.n_pixels_ == 0


# ---------------------------------------------------------------------------
# issue 15: NLL precision, argument checks, bfloat16, y_pred in functions and scorers
# ---------------------------------------------------------------------------


def _over_confident(n=20000, c=2, seed=40):
    """float64 probabilities of an over-confident model, p(label) down to ~1e-13."""
    rng = np.random.default_rng(seed)
    z = np.clip(rng.normal(scale=10.0, size=(n, c)), -15, 15)
    y = rng.integers(0, c, size=n)  # half the confident predictions are wrong
    return y, _softmax64(z)


def test_nll_of_over_confident_probabilities_equals_log_loss():
    y, p = _over_confident()
    keep = y != IGNORE
    assert p[np.arange(y.size), y].min() < 1e-9  # far below float32's eps (1.2e-7)
    ref = log_loss(y[keep], p[keep], labels=[0, 1])  # clips at float64 eps: no-op here
    assert M.negative_log_likelihood(y, p) == pytest.approx(ref, rel=1e-9)
    acc = CalibrationAccumulator(2).update(y, p)
    assert acc.negative_log_likelihood() == pytest.approx(ref, rel=1e-9)
    # (N, C, H, W) and binary 1-D input read p(label) at float64 too
    p4 = p.reshape(5, 40, 100, 2).transpose(0, 3, 1, 2)
    assert M.negative_log_likelihood(y.reshape(5, 40, 100), p4) == pytest.approx(ref, rel=1e-9)
    assert M.negative_log_likelihood(y, p[:, 1]) == pytest.approx(  # 1 - p1 as log_loss
        log_loss(y[keep], p[keep, 1]), rel=1e-9
    )
    # a probability of exactly 0 is clipped at the dtype's smallest normal number
    zero = np.array([[1.0, 0.0]])
    assert M.negative_log_likelihood([1], zero) == pytest.approx(
        -np.log(np.finfo(np.float64).tiny)
    )
    assert M.negative_log_likelihood([1], zero.astype(np.float32)) == pytest.approx(
        -np.log(np.finfo(np.float32).tiny)
    )


def test_nll_from_logits_is_exact_without_clipping():
    from scipy.special import logsumexp

    rng = np.random.default_rng(41)
    z = rng.normal(scale=40.0, size=(5000, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=5000)
    y[::10] = IGNORE
    t = 1.3
    keep = y != IGNORE
    z64 = z[keep].astype(np.float64) / t
    ref = float(np.mean(logsumexp(z64, axis=1) - z64[np.arange(keep.sum()), y[keep]]))
    assert ref > 20  # many pixels far beyond the old 15.9-nat cap
    acc = CalibrationAccumulator(4).update_logits(y, z, temperature=t)
    assert acc.negative_log_likelihood() == pytest.approx(ref, rel=1e-6)
    per_pixel = CalibrationAccumulator(4, classwise=True).update_logits(
        y, z, temperature=np.full(5000, t)
    )
    assert per_pixel.negative_log_likelihood() == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("n_bins", [0, -3, 10.5, 10.0, True, "10", None])
def test_n_bins_must_be_a_positive_int(n_bins):
    y, p = make_data(n=200, c=3, seed=42)
    acc = CalibrationAccumulator(3, classwise=True).update(y, p)
    calls = [
        lambda: M.expected_calibration_error(y, p, n_bins=n_bins),
        lambda: M.expected_calibration_error(y, p, n_bins=n_bins, strategy="quantile"),
        lambda: M.maximum_calibration_error(y, p, n_bins=n_bins),
        lambda: M.classwise_calibration_error(y, p, n_bins=n_bins),
        lambda: M.reliability_curve(y, p, n_bins=n_bins),
        lambda: acc.expected_calibration_error(n_bins),
        lambda: acc.static_calibration_error(n_bins),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="n_bins must be a positive int"):
            call()
    assert M.expected_calibration_error(y, p, n_bins=np.int64(10)) == pytest.approx(
        ref_ce(y, p, 10), abs=1e-9
    )


@pytest.mark.parametrize("c", [2, 19, 150])
def test_bfloat16_probabilities_are_checked_with_a_bfloat16_tolerance(c):
    import torch

    g = torch.Generator().manual_seed(c)
    logits = torch.randn(20000, c, generator=g) * 4
    p = torch.softmax(logits.to(torch.bfloat16), dim=1)
    y = torch.randint(0, c, (20000,), generator=g)
    acc = CalibrationAccumulator(c).update(y, p)
    ref = CalibrationAccumulator(c, check_input=False).update(y.numpy(), p.float().numpy())
    assert_same(acc.summary(), ref.summary())
    with pytest.raises(ValueError, match="sum to 1.*bfloat16"):
        CalibrationAccumulator(c).update(y, (p.float() * 0.8).to(torch.bfloat16))


def test_misprediction_detection_rejects_non_binary_correct_and_bad_weights():
    rng = np.random.default_rng(43)
    correct = rng.random(300) < 0.7
    score = rng.random(300)
    ref = M.misprediction_detection_scores(correct, score)
    for same in (correct.astype(int), correct.astype(np.float32), correct.astype(np.uint8)):
        assert M.misprediction_detection_scores(same, score) == ref
    with pytest.raises(ValueError, match=r"binary.*\[2, 3\]"):
        M.misprediction_detection_scores(rng.integers(0, 4, 300), score)
    with pytest.raises(ValueError, match="binary"):
        M.misprediction_detection_scores(np.where(correct, "yes", "no"), score)
    w = rng.random(300)
    w[5] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        M.misprediction_detection_scores(correct, score, sample_weight=w)
    with pytest.raises(ValueError, match="sample_weight has 299"):
        M.misprediction_detection_scores(correct, score, sample_weight=np.ones(299))
    with pytest.raises(ValueError, match="tpr_level"):
        M.misprediction_detection_scores(correct, score, tpr_level=1.5)


def test_y_pred_keeps_accuracy_of_uniform_rows_in_functions_and_scorers():
    X, y = _logits(c=4, seed=44)
    keep = y != IGNORE
    model_pred = X.argmax(axis=1)
    model_acc = accuracy_score(y[keep], model_pred[keep])
    uniform = np.full(X.shape, 0.25, dtype=np.float32)  # a huge temperature's output
    assert M.pixel_accuracy(y, uniform) != pytest.approx(model_acc)  # argmax: class 0
    assert M.pixel_accuracy(y, uniform, y_pred=model_pred) == pytest.approx(model_acc)
    acc = CalibrationAccumulator(4).update(y, uniform, y_pred=model_pred)
    assert M.mean_iou(y, uniform, y_pred=model_pred) == pytest.approx(acc.mean_iou())
    for func in (M.expected_calibration_error, M.maximum_calibration_error,
                 M.rms_calibration_error):
        norm = {"expected": "l1", "maximum": "max", "rms": "l2"}[func.__name__.split("_")[0]]
        assert func(y, uniform, y_pred=model_pred) == pytest.approx(
            acc.calibration_error(15, norm=norm), abs=1e-12
        )
    curve = M.reliability_curve(y, uniform, y_pred=model_pred)
    np.testing.assert_allclose(curve.accuracy, acc.reliability_curve().accuracy)
    # scorers take the prediction from estimator.predict, the model's argmax
    hot = SoftmaxTemperature(temperature=1e10).fit(X, y)
    assert np.all(hot.predict_proba(X) == 0.25)
    assert M.get_scorer("accuracy")(hot, X, y) == pytest.approx(model_acc)
    assert M.get_scorer("miou")(hot, X, y) == pytest.approx(acc.mean_iou())
    assert M.ece_scorer(hot, X, y) == pytest.approx(-acc.expected_calibration_error())
    assert M.get_scorer("accuracy")(hot, X, y, y_pred=np.zeros_like(y)) == pytest.approx(
        M.pixel_accuracy(y, uniform)
    )


def test_negative_sample_weight_is_rejected_everywhere():
    y, p = make_data(n=300, c=3, seed=45)
    w = np.ones(300)
    w[7] = -0.5
    z = np.log(p)
    calls = [
        lambda: CalibrationAccumulator(3).update(y, p, sample_weight=w),
        lambda: CalibrationAccumulator(3).update_logits(y, z, sample_weight=w),
        lambda: M.expected_calibration_error(y, p, sample_weight=w),
        lambda: M.negative_log_likelihood(y, p, sample_weight=w),
        lambda: M.classwise_calibration_error(y, p, sample_weight=w),
        lambda: M.ece_scorer(SoftmaxTemperature().fit(z, y), z, y, sample_weight=w),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="sample_weight must be finite and non-negative"):
            call()


# ---------------------------------------------------------------------------
# the pickle-free state dict
# ---------------------------------------------------------------------------


def _through_npz(state):
    import io

    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _filled_accumulators():
    y, p = make_data(n=2400, c=4, seed=46)
    a = CalibrationAccumulator(4, classwise=True).update(y[:800], p[:800], image_id=3)
    a.update(y[800:1600], p[800:1600], image_id=np.where(np.arange(800) % 2, "left", "right"))
    a.update(y[1600:].reshape(2, 20, 20), p[1600:].reshape(2, 20, 20, 4).transpose(0, 3, 1, 2))
    b = CalibrationAccumulator(4, ignore_index=None, per_image_n_bins=7, check_input=False)
    y0 = np.where(y == IGNORE, 0, y)
    b.update_logits(y0, np.log(p), temperature=1.5, image_id="b-image")
    return a, b


def test_state_dict_round_trip_through_npz_keeps_every_metric_and_merge():
    for acc in _filled_accumulators():
        state = acc.state_dict()
        for key, value in state.items():
            assert isinstance(value, (np.ndarray, str, int, float, bool)), key
            assert not isinstance(value, np.ndarray) or value.dtype != object, key
        for restored in (
            CalibrationAccumulator.from_state_dict(state),
            CalibrationAccumulator.from_state_dict(_through_npz(state)),
        ):
            assert type(restored) is CalibrationAccumulator
            assert repr(restored) == repr(acc)
            assert restored._config() == acc._config()
            assert restored.check_input == acc.check_input
            assert_same(all_metrics(restored), all_metrics(acc), rtol=0, atol=0)
            assert restored.per_image_ece() == acc.per_image_ece()
            np.testing.assert_array_equal(restored.confusion_matrix_, acc.confusion_matrix_)
            # still an accumulator: it merges and keeps counting
            twin = acc.copy()
            assert_same(
                restored.merge(twin).summary(), acc.copy().merge(acc).summary(), rtol=0, atol=0
            )
    # tuple ids (the automatic ids of (N, C, H, W) chunks) come back as tuples
    a, _ = _filled_accumulators()
    keys = set(CalibrationAccumulator.from_state_dict(_through_npz(a.state_dict()))._images)
    assert keys == set(a._images) and any(isinstance(k, tuple) for k in keys)


def _tamper(state, **changes):
    out = dict(state)
    for key, value in changes.items():
        if value is KeyError:
            out.pop(key)
        else:
            out[key] = value
    return out


def test_from_state_dict_rejects_a_tampered_state_naming_the_key():
    a, _ = _filled_accumulators()
    s = a.state_dict()
    top = s["top"]
    cases = {
        "top": [top.astype(np.float32), top[:, :10], -top, np.where(top > 0, np.nan, top),
                top.tolist()],
        "confusion_matrix": [s["confusion_matrix"] * 2, s["confusion_matrix"][:3]],
        "n_classes": [1, "4", 1.5, True],
        "total_weight": [-1.0, np.inf, "x"],
        "image_keys": ["not json", '{"a": 1}', "[1, 1, 2, 3]", "[[{}]]"],
        "image_tallies": [s["image_tallies"][:1]],
        "classwise_tallies": [KeyError, s["classwise_tallies"][:, :, :5]],
        "format": ["pickle"],
        "version": [2],
        "uid": [KeyError, 12],
        "n_pixels": [-3],
        "ignore_index": [np.array([255, 0]), 2.5],
    }
    for key, values in cases.items():
        for value in values:
            with pytest.raises(ValueError, match=key):
                CalibrationAccumulator.from_state_dict(_tamper(s, **{key: value}))
    with pytest.raises(ValueError, match="confusion_matrix.*shape"):  # n_classes changed
        CalibrationAccumulator.from_state_dict({**s, "n_classes": 5})
    with pytest.raises(ValueError, match="unknown keys.*'extra'"):
        CalibrationAccumulator.from_state_dict({**s, "extra": 1})
    b = CalibrationAccumulator(4).update(*make_data(n=100, c=4)).state_dict()
    with pytest.raises(ValueError, match="classwise_tallies"):
        CalibrationAccumulator.from_state_dict({**b, "classwise_tallies": s["classwise_tallies"]})
    with pytest.raises(TypeError, match="image_id"):
        CalibrationAccumulator(2).update([0], [[0.5, 0.5]], image_id=b"raw").state_dict()
