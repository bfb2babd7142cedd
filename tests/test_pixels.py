import numpy as np
import pytest

from sksegcal.pixels import (
    flatten_segmentation,
    predict_proba_maps,
    sample_pixels,
    split_images,
    unflatten_segmentation,
)


def _reference_flatten(logits, labels, ignore_index):
    rows, ys, gs = [], [], []
    n, c, h, w = logits.shape
    for i in range(n):
        for r in range(h):
            for col in range(w):
                if labels[i, r, col] != ignore_index:
                    rows.append(logits[i, :, r, col])
                    ys.append(labels[i, r, col])
                    gs.append(i)
    return np.array(rows), np.array(ys), np.array(gs)


def test_flatten_matches_pixel_loop(segmentation_data):
    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits[:3], labels[:3])
    X_ref, y_ref, g_ref = _reference_flatten(logits[:3], labels[:3], 255)
    np.testing.assert_array_equal(X, X_ref)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(groups, g_ref)
    assert X.dtype == logits.dtype and y.dtype == np.int64


def test_flatten_accepts_images_of_different_sizes():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 2, 7))]
    labels = [np.zeros((4, 5), int), np.full((2, 7), 2)]
    X, y, groups = flatten_segmentation(logits, labels)
    assert X.shape == (34, 3)
    assert np.bincount(groups).tolist() == [20, 14]


def test_unflatten_is_the_inverse(segmentation_data):
    logits, labels = segmentation_data
    X, y, groups = flatten_segmentation(logits, labels)
    maps = unflatten_segmentation(X, labels)
    keep = labels != 255
    np.testing.assert_array_equal(np.moveaxis(maps, 1, -1)[keep], np.moveaxis(logits, 1, -1)[keep])
    assert np.isnan(np.moveaxis(maps, 1, -1)[~keep]).all()
    np.testing.assert_array_equal(unflatten_segmentation(y, labels, fill_value=255), labels)


def test_unflatten_rejects_wrong_row_count(segmentation_data):
    logits, labels = segmentation_data
    X, _, _ = flatten_segmentation(logits, labels)
    with pytest.raises(ValueError, match="rows but the labels keep"):
        unflatten_segmentation(X[:-1], labels)


def test_predict_proba_maps_matches_pixel_table(segmentation_data):
    from sksegcal import TemperatureScaling

    logits, labels = segmentation_data
    X, y, _ = flatten_segmentation(logits, labels)
    ts = TemperatureScaling().fit(X, y)
    maps = predict_proba_maps(ts, logits)
    full = np.moveaxis(logits, 1, -1).reshape(-1, logits.shape[1])
    np.testing.assert_allclose(
        np.moveaxis(maps, 1, -1).reshape(full.shape), ts.predict_proba(full), rtol=1e-6
    )


@pytest.mark.parametrize(
    "logits_shape, labels_shape, match",
    [
        ((2, 3, 4), (2, 4), r"\(N, C, H, W\)"),
        ((2, 3, 4, 4), (2, 4), r"\(N, H, W\)"),
        ((2, 3, 4, 4), (3, 4, 4), "2 images but labels hold 3"),
        ((2, 3, 4, 4), (2, 4, 5), "resize"),
    ],
)
def test_flatten_shape_errors(logits_shape, labels_shape, match):
    with pytest.raises(ValueError, match=match):
        flatten_segmentation(np.zeros(logits_shape), np.zeros(labels_shape, int))


def test_flatten_value_errors():
    logits = np.zeros((1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*\[7\]"):
        flatten_segmentation(logits, np.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="Every pixel has the ignore index"):
        flatten_segmentation(logits, np.full((1, 2, 2), 255))
    bad = logits.copy()
    bad[0, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        flatten_segmentation(bad, np.zeros((1, 2, 2), int))
    # ignore_index=None keeps 255, which is then out of range
    with pytest.raises(ValueError, match="outside"):
        flatten_segmentation(logits, np.full((1, 2, 2), 255), ignore_index=None)


def test_split_images_is_a_seeded_partition():
    split = split_images(20, validation_size=0.2, test_size=0.3, random_state=3)
    parts = [set(p.tolist()) for p in split]
    assert [len(p) for p in parts] == [10, 4, 6]
    assert set().union(*parts) == set(range(20))
    assert sum(len(p) for p in parts) == 20
    again = split_images(20, validation_size=0.2, test_size=0.3, random_state=3)
    assert all(np.array_equal(a, b) for a, b in zip(split, again))
    other = split_images(20, validation_size=0.2, test_size=0.3, random_state=4)
    assert not all(np.array_equal(a, b) for a, b in zip(split, other))


def test_split_masks_and_predefined_fold():
    groups = np.repeat(np.arange(8), 5)
    split = split_images(groups, random_state=0)
    train, val, test = split.masks(groups)
    assert (train.astype(int) + val + test == 1).all()
    fold = split.test_fold(groups)
    assert set(np.unique(groups[fold == 0])) == set(split.validation.tolist())
    assert set(np.unique(groups[fold == -2])) == set(split.test.tolist())


def test_split_images_errors():
    with pytest.raises(ValueError, match="leave images for training"):
        split_images(10, validation_size=0.5, test_size=0.5)
    with pytest.raises(ValueError, match="cannot be split"):
        split_images(2)


def test_sample_pixels_keeps_strata_shares():
    rng = np.random.default_rng(0)
    correct = rng.random(100_000) < 0.93
    idx = sample_pixels(len(correct), 10_000, strata=correct, random_state=0)
    assert len(idx) == 10_000 and np.all(np.diff(idx) > 0)
    assert abs((~correct[idx]).sum() - (~correct).sum() / 10) <= 1
    np.testing.assert_array_equal(idx, sample_pixels(len(correct), 10_000, strata=correct,
                                                     random_state=0))
    # a very rare stratum keeps at least one pixel
    rare = np.zeros(100_000, bool)
    rare[5] = True
    assert 5 in sample_pixels(len(rare), 100, strata=rare, random_state=1)


def test_sample_pixels_returns_everything_when_small():
    np.testing.assert_array_equal(sample_pixels(5, 10), np.arange(5))
    with pytest.raises(ValueError, match="at least 1"):
        sample_pixels(5, 0)


def test_sample_pixels_never_exceeds_the_budget():
    assert len(sample_pixels(3, 1, strata=np.array([0, 1, 1]), random_state=0)) == 1
    strata = np.repeat(np.arange(50), 3)
    assert len(sample_pixels(150, 20, strata=strata, random_state=0)) == 20
    assert len(sample_pixels(150, 70, strata=strata, random_state=0)) == 70
