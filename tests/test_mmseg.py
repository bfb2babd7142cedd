"""Tests of sksegcal.integrations.mmseg with real mmsegmentation on CPU.

A SegFormer mit-b0 built from the config shipped in the mmseg wheel (4
classes, random weights saved as a local checkpoint), a six-image dataset
written to a temporary folder (two image sizes, labels with
reduce_zero_label that hold both 0 and the ignore label 255), small inputs.
Nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

pytest.importorskip("mmseg")
pytest.importorskip("mmengine")

pytestmark = [
    pytest.mark.integration,
    # third-party noise on every run with mmcv-lite and torch 2.13 (not about our code)
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit"),
    pytest.mark.filterwarnings("ignore:Fail to import ``MultiScaleDeformableAttention``"),
    pytest.mark.filterwarnings("ignore:``build_loss`` would be deprecated"),
    pytest.mark.filterwarnings("ignore:Default ``avg_non_ignore`` is False"),
    pytest.mark.filterwarnings("ignore:The draw is False"),
]

N_CLASSES = 4
CLASSES = ("sky", "road", "tree", "car")
PALETTE = [[0, 0, 255], [128, 128, 128], [0, 255, 0], [255, 0, 0]]
CONFIG = "segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py"
# (height, width) of the dataset's images; the pipeline resizes all to 64x64
SIZES = [(40, 56), (40, 56), (48, 40), (40, 56), (48, 40), (40, 56)]
IMAGE_NAMES = [f"img{i}" for i in range(len(SIZES))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Torch's thread pool on a shared 2-core machine makes these tiny forward
    # passes ~40x slower (0.06 s -> 2.7 s each); one thread is plenty.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mm():
    from sksegcal.integrations import mmseg as mm

    return mm


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mm):
    """Dataset folder, config file, checkpoint and the model they describe."""
    import mmcv
    import torch
    from mmengine.config import Config

    root = tmp_path_factory.mktemp("mmseg")
    rng = np.random.default_rng(0)
    raw_labels = {}
    for name, (h, w) in zip(IMAGE_NAMES, SIZES):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        # file labels 0..4: 0 is "unlabelled", reduce_zero_label makes it 255; and some
        # pixels already 255 (ignored), which mmseg keeps at 255
        label = rng.integers(0, N_CLASSES + 1, size=(h, w), dtype=np.uint8)
        label[rng.random((h, w)) < 0.05] = 255
        mmcv.imwrite(image, str(root / "img" / f"{name}.png"))
        mmcv.imwrite(label, str(root / "ann" / f"{name}.png"))
        raw_labels[name] = label

    config_file = root / "tiny_segformer.py"
    config_file.write_text(
        textwrap.dedent(
            f"""
            _base_ = [{str(mm.shipped_config(CONFIG))!r}]
            custom_imports = dict(
                imports=["sksegcal.integrations.mmseg"], allow_failed_imports=False)
            model = dict(
                backbone=dict(init_cfg=None), decode_head=dict(num_classes={N_CLASSES}))
            test_pipeline = [
                dict(type="LoadImageFromFile"),
                dict(type="Resize", scale=(64, 64), keep_ratio=False),
                dict(type="LoadAnnotations"),
                dict(type="PackSegInputs"),
            ]
            test_dataloader = dict(
                batch_size=2,
                num_workers=0,
                persistent_workers=False,
                dataset=dict(
                    _delete_=True,
                    type="BaseSegDataset",
                    data_root={str(root)!r},
                    data_prefix=dict(img_path="img", seg_map_path="ann"),
                    img_suffix=".png",
                    seg_map_suffix=".png",
                    reduce_zero_label=True,
                    metainfo=dict(classes={CLASSES!r}, palette={PALETTE!r}),
                    pipeline=test_pipeline,
                ),
            )
            test_evaluator = [
                dict(type="IoUMetric", iou_metrics=["mIoU"]),
                dict(type="CalibrationMetric", n_bins=15),
            ]
            log_level = "WARNING"
            """
        )
    )
    cfg = Config.fromfile(str(config_file))
    torch.manual_seed(0)
    model = mm.load_model(cfg)
    checkpoint = root / "tiny_segformer.pth"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "meta": {"dataset_meta": {"classes": CLASSES, "palette": PALETTE}},
        },
        checkpoint,
    )
    return {
        "root": root,
        "config_file": config_file,
        "cfg": cfg,
        "checkpoint": checkpoint,
        "model": model,
        "raw_labels": raw_labels,
    }


@pytest.fixture(scope="module")
def store(workspace, mm, tmp_path_factory):
    """The config's test set extracted from config + checkpoint, at full resolution."""
    path = tmp_path_factory.mktemp("stores") / "full"
    return mm.extract_logits(
        workspace["cfg"],
        None,
        path,
        checkpoint=workspace["checkpoint"],
        batch_size=4,
        progress=False,
    )


@pytest.fixture(scope="module")
def calibrator(store, workspace):
    """A TemperatureScaling fitted on the store, saved as skops (the safe format) and joblib."""
    from sklearn.exceptions import ConvergenceWarning

    from sksegcal import TemperatureScaling
    from sksegcal.persistence import save
    from sksegcal.store import fit_store

    with warnings.catch_warnings():
        # random weights: uninformative logits, the temperature stops at its upper bound
        warnings.simplefilter("ignore", ConvergenceWarning)
        ts = fit_store(TemperatureScaling(), store, images=None, random_state=0)
    path = save(ts, workspace["root"] / "ts.skops", format="skops")
    save(ts, workspace["root"] / "ts.joblib")
    return ts, path


def _mmseg_labels(path, reduce_zero_label=True):
    """A label file as mmseg's own LoadAnnotations reads it (the reference)."""
    from mmseg.datasets.transforms import LoadAnnotations

    results = {"seg_map_path": str(path), "reduce_zero_label": reduce_zero_label,
               "seg_fields": []}
    return LoadAnnotations()(results)["gt_seg_map"]


def _label_file(workspace, name):
    return workspace["root"] / "ann" / f"{name}.png"


def _inference(model, image_path):
    from mmseg.apis import inference_model

    return inference_model(model, str(image_path))


# ------------------------------------------------------------------------------ the shim
def test_mmcv_ops_shim(mm):
    import importlib.util
    import sys

    import torch

    from sksegcal.integrations import _mmcv_shim

    if importlib.util.find_spec("mmcv._ext") is not None:
        pytest.skip("full mmcv with compiled ops: the shim is not used")
    assert _mmcv_shim.is_installed()
    ops = sys.modules["mmcv.ops"]
    from mmcv.ops import point_sample

    # pixel centres give the pixels; a point halfway between two pixels their mean
    feats = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    ij = [(0, 0), (3, 4), (1, 2)]
    points = torch.tensor([[((j + 0.5) / 5, (i + 0.5) / 4) for i, j in ij]] * 2)
    out = point_sample(feats, points)
    assert out.shape == (2, 3, 3)
    for k, (i, j) in enumerate(ij):
        torch.testing.assert_close(out[:, :, k], feats[:, :, i, j])
    mid = point_sample(feats, torch.tensor([[[2.0 / 5, 1.5 / 4]]] * 2))
    torch.testing.assert_close(mid[:, :, 0], (feats[:, :, 1, 1] + feats[:, :, 1, 2]) / 2)
    # (N, Hgrid, Wgrid, 2) points keep their grid shape
    assert point_sample(feats, points[:, None]).shape == (2, 3, 1, 3)

    with pytest.raises(_mmcv_shim.MissingMMCVOpError, match="compiled operators"):
        ops.sigmoid_focal_loss(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(_mmcv_shim.MissingMMCVOpError, match="CrissCrossAttention"):
        ops.CrissCrossAttention(8)
    with pytest.raises(AttributeError):
        ops.not_an_op  # noqa: B018


def test_pointrend_runs_on_the_shims_point_sample(mm):
    """PointRend's head refines its output with point_sample: the shim's, with mmcv-lite."""
    from mmseg.apis import inference_model

    model = mm.load_model(
        "pointrend_r50_4xb2-80k_cityscapes-512x1024",
        cfg_options={
            "model.decode_head.1.num_classes": N_CLASSES,
            "model.decode_head.0.num_classes": N_CLASSES,
            "test_pipeline": [dict(type="LoadImageFromNDArray"), dict(type="PackSegInputs")],
        },
    )
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    result = inference_model(model, image)
    assert result.seg_logits.data.shape == (N_CLASSES, 64, 64)

    from mmseg.models.decode_heads import point_head

    from sksegcal.integrations import _mmcv_shim

    if _mmcv_shim.is_installed():
        assert point_head.point_sample is _mmcv_shim.point_sample


def test_import_sksegcal_does_not_import_mmseg():
    import subprocess
    import sys

    code = "import sys, sksegcal, sksegcal.integrations; print('mmseg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_mmseg_gives_an_install_hint():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['mmseg'] = None\n"
        "try:\n"
        "    import sksegcal.integrations.mmseg\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "sksegcal[mmseg]"' in out.stdout


def test_shipped_config_and_load_model(mm, workspace):
    path = mm.shipped_config("segformer_mit-b0_8xb2-160k_ade20k-512x512")
    assert path == mm.shipped_config(CONFIG)
    with pytest.raises(FileNotFoundError, match="No config"):
        mm.shipped_config("no_such_config")
    model = workspace["model"]
    assert not model.training
    # SyncBN in the shipped config became BN
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SyncBatchNorm" not in kinds and "BatchNorm2d" in kinds
    from sksegcal.integrations.mmseg._loading import n_classes

    assert n_classes(model) == N_CLASSES


def test_public_names_and_one_registration(mm):
    """The package re-exports the public names; METRICS gets the metric once."""
    public = ["CalibrationMetric", "calibrate_model", "extract_logits", "load_model",
              "shipped_config", "uncalibrate_model"]
    assert set(public) <= set(mm.__all__)
    for name in public:
        obj = getattr(mm, name)
        # defined in a private module of the package, which __module__ names (pickles too)
        assert obj.__module__.startswith("sksegcal.integrations.mmseg._"), name
        assert pickle.loads(pickle.dumps(obj)) is obj, name
        # pickles that name the package itself load too
        assert pickle.loads(f"csksegcal.integrations.mmseg\n{name}\n.".encode()) is obj, name

    # count every registration of the class (decorator or call) in a fresh interpreter
    code = textwrap.dedent(
        """
        from mmengine.registry import Registry
        calls = []
        original = Registry._register_module
        def spy(self, module, module_name=None, force=False):
            if module.__name__ == "CalibrationMetric":
                calls.append(self.name)
            return original(self, module, module_name, force)
        Registry._register_module = spy
        import sksegcal.integrations.mmseg as mm
        import sksegcal.integrations.mmseg._evaluator
        import sksegcal.integrations.mmseg
        from mmseg.registry import METRICS
        print(calls, METRICS.get("CalibrationMetric") is mm.CalibrationMetric)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "['metric'] True"


def test_reduce_zero_label_matches_mmseg(tmp_path):
    """Every uint8 label value, through ours and through mmseg's own LoadAnnotations."""
    import mmcv

    from sksegcal.integrations.mmseg._extraction import _read_label, _reduce_zero_label

    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "all_values.png"
    mmcv.imwrite(values, str(path))
    ours = _reduce_zero_label(_read_label(path))
    np.testing.assert_array_equal(ours, _mmseg_labels(path))
    # 0 (unlabelled) and 255 (ignored) both end at 255; k moves to k - 1
    assert ours[0, 0] == 255 and ours[15, 15] == 255 and ours[0, 1] == 0
    assert ours[15, 14] == 253
    np.testing.assert_array_equal(_read_label(path), _mmseg_labels(path, reduce_zero_label=False))


# ------------------------------------------------------------------------------ extraction
def test_extract_from_config_and_checkpoint(mm, workspace, store):
    assert store.n_images == len(SIZES)
    assert store.image_names == sorted(IMAGE_NAMES)
    assert store.n_classes == N_CLASSES
    assert store.class_names == list(CLASSES)
    assert store.ignore_index == 255
    source = store.source
    assert source["reduce_zero_label"] is True and source["size"] is None
    assert source["checkpoint"].endswith("tiny_segformer.pth")

    model = workspace["model"]
    for name, (h, w) in zip(IMAGE_NAMES, SIZES):
        image = store.load_image(store.image_id(name))
        assert image.logits.shape == (N_CLASSES, h, w)  # full (original) resolution
        # labels: as mmseg's LoadAnnotations gives them (0 -> 255, 255 -> 255, k -> k - 1)
        np.testing.assert_array_equal(image.labels, _mmseg_labels(_label_file(workspace, name)))
        # logits: what the checkpoint's model gives through mmseg's own inference API
        result = _inference(model, workspace["root"] / "img" / f"{name}.png")
        expected = result.seg_logits.data.numpy()
        np.testing.assert_allclose(image.logits, expected, rtol=2e-3, atol=2e-3)
    store.verify()


def test_extract_resume_paths_and_size(mm, workspace, tmp_path):
    root = workspace["root"]
    pairs = [(root / "img" / f"{n}.png", root / "ann" / f"{n}.png") for n in IMAGE_NAMES]
    model = copy.deepcopy(workspace["model"])
    seen = []
    original = model.test_step

    def counting_test_step(data):
        seen.append(len(data["inputs"]))
        return original(data)

    model.test_step = counting_test_step
    path = tmp_path / "resized"
    # reduce_zero_label=None takes the config's test dataset setting (True)
    part = mm.extract_logits(model, pairs[:2], path, size=(16, 24), batch_size=3, progress=False)
    assert part.image_names == IMAGE_NAMES[:2] and sum(seen) == 2
    seen.clear()
    full = mm.extract_logits(model, pairs, path, size=(16, 24), batch_size=3, progress=False)
    assert sum(seen) == len(SIZES) - 2  # the first two were not computed again
    # a batch of 3 holds two image sizes -> at least one batch went in two passes
    assert len(seen) >= 2
    assert full.image_names == IMAGE_NAMES
    for name in IMAGE_NAMES:
        image = full.load_image(full.image_id(name))
        assert image.logits.shape == (N_CLASSES, 16, 24)
        assert set(np.unique(image.labels)) <= {0, 1, 2, 3, 255}
    # at full size, file pairs give mmseg's own labels (255 stays ignored)
    pairs_full = mm.extract_logits(model, pairs[:2], tmp_path / "full", progress=False)
    for name in IMAGE_NAMES[:2]:
        labels = pairs_full.load_image(pairs_full.image_id(name)).labels
        np.testing.assert_array_equal(labels, _mmseg_labels(_label_file(workspace, name)))
    seen.clear()
    again = mm.extract_logits(model, pairs, path, size=(16, 24), progress=False)
    assert seen == [] and again.n_images == len(SIZES)
    with pytest.raises(ValueError, match="size"):
        mm.extract_logits(model, pairs, path, size=32, progress=False)


def test_extract_arrays(mm, workspace, tmp_path):
    import mmcv

    model = workspace["model"]
    root = workspace["root"]
    images = [mmcv.imread(str(root / "img" / f"{n}.png")) for n in IMAGE_NAMES[:3]]
    labels = [workspace["raw_labels"][n] for n in IMAGE_NAMES[:3]]
    store = mm.extract_logits(
        model,
        (images, labels),
        tmp_path / "arrays",
        reduce_zero_label=True,
        ignore_index=255,
        batch_size=2,
        progress=False,
    )
    assert store.image_names == [0, 1, 2]
    first = store.load_image(0)
    assert first.logits.shape == (N_CLASSES, *SIZES[0])
    assert {0, 255} <= set(np.unique(labels[0]))
    np.testing.assert_array_equal(first.labels, _mmseg_labels(_label_file(workspace, "img0")))
    # same model and pipeline as the file-based store, so the same logits
    result = _inference(model, root / "img" / f"{IMAGE_NAMES[0]}.png")
    np.testing.assert_allclose(first.logits, result.seg_logits.data.numpy(), rtol=2e-3, atol=2e-3)
    # without reduce_zero_label, file label 4 is out of range for 4 classes
    with pytest.raises(ValueError, match="reduce_zero_label"):
        mm.extract_logits(
            model,
            (images, labels),
            tmp_path / "bad",
            reduce_zero_label=False,
            progress=False,
        )
    with pytest.raises(TypeError, match="data must be"):
        mm.extract_logits(model, 42, tmp_path / "bad2", progress=False)


# ------------------------------------------------------------------------------ inference
def test_calibrate_model(mm, workspace, calibrator):
    from sksegcal.persistence import load

    ts, ts_path = calibrator
    assert ts.temperature_ > 0
    image = workspace["root"] / "img" / f"{IMAGE_NAMES[2]}.png"
    model = copy.deepcopy(workspace["model"])
    raw = _inference(model, image)
    logits = raw.seg_logits.data  # (C, H, W)

    assert mm.calibrate_model(model, ts_path, keep_logits=True) is model
    calibrated = _inference(model, image)
    # the prediction is the model's, unchanged
    np.testing.assert_array_equal(calibrated.pred_sem_seg.data, raw.pred_sem_seg.data)
    # the probabilities are the calibrator's, pixel by pixel
    proba = calibrated.seg_logits.data.numpy()
    table = logits.permute(1, 2, 0).reshape(-1, N_CLASSES).numpy()
    expected = load(ts_path).predict_proba(table).reshape(*logits.shape[1:], N_CLASSES)
    np.testing.assert_allclose(proba, np.moveaxis(expected, -1, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proba.sum(axis=0), 1.0, atol=1e-5)
    torch_logits = calibrated.seg_logits_uncalibrated.data
    np.testing.assert_array_equal(torch_logits.numpy(), logits.numpy())
    assert calibrated.metainfo["seg_logits_are_probabilities"] is True

    # a deep copy is calibrated on its own (the patch follows the copy)
    twin = copy.deepcopy(model)
    assert twin.postprocess_result.model is twin
    np.testing.assert_allclose(_inference(twin, image).seg_logits.data.numpy(), proba)

    with pytest.raises(ValueError, match="calibrated"):
        mm.extract_logits(model, [(image, None)], workspace["root"] / "x", progress=False)
    mm.uncalibrate_model(model)
    np.testing.assert_array_equal(_inference(model, image).seg_logits.data, logits)

    class WrongSize:
        n_features_in_ = N_CLASSES + 1

        def predict_proba(self, X):
            return X

    with pytest.raises(ValueError, match="fitted on 5 classes"):
        mm.calibrate_model(model, WrongSize())
    with pytest.raises(TypeError, match="predict_proba"):
        mm.calibrate_model(model, object())


# random weights: uninformative logits, so t1 and t2 stop at their upper bound (1e10)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_calibrate_model_with_selective_scaling(mm, workspace, store):
    """The package's own method through mmseg inference: argmax kept, rows = predict_proba."""
    from sklearn.linear_model import LogisticRegression

    from sksegcal import SelectiveScalingCalibrator
    from sksegcal.store import fit_store

    selective = fit_store(
        SelectiveScalingCalibrator(LogisticRegression(), random_state=0),
        store,
        images=None,
        random_state=0,
    )
    image = workspace["root"] / "img" / f"{IMAGE_NAMES[0]}.png"
    model = copy.deepcopy(workspace["model"])
    raw = _inference(model, image)
    calibrated = _inference(mm.calibrate_model(model, selective), image)
    np.testing.assert_array_equal(calibrated.pred_sem_seg.data, raw.pred_sem_seg.data)
    logits = raw.seg_logits.data
    table = logits.permute(1, 2, 0).reshape(-1, N_CLASSES).numpy()
    expected = selective.predict_proba(table).T.reshape(logits.shape)
    np.testing.assert_allclose(calibrated.seg_logits.data.numpy(), expected, atol=1e-6)
    # selective scaling never moves the argmax, not even at a huge temperature where the
    # float32 probabilities are uniform to the precision: the model's class stays first
    pred = raw.pred_sem_seg.data[0].numpy()
    np.testing.assert_array_equal(expected.argmax(axis=0), pred)


class _Exploit:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_saved_calibrators_load_under_the_trust_policy(mm, workspace, calibrator, tmp_path):
    """A pickle path is refused unless trusted=True: the malicious one runs nothing."""
    from sksegcal.persistence import load

    ts, skops_path = calibrator
    marker = tmp_path / "PWNED"
    evil = tmp_path / "calibrator.joblib"
    with open(evil, "wb") as f:
        pickle.dump(_Exploit(marker), f)
    model = copy.deepcopy(workspace["model"])

    for attempt in (
        lambda: mm.calibrate_model(model, evil),
        lambda: mm.calibrate_model(model, str(evil), trusted=["os.system"]),
        lambda: mm.CalibrationMetric(calibrator=str(evil)),
    ):
        with pytest.raises(ValueError, match=re.escape(str(evil)) + ".*trusted=True"):
            attempt()
        assert not marker.exists()
    assert "postprocess_result" not in model.__dict__  # not calibrated by a failed call

    # skops files load by default, in both places
    assert mm.calibrate_model(model, skops_path).postprocess_result.calibrator.temperature_ == (
        pytest.approx(ts.temperature_)
    )
    metric = mm.CalibrationMetric(calibrator=str(skops_path))
    assert metric.calibrator.temperature_ == pytest.approx(ts.temperature_)
    # trusted=True opens a pickle: a calibrator saved with joblib ...
    joblib_path = workspace["root"] / "ts.joblib"
    metric = mm.CalibrationMetric(calibrator=str(joblib_path), trusted=True)
    assert metric.calibrator.temperature_ == load(joblib_path, trusted=True).temperature_
    mm.calibrate_model(model, joblib_path, trusted=True)
    # ... and really unpickles (so the refusal above is what kept the exploit from running)
    with pytest.raises(TypeError, match="not a sksegcal calibrator"):
        mm.calibrate_model(model, evil, trusted=True)
    assert marker.exists()


# ------------------------------------------------------------------------------ the metric
def test_calibration_metric_in_mmseg_test_loop(mm, workspace, store, calibrator, tmp_path):
    from mmengine.runner import Runner

    from sksegcal.store import evaluate_store

    ts, ts_path = calibrator
    cfg = copy.deepcopy(workspace["cfg"])
    cfg.work_dir = str(tmp_path / "work_dir")
    cfg.load_from = str(workspace["checkpoint"])
    # the documented evaluator, beside IoUMetric, plus a saved calibrator under a prefix
    cfg.test_evaluator.append(
        dict(type="CalibrationMetric", calibrator=str(ts_path), prefix="ts", metrics="all")
    )
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()

    for key in ("mIoU", "aAcc", "ECE", "MCE", "RMSCE", "NLL", "Brier", "mean_image_ECE"):
        assert key in metrics, key
    assert "ts/ECE" in metrics and "ts/mIoU_of_probs" in metrics

    # the same numbers as sksegcal computes offline from the extracted store
    # (the store holds float16 logits, hence the tolerances)
    offline = evaluate_store(store, {"uncalibrated": None, "ts": ts})
    uncal, cal = offline["uncalibrated"].summary(), offline["ts"].summary()
    assert metrics["ECE"] == pytest.approx(uncal["ece"], abs=2e-3)
    assert metrics["NLL"] == pytest.approx(uncal["nll"], rel=2e-3)
    assert metrics["Brier"] == pytest.approx(uncal["brier"], rel=2e-3)
    assert metrics["ts/ECE"] == pytest.approx(cal["ece"], abs=2e-3)
    assert metrics["ts/NLL"] == pytest.approx(cal["nll"], rel=2e-3)
    assert metrics["ts/n_pixels"] == store.n_pixels
    # IoUMetric (percent) and the accumulator agree on mIoU
    assert metrics["mIoU"] == pytest.approx(100 * metrics["ts/mIoU_of_probs"], abs=0.5)
    # temperature scaling does not make the NLL worse on its own fit data
    assert metrics["ts/NLL"] <= metrics["NLL"] + 1e-6

    # a calibrated runner.model: mmseg's loop now sees probabilities, the metric uses
    # them as they are, and IoUMetric's mIoU is unchanged
    mm.calibrate_model(runner.model, ts_path)
    runner.test_loop.evaluator.metrics.pop()  # the one with its own calibrator
    calibrated = runner.test()
    assert calibrated["ECE"] == pytest.approx(metrics["ts/ECE"], rel=1e-4, abs=1e-6)
    assert calibrated["NLL"] == pytest.approx(metrics["ts/NLL"], rel=1e-4)
    assert calibrated["mIoU"] == metrics["mIoU"]


def test_calibration_metric_streams_and_reads_calibrated_models(mm, workspace, calibrator):
    """process()/evaluate() by hand: a calibrated model's probabilities are used as they are."""
    ts, ts_path = calibrator
    model = copy.deepcopy(workspace["model"])
    root = workspace["root"]
    images = [root / "img" / f"{n}.png" for n in IMAGE_NAMES[:3]]

    def predictions(m, as_dicts=True):
        import torch
        from mmengine.structures import PixelData

        out = []
        for img in images:
            sample = _inference(m, img)
            label = _mmseg_labels(_label_file(workspace, img.stem)).astype(np.int64)
            sample.gt_sem_seg = PixelData(data=torch.from_numpy(label)[None])
            # what mmengine's Evaluator hands to a metric: the sample as a dict
            out.append(sample.to_dict() if as_dicts else sample)
        return out

    raw = predictions(model)
    with_calibrator = mm.CalibrationMetric(calibrator=ts)
    with_calibrator.process({}, raw[:2])
    with_calibrator.process({}, raw[2:])
    a = with_calibrator.evaluate(3)
    assert with_calibrator.accumulator_ is None  # reset for the next evaluation

    calibrated = mm.CalibrationMetric()
    preds = predictions(mm.calibrate_model(model, ts_path), as_dicts=False)
    # dicts (what mmengine's Evaluator passes) and SegDataSamples are both accepted
    calibrated.process({}, [preds[0].to_dict(), *preds[1:]])
    b = calibrated.evaluate(3)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # the probabilities of a calibrated model are not softmaxed again
    uncal = mm.CalibrationMetric()
    uncal.process({}, raw)
    assert uncal.evaluate(3)["NLL"] != pytest.approx(b["NLL"], rel=1e-3)

    with pytest.raises(ValueError, match="both"):
        mm.CalibrationMetric(calibrator=ts).process({}, predictions(model)[:1])
    with pytest.raises(ValueError, match="Unknown metrics"):
        mm.CalibrationMetric(metrics=["ece", "accuracy_top5"])
    with pytest.raises(ValueError, match="classwise=True"):
        mm.CalibrationMetric(metrics=["ace"])


def test_calibration_metric_is_registered(mm):
    from mmengine.registry import init_default_scope
    from mmseg.registry import METRICS

    init_default_scope("mmseg")
    metric = METRICS.build(dict(type="CalibrationMetric", n_bins=10))
    assert isinstance(metric, mm.CalibrationMetric) and metric.n_bins == 10


def test_cli_extract_from_config(workspace, store, tmp_path):
    from sksegcal.cli import main

    out = tmp_path / "cli-store"
    code = main(["extract", "--store", str(out), "--config", str(workspace["config_file"]),
                 "--checkpoint", str(workspace["checkpoint"]), "-q"])
    assert code == 0
    from sksegcal.store import LogitStore

    cli_store = LogitStore.open(out)
    assert cli_store.image_names == store.image_names
    for name in store.image_names:
        a = cli_store.load_image(cli_store.image_id(name))
        b = store.load_image(store.image_id(name))
        # the fixture ran batches of mixed sizes (padded); the CLI one image at a time
        np.testing.assert_allclose(a.logits, b.logits, rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(a.labels, b.labels)
    # a missing checkpoint is a one-line error, not a traceback
    assert main(["extract", "--store", str(tmp_path / "x"), "--config",
                 str(workspace["config_file"]), "--checkpoint", str(tmp_path / "no.pth")]) == 1


# ------------------------------------------------------------------------------ distributed
@pytest.mark.parametrize(
    "counts, size",
    [([3, 3], 6), ([3, 3], 5), ([2, 2, 2, 2], 5), ([1, 1], 1), ([3, 2], 5), ([0, 0], 0),
     ([4, 4, 3], 11), ([2, 2, 2], 4)],
)
def test_kept_counts_follow_mmengine_collect_results(counts, size):
    """_n_kept says how many of each process's results mmengine's gathering keeps."""
    from itertools import chain, zip_longest

    from sksegcal.integrations.mmseg._evaluator import _n_kept

    # mmengine.dist.collect_results_cpu: interleave, drop the None fill, keep `size`
    parts = [[(rank, k) for k in range(n)] for rank, n in enumerate(counts)]
    ordered = [i for i in chain.from_iterable(zip_longest(*parts)) if i is not None][:size]
    for rank in range(len(counts)):
        assert _n_kept(counts, rank, size) == sum(r == rank for r, _ in ordered)


_DIST_WORKER = """
import os, pickle, sys
import torch
torch.set_num_threads(1)
import torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
from mmengine.config import Config
from mmengine.runner import Runner
cfg = Config.fromfile(sys.argv[1])  # custom_imports: sksegcal.integrations.mmseg
cfg.launcher = "pytorch"  # distributed (the process group exists: not initialised again)
cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)  # CPU DDP
metrics = Runner.from_cfg(cfg).test()
with open(sys.argv[2].format(rank=dist.get_rank()), "wb") as f:
    pickle.dump({k: float(v) for k, v in metrics.items()}, f)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_calibration_metric_distributed_equals_one_process(workspace, tmp_path):
    """Two gloo processes in mmengine's distributed test loop give the one-process numbers.

    Five images on two processes: mmengine's DefaultSampler pads process 1 with
    image 0 again; that repeat must not be counted (as IoUMetric does not count it).
    """
    from mmengine.runner import Runner

    from sksegcal.integrations.mmseg._loading import _sync_bn_to_bn

    cfg = copy.deepcopy(workspace["cfg"])
    cfg.load_from = str(workspace["checkpoint"])
    # DistributedDataParallel refuses SyncBatchNorm on CPU (the one-process Runner reverts it)
    _sync_bn_to_bn(cfg.model)
    cfg.test_dataloader.dataset.indices = 5
    cfg.test_evaluator = [
        dict(type="IoUMetric", iou_metrics=["mIoU"]),
        dict(type="CalibrationMetric", metrics="all", classwise=True),
    ]
    config_file = tmp_path / "dist_config.py"
    cfg.work_dir = str(tmp_path / "dist_work")
    cfg.dump(str(config_file))

    script = tmp_path / "worker.py"
    script.write_text(_DIST_WORKER)
    out = str(tmp_path / "rank{rank}.pkl")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(config_file), out],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        # meanwhile (the workers spend most of their time importing), the one-process run
        one = copy.deepcopy(cfg)
        one.work_dir = str(tmp_path / "one_work")
        one.visualizer.name = "one-process"  # another Runner in this process had "visualizer"
        expected = {k: float(v) for k, v in Runner.from_cfg(one).test().items()}
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    per_rank = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    assert per_rank[0] == per_rank[1]  # broadcast to every process

    dist = per_rank[0]
    assert dist.keys() == expected.keys()
    assert dist["n_pixels"] == expected["n_pixels"]  # the repeated image is not counted
    assert dist["mIoU"] == expected["mIoU"]
    for key in expected:
        # the same tallies, merged in another order: equal up to float64 rounding (all but
        # mean_image_ECE, a mean over a dict of images, come out bit for bit the same)
        assert dist[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
