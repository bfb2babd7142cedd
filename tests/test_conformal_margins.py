"""ConformalMargins against a brute-force dilation / erosion loop (2-D and 3-D), its
guarantee over random image splits, the too-few-images message and the store path."""

import copy
import warnings

import numpy as np
import pytest
from scipy import ndimage

from sksegcal.conformal import (
    ConformalMargins,
    evaluate_conformal_store,
    fit_conformal_store,
)
from sksegcal.conformal._margins import margin_scores


def _brute_force_scores(pred, truth, labelled, connectivity, limit=40):
    """The fewest dilations covering the truth and erosions inside it, by a loop."""
    s = ndimage.generate_binary_structure(pred.ndim, connectivity)
    grown, outer = pred.copy(), np.inf
    for k in range(limit):
        if not (truth & labelled & ~grown).any():
            outer = k
            break
        grown = ndimage.binary_dilation(grown, structure=s)
    shrunk, inner = pred.copy(), np.inf
    for k in range(limit):
        if not (shrunk & labelled & ~truth).any():
            inner = k
            break
        shrunk = ndimage.binary_erosion(shrunk, structure=s)
    return outer, inner


def _blobs(rng, shape, n_blobs=2):
    m = np.zeros(shape, bool)
    for _ in range(n_blobs):
        c = [rng.integers(0, n) for n in shape]
        r = rng.integers(1, 4)
        sl = tuple(slice(max(0, x - r), x + r) for x in c)
        m[sl] = True
    return m


@pytest.mark.parametrize(
    "shape, connectivity",
    [((14, 12), 1), ((14, 12), 2), ((7, 8, 6), 1), ((7, 8, 6), 2), ((7, 8, 6), 3)],
)
def test_scores_and_masks_match_a_dilation_loop(shape, connectivity):
    rng = np.random.default_rng(connectivity + len(shape))
    s = ndimage.generate_binary_structure(len(shape), connectivity)
    for trial in range(12):
        pred, truth = _blobs(rng, shape), _blobs(rng, shape)
        labelled = rng.random(shape) > 0.1
        if trial == 0:
            pred[:] = False  # an empty prediction misses a present class for ever
        got = margin_scores(pred, truth, labelled, connectivity)
        assert got == _brute_force_scores(pred, truth, labelled, connectivity)
    # the estimator's masks: the predicted mask dilated / eroded margin_ times, by a loop
    n = 12
    truth = np.stack([_blobs(rng, shape, 1) for _ in range(n)]).astype(np.int64)
    noise = rng.normal(size=(n, 2, *shape))
    logits = np.stack([-truth, truth], 1) * 2.0 + noise
    m = ConformalMargins(alpha=0.2, margin="both", connectivity=connectivity).fit(logits, truth)
    inner, outer = m.predict_masks(logits)
    pred = m.predict_mask(logits)
    assert np.array_equal(pred, logits.argmax(1) == 1)
    for i in range(n):
        o, e = pred[i].copy(), pred[i].copy()
        for _ in range(int(m.outer_margin_)):
            o = ndimage.binary_dilation(o, structure=s)
        for _ in range(int(m.inner_margin_)):
            e = ndimage.binary_erosion(e, structure=s)
        assert np.array_equal(outer[i], o) and np.array_equal(inner[i], e)


def _scored_images(n_images, seed):
    rng = np.random.default_rng(seed)
    truth = np.zeros((n_images, 16, 16), np.int64)
    for i in range(n_images):
        r, c = rng.integers(4, 12, size=2)
        h, w = rng.integers(2, 5, size=2)
        truth[i, r - h : r + h, c - w : c + w] = 1
    blur = rng.uniform(0.5, 3.0, size=(n_images, 1, 1, 1))  # images differ in difficulty
    logits = np.stack([-truth, truth], 1) * 2.0 + blur * rng.normal(size=(n_images, 2, 16, 16))
    return logits, truth


def test_margins_hold_over_random_image_splits():
    logits, truth = _scored_images(120, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one image alone cannot support alpha
        single = [
            ConformalMargins(alpha=0.2).fit(logits[i : i + 1], truth[i : i + 1])
            for i in range(120)
        ]
    alpha, n_cal, n_splits = 0.2, 19, 200
    rng = np.random.default_rng(1)
    hold = []
    for _ in range(n_splits):
        perm = rng.permutation(120)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            est = copy.deepcopy(single[perm[0]])
            for i in perm[1:n_cal]:  # merging per-image states: one fit on all the images
                est.merge(single[i])
        # the margins are the ceil((n + 1)(1 - alpha/2))-th smallest scores: 18th of 19
        assert est.outer_margin_ == np.sort(est.outer_scores_)[17]
        assert est.inner_margin_ == np.sort(est.inner_scores_)[17]
        o_test, i_test = single[perm[n_cal]].outer_scores_[0], single[perm[n_cal]].inner_scores_[0]
        # the promise for the test image: both of its scores within the margins
        hold.append([o_test <= est.outer_margin_, i_test <= est.inner_margin_])
    hold = np.array(hold)
    both = hold.all(axis=1).mean()
    assert both >= 1 - alpha - 3 * np.sqrt(alpha * (1 - alpha) / n_splits)
    # each side at alpha/2: (n + 1)(1 - alpha/2) = 18 of 19, so each side is tight-ish
    assert hold.mean(axis=0).min() >= 1 - alpha / 2 - 3 * np.sqrt(0.1 * 0.9 / n_splits)


def test_too_few_images_say_how_many_are_needed():
    logits, truth = _scored_images(12, seed=2)
    with pytest.warns(
        UserWarning,
        match=r"12 calibration images cannot support alpha=0.1 "
        r"\(alpha/2 on each side.*at least 19 images are needed",
    ):
        m = ConformalMargins(alpha=0.1).fit(logits, truth)
    inner, outer = m.predict_masks(logits)
    assert outer.all() and not inner.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = ConformalMargins(alpha=0.2, margin="outer").fit(logits[:8], truth[:8])
        # two maps a unit (two acquisitions of a scene): a unit's score is its maps' largest
        pairs = ConformalMargins(alpha=0.2, margin="outer").fit(
            logits[:8], truth[:8], groups=[0, 0, 1, 1, 2, 2, 3, 3]
        )  # 4 units >= 1/0.2 - 1
    assert np.array_equal(pairs.outer_scores_, one.outer_scores_.reshape(4, 2).max(1))
    assert pairs.n_calibration_ == 4


def test_one_channel_models_and_store_path(tmp_path):
    from sksegcal.store import LogitStore

    logits, truth = _scored_images(14, seed=3)
    logits = logits.astype(np.float16).astype(np.float32)
    one = ConformalMargins(alpha=0.2, margin="outer").fit(logits[:, 1:] - logits[:, :1], truth)
    two = ConformalMargins(alpha=0.2, margin="outer").fit(logits, truth)
    assert np.array_equal(one.outer_scores_, two.outer_scores_)
    store = LogitStore.create(tmp_path / "s", n_classes=2)
    for i in range(14):
        store.add_image(i, logits[i], truth[i])
    ref = ConformalMargins(alpha=0.2).fit(logits[:10], truth[:10])
    got = fit_conformal_store(
        ConformalMargins(alpha=0.2),
        store,
        images=np.arange(10),
        n_jobs=2,
        backend="threading",
        task_pixels=300,
    )
    assert np.array_equal(got.outer_scores_, ref.outer_scores_)
    assert (got.outer_margin_, got.inner_margin_) == (ref.outer_margin_, ref.inner_margin_)
    acc = evaluate_conformal_store({"m": got}, store, images=np.arange(10, 14))["m"]
    inner, outer = ref.predict_masks(logits[10:])
    covers = [not (truth[i] & ~outer[i - 10]).any() for i in range(10, 14)]
    assert acc.summary()["outer_covers"] == np.mean(covers)
    assert acc.summary()["mean_outer_area"] == outer.sum((1, 2)).mean()
