"""Common mistakes are caught where they happen, with the hint that fixes them."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
from sksegcal.features import softmax
from sksegcal.persistence import detect_format, save
from sksegcal.pixels import flatten_segmentation


def _logits(n=600, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    X = (4.0 * (np.eye(c)[y] + rng.normal(size=(n, c)))).astype(np.float32)
    return X, y


def _maps(n=2, c=3, h=5, w=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, c, h, w)).astype(np.float32), rng.integers(0, c, size=(n, h, w))


def test_probabilities_given_as_logits_warn_naming_input_type():
    X, y = _logits()
    with pytest.warns(UserWarning, match='input_type="probabilities"'):
        TemperatureScaling().fit(softmax(X), y)
    with pytest.warns(UserWarning, match='input_type="probabilities"'):
        SelectiveScalingCalibrator(t1=1.0, t2=2.0, random_state=0).fit(softmax(X), y)
    # logits, and probabilities declared as such, are silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TemperatureScaling().fit(X, y)
        TemperatureScaling(input_type="probabilities").fit(softmax(X), y)


@pytest.mark.parametrize("ndim", [4, 5])
def test_maps_given_to_fit_and_predict_name_flatten_segmentation(ndim):
    logits, labels = _maps()
    if ndim == 5:
        logits, labels = logits[:, :, None], labels[:, None]
    with pytest.raises(ValueError, match=r"flatten_segmentation.*predict_proba_maps"):
        TemperatureScaling().fit(logits, labels)
    X, y, _ = flatten_segmentation(*_maps())
    ts = TemperatureScaling().fit(X, y)
    shape = re.escape(f"shape {tuple(logits.shape)}")
    with pytest.raises(ValueError, match=shape + ".*flatten_segmentation"):
        ts.predict_proba(logits)


def test_channels_last_maps_name_moveaxis():
    logits, labels = _maps(h=5, w=6)
    last = np.moveaxis(logits, 1, -1)  # (N, H, W, C)
    with pytest.raises(ValueError, match=r"channels-last.*np\.moveaxis\(logits, -1, 1\)"):
        flatten_segmentation(last, labels)
    # the fix named in the message works
    X, y, _ = flatten_segmentation(np.moveaxis(last, -1, 1), labels)
    assert X.shape == (2 * 5 * 6, 3)


def test_float_labels_warn():
    X, y = _logits()
    with pytest.warns(UserWarning, match=r"y holds floats \(float64\).*astype"):
        TemperatureScaling().fit(X, y.astype(np.float64))


def test_saving_an_unfitted_estimator_is_refused(tmp_path):
    with pytest.raises(NotFittedError, match=r"not fitted.*Call fit"):
        save(TemperatureScaling(), tmp_path / "ts.joblib")
    assert not (tmp_path / "ts.joblib").exists()


def test_format_contradicting_the_file_name_is_refused(tmp_path):
    pytest.importorskip("skops")
    ts = TemperatureScaling().fit(*_logits())
    with pytest.raises(ValueError, match=r"format='skops'.*'ts\.joblib'.*'ts\.skops'"):
        save(ts, tmp_path / "ts.joblib", format="skops")
    with pytest.raises(ValueError, match=r"format='joblib'.*'ts\.skops'"):
        save(ts, tmp_path / "ts.skops", format="joblib")
    # without format the suffix decides
    assert detect_format(save(ts, tmp_path / "ts.skops")) == "skops"
    assert detect_format(save(ts, tmp_path / "ts.joblib")) == "joblib"


def test_fit_without_groups_says_it_splits_pixels_instead():
    X, y = _logits()
    with pytest.warns(UserWarning, match=r"got no groups.*random pixels.*Pass groups"):
        SelectiveScalingCalibrator(random_state=0).fit(X, y)
    # with image ids, or with fixed temperatures (no hold-out), it is silent about groups
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*groups")
        SelectiveScalingCalibrator(random_state=0).fit(X, y, groups=np.arange(len(y)) // 50)
        SelectiveScalingCalibrator(t1=1.0, t2=2.0, random_state=0).fit(X, y)
