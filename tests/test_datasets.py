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
    perturb_images,
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


# ---------------------------------------------------------------------------
# perturb_images: perturbed copies of calibration images (Tomani et al. 2021)
# ---------------------------------------------------------------------------
def _ramp_images(n=6):
    ramp = np.linspace(0.05, 1.0, 20 * 16).reshape(1, 20, 16)
    return np.repeat(ramp[None], n, axis=0).astype(np.float32)  # (n, 1, 20, 16)


def test_perturb_images_contrast_is_one_gamma_per_image_in_range():
    images = _ramp_images()
    out = perturb_images(images, kinds=("contrast",), random_state=0)
    assert out.shape == images.shape and out.dtype == np.float32
    gammas = []
    for x, o in zip(images, out):
        g = np.log(o[0, 0, 0]) / np.log(x[0, 0, 0])
        # the same power on every pixel: x ** g, the direct formula
        np.testing.assert_allclose(o, x.astype(np.float64) ** g, rtol=1e-5)
        gammas.append(g)
    assert all(1 / 1.5 - 1e-6 <= g <= 1.5 + 1e-6 for g in gammas)
    assert len(set(np.round(gammas, 6))) == len(gammas)  # every image its own level


def test_perturb_images_blur_is_a_gaussian_filter_within_its_level():
    from scipy.ndimage import gaussian_filter

    images = np.zeros((4, 2, 21, 21), dtype=np.float32)
    images[:, 0, 10, 10] = 1.0  # an impulse in channel 0, channel 1 empty
    from scipy.optimize import minimize_scalar

    out = perturb_images(images, kinds=("blur",), random_state=1)
    grid = np.linspace(0.0, 1.5, 301)
    for x, o in zip(images, out):
        assert np.abs(o[1]).max() == 0  # channels are blurred apart, never mixed

        def misfit(sigma, x=x, o=o):
            ref = gaussian_filter(x[0].astype(np.float64), sigma, mode="nearest")
            return np.abs(o[0] - ref).max()

        # some sigma in [0, 1.5] reproduces the copy (to float32 rounding)
        best = grid[np.argmin([misfit(g) for g in grid])]
        lo, hi = max(best - 0.005, 0.0), min(best + 0.005, 1.5)
        refined = minimize_scalar(
            misfit, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9}
        )
        assert min(refined.fun, misfit(best)) < 1e-6


def test_perturb_images_channels_last_are_never_mixed():
    images = np.zeros((3, 21, 21, 3), dtype=np.float32)
    images[:, 10, 10, 0] = 1.0  # (N, H, W, channels), as mmcv gives images
    last = perturb_images(images, kinds=("blur",), channel_axis=-1, random_state=1)
    first = perturb_images(np.moveaxis(images, -1, 1), kinds=("blur",), random_state=1)
    np.testing.assert_array_equal(np.moveaxis(last, -1, 1), first)
    assert np.abs(last[..., 1:]).max() == 0
    with pytest.raises(ValueError, match="channel_axis"):
        perturb_images(images, channel_axis=2)


def test_perturb_images_noise_levels_span_none_to_the_maximum():
    images = np.full((40, 32, 32), 0.5, dtype=np.float32)  # (N, H, W) works as well
    out = perturb_images(images, kinds=("noise",), max_level={"noise": 0.2}, random_state=2)
    stds = (out - 0.5).reshape(40, -1).std(axis=1)
    assert stds.max() <= 0.2 * 1.1 and stds.min() < 0.02 and stds.max() > 0.15
    np.testing.assert_allclose((out - 0.5).mean(axis=(1, 2)), 0, atol=0.05)


def test_perturb_images_is_seeded_per_image():
    images = _ramp_images(5) + np.float32(0.01)
    a = perturb_images(images, random_state=7)
    np.testing.assert_array_equal(a, perturb_images(images, random_state=7))
    # image i's copy does not depend on the images after it
    np.testing.assert_array_equal(a[:2], perturb_images(images[:2], random_state=7))
    assert not np.array_equal(a, perturb_images(images, random_state=8))
    # switching a kind off leaves the other kinds' levels as they were
    no_noise = perturb_images(images, kinds=("contrast", "blur"), random_state=7)
    assert np.abs(a - no_noise).max() < 0.5 and not np.array_equal(a, no_noise)
    np.testing.assert_allclose(
        perturb_images(images, kinds=("contrast",), random_state=7),
        perturb_images(
            images, kinds=("contrast", "blur"), max_level={"blur": 0.0}, random_state=7
        ),
        rtol=1e-6,
    )


def test_perturb_images_bad_arguments():
    images = _ramp_images(2)
    with pytest.raises(ValueError, match="kinds"):
        perturb_images(images, kinds=("rotation",))
    with pytest.raises(ValueError, match="kinds"):
        perturb_images(images, kinds="noise")
    with pytest.raises(ValueError, match="unknown kind"):
        perturb_images(images, max_level={"rotation": 1.0})
    with pytest.raises(ValueError, match=">= 1.0"):
        perturb_images(images, max_level={"contrast": 0.5})
    with pytest.raises(ValueError, match="float array"):
        perturb_images(images[0, 0])
