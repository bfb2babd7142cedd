"""ConformalPixelSets' image-level guarantee (the default) against a brute-force search,
random image splits of correlated images, and the too-few-images message."""

import math
import warnings

import numpy as np
import pytest

from sksegcal.conformal import (
    ConformalPixelSets,
    ConformalRiskControl,
    fit_conformal_store,
)
from sksegcal.conformal._base import images_needed


def _two_class(scores):
    """Probabilities whose true class (0) has LAC score ``scores``."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.stack([1.0 - s, s], axis=1), np.zeros(len(s), dtype=np.int64)


def _hard_and_easy_images(n_images, pixels, seed):
    """Scores of images that are hard (15 %) or easy as a whole: pixels of one image agree."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n_images) < 0.15
    return np.where(
        hard[:, None],
        rng.uniform(0.3, 1.0, (n_images, pixels)),
        rng.uniform(0.0, 0.4, (n_images, pixels)),
    )


def _brute_force_image_threshold(scores_per_image, alpha):
    """The smallest exact score lambda with n/(n+1) mean_i miss_i(lambda) + 1/(n+1) <= alpha."""
    n = len(scores_per_image)
    for lam in np.unique(np.concatenate(scores_per_image)):
        risk = np.mean([np.mean(s > lam) for s in scores_per_image])
        if n / (n + 1) * risk + 1 / (n + 1) <= alpha:
            return lam
    return np.inf


@pytest.mark.parametrize("alpha", [0.1, 0.2])
@pytest.mark.filterwarnings("ignore:.*cannot support:UserWarning")
def test_image_threshold_matches_a_brute_force_search(alpha):
    rng = np.random.default_rng(3)
    sizes = rng.integers(5, 40, size=23)  # images of different sizes: a mean over images
    scores = [rng.beta(1, 3 + 4 * rng.random(), size=k).astype(np.float32) for k in sizes]
    X, y = _two_class(np.concatenate(scores))
    groups = np.repeat(np.arange(len(sizes)), sizes)
    est = ConformalPixelSets(alpha=alpha, input_type="probabilities").fit(X, y, groups)
    lam = _brute_force_image_threshold([s.astype(np.float64) for s in scores], alpha)
    # the grid level of the exact lambda: a class is in the set iff ceil(s G) <= level
    assert est.threshold_level_ == math.ceil(lam * est.n_bins)
    assert est.n_calibration_ == len(sizes) and est.n_required_ == images_needed(alpha)
    # the default is conformal risk control of the miscoverage fraction
    crc = ConformalRiskControl(alpha=alpha, input_type="probabilities").fit(X, y, groups)
    assert crc.threshold_level_ == est.threshold_level_
    # one pixel table or images in any chunks, merged: the same threshold
    a = ConformalPixelSets(alpha=alpha, input_type="probabilities")
    for part in np.array_split(np.arange(len(sizes)), 4):
        rows = np.isin(groups, part)
        a.partial_fit(X[rows], y[rows], groups[rows])
    assert a.threshold_level_ == est.threshold_level_
    with pytest.raises(ValueError, match="already added"):
        a.partial_fit(X[:3], y[:3], groups[:3])


def test_image_coverage_holds_over_random_splits_where_pooled_pixels_do_not():
    # 10 calibration images at alpha = 0.1, images hard or easy as a whole: the pooled pixel
    # quantile gives new images about 0.87 on average; the image-level default at least 0.9
    scores = _hard_and_easy_images(200, 20, seed=0)
    alpha, n_cal, n_splits = 0.1, 10, 120
    rng = np.random.default_rng(0)
    cover = {"image": [], "pixel": []}
    for _ in range(n_splits):
        perm = rng.permutation(len(scores))
        X, y = _two_class(scores[perm[:n_cal]])
        Xt, yt = _two_class(scores[perm[n_cal:]])
        groups = np.repeat(np.arange(n_cal), scores.shape[1])
        for guarantee in cover:
            est = ConformalPixelSets(
                alpha=alpha, guarantee=guarantee, input_type="probabilities", n_bins=4096
            ).fit(X, y, groups)
            cover[guarantee].append(est.predict_set(Xt)[:, 0].mean())  # equal-size images
    image, pixel = np.array(cover["image"]), np.array(cover["pixel"])
    se = image.std() / np.sqrt(n_splits)
    assert image.mean() >= 1 - alpha - 2 * se
    # the pixel guarantee is not one over images: with so few images it falls short
    assert pixel.mean() < 1 - alpha - 3 * pixel.std() / np.sqrt(n_splits)


def test_too_few_images_say_how_many_are_needed():
    X, y = _two_class(np.linspace(0, 0.5, 80))
    groups = np.repeat(np.arange(8), 10)
    with pytest.warns(
        UserWarning,
        match=r"8 calibration images cannot support alpha=0.1: "
        r"at least 9 images are needed",
    ):
        est = ConformalPixelSets(alpha=0.1, input_type="probabilities").fit(X, y, groups)
    assert np.isinf(est.threshold_) and est.predict_set(X).all() and est.n_required_ == 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nine images are enough
        groups9 = np.repeat(np.arange(9), 10)[:80]
        groups9[-8:] = 8
        ConformalPixelSets(alpha=0.1, input_type="probabilities").fit(X, y, groups9)
    assert [images_needed(a) for a in (0.1, 0.05, 0.2, 0.01, 0.3)] == [9, 19, 4, 99, 3]
    with pytest.raises(ValueError, match="groups is required.*guarantee='pixel'"):
        ConformalPixelSets(input_type="probabilities").fit(X, y)
    with pytest.warns(UserWarning, match="calibration pixels cannot support alpha=0.01"):
        ConformalPixelSets(alpha=0.01, guarantee="pixel", input_type="probabilities").fit(
            X[:5], y[:5]
        )


def test_maps_and_store_path_know_the_images(tmp_path):
    from sksegcal.store import LogitStore

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(12, 6, 5))
    z = 3.0 * (np.moveaxis(np.eye(3)[labels], -1, 1) + rng.normal(size=(12, 3, 6, 5)))
    proba = np.exp(z - z.max(1, keepdims=True))
    proba = (proba / proba.sum(1, keepdims=True)).astype(np.float16).astype(np.float32)
    kw = {"alpha": 0.2, "input_type": "probabilities"}
    ref = ConformalPixelSets(**kw).fit_maps(proba[:10], labels[:10])
    assert ref.n_calibration_ == 10 and ref.state_.n_images_ == 10
    store = LogitStore.create(tmp_path / "s", n_classes=3, values="probabilities")
    for i in range(12):
        store.add_image(i, proba[i], labels[i])
    est = fit_conformal_store(ConformalPixelSets(**kw), store, images=np.arange(10))
    assert est.threshold_level_ == ref.threshold_level_ and est.n_calibration_ == 10
    # several maps one unit: as fit on the pixel table with the units as groups
    units = np.repeat(np.arange(5), 2)
    pairs = ConformalPixelSets(**kw).fit_maps(proba[:10], labels[:10], groups=units)
    X = np.moveaxis(proba[:10], 1, -1).reshape(-1, 3)
    direct = ConformalPixelSets(**kw).fit(X, labels[:10].reshape(-1), np.repeat(units, 30))
    assert pairs.n_calibration_ == 5 and pairs.threshold_level_ == direct.threshold_level_
    # 3-D maps: one image per volume
    vol = ConformalPixelSets(**kw).fit_maps(proba[:10, :, None], labels[:10, None])
    assert vol.threshold_level_ == ref.threshold_level_
    assert vol.predict_set_maps(proba[10:, :, None]).shape == (2, 3, 1, 6, 5)


def test_metadata_routing_passes_groups():
    import sklearn
    from sklearn.pipeline import Pipeline

    X, y = _two_class(np.linspace(0, 0.5, 100))
    groups = np.repeat(np.arange(10), 10)
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = Pipeline([("sets", ConformalPixelSets(alpha=0.2, input_type="probabilities"))])
        pipe.fit(X, y, groups=groups)
    assert pipe[-1].n_calibration_ == 10
