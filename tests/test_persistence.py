"""sksegcal.persistence: both formats across processes, clear errors, version warnings."""

import os
import subprocess
import sys
import textwrap
import warnings
import zipfile

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

import sksegcal
from conftest import make_logits
from sksegcal import (
    DirichletScaling,
    EnsembleTemperatureScaling,
    MetaCalScaling,
    SelectiveScalingCalibrator,
    TemperatureScaling,
    TorchMLPClassifier,
    VectorScaling,
)
from sksegcal.persistence import TRUSTED_TYPES, detect_format, load, save

try:
    import skops.io as sio
except ImportError:  # the skops format is optional; joblib tests still run
    sio = None

needs_skops = pytest.mark.skipif(sio is None, reason="skops is not installed")
FORMATS = ["joblib", pytest.param("skops", marks=needs_skops)]
AVAILABLE_FORMATS = ["joblib"] if sio is None else ["joblib", "skops"]


@pytest.fixture(scope="module")
def data():
    X, y = make_logits(n=1500, n_classes=3, seed=3)
    return X, y


@pytest.fixture(scope="module")
def fitted(data):
    """Every calibrator type, fitted once."""
    X, y = data
    mlp = TorchMLPClassifier(max_epochs=2, n_threads=1, device="cpu", random_state=0)
    return {
        "selective_mlp": SelectiveScalingCalibrator(mlp, random_state=0).fit(X, y),
        "selective_logreg": SelectiveScalingCalibrator(LogisticRegression(), random_state=0).fit(
            X, y
        ),
        "temperature": TemperatureScaling().fit(X, y),
        "vector": VectorScaling(max_iter=20).fit(X, y),
        "dirichlet": DirichletScaling(max_iter=20).fit(X, y),
        "ensemble": EnsembleTemperatureScaling().fit(X, y),
        "metacal": MetaCalScaling().fit(X, y),
    }


def _as_if_trained_on_cuda(cal):
    """A copy of a fitted calibrator whose MLP says it was trained with device='cuda'."""
    import copy

    cal = copy.deepcopy(cal)
    cal.classifier_.set_params(device="cuda")
    cal.classifier_.device_ = "cuda:0"
    return cal


def test_fresh_process_loads_each_format_with_identical_predictions(tmp_path, data, fitted):
    X, _ = data
    np.save(tmp_path / "X.npy", X)
    fitted = {**fitted, "cuda_mlp": _as_if_trained_on_cuda(fitted["selective_mlp"])}
    files = []
    for name, est in fitted.items():
        for fmt in AVAILABLE_FORMATS:
            path = save(est, tmp_path / f"{name}.{fmt}", format=fmt)
            files.append((name, fmt, path.name))
    script = textwrap.dedent(
        """
        import sys, warnings
        from pathlib import Path
        import numpy as np
        from sksegcal.persistence import load

        warnings.simplefilter("error")  # same versions: no warning expected
        folder = Path(sys.argv[1])
        X = np.load(folder / "X.npy")
        for name in sys.argv[2:]:
            # skops: the safe path, no trusted; joblib: a pickle we made ourselves
            trusted = True if name.endswith(".joblib") else None
            est = load(folder / name, trusted=trusted)
            if name.startswith("cuda_mlp"):
                # no CUDA in this process: the MLP predicts on the CPU, and says so
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    proba = est.predict_proba(X)
                assert any("predicting on the CPU" in str(w.message) for w in caught), name
            else:
                proba = est.predict_proba(X)
            np.save(folder / (name + ".proba.npy"), proba)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), *[f for _, _, f in files]],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr
    for name, fmt, fname in files:
        expected = fitted["selective_mlp" if name == "cuda_mlp" else name].predict_proba(X)
        got = np.load(tmp_path / (fname + ".proba.npy"))
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} via {fmt}")


@needs_skops
def test_skops_files_of_every_calibrator_need_no_trusted_types(tmp_path, fitted):
    for name, est in fitted.items():
        path = save(est, tmp_path / f"{name}.skops", format="skops")
        assert detect_format(path) == "skops"
        assert set(sio.get_untrusted_types(file=path)) <= set(TRUSTED_TYPES), name
        assert type(load(path)) is type(est)


def test_the_mlp_state_holds_no_torch_objects(fitted):
    import torch

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                yield from walk(v)
        else:
            yield value

    state = fitted["selective_mlp"].classifier_.__getstate__()
    assert not any(isinstance(v, torch.Tensor | torch.device) for v in walk(state))


@needs_skops
def test_constant_classifier_and_pipeline_round_trip_through_skops(tmp_path, data):
    X, y = data
    Xc = np.eye(3, dtype=np.float32)[y] * 5  # every pixel correct
    cal = SelectiveScalingCalibrator(
        LogisticRegression(), on_single_class="constant", t2=2.0, random_state=0
    ).fit(Xc, y)
    pipe = Pipeline([("cal", TemperatureScaling())]).fit(X, y)
    for est in (cal, pipe):
        path = save(est, tmp_path / "est.skops", format="skops")
        np.testing.assert_array_equal(load(path).predict_proba(X), est.predict_proba(X))


def test_pickle_is_refused_unless_trusted(tmp_path, fitted):
    path = save(fitted["temperature"], tmp_path / "ts.joblib")
    assert detect_format(path) == "joblib"
    for trusted in (None, ["sksegcal.scaling.TemperatureScaling"]):
        with pytest.raises(ValueError, match="pickle.*trusted=True"):
            load(path, trusted=trusted)
    assert load(path, trusted=True).temperature_ == fitted["temperature"].temperature_
    # a compressed joblib file is recognised too, and plain joblib.load still works
    joblib.dump(fitted["temperature"], tmp_path / "ts.gz", compress=3)
    assert detect_format(tmp_path / "ts.gz") == "joblib"
    assert isinstance(load(tmp_path / "ts.gz", trusted=True), TemperatureScaling)
    assert isinstance(joblib.load(path), TemperatureScaling)


@needs_skops
def test_untrusted_type_in_a_skops_file_is_named(tmp_path, data):
    X, y = data
    cal = SelectiveScalingCalibrator(
        LogisticRegression(), memory=joblib.Memory(location=None, verbose=0), random_state=0
    ).fit(X, y)
    path = save(cal, tmp_path / "memory.skops", format="skops")
    with pytest.raises(TypeError, match=r"joblib\.memory\.Memory") as info:
        load(path)
    assert "trusted=" in str(info.value)
    extra = [t for t in sio.get_untrusted_types(file=path) if t not in TRUSTED_TYPES]
    loaded = load(path, trusted=extra)
    np.testing.assert_array_equal(loaded.predict_proba(X), cal.predict_proba(X))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_non_calibrator_gives_a_clear_error(tmp_path, data, fmt):
    X, y = data
    lr = LogisticRegression().fit(X, y)
    path = tmp_path / f"lr.{fmt}"
    if fmt == "joblib":
        joblib.dump(lr, path)
    else:
        sio.dump(lr, path)
    with pytest.raises(TypeError, match="LogisticRegression, not a sksegcal calibrator"):
        load(path, trusted=True)
    with pytest.raises(TypeError, match="not a sksegcal calibrator"):
        save(lr, tmp_path / "x.joblib", format=fmt)


@needs_skops
def test_garbage_files_give_a_clear_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a calibrator")
    with pytest.raises(ValueError, match="neither a skops archive nor a joblib"):
        load(text, trusted=True)
    truncated = tmp_path / "broken.joblib"
    truncated.write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(ValueError, match="could not be loaded"):
        load(truncated, trusted=True)
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "no schema here")
    with pytest.raises(ValueError, match="without a skops schema.json"):
        load(archive)
    fake_skops = tmp_path / "fake.skops"
    with zipfile.ZipFile(fake_skops, "w") as z:
        z.writestr("schema.json", "{not json")
    with pytest.raises(ValueError, match="skops"):
        load(fake_skops)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.skops")


def test_unknown_format_is_refused(tmp_path, fitted):
    with pytest.raises(ValueError, match="format='pickle'"):
        save(fitted["temperature"], tmp_path / "x", format="pickle")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_version_mismatch_warns(tmp_path, fitted, monkeypatch, fmt):
    with monkeypatch.context() as m:
        m.setattr(sksegcal, "__version__", "0.0.0-old")
        path = save(fitted["temperature"], tmp_path / f"old.{fmt}", format=fmt)
    with pytest.warns(UserWarning, match=r"sksegcal 0\.0\.0-old -> "):
        load(path, trusted=True)
    # and the current version loads silently
    path = save(fitted["temperature"], tmp_path / f"new.{fmt}", format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(path, trusted=True)


# --------------------------------------------------------------------------- reliability guards
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("this object cannot be pickled")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_save_keeps_the_previous_file(tmp_path, fitted, fmt):
    path = save(fitted["temperature"], tmp_path / f"cal.{fmt}", format=fmt)
    before = path.read_bytes()
    broken = TemperatureScaling().fit(*make_logits(n=300, n_classes=3, seed=1))
    broken.poison_ = _Unpicklable()  # serialising it fails half-way through the write
    with pytest.raises(Exception, match="cannot be pickled|Unpicklable"):
        save(broken, path, format=fmt)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    assert load(path, trusted=True).temperature_ == fitted["temperature"].temperature_


def test_save_replaces_the_file_atomically(tmp_path, fitted, monkeypatch):
    path = save(fitted["temperature"], tmp_path / "cal.joblib")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    save(fitted["vector"], path)
    assert len(replaced) == 1 and str(replaced[0][1]) == str(path)
    assert os.path.dirname(replaced[0][0]) == str(tmp_path)  # same folder: a rename
    assert isinstance(load(path, trusted=True), VectorScaling)


@needs_skops
def test_trusted_false_means_safe_loading(tmp_path, fitted):
    path = save(fitted["temperature"], tmp_path / "ts.skops", format="skops")
    assert load(path, trusted=False).temperature_ == fitted["temperature"].temperature_
    pickle_path = save(fitted["temperature"], tmp_path / "ts.joblib")
    with pytest.raises(ValueError, match="trusted=True"):
        load(pickle_path, trusted=False)
    with pytest.raises(TypeError, match="trusted must be"):
        load(path, trusted=3)
    with pytest.raises(TypeError, match="must be strings"):
        load(path, trusted=[3])


def test_a_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "calibrator.joblib"
    # the classic payload: unpickling calls os.system
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    evil.write_bytes(b"\x80\x02" + payload)
    for trusted in (None, False, ["os.system"]):
        with pytest.raises(ValueError, match="pickle"):
            load(evil, trusted=trusted)
    assert not marker.exists()


@needs_skops
def test_damaged_skops_files_give_a_value_error_naming_the_file(tmp_path, fitted):
    """Truncated or overwritten archives: always ValueError/TypeError, never a raw zip error."""
    import random

    raw = save(fitted["temperature"], tmp_path / "ts.skops", format="skops").read_bytes()
    damaged = tmp_path / "damaged.skops"
    for i in range(120):
        r = random.Random(i)
        b = bytearray(raw)
        if i % 3 == 0:
            b = b[: r.randrange(len(b))]
        elif i % 3 == 1:
            for _ in range(r.randrange(1, 20)):
                b[r.randrange(len(b))] = r.randrange(256)
        else:
            j = r.randrange(len(b))
            b[j : j + 50] = bytes(min(50, len(b) - j))
        damaged.write_bytes(bytes(b))
        try:
            load(damaged)
        except (ValueError, TypeError) as exc:
            assert str(damaged) in str(exc), exc
    # the two raw errors found by fuzzing, made on purpose
    with zipfile.ZipFile(tmp_path / "cut.skops", "w") as z:
        z.writestr("schema.json", "{}")
    cut = (tmp_path / "cut.skops").read_bytes()
    (tmp_path / "cut.skops").write_bytes(cut[:-10])
    with pytest.raises(ValueError, match="cut.skops"):
        load(tmp_path / "cut.skops")


def test_conformal_estimators_save_and_load_under_the_trust_policy(tmp_path):
    pytest.importorskip("skops")
    from sksegcal.conformal import ConformalPixelSets, ConformalRiskControl

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=1200)
    X = (4.0 * (np.eye(3)[y] + rng.normal(size=(1200, 3)))).astype(np.float32)
    groups = np.arange(1200) // 60
    ts = TemperatureScaling().fit(X, y)
    for est in (
        ConformalPixelSets(0.1, calibrator=ts).fit(X, y, groups),
        ConformalPixelSets(0.1, calibrator=ts, guarantee="pixel").fit(X, y),
        ConformalRiskControl(0.1).fit(X, y, groups),
    ):
        path = save(est, tmp_path / f"{type(est).__name__}.skops", format="skops")
        loaded = load(path)  # no trust needed: the package's own types
        np.testing.assert_array_equal(loaded.predict_set(X), est.predict_set(X))
        with pytest.raises(ValueError, match="trusted=True"):
            load(save(est, tmp_path / "c.joblib"))
        assert load(tmp_path / "c.joblib", trusted=True).predict_set(X).shape == (1200, 3)


def test_trusted_types_and_the_error_come_from_the_classes():
    import sksegcal.persistence as persistence
    from sksegcal import LocalTemperatureScaling
    from sksegcal.conformal import ConformalPixelSets

    names = persistence.TRUSTED_TYPES
    for cls in (LocalTemperatureScaling, ConformalPixelSets, SelectiveScalingCalibrator):
        assert f"{cls.__module__}.{cls.__qualname__}" in names
    assert "sksegcal.selective.SelectiveScalingCalibrator" in names
    with pytest.raises(
        TypeError,
        match="LocalTemperatureScaling.*ConformalPixelSets|"
        "ConformalPixelSets.*LocalTemperatureScaling",
    ):
        save(object(), "never-written.joblib")
