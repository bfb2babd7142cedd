"""Calibrators as torch modules: equal to predict_proba, scriptable, exportable, buffers only.

Every fitted calibrator's module is checked against the estimator's own NumPy
``predict_proba`` on the same maps (float32: 1e-5, the same argmax), the spatial
context against ``sksegcal.context`` and the detectors against scikit-learn's
``predict_proba``. Maps are not square and C differs from every spatial size,
so that a transposed axis cannot pass.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from sksegcal import (
    LocalTemperatureScaling,
    SelectiveScalingCalibrator,
    TemperatureScaling,
    TorchMLPClassifier,
)
from sksegcal.context import spatial_context as numpy_spatial_context
from sksegcal.deployment import (
    CalibratedSegmenter,
    CalibratorModule,
    agnostic_features,
    detector_module,
    script_module,
    spatial_context,
    to_torch,
)
from sksegcal.features import features_from_logits
from sksegcal.pixels import flatten_segmentation
from sksegcal.scaling import (
    DirichletScaling,
    EnsembleTemperatureScaling,
    MetaCalScaling,
    VectorScaling,
)

N, C, H, W = 3, 5, 14, 17


def _maps(seed=0, n=N, c=C, spatial=(H, W)):
    """Over-confident logit maps with smooth regions (so the context carries signal)."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(spatial))
    base = np.repeat(np.arange(c), size // c + 1)[:size].reshape(spatial)
    labels = np.stack([np.roll(base, 2 * i, axis=-1) for i in range(n)])
    noise = uniform_filter(rng.normal(size=(n, c, *spatial)), size=(1, 1) + (3,) * len(spatial))
    logits = 3.0 * np.moveaxis(np.eye(c)[labels], -1, 1) + 7.5 * noise
    return logits.astype(np.float32), labels


def _as_maps(table, n, spatial):
    c = table.shape[1]
    return np.moveaxis(table.reshape(n, *spatial, c), -1, 1)


CALIBRATORS = {
    "ts": lambda: TemperatureScaling(),
    "vector": lambda: VectorScaling(),
    "dirichlet": lambda: DirichletScaling(max_iter=30),
    "ets": lambda: EnsembleTemperatureScaling(),
    "metacal": lambda: MetaCalScaling(rejection_rate=0.1),
    "metacal_auto": lambda: MetaCalScaling(t_reject="auto"),
    "selective_soft": lambda: SelectiveScalingCalibrator(random_state=0, guard=None),
    "selective_hard": lambda: SelectiveScalingCalibrator(mode="hard", random_state=0, guard=None),
    "selective_generalised": lambda: SelectiveScalingCalibrator(
        mode="generalised", random_state=0, guard=None
    ),
    "selective_paper_mlp": lambda: SelectiveScalingCalibrator(
        TorchMLPClassifier(max_epochs=2, batch_size=256, validation_fraction=None, random_state=0),
        features="log_softmax",
        t1=1.0,
        t2=1e10,
        threshold=0.5,
        mode="hard",
        random_state=0,
    ),
    "selective_guarded": lambda: SelectiveScalingCalibrator(random_state=0),
    "selective_context": lambda: SelectiveScalingCalibrator(
        context="spatial", random_state=0, guard=None
    ),
    "selective_generalised_context": lambda: SelectiveScalingCalibrator(
        context="spatial", mode="generalised", random_state=0, guard=None
    ),
    "lts": lambda: LocalTemperatureScaling(),
    "lts_no_context": lambda: LocalTemperatureScaling(context=None),
}


def _reads_spatial(cal) -> bool:
    return cal.reads_context == "spatial"


@pytest.fixture(scope="module")
def fitted():
    """Every calibrator fitted once, and new maps (with their pixel tables) to compare on.

    The comparison maps are not the fit data: a fitted threshold sits exactly on
    some fit pixel's value, where float rounding decides either way.
    """
    logits, labels = _maps()
    X, y, groups = flatten_segmentation(logits, labels)
    Xc, _, _ = flatten_segmentation(logits, labels, context="spatial")
    test_logits, test_labels = _maps(seed=11)
    tables = {
        False: flatten_segmentation(test_logits, test_labels)[0],
        True: flatten_segmentation(test_logits, test_labels, context="spatial")[0],
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in CALIBRATORS.items():
            cal = make()
            spatial = _reads_spatial(cal)
            if isinstance(cal, SelectiveScalingCalibrator):
                cal.fit(Xc if spatial else X, y, groups=groups)
            else:
                cal.fit(Xc if spatial else X, y)
            out[name] = (cal, tables[spatial])
    return test_logits, out


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_module_equals_predict_proba(fitted, name):
    logits, calibrators = fitted
    cal, table = calibrators[name]
    module = cal.to_torch()
    assert isinstance(module, CalibratorModule) and not module.training
    with torch.no_grad():
        proba = module(torch.from_numpy(logits)).numpy()
        log_proba = module.log_proba(torch.from_numpy(logits)).numpy()
    expected = _as_maps(cal.predict_proba(table), N, (H, W))
    assert proba.dtype == np.float32 and proba.shape == logits.shape
    np.testing.assert_allclose(proba, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(proba.argmax(1), expected.argmax(1))
    np.testing.assert_array_equal(proba.argmax(1), cal.predict(table).reshape(N, H, W))
    expected_log = _as_maps(cal.predict_log_proba(table), N, (H, W))
    np.testing.assert_allclose(np.exp(log_proba), np.exp(expected_log), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(log_proba.argmax(1), expected.argmax(1))


def test_uniform_rows_keep_the_predicted_class(fitted):
    """t_reject = 1e10 makes rows uniform: the predicted class is raised as in predict_proba."""
    logits, calibrators = fitted
    cal, table = calibrators["metacal"]
    with torch.no_grad():
        proba = cal.to_torch()(torch.from_numpy(logits)).numpy()
    flat = np.ptp(proba, axis=1) < 1e-6
    assert flat.any(), "the plant needs pixels made uniform"
    np.testing.assert_array_equal(proba.argmax(1), logits.argmax(1))


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_scripted_module_gives_the_same_numbers(fitted, name):
    logits, calibrators = fitted
    module = calibrators[name][0].to_torch()
    scripted = script_module(module)
    x = torch.from_numpy(logits[:2, :, :9, :11].copy())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), module(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(scripted.log_proba(x), module.log_proba(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_buffers_not_parameters_and_state_dict_round_trips(fitted, name):
    logits, calibrators = fitted
    module = calibrators[name][0].to_torch()
    assert list(module.parameters()) == []
    assert len(module.state_dict()) > 0
    blank = copy.deepcopy(module)
    for buffer in blank.buffers():
        buffer.fill_(0.5)  # other numbers, so that loading must restore them
    saved = io.BytesIO()
    torch.save(module.state_dict(), saved)
    saved.seek(0)
    blank.load_state_dict(torch.load(saved, weights_only=True))
    x = torch.from_numpy(logits)
    with torch.no_grad():
        torch.testing.assert_close(blank(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["selective_paper_mlp", "lts_no_context", "dirichlet"])
def test_float64_logits_stay_float64(fitted, name):
    logits, calibrators = fitted
    cal, table = calibrators[name]
    with torch.no_grad():
        proba = cal.to_torch()(torch.from_numpy(logits.astype(np.float64))).numpy()
    assert proba.dtype == np.float64
    expected = _as_maps(cal.predict_proba(table.astype(np.float64)), N, (H, W))
    np.testing.assert_allclose(proba, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["ts", "dirichlet", "selective_generalised", "lts_no_context"])
def test_volumes_and_other_spatial_ranks(fitted, name):
    """Calibrators without spatial context work on (N, C, D, H, W) and (N, C, L) alike."""
    _, calibrators = fitted
    cal, _ = calibrators[name]
    module = cal.to_torch()
    for spatial in [(3, 4, 6), (11,)]:
        volume, _ = _maps(seed=3, n=2, spatial=spatial)
        table = np.moveaxis(volume, 1, -1).reshape(-1, C)
        with torch.no_grad():
            proba = module(torch.from_numpy(volume)).numpy()
        expected = _as_maps(cal.predict_proba(table), 2, spatial)
        np.testing.assert_allclose(proba, expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(proba.argmax(1), expected.argmax(1))


# ---------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed,classes,size", [(0, 5, (14, 17)), (1, 3, (1, 9)), (2, 2, (20, 7))])
def test_spatial_context_equals_numpy(seed, classes, size):
    logits, _ = _maps(seed=seed, n=2, c=classes, spatial=size)
    expected = numpy_spatial_context(logits)
    got = spatial_context(torch.from_numpy(logits)).numpy()
    assert got.shape == expected.shape
    # shares and distances are exact; window means of entropies to float32 rounding
    np.testing.assert_array_equal(got[:, :3], expected[:, :3])
    np.testing.assert_allclose(got[:, 3:], expected[:, 3:], rtol=0, atol=2e-6)


def test_spatial_context_of_one_predicted_class_and_far_boundaries():
    logits = np.zeros((2, 3, 40, 41), np.float32)
    logits[0, 1] = 1.0  # one class everywhere: the clipped distance everywhere
    logits[1, 2, :, 35:] = 5.0  # a boundary far from most pixels (beyond the clip of 16)
    expected = numpy_spatial_context(logits)
    got = spatial_context(torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(got[:, :3], expected[:, :3])
    assert got[0, 2].min() == 16.0 and got[1, 2].max() == 16.0 and got[1, 2].min() == 0.0


def test_agnostic_features_equal_numpy():
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(500, 7)) * 6).astype(np.float32)
    z[0] = [3e4, 0, 0, 0, 0, 0, 0]  # probabilities that underflow: the floor at -1e4
    expected = features_from_logits(z, "agnostic")
    got = agnostic_features(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(np.maximum(got, -1e4), np.maximum(expected, -1e4), atol=2e-5)


def test_default_detector_module_equals_its_predict_proba(fitted):
    logits, calibrators = fitted
    for name in ["selective_soft", "selective_paper_mlp", "selective_context"]:
        cal, table = calibrators[name]
        features = cal._features(table)
        expected = cal.classifier_.predict_proba(features)[:, 1]
        with torch.no_grad():
            maps = torch.from_numpy(_as_maps(features.astype(np.float32), N, (H, W)))
            got = detector_module(cal.classifier_)(maps).numpy().reshape(-1)
        np.testing.assert_allclose(np.sort(got), np.sort(expected), atol=1e-5)
        np.testing.assert_allclose(
            got, np.moveaxis(expected.reshape(N, H, W), 0, 0).reshape(-1), atol=1e-5
        )


def test_an_unsupported_detector_is_a_clear_error():
    from sklearn.tree import DecisionTreeClassifier

    logits, labels = _maps()
    X, y, _ = flatten_segmentation(logits, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = SelectiveScalingCalibrator(DecisionTreeClassifier(max_depth=2), random_state=0)
        cal.fit(X, y)
    with pytest.raises(TypeError, match="DecisionTreeClassifier.*LogisticRegression.*TorchMLP"):
        cal.to_torch()


def test_custom_context_and_unfitted_are_errors():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        to_torch(TemperatureScaling())
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    y = X[:, :3].argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # n_context is deprecated
        lts = LocalTemperatureScaling(n_context=1).fit(X, y)
    with pytest.raises(ValueError, match="context columns of your own"):
        lts.to_torch()
    with pytest.raises(TypeError, match="cannot convert"):
        to_torch(rng)


def test_pipeline_and_search_objects_convert(fitted):
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    logits, _ = fitted
    logits_, labels = _maps()
    X, y, _ = flatten_segmentation(logits_, labels)
    ts = TemperatureScaling().fit(X, y)
    pipe = make_pipeline(TemperatureScaling()).fit(X, y)
    search = GridSearchCV(TemperatureScaling(), {"temperature_bounds": [(0.01, 100.0)]}, cv=2)
    search.fit(X, y)
    x = torch.from_numpy(logits)
    with torch.no_grad():
        for wrapped in (pipe, search):
            torch.testing.assert_close(to_torch(wrapped)(x), to_torch(ts)(x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# the calibrated segmenter
# ---------------------------------------------------------------------------
class _Net(torch.nn.Module):
    """A tiny segmenter at half resolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, C, kernel_size=3, stride=2, padding=1)

    def forward(self, images):
        return 4.0 * self.conv(images)


class _Wrapped(torch.nn.Module):
    """The same network returning what torchvision (a dict) or transformers (.logits) return."""

    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = _Net(), kind

    def forward(self, images):
        logits = self.net(images)
        if self.kind == "dict":
            return {"out": logits}
        return type("Output", (), {"logits": logits})()


@pytest.mark.parametrize("kind", ["tensor", "dict", "output"])
def test_calibrated_segmenter_resizes_then_calibrates(fitted, kind):
    import torch.nn.functional as F

    _, calibrators = fitted
    cal, _ = calibrators["selective_context"]
    net = (_Net() if kind == "tensor" else _Wrapped(kind)).eval()
    model = CalibratedSegmenter(net, cal).eval()
    images = torch.randn(2, 3, 13, 18)
    with torch.no_grad():
        got = model(images).numpy()
        logits = F.interpolate(
            _Net()(images), size=(13, 18), mode="bilinear", align_corners=False
        ).numpy()
    table, _, _ = flatten_segmentation(logits, np.zeros((2, 13, 18), int), context="spatial")
    expected = _as_maps(cal.predict_proba(table), 2, (13, 18))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert got.shape == (2, C, 13, 18)


def test_calibrated_segmenter_traces_and_scripts(fitted):
    _, calibrators = fitted
    model = CalibratedSegmenter(_Net(), to_torch(calibrators["lts"][0])).eval()
    images = torch.randn(1, 3, 10, 12)
    scripted = script_module(model)
    traced = script_module(CalibratedSegmenter(_Wrapped("output"), model.calibrator), images)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(traced(images), model(images), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# ONNX, run by onnxruntime
# ---------------------------------------------------------------------------
def _check_onnx(module, example, inputs, tmp_path, dynamo):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from sksegcal.deployment import export_onnx, onnx_predict

    path = export_onnx(module, torch.from_numpy(example), tmp_path / "m.onnx", dynamo=dynamo)
    got = onnx_predict(path, inputs)
    with torch.no_grad():
        expected = module(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


class _Every(torch.nn.Module):
    """Every calibrator's output in one graph (one export instead of fifteen)."""

    def __init__(self, modules):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], dim=1)


# Calibrators whose module another one in CALIBRATORS already exports through the same
# forward code (the same module class and branches, other fitted values): the dynamo
# exporter's cost grows with the graph, so its export leaves them out.
_SAME_GRAPH_AS_ANOTHER = {
    "metacal_auto": "metacal",
    "selective_guarded": "selective_soft (or ts where the guard falls back)",
    "selective_generalised_context": "selective_generalised + selective_context",
}


@pytest.mark.parametrize(
    "dynamo", [False, pytest.param(True, marks=pytest.mark.slow, id="dynamo")]
)
def test_onnx_graph_equals_the_module_on_other_sizes(fitted, tmp_path, dynamo):
    """Exported on one map size, run by onnxruntime on another; every calibrator at once.

    torch's dynamo exporter takes ~20 s for the whole graph on 2 shared cores: it exports
    one calibrator per forward path (every module class, every selective branch).
    """
    logits, calibrators = fitted
    names = sorted(set(CALIBRATORS) - set(_SAME_GRAPH_AS_ANOTHER) if dynamo else CALIBRATORS)
    every = _Every([calibrators[name][0].to_torch() for name in names]).eval()
    other, _ = _maps(seed=5, n=2, spatial=(9, 12))
    _check_onnx(every, logits[:1], other, tmp_path, dynamo)


@pytest.mark.slow
def test_onnx_graph_of_a_calibrated_segmenter(fitted, tmp_path):
    _, calibrators = fitted
    model = CalibratedSegmenter(_Net(), calibrators["selective_soft"][0]).eval()
    images = np.random.default_rng(0).normal(size=(2, 3, 10, 14)).astype(np.float32)
    _check_onnx(model, images[:1], images, tmp_path, dynamo=True)
