"""Conformal sets over a store with a calibrator that reads the spatial context."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from sksegcal import SelectiveScalingCalibrator
from sksegcal.conformal import ConformalPixelSets, evaluate_conformal_store, fit_conformal_store
from sksegcal.pixels import flatten_segmentation
from sksegcal.store import LogitStore


@pytest.fixture
def maps():
    rng = np.random.default_rng(3)
    n, c, h, w = 10, 3, 12, 12
    blocks = rng.integers(0, c, size=(n, 3, 3))
    labels = np.kron(blocks, np.ones((4, 4), dtype=int)).astype(np.uint8)
    labels[:, 0, :3] = 255  # some ignored pixels: the context is computed before they drop
    logits = 3.0 * (
        np.moveaxis(np.eye(c)[np.minimum(labels, c - 1)], -1, 1)
        + 1.0 * rng.normal(size=(n, c, h, w))
    )
    # the store keeps float16: compare with the in-memory path on the same values
    return logits.astype(np.float16).astype(np.float32), labels


def test_store_path_gives_the_in_memory_sets_with_spatial_context(maps, tmp_path):
    logits, labels = maps
    X, y, groups = flatten_segmentation(logits, labels, context="spatial")
    cal = SelectiveScalingCalibrator(
        context="spatial", classifier=LogisticRegression(), guard=None, random_state=0, t2=100.0
    ).fit(X, y)
    store = LogitStore.create(tmp_path / "s", n_classes=3)
    for i in range(len(labels)):
        store.add_image(i, logits[i], labels[i])

    calib, test = np.arange(6), np.arange(6, 10)
    want = ConformalPixelSets(guarantee="pixel", alpha=0.1, calibrator=cal).fit(
        X[np.isin(groups, calib)], y[np.isin(groups, calib)]
    )
    got = fit_conformal_store(
        ConformalPixelSets(guarantee="pixel", alpha=0.1, calibrator=cal), store, images=calib
    )
    assert got.n_features_in_ == 3 + 6
    assert got.threshold_level_ == want.threshold_level_

    acc = evaluate_conformal_store({"sets": got}, store, images=test)["sets"]
    rows = np.isin(groups, test)
    sets = want.predict_set(X[rows])
    covered = sets[np.arange(rows.sum()), y[rows]]
    assert acc.coverage() == pytest.approx(covered.mean(), abs=1e-12)
    assert acc.mean_set_size() == pytest.approx(sets.sum(axis=1).mean(), abs=1e-12)
