"""Hostile and careless inputs: files stay in their folder, values match the calibrator, bounds.

Each test is one attack that once went through (a file written outside its
folder, probabilities read as logits, two calibrations merged, a crash at the
end of the work, a raw MemoryError, NaN predictions from an edited file) and
checks the guard against an independent reference where there is a number.
"""

import json
import os
import pickle
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from sksegcal import LocalTemperatureScaling, TemperatureScaling
from sksegcal.cli import main
from sksegcal.conformal import (
    ConformalPixelSets,
    ConformalRiskControl,
    ConformalSetAccumulator,
    ImageRiskTally,
    ScoreHistogram,
    fit_conformal_store,
)
from sksegcal.context import CONTEXT_FEATURES
from sksegcal.metrics import boundary_mask
from sksegcal.persistence import load, save
from sksegcal.store import LogitStore, evaluate_store, fit_store, predict_store

C = 3


def _image(rng, h, w, scale=3.0):
    t = rng.integers(0, C, size=(h, w))
    z = scale * (np.moveaxis(np.eye(C)[t], -1, 0) + rng.normal(size=(C, h, w)))
    return z, t


@pytest.fixture(scope="module")
def logit_store(tmp_path_factory):
    rng = np.random.default_rng(0)
    store = LogitStore.create(tmp_path_factory.mktemp("s") / "logits", n_classes=C)
    for name in range(10):
        store.add_image(name, *_image(rng, 6, 7))
    store.make_split(random_state=0)
    return store


@pytest.fixture(scope="module")
def ts(logit_store):
    return fit_store(TemperatureScaling(), logit_store, max_pixels=300, random_state=0)


@pytest.fixture(scope="module")
def proba_store(logit_store, tmp_path_factory):
    return predict_store(None, logit_store, tmp_path_factory.mktemp("p") / "proba")


def _error_line(capsys) -> str:
    return capsys.readouterr().err.strip()


@pytest.fixture
def quick_png(monkeypatch):
    """Figures are drawn but written as a few bytes: PNG encoding is most of their cost."""
    import sksegcal.cli._report as report
    from sksegcal._files import atomic_write_bytes

    monkeypatch.setattr(
        report, "_save_figure", lambda fig, path, dpi: atomic_write_bytes(path, b"png")
    )


# --------------------------------------------------------------------------- report names
def test_report_figures_stay_inside_the_output_folder(logit_store, tmp_path, capsys, quick_png):
    from sksegcal.cli._report import save_results

    results = tmp_path / "results"
    results.mkdir()
    (results / "reliability_x").mkdir()  # what makes the old f-string name resolve
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "holiday.png").write_bytes(b"precious")
    acc = evaluate_store(logit_store, {"uncalibrated": None}, images="test")["uncalibrated"]
    hostile = "x/../../victim/holiday"
    save_results(results, {hostile: {"uncalibrated": acc}}, {})
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["report", str(results), "-q"]) == 0, _error_line(capsys)
    assert (victim / "holiday.png").read_bytes() == b"precious"
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert new and all(p.parent == results for p in new), new
    # the hostile split's figure is a slug in the folder
    assert (results / "reliability_x_victim_holiday.png").is_file()


def test_report_on_hostile_metadata_is_written_not_a_traceback(
    logit_store, tmp_path, capsys, quick_png
):
    from sksegcal.cli._report import save_results

    acc = evaluate_store(logit_store, {"uncalibrated": None}, images="test")["uncalibrated"]
    meta = {
        "timings": ["not", "a", "dict"],
        "calibrators": "x",
        "description": 5,
        "command": {"a": 1},
        "boundary_width": "wide",
        "dataset": ["d"],
    }
    save_results(tmp_path, {"test": {"uncalibrated": acc}}, meta)
    assert main(["report", str(tmp_path), "-q"]) == 0, _error_line(capsys)
    assert (tmp_path / "report.md").read_text().startswith("# sksegcal calibration report")


# ------------------------------------------------------------------ logits or probabilities
@pytest.mark.parametrize("wrap", ["alone", "pipeline", "search"])
def test_a_logit_calibrator_is_refused_on_a_store_of_probabilities(
    wrap, ts, proba_store, logit_store, tmp_path
):
    est = {
        "alone": ts,
        "pipeline": Pipeline([("ts", ts)]),
        "search": GridSearchCV(TemperatureScaling(), {"chunk_size": [1000, 2000]}, cv=2),
    }[wrap]
    if wrap == "search":
        rng = np.random.default_rng(1)
        y = rng.integers(0, C, 200)
        est.fit(3 * np.eye(C)[y] + rng.normal(size=(200, C)), y)
    with pytest.raises(ValueError, match="input_type='logits'.*holds probabilities"):
        evaluate_store(proba_store, {"ts": est})
    with pytest.raises(ValueError, match="input_type='logits'.*holds probabilities"):
        predict_store(est, proba_store, tmp_path / "out")
    with pytest.raises(ValueError, match="input_type='logits'.*holds probabilities"):
        fit_store(TemperatureScaling() if wrap == "alone" else est, proba_store, max_pixels=100)
    with pytest.raises(ValueError, match="input_type='logits'.*holds probabilities"):
        fit_conformal_store(
            ConformalPixelSets(guarantee="pixel", calibrator=est, input_type="probabilities"),
            proba_store,
            images=None,
        )
    evaluate_store(logit_store, {"ts": est})  # the store it was made for


def test_cli_evaluate_and_conformal_refuse_a_logit_calibrator_on_probabilities(
    ts, proba_store, tmp_path, capsys
):
    path = save(ts, tmp_path / "ts.skops", format="skops")
    for command in ("evaluate", "conformal"):
        code = main(
            [
                command,
                str(proba_store.path),
                "-c",
                str(path),
                "-q",
                "--images",
                "all",
                "-o",
                str(tmp_path / command),
            ]
        )
        assert code == 1
        assert "holds probabilities" in _error_line(capsys)


# --------------------------------------------------------------------------- conformal merge
def _cal_data(seed, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    return 2 * np.eye(C)[y] + rng.normal(size=(n, C)), y


def test_conformal_merge_refuses_states_of_different_calibrators():
    X, y = _cal_data(0)
    hot, cold = TemperatureScaling().fit(X, y), TemperatureScaling().fit(X, y)
    hot.temperature_, cold.temperature_ = 20.0, 0.05
    a = ConformalPixelSets(guarantee="pixel", calibrator=hot).fit(*_cal_data(1))
    b = ConformalPixelSets(guarantee="pixel", calibrator=cold).fit(*_cal_data(2))
    with pytest.raises(ValueError, match="calibrator"):
        a.merge(b)
    # the same fitted calibrator (another object after a round trip) merges, and gives
    # the threshold of one pass over both halves
    same = pickle.loads(pickle.dumps(hot))
    b2 = ConformalPixelSets(guarantee="pixel", calibrator=same).fit(*_cal_data(2))
    X1, y1 = _cal_data(1)
    X2, y2 = _cal_data(2)
    both = ConformalPixelSets(guarantee="pixel", calibrator=hot).fit(
        np.vstack([X1, X2]), np.r_[y1, y2]
    )
    assert a.merge(b2).threshold_ == both.threshold_


def test_risk_control_states_of_two_stores_merge(tmp_path):
    rng = np.random.default_rng(3)
    stores = []
    for k in range(2):
        s = LogitStore.create(tmp_path / f"s{k}", n_classes=C)
        for name in range(6):
            s.add_image(name, *_image(rng, 5, 5))
        stores.append(s)
    a = fit_conformal_store(ConformalRiskControl(alpha=0.3), stores[0], images=None)
    b = fit_conformal_store(ConformalRiskControl(alpha=0.3), stores[1], images=None)
    assert a.merge(b).n_calibration_ == 12
    again = fit_conformal_store(ConformalRiskControl(alpha=0.3), stores[0], images=[0, 1])
    with pytest.raises(ValueError, match="Both estimators saw images"):
        fit_conformal_store(ConformalRiskControl(alpha=0.3), stores[0], images=None).merge(again)


# --------------------------------------------------------------------------- conformal CLI
@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    """Images of different sizes, and a calibrator that reads the spatial context."""
    rng = np.random.default_rng(4)
    store = LogitStore.create(tmp_path_factory.mktemp("m") / "mixed", n_classes=C)
    for name in range(12):
        store.add_image(name, *_image(rng, 5 + name % 3, 6 + name % 4))
    store.make_split(random_state=0)
    return store


def test_cli_conformal_takes_a_context_calibrator_and_images_of_different_sizes(
    mixed_store, tmp_path, capsys, quick_png
):
    lts = fit_store(
        LocalTemperatureScaling(max_iter=5), mixed_store, max_pixels=300, random_state=0
    )
    path = save(lts, tmp_path / "lts.skops", format="skops")
    out = tmp_path / "conformal"
    code = main(
        [
            "conformal",
            str(mixed_store.path),
            "-c",
            str(path),
            "--images",
            "all",
            "-q",
            "-o",
            str(out),
        ]
    )
    assert code == 0, _error_line(capsys)
    assert (out / "set_sizes.png").is_file() and (out / "conformal.md").is_file()
    rows = json.loads((out / "conformal.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"uncalibrated", "lts"}


def test_set_size_maps_are_drawn_per_image():
    from sksegcal.plotting import plot_set_size_maps

    sizes = {
        "a": [np.ones((4, 5), int), np.full((7, 3), 2)],
        "b": [np.zeros((4, 5), int), np.ones((7, 3), int)],
    }
    fig = plot_set_size_maps(sizes, n_classes=3)
    panels = [ax for ax in fig.axes if ax.images]
    assert sorted(ax.images[0].get_array().shape for ax in panels) == [(4, 5)] * 2 + [(7, 3)] * 2


# --------------------------------------------------------------------------- stored values
def _poison(store, image_id, value):
    """Write ``value`` into one stored logit in place (sizes and headers intact)."""
    file = store.path / "images" / store.record(image_id)["files"]["logits"]["file"]
    z = np.load(file, mmap_mode="r+")
    z[0, 0, 0] = value
    z.flush()
    del z


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_stored_logit_is_named_by_its_image(value, tmp_path):
    rng = np.random.default_rng(5)
    store = LogitStore.create(tmp_path / "s", n_classes=C)
    for name in ("a", "b", "c", "d"):
        store.add_image(name, *_image(rng, 4, 4))
    _poison(store, 2, value)
    store = LogitStore.open(store.path)
    for run in (
        lambda: fit_conformal_store(ConformalPixelSets(), store, images=None),
        lambda: evaluate_store(store, {"uncalibrated": None}, images=None),
        lambda: fit_store(TemperatureScaling(), store, images=None, max_pixels=40),
    ):
        with pytest.raises(ValueError, match="image 'c' holds NaN or infinite"):
            run()
    evaluate_store(store, {"uncalibrated": None}, images=[0, 1, 3])  # the others read


def test_an_edited_stored_label_is_named_by_its_image(tmp_path):
    rng = np.random.default_rng(13)
    store = LogitStore.create(tmp_path / "s", n_classes=C)
    for name in ("a", "b", "c"):
        store.add_image(name, *_image(rng, 4, 4))
    file = store.path / "images" / store.record(1)["files"]["labels"]["file"]
    t = np.load(file, mmap_mode="r+")
    t[0, 0] = 7  # neither a class nor the ignore index
    t.flush()
    del t
    for run in (
        lambda: fit_conformal_store(ConformalRiskControl(), store, images=None),
        lambda: evaluate_store(store, {"u": None}, images=None),
    ):
        with pytest.raises(ValueError, match="image 'b'.*labels outside"):
            run()


def test_an_empty_or_fortran_ordered_array_file_is_refused(logit_store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(logit_store.path, copy)
    store = LogitStore.open(copy)
    file = copy / "images" / store.record(0)["files"]["logits"]["file"]
    z = np.load(file)
    np.save(file, np.asfortranarray(z))
    with pytest.raises(ValueError, match="shape"):
        evaluate_store(store, {"u": None}, images=[0])
    with pytest.raises(ValueError, match="shape"):
        store.load_image(0)
    file.write_bytes(b"")
    for run in (
        lambda: evaluate_store(store, {"u": None}, images=[0]),
        lambda: store.load_image(0),
        store.verify,
    ):
        with pytest.raises(ValueError):
            run()


def test_symlinked_array_files_are_refused(logit_store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(logit_store.path, copy)
    store = LogitStore.open(copy)
    file = copy / "images" / store.record(0)["files"]["logits"]["file"]
    outside = tmp_path / "outside.npy"
    file.rename(outside)
    file.symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        store.verify()
    with pytest.raises(ValueError, match="symbolic link"):
        store.load_image(0)
    with pytest.raises(ValueError, match="symbolic link"):
        evaluate_store(store, {"uncalibrated": None}, images=None)
    # a record that is a link: the image is damaged, not read
    record = next((copy / "images").glob(f"{store.image_names[1]}.json"))
    record.rename(tmp_path / "record.json")
    record.symlink_to(tmp_path / "record.json")
    with pytest.raises(ValueError, match="symbolic link"):
        LogitStore.open(copy)


def test_an_oversized_npy_header_does_not_advise_allow_pickle(logit_store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(logit_store.path, copy)
    store = LogitStore.open(copy)
    file = copy / "images" / store.record(0)["files"]["labels"]["file"]
    header = b"{'descr': '<i1', 'fortran_order': False, 'shape': (6, 7), }"
    header += b" " * (20000 - len(header)) + b"\n"
    file.write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header)
    for run in (store.verify, lambda: evaluate_store(store, {"u": None}, images=None)):
        with pytest.raises(ValueError) as info:
            run()
        assert "allow_pickle" not in str(info.value)


def test_a_reader_racing_an_overwrite_is_told_to_reopen(tmp_path):
    rng = np.random.default_rng(6)
    store = LogitStore.create(tmp_path / "s", n_classes=C)
    store.add_image("a", *_image(rng, 4, 4))
    stale = LogitStore.open(store.path)
    store.add_image("a", *_image(rng, 4, 4), overwrite=True)  # removes the old files
    for run in (
        lambda: stale.load_image(0),
        lambda: evaluate_store(stale, {"u": None}, images=None),
    ):
        with pytest.raises(ValueError, match="re-open the store"):
            run()
    evaluate_store(stale.refresh(), {"u": None}, images=None)


# --------------------------------------------------------------------------- bounds
def test_a_huge_boundary_width_is_the_widest_useful_band():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=(2, 9, 11))
    labels[0, :3] = 255
    for distance in ("chebyshev", "euclidean"):
        widest = boundary_mask(labels, width=9 + 11 - 2, distance=distance)
        huge = boundary_mask(labels, width=10**6, distance=distance)
        np.testing.assert_array_equal(huge, widest)
        # the reference: a valid pixel is in the band when its image has another label
        for img, m in zip(labels, huge):
            valid = img != 255
            assert np.array_equal(m, valid & (len(np.unique(img[valid])) > 1))


def test_evaluate_with_a_huge_boundary_width_runs(logit_store):
    accs = evaluate_store(logit_store, {"u": None}, images="test", boundary_width=10**6)
    assert accs["u"].region("boundary").summary()["n_pixels"] > 0


def test_workers_are_bounded_by_tasks_and_cpus(logit_store, monkeypatch):
    import joblib as jl

    seen = []
    real = jl.Parallel

    class Spy(real):
        def __init__(self, n_jobs=None, **kw):
            seen.append(n_jobs)
            super().__init__(n_jobs=n_jobs, **kw)

    monkeypatch.setattr(jl, "Parallel", Spy)
    evaluate_store(logit_store, {"u": None}, n_jobs=1000, task_pixels=100, backend="threading")
    fit_conformal_store(
        ConformalPixelSets(),
        logit_store,
        images=None,
        n_jobs=1000,
        task_pixels=100,
        backend="threading",
    )
    assert seen and all(1 <= n <= os.cpu_count() for n in seen), seen


def test_threads_are_bounded_by_the_cpus():
    import torch

    from sksegcal.cli._common import threads

    before = torch.get_num_threads()
    with threads(100_000):
        assert torch.get_num_threads() <= (os.cpu_count() or 1)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a folder no file can be made in")
def test_an_unwritable_output_is_found_before_any_work(logit_store, monkeypatch, capsys):
    import sksegcal.store as store_api

    def no_work(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(store_api, "evaluate_store", no_work)
    code = main(["evaluate", str(logit_store.path), "-q", "-o", "/sys/sksegcal-out"])
    assert code == 1
    assert "not writable" in _error_line(capsys)


# --------------------------------------------------------------------------- loaded values
@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0, 0.0])
def test_an_edited_fitted_temperature_is_refused_on_load(value, ts, tmp_path):
    bad = joblib.load(_dump(ts, tmp_path))
    bad.temperature_ = value
    path = save(bad, tmp_path / "bad.skops", format="skops")
    with pytest.raises(ValueError, match="temperature_"):
        load(path)
    assert load(save(ts, tmp_path / "good.skops", format="skops")).temperature_ == ts.temperature_


def test_an_edited_nested_array_is_refused_on_load(tmp_path):
    from sksegcal.scaling import VectorScaling

    X, y = _cal_data(8)
    vs = VectorScaling().fit(X, y)
    name = next(
        k
        for k, v in vars(vs).items()
        if k.endswith("_") and isinstance(v, np.ndarray) and v.dtype.kind == "f"
    )
    getattr(vs, name)[0] = np.nan
    with pytest.raises(ValueError, match=name):
        load(save(vs, tmp_path / "vs.skops", format="skops"))


def _dump(obj, tmp_path):
    path = tmp_path / "copy.joblib"
    joblib.dump(obj, path)
    return path


# --------------------------------------------------------------------------- conformal states
@pytest.mark.parametrize("counts", [[0.5, 0.5, 0], [-1, 2, 0], [np.nan, 1, 0]])
def test_risk_tally_refuses_counts_that_are_not_whole(counts):
    with pytest.raises(ValueError, match="whole numbers"):
        ImageRiskTally(n_bins=2).add_image_histogram(np.array(counts))


def test_state_dicts_refuse_fractional_bins_and_counts():
    h = ScoreHistogram(n_bins=16).update(np.linspace(0, 1, 9)).state_dict()
    with pytest.raises(ValueError):
        ScoreHistogram.from_state_dict({**h, "n_bins": 16.9})
    frac = h["counts"].copy()
    frac[0] += 0.5
    frac[1] -= 0.5
    with pytest.raises(ValueError):
        ScoreHistogram.from_state_dict({**h, "counts": frac})
    t = ImageRiskTally(n_bins=4).add_image(np.array([0, 4])).state_dict()
    with pytest.raises(ValueError):
        ImageRiskTally.from_state_dict({**t, "n_images": 1.5})


def test_a_huge_grid_is_a_value_error_not_a_memory_error():
    for make in (
        lambda: ScoreHistogram(n_bins=2**40),
        lambda: ConformalPixelSets(guarantee="pixel", n_bins=2**40).fit(*_cal_data(0)),
    ):
        with pytest.raises(ValueError, match="n_bins"):
            make()


@pytest.mark.parametrize("target", [C, -1, 1.5])
def test_summary_refuses_a_class_that_is_not_one(target):
    acc = ConformalSetAccumulator(C)
    acc.update(np.array([0, 1, 2]), np.eye(C, dtype=bool), image_id=0)
    with pytest.raises(ValueError, match="target_class"):
        acc.summary(target_class=target)
    assert acc.summary(target_class=C - 1)["mean_image_fnr"] == 0.0


def test_no_counted_calibration_pixel_says_why():
    X, y = _cal_data(9, n=60)
    with pytest.warns(UserWarning, match="every label is ignore_index=255"):
        ConformalPixelSets(guarantee="pixel").fit(X, np.full(60, 255))
    with pytest.warns(UserWarning, match="target_class=2"):
        ConformalRiskControl(loss="fnr", target_class=2).fit(
            X, np.where(y == 2, 0, y), np.repeat(np.arange(6), 10)
        )


# --------------------------------------------------------------------------- huge finite inputs
def test_mlp_probabilities_of_huge_finite_features_are_not_nan():
    from sksegcal import TorchMLPClassifier

    rng = np.random.default_rng(11)
    mlp = TorchMLPClassifier(hidden_layer_sizes=(4,))  # a fitted network, set by hand
    mlp.coefs_ = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4, 2))]
    mlp.coefs_[1] = mlp.coefs_[1].astype(np.float32)
    mlp.intercepts_ = [np.zeros(4, np.float32), np.zeros(2, np.float32)]
    mlp.classes_, mlp.n_features_in_ = np.arange(2), 3
    huge = np.array([[3e38, -3e38, 1.0], [0.5, 0.1, -0.2]], dtype=np.float32)
    p = mlp.predict_proba(huge)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    # the reference: the same folded network in float64 (the normal row is unchanged)
    np.testing.assert_allclose(p[1], mlp.predict_proba(huge[1:])[0])
    w = [np.asarray(c, np.float64) for c in mlp.coefs_]
    b = [np.asarray(c, np.float64) for c in mlp.intercepts_]
    h = huge[:1].astype(np.float64)
    for i in range(len(w)):
        h = h @ w[i] + b[i]
        h = np.maximum(h, 0) if i < len(w) - 1 else h
    ref = np.exp(h - h.max()) / np.exp(h - h.max()).sum()
    np.testing.assert_allclose(p[0], ref[0], atol=1e-12)


def test_context_of_huge_finite_logits_is_an_error_not_nan():
    from sksegcal.pixels import flatten_segmentation

    z = np.random.default_rng(12).normal(size=(1, C, 5, 5)).astype(np.float32)
    z[0, 0, 0, 0], z[0, 1, 0, 0] = 3e38, -3e38
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="overflows float32"):
            flatten_segmentation(z, np.zeros((1, 5, 5), int), context="spatial")


# ------------------------------------------------------------------ context column count
def _context_table(c=C, n_images=4, seed=0):
    """Real rows: 32x32 maps of 8x8 regions, flattened with the spatial context."""
    from sksegcal.pixels import flatten_segmentation

    rng = np.random.default_rng(seed)
    regions = rng.integers(0, c, size=(n_images, 4, 4)).repeat(8, 1).repeat(8, 2)
    onehot = np.moveaxis(np.eye(c)[regions], -1, 1)
    logits = 3.0 * (onehot + 0.4 * rng.normal(size=(n_images, c, 32, 32)))
    return flatten_segmentation(logits.astype(np.float32), regions, context="spatial")


def _context_readers():
    from sksegcal import CalibratorSearchCV, SelectiveScalingCalibrator

    return [
        SelectiveScalingCalibrator(context="spatial", random_state=0),
        LocalTemperatureScaling(),
        CalibratorSearchCV(context="spatial", random_state=0),
    ]


@pytest.mark.parametrize("calibrator", _context_readers(), ids=lambda e: type(e).__name__)
def test_a_table_with_seven_context_columns_is_refused_with_the_column_named(calibrator):
    X, y, groups = _context_table()
    # 3 logit columns and 7 context columns: read as 4 classes, the real disagree_7x7 would be
    # read as disagree_3x3 and boundary_distance (up to 4 px here) as disagree_7x7
    seven = np.hstack([X, X[:, C + 5 : C + 6]])
    assert seven.shape[1] == 4 + 6
    kw = {"groups": groups} if "Search" in type(calibrator).__name__ else {}
    with pytest.raises(ValueError, match=r"context column 'disagree_7x7' .* rows outside") as e:
        calibrator.fit(seven, y, **kw)
    assert "another number of context columns" in str(e.value)
    assert "flatten_segmentation(..., context='spatial')" in str(e.value)
    # five context columns: a context column read as a logit, the other way round
    with pytest.raises(ValueError, match="another number of context columns"):
        calibrator.fit(X[:, :-1], y, **kw)


def test_context_columns_are_checked_at_predict_too():
    X4, y4, _ = _context_table(c=4, n_images=2)
    lts = LocalTemperatureScaling().fit(X4, y4)
    X, _, _ = _context_table(n_images=1)
    seven = np.hstack([X, X[:, C + 5 : C + 6]])  # the fitted width, 3 logits + 7 context
    assert seven.shape[1] == lts.n_features_in_
    with pytest.raises(ValueError, match=r"'disagree_7x7' of the X given to .*predict"):
        lts.predict_proba(seven)
    assert lts.predict_proba(X4).shape == (len(y4), 4)


def test_a_real_table_passes_and_each_relation_names_its_columns():
    from sksegcal.context import check_context_block

    X, y, _ = _context_table()
    check_context_block(X, C, "spatial")
    LocalTemperatureScaling().fit(X, y)
    col = {name: C + i for i, name in enumerate(CONTEXT_FEATURES)}
    # a row whose window mean of the entropy exceeds its maximum, both in [0, log C]
    row = int(np.argmin(X[:, col["entropy_max_5x5"]]))
    bad = X.copy()
    bad[row, col["entropy_mean_5x5"]] = bad[row, col["entropy_max_5x5"]] + 0.01
    assert bad[row, col["entropy_mean_5x5"]] < np.log(C)
    with pytest.raises(ValueError, match=r"'entropy_mean_5x5' and 'entropy_max_5x5' .* 1 of"):
        LocalTemperatureScaling().fit(bad, y)
    # an interior pixel (distance > 0) with a disagreeing neighbour
    row = int(np.argmax(X[:, col["boundary_distance"]]))
    bad = X.copy()
    bad[row, col["disagree_3x3"]] = 0.125
    with pytest.raises(ValueError, match=r"'disagree_3x3' and 'boundary_distance' .* 1 of"):
        check_context_block(bad, C, "spatial")
    # a non-finite context value is out of range (the calibrators refuse it before)
    bad = X.copy()
    bad[row, col["boundary_distance"]] = np.inf
    with pytest.raises(ValueError, match=r"'boundary_distance' .* 1 of \d+ rows outside"):
        check_context_block(bad, C, "spatial")


@pytest.mark.parametrize(
    "case", ["huge", "uniform", "one class predicted", "one logit column", "float64", "overflow"]
)
def test_rows_of_extreme_logits_pass_the_check_as_documented(case):
    from sksegcal.context import check_context_block, image_rows

    rng = np.random.default_rng(3)
    regions = rng.integers(0, C, size=(4, 4)).repeat(4, 0).repeat(4, 1)
    z = np.where(np.moveaxis(np.eye(C)[regions], -1, 0) > 0, 1e30, -1e30).astype(np.float32)
    if case == "uniform":  # every entropy log C exactly, the bound, up to float32 rounding
        z = np.zeros((C, 16, 16), np.float32)
    elif case == "one class predicted":  # no boundary: the distance is the clip everywhere
        z = rng.normal(size=(C, 16, 16)).astype(np.float32)
        z[0] += 100.0
    elif case == "one logit column":  # entropy 0, margin 1
        z = z[:1]
    elif case == "float64":  # features from float64 logits, rounded to float32
        z = np.log(rng.dirichlet(np.full(C, 0.3), size=(16, 16))).transpose(2, 0, 1)
    elif case == "overflow":  # finite, but the softmax statistics overflow float32
        z[0, 0, 0], z[1, 0, 0] = 3e38, -3e38
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(ValueError, match="overflows float32"):
                image_rows(z, "spatial")
        return
    X = image_rows(z, "spatial")
    assert X.dtype == np.float32 and np.isfinite(X).all()
    check_context_block(X, len(z), "spatial")
