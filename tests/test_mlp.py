"""Tests of sksegcal.mlp.TorchMLPClassifier."""

from __future__ import annotations

import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.metrics import log_loss
from sklearn.utils.estimator_checks import parametrize_with_checks

import sksegcal.mlp as mlp_module
from sksegcal.mlp import TorchMLPClassifier, _forward_folded

REPO_ROOT = Path(mlp_module.__file__).resolve().parents[1]


def _checks_estimator() -> TorchMLPClassifier:
    # small and fast; enough steps (about 90) to pass check_classifiers_train's
    # accuracy bar of 0.83 on 300 blobs
    return TorchMLPClassifier(
        max_epochs=10, batch_size=32, learning_rate=1e-2, n_threads=1, random_state=0
    )


def _full_batch_estimator() -> TorchMLPClassifier:
    # no BatchNorm, one batch per epoch, no validation: integer sample weights are
    # then the same objective as repeated rows
    return TorchMLPClassifier(
        hidden_layer_sizes=(8,),
        batch_norm=False,
        batch_size=100_000,
        validation_fraction=None,
        max_epochs=10,
        learning_rate=1e-2,
        n_threads=1,
        random_state=0,
    )


_EXPECTED_FAILED_CHECKS = {
    "check_sample_weight_equivalence_on_dense_data": (
        "mini-batch training with BatchNorm: BN's batch statistics count rows, not weights, "
        "and repeated rows change the batches and the validation split, so weight k is not "
        "k repeats (even BN-free full-batch float32 training differs at ~1e-7 > the check's "
        "rtol; test_integer_weights_equal_repeats_without_batchnorm checks it at 1e-5)"
    ),
}


@parametrize_with_checks(
    [_checks_estimator()], expected_failed_checks=lambda est: _EXPECTED_FAILED_CHECKS
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------- data
def _blobs(n=3000, d=6, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] + noise * rng.normal(size=n) > 0.3).astype(np.int64)
    return X, y


def _fast(**kw) -> TorchMLPClassifier:
    params = dict(max_epochs=5, n_threads=1, random_state=0)
    params.update(kw)
    return TorchMLPClassifier(**params)


# --------------------------------------------------------------------------- reproducibility
def test_same_seed_identical_weights():
    X, y = _blobs()
    a = _fast(dropout=0.1).fit(X, y)
    b = _fast(dropout=0.1).fit(X, y)
    for k in a.state_dict_:
        assert_array_equal(a.state_dict_[k], b.state_dict_[k])
    assert a.train_loss_ == b.train_loss_
    assert a.validation_loss_ == b.validation_loss_
    c = _fast(dropout=0.1, random_state=1).fit(X, y)
    assert not np.array_equal(a.coefs_[-1], c.coefs_[-1])


def test_fit_leaves_global_torch_rng_and_threads_alone():
    X, y = _blobs(n=500)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    _fast(n_threads=1).fit(X, y)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)


def test_default_architecture_is_the_papers():
    X, y = _blobs(n=400, d=5)
    clf = _fast(max_epochs=1).fit(X, y)
    assert clf.hidden_layer_sizes_ == (5, 10, 5)
    assert [w.shape for w in clf.coefs_] == [(5, 5), (5, 10), (10, 5), (5, 2)]
    module = TorchMLPClassifier(max_epochs=1, random_state=0, n_threads=1)
    # identity initialisation of the first layer: before any step it is the identity
    from sksegcal.mlp import _build_module

    net = _build_module(5, (5, 10, 5), 2, batch_norm=True, dropout=0.0, identity_init=True)
    assert torch.equal(net[0].weight, torch.eye(5))
    assert [type(m).__name__ for m in net] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
        "Linear", "BatchNorm1d", "ReLU", "Linear",
    ]  # fmt: skip
    assert module.get_params()["hidden_layer_sizes"] == (1.0, 2.0, 1.0)


def test_hidden_layer_sizes_floats_and_ints():
    X, y = _blobs(n=400, d=6)
    clf = _fast(hidden_layer_sizes=(16, 0.5, 1.0), max_epochs=1).fit(X, y)
    assert clf.hidden_layer_sizes_ == (16, 3, 6)
    clf = _fast(hidden_layer_sizes=(), max_epochs=1).fit(X, y)
    assert [w.shape for w in clf.coefs_] == [(6, 2)]


# --------------------------------------------------------------------------- best epoch
def _overfitting_problem():
    # few training rows, pure-noise labels, a wide net and a large learning rate:
    # the validation loss is lowest early and then rises as the net memorises
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 10)).astype(np.float32)
    y = rng.integers(0, 2, size=200)
    X_val = rng.normal(size=(2000, 10)).astype(np.float32)
    y_val = rng.integers(0, 2, size=2000)
    clf = _fast(
        hidden_layer_sizes=(64, 64),
        learning_rate=1e-2,
        batch_size=50,
        max_epochs=30,
        n_iter_no_change=None,
    )
    return clf, X, y, X_val, y_val


def test_best_epoch_restored():
    clf, X, y, X_val, y_val = _overfitting_problem()
    clf.fit(X, y, eval_set=(X_val, y_val))
    val = np.asarray(clf.validation_loss_)
    assert clf.n_iter_ == 30 and len(val) == 30 and len(clf.train_loss_) == 30
    assert clf.best_epoch_ == int(np.argmin(val)) + 1
    assert clf.best_epoch_ < 15 and val[-1] > val.min() + 0.05  # it did overfit
    assert clf.train_loss_[-1] < clf.train_loss_[0] - 0.1
    # the kept weights are those of the best epoch: their loss is the recorded minimum
    assert log_loss(y_val, clf.predict_proba(X_val)) == pytest.approx(val.min(), abs=1e-5)


def test_early_stopping_patience():
    clf, X, y, X_val, y_val = _overfitting_problem()
    clf.set_params(n_iter_no_change=3, tol=0.0).fit(X, y, eval_set=(X_val, y_val))
    assert clf.n_iter_ < 30
    assert clf.n_iter_ == clf.best_epoch_ + 3
    assert log_loss(y_val, clf.predict_proba(X_val)) == pytest.approx(
        min(clf.validation_loss_), abs=1e-5
    )


def test_without_validation_last_epoch_is_kept():
    X, y = _blobs(n=500)
    clf = _fast(validation_fraction=None).fit(X, y)
    assert clf.validation_loss_ is None
    assert clf.best_epoch_ == clf.n_iter_ == 5


def test_validation_fraction_is_stratified_and_seeded():
    X, y = _blobs(n=1000)
    a = _fast(max_epochs=2).fit(X, y)
    b = _fast(max_epochs=2).fit(X, y)
    assert a.validation_loss_ == b.validation_loss_
    from sksegcal.mlp import _stratified_split

    y3 = np.repeat([0, 1, 2], [900, 90, 10])
    tr, va = _stratified_split(y3, 0.1, np.random.RandomState(0))
    assert np.bincount(y3[va]).tolist() == [90, 9, 1]
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y3)


def test_too_few_rows_for_validation_warns():
    X = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    with pytest.warns(UserWarning, match="no validation"):
        clf = _fast(validation_fraction=0.1, batch_size=4).fit(X, y)
    assert clf.validation_loss_ is None


# --------------------------------------------------------------------------- weights
def test_class_weight_paper_is_two_on_the_first_class():
    X, y = _blobs()
    paper = _fast(class_weight="paper").fit(X, y)
    explicit = _fast(class_weight={0: 2.0, 1: 1.0}).fit(X, y)
    assert_array_equal(paper.class_weight_, [2.0, 1.0])
    assert_array_equal(paper.predict_proba(X), explicit.predict_proba(X))
    plain = _fast().fit(X, y)
    # doubling class 0 shifts probability towards class 0 (the mispredicted pixels)
    assert paper.predict_proba(X)[:, 0].mean() > plain.predict_proba(X)[:, 0].mean() + 0.02
    assert (paper.predict(X) == 0).mean() > (plain.predict(X) == 0).mean()


def test_class_weight_balanced_and_dict():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 4)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=4000) > 1.6).astype(int)  # about 10% positives
    plain = _fast().fit(X, y)
    balanced = _fast(class_weight="balanced").fit(X, y)
    counts = np.bincount(y)
    assert_allclose(balanced.class_weight_, len(y) / (2 * counts))
    # balancing predicts the rare class far more often
    assert (balanced.predict(X) == 1).mean() > 2 * (plain.predict(X) == 1).mean()
    # the same thing through a dict: identical to 'balanced'
    as_dict = _fast(class_weight=dict(enumerate(len(y) / (2 * counts)))).fit(X, y)
    assert_allclose(as_dict.predict_proba(X), balanced.predict_proba(X), atol=1e-6)


def test_class_weight_errors():
    X, y = _blobs(n=300)
    with pytest.raises(ValueError, match="not in y's classes"):
        _fast(class_weight={5: 2.0}).fit(X, y)
    y3 = np.arange(300) % 3
    with pytest.raises(ValueError, match="paper"):
        _fast(class_weight="paper").fit(X, y3)


def test_zero_sample_weight_equals_dropping_rows():
    X, y = _blobs(n=1000)
    sw = np.ones(len(y))
    sw[::3] = 0
    weighted = _fast().fit(X, y, sample_weight=sw)
    dropped = _fast().fit(X[sw > 0], y[sw > 0])
    assert_array_equal(weighted.predict_proba(X), dropped.predict_proba(X))
    ones = _fast().fit(X, y, sample_weight=np.full(len(y), 3.0))
    assert_array_equal(ones.predict_proba(X), _fast().fit(X, y).predict_proba(X))


def test_integer_weights_equal_repeats_without_batchnorm():
    X, y = _blobs(n=300)
    sw = np.random.default_rng(0).integers(1, 4, size=len(y))
    a = _full_batch_estimator().fit(X, y, sample_weight=sw).predict_proba(X)
    b = _full_batch_estimator().fit(np.repeat(X, sw, 0), np.repeat(y, sw)).predict_proba(X)
    assert_allclose(a, b, atol=1e-5)


def test_eval_set_with_weights_matches_recorded_loss():
    X, y = _blobs(n=2000)
    Xv, yv = _blobs(n=500, seed=1)
    wv = np.random.default_rng(2).uniform(0.5, 2, size=len(yv))
    clf = _fast().fit(X, y, eval_set=(Xv, yv, wv))
    best = clf.validation_loss_[clf.best_epoch_ - 1]
    assert log_loss(yv, clf.predict_proba(Xv), sample_weight=wv) == pytest.approx(best, abs=1e-5)
    with pytest.raises(ValueError, match="not among the training classes"):
        _fast().fit(X, y, eval_set=(Xv, np.full(len(yv), 7)))
    with pytest.raises(ValueError, match="features"):
        _fast().fit(X, y, eval_set=(Xv[:, :3], yv))


# --------------------------------------------------------------------------- inference
@pytest.mark.parametrize(
    "params",
    [{}, {"dropout": 0.3}, {"batch_norm": False}, {"hidden_layer_sizes": (7, 2.5)}],
)
def test_batchnorm_folding_matches_module(params):
    X, y = _blobs(n=2000, d=7)
    X = 3 * X + 1  # BN's running statistics far from (0, 1)
    clf = _fast(**params).fit(X, y)
    module = clf.get_module()
    assert not module.training
    with torch.no_grad():
        expected = module(torch.from_numpy(X)).numpy()
    params_t = [
        (torch.from_numpy(w), torch.from_numpy(b)) for w, b in zip(clf.coefs_, clf.intercepts_)
    ]
    with torch.no_grad():
        folded = _forward_folded(torch.from_numpy(X), params_t).numpy()
    assert_allclose(folded, expected, atol=1e-5, rtol=1e-5)
    assert_allclose(
        clf.predict_log_proba(X),
        torch.log_softmax(torch.from_numpy(expected).double(), 1).numpy(),
        atol=1e-5,
    )


def test_predict_is_independent_of_chunk_size():
    X, y = _blobs(n=3001)
    clf = _fast().fit(X, y)
    ref = clf.predict_proba(X)
    assert_allclose(ref.sum(1), 1.0, rtol=0, atol=1e-12)
    for chunk in (1, 7, 1000, 5000):
        clf.set_params(chunk_size=chunk)
        assert_allclose(clf.predict_proba(X), ref, rtol=0, atol=1e-6)
        assert_array_equal(clf.predict(X), ref.argmax(1))
    assert_allclose(np.exp(clf.predict_log_proba(X)), ref, atol=1e-6)


def test_multiclass_string_labels():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1500, 3)).astype(np.float32)
    names = np.array(["road", "sky", "tree"])
    y = names[np.argmax(X, axis=1)]
    clf = _fast(max_epochs=20, batch_size=64, learning_rate=1e-2).fit(X, y)
    assert_array_equal(clf.classes_, names)
    assert clf.predict_proba(X).shape == (1500, 3)
    assert clf.score(X, y) > 0.9


def test_float64_input_and_float32_input_agree():
    X, y = _blobs(n=1000)
    a = _fast().fit(X, y)
    b = _fast().fit(X.astype(np.float64), y)
    assert_array_equal(a.predict_proba(X), b.predict_proba(X.astype(np.float64)))


def test_verbose_reports_progress(capsys):
    X, y = _blobs(n=300)
    _fast(verbose=1, max_epochs=2).fit(X, y)
    err = capsys.readouterr().err
    assert "val_loss" in err and "2/2" in err


# --------------------------------------------------------------------------- portability
def _pickle_strings(data: bytes) -> list[str]:
    return [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]


def test_pickle_holds_no_torch_objects():
    X, y = _blobs(n=500)
    clf = _fast().fit(X, y)
    data = pickle.dumps(clf)
    assert not [s for s in _pickle_strings(data) if s.startswith("torch")]
    # even a tensor attached by hand is stored as numpy
    clf.extra_ = {"t": torch.ones(2)}
    data = pickle.dumps(clf)
    assert not [s for s in _pickle_strings(data) if s.startswith("torch")]
    back = pickle.loads(data)
    assert isinstance(back.extra_["t"], np.ndarray)
    assert_array_equal(back.predict_proba(X), clf.predict_proba(X))


def test_joblib_round_trip_in_a_fresh_cpu_only_process(tmp_path):
    X, y = _blobs(n=2000)
    clf = _fast().fit(X, y)
    # as if it had been trained with an explicit GPU device: the CPU-only process
    # must still load and predict (with a warning that it falls back to the CPU)
    clf.set_params(device="cuda:0")
    path = tmp_path / "mlp.joblib"
    joblib.dump(clf, path)
    np.save(tmp_path / "X.npy", X)
    script = textwrap.dedent(
        f"""
        import sys, warnings
        import joblib, numpy as np
        clf = joblib.load({str(path)!r})
        X = np.load({str(tmp_path / "X.npy")!r})
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            proba = clf.predict_proba(X)
        np.save({str(tmp_path / "proba.npy")!r}, proba)
        import torch
        assert not torch.cuda.is_available()
        print("warned:", any("not available" in str(w.message) for w in rec))
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "warned: True" in res.stdout
    with pytest.warns(RuntimeWarning, match="not available"):
        local = clf.predict_proba(X)
    assert_array_equal(np.load(tmp_path / "proba.npy"), local)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    X, y = _blobs(n=300)
    X_nan = X.copy()
    X_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _fast().fit(X_nan, y)
    clf = _fast(max_epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="NaN"):
        clf.predict_proba(X_nan)
    with pytest.raises(ValueError, match="features"):
        clf.predict_proba(X[:, :4])
    with pytest.raises(ValueError, match="one class"):
        _fast().fit(X, np.ones(len(y)))
    with pytest.raises(ValueError, match="0 sample"):
        _fast().fit(X[:0], y[:0])
    with pytest.raises(ValueError, match="not a torch device"):
        _fast(device="gpu please").fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            _fast(device="cuda").fit(X, y)
    with pytest.raises(ValueError, match="positive"):
        _fast(hidden_layer_sizes=(4, 0)).fit(X, y)
    with pytest.raises(TypeError, match="hidden_layer_sizes"):
        _fast(hidden_layer_sizes=("wide",)).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 rows per mini-batch"):
        _fast(batch_size=1).fit(X, y)
    with pytest.raises(ValueError, match="learning_rate"):
        _fast(learning_rate=0).fit(X, y)
    with pytest.raises(ValueError, match="only one class"):
        _fast().fit(X, y, sample_weight=(y == 1).astype(float))


def test_boolean_correctness_labels():
    # the calibrator's use: y = "the segmentation model was right", as bool
    X, y = _blobs(n=1000)
    clf = _fast(class_weight="paper").fit(X, y.astype(bool))
    assert_array_equal(clf.classes_, [False, True])
    assert_array_equal(clf.class_weight_, [2.0, 1.0])  # 2x on the mispredicted pixels
    p_correct = clf.predict_proba(X)[:, 1]
    assert_array_equal(clf.predict(X), p_correct > 0.5)


def test_joblib_memory_mapped_load_predicts_without_warnings(tmp_path):
    X, y = _blobs(n=500)
    clf = _fast(max_epochs=2).fit(X, y)
    joblib.dump(clf, tmp_path / "m.joblib")
    loaded = joblib.load(tmp_path / "m.joblib", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
