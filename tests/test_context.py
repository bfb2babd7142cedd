"""Spatial context features: against direct references, borders, batches, pixel tables."""

import numpy as np
import pytest
from scipy import ndimage

from sksegcal import context as cx
from sksegcal.context import CONTEXT_FEATURES, image_context, n_context_features, spatial_context
from sksegcal.pixels import flatten_segmentation

# every test runs once per counting path (numba and NumPy): tests/conftest.py
pytestmark = pytest.mark.counting_paths

IDX = {name: i for i, name in enumerate(CONTEXT_FEATURES)}


def _two_class_map():
    """A 2-class 8x8 map: class 1 in columns 5.. and a 2x2 island of class 1 at (1, 1)."""
    pred = np.zeros((8, 8), dtype=int)
    pred[:, 5:] = 1
    pred[1:3, 1:3] = 1
    logits = np.zeros((1, 2, 8, 8), dtype=np.float32)
    logits[0, 1][pred == 1] = 3.0
    logits[0, 0][pred == 0] = 3.0
    return logits, pred


def _reference_disagreement(pred, radius):
    """generic_filter over the cut window: share of in-image neighbours of another class."""
    outside = -1

    def share(window):
        centre = window[len(window) // 2]
        others = np.delete(window, len(window) // 2)
        inside = others != outside
        return (others[inside] != centre).sum() / max(inside.sum(), 1)

    return ndimage.generic_filter(
        pred.astype(float), share, size=2 * radius + 1, mode="constant", cval=outside
    )


def _reference_box(values, radius, reduce):
    def f(window):
        window = window[~np.isnan(window)]
        return reduce(window)

    return ndimage.generic_filter(
        values.astype(float), f, size=2 * radius + 1, mode="constant", cval=np.nan
    )


def test_names_and_count():
    assert n_context_features() == len(CONTEXT_FEATURES) == 6
    logits, _ = _two_class_map()
    assert spatial_context(logits).shape == (1, 6, 8, 8)
    assert spatial_context(logits).dtype == np.float32


def test_disagreement_by_hand():
    logits, pred = _two_class_map()
    f = spatial_context(logits)[0]
    d3 = f[IDX["disagree_3x3"]]
    # interior pixel left of the vertical boundary: 3 of 8 neighbours are class 1
    assert d3[5, 4] == pytest.approx(3 / 8)
    assert d3[5, 5] == pytest.approx(3 / 8)
    # far from every boundary
    assert d3[6, 2] == 0.0 and d3[5, 7] == 0.0
    # corner (0, 0): 3 in-image neighbours, one of them (1, 1) is class 1
    assert d3[0, 0] == pytest.approx(1 / 3)
    # edge pixel (0, 4): 5 in-image neighbours, 2 of them in column 5
    assert d3[0, 4] == pytest.approx(2 / 5)
    # the island's corner (1, 1): 8 neighbours, 3 of class 1 (the island), 5 of class 0
    assert d3[1, 1] == pytest.approx(5 / 8)


@pytest.mark.parametrize("radius, name", [(1, "disagree_3x3"), (3, "disagree_7x7")])
def test_disagreement_matches_generic_filter(radius, name):
    logits, pred = _two_class_map()
    f = spatial_context(logits)[0, IDX[name]]
    np.testing.assert_allclose(f, _reference_disagreement(pred, radius), rtol=1e-6)


def test_disagreement_many_classes_random():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 5, 11, 9)).astype(np.float32)
    pred = logits[0].argmax(axis=0)
    f = spatial_context(logits)[0]
    for radius, name in [(1, "disagree_3x3"), (3, "disagree_7x7")]:
        np.testing.assert_allclose(f[IDX[name]], _reference_disagreement(pred, radius), rtol=1e-6)


def test_boundary_distance():
    logits, pred = _two_class_map()
    f = spatial_context(logits)[0, IDX["boundary_distance"]]
    boundary = _reference_disagreement(pred, 1) > 0
    expected = np.minimum(ndimage.distance_transform_edt(~boundary), 16.0)
    np.testing.assert_allclose(f, expected, rtol=1e-6)
    # by hand: column 4 and 5 are boundary, column 7 is two pixels from column 5
    assert f[5, 4] == 0.0 and f[5, 5] == 0.0 and f[6, 7] == pytest.approx(2.0)
    # clipped, and constant when the map has one class
    big = np.zeros((1, 2, 40, 40), dtype=np.float32)
    big[0, 0] = 1.0
    assert np.all(spatial_context(big)[0, IDX["boundary_distance"]] == 16.0)
    assert np.all(spatial_context(big, max_distance=3)[0, IDX["boundary_distance"]] == 3.0)
    big[0, 1, :, 0] = 2.0  # a boundary in columns 0 and 1
    d = spatial_context(big)[0, IDX["boundary_distance"]]
    assert d[0, 1] == 0.0 and d[0, 10] == pytest.approx(9.0) and d[0, 39] == 16.0


def test_entropy_and_margin_windows():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(1, 4, 9, 7)) * 2
    f = spatial_context(z.astype(np.float64))[0]
    p = np.exp(z[0] - z[0].max(0)) / np.exp(z[0] - z[0].max(0)).sum(0)
    entropy = -(p * np.log(p)).sum(0)
    top = np.sort(p, axis=0)
    margin = top[-1] - top[-2]
    np.testing.assert_allclose(
        f[IDX["entropy_mean_5x5"]], _reference_box(entropy, 2, np.mean), rtol=1e-5
    )
    np.testing.assert_allclose(
        f[IDX["entropy_max_5x5"]], _reference_box(entropy, 2, np.max), rtol=1e-5
    )
    np.testing.assert_allclose(
        f[IDX["margin_mean_5x5"]], _reference_box(margin, 2, np.mean), rtol=1e-5, atol=1e-7
    )


def test_borders_are_cut_windows():
    # a constant map: every share 0, every mean equal to the value, at the border too
    z = np.zeros((1, 3, 5, 6), dtype=np.float32)
    f = spatial_context(z)[0]
    assert np.all(f[IDX["disagree_3x3"]] == 0) and np.all(f[IDX["disagree_7x7"]] == 0)
    np.testing.assert_allclose(f[IDX["entropy_mean_5x5"]], np.log(3), rtol=1e-6)
    np.testing.assert_allclose(f[IDX["margin_mean_5x5"]], 0.0, atol=1e-7)
    # a 1x1 image has no neighbours: shares are 0
    one = spatial_context(np.ones((1, 2, 1, 1), dtype=np.float32))[0]
    assert one[IDX["disagree_3x3"]] == 0 and one[IDX["disagree_7x7"]] == 0


def test_single_class_and_dtypes():
    z = np.random.default_rng(2).normal(size=(2, 1, 6, 6))
    f = spatial_context(z)
    np.testing.assert_allclose(f[:, IDX["margin_mean_5x5"]], 1.0)
    np.testing.assert_allclose(f[:, IDX["entropy_max_5x5"]], 0.0, atol=1e-7)
    z = np.random.default_rng(3).normal(size=(2, 4, 6, 6))
    f16 = spatial_context(z.astype(np.float16))
    f32 = spatial_context(z.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(f16, f32)
    np.testing.assert_allclose(
        spatial_context(z), spatial_context(z.astype(np.float32)), atol=1e-5
    )


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    z = np.random.default_rng(4).normal(size=(2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(spatial_context(torch.from_numpy(z)), spatial_context(z))


def test_alone_or_in_batch_bit_identical():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(5, 7, 13, 17)).astype(np.float32) * 3
    batch = spatial_context(z)
    for i in range(5):
        np.testing.assert_array_equal(spatial_context(z[i : i + 1])[0], batch[i])
        np.testing.assert_array_equal(image_context(z[i]), batch[i])
    np.testing.assert_array_equal(spatial_context(list(z)), batch)
    np.testing.assert_array_equal(spatial_context(z[::-1])[::-1], batch)


@pytest.mark.skipif(not cx.HAVE_NUMBA, reason="numba is not installed")
def test_compiled_and_numpy_paths_agree_bit_for_bit():
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        z = (rng.normal(size=(9, 300)) * 4).astype(dtype)
        z[:, 0] = 1.0  # a tie
        a = cx._pixel_stats(z, compiled=True)
        b = cx._pixel_stats(z, compiled=False)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_labels_and_ignored_pixels_change_nothing():
    rng = np.random.default_rng(7)
    z = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 8, 8))
    X_all, _, _ = flatten_segmentation(z, labels, context="spatial")
    ignored = labels.copy()
    ignored[:, :3] = 255
    X_ign, _, _ = flatten_segmentation(z, ignored, context="spatial")
    keep = (ignored != 255).reshape(-1)
    np.testing.assert_array_equal(X_ign, X_all[keep])


def test_flatten_spatial_rows_equal_the_maps():
    rng = np.random.default_rng(8)
    z = (rng.normal(size=(3, 4, 10, 12)) * 2).astype(np.float32)
    labels = rng.integers(0, 4, size=(3, 10, 12))
    labels[0, 0, :5] = 255
    X, y, groups = flatten_segmentation(z, labels, context="spatial")
    X0, y0, g0 = flatten_segmentation(z, labels)
    assert X.dtype == np.float32 and X.shape == (X0.shape[0], 4 + n_context_features())
    np.testing.assert_array_equal(X[:, :4], X0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(groups, g0)
    f = spatial_context(z)
    keep = labels != 255
    np.testing.assert_array_equal(X[:, 4:], np.moveaxis(f, 1, -1)[keep])
    # a list of images of different sizes works per image
    Xl, _, _ = flatten_segmentation(
        [z[0], z[1, :, :7, :5]], [labels[0], labels[1, :7, :5]], context="spatial"
    )
    np.testing.assert_array_equal(Xl[: keep[0].sum(), 4:], np.moveaxis(f[0], 0, -1)[keep[0]])
    np.testing.assert_array_equal(
        Xl[keep[0].sum() :, 4:], np.moveaxis(image_context(z[1, :, :7, :5]), 0, -1).reshape(-1, 6)
    )


def test_errors():
    z = np.zeros((1, 2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="context must be None"):
        flatten_segmentation(z, np.zeros((1, 4, 4), int), context="spatal")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        spatial_context(z[0])
    with pytest.raises(ValueError, match="max_distance"):
        spatial_context(z, max_distance=0)
    bad = z.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        spatial_context(bad)
    with pytest.raises(TypeError, match="floating-point"):
        spatial_context(np.zeros((1, 2, 4, 4), dtype=int))


# ---------------------------------------------------------------------------
# the window kernels (numba) and the NumPy fallback against brute-force loops
# ---------------------------------------------------------------------------
def _paths():
    """The kernels of both paths: None (NumPy) and, with numba, the compiled ones."""
    kernels = cx._compiled_kernels() if cx.HAVE_NUMBA else None
    return [None] + ([kernels] if kernels is not None else [])


def _brute_disagreement(pred, radius):
    """A loop over the pixels and the window offsets, the window cut at the edge."""
    h, w = pred.shape
    share = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            differ = neighbours = 0
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    yy, xx = y + dy, x + dx
                    if (dy or dx) and 0 <= yy < h and 0 <= xx < w:
                        neighbours += 1
                        differ += pred[yy, xx] != pred[y, x]
            share[y, x] = differ / neighbours if neighbours else 0.0
    return share.astype(np.float32)


def _brute_distance(boundary, max_distance):
    """Distance from every pixel to every boundary pixel, the minimum, clipped."""
    points = np.argwhere(boundary)
    grid = np.indices(boundary.shape).reshape(2, -1).T
    if not len(points):
        return np.full(boundary.shape, max_distance, np.float32)
    d2 = ((grid[:, None, :] - points[None, :, :]) ** 2).sum(-1).min(1).astype(np.float64)
    return np.minimum(np.sqrt(d2), max_distance).astype(np.float32).reshape(boundary.shape)


@pytest.mark.parametrize(
    "shape, n_classes",
    [((9, 11), 3), ((1, 12), 2), ((12, 1), 4), ((2, 2), 2), ((6, 7), 300), ((5, 9), 1)],
)
def test_disagreement_kernels_match_a_brute_force_loop(shape, n_classes):
    rng = np.random.default_rng(sum(shape) + n_classes)
    # blocks of classes (boundaries) plus isolated pixels; > 255 classes: the int32 code
    pred = rng.integers(0, n_classes, size=shape).astype(np.int32)
    pred[: shape[0] // 2] = pred[0, 0]
    for kernels in _paths():
        d3, d7, boundary = cx._disagreement(pred, kernels)
        np.testing.assert_array_equal(d3, _brute_disagreement(pred, 1))
        np.testing.assert_array_equal(d7, _brute_disagreement(pred, 3))
        np.testing.assert_array_equal(boundary, _brute_disagreement(pred, 1) > 0)
    # classes 254 and 255 themselves (the uint8 code keeps 255 for the outside)
    pred = (254 + (np.arange(np.prod(shape)).reshape(shape) % 2)).astype(np.int32)
    for kernels in _paths():
        np.testing.assert_array_equal(
            cx._disagreement(pred, kernels)[1], _brute_disagreement(pred, 3)
        )


@pytest.mark.parametrize("max_distance", [1.0, 2.5, 3.0, 7.0, 16.0, 40.0, 1000.0])
def test_boundary_distance_matches_brute_force_on_both_paths(max_distance):
    rng = np.random.default_rng(int(max_distance * 10))
    for shape, density in [((23, 31), 0.02), ((40, 9), 0.005), ((1, 30), 0.1), ((17, 17), 0.0)]:
        boundary = rng.random(shape) < density
        boundary[shape[0] // 2, 0] |= density > 0  # at least one, at the edge
        expected = _brute_distance(boundary, max_distance)
        for kernels in _paths():
            got = cx._boundary_distance(boundary, max_distance, kernels)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected)


def test_box_kernels_give_the_fallback_bits():
    rng = np.random.default_rng(11)
    # magnitudes over many decades: a change of summation order would show in float64
    values = (rng.random((13, 10)) * 10.0 ** rng.integers(-12, 6, size=(13, 10))).astype(
        np.float32
    )
    for radius in (1, 2, 3):
        means = [cx._box_mean(values, radius, k) for k in _paths()]
        maxima = [cx._box_max(values, radius, k) for k in _paths()]
        np.testing.assert_allclose(means[0], _reference_box(values, radius, np.mean), rtol=1e-6)
        np.testing.assert_array_equal(maxima[0], _reference_box(values, radius, np.max))
        for m in means[1:]:
            np.testing.assert_array_equal(m.view(np.uint32), means[0].view(np.uint32))
        for m in maxima[1:]:
            np.testing.assert_array_equal(m, maxima[0])
    for shape in [(1, 1), (1, 6), (6, 1), (3, 4)]:  # windows larger than the image
        v = rng.random(shape).astype(np.float32)
        for k in _paths():
            np.testing.assert_allclose(
                cx._box_mean(v, 2, k), _reference_box(v, 2, np.mean), rtol=1e-6
            )
            np.testing.assert_array_equal(cx._box_max(v, 2, k), _reference_box(v, 2, np.max))


@pytest.mark.skipif(not cx.HAVE_NUMBA, reason="numba is not installed")
def test_pixel_stats_paths_agree_on_ties_and_signed_zeros():
    rng = np.random.default_rng(12)
    z = rng.choice(np.float32([0.0, -0.0, 1.0, -1.0, 3.0]), size=(6, 500))
    z[:, :3] = 0.0
    z[::2, 3] = -0.0
    a = cx._pixel_stats(z, compiled=True)
    b = cx._pixel_stats(z, compiled=False)
    np.testing.assert_array_equal(a[0], z.argmax(axis=0))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))


@pytest.mark.skipif(not cx.HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("n_classes, max_distance", [(3, 16.0), (19, 2.5), (300, 40.0)])
def test_whole_image_paths_agree_bit_for_bit(monkeypatch, n_classes, max_distance):
    from sksegcal import _kernels

    rng = np.random.default_rng(n_classes)
    z = ndimage.uniform_filter(rng.normal(size=(2, n_classes, 37, 29)), size=(1, 1, 5, 5))
    z = (z * 20).astype(np.float32)
    monkeypatch.setattr(_kernels, "HAVE_NUMBA", True)
    fast = spatial_context(z, max_distance=max_distance)
    monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)
    slow = spatial_context(z, max_distance=max_distance)
    np.testing.assert_array_equal(fast.view(np.uint32), slow.view(np.uint32))
