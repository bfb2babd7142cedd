"""Public names: their source is found, and the files that name them load from both paths.

Classes and functions keep the ``__module__`` Python gives them, the private module that
defines them: ``inspect.getsource`` finds their code, and new pickles and skops files name
that module. Files that name the package a name is imported from
(``sksegcal.conformal.ConformalPixelSets``, ``sksegcal.metrics.CalibrationAccumulator``, ...)
still load, and the store's calibrator fingerprint hashes the package name as it always did.

Two generations of files hold the same objects: ``skops.io.dump`` of three fitted conformal
estimators (480 pixels of 3 classes in 12 images) and ``joblib.dump`` of those with a
``CalibrationAccumulator``, two scorers, a ``StoredImage`` and four public functions.
tests/data/legacy_conformal_*.skops and legacy_public_paths.joblib were written by the code
whose public names had ``__module__`` set to their package; defining_paths_conformal_*.skops
and defining_paths.joblib by this code, naming the defining modules (a name that moves
without staying importable where it was fails here). legacy_public_paths.npz holds the
inputs and what both predicted.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pickle
import re
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest

from sksegcal import TemperatureScaling
from sksegcal.conformal import ConformalPixelSets, conformal_rank, lac_scores
from sksegcal.features import softmax
from sksegcal.metrics import (
    CalibrationAccumulator,
    ece_scorer,
    expected_calibration_error,
    negative_log_likelihood,
    nll_scorer,
)
from sksegcal.persistence import load
from sksegcal.store import LogitStore, StoredImage, calibrator_fingerprint, fit_store

DATA = Path(__file__).parent / "data"
NAMESPACES = [
    "sksegcal.store",
    "sksegcal.metrics",
    "sksegcal.conformal",
    "sksegcal.integrations.mmseg",
]
# the optional mmseg stack is an integration test, as in tests/test_mmseg.py
PARAMS = [
    pytest.param(n, marks=pytest.mark.integration) if n.endswith(".mmseg") else n
    for n in NAMESPACES
]


def _namespace(name: str):
    if name.endswith(".mmseg"):
        pytest.importorskip("mmseg")
        pytest.importorskip("mmengine")
        with warnings.catch_warnings():  # mmcv-lite and mmseg's own import-time notices
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    return importlib.import_module(name)


def _public_code(module) -> list[tuple[str, object]]:
    """(name, object) of every class and function in the module's ``__all__``."""
    out = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append((name, obj))
    return out


@pytest.fixture(scope="module")
def legacy():
    return dict(np.load(DATA / "legacy_public_paths.npz"))


@pytest.mark.parametrize("namespace", PARAMS)
def test_every_public_class_and_function_has_its_source_and_pickles_by_both_paths(namespace):
    module = _namespace(namespace)
    found = _public_code(module)
    assert len(found) >= 5, found  # each namespace exports classes and functions
    for name, obj in found:
        assert obj.__module__.startswith(f"{namespace}._"), name  # the defining module
        source = inspect.getsource(obj)  # OSError when __module__ names the package
        assert re.search(rf"^\s*(class|def) {name}\b", source, re.MULTILINE), name
        assert pickle.loads(pickle.dumps(obj)) is obj, name
        # a pickle that names the package (protocol 0: "c<module>\n<name>\n")
        assert pickle.loads(f"c{namespace}\n{name}\n.".encode()) is obj, name


# what each generation of files names: the package, or the module that defines the name
NAMED = {
    "legacy_public_paths": {
        ("sksegcal.conformal", "ConformalPixelSets"),
        ("sksegcal.conformal", "ConformalRiskControl"),
        ("sksegcal.conformal", "ScoreHistogram"),
        ("sksegcal.metrics", "CalibrationAccumulator"),
        ("sksegcal.metrics", "_SegmentationScorer"),
        ("sksegcal.metrics", "negative_log_likelihood"),
        ("sksegcal.store", "StoredImage"),
        ("sksegcal.store", "fit_store"),
    },
    "defining_paths": {
        ("sksegcal.conformal._sets", "ConformalPixelSets"),
        ("sksegcal.conformal._risk_control", "ConformalRiskControl"),
        ("sksegcal.conformal._histogram", "ScoreHistogram"),
        ("sksegcal.metrics._accumulator", "CalibrationAccumulator"),
        ("sksegcal.metrics._scorers", "_SegmentationScorer"),
        ("sksegcal.metrics._functions", "negative_log_likelihood"),
        ("sksegcal.store._logit_store", "StoredImage"),
        ("sksegcal.store._engine", "fit_store"),
    },
}


@pytest.mark.parametrize("stem", sorted(NAMED))
def test_pickles_of_either_generation_load(stem, legacy):
    asked = set()

    class Recording(joblib.numpy_pickle.NumpyUnpickler):
        def find_class(self, module, name):
            asked.add((module, name))
            return super().find_class(module, name)

    original = joblib.numpy_pickle.NumpyUnpickler
    joblib.numpy_pickle.NumpyUnpickler = Recording
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the recorded library versions
            saved = joblib.load(DATA / f"{stem}.joblib")
    finally:
        joblib.numpy_pickle.NumpyUnpickler = original
    assert NAMED[stem] <= asked, NAMED[stem] - asked  # the paths this generation names

    X, y = legacy["X"], legacy["y"]
    for name in ("sets", "risk", "pixel"):
        np.testing.assert_array_equal(saved[name].predict_set(X), legacy[name])
    acc = saved["accumulator"]
    assert isinstance(acc, CalibrationAccumulator)
    np.testing.assert_allclose(acc.expected_calibration_error(), legacy["ece"], rtol=1e-12)
    np.testing.assert_allclose(acc.negative_log_likelihood(), legacy["nll"], rtol=1e-12)
    fresh = CalibrationAccumulator(n_classes=3).update(y, softmax(X))
    np.testing.assert_allclose(
        acc.merge(fresh).negative_log_likelihood(), legacy["nll"], rtol=1e-6
    )  # the same pixels twice: the same mean
    ts = TemperatureScaling().fit(X, y)
    for old, new in zip(saved["scorers"], [nll_scorer, ece_scorer]):
        assert old(ts, X, y) == pytest.approx(new(ts, X, y), rel=1e-12)
    image = saved["image"]
    assert isinstance(image, StoredImage)
    np.testing.assert_array_equal(image.labels, y[:16].reshape(4, 4))
    assert saved["functions"] == [
        fit_store,
        expected_calibration_error,
        lac_scores,
        conformal_rank,
    ]


@pytest.mark.parametrize(
    "stem, named", [("legacy", r"conformal"), ("defining_paths", r"conformal\._\w+")]
)
@pytest.mark.parametrize("name", ["sets", "risk", "pixel"])
def test_skops_files_of_either_generation_load_without_trust(name, stem, named, legacy):
    sio = pytest.importorskip("skops.io")
    path = DATA / f"{stem}_conformal_{name}.skops"
    recorded = sio.get_untrusted_types(file=path)
    assert any(re.fullmatch(rf"sksegcal\.{named}\.[A-Z]\w+", t) for t in recorded), recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the recorded library versions
        est = load(path)  # no trusted=: the package's own types, under either path
    np.testing.assert_array_equal(est.predict_set(legacy["X"]), legacy[name])


def test_trusted_types_hold_the_defining_and_the_package_path_of_each_class():
    import sksegcal.persistence as persistence

    names = persistence.TRUSTED_TYPES
    trusted = persistence._estimator_classes() + persistence._state_classes()
    checked = 0
    for namespace in ("sksegcal.conformal", "sksegcal.store", "sksegcal.metrics"):
        for name, obj in _public_code(_namespace(namespace)):
            if obj in trusted:
                assert f"{obj.__module__}.{obj.__qualname__}" in names
                assert f"{namespace}.{name}" in names
                checked += 1
    assert checked >= 5  # the conformal estimators and their state classes


def test_store_fingerprints_of_public_names_are_unchanged(monkeypatch):
    # computed when these names' __module__ was their package (a store records it)
    assert (
        calibrator_fingerprint(
            [
                nll_scorer,
                negative_log_likelihood,
                CalibrationAccumulator,
                ConformalPixelSets,
                LogitStore,
                StoredImage,
                fit_store,
            ]
        )
        == "e114a6ac0580fb5df291d24d4b9463a892e8fa936f402bcce8aeb95628a253fa"
    )
    # every public class and function is hashed under its package name
    for namespace in NAMESPACES:
        if namespace.endswith(".mmseg") and importlib.util.find_spec("mmseg") is None:
            continue  # the optional stack: its names are checked where it is installed
        for _, obj in _public_code(_namespace(namespace)):
            expected = f"callable:{namespace}.{obj.__qualname__};"
            assert calibrator_fingerprint(obj) == hashlib.sha256(expected.encode()).hexdigest()
    # a search that scores with our scorer: as when the scorer's class said sksegcal.metrics
    from sklearn.model_selection import GridSearchCV

    from sksegcal.metrics._scorers import _SegmentationScorer

    search = GridSearchCV(TemperatureScaling(), {"chunk_size": [4096]}, scoring=nll_scorer)
    now = calibrator_fingerprint(search)
    monkeypatch.setattr(_SegmentationScorer, "__module__", "sksegcal.metrics")
    assert calibrator_fingerprint(search) == now
    # the names of other modules are hashed where they are defined, as before
    expected = "callable:sksegcal.features.softmax;"
    assert calibrator_fingerprint(softmax) == hashlib.sha256(expected.encode()).hexdigest()
