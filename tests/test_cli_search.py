"""``sksegcal fit --method search``: CalibratorSearchCV through the command line."""

import json

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from sksegcal import CalibratorSearchCV
from sksegcal.cli import main
from sksegcal.persistence import load
from sksegcal.store import LogitStore, evaluate_store, fit_store


@pytest.fixture(autouse=True)
def one_thread():
    # the search fits dozens of small logistic regressions: on a busy machine BLAS threads
    # make each several times slower, and the results do not depend on the thread count
    with threadpool_limits(1):
        yield


def _make_store(folder, *, separable: bool):
    """A LogitStore of 12 small images; ``separable``: a confident group of pixels that is
    nearly always right and a hesitant group right half the time (no single temperature
    fits both, so the search has something to find); else uniformly noisy logits, where
    temperature scaling is hard to beat."""
    rng = np.random.default_rng(0)
    n, c, h, w = 12, 3, 16, 16
    labels = rng.integers(0, c, size=(n, h, w))
    if separable:
        hard = rng.random((n, h, w)) < 0.4
        wrong = hard & (rng.random((n, h, w)) < 0.5)
        pred = np.where(wrong, (labels + rng.integers(1, c, size=labels.shape)) % c, labels)
        margin = np.where(hard, 3.0, 9.0)
        logits = np.moveaxis(np.eye(c)[pred], -1, 1) * margin[:, None]
        logits += 0.3 * rng.normal(size=(n, c, h, w))
    else:
        logits = 5.0 * (
            np.moveaxis(np.eye(c)[labels], -1, 1) + 0.8 * rng.normal(size=(n, c, h, w))
        )
    np.save(folder / "logits.npy", logits.astype(np.float32))
    np.save(folder / "labels.npy", labels.astype(np.uint8))
    path = folder / "store"
    args = ["extract", "--logits", str(folder / "logits.npy"), "--labels"]
    assert main(args + [str(folder / "labels.npy"), "--store", str(path), "-q"]) == 0
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _make_store(tmp_path_factory.mktemp("search"), separable=True)


@pytest.fixture(scope="module")
def fitted(store):
    """``sksegcal fit STORE --method search``: (the saved search, what the command printed)."""
    import contextlib
    import io

    out = io.StringIO()
    with threadpool_limits(1), contextlib.redirect_stdout(out):
        assert (
            main(
                [
                    "fit",
                    str(store),
                    "--method",
                    "search",
                    "-o",
                    str(store.parent / "s.skops"),
                    "-q",
                ]
            )
            == 0
        )
    return store.parent / "s.skops", out.getvalue()


def _fit_sample(store):
    opened = LogitStore.open(store)
    split = opened.split
    ids = np.concatenate([split.train, split.validation])
    return opened, ids, opened.sample(400_000, images=ids, random_state=0)


def test_fit_search_is_the_python_default(store, fitted):
    """``fit --method search`` fits what ``CalibratorSearchCV(random_state=0).fit`` fits."""
    path, printed = fitted
    search = load(path)
    _, _, (X, y, groups) = _fit_sample(store)
    ref = CalibratorSearchCV(random_state=0).fit(X, y, groups=groups)
    assert repr(search) == repr(ref)  # every parameter at its default, the seed given
    assert ref.best_name_ != "TS"  # the case has something to find
    assert search.best_name_ == ref.best_name_
    for key in ("name", "mean_image_nll", "mean_improvement", "t_statistic", "supported"):
        np.testing.assert_array_equal(search.cv_results_[key], ref.cv_results_[key])
    np.testing.assert_array_equal(search.image_nll_, ref.image_nll_)
    np.testing.assert_array_equal(search.predict_proba(X), ref.predict_proba(X))
    # the command says what it chose and shows the evidence: the search's own summary
    winner = type(ref.best_estimator_).__name__
    assert f"search: chosen = {ref.best_name_} ({winner})" in printed
    assert f"t = {ref.cv_results_['t_statistic'][ref.best_index_]:.2f}" in printed
    assert ref.summary() in printed


def test_the_search_options_set_its_parameters(store):
    out = store.parent / "s2.skops"
    args = ["fit", str(store), "--method", "search", "--cv", "2", "--max-cv-pixels", "1000"]
    assert main(args + ["-o", str(out), "-q"]) == 0
    search = load(out)
    assert repr(search) == repr(CalibratorSearchCV(cv=2, max_cv_pixels=1000, random_state=0))
    assert search.n_splits_ == 2
    # the cross-validation ran on a subsample of 1000 of the fit sample's pixels
    opened, ids, _ = _fit_sample(store)
    ref = fit_store(
        CalibratorSearchCV(cv=2, max_cv_pixels=1000, random_state=0),
        opened,
        images=ids,
        max_pixels=400_000,
        random_state=0,
    )
    np.testing.assert_array_equal(search.image_nll_, ref.image_nll_)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--method", "search", "--t1", "2"],
            "--t1 sets a parameter of selective scaling (--method selective); --method search "
            "has none of them.",
        ),
        (
            ["--method", "temperature", "--cv", "3"],
            "--cv sets a parameter of the calibrator search (--method search); --method "
            "temperature has none of them.",
        ),
        (
            ["--max-cv-pixels", "5000"],  # --method selective by default
            "--max-cv-pixels sets a parameter of the calibrator search (--method search); "
            "--method selective has none of them.",
        ),
        (
            ["--method", "lts", "--context", "spatial", "--mode", "soft"],
            "--context sets a parameter of selective scaling (--method selective) or of the "
            "calibrator search (--method search); --mode sets a parameter of selective scaling "
            "(--method selective); --method lts has none of them (--method lts always reads "
            "the spatial context, --method temperature never).",
        ),
    ],
)
def test_an_option_of_another_method_is_an_error(store, options, message, capsys):
    out = store.parent / "never.skops"
    assert main(["fit", str(store), *options, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"sksegcal fit: error: {message}"
    assert not out.exists()


def test_a_saved_search_evaluates_as_its_winner(store, fitted, capsys):
    path, _ = fitted
    results = store.parent / "results"
    assert main(["evaluate", str(store), "-c", str(path), "-o", str(results), "-q"]) == 0
    capsys.readouterr()
    metrics = json.loads((results / "metrics.json").read_text())
    # the search forwards to its refitted winner: the winner alone gives the same numbers
    opened = LogitStore.open(store)
    winner = load(path).best_estimator_
    ref = evaluate_store(opened, {"winner": winner}, images="test")["winner"].summary()
    for key in ("ece", "nll", "brier", "accuracy"):
        assert metrics["results"]["test"]["s"][key] == pytest.approx(ref[key], rel=1e-6)
    # the report compares it as its winner
    name = type(winner).__name__
    roles = {"SelectiveScalingCalibrator": "selective", "TemperatureScaling": "temperature"}
    assert metrics["roles"]["s"] == roles.get(name, name)


def test_a_spatial_search_whose_winner_reads_no_context_evaluates(tmp_path, capsys):
    """Fitted on logits + context columns, a winner without context takes the logits alone."""
    store = _make_store(tmp_path, separable=False)
    path = store.parent / "spatial.skops"
    args = ["fit", str(store), "--method", "search", "--context", "spatial", "--cv", "2"]
    assert main(args + ["-o", str(path), "-q"]) == 0
    search = load(path)
    assert search.context == "spatial" and search.n_features_in_ > search.n_classes_
    assert search.reads_context is None, search.best_name_
    results = store.parent / "spatial-results"
    assert main(["evaluate", str(store), "-c", str(path), "-o", str(results), "-q"]) == 0
    capsys.readouterr()
    metrics = json.loads((results / "metrics.json").read_text())["results"]["test"]
    ref = evaluate_store(
        LogitStore.open(store), {"winner": search.best_estimator_}, images="test"
    )["winner"].summary()
    assert metrics["spatial"]["nll"] == pytest.approx(ref["nll"], rel=1e-6)


def test_a_saved_search_gives_the_conformal_sets_of_its_winner(store, fitted, capsys):
    from sksegcal.persistence import save

    path, _ = fitted
    winner = store.parent / "winner.skops"
    save(load(path).best_estimator_, winner)
    out = store.parent / "conformal"
    args = ["conformal", str(store), "-c", str(path), "-c", str(winner), "--images", "all"]
    assert main(args + ["--alpha", "0.3", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    rows = json.loads((out / "conformal.json").read_text())["results"]
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(
            {k: v for k, v in row.items() if k != "method"}
        )
    assert np.isfinite(by_method["s"][0]["threshold"])
    assert by_method["s"] == by_method["winner"]
