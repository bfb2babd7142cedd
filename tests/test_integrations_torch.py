"""The generic torch bridge against forward passes done by hand.

Plain modules (2-D, strided so that the logits must be resized; a dict output;
a ModelOutput-like output), a MONAI 3-D U-Net, and, where they import, a
segmentation_models_pytorch U-Net and a torchvision model (neither imports
beside the CPU torch here: their registry builds need CUDA's torchvision).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sksegcal import TemperatureScaling
from sksegcal.integrations import torch as bridge
from sksegcal.pixels import flatten_segmentation
from sksegcal.store import LogitStore, fit_store

N_CLASSES = 4


class StridedNet(torch.nn.Module):
    """Logits at half resolution: the bridge must resize them to the labels."""

    def __init__(self, out="tensor"):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, N_CLASSES, 3, stride=2, padding=1)
        self.drop = torch.nn.Dropout(0.5)  # must be off during extraction
        self.out = out

    def forward(self, x):
        z = self.drop(self.conv(x))
        if self.out == "dict":
            return {"out": z, "aux": z.detach() * 0}
        if self.out == "model_output":
            return type("Output", (), {"logits": z, "loss": None})()
        return z


def _data(n=6, size=32, seed=0):
    """Images and labels: the prediction of a fixed network, a third of them replaced."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    with torch.no_grad():
        torch.manual_seed(0)
        labels = StridedNet().conv(images)
    labels = F.interpolate(labels, size=(size, size), mode="nearest").argmax(1)
    noise = torch.randint(0, N_CLASSES, labels.shape, generator=g)
    labels = torch.where(torch.rand(labels.shape, generator=g) < 0.3, noise, labels)
    labels[:, :3] = 255  # ignored rows
    return images, labels


def _as_stored(logits):
    """float16 as the store keeps it, with the bridge's tie rule: where the cast ties the
    top two classes, the model's winner is one float16 step above the other."""
    out = logits.astype(np.float16)
    for index in zip(*np.nonzero(out.argmax(0) != logits.argmax(0))):
        top = out[(slice(None), *index)].max()
        out[(logits[(slice(None), *index)].argmax(), *index)] = np.nextafter(
            top, np.float16(np.inf)
        )
    return out


def _by_hand(model, images, size):
    model.eval()
    with torch.no_grad():
        z = model.conv(images)
    return F.interpolate(z, size=size, mode="bilinear", align_corners=False).numpy()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StridedNet()


@pytest.mark.parametrize("out", ["tensor", "dict", "model_output"])
def test_logits_equal_a_forward_pass_by_hand(out):
    torch.manual_seed(0)
    net = StridedNet(out).train()
    images, labels = _data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    got = bridge.extract_logits(net, loader, progress=False)
    assert net.training  # the mode is restored
    expected = _by_hand(net, images, (32, 32))
    np.testing.assert_allclose(got.logits, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.labels, labels.numpy())
    assert got.names == list(range(6)) and got.groups is None


def test_argmax_is_the_models_map_and_the_store_round_trips(model, tmp_path):
    images, labels = _data()
    groups = ["p0", "p0", "p1", "p1", "p2", "p2"]
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    store = bridge.extract_logits(model, loader, tmp_path / "s", groups=groups, progress=False)
    expected = _by_hand(model, images, (32, 32))
    reopened = LogitStore.open(tmp_path / "s")
    assert reopened.image_names == list(range(6))
    for i in range(6):
        image = reopened.load_image(i)
        np.testing.assert_array_equal(image.logits, _as_stored(expected[i]))
        np.testing.assert_array_equal(image.labels, labels[i].numpy())
        # the stored prediction is the model's own
        np.testing.assert_array_equal(image.logits.argmax(0), expected[i].argmax(0))
    assert bridge.image_groups(store).tolist() == groups
    assert reopened.manifest["source"]["resize"] == "linear"


def test_resume_runs_only_the_missing_images(model, tmp_path):
    images, labels = _data()
    batches = [
        {"image": images[i : i + 2], "label": labels[i : i + 2], "name": [f"im{i}", f"im{i + 1}"]}
        for i in (0, 2, 4)
    ]
    bridge.extract_logits(model, batches[:1], tmp_path / "s", progress=False)  # "interrupted"
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    try:
        store = bridge.extract_logits(model, batches, tmp_path / "s", progress=False)
    finally:
        hook.remove()
    assert seen == [2, 2]  # the first batch is not run again
    assert sorted(store.image_names) == [f"im{i}" for i in range(6)]
    expected = _by_hand(model, images, (32, 32))
    for i in range(6):
        stored = store.load_image(store.image_id(f"im{i}")).logits
        np.testing.assert_array_equal(stored, _as_stored(expected[i]))
    # another resize rule would mix two kinds of logits in one store
    with pytest.raises(ValueError, match="resize"):
        bridge.extract_logits(
            model,
            batches + [{"image": images[:1], "label": labels[:1], "name": ["new"]}],
            tmp_path / "s",
            resize="nearest",
            progress=False,
        )


def test_images_of_different_sizes_and_label_sizes():
    torch.manual_seed(0)
    net = StridedNet()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 16, 24, generator=g), torch.randn(3, 20, 20, generator=g)]
    labels = [np.zeros((16, 24), np.int64), np.zeros((40, 40), np.int64)]
    got = bridge.extract_logits(net, [(images, labels)], progress=False)
    assert isinstance(got.logits, list)
    np.testing.assert_allclose(
        got.logits[0], _by_hand(net, images[0][None], (16, 24))[0], atol=1e-6
    )
    np.testing.assert_allclose(
        got.logits[1], _by_hand(net, images[1][None], (40, 40))[0], atol=1e-6
    )


def test_a_calibrator_fitted_through_the_bridge_equals_one_fitted_on_arrays(model, tmp_path):
    images, labels = _data(n=8)
    loader = DataLoader(TensorDataset(images, labels), batch_size=3)
    store = bridge.extract_logits(model, loader, tmp_path / "s", progress=False)
    arrays = bridge.extract_logits(model, loader, progress=False)
    through = fit_store(TemperatureScaling(), store, images=None, max_pixels=10**6)
    # the store holds float16: the same values, by hand, from the forward pass
    expected = np.stack([_as_stored(z) for z in _by_hand(model, images, (32, 32))])
    by_hand = TemperatureScaling().fit(
        *flatten_segmentation(expected.astype(np.float32), labels.numpy())[:2]
    )
    on_arrays = TemperatureScaling().fit(*flatten_segmentation(arrays.logits, arrays.labels)[:2])
    assert through.temperature_ == pytest.approx(by_hand.temperature_, rel=1e-5)
    assert on_arrays.temperature_ == pytest.approx(by_hand.temperature_, rel=1e-3)


def test_calibrated_inference_at_the_input_size(model):
    images, labels = _data(n=3)
    expected = _by_hand(model, images, (32, 32))
    ts = TemperatureScaling().fit(*flatten_segmentation(expected, labels.numpy())[:2])
    proba = bridge.predict_proba(ts, model, images)
    table = np.moveaxis(expected, 1, -1).reshape(-1, N_CLASSES)
    reference = np.moveaxis(ts.predict_proba(table).reshape(3, 32, 32, N_CLASSES), -1, 1)
    np.testing.assert_allclose(proba, reference, rtol=1e-5, atol=1e-6)


def test_groups_from_a_mapping_a_callable_and_the_batches(model):
    images, labels = _data(n=4)
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    got = bridge.extract_logits(
        model, batches, groups={0: "a", 1: "a", 2: "b", 3: 7}, progress=False
    )
    assert got.groups == ["a", "a", "b", 7]
    got = bridge.extract_logits(model, batches, groups=lambda name: name // 2, progress=False)
    assert got.groups == [0, 0, 1, 1]
    dicts = [{"image": images[:2], "label": labels[:2], "group": ["x", "y"]}]
    assert bridge.extract_logits(model, dicts, progress=False).groups == ["x", "y"]


def test_errors_say_what_to_do(model):
    images, labels = _data(n=2)
    with pytest.raises(ValueError, match="resize='linear'"):
        bridge.extract_logits(model, [(images, labels)], resize=None, progress=False)
    with pytest.raises(ValueError, match="labels"):
        bridge.extract_logits(model, [{"image": images}], progress=False)
    with pytest.raises(TypeError, match="output_key"):
        bridge.extract_logits(lambda x: object(), [(images, labels)], progress=False)


def test_the_bridge_imports_no_torchvision():
    import ast
    import inspect

    for module in (bridge, __import__("sksegcal.integrations._extract", fromlist=["x"])):
        tree = ast.parse(inspect.getsource(module))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith("torchvision")]


# ---------------------------------------------------------------------------------- MONAI
def test_monai_3d_unet_logits_argmax_store_and_calibrator(tmp_path):
    monai = pytest.importorskip("monai")
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        channels=(4, 8),
        strides=(2,),
        num_res_units=0,
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 8, 12, 12, generator=g)
    labels = torch.randint(0, 3, (2, 1, 16, 24, 24), generator=g)  # finer labels: trilinear
    got = bridge.extract_logits(net, [(images, labels)], progress=False)
    net.eval()
    with torch.no_grad():
        raw = net(images)
    expected = F.interpolate(raw, size=(16, 24, 24), mode="trilinear", align_corners=False)
    np.testing.assert_allclose(got.logits, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert got.labels.shape == (2, 16, 24, 24)
    # MONAI's own map: AsDiscrete(argmax=True) on the resized logits
    from monai.transforms import AsDiscrete

    monai_map = AsDiscrete(argmax=True)(expected[0])[0].numpy().astype(np.int64)
    np.testing.assert_array_equal(got.logits[0].argmax(0), monai_map)
    assert monai.__version__
    # the store keeps (C, D, H, W) volumes, with the patients
    batches = [{"image": images, "label": labels, "group": ["p1", "p2"]}]
    store = bridge.extract_logits(net, batches, tmp_path / "s", progress=False)
    assert bridge.image_groups(store).tolist() == ["p1", "p2"]
    for i in range(2):
        volume = store.load_image(i)
        np.testing.assert_array_equal(volume.logits, _as_stored(expected[i].numpy()))
        np.testing.assert_array_equal(volume.labels, labels[i, 0].numpy())
    through = fit_store(TemperatureScaling(), store, images=None, max_pixels=10**6)
    stored = np.stack([_as_stored(z) for z in expected.numpy()]).astype(np.float32)
    keep = labels[:, 0].numpy() != 255
    on_arrays = TemperatureScaling().fit(
        np.moveaxis(stored, 1, -1)[keep], labels[:, 0].numpy()[keep]
    )
    assert through.temperature_ == pytest.approx(on_arrays.temperature_, rel=1e-6)


# ------------------------------------------- libraries that do not import beside CPU torch
def test_segmentation_models_pytorch_unet():
    smp = pytest.importorskip(
        "segmentation_models_pytorch",
        reason="segmentation_models_pytorch needs torchvision, whose registry build is CUDA-only",
        exc_type=ImportError,
    )
    torch.manual_seed(0)
    net = smp.Unet("resnet18", encoder_weights=None, classes=N_CLASSES).eval()
    images, labels = _data(n=2)
    got = bridge.extract_logits(net, [(images, labels)], progress=False)
    with torch.no_grad():
        np.testing.assert_allclose(got.logits, net(images).numpy(), rtol=1e-5, atol=1e-5)


def test_torchvision_deeplab():
    tv = pytest.importorskip(
        "torchvision.models.segmentation",
        reason="torchvision's registry build is CUDA-only and fails beside the CPU torch",
        exc_type=ImportError,
    )
    torch.manual_seed(0)
    net = tv.fcn_resnet50(weights=None, weights_backbone=None, num_classes=N_CLASSES).eval()
    images, labels = _data(n=1)
    got = bridge.extract_logits(net, [(images, labels)], progress=False)
    with torch.no_grad():
        np.testing.assert_allclose(got.logits, net(images)["out"].numpy(), rtol=1e-5, atol=1e-5)


def test_calibrated_inference_on_volumes():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, stride=2, padding=1)
    images = torch.randn(2, 1, 6, 8, 8)
    with torch.no_grad():
        z = F.interpolate(net(images), size=(6, 8, 8), mode="trilinear", align_corners=False)
    z = z.numpy()
    rng = np.random.default_rng(0)
    labels = np.where(
        rng.random(z[:, 0].shape) < 0.3, rng.integers(0, 3, z[:, 0].shape), z.argmax(1)
    )
    ts = TemperatureScaling().fit(np.moveaxis(z, 1, -1).reshape(-1, 3), labels.reshape(-1))
    proba = bridge.predict_proba(ts, net, images)
    reference = ts.predict_proba(np.moveaxis(z, 1, -1).reshape(-1, 3))
    np.testing.assert_allclose(
        proba, np.moveaxis(reference.reshape(2, 6, 8, 8, 3), -1, 1), rtol=1e-5, atol=1e-6
    )
