"""3-D volumes, (N, C, D, H, W): metrics, the boundary band, against flattened pixels and loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sksegcal.metrics import (
    BOUNDARY_REGIONS,
    CalibrationAccumulator,
    boundary_accumulator,
    boundary_mask,
    brier_score,
    expected_calibration_error,
    maximum_calibration_error,
    mean_iou,
    negative_log_likelihood,
    pixel_accuracy,
)

IGNORE = 255


def _volumes(n=2, c=3, shape=(5, 6, 7), seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=(n, *shape))
    logits = 3.0 * (np.moveaxis(np.eye(c)[labels], -1, 1) + rng.normal(size=(n, c, *shape)))
    labels[:, 0, :2] = IGNORE
    return logits.astype(np.float32), labels


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _flat(values, labels):
    c = values.shape[1]
    return np.moveaxis(values, 1, -1).reshape(-1, c), labels.reshape(-1)


@pytest.mark.parametrize(
    "metric",
    [
        expected_calibration_error,
        maximum_calibration_error,
        negative_log_likelihood,
        brier_score,
        pixel_accuracy,
        mean_iou,
    ],
)
def test_metrics_of_volumes_equal_those_of_their_flattened_voxels(metric):
    logits, labels = _volumes()
    proba = _softmax(logits)
    X, y = _flat(proba, labels)
    assert metric(labels, proba) == pytest.approx(metric(y, X), rel=1e-12)


def test_the_accumulator_counts_volumes_as_images():
    logits, labels = _volumes(n=3)
    proba = _softmax(logits)
    volume = CalibrationAccumulator(3)
    volume.update(labels, proba)
    from_logits = CalibrationAccumulator(3)
    from_logits.update_logits(labels, logits)
    X, y = _flat(proba, labels)
    flat = CalibrationAccumulator(3)
    flat.update(y, X, image_id=np.repeat(np.arange(3), labels[0].size))
    expected = flat.summary()
    for key, value in volume.summary().items():
        assert value == pytest.approx(expected[key], rel=1e-12), key  # per-volume ECE too
    for key, value in from_logits.summary().items():
        assert value == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


def _brute_force_boundary(labels, width, distance):
    """A labelled voxel is on the boundary when a labelled voxel within ``width`` differs."""
    out = np.zeros(labels.shape, bool)
    r = range(-width, width + 1)
    if distance == "chebyshev":
        offsets = list(itertools.product(r, r, r))
    else:
        offsets = [o for o in itertools.product(r, r, r) if sum(v * v for v in o) <= width**2]
    d, h, w = labels.shape
    for z, y, x in itertools.product(range(d), range(h), range(w)):
        a = labels[z, y, x]
        if a == IGNORE:
            continue
        for dz, dy, dx in offsets:
            q = (z + dz, y + dy, x + dx)
            if all(0 <= v < s for v, s in zip(q, labels.shape)):
                b = labels[q]
                if b != IGNORE and b != a:
                    out[z, y, x] = True
                    break
    return out


@pytest.mark.parametrize("distance", ["chebyshev", "euclidean"])
@pytest.mark.parametrize("width", [1, 2])
def test_the_3d_boundary_mask_equals_a_brute_force_loop(width, distance):
    rng = np.random.default_rng(width)
    # blocky labels, so that the band is neither empty nor everything
    labels = np.kron(rng.integers(0, 3, size=(3, 3, 3)), np.ones((3, 3, 3), int))[:7, :8, :9]
    labels[rng.random(labels.shape) < 0.05] = IGNORE
    got = boundary_mask(labels, width=width, distance=distance, spatial_dims=3)
    expected = _brute_force_boundary(labels, width, distance)
    assert 0 < expected.sum() < (labels != IGNORE).sum()
    np.testing.assert_array_equal(got, expected)
    # a batch of volumes: each on its own, no window reaching into the next volume
    batch = boundary_mask(np.stack([labels, labels[::-1]]), width=width, distance=distance,
                          spatial_dims=3)  # fmt: skip
    np.testing.assert_array_equal(batch[1], _brute_force_boundary(labels[::-1], width, distance))


def test_a_label_change_along_depth_alone_is_a_boundary():
    labels = np.zeros((6, 4, 4), int)
    labels[3:] = 1  # the classes differ only between slices 2 and 3
    got = boundary_mask(labels, width=1, spatial_dims=3)
    assert got[2:4].all() and not got[:2].any() and not got[4:].any()
    # the 2-D default reads (6, 4, 4) as six images, each of one class: no boundary
    assert not boundary_mask(labels, width=1).any()


def test_boundary_accumulator_on_volumes():
    logits, labels = _volumes(n=2, shape=(6, 6, 6))
    acc = boundary_accumulator(labels, logits=logits, width=1)
    assert acc.regions == BOUNDARY_REGIONS
    mask = np.stack([_brute_force_boundary(t, 1, "chebyshev") for t in labels])
    assert acc.region("boundary").n_pixels_ == mask.sum()
    assert acc.region("interior").n_pixels_ == ((labels != IGNORE) & ~mask).sum()
    X, y = _flat(_softmax(logits), labels)
    inner = mask.reshape(-1)
    assert acc.region("boundary").summary()["ece"] == pytest.approx(
        expected_calibration_error(y[inner], X[inner]), rel=1e-6
    )


def test_volume_shapes_are_checked():
    with pytest.raises(ValueError, match="spatial_dims=3"):
        boundary_mask(np.zeros((2, 3, 4, 5), int))
    with pytest.raises(ValueError, match="spatial_dims"):
        boundary_mask(np.zeros((3, 4, 5), int), spatial_dims=4)


def test_conformal_risk_control_counts_each_volume_as_one_image():
    from sksegcal.conformal import ConformalRiskControl

    logits, labels = _volumes(n=12, shape=(4, 5, 6), seed=3)
    X, y = _flat(logits, labels)
    groups = np.repeat(np.arange(12), labels[0].size)
    params = dict(alpha=0.2, loss="fnr", target_class=1)
    volumes = ConformalRiskControl(**params).fit_maps(logits[:8], labels[:8])
    table = ConformalRiskControl(**params).fit(X[: groups.searchsorted(8)],
                                               y[: groups.searchsorted(8)],
                                               groups[: groups.searchsorted(8)])  # fmt: skip
    assert volumes.n_calibration_ == 8  # volumes, not slices
    assert volumes.threshold_level_ == table.threshold_level_
    masks = volumes.predict_mask_maps(logits[8:])
    assert masks.shape == (4, 4, 5, 6)
    flat = table.predict_mask(X[groups >= 8]).reshape(4, 4, 5, 6)
    np.testing.assert_array_equal(masks, flat)
    sizes = volumes.predict_set_size_maps(logits[8:])
    np.testing.assert_array_equal(sizes, volumes.predict_set_maps(logits[8:]).sum(1))


def test_set_size_maps_of_volumes_show_a_slice():
    pytest.importorskip("matplotlib")
    from sksegcal.plotting import plot_set_size_maps

    sizes = np.ones((2, 5, 4, 4), int)
    sizes[:, 1] = 3  # only slice 1 differs
    fig = plot_set_size_maps({"CRC": sizes}, n_classes=3, slice_index=1)
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(shown, sizes[0, 1])
    middle = plot_set_size_maps({"CRC": sizes}, n_classes=3).axes[1].images[0].get_array()
    np.testing.assert_array_equal(middle, sizes[1, 2])


def _brute_force_context(z, max_distance=16.0):
    """The six context features of a (C, D, H, W) volume, voxel by voxel from the definitions."""
    from scipy.special import softmax

    p = softmax(z.astype(np.float64), axis=0)
    pred = z.argmax(0)
    entropy = -(p * np.log(p)).sum(0)
    top = np.sort(p, axis=0)
    margin = top[-1] - top[-2]
    shape = pred.shape
    out = np.zeros((6, *shape))

    def window(a, centre, r):
        return a[tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, n in zip(centre, shape))]

    boundary = np.zeros(shape, bool)
    for v in itertools.product(*map(range, shape)):
        for k, r in enumerate((1, 3)):
            win = window(pred, v, r)
            differ = (win != pred[v]).sum()
            out[(k, *v)] = differ / (win.size - 1)
            if r == 1:
                boundary[v] = differ > 0
        out[(3, *v)] = window(entropy, v, 2).mean()
        out[(4, *v)] = window(entropy, v, 2).max()
        out[(5, *v)] = window(margin, v, 2).mean()
    where = np.argwhere(boundary)
    for v in itertools.product(*map(range, shape)):
        nearest = np.sqrt(((where - v) ** 2).sum(1)).min() if len(where) else max_distance
        out[(2, *v)] = min(nearest, max_distance)
    return out


def test_the_3d_context_features_equal_a_brute_force_loop():
    from sksegcal._volume_context import volume_context

    rng = np.random.default_rng(0)
    # smooth-ish classes (blocks) plus noise, so that every feature varies
    blocks = np.kron(rng.normal(size=(3, 2, 2, 3)), np.ones((1, 3, 4, 3)))[:, :5, :7, :8]
    z = (4 * blocks + rng.normal(size=blocks.shape)).astype(np.float32)
    got = volume_context(z, max_distance=3.0)
    expected = _brute_force_context(z, max_distance=3.0)
    assert 0 < (expected[2] == 0).mean() < 1  # some boundary, some interior
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_store_holds_volumes_and_reads_them_as_flattened_voxels(tmp_path):
    from sksegcal import TemperatureScaling
    from sksegcal.store import LogitStore, evaluate_store, fit_store

    logits, labels = _volumes(n=3, shape=(4, 5, 6), seed=2)
    logits = logits.astype(np.float16)
    store = LogitStore.create(tmp_path / "s", n_classes=3)
    for i in range(3):
        store.add_image(f"vol{i}", logits[i], labels[i])
    store = LogitStore.open(tmp_path / "s")
    assert store.verify()["n_images"] == 3
    image = store.load_image(store.image_id("vol1"))
    np.testing.assert_array_equal(image.logits, logits[1])
    np.testing.assert_array_equal(image.labels, labels[1])
    # pixel tables: the labelled voxels in row-major order, in chunks that cut volumes
    keep = labels != IGNORE
    X, y = np.moveaxis(logits, 1, -1)[keep], labels[keep]
    groups = np.nonzero(keep)[0]
    chunks = list(store.iter_chunks(37))
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), X)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), y)
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), groups)
    through = fit_store(TemperatureScaling(), store, images=None, max_pixels=10**6)
    direct = TemperatureScaling().fit(X.astype(np.float32), y)
    assert through.temperature_ == pytest.approx(direct.temperature_, rel=1e-6)
    acc = evaluate_store(store, {"TS": through})["TS"]
    assert acc.expected_calibration_error() == pytest.approx(
        expected_calibration_error(y, through.predict_proba(X.astype(np.float32))), rel=1e-5
    )
    with pytest.raises(ValueError, match=r"\(3, D, H, W\)"):
        store.add_image("bad", logits[0][None], labels[0])


def test_pixel_tables_of_volumes_and_back():
    from sksegcal import TemperatureScaling
    from sksegcal.pixels import flatten_segmentation, predict_proba_maps, unflatten_segmentation

    logits, labels = _volumes(n=2, shape=(4, 5, 6), seed=4)
    X, y, groups = flatten_segmentation(logits, labels)
    keep = labels != IGNORE
    np.testing.assert_array_equal(X, np.moveaxis(logits, 1, -1)[keep])
    np.testing.assert_array_equal(groups, np.nonzero(keep)[0])
    back = unflatten_segmentation(X, labels)
    np.testing.assert_array_equal(back[:, :, keep[0] & keep[1]], logits[:, :, keep[0] & keep[1]])
    ts = TemperatureScaling().fit(X, y)
    maps = predict_proba_maps(ts, logits)
    flat = ts.predict_proba(np.moveaxis(logits, 1, -1).reshape(-1, 3))
    np.testing.assert_allclose(maps, np.moveaxis(flat.reshape(2, 4, 5, 6, 3), -1, 1), rtol=1e-6)
    # the spatial context of a volume is the 3-D one, at the kept voxels
    Xc, _, _ = flatten_segmentation(logits, labels, context="spatial")
    expected = np.moveaxis(_brute_force_context(logits[0]), 0, -1)[keep[0]]
    np.testing.assert_allclose(Xc[groups == 0, 3:], expected, rtol=1e-5, atol=1e-5)


def test_store_paths_on_volumes_predict_and_boundary(tmp_path):
    from sksegcal import TemperatureScaling
    from sksegcal.pixels import flatten_segmentation, predict_proba_maps
    from sksegcal.store import LogitStore, evaluate_store, predict_store

    logits, labels = _volumes(n=2, shape=(4, 5, 6), seed=5)
    logits = logits.astype(np.float16)
    store = LogitStore.create(tmp_path / "s", n_classes=3)
    for i in range(2):
        store.add_image(i, logits[i], labels[i])
    X, y, _ = flatten_segmentation(logits.astype(np.float32), labels)
    ts = TemperatureScaling().fit(X, y)
    out = predict_store(ts, store, tmp_path / "p")
    expected = predict_proba_maps(ts, logits.astype(np.float32)).astype(np.float16)
    for i in range(2):
        np.testing.assert_array_equal(out.load_image(i).logits, expected[i])
    acc = evaluate_store(store, {"TS": ts}, boundary_width=1)["TS"]
    mask = np.stack([_brute_force_boundary(t, 1, "chebyshev") for t in labels])
    assert acc.region("boundary").n_pixels_ == mask.sum()


# a few small volumes: too few images for risk control at alpha=0.1 (its sets are then full)
@pytest.mark.filterwarnings("ignore:ConformalRiskControl. too few calibration units")
def test_the_command_line_on_volumes(tmp_path, monkeypatch):
    import json

    from sksegcal.cli import main
    from sksegcal.store import LogitStore

    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 3, (12, 2, 3, 3)), np.ones((1, 2, 2, 2), int))
    logits = 3 * np.moveaxis(np.eye(3)[labels], -1, 1) + 2 * rng.normal(size=(12, 3, 4, 6, 6))
    monkeypatch.chdir(tmp_path)
    np.save("logits.npy", logits.astype(np.float32))
    np.save("labels.npy", labels)
    assert main(["extract", "--logits", "logits.npy", "--labels", "labels.npy", "-q",
                 "--store", "s"]) == 0  # fmt: skip
    store = LogitStore.open("s")
    assert store.load_image(0).logits.shape == (3, 4, 6, 6)
    assert main(["fit", "s", "--method", "temperature", "-o", "ts.joblib", "-q"]) == 0
    assert main(["evaluate", "s", "--boundary-width", "1", "-o", "res", "-q"]) == 0
    result = json.loads((tmp_path / "res" / "metrics.json").read_text())["results"]["test"]
    store = LogitStore.open("s")  # with the split that fit recorded
    test = store.split.test
    z = np.stack([store.load_image(i).logits for i in test]).astype(np.float32)
    t = np.stack([store.load_image(i).labels for i in test])
    proba = np.exp(z - z.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    assert result["uncalibrated"]["ece"] == pytest.approx(expected_calibration_error(t, proba))
    mask = np.stack([_brute_force_boundary(v, 1, "chebyshev") for v in t])
    assert result["uncalibrated"]["boundary_n_pixels"] == mask.sum()
    assert main(["conformal", "s", "-c", "ts.joblib", "--trusted", "-o", "conf", "-q"]) == 0
    assert (tmp_path / "conf" / "set_sizes.png").is_file()
