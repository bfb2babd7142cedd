"""Calibrators saved by the release before the calibrators package load and predict the same.

The files under tests/data/legacy_* were written by ``sksegcal.persistence.save`` (joblib and
skops) from calibrators fitted on a tiny problem (6 images of 6x6 pixels, 3 classes), together
with the probabilities they predicted then (legacy_calibrators.npz).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from sksegcal.persistence import load

DATA = Path(__file__).parent / "data"
NAMES = ["ts", "metacal", "selective", "selective_hard", "generalised", "lts"]
CONTEXT = {"generalised", "lts"}


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(DATA / "legacy_calibrators.npz"))


@pytest.mark.parametrize("fmt", ["joblib", "skops"])
@pytest.mark.parametrize("name", NAMES)
def test_legacy_file_loads_and_predicts_the_same(name, fmt, expected):
    path = DATA / f"legacy_{name}.{fmt}"
    with warnings.catch_warnings():
        # the files record the library versions they were saved with
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        cal = load(path, trusted=fmt == "joblib")
    X = expected["Xc" if name in CONTEXT else "X"]
    proba = cal.predict_proba(X)
    np.testing.assert_allclose(proba, expected[f"{name}_proba"], rtol=1e-5, atol=1e-6)
    assert cal.reads_context == ("spatial" if name in CONTEXT else None)
