"""Tests of sksegcal.store: the on-disk LogitStore and out-of-core evaluation."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from sksegcal.features import log_softmax
from sksegcal.metrics import CalibrationAccumulator
from sksegcal.pixels import flatten_segmentation, predict_proba_maps
from sksegcal.scaling import TemperatureScaling, VectorScaling
from sksegcal.store import LogitStore, evaluate_store, fit_store, predict_store

# every test runs once per counting path (numba and NumPy): tests/conftest.py
pytestmark = pytest.mark.counting_paths

N_CLASSES = 4
REPO = Path(__file__).resolve().parents[1]


def make_images(n=6, seed=0, n_classes=N_CLASSES, sizes=((12, 9), (7, 15), (10, 10))):
    """Overconfident logits with partly right labels and some ignored pixels."""
    rng = np.random.default_rng(seed)
    logits, labels = [], []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        z = rng.normal(scale=3.0, size=(n_classes, h, w)).astype(np.float32)
        t = np.where(rng.random((h, w)) < 0.6, z.argmax(0), rng.integers(0, n_classes, (h, w)))
        t[rng.random((h, w)) < 0.1] = 255
        logits.append(z)
        labels.append(t.astype(np.int64))
    return logits, labels


def build_store(path, logits, labels, **kwargs):
    store = LogitStore.create(path, n_classes=logits[0].shape[0], **kwargs)
    for i, (z, t) in enumerate(zip(logits, labels)):
        store.add_image(i, z, t)
    return store


def table(store, **kwargs):
    parts = list(zip(*store.iter_chunks(**kwargs)))
    return tuple(np.concatenate(p) for p in parts)


@pytest.fixture
def images():
    return make_images()


@pytest.fixture
def store(tmp_path, images):
    return build_store(tmp_path / "store", *images, source={"model": "toy"})


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("chunk_pixels", [1, 37, 10_000])
def test_round_trip_equals_flatten_segmentation(store, images, chunk_pixels):
    logits, labels = images
    # the store keeps float16: compare with the same rounding applied in memory
    X_ref, y_ref, g_ref = flatten_segmentation([z.astype(np.float16) for z in logits], labels)
    chunks = list(store.iter_chunks(chunk_pixels))
    assert all(len(c[1]) == chunk_pixels for c in chunks[:-1])
    X, y, groups = (np.concatenate(p) for p in zip(*chunks))
    assert X.dtype == np.float32 and y.dtype == np.int64 and groups.dtype == np.int64
    np.testing.assert_array_equal(X, X_ref.astype(np.float32))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(groups, g_ref)
    # float16 rounding is within half an ulp of the original logits
    X32, _, _ = flatten_segmentation(logits, labels)
    np.testing.assert_allclose(X, X32, rtol=2**-11, atol=2**-24)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
    n_classes=st.integers(2, 5),
    ignore_index=st.sampled_from([255, None, 0]),
    chunk_pixels=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(shapes, n_classes, ignore_index, chunk_pixels, seed):
    rng = np.random.default_rng(seed)
    logits = [rng.normal(scale=5, size=(n_classes, h, w)).astype(np.float16) for h, w in shapes]
    labels = [rng.integers(0, n_classes, size=(h, w)) for h, w in shapes]
    if ignore_index == 255:
        for t in labels:
            t[rng.random(t.shape) < 0.3] = 255
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "s", logits, labels, ignore_index=ignore_index)
        kept = sum(int((t != ignore_index).sum()) for t in labels)
        assert store.n_pixels == kept
        if kept == 0:
            assert list(store.iter_chunks(chunk_pixels)) == []
            return
        X_ref, y_ref, g_ref = flatten_segmentation(logits, labels, ignore_index=ignore_index)
        X, y, groups = table(store, chunk_pixels=chunk_pixels)
        np.testing.assert_array_equal(X, X_ref)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(groups, g_ref)
        Xs, ys, gs = store.sample(max(1, kept // 2), random_state=seed)
        assert len(ys) == max(1, kept // 2)
        assert np.all(np.diff(gs) >= 0)


def test_reopen_and_memory_maps(store, images, tmp_path):
    logits, labels = images
    reopened = LogitStore.open(tmp_path / "store", n_classes=N_CLASSES)
    assert reopened.image_names == list(range(6))
    assert reopened.source == {"model": "toy"}
    assert reopened.n_pixels == sum(int((t != 255).sum()) for t in labels)
    assert reopened.labels_dtype == np.uint8
    for img in reopened.iter_images([1, 4]):
        assert isinstance(img.logits, np.memmap) and img.logits.dtype == np.float16
        np.testing.assert_array_equal(img.logits, logits[img.id].astype(np.float16))
        np.testing.assert_array_equal(img.labels, labels[img.id])
    clone = pickle.loads(pickle.dumps(reopened))
    assert len(pickle.dumps(reopened)) < 10_000
    np.testing.assert_array_equal(table(clone)[0], table(reopened)[0])


def test_names_sort_and_escape(tmp_path):
    store = LogitStore.create(tmp_path / "s", n_classes=2, ignore_index=None)
    # all-tied logits: the recorded correctness count must use argmax's first-max rule
    z, t = np.zeros((2, 2, 3)), np.array([[0, 1, 0], [1, 1, 0]])
    for name in [10, 2, "b/c d", "a", "10", "s-10"]:
        store.add_image(name, z, t)
    # integers numerically, then strings; "10" and 10 are different images
    assert store.image_names == [2, 10, "10", "a", "b/c d", "s-10"]
    assert LogitStore.open(tmp_path / "s").image_names == store.image_names
    assert store.image_id("b/c d") == 4
    assert store.missing([2, 3, "a", "z"]) == [3, "z"]
    assert len(list((tmp_path / "s" / "images").glob("*.json"))) == 6
    assert store.record(0)["n_correct"] == 3
    X, y, _ = store.sample(7, random_state=0)  # recounts correctness while reading
    assert len(y) == 7 and (y == 0).sum() in (3, 4)
    assert store.n_pixels == 36  # ignore_index=None keeps every pixel
    # another handle on the same store sees the images written through the first
    other = LogitStore.open(tmp_path / "s")
    store.add_image("late", z, t)
    with pytest.raises(ValueError, match="already in"):
        other.add_image("late", z, t)


def test_large_label_space_and_negative_ignore(tmp_path):
    rng = np.random.default_rng(0)
    store = LogitStore.create(tmp_path / "s", n_classes=300, ignore_index=-1)
    t = rng.integers(0, 300, (4, 5))
    t[0, 0] = -1
    store.add_image("x", rng.normal(size=(300, 4, 5)), t)
    assert store.labels_dtype == np.int16
    X, y, _ = table(store)
    assert X.shape == (19, 300) and y.min() >= 0


# ----------------------------------------------------------------------------- errors
def test_resume_compares_the_source(tmp_path, images):
    logits, labels = images
    path = tmp_path / "s"
    first = {"checkpoint": "a.pth", "version": "1.0"}
    # an empty store takes the source it is resumed with
    LogitStore.create(path, n_classes=N_CLASSES, source={"checkpoint": "old.pth"})
    store = LogitStore.create(path, n_classes=N_CLASSES, source=first, exist_ok=True)
    assert LogitStore.open(path).source == first
    store.add_image(0, logits[0], labels[0])
    with pytest.raises(ValueError, match=r"checkpoint='a.pth', not 'b.pth'.*mix"):
        LogitStore.create(
            path,
            n_classes=N_CLASSES,
            exist_ok=True,
            source={"checkpoint": "b.pth", "version": "1.0"},
        )
    # only the named keys are compared; keys one side lacks are not
    resumed = LogitStore.create(
        path,
        n_classes=N_CLASSES,
        exist_ok=True,
        source={"checkpoint": "a.pth", "version": "2.0"},
        match_source=["checkpoint"],
    )
    resumed = LogitStore.create(path, n_classes=N_CLASSES, exist_ok=True, source={"other": 1})
    assert resumed.source == first and len(resumed) == 1
    LogitStore.create(
        path,
        n_classes=N_CLASSES,
        exist_ok=True,
        source={"checkpoint": "b.pth"},
        match_source=False,
    )
    assert LogitStore.open(path).source == first  # a resumed store keeps its record


def test_errors_are_clear(store, tmp_path, images):
    logits, labels = images
    with pytest.raises(ValueError, match="manifest.json is missing"):
        LogitStore.open(tmp_path)
    with pytest.raises(ValueError, match="holds 4 classes, not 5"):
        LogitStore.open(store.path, n_classes=5)
    with pytest.raises(FileExistsError, match="exist_ok"):
        LogitStore.create(store.path, n_classes=N_CLASSES)
    with pytest.raises(ValueError, match="n_classes=4"):
        LogitStore.create(store.path, n_classes=5, exist_ok=True)
    with pytest.raises(ValueError, match=r"shape \(4, H, W\)"):
        store.add_image(9, logits[0][:3], labels[0])
    with pytest.raises(ValueError, match="already in"):
        store.add_image(0, logits[0], labels[0])
    bad = labels[0].copy()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        store.add_image(9, logits[0], bad)
    with pytest.raises(ValueError, match="NaN or infinity"):
        store.add_image(9, logits[0] * 1e5, labels[0])  # overflows float16
    with pytest.raises(ValueError, match="no recorded split"):
        store.sample(10, images="train")
    assert 9 not in LogitStore.open(store.path)  # failed adds leave nothing


def test_truncated_and_corrupted_files_are_detected(store):
    rec = store.record(2)
    logits_file = store.path / "images" / rec["files"]["logits"]["file"]
    data = logits_file.read_bytes()
    # a flipped byte keeps sizes and headers: only the checksum sees it
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    logits_file.write_bytes(bytes(flipped))
    LogitStore.open(store.path)
    assert store.verify(checksums=False)["n_images"] == 6
    with pytest.raises(ValueError, match="checksum mismatch"):
        store.verify()
    logits_file.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        LogitStore.open(store.path)
    with pytest.raises(ValueError, match="truncated"):
        list(store.iter_chunks())
    # the way out: open without the damaged image, then write it again
    damaged = LogitStore.open(store.path, on_damaged="missing")
    assert damaged.damaged == [2] and damaged.missing(range(6)) == [2]
    logits, labels = make_images()
    damaged.add_image(2, logits[2], labels[2])
    LogitStore.open(store.path).verify()
    assert store.verify()["stray_files"] == []
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.*corrupt"):
        LogitStore.open(store.path)


def test_overwrite_replaces_image(store, images):
    logits, labels = images
    store.add_image(0, logits[1], labels[1], overwrite=True)
    reopened = LogitStore.open(store.path)
    reopened.verify()
    np.testing.assert_array_equal(reopened.load_image(0).logits, logits[1].astype(np.float16))


# ----------------------------------------------------------------------------- crash safety
WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from sksegcal import _files as files_module
    from sksegcal.store import LogitStore

    path, kill_after = sys.argv[1], int(sys.argv[2])
    written = [0]
    write = files_module.HashingWriter.write

    def dying_write(self, data):
        # SIGKILL (no cleanup, no atexit) once kill_after bytes have gone out:
        # the kill lands in the middle of an image's logits file
        if written[0] + len(data) > kill_after:
            self._f.write(bytes(data)[: kill_after - written[0]])
            self._f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        written[0] += len(data)
        return write(self, data)

    files_module.HashingWriter.write = dying_write
    store = LogitStore.create(path, n_classes=4, exist_ok=True)
    for name in store.missing(range(8)):
        rng = np.random.default_rng(name)  # an image's arrays depend on its name only
        z = rng.normal(size=(4, 64, 64)).astype(np.float32)
        store.add_image(name, z, rng.integers(0, 4, size=(64, 64)))
    """
)


def test_writer_killed_mid_image_resumes(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    path = tmp_path / "store"
    image_bytes = 4 * 64 * 64 * 2
    # the manifest is ~500 bytes; die halfway through the 4th image's logits
    kill_after = 3 * image_bytes + 3 * 64 * 64 + 1000 + image_bytes // 2
    proc = subprocess.run([sys.executable, str(script), str(path), str(kill_after)])
    assert proc.returncode == -signal.SIGKILL

    store = LogitStore.open(path)
    assert store.missing(range(8)) == [3, 4, 5, 6, 7]
    report = store.verify()
    assert report["n_images"] == 3
    assert any(f.startswith(".tmp-") for f in report["stray_files"])
    # resume without the kill; the same names get the same arrays as an unbroken run
    subprocess.run([sys.executable, str(script), str(path), str(10**12)], check=True)
    store = LogitStore.open(path)
    assert store.missing(range(8)) == []
    store.verify()
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, str(script), str(fresh), str(10**12)], check=True)
    np.testing.assert_array_equal(table(store)[0], table(LogitStore.open(fresh))[0])


def test_writer_killed_from_outside_resumes(tmp_path):
    # the realistic case: SIGKILL from another process at an arbitrary moment
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    path = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(10**12)])
    images = path / "images"
    deadline = time.monotonic() + 60
    while len(list(images.glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = LogitStore.open(path)
    store.verify()
    done = len(store)
    assert done >= 2 and store.missing(range(8)) == list(range(done, 8))
    subprocess.run([sys.executable, str(script), str(path), str(10**12)], check=True)
    assert LogitStore.open(path).verify()["n_images"] == 8


# ----------------------------------------------------------------------------- split, sample
def test_split_is_recorded(store, tmp_path):
    split = store.make_split(validation_size=0.34, test_size=0.34, random_state=3)
    reopened = LogitStore.open(store.path)
    for a, b in zip(split, reopened.split):
        np.testing.assert_array_equal(a, b)
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert sorted(sum((manifest["split"][p] for p in ("train", "validation", "test")), [])) == (
        list(range(6))
    )
    _, _, groups = table(reopened, images="test")
    assert set(np.unique(groups)) == set(split.test)
    # recorded by name: adding an image that sorts first shifts ids, not the split
    z, t = make_images(1)
    reopened.add_image(-1, z[0], t[0])
    assert set(reopened.split.test) == {i + 1 for i in split.test}


def test_sample_seeded_stratified_capped(store, images):
    X_all, y_all, g_all = table(store)
    correct_all = X_all.argmax(1) == y_all
    X, y, groups = store.sample(100, random_state=0)
    X2, y2, g2 = store.sample(100, random_state=0)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(groups, g2)
    assert len(y) == 100
    # exact share of mispredicted pixels (largest remainder rounding)
    share = (~correct_all).mean() * 100
    assert abs((X.argmax(1) != y).sum() - share) <= 1
    # every row is a real pixel of the image it claims
    rows = {(g, tuple(x), yy) for x, yy, g in zip(X_all, y_all, g_all)}
    assert all((g, tuple(x), yy) in rows for x, yy, g in zip(X, y, groups))
    assert not np.array_equal(store.sample(100, random_state=1)[0], X)
    # a cap per image
    _, _, groups = store.sample(10_000, max_per_image=30, random_state=0)
    assert np.bincount(groups).max() <= 30
    # everything when asked for more than there is, in table order
    X, y, groups = store.sample(10**6, stratify_by_correctness=False)
    np.testing.assert_array_equal(X, X_all)
    np.testing.assert_array_equal(groups, g_all)
    X, _, groups = store.sample(50, images=[1, 3], random_state=0)
    assert set(np.unique(groups)) <= {1, 3} and len(X) == 50


def test_sample_does_not_depend_on_write_order(tmp_path, images):
    logits, labels = images
    a = build_store(tmp_path / "a", logits, labels)
    b = LogitStore.create(tmp_path / "b", n_classes=N_CLASSES)
    for i in reversed(range(len(logits))):
        b.add_image(i, logits[i], labels[i])
    for sa, sb in zip(a.sample(80, random_state=5), b.sample(80, random_state=5)):
        np.testing.assert_array_equal(sa, sb)


def test_fit_store_uses_the_train_split(store):
    store.make_split(random_state=0)
    ts = fit_store(TemperatureScaling(), store, max_pixels=200, random_state=0)
    X, y, _ = store.sample(200, images="train", random_state=0)
    ref = TemperatureScaling().fit(X, y)
    assert ts.temperature_ == pytest.approx(ref.temperature_)


# ----------------------------------------------------------------------------- evaluation
def reference_accumulator(store, proba_fn, images=None):
    acc = CalibrationAccumulator(store.n_classes)
    for img in store.iter_images(images):
        X, y, _ = flatten_segmentation(np.asarray(img.logits)[None], np.asarray(img.labels)[None])
        acc.update(y, proba_fn(X.astype(np.float32)), image_id=img.id)
    return acc.summary()


@pytest.fixture
def fitted_ts(store):
    X, y, _ = table(store)
    return TemperatureScaling().fit(X, y)


def test_evaluate_store_matches_in_memory(store, fitted_ts):
    accs, timings = evaluate_store(
        store, {"uncalibrated": None, "ts": fitted_ts}, chunk_pixels=50, return_timings=True
    )
    assert set(timings) == {
        "read",
        "argmax",
        "predict:uncalibrated",
        "predict:ts",
        "metrics:ts",
        "metrics:uncalibrated",
    }
    assert all(v >= 0 for v in timings.values())
    for name, fn in (
        ("uncalibrated", lambda x: np.exp(x) / np.exp(x).sum(1, keepdims=True)),
        ("ts", fitted_ts.predict_proba),
    ):
        got = accs[name].summary()
        ref = reference_accumulator(store, fn)
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (name, key)
    assert accs["ts"].summary()["nll"] < accs["uncalibrated"].summary()["nll"]


def _calibrator_zoo():
    from sklearn.linear_model import LogisticRegression

    from sksegcal import (
        EnsembleTemperatureScaling,
        MetaCalScaling,
        SelectiveScalingCalibrator,
    )

    lr = LogisticRegression(max_iter=200)
    return {
        "ts": TemperatureScaling(),
        "metacal": MetaCalScaling(rejection_rate=0.2, t_reject="auto"),
        "selective-soft": SelectiveScalingCalibrator(classifier=lr, random_state=0),
        "selective-hard": SelectiveScalingCalibrator(
            classifier=lr, mode="hard", t1=1.0, t2=5.0, threshold=0.5, random_state=0
        ),
        "ets": EnsembleTemperatureScaling(),
        "vector": VectorScaling(),
    }


@pytest.mark.parametrize("name", list(_calibrator_zoo()))
def test_evaluate_store_every_calibrator_matches_its_predict_proba(store, name):
    # the temperature-based ones take the fused logits path, the others the table
    X, y, _ = table(store)
    est = _calibrator_zoo()[name].fit(X, y)
    temperatures = est._softmax_temperatures(X)
    fused = name in ("ts", "metacal", "selective-soft", "selective-hard")
    assert (temperatures is not None) == fused
    if fused:
        np.testing.assert_allclose(
            np.exp(log_softmax(X / np.reshape(temperatures, (-1, 1)))),
            est.predict_proba(X),
            rtol=1e-5,
            atol=1e-7,
        )
    got = evaluate_store(store, {name: est}, chunk_pixels=50)[name].summary()
    ref = reference_accumulator(store, est.predict_proba)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


def test_evaluate_store_keeps_the_model_prediction_through_ties(store, fitted_ts):
    # a huge temperature makes every calibrated row uniform to float32's precision;
    # the model's prediction is kept, in the evaluation and in predict_proba itself
    flat = clone(fitted_ts).fit(*table(store)[:2])
    flat.temperature_ = 1e10
    vs = VectorScaling().fit(*table(store)[:2])
    accs = summaries(evaluate_store(store, {"uncalibrated": None, "flat": flat, "vs": vs}))
    assert accs["flat"]["accuracy"] == accs["uncalibrated"]["accuracy"]
    assert accs["flat"]["miou"] == accs["uncalibrated"]["miou"]
    X, y, _ = table(store)
    p_flat = flat.predict_proba(X)
    assert np.ptp(p_flat, axis=1).max() < 1e-6  # the rows really are tied
    # argmax-safe probabilities: the predicted class stays one unit in the last place ahead
    np.testing.assert_array_equal(p_flat.argmax(1), X.argmax(1))
    assert np.mean(p_flat.argmax(1) == y) == pytest.approx(accs["flat"]["accuracy"])
    # vector scaling may move the argmax: its own probabilities decide
    assert accs["vs"]["accuracy"] == pytest.approx(np.mean(vs.predict(X) == y))


def summaries(accs):
    return {name: acc.summary() for name, acc in accs.items()}


PARALLEL_KWARGS = dict(chunk_pixels=40, task_pixels=150)  # several tasks of 1-2 images


def test_evaluate_store_same_with_threads(store, fitted_ts):
    calibrators = {"uncalibrated": None, "ts": fitted_ts}
    serial = summaries(evaluate_store(store, calibrators, n_jobs=1, **PARALLEL_KWARGS))
    threads = summaries(
        evaluate_store(store, calibrators, n_jobs=2, backend="threading", **PARALLEL_KWARGS)
    )
    assert serial == threads  # bit-identical: same blocks, same merge order


@pytest.mark.slow
def test_evaluate_store_same_with_processes(store, fitted_ts):
    # slow only because each loky worker imports torch and scikit-learn (~5 s)
    calibrators = {"uncalibrated": None, "ts": fitted_ts}
    serial = summaries(evaluate_store(store, calibrators, n_jobs=1, **PARALLEL_KWARGS))
    processes = summaries(
        evaluate_store(store, calibrators, n_jobs=2, backend="loky", **PARALLEL_KWARGS)
    )
    assert serial == processes


@pytest.mark.slow
@pytest.mark.integration
def test_evaluate_store_on_dask_cluster(store, fitted_ts):
    distributed = pytest.importorskip("dask.distributed")
    import joblib

    calibrators = {"uncalibrated": None, "ts": fitted_ts}
    serial = summaries(evaluate_store(store, calibrators, **PARALLEL_KWARGS))
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
        joblib.parallel_backend("dask"),
    ):
        on_dask = summaries(evaluate_store(store, calibrators, n_jobs=-1, **PARALLEL_KWARGS))
    assert on_dask == serial


def test_predict_store_writes_calibrated_maps(store, fitted_ts, tmp_path):
    store.make_split(random_state=0)
    out = predict_store(
        fitted_ts, store, tmp_path / "proba", n_jobs=2, backend="threading", task_pixels=100
    )
    assert out.values == "probabilities" and out.image_names == store.image_names
    out.verify()
    np.testing.assert_array_equal(out.split.test, store.split.test)
    for img, ref in zip(out.iter_images(), store.iter_images()):
        expected = predict_proba_maps(fitted_ts, np.asarray(ref.logits, np.float32)[None])[0]
        np.testing.assert_allclose(img.logits, expected, atol=1e-3)  # float16 storage
        np.testing.assert_array_equal(img.labels, ref.labels)
    # metrics on the written probabilities agree with metrics computed on the fly
    on_disk = evaluate_store(out, {"stored": None})["stored"].summary()
    on_fly = evaluate_store(store, {"ts": fitted_ts})["ts"].summary()
    assert on_disk["accuracy"] == on_fly["accuracy"]
    assert on_disk["ece"] == pytest.approx(on_fly["ece"], abs=2e-3)
    assert on_disk["nll"] == pytest.approx(on_fly["nll"], rel=1e-2)
    # resuming skips what is there
    (out.path / "images" / "3.json").unlink()
    again = predict_store(fitted_ts, store, tmp_path / "proba")
    assert again.missing(range(6)) == []
    with pytest.raises(ValueError, match="new directory"):
        predict_store(None, store, tmp_path / "proba")
    logits_file = again.path / "images" / again.record(0)["files"]["logits"]["file"]
    assert os.path.getmtime(logits_file) <= os.path.getmtime(again.path / "images" / "3.json")


def test_evaluate_store_rejects_wrong_class_count(store):
    X = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    ts = TemperatureScaling().fit(X, X.argmax(1))
    with pytest.raises(ValueError, match="fitted on 3 classes"):
        evaluate_store(store, {"ts": ts})
    with pytest.raises(ValueError, match="empty"):
        evaluate_store(store, {})


# ----------------------------------------------------------------------------- layout, pickles
def test_public_names_and_pickles_load_from_both_module_paths(store):
    import inspect

    import sksegcal.store as store_module

    for name in store_module.__all__:
        assert hasattr(store_module, name)
    # __module__ is where the class is defined: pickles name it, and its source is found
    assert LogitStore.__module__ == "sksegcal.store._logit_store"
    assert "class LogitStore" in inspect.getsource(LogitStore)
    clone = pickle.loads(pickle.dumps(store))
    assert isinstance(clone, LogitStore)
    np.testing.assert_array_equal(clone.image_ids(), store.image_ids())
    img = store.load_image(0)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(img)).labels, img.labels)
    # a pickle written by the release before the package split (protocol 2, as
    # joblib workers send it): the class path and the state are unchanged
    old = (
        b"\x80\x02csksegcal.store\nLogitStore\nq\x00)\x81q\x01}q\x02(X\x04\x00\x00\x00path"
        b"q\x03X\x06\x00\x00\x00/x/oldq\x04X\x08\x00\x00\x00manifestq\x05}q\x06(X\t\x00\x00"
        b"\x00n_classesq\x07K\x03X\x06\x00\x00\x00valuesq\x08X\x06\x00\x00\x00logitsq\tuX"
        b"\x07\x00\x00\x00recordsq\n}q\x0bub."
    )
    loaded = pickle.loads(old)
    assert isinstance(loaded, LogitStore) and loaded.n_classes == 3 and len(loaded) == 0


def test_stores_written_before_the_token_names_open_unchanged(store, images):
    # the release before this one named the arrays <stem>.logits.npy / <stem>.labels.npy
    folder = store.path / "images"
    for i in range(len(store)):
        rec_path = folder / f"{i}.json"
        record = json.loads(rec_path.read_text())
        for kind in ("logits", "labels"):
            old = f"{i}.{kind}.npy"
            (folder / record["files"][kind]["file"]).rename(folder / old)
            record["files"][kind]["file"] = old
        rec_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    reopened = LogitStore.open(store.path)
    assert reopened.verify()["stray_files"] == []
    np.testing.assert_array_equal(table(reopened)[0], table(store.refresh())[0])
    # overwriting an old-style image replaces it and removes its old files
    logits, labels = images
    reopened.add_image(0, logits[1], labels[1], overwrite=True)
    assert not (folder / "0.logits.npy").exists()
    assert LogitStore.open(store.path).verify()["stray_files"] == []


# ----------------------------------------------------------------------------- several writers
CONCURRENCY = REPO / "benchmarks" / "store_concurrency.py"


def run_concurrency(tmp_path, *args):
    proc = subprocess.run(
        [sys.executable, str(CONCURRENCY), "--json", "--dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.stdout, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n_failures"] == 0, report["failures"]
    return report


@pytest.mark.one_counting_path  # writers never count; the soak is benchmarks/store_concurrency.py
@pytest.mark.parametrize("mode", ["same", "overwrite", "disjoint"])
def test_concurrent_writers_never_mix_an_image(tmp_path, mode):
    # two processes released by one barrier add images at the same moment: the same
    # names (exactly one commits each, the other is refused by name), the same names
    # with overwrite=True (all succeed, last wins) or their own names (none blocks)
    report = run_concurrency(tmp_path, "--mode", mode, "--rounds", "2", "--names", "30")
    if mode == "same":
        assert report["refused"] == report["images"] == 60
    else:
        assert report["refused"] == 0


def test_losing_writer_is_refused_and_leaves_nothing(store, images, monkeypatch):
    # the commit itself is exclusive: a writer that passed every early check (here,
    # by force) and finds the record taken at commit time is refused
    logits, labels = images
    other = LogitStore.open(store.path)
    store.add_image("x", logits[0], labels[0])
    monkeypatch.setattr(LogitStore, "_existing", lambda self, name, path, ow: (False, None))
    with pytest.raises(ValueError, match=r"Image 'x' was added to the store .* by another writer"):
        other.add_image("x", logits[1], labels[1])
    monkeypatch.undo()
    reopened = LogitStore.open(store.path)
    assert reopened.verify()["stray_files"] == []  # the loser's files are gone
    np.testing.assert_array_equal(
        reopened.load_image(reopened.image_id("x")).logits, logits[0].astype(np.float16)
    )


def test_record_names_its_exact_files(store):
    rec = store.record(0)
    files = {rec["files"][k]["file"] for k in ("logits", "labels")}
    assert all(f.startswith("0.") and f.count(".") == 3 for f in files)  # 0.<token>.<kind>.npy
    store.add_image(0, *[a[0] for a in make_images(1, seed=3)], overwrite=True)
    new = {store.record(0)["files"][k]["file"] for k in ("logits", "labels")}
    assert not new & files  # a new write never reuses a file name
    assert not any((store.path / "images" / f).exists() for f in files)  # old ones removed


def test_clean_removes_old_strays_only(store, tmp_path):
    folder = store.path / "images"
    old_time = time.time() - 7200
    strays = [
        folder / ".tmp-abc.part",
        folder / "9.0123456789abcdef.logits.npy",
        store.path / ".tmp-manifest.part",
    ]
    for f in strays:
        f.write_bytes(b"x")
        os.utime(f, (old_time, old_time))
    young = folder / ".tmp-young.part"
    young.write_bytes(b"x")
    assert set(store.verify()["stray_files"]) >= {".tmp-abc.part", ".tmp-young.part"}
    assert store.clean(dry_run=True) == sorted(
        ["images/.tmp-abc.part", "images/9.0123456789abcdef.logits.npy", ".tmp-manifest.part"]
    )
    assert all(f.exists() for f in strays)
    removed = store.clean()
    assert len(removed) == 3 and not any(f.exists() for f in strays)
    assert young.exists() and store.verify()["stray_files"] == [".tmp-young.part"]
    assert len(LogitStore.open(store.path)) == 6  # files that records name are kept
    assert store.clean(grace_seconds=0) == ["images/.tmp-young.part"]
    with pytest.raises(ValueError, match="grace_seconds"):
        store.clean(grace_seconds=-1)


def test_killed_writer_strays_are_cleaned(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    path = tmp_path / "store"
    kill_after = 3 * (4 * 64 * 64 * 2) + 3 * 64 * 64 + 1000 + 4 * 64 * 64
    subprocess.run([sys.executable, str(script), str(path), str(kill_after)])
    store = LogitStore.open(path)
    assert store.verify()["stray_files"]
    assert store.clean() == []  # younger than the grace period: perhaps a live writer's
    assert store.clean(grace_seconds=0)
    assert store.verify()["stray_files"] == [] and len(store) == 3


# ----------------------------------------------------------------------------- calibrator identity
def test_predict_store_refuses_to_resume_with_another_fit(store, tmp_path):
    X, y, _ = table(store)
    cold = TemperatureScaling().fit(X, y)
    cold.temperature_ = 0.26
    warm = clone(cold).fit(X, y)
    warm.temperature_ = 2.61
    assert repr(cold) == repr(warm)  # what the old guard compared
    out = predict_store(cold, store, tmp_path / "proba", images=[0, 1])
    assert len(out) == 2
    with pytest.raises(ValueError, match=r"calibrator_sha256.*different fits"):
        predict_store(warm, store, tmp_path / "proba")
    assert len(LogitStore.open(tmp_path / "proba")) == 2  # nothing mixed in
    # the same fit, even after a round trip through pickle, resumes
    again = predict_store(pickle.loads(pickle.dumps(cold)), store, tmp_path / "proba")
    assert len(again) == 6


def test_calibrator_fingerprint_sees_fitted_state_only():
    from sksegcal.store import calibrator_fingerprint

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)).astype(np.float32)
    y = np.where(rng.random(200) < 0.7, X.argmax(1), rng.integers(0, 3, 200))
    a = TemperatureScaling().fit(X, y)
    b = pickle.loads(pickle.dumps(a))
    b.predict_proba(X)  # using a calibrator does not change its identity
    assert calibrator_fingerprint(a) == calibrator_fingerprint(b)
    b.temperature_ = a.temperature_ * 1.5
    assert calibrator_fingerprint(a) != calibrator_fingerprint(b)
    assert calibrator_fingerprint(None) is None
    assert calibrator_fingerprint(VectorScaling().fit(X, y)) != (calibrator_fingerprint(a))


# ----------------------------------------------------------------------------- damaged stores
def test_a_corrupt_record_is_reported_and_left_out(store, images):
    logits, labels = images
    old_files = {store.record(3)["files"][k]["file"] for k in ("logits", "labels")}
    (store.path / "images" / "3.json").write_text("{garbage")
    with pytest.raises(ValueError, match=r"damaged image 3: .*3\.json is corrupt"):
        LogitStore.open(store.path)
    damaged = LogitStore.open(store.path, on_damaged="missing")
    assert damaged.damaged == [3] and list(damaged.damaged_records) == ["3.json"]
    assert damaged.image_names == [0, 1, 2, 4, 5] and damaged.missing(range(6)) == [3]
    assert len(list(damaged.iter_chunks())) > 0  # the rest stays usable
    with pytest.warns(UserWarning, match=r"3\.json"):
        resumed = LogitStore.create(store.path, n_classes=N_CLASSES, exist_ok=True)
    assert resumed.damaged == [3]
    with pytest.raises(ValueError, match=r"3\.json"):
        resumed.verify()  # a damaged record is a problem, even when left out
    resumed.add_image(3, logits[3], labels[3])  # a damaged record is replaced
    # a record too broken to name its files leaves them to clean()
    assert set(LogitStore.open(store.path).verify()["stray_files"]) == old_files
    assert len(resumed.clean(grace_seconds=0)) == 2


def _edit_record(store, image, edit):
    rec_path = store.path / "images" / f"{image}.json"
    record = json.loads(rec_path.read_text())
    edit(record)
    rec_path.write_text(json.dumps(record))
    return rec_path


def _outside(record, path):
    record["files"]["logits"]["file"] = path


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.pop("files"), "'files' is missing"),
        (lambda r: r.pop("height"), "'height' is missing"),
        (lambda r: r.update(height="12"), "'height' must be an integer"),
        (lambda r: r.update(width=0), "'width' must be an integer >= 1"),
        (lambda r: r.update(n_valid=10**9), "'n_valid' must be an integer in"),
        (lambda r: r.update(n_correct=-1), "'n_correct' must be"),
        (lambda r: r.update(name=[1]), "'name' is not an image name"),
        (lambda r: r["files"].pop("labels"), "'files' must have exactly"),
        (lambda r: r["files"]["labels"].update(bytes="12"), "'files.labels.bytes'"),
        (lambda r: r["files"]["labels"].update(sha256="xyz"), "'files.labels.sha256'"),
        (lambda r: _outside(r, "../../x.npy"), "'files.logits.file'.*never a path"),
        (lambda r: _outside(r, "/etc/passwd"), "'files.logits.file'.*never a path"),
        (lambda r: _outside(r, "1.logits.npy"), "'files.logits.file'"),  # another image's
    ],
)
def test_invalid_record_fields_are_named(store, edit, field):
    rec_path = _edit_record(store, 2, edit)
    with pytest.raises(ValueError, match=field) as info:
        LogitStore.open(store.path)
    assert str(rec_path) in str(info.value)
    damaged = LogitStore.open(store.path, on_damaged="missing")
    assert damaged.damaged == [2] and len(damaged) == 5


def test_records_pointing_outside_the_store_are_refused(store, tmp_path):
    # a file outside with the right size and content: the old checks all passed
    rec = store.record(1)
    src = store.path / "images" / rec["files"]["logits"]["file"]
    (tmp_path / "x.npy").write_bytes(src.read_bytes())
    for target in ["../../x.npy", str(tmp_path / "x.npy")]:
        _edit_record(store, 1, lambda r, t=target: _outside(r, t))
        with pytest.raises(ValueError, match="never a path"):
            LogitStore.open(store.path)
        with pytest.raises(ValueError, match="never a path"):
            store.verify()


def test_a_duplicated_record_cannot_hide_an_image(store):
    folder = store.path / "images"
    (folder / "7.json").write_text((folder / "1.json").read_text())  # a copy named 1
    with pytest.raises(ValueError, match=r"7\.json: field 'name' is 1, whose record is 1\.json"):
        LogitStore.open(store.path)
    damaged = LogitStore.open(store.path, on_damaged="missing")
    assert damaged.image_names == list(range(6)) and damaged.damaged == [7]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("n_classes"), "field 'n_classes' is missing"),
        (lambda m: m.update(n_classes="3"), "field 'n_classes' must be an integer"),
        (lambda m: m.update(n_classes=True), "field 'n_classes' must be an integer"),
        (lambda m: m.update(ignore_index="255"), "field 'ignore_index'"),
        (lambda m: m.update(values="logit"), "field 'values'"),
        (lambda m: m.update(class_names=["a"]), "field 'class_names'"),
        (lambda m: m["dtypes"].update(labels="<i8"), "field 'dtypes'"),
        (lambda m: m.update(source=[1]), "field 'source'"),
        (lambda m: m.update(split={"train": [0], "test": [1]}), "field 'split.validation'"),
        (lambda m: m.update(format_version=2), "field 'format_version'"),
    ],
)
def test_invalid_manifest_fields_are_named(store, edit, message):
    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message) as info:
        LogitStore.open(store.path, on_damaged="missing")
    assert str(path) in str(info.value)


def test_a_manifest_without_optional_fields_opens(store):
    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("class_names", "source", "split", "checksum", "created"):
        manifest.pop(key)
    path.write_text(json.dumps(manifest))
    reopened = LogitStore.open(store.path)
    assert reopened.source == {} and reopened.split is None and len(reopened) == 6


# ----------------------------------------------------------------------------- input checks
def test_empty_images_are_rejected(store):
    with pytest.raises(ValueError, match="at least one row and one column"):
        store.add_image("empty", np.zeros((N_CLASSES, 0, 0)), np.zeros((0, 0), int))
    with pytest.raises(ValueError, match="at least one row"):
        store.add_image("thin", np.zeros((N_CLASSES, 0, 5)), np.zeros((0, 5), int))
    assert "empty" not in LogitStore.open(store.path)


def test_duplicate_image_ids_are_rejected(store, fitted_ts):
    for call in (
        lambda: list(store.iter_chunks(images=[0, 2, 0])),
        lambda: store.sample(10, images=[1, 1]),
        lambda: evaluate_store(store, {"u": None}, images=[3, 3]),
    ):
        with pytest.raises(ValueError, match=r"image id\(s\) \[\d\] more than once"):
            call()


def test_counts_must_be_whole_numbers(store):
    from sksegcal.pixels import split_images

    with pytest.raises(TypeError, match="max_pixels must be an integer"):
        store.sample(10.5)
    with pytest.raises(TypeError, match="max_per_image must be an integer"):
        store.sample(10, max_per_image=2.5)
    with pytest.raises(TypeError, match="whole number"):
        split_images(10.5)
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        store.sample(0)
    assert len(store.sample(np.int64(10), random_state=0)[1]) == 10
    assert sum(len(p) for p in split_images(np.int64(8), random_state=0)) == 8


def test_unfitted_calibrators_raise_not_fitted(store, tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="calibrator 'ts' \\(TemperatureScaling\\)"):
        evaluate_store(store, {"ts": TemperatureScaling()})
    with pytest.raises(NotFittedError, match="not fitted"):
        predict_store(TemperatureScaling(), store, tmp_path / "out")
