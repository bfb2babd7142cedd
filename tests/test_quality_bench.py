"""The quality benchmark's model regimes and boundary split (benchmarks/quality.py).

The benchmark turns the shipped networks' logits into other models (already calibrated,
under-confident, fewer classes) and scores boundary and interior pixels apart; a mistake
there would make every figure of docs/quality.md about another model than it says. Each
transform is checked against a direct formula or a brute-force loop.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from sksegcal.metrics import expected_calibration_error, negative_log_likelihood
from sksegcal.pixels import flatten_segmentation

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _maps(seed=0, n=3, c=6, h=12, w=10, block=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=(n, h // block, w // block)).astype(np.uint8)
    labels = np.kron(labels, np.ones((1, block, block), dtype=np.uint8))
    logits = 3.0 * (np.moveaxis(np.eye(c)[labels], -1, 1) + rng.normal(size=(n, c, h, w)))
    return logits.astype(np.float32), labels


def test_merged_softmax_is_the_sum_of_each_groups_probabilities(quality):
    logits, _ = _maps()
    groups = np.array([0, 1, 1, 2, 2, 2])
    merged = quality.merge_classes(logits, groups)
    assert merged.shape == (3, 3, 12, 10)
    p = softmax(logits.astype(np.float64), axis=1)
    direct = np.stack([p[:, groups == g].sum(axis=1) for g in range(3)], axis=1)
    np.testing.assert_allclose(softmax(merged.astype(np.float64), axis=1), direct, atol=1e-6)
    # the merged logit itself: log of the sum of exponentials, by a loop over the classes
    ref = np.zeros(merged.shape)
    for k, g in enumerate(groups):
        ref[:, g] += np.exp(logits[:, k].astype(np.float64))
    np.testing.assert_allclose(merged, np.log(ref), rtol=1e-6, atol=1e-5)


def test_merge_rejects_unused_groups(quality):
    logits, _ = _maps()
    with pytest.raises(ValueError, match="group"):
        quality.merge_classes(logits, np.array([0, 2, 2, 2, 2, 2]))


def test_merge_labels_keeps_the_ignore_index(quality):
    labels = np.array([[[0, 1, 2], [3, 255, 5]]], dtype=np.uint8)
    groups = np.array([0, 1, 1, 2, 2, 2])
    out = quality.merge_labels(labels, groups)
    np.testing.assert_array_equal(out, [[[0, 1, 1], [2, 255, 2]]])


def test_aal_groups_from_region_names(quality):
    names = (
        "background",
        "Precentral_L",
        "Precentral_R",
        "Cerebelum_3_L",
        "Cerebelum_3_R",
        "Vermis_3",
        "Thalamus_L",
    )
    np.testing.assert_array_equal(quality.aal_groups(names, 4), [0, 1, 2, 3, 3, 3, 1])
    np.testing.assert_array_equal(quality.aal_groups(names, 2), [0, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="neither"):
        quality.aal_groups(("background", "Midline"), 4)


def test_ts_divided_regime_is_globally_calibrated(quality):
    logits, labels = _maps(seed=1)
    temperature = quality.fitted_ts_temperature(logits, labels)
    # the temperature is NLL's minimiser, found here by scipy on the direct formula
    z = np.moveaxis(logits, 1, -1).reshape(-1, logits.shape[1]).astype(np.float64)
    y = labels.reshape(-1)

    def nll(t):
        return -log_softmax(z / t, axis=1)[np.arange(len(y)), y].mean()

    ref = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-8}).x
    assert temperature == pytest.approx(ref, rel=1e-3)
    names = tuple(f"c{i}" for i in range(6))
    divided, same_labels, n_classes = quality.regime_maps(
        "ts-divided", logits, labels, names, temperature
    )
    assert n_classes == 6 and same_labels is labels
    np.testing.assert_allclose(divided, logits / np.float32(temperature), rtol=1e-6)
    # TS on the divided model finds nothing left to do
    assert quality.fitted_ts_temperature(divided, labels) == pytest.approx(1.0, abs=1e-3)
    scaled = quality.regime_maps("x0.6", logits, labels, names, temperature)[0]
    np.testing.assert_array_equal(scaled, logits * np.float32(0.6))
    assert quality.regime_maps("original", logits, labels, names, temperature)[0] is logits


def test_merged_regime_on_aal_names(quality):
    logits, labels = _maps(c=5)
    names = ("background", "Precentral_L", "Precentral_R", "Cerebelum_3_L", "Vermis_3")
    z, t, n_classes = quality.regime_maps("merged-4", logits, labels, names, 1.0)
    assert n_classes == 4 and z.shape[1] == 4
    np.testing.assert_array_equal(t, np.array([0, 1, 2, 3, 3])[labels])


def _brute_boundary(t, width):
    h, w = t.shape
    edge = np.zeros_like(t, dtype=bool)
    for i in range(h):
        for j in range(w):
            window = t[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            edge[i, j] = (window != t[i, j]).any()
    near = np.zeros_like(edge)
    pts = np.argwhere(edge)
    for i in range(h):
        for j in range(w):
            if len(pts):
                near[i, j] = (np.hypot(pts[:, 0] - i, pts[:, 1] - j) <= width).any()
    return near


@pytest.mark.parametrize("width", [1, 2])
def test_local_boundary_mask_against_a_loop(quality, width):
    # the fallback for a package without sksegcal.metrics.boundary_mask
    rng = np.random.default_rng(3)
    labels = np.zeros((3, 13, 11), dtype=np.uint8)
    labels[0, :, 6:] = 1  # one straight boundary
    labels[1] = rng.integers(0, 3, size=(13, 11)) * (rng.random((13, 11)) < 0.1)
    # labels[2]: a single class, no boundary at all
    mask = quality._local_boundary_mask(labels, width=width)
    for t, m in zip(labels, mask):
        np.testing.assert_array_equal(m, _brute_boundary(t, width))
    assert not mask[2].any()
    # the straight boundary: columns 5 and 6 are boundary pixels; width px on each side
    assert mask[0].any(axis=0).tolist() == [abs(c - 5.5) <= width + 0.5 for c in range(11)]


def test_benchmark_uses_the_packages_boundary_band(quality):
    metrics = pytest.importorskip("sksegcal.metrics")
    if not hasattr(metrics, "boundary_mask"):
        pytest.skip("this package has no sksegcal.metrics.boundary_mask yet")
    _, labels = _maps(seed=5, h=24, w=20, block=4)
    np.testing.assert_array_equal(
        quality.label_boundary_mask(labels), metrics.boundary_mask(labels)
    )


def test_boundary_and_interior_ece_equal_the_one_shot_metric(quality):
    logits, labels = _maps(seed=4, h=48, w=40, block=8)  # 8x8 regions: an interior exists
    X, y, g = flatten_segmentation(logits, labels)
    boundary = quality.label_boundary_mask(labels).reshape(-1)
    assert 0 < boundary.mean() < 1
    r = quality.evaluate(None, X, y, 6, groups=g, boundary=boundary)
    p = softmax(X.astype(np.float64), axis=1).astype(np.float32)
    for region, m in (("boundary", boundary), ("interior", ~boundary)):
        assert r[f"ece_{region}"] == pytest.approx(
            expected_calibration_error(y[m], p[m]), abs=1e-6
        )
        assert r[f"nll_{region}"] == pytest.approx(negative_log_likelihood(y[m], p[m]), rel=1e-5)
    assert r["share_boundary"] == pytest.approx(boundary.mean())


def test_goals_report_counts_splits_and_means(quality):
    def runs(ece, nll):
        return [{"ece": e, "nll": n} for e, n in zip(ece, nll)]

    ts = runs([0.10, 0.20], [1.0, 1.0])
    results = {
        "a": {"TS": ts, quality.SEARCH: runs([0.05, 0.21], [0.99, 1.00005])},
        "a [x0.6]": {"TS": ts, quality.SEARCH: runs([0.10, 0.10], [1.0, 1.01])},
        "a shifted": {"TS": ts, quality.SEARCH: runs([0.2, 0.1], [1.004, 0.9])},
    }
    row = [r for r in quality.goals_report(results, list(results)) if quality.SEARCH in r]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    # in-domain ECE ratios 0.5, 1.05, 1.0, 0.5: one above TS; NLL 0.99, 1.00005 (within
    # the 1e-4 tolerance), 1.0, 1.01: one above
    assert cells[1:] == ["1 of 4", "1 of 4", "0.762", "0.775", "1.0040", "1.250"]


def test_only_keeps_the_named_methods(quality):
    chosen = quality.spatial_methods(0, None, only=["search", "lts"])
    assert set(chosen) == {"Uncalibrated", "TS", quality.DEFAULT, quality.SEARCH, quality.LTS}
    assert quality.SEARCH_SHIFT in quality.spatial_methods(0, None, only=["search-shift"])
    assert quality.SEARCH_SHIFT not in quality.spatial_methods(
        0, None, perturbed=False, only=["search-shift"]
    )
