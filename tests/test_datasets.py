"""The embedded default data (sksegcal.datasets) and the demo's U-Net (sksegcal._segnet)."""

import socket

import numpy as np
import pytest

from sksegcal import datasets
from sksegcal.datasets import (
    DATASETS,
    SHIFTED,
    aal_available,
    load_colin27_aal,
    load_dataset,
    load_mni152_tissue,
    simulate_acquisition,
)

pytest.importorskip("nilearn")

SMALL = {"n_model_acquisitions": 1, "n_calibration_acquisitions": 1,
         "n_shifted_acquisitions": 1, "slice_step": 6}


@pytest.fixture(scope="module")
def small():
    return load_mni152_tissue(**SMALL)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails: the data must come from the wheel."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------- MNI152 tissue
def test_mni152_shapes_and_classes(small):
    n = len(small)
    assert small.images.shape[0] == n and small.images.shape[1] == 1
    assert small.images.dtype == np.float32 and small.labels.dtype == np.uint8
    assert small.labels.shape == (n,) + small.images.shape[2:]
    # U-Net pooling needs sides divisible by 4 (the crop makes them multiples of 8)
    assert all(s % 8 == 0 for s in small.images.shape[2:])
    assert small.class_names == ("other", "grey matter", "white matter")
    assert small.n_classes == 3
    assert set(np.unique(small.labels)) == {0, 1, 2}
    assert np.isfinite(small.images).all() and small.images.min() >= 0
    assert set(small.subset) == {"model", "calibration", "shifted"}
    assert small.slice_index.shape == (n,)


def test_split_is_by_slice(small):
    model = set(small.select("model").slice_index)
    held = set(small.select("calibration").slice_index)
    assert model and held and not model & held
    assert set(small.select("shifted").slice_index) == held


def test_deterministic_and_seeded(small):
    again = load_mni152_tissue(**SMALL)
    np.testing.assert_array_equal(small.images, again.images)
    np.testing.assert_array_equal(small.labels, again.labels)
    other = load_mni152_tissue(**{**SMALL, "random_state": 1})
    np.testing.assert_array_equal(small.labels, other.labels)
    assert not np.array_equal(small.images, other.images)


def test_images_seeded_individually(small):
    # asking for more acquisitions leaves the first acquisition of every slice unchanged
    more = load_mni152_tissue(**{**SMALL, "n_calibration_acquisitions": 2}).select(
        "calibration")
    cal = small.select("calibration")
    assert len(more) == 2 * len(cal)
    first = np.r_[True, np.diff(more.slice_index) != 0]
    np.testing.assert_array_equal(more.images[first], cal.images)


def test_label_rule_matches_documented_argmax(small):
    from nilearn import datasets as nds

    gm = nds.load_mni152_gm_template(resolution=2).get_fdata()
    wm = nds.load_mni152_wm_template(resolution=2).get_fdata()
    rule = np.argmax(np.stack([1 - gm - wm, gm, wm]), axis=0)
    # class shares over the whole volume are those of the rule (the crop drops only air)
    counts = np.bincount(rule.ravel(), minlength=3)
    kept = np.bincount(small.labels.ravel(), minlength=3)
    assert kept[1] / kept[2] == pytest.approx(counts[1] / counts[2], rel=0.25)


def test_shifted_acquisitions_are_noisier(small):
    cal, shifted = small.select("calibration"), small.select("shifted")
    # the top rows of the crop are air (Rician noise only) in every held-out slice
    air = (cal.labels[:, :2] == 0).all(axis=0)
    assert air.mean() > 0.5

    def noise(images):
        return float(images[:, 0, :2][:, air].mean())

    assert noise(shifted.images) > 1.5 * noise(cal.images)
    assert not np.allclose(cal.images, shifted.images)


def test_no_download(no_network):
    datasets._mni152_volumes.cache_clear()  # read the NIfTI files again, offline
    data = load_mni152_tissue(**SMALL)
    assert len(data) > 0


def test_select_rejects_unknown_subset(small):
    with pytest.raises(ValueError, match="subset must be one of"):
        small.select("train")


def test_bad_arguments():
    with pytest.raises(ValueError, match="slice_step"):
        load_mni152_tissue(slice_step=0)
    with pytest.raises(TypeError, match="random_state must be an int"):
        load_mni152_tissue(**SMALL, random_state=None)
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("cityscapes")


def test_load_dataset_cache(tmp_path, small):
    first = load_dataset("mni152-tissue", cache_dir=tmp_path, **SMALL)
    files = list(tmp_path.glob("data-mni152-tissue-*.npz"))
    assert len(files) == 1
    second = load_dataset("mni152-tissue", cache_dir=tmp_path, **SMALL)
    for a, b in ((first, second), (small, second)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.subset, b.subset)
        assert a.class_names == b.class_names
    files[0].write_bytes(b"not an npz")  # corrupt cache: rebuilt, not an error
    third = load_dataset("mni152-tissue", cache_dir=tmp_path, **SMALL)
    np.testing.assert_array_equal(third.images, small.images)


# ----------------------------------------------------------------- acquisitions
def test_simulate_acquisition_noise_level():
    clean = np.zeros((64, 64))
    out = simulate_acquisition(clean, noise_std=0.1, bias_strength=0.0, random_state=0)
    assert out.dtype == np.float32 and out.shape == clean.shape
    # magnitude of complex Gaussian noise on zero signal: Rayleigh, mean sigma * sqrt(pi / 2)
    assert out.mean() == pytest.approx(0.1 * np.sqrt(np.pi / 2), rel=0.05)
    again = simulate_acquisition(clean, noise_std=0.1, bias_strength=0.0, random_state=0)
    np.testing.assert_array_equal(out, again)


def test_simulate_acquisition_bias_field_bounded():
    clean = np.full((32, 48), 0.5)
    out = simulate_acquisition(clean, noise_std=0.0, bias_strength=0.3, gamma_range=(1, 1),
                               gain_range=(1, 1), random_state=3)
    ratio = out / 0.5
    assert ratio.max() <= np.exp(0.3) + 1e-5 and ratio.min() >= np.exp(-0.3) - 1e-5
    assert ratio.max() - ratio.min() > 0.1  # a real, smooth inhomogeneity
    assert SHIFTED["bias_strength"] > datasets.IN_DOMAIN["bias_strength"]


# ----------------------------------------------------------------- Colin27 + AAL
def test_aal_missing_files_message(tmp_path):
    assert not aal_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install mricron-data"):
        load_colin27_aal(data_dir=tmp_path)


@pytest.mark.skipif(not aal_available(), reason="needs Debian's mricron-data (apt-get install "
                                                  "mricron-data)")
def test_aal_dataset():
    data = load_dataset("aal", **SMALL)
    assert data.n_classes == 117
    assert data.class_names[0] == "background" and data.class_names[1] == "Precentral_L"
    assert data.labels.max() < 117 and len(np.unique(data.labels)) > 40
    assert data.images.shape[1] == 1 and data.images.dtype == np.float32
    assert not set(data.select("model").slice_index) & set(data.select("shifted").slice_index)


def test_dataset_names():
    assert DATASETS == ("mni152-tissue", "aal")


# ----------------------------------------------------------------- the U-Net
def _tiny():
    rng = np.random.default_rng(0)
    labels = (rng.random((6, 16, 16)) < 0.5).astype(np.uint8)
    labels[:, :, :8] = 2
    images = (labels[:, None] + rng.normal(0, 0.3, (6, 1, 16, 16))).astype(np.float32)
    return images, labels


def test_unet_training_is_deterministic():
    from sksegcal._segnet import SegNetConfig, predict_logits, train_unet

    images, labels = _tiny()
    config = SegNetConfig(width=4, epochs=3, batch_size=3)
    a, losses_a = train_unet(images, labels, 3, config)
    b, losses_b = train_unet(images, labels, 3, config)
    assert losses_a == losses_b and len(losses_a) == 3
    za, zb = predict_logits(a, images), predict_logits(b, images)
    assert za.shape == (6, 3, 16, 16) and za.dtype == np.float32
    np.testing.assert_array_equal(za, zb)


def test_unet_cache(tmp_path):
    from sksegcal._segnet import SegNetConfig, load_or_train, predict_logits

    images, labels = _tiny()
    config = SegNetConfig(width=4, epochs=2, batch_size=3)
    model, info = load_or_train("tiny", images, labels, 3, config, cache=tmp_path)
    assert not info["cached"] and len(list(tmp_path.glob("unet-tiny-*.pt"))) == 1
    again, info2 = load_or_train("tiny", images, labels, 3, config, cache=tmp_path)
    assert info2["cached"] and info2["path"] == info["path"]
    np.testing.assert_array_equal(predict_logits(model, images), predict_logits(again, images))
    # other settings, other key
    _, info3 = load_or_train("tiny", images, labels, 3, SegNetConfig(width=4, epochs=1),
                             cache=tmp_path)
    assert not info3["cached"] and info3["path"] != info["path"]
    # a corrupt cache file is retrained over, not an error
    (tmp_path / info["path"].split("/")[-1]).write_bytes(b"garbage")
    _, info4 = load_or_train("tiny", images, labels, 3, config, cache=tmp_path)
    assert not info4["cached"]


def test_cache_dir_env(monkeypatch, tmp_path):
    from sksegcal._segnet import cache_dir

    monkeypatch.setenv("SKSEGCAL_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("SKSEGCAL_CACHE")
    assert cache_dir().name == "sksegcal"


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_unet_depth(depth):
    import torch

    from sksegcal._segnet import UNet

    model = UNet(7, width=2, depth=depth).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 32, 48))
    assert out.shape == (2, 7, 32, 48)


def test_predict_logits_arguments():
    from sksegcal._segnet import UNet, predict_logits

    model = UNet(3, width=2, depth=2)
    with pytest.raises(ValueError, match="batch_size"):
        predict_logits(model, np.zeros((2, 1, 8, 8), np.float32), batch_size=0)
    with pytest.raises(ValueError, match="at least one image"):
        predict_logits(model, np.zeros((0, 1, 8, 8), np.float32))
    # fewer images than the padded batch: only theirs come back
    assert predict_logits(model, np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 3, 8, 8)
