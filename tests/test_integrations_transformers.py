"""The transformers bridge against the image processors' own post-processing.

A SegFormer (per-pixel logits at a quarter of the input size) and a
Mask2Former (query classes x query masks), both tiny and randomly
initialised; 32x32 images, labels at other sizes so that every path resizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from sksegcal import TemperatureScaling  # noqa: E402
from sksegcal.integrations import transformers as bridge  # noqa: E402
from sksegcal.pixels import flatten_segmentation  # noqa: E402
from sksegcal.store import LogitStore, fit_store  # noqa: E402

N_CLASSES = 4
SIZES = [(32, 32), (24, 40), (32, 32), (48, 36)]


def _segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    from transformers.models.segformer.image_processing_pil_segformer import (
        SegformerImageProcessorPil,
    )

    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        num_attention_heads=[1, 1], decoder_hidden_size=16, num_labels=N_CLASSES,
        patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
    )  # fmt: skip
    model = SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():  # random weights give near-equal logits: make the model confident
        model.decode_head.classifier.weight *= 3000
    return model, SegformerImageProcessorPil(size={"height": 32, "width": 32})


def _mask2former():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        Mask2FormerImageProcessorPil,
    )

    torch.manual_seed(0)
    backbone = SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
        window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=N_CLASSES, hidden_dim=32, mask_feature_size=32,
        feature_size=32, num_queries=5, encoder_layers=1, decoder_layers=2, dim_feedforward=32,
        num_attention_heads=2, encoder_feedforward_dim=32, common_stride=4,
        use_pretrained_backbone=False,
    )  # fmt: skip
    model = Mask2FormerForUniversalSegmentation(config).eval()
    return model, Mask2FormerImageProcessorPil(size={"height": 32, "width": 32})


@pytest.fixture(scope="module", params=["segformer", "mask2former"])
def case(request):
    model, processor = {"segformer": _segformer, "mask2former": _mask2former}[request.param]()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    # the processor's own outputs and maps, by hand
    encoded = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**encoded)
    maps = [m.numpy() for m in processor.post_process_semantic_segmentation(outputs, SIZES)]
    scored = processor.post_process_semantic_segmentation(
        outputs, SIZES, return_segmentation_scores=True
    )
    scores = [r["segmentation_scores"].double().numpy() for r in scored]
    if request.param == "mask2former":
        # the documented rule: the log of the scores normalised over the classes
        expected = [np.log(s / s.sum(0)).astype(np.float32) for s in scores]
    else:
        expected = [s.astype(np.float32) for s in scores]
    # labels: the processor's map with a third of the pixels replaced, some ignored
    labels = []
    for m in maps:
        t = np.where(rng.random(m.shape) < 0.3, rng.integers(0, N_CLASSES, m.shape), m)
        t[:2] = 255
        labels.append(t)
    data = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    got = bridge.extract_logits(model, processor, data, progress=False)
    return request.param, model, processor, images, labels, data, expected, maps, got


def test_logits_follow_the_processors_rule_and_argmax_is_its_map(case):
    kind, model, processor, images, labels, data, expected, maps, got = case
    assert isinstance(got.logits, list) and got.names == [0, 1, 2, 3]
    for z, e, t, m, seg in zip(got.logits, expected, got.labels, labels, maps):
        np.testing.assert_allclose(z, e, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(t, m)
        np.testing.assert_array_equal(z.argmax(0), seg)


def test_the_store_round_trips_and_a_calibrator_fitted_through_it_equals_arrays(case, tmp_path):
    kind, model, processor, images, labels, data, expected, maps, got = case
    store = bridge.extract_logits(
        model, processor, data, tmp_path / "s", groups=["a", "a", "b", "b"], progress=False
    )
    reopened = LogitStore.open(tmp_path / "s")
    assert reopened.n_classes == N_CLASSES and reopened.source["framework"] == "transformers"
    assert bridge.image_groups(store).tolist() == ["a", "a", "b", "b"]
    for i, m in enumerate(maps):
        image = reopened.load_image(i)
        np.testing.assert_array_equal(image.logits.argmax(0), m)  # float16: to the last pixel
        np.testing.assert_array_equal(image.labels, labels[i])
        # the stored logits are the float16 values of the arrays (ties excepted: one step)
        diff = np.abs(image.logits.astype(np.float32) - got.logits[i].astype(np.float16))
        assert (diff <= np.spacing(np.abs(got.logits[i]).astype(np.float16)) * 1.01).all()

    through = fit_store(TemperatureScaling(), store, images=None, max_pixels=10**6)
    assert 0.05 < through.temperature_ < 20
    stored = [store.load_image(i).logits.astype(np.float32) for i in range(4)]
    on_stored = TemperatureScaling().fit(*flatten_segmentation(stored, labels)[:2])
    on_expected = TemperatureScaling().fit(*flatten_segmentation(expected, labels)[:2])
    assert through.temperature_ == pytest.approx(on_stored.temperature_, rel=1e-5)
    assert through.temperature_ == pytest.approx(on_expected.temperature_, rel=1e-2)


def test_calibrated_inference_at_each_images_size(case):
    kind, model, processor, images, labels, data, expected, maps, got = case
    ts = TemperatureScaling().fit(*flatten_segmentation(expected, labels)[:2])
    proba = bridge.predict_proba(ts, model, processor, images)
    assert isinstance(proba, list)
    for p, z in zip(proba, expected):
        reference = ts.predict_proba(np.moveaxis(z, 0, -1).reshape(-1, N_CLASSES))
        reference = np.moveaxis(reference.reshape(*z.shape[1:], N_CLASSES), -1, 0)
        np.testing.assert_allclose(p, reference, rtol=1e-4, atol=1e-5)


def test_prepared_pixel_values_in_dict_batches(case):
    kind, model, processor, images, labels, data, expected, maps, got = case
    encoded = processor(images=images[:2], return_tensors="pt")
    batch = {**encoded, "labels": labels[:2], "names": ["x", "y"]}
    got = bridge.extract_logits(model, processor, [batch], progress=False)
    assert got.names == ["x", "y"]
    for z, e in zip(got.logits, expected[:2]):
        np.testing.assert_allclose(z, e, rtol=1e-5, atol=1e-5)


def test_keep_argmax_breaks_float16_ties_towards_the_models_class():
    from sksegcal.integrations._extract import keep_argmax

    # 1.0001 and 1.0 round to the same float16: the first class would win the tie
    z = torch.tensor([[1.0], [1.0001], [0.5]])
    out = keep_argmax(z, z.argmax(0), torch.float16)
    assert out.dtype == torch.float16 and out.argmax(0).item() == 1
    assert out[1, 0].item() == np.nextafter(np.float16(1.0), np.float16(2.0))
    assert out[0, 0].item() == 1.0 and out[2, 0].item() == 0.5
