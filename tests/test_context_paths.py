"""The spatial context outside pixel tables: the store engine, mmseg, the CLI, the maps helper.

Every path that builds a calibrator's rows itself must give a calibrator that
reads the spatial context (``SelectiveScalingCalibrator(context="spatial")``,
``LocalTemperatureScaling()``, a pipeline or search ending in one) exactly the
rows ``flatten_segmentation(..., context="spatial")`` gives for the same image:
the reference here. Spies (the calibrators, recording what they are given)
compare the rows bit for bit; the numbers (metrics, probabilities) are compared
with the in-memory computation on the reference rows.
"""

from __future__ import annotations

import json

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline

from conftest import extract_store, overconfident_maps, save_maps
from sksegcal import LocalTemperatureScaling, SelectiveScalingCalibrator, TemperatureScaling
from sksegcal.calibrators import BaseLogitCalibrator
from sksegcal.context import estimator_context, n_context_features
from sksegcal.metrics import CalibrationAccumulator
from sksegcal.pixels import flatten_segmentation, predict_proba_maps
from sksegcal.store import (
    LogitStore,
    calibrator_fingerprint,
    evaluate_store,
    fit_store,
    predict_store,
)

N_CLASSES = 4
K = n_context_features()

pytestmark = [
    # random labels: the detectors and temperatures have little to learn; not our subject
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]


def make_images(n=6, seed=0, n_classes=N_CLASSES, sizes=((12, 9), (7, 15), (10, 10))):
    """Over-confident logits with partly right labels, blob-like regions and ignored pixels."""
    rng = np.random.default_rng(seed)
    logits, labels = [], []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        # smooth maps: regions of one predicted class, so that boundaries exist
        z = rng.normal(scale=3.0, size=(n_classes, h, w))
        z = (z + np.roll(z, 1, axis=1) + np.roll(z, 1, axis=2)).astype(np.float32)
        t = np.where(rng.random((h, w)) < 0.6, z.argmax(0), rng.integers(0, n_classes, (h, w)))
        t[rng.random((h, w)) < 0.1] = 255
        logits.append(z)
        labels.append(t.astype(np.int64))
    return logits, labels


def build_store(path, logits, labels):
    store = LogitStore.create(path, n_classes=logits[0].shape[0])
    for i, (z, t) in enumerate(zip(logits, labels)):
        store.add_image(i, z, t)
    return store


@pytest.fixture
def images():
    return make_images()


@pytest.fixture
def store(tmp_path, images):
    return build_store(tmp_path / "store", *images)


def stored(images):
    """The images as the store holds them (float16 logits)."""
    logits, labels = images
    return [z.astype(np.float16) for z in logits], labels


def reference(images, ignore_index=255):
    """flatten_segmentation(..., context="spatial") of the stored images: the reference rows.

    ``ignore_index=None``: every pixel's row (ignored labels become 0 in ``y``).
    """
    logits, labels = stored(images)
    if ignore_index is None:
        labels = [np.where(t == 255, 0, t) for t in labels]
    return flatten_segmentation(logits, labels, context="spatial", ignore_index=ignore_index)


# the spies: the package's calibrators, recording every X they are given
SEEN: dict[str, list] = {"fit": [], "predict": [], "groups": []}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # BLAS and torch thread pools spinning on a shared 2-core machine make these tiny fits
    # ten times slower (a logistic regression on 500 rows: 1 s instead of 0.1 s)
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _clear_spies():
    for rows in SEEN.values():
        rows.clear()


class SpySelective(SelectiveScalingCalibrator):
    def fit(self, X, y, sample_weight=None, groups=None):
        SEEN["fit"].append(np.array(X))
        SEEN["groups"].append(None if groups is None else np.array(groups))
        return super().fit(X, y, sample_weight=sample_weight, groups=groups)

    def predict_proba(self, X):
        SEEN["predict"].append(np.array(X))
        return super().predict_proba(X)


class SpyLTS(LocalTemperatureScaling):
    def fit(self, X, y, sample_weight=None):
        SEEN["fit"].append(np.array(X))
        return super().fit(X, y, sample_weight=sample_weight)

    def predict_proba(self, X):
        SEEN["predict"].append(np.array(X))
        return super().predict_proba(X)


class ToyContext(ClassifierMixin, BaseEstimator):
    """A calibrator from outside the package: it declares the context it reads, nothing more.

    Its temperature grows with the first context column (the 3x3 disagreement).
    """

    @property
    def reads_context(self):
        return "spatial"

    def fit(self, X, y):
        X = np.asarray(X)
        SEEN["fit"].append(X.copy())
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.arange(X.shape[1] - K)
        return self

    def predict_proba(self, X):
        X = np.asarray(X, dtype=np.float64)
        SEEN["predict"].append(X.astype(np.float32))
        z = X[:, :-K] / (1.0 + 2.0 * X[:, -K : -K + 1])
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


class ToyCalibrator(ToyContext, BaseLogitCalibrator):
    """The toy as a calibrator of the package's family, which the persistence policy admits."""

    input_type = "logits"  # what the family's evaluation shortcut asks (it finds none here)
    chunk_size = 65536

    def _fit_calibration(self, X, y, sample_weight, groups=None):  # the toy's fit overrides
        raise NotImplementedError


def spatial_selective(**kwargs):
    return SpySelective(
        LogisticRegression(max_iter=300), context="spatial", random_state=0, **kwargs
    )


# ------------------------------------------------------------------- which context
def test_estimator_context_of_each_calibrator_and_wrapper():
    sel = SelectiveScalingCalibrator(context="spatial")
    assert estimator_context(sel) == "spatial"
    assert estimator_context(SelectiveScalingCalibrator()) is None
    assert estimator_context(LocalTemperatureScaling()) == "spatial"
    assert estimator_context(LocalTemperatureScaling(n_context=0)) is None
    assert estimator_context(TemperatureScaling()) is None
    assert estimator_context(None) is None
    assert estimator_context(LogisticRegression()) is None
    # wrappers: the final step, the searched estimator, a meta-estimator's estimator
    assert estimator_context(Pipeline([("cal", sel)])) == "spatial"
    assert estimator_context(Pipeline([("cal", LocalTemperatureScaling())])) == "spatial"
    assert estimator_context(GridSearchCV(sel, {"t2": [2.0, 1e10]})) == "spatial"
    assert estimator_context(GridSearchCV(Pipeline([("cal", sel)]), {"cal__t2": [2.0]})) == (
        "spatial"
    )
    # a grid that sets the context for every candidate decides it
    grid = GridSearchCV(SelectiveScalingCalibrator(), {"context": ["spatial"], "t2": [2.0]})
    assert estimator_context(grid) == "spatial"
    both = GridSearchCV(SelectiveScalingCalibrator(), [{"t2": [2.0]}, {"context": ["spatial"]}])
    with pytest.raises(ValueError, match="differ in their context"):
        estimator_context(both)
    with pytest.raises(ValueError, match="differ in their context"):
        estimator_context(
            GridSearchCV(LocalTemperatureScaling(), {"n_context": [None, 0]}), where="x"
        )

    class Foreign:  # a parameter of that name is no declaration: no context
        context = "spatial"

        def get_params(self, deep=True):
            return {"context": "spatial"}

    assert estimator_context(Foreign()) is None
    # the declaration is what counts, for any class and through any wrapper
    assert estimator_context(ToyContext()) == "spatial"
    assert estimator_context(Pipeline([("toy", ToyContext())])) == "spatial"
    from sklearn.frozen import FrozenEstimator

    assert estimator_context(FrozenEstimator(ToyContext())) == "spatial"
    assert estimator_context(FrozenEstimator(Pipeline([("c", sel)]))) == "spatial"


def test_a_fitted_search_answers_with_its_best_estimator(images):
    X, y, groups = reference(images)
    search = GridSearchCV(
        SelectiveScalingCalibrator(LogisticRegression(max_iter=300), random_state=0),
        {"context": [None, "spatial"]},
        cv=2,
    )
    with pytest.raises(ValueError, match="differ in their context"):
        estimator_context(search)
    # once fitted, the best candidate says it
    search = GridSearchCV(
        SelectiveScalingCalibrator(
            LogisticRegression(max_iter=300), context="spatial", random_state=0
        ),
        {"t2": [2.0, 1e10]},
        cv=2,
    ).fit(X, y)
    assert estimator_context(search) == "spatial"


@pytest.mark.parametrize("n_context", [3, 1])
def test_a_context_of_ones_own_is_refused_in_every_path(store, images, tmp_path, n_context):
    lts = LocalTemperatureScaling(n_context=n_context)
    with pytest.raises(ValueError, match=r"reads the context 'custom'.*fit_store cannot"):
        fit_store(lts, store, images=None)
    X, y, _ = flatten_segmentation(*stored(images))
    extra = np.random.default_rng(0).random((len(X), n_context), dtype=np.float32)
    fitted = LocalTemperatureScaling(n_context=n_context).fit(np.hstack([X, extra]), y)
    with pytest.raises(ValueError, match="evaluate_store cannot compute"):
        evaluate_store(store, {"lts": fitted})
    with pytest.raises(ValueError, match="predict_store cannot compute"):
        predict_store(fitted, store, tmp_path / "proba")
    with pytest.raises(ValueError, match="predict_proba_maps cannot"):
        predict_proba_maps(fitted, np.stack([images[0][2]])[:, :, :5, :5])
    assert not (tmp_path / "proba").exists()
    # n_context=0 reads no context: every path works on the logits alone
    lts0 = fit_store(LocalTemperatureScaling(n_context=0), store, images=None, random_state=0)
    assert lts0.n_features_in_ == N_CLASSES
    evaluate_store(store, {"lts0": lts0})


def test_wrong_width_is_refused(store, images):
    X, y, groups = reference(images)
    plain = SelectiveScalingCalibrator(LogisticRegression(max_iter=300), random_state=0)
    plain.fit(X[:, :N_CLASSES], y, groups=groups)
    # the context switched on after fitting: fitted on C columns, reads C + K
    with pytest.raises(
        ValueError,
        match=rf"spatial context.*{N_CLASSES + K} in all.*fitted on "
        rf"{N_CLASSES} columns",
    ):
        evaluate_store(store, {"sel": plain.set_params(context="spatial")})


# ------------------------------------------------------------------- the store's rows
@pytest.mark.parametrize("chunk_pixels", [7, 10_000])
def test_store_sample_rows_are_flatten_segmentation_rows(store, images, chunk_pixels):
    X_ref, y_ref, g_ref = reference(images)
    # every labelled pixel: the very table of flatten_segmentation, bit for bit
    X, y, groups = store.sample(
        10**6, context="spatial", chunk_pixels=chunk_pixels, random_state=0
    )
    assert X.dtype == np.float32 and X.shape == (len(y_ref), N_CLASSES + K)
    np.testing.assert_array_equal(X, X_ref)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(groups, g_ref)
    # a subsample: the rows of store.sample (same pixels, same order), each with its context
    X, y, groups = store.sample(150, context="spatial", chunk_pixels=chunk_pixels, random_state=3)
    X0, y0, g0 = store.sample(150, chunk_pixels=chunk_pixels, random_state=3)
    np.testing.assert_array_equal(X[:, :N_CLASSES], X0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(groups, g0)
    by_logits = {(g, row[:N_CLASSES].tobytes()): row for g, row in zip(g_ref, X_ref)}
    assert len(by_logits) == len(X_ref)  # the logits identify the pixel
    for g, row in zip(groups, X):
        np.testing.assert_array_equal(row, by_logits[(g, row[:N_CLASSES].tobytes())])


def test_sampler_strata_read_the_logit_columns_only(store):
    """Context columns after the logits (of any value) never change which pixels are drawn."""
    X0, y0, g0 = store.sample(300, random_state=0)
    read = store.iter_tables

    def huge_context(image_id, chunk_pixels=None, *, context=None, ignored="drop"):
        # context columns far above every logit: an argmax over the whole row would put
        # every pixel in the "wrong" stratum and disagree with the records' counts
        for x, y in read(image_id, chunk_pixels, ignored=ignored):
            yield np.concatenate([x, np.full((len(y), K), 1e30, np.float32)], axis=1), y

    store.iter_tables = huge_context
    X, y, groups = store.sample(300, random_state=0, context="spatial")
    np.testing.assert_array_equal(X[:, :N_CLASSES], X0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(groups, g0)
    assert (X[:, N_CLASSES:] == 1e30).all()


@pytest.mark.parametrize("make", [spatial_selective, lambda: SpyLTS()], ids=["selective", "lts"])
def test_fit_store_feeds_the_flatten_rows(store, images, make):
    X_ref, y_ref, g_ref = reference(images)
    est = fit_store(make(), store, images=None, max_pixels=10**6, random_state=0)
    (seen,) = SEEN["fit"]
    np.testing.assert_array_equal(seen, X_ref)
    assert est.n_features_in_ == N_CLASSES + K
    # the same fit as on the in-memory table (fit_store passes the image ids as groups)
    groups = {"groups": g_ref} if isinstance(est, SelectiveScalingCalibrator) else {}
    ref = clone(make()).fit(X_ref, y_ref, **groups)
    np.testing.assert_array_equal(est.predict_proba(X_ref), ref.predict_proba(X_ref))


def test_evaluate_store_feeds_the_flatten_rows_and_equals_in_memory(store, images):
    X_ref, y_ref, g_ref = reference(images)
    sel = spatial_selective().fit(X_ref, y_ref, groups=g_ref)
    lts = SpyLTS().fit(X_ref, y_ref)
    ts = TemperatureScaling().fit(X_ref[:, :N_CLASSES], y_ref)
    SEEN["predict"].clear()
    calibrators = {"uncalibrated": None, "ts": ts, "sel": sel, "lts": lts}
    accs = evaluate_store(store, calibrators, chunk_pixels=10_000)
    # one image per chunk: both spies got every pixel's row, ignored ones included, in order
    X_all, _, _ = reference(images, ignore_index=None)
    assert len(SEEN["predict"]) == 2 * len(images[0])
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"][0::2]), X_all)
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"][1::2]), X_all)

    # the numbers: an accumulator fed image by image with the in-memory probabilities
    for chunk_pixels in (7, 10_000):
        accs = evaluate_store(store, calibrators, chunk_pixels=chunk_pixels)
        for name, est in calibrators.items():
            ref = CalibrationAccumulator(N_CLASSES)
            for g in np.unique(g_ref):
                rows = X_ref[g_ref == g]
                if est is None:
                    z = rows[:, :N_CLASSES].astype(np.float64)
                    proba = np.exp(z - z.max(1, keepdims=True))
                    proba /= proba.sum(1, keepdims=True)
                elif name == "ts":
                    proba = est.predict_proba(rows[:, :N_CLASSES])
                else:
                    proba = est.predict_proba(rows)
                ref.update(y_ref[g_ref == g], proba, image_id=int(g))
            got, want = accs[name].summary(), ref.summary()
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (name, key)


def test_predict_store_equals_in_memory_predict_proba(store, images, tmp_path):
    X_ref, y_ref, g_ref = reference(images)
    sel = spatial_selective().fit(X_ref, y_ref, groups=g_ref)
    SEEN["predict"].clear()
    out = predict_store(sel, store, tmp_path / "proba", chunk_pixels=20)
    assert out.source["context"] == "spatial"
    X_all, _, g_all = reference(images, ignore_index=None)
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"]), X_all)
    logits, labels = stored(images)
    for i, z in enumerate(logits):
        maps = predict_proba_maps(sel, z.astype(np.float32)[None])[0]
        # and predict_proba_maps gives flatten's rows too (a spy call per image)
        np.testing.assert_array_equal(SEEN["predict"][-1], X_all[g_all == i])
        expected = sel.predict_proba(X_all[g_all == i]).T.reshape(z.shape)
        np.testing.assert_allclose(maps, expected, rtol=0, atol=1e-6)
        got = np.asarray(out.load_image(i).logits, dtype=np.float32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)  # float16 storage
        np.testing.assert_array_equal(out.load_image(i).labels, labels[i])


def test_fingerprint_and_resume_tell_context_settings_apart(store, images, tmp_path):
    X_ref, y_ref, g_ref = reference(images)
    sel = SelectiveScalingCalibrator(
        LogisticRegression(max_iter=300), context="spatial", random_state=0
    ).fit(X_ref, y_ref, groups=g_ref)
    # the same fitted state, the context parameter alone differs
    other = clone(sel)
    other.__dict__.update({k: v for k, v in vars(sel).items() if k.endswith("_")})
    assert calibrator_fingerprint(other) == calibrator_fingerprint(sel)
    other.set_params(context=None)
    assert calibrator_fingerprint(other) != calibrator_fingerprint(sel)
    assert calibrator_fingerprint(LocalTemperatureScaling()) != calibrator_fingerprint(
        LocalTemperatureScaling(n_context=0)
    )
    # wrapped: the pipeline's and the search's fingerprints see the context too
    assert calibrator_fingerprint(Pipeline([("c", other)])) != calibrator_fingerprint(
        Pipeline([("c", sel)])
    )
    # a resume with the other context setting is refused
    predict_store(sel, store, tmp_path / "proba", images=[0])
    plain = SelectiveScalingCalibrator(LogisticRegression(max_iter=300), random_state=0).fit(
        X_ref[:, :N_CLASSES], y_ref, groups=g_ref
    )
    with pytest.raises(ValueError, match="mix two calibrations"):
        predict_store(plain, store, tmp_path / "proba")


def test_pipeline_and_grid_search_through_the_store(store, images, tmp_path):
    X_ref, y_ref, g_ref = reference(images)
    pipe = Pipeline([("cal", spatial_selective())])
    fitted = fit_store(pipe, store, images=None, max_pixels=10**6, random_state=0)
    np.testing.assert_array_equal(SEEN["fit"][0], X_ref)
    # the image ids reach the wrapped calibrator (metadata routing), as they reach a bare one
    np.testing.assert_array_equal(SEEN["groups"][0], g_ref)
    with sklearn.config_context(enable_metadata_routing=True):
        direct = Pipeline([("cal", spatial_selective())]).fit(X_ref, y_ref, groups=g_ref)
    np.testing.assert_array_equal(fitted.predict_proba(X_ref), direct.predict_proba(X_ref))

    SEEN["groups"].clear()
    search = GridSearchCV(spatial_selective(), {"t2": [2.0, 1e10]}, cv=GroupKFold(2))
    search = fit_store(search, store, images=None, max_pixels=10**6, random_state=0)
    # every candidate's fit and the refit got image ids, and the splitter split by image
    assert len(SEEN["groups"]) == 5 and all(g is not None for g in SEEN["groups"])
    np.testing.assert_array_equal(SEEN["groups"][-1], g_ref)
    assert search.best_estimator_.n_features_in_ == N_CLASSES + K
    # joblib round trip: the same numbers through every path
    path = tmp_path / "search.joblib"
    joblib.dump(search, path)
    loaded = joblib.load(path)
    a = evaluate_store(store, {"pipe": fitted, "search": search})
    b = evaluate_store(store, {"pipe": fitted, "search": loaded})
    assert a["search"].summary() == b["search"].summary()
    assert a["pipe"].summary() == pytest.approx(
        evaluate_store(store, {"direct": direct})["direct"].summary()
    )
    out = predict_store(loaded, store, tmp_path / "proba")
    X_all, _, g_all = reference(images, ignore_index=None)
    for i in range(len(images[0])):
        got = np.asarray(out.load_image(i).logits, np.float32).reshape(N_CLASSES, -1).T
        np.testing.assert_allclose(got, search.predict_proba(X_all[g_all == i]), atol=1e-3, rtol=0)


def test_store_paths_end_to_end_with_both_calibrators(store):
    store.make_split(random_state=0)
    sel = fit_store(
        SelectiveScalingCalibrator(
            LogisticRegression(max_iter=300), context="spatial", random_state=0
        ),
        store,
        max_pixels=400,
        random_state=0,
    )
    lts = fit_store(LocalTemperatureScaling(), store, max_pixels=400, random_state=0)
    calibrators = {"uncalibrated": None, "sel": sel, "lts": lts}
    accs = evaluate_store(
        store, calibrators, images=None, n_jobs=2, backend="threading", task_pixels=100
    )
    one = evaluate_store(store, calibrators, images=None)
    for name in accs:
        # several blocks on two threads: the same sums as one block in this thread
        np.testing.assert_equal(accs[name].summary(), one[name].summary())
        # temperatures never move the argmax
        assert accs[name].summary()["accuracy"] == accs["uncalibrated"].summary()["accuracy"]


# ------------------------------------------------------------------- the command line
def test_cli_fit_evaluate_with_spatial_context(tmp_path, capsys):
    pytest.importorskip("skops")
    from sksegcal.cli import main
    from sksegcal.persistence import load

    c = 3
    save_maps(tmp_path, *overconfident_maps(12, c, 16, 16, scale=5.0, noise=0.8))
    store = extract_store(tmp_path)
    sel, lts = tmp_path / "sel.skops", tmp_path / "lts.skops"
    assert (
        main(
            [
                "fit",
                str(store),
                "--context",
                "spatial",
                "--t2",
                "auto",
                "2",
                "-o",
                str(sel),
                "-q",
            ]
        )
        == 0
    )
    assert "context = spatial" in capsys.readouterr().out
    assert main(["fit", str(store), "--method", "lts", "-o", str(lts), "-q"]) == 0
    assert "lts: TS temperature (start) = " in capsys.readouterr().out
    assert (
        main(
            [
                "fit",
                str(store),
                "--method",
                "temperature",
                "--context",
                "spatial",
                "-o",
                str(tmp_path / "ts.skops"),
                "-q",
            ]
        )
        == 1
    )
    assert "--context sets a parameter of selective scaling" in capsys.readouterr().err
    loaded = {"sel": load(sel), "lts": load(lts)}
    assert loaded["sel"].context == "spatial"
    assert {est.n_features_in_ for est in loaded.values()} == {c + K}

    results = tmp_path / "results"
    assert (
        main(["evaluate", str(store), "-c", str(sel), "-c", str(lts), "-o", str(results), "-q"])
        == 0
    )
    metrics = json.loads((results / "metrics.json").read_text())["results"]["test"]
    opened = LogitStore.open(store)
    ref = evaluate_store(opened, {"uncalibrated": None, **loaded}, images="test")
    for name in ("uncalibrated", "sel", "lts"):
        for key in ("ece", "nll", "brier"):
            assert metrics[name][key] == pytest.approx(ref[name].summary()[key], rel=1e-9)
    # the fitted calibrator is the one fit_store-like sampling gives: the flatten rows
    split = opened.split
    X, y, groups = opened.sample(
        400_000,
        context="spatial",
        images=np.concatenate([split.train, split.validation]),
        random_state=0,
    )
    ref_lts = LocalTemperatureScaling().fit(X, y)
    np.testing.assert_allclose(loaded["lts"].coef_, ref_lts.coef_)


# ------------------------------------------------------------------- mmseg
def _mmseg_noise(test):
    # third-party noise on every run with mmcv-lite and torch 2.13 (not about our code)
    for text in (
        "ignore::DeprecationWarning:torch.jit",
        "ignore:Fail to import ``MultiScaleDeformableAttention``",
        "ignore:``build_loss`` would be deprecated",
        "ignore:Default ``avg_non_ignore`` is False",
    ):
        test = pytest.mark.filterwarnings(text)(test)
    return test


_MMSEG_NOISE = _mmseg_noise


def _sample(logits, label):
    """A data sample as mmengine's Evaluator hands it to a metric."""
    import torch

    return {
        "seg_logits": {"data": torch.from_numpy(logits)},
        "gt_sem_seg": {"data": torch.from_numpy(label.astype(np.int64))[None]},
    }


@pytest.mark.slow
@pytest.mark.integration
@_MMSEG_NOISE
def test_mmseg_paths_feed_the_same_rows_as_the_store(store, images):
    """For the same image, the metric, calibrated inference and the store give the same rows."""
    pytest.importorskip("mmseg")
    import torch

    from sksegcal.integrations.mmseg import CalibrationMetric
    from sksegcal.integrations.mmseg._inference import proba_map

    X_ref, y_ref, g_ref = reference(images)
    sel = spatial_selective().fit(X_ref, y_ref, groups=g_ref)
    # the store's rows of every pixel, one image per chunk
    SEEN["predict"].clear()
    evaluate_store(store, {"sel": sel}, chunk_pixels=10_000)
    store_rows = list(SEEN["predict"])

    logits, labels = stored(images)  # seg_logits holding the stored values
    SEEN["predict"].clear()
    metric = CalibrationMetric(calibrator=sel, chunk_pixels=37)
    metric.process({}, [_sample(z.astype(np.float32), t) for z, t in zip(logits, labels)])
    per_image = np.cumsum([0] + [z[0].size for z in logits])
    metric_rows = np.concatenate(SEEN["predict"])
    for i, rows in enumerate(store_rows):
        np.testing.assert_array_equal(metric_rows[per_image[i] : per_image[i + 1]], rows)
    got = metric.evaluate(len(logits))
    ref = evaluate_store(store, {"sel": sel})["sel"].summary()
    assert got["ECE"] == pytest.approx(ref["ece"], rel=1e-5)
    assert got["NLL"] == pytest.approx(ref["nll"], rel=1e-5)

    # what calibrate_model's patch calls for each image
    for i, z in enumerate(logits):
        SEEN["predict"].clear()
        proba = proba_map(sel, torch.from_numpy(z.astype(np.float32)), 50, "spatial")
        np.testing.assert_array_equal(np.concatenate(SEEN["predict"]), store_rows[i])
        np.testing.assert_allclose(
            proba.numpy(), sel.predict_proba(store_rows[i]).T.reshape(z.shape), rtol=0, atol=1e-6
        )

    with pytest.raises(ValueError, match="reads the context .custom.*CalibrationMetric cannot"):
        X, y, _ = flatten_segmentation(logits, labels)
        CalibrationMetric(
            calibrator=LocalTemperatureScaling(n_context=3).fit(
                np.hstack([X, np.zeros((len(X), 3), np.float32)]), y
            )
        )


@pytest.mark.slow
@pytest.mark.integration
@_MMSEG_NOISE
def test_calibrate_model_with_spatial_selective_scaling(tmp_path):
    """A real mmseg segmentor: calibrate_model gives the calibrator flatten's rows."""
    pytest.importorskip("mmseg")
    import torch
    from mmseg.apis import inference_model

    from sksegcal.integrations import mmseg as mm

    torch.set_num_threads(1)
    model = mm.load_model(
        "segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py",
        cfg_options={
            "model.backbone.init_cfg": None,
            "model.decode_head.num_classes": N_CLASSES,
            "test_pipeline": [dict(type="LoadImageFromNDArray"), dict(type="PackSegInputs")],
        },
    )
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    logits = inference_model(model, image).seg_logits.data.numpy()  # (C, H, W) float32
    blank = np.zeros(logits.shape[1:], dtype=np.int64)
    X, _, _ = flatten_segmentation(logits[None], blank[None], context="spatial", ignore_index=None)
    y = rng.integers(0, N_CLASSES, size=len(X))
    sel = spatial_selective().fit(X, y)
    SEEN["predict"].clear()
    result = inference_model(mm.calibrate_model(model, sel, chunk_pixels=300), image)
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"]), X)
    expected = sel.predict_proba(X).T.reshape(logits.shape)
    np.testing.assert_allclose(result.seg_logits.data.numpy(), expected, rtol=0, atol=1e-6)
    mm.uncalibrate_model(model)
    with pytest.raises(ValueError, match="reads the context .custom.*calibrate_model cannot"):
        mm.calibrate_model(
            model,
            LocalTemperatureScaling(n_context=2).fit(
                np.hstack([X[:, :N_CLASSES], np.zeros((len(X), 2), np.float32)]), y
            ),
        )


@pytest.mark.slow
@pytest.mark.integration
def test_demo_with_spatial_context(tmp_path, capsys):
    """``demo --context spatial``: the detector reads the context; evaluate reads the need."""
    pytest.importorskip("nilearn")
    pytest.importorskip("matplotlib")
    from sksegcal.cli import main
    from sksegcal.persistence import load

    out = tmp_path / "report"
    args = ["demo", "--quick", "--context", "spatial", "-o", str(out), "--keep-stores", "-q",
            "--classifier", "logistic", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(args) == 0
    assert "  context: spatial" in capsys.readouterr().out
    cal = load(out / "calibrator.joblib", trusted=True)
    assert cal.context == "spatial" and cal.n_features_in_ == 3 + K
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["command"] == "sksegcal demo --quick --context spatial"
    results = tmp_path / "results"
    store, saved = out / "stores" / "calibration", out / "calibrator.joblib"
    assert (
        main(["evaluate", str(store), "-c", str(saved), "-o", str(results), "-q", "--trusted"])
        == 0
    )
    evaluated = json.loads((results / "metrics.json").read_text())["results"]["test"]
    for key in ("ece", "nll", "brier"):
        assert evaluated["calibrator"][key] == pytest.approx(
            metrics["results"]["test"]["selective scaling"][key], rel=1e-9
        )


# ------------------------------------------------------------------- a new calibrator class
@_MMSEG_NOISE
def test_a_new_class_declaring_context_works_through_every_path(store, images, tmp_path):
    """A class that only declares ``reads_context`` gets flatten's rows from every path."""
    X_ref, y_ref, g_ref = reference(images)
    X_all, _, g_all = reference(images, ignore_index=None)
    # the store: fit, evaluate, predict
    toy = fit_store(ToyContext(), store, images=None, max_pixels=10**6, random_state=0)
    np.testing.assert_array_equal(SEEN["fit"][0], X_ref)
    SEEN["predict"].clear()
    accs = evaluate_store(store, {"toy": toy}, chunk_pixels=10_000)
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"]), X_all)
    SEEN["predict"].clear()
    predict_store(toy, store, tmp_path / "proba", chunk_pixels=20)
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"]), X_all)
    # the conformal store path
    from sksegcal.conformal import ConformalPixelSets, fit_conformal_store

    SEEN["predict"].clear()
    fit_conformal_store(ConformalPixelSets(0.2, calibrator=toy), store, images=None)
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"]), X_ref)
    # the command line: evaluate a saved toy (a pickle of a class of this module)
    from sksegcal.cli import main

    toy = fit_store(ToyCalibrator(), store, images=None, max_pixels=10**6, random_state=0)
    joblib.dump(toy, tmp_path / "toy.joblib")
    store.make_split(random_state=0)
    results = tmp_path / "results"
    args = ["evaluate", str(store.path), "-c", str(tmp_path / "toy.joblib"), "-o", str(results)]
    assert main([*args, "-q", "--trusted", "--images", "all"]) == 0
    got = json.loads((results / "metrics.json").read_text())["results"]
    assert got["all images"]["toy"]["ece"] == pytest.approx(accs["toy"].summary()["ece"], rel=1e-9)
    # mmseg: the evaluator metric and calibrated inference
    pytest.importorskip("mmseg")
    import torch

    from sksegcal.integrations.mmseg import CalibrationMetric
    from sksegcal.integrations.mmseg._inference import proba_map

    logits, labels = stored(images)
    SEEN["predict"].clear()
    metric = CalibrationMetric(calibrator=toy, chunk_pixels=37)
    metric.process({}, [_sample(z.astype(np.float32), t) for z, t in zip(logits, labels)])
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"]), X_all)
    SEEN["predict"].clear()
    z = torch.from_numpy(logits[0].astype(np.float32))
    proba_map(toy, z, 50, estimator_context(toy))
    np.testing.assert_array_equal(np.concatenate(SEEN["predict"]), X_all[g_all == 0])
