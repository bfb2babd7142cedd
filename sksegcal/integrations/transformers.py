"""Hugging Face transformers segmenters: logits as their image processor post-processes them.

Needs the ``transformers`` extra (``pip install "sksegcal[transformers]"``).

Two kinds of model, one rule each, both taken from the image processor's own
``post_process_semantic_segmentation(outputs, target_sizes,
return_segmentation_scores=True)`` so that the stored argmax is the
processor's segmentation map, pixel for pixel:

* **per-pixel models** (SegFormer, UperNet, DPT, BEiT, MobileViT, ...): the
  processor's scores are the model's logits resized bilinearly
  (``align_corners=False``) to the target size; they are stored as they are.
* **mask-classification models** (Mask2Former, MaskFormer, OneFormer): the
  processor's per-pixel class scores are ``sum_q p_q(c) * sigmoid(m_q(x))``,
  each query's class probabilities without the null class times its mask
  probability. They are non-negative but do not sum to one over the classes,
  and are not a softmax of anything. They are stored as the logits
  ``log(s_c / sum_k s_k)``, so that the softmax of the stored logits is the
  normalised score ``s_c / sum_k s_k`` and the argmax is the processor's.
  Calibrating these logits calibrates the normalised scores: a calibrator
  learns the map from them to the frequency of being right, exactly as for a
  per-pixel model (temperature scaling then raises the normalised scores to
  the power ``1/T`` and renormalises).

Where two classes' scores differ by less than the stored precision (float16
in a store), the winner's value is raised by one unit in the last place so
that the stored argmax stays the processor's.

:func:`extract_logits` writes a :class:`~sksegcal.store.LogitStore` (or
returns arrays); :func:`predict_proba` gives calibrated probability maps at
the images' own size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._extract import ExtractedLogits, eval_mode, extract, image_groups, keep_argmax

__all__ = [
    "ExtractedLogits",
    "extract_logits",
    "image_groups",
    "is_mask_classification",
    "predict_proba",
    "segmentation_logits",
]

_IMAGE_KEYS = ("pixel_values", "images", "image")


def is_mask_classification(outputs) -> bool:
    """Whether a model output is a mask-classification one (query classes and masks)."""
    return (
        getattr(outputs, "class_queries_logits", None) is not None
        and getattr(outputs, "masks_queries_logits", None) is not None
    )


def _processor_scores(processor, outputs, target_sizes) -> list[torch.Tensor]:
    """The processor's own per-image class scores at ``target_sizes``."""
    try:
        results = processor.post_process_semantic_segmentation(
            outputs, target_sizes=target_sizes, return_segmentation_scores=True
        )
    except TypeError as exc:
        if "return_segmentation_scores" not in str(exc):
            raise
        return _scores_by_hand(processor, outputs, target_sizes)
    return [r["segmentation_scores"] for r in results]


def _scores_by_hand(processor, outputs, target_sizes) -> list[torch.Tensor]:
    """The same scores for processors that cannot return them: their rule, checked."""
    if is_mask_classification(outputs):
        masks = F.interpolate(
            outputs.masks_queries_logits, size=(384, 384), mode="bilinear", align_corners=False
        )
        classes = outputs.class_queries_logits.softmax(dim=-1)[..., :-1]
        scores = torch.einsum("bqc, bqhw -> bchw", classes, masks.sigmoid())
    else:
        scores = outputs.logits
    out = [
        F.interpolate(s[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
        for s, size in zip(scores, target_sizes)
    ]
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    for s, m in zip(out, maps):
        if not torch.equal(s.argmax(0), m.to(s.device)):
            raise ValueError(
                f"{type(processor).__name__} post-processes differently from the rule of "
                "this module; upgrade transformers (processors that return "
                "segmentation scores) to extract from this model."
            )
    return out


def segmentation_logits(processor, outputs, target_sizes: Sequence[Sequence[int]]):
    """Per-image float32 logits ``(C, H, W)`` at ``target_sizes``, by the module's rule.

    Per-pixel models: the processor's resized logits. Mask-classification
    models: ``log`` of the processor's class scores normalised to sum to one
    over the classes. Either way ``argmax`` equals the map of
    ``processor.post_process_semantic_segmentation(outputs, target_sizes)``.

    Returns
    -------
    list of tensors of shape (C, H_i, W_i)
    """
    target_sizes = [tuple(int(s) for s in size) for size in target_sizes]
    scores = _processor_scores(processor, outputs, target_sizes)
    if not is_mask_classification(outputs):
        return [s.float() for s in scores]
    out = []
    tiny = torch.finfo(torch.float32).tiny
    for s in scores:
        s = s.double()
        # float64 so that the normalisation and the log lose nothing before the cast
        z = (s.clamp_min(tiny).log() - s.sum(0, keepdim=True).clamp_min(tiny).log()).float()
        out.append(keep_argmax(z, s.argmax(0), torch.float32))
    return out


def _device_of(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _model_inputs(processor, inputs, device, processor_kwargs):
    """The model's keyword arguments: processed tensors, on ``device``."""
    if isinstance(inputs, Mapping) and "pixel_values" in inputs:
        encoded = inputs
    else:
        images = inputs
        if isinstance(inputs, Mapping):
            images = inputs.get("images", inputs.get("image"))
        encoded = processor(images=list(images), return_tensors="pt", **processor_kwargs)
    return {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v)
        for k, v in encoded.items()
        if k not in ("mask_labels", "class_labels", "labels")
    }


def _forward(model, processor, inputs, sizes, device, processor_kwargs):
    kwargs = _model_inputs(processor, inputs, device, processor_kwargs)
    with torch.inference_mode():
        outputs = model(**kwargs)
        return segmentation_logits(processor, outputs, sizes)


def extract_logits(
    model,
    processor,
    data: Iterable,
    store_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    ignore_index: int = 255,
    names: Sequence[int | str] | None = None,
    groups: Mapping | Sequence | Callable | None = None,
    processor_kwargs: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    progress: bool = True,
):
    """Run a transformers segmenter over a data set and keep every image's logits and labels.

    The logits of each image are those of :func:`segmentation_logits` at the
    size of its label map; their argmax is the map of
    ``processor.post_process_semantic_segmentation(outputs, target_sizes)``.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A semantic-segmentation or universal-segmentation model (eval mode is
        set for the run, then restored).
    processor : image processor (or OneFormer processor)
        The model's processor: it prepares raw images and post-processes.
    data : iterable of batches
        Each batch is ``(images, labels)`` with raw images (a list of PIL
        images or arrays, prepared by ``processor``) or a dict holding
        ``pixel_values`` (already prepared; other tensors such as
        ``pixel_mask`` or ``task_inputs`` go to the model too) and
        ``labels``; optionally ``names`` and ``groups``. Labels are the
        full-size maps (a list, or an array when they share a size); their
        sizes are the post-processing's ``target_sizes``. A
        ``torch.utils.data.DataLoader`` with ``collate_fn=lambda b:
        tuple(zip(*b))`` gives such batches from an ``(image, label)``
        data set.
    store_path : str or path-like, optional
        A :class:`~sksegcal.store.LogitStore` directory (resumed if it exists);
        None returns arrays.
    device : str or torch.device, optional
        Default: the model's device.
    ignore_index : int, default=255
    names, groups
        As for :func:`sksegcal.integrations.torch.extract_logits`.
    processor_kwargs : mapping, optional
        Extra arguments to ``processor(images=..., ...)`` (e.g.
        ``task_inputs=["semantic"] * n`` is needed by OneFormer).
    source : mapping, optional
        More facts to record in the store (e.g. the checkpoint name).
    progress : bool, default=True

    Returns
    -------
    LogitStore or ExtractedLogits
    """
    device_ = _device_of(model, device)
    kwargs = dict(processor_kwargs or {})
    id2label = getattr(getattr(model, "config", None), "id2label", None) or None
    class_names = None
    if id2label:
        class_names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    user_source = dict(source or {})
    info = {
        "framework": "transformers",
        "model": type(model).__name__,
        "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", "") or "",
        "processor": type(processor).__name__,
        "ignore_index": ignore_index,
        **user_source,
    }
    with eval_mode(model):
        return extract(
            data,
            lambda inputs, shapes: _forward(model, processor, inputs, shapes, device_, kwargs),
            store_path=store_path,
            ignore_index=ignore_index,
            names=names,
            groups=groups,
            source=info,
            match_source=("model", "name_or_path", *user_source),
            class_names=class_names,
            progress=progress,
            image_keys=_IMAGE_KEYS,
        )


def _image_size(image) -> tuple[int, int]:
    """(height, width) of a raw image: PIL, (H, W[, 3|4]) array, or (C, H, W) tensor."""
    if hasattr(image, "size") and not hasattr(image, "shape"):
        width, height = image.size  # PIL
        return int(height), int(width)
    shape = tuple(image.shape)
    if isinstance(image, torch.Tensor) or (len(shape) == 3 and shape[0] in (1, 3, 4)):
        return int(shape[-2]), int(shape[-1])
    return int(shape[0]), int(shape[1])


def predict_proba(
    calibrator,
    model,
    processor,
    images,
    *,
    target_sizes: Sequence[Sequence[int]] | None = None,
    device: str | torch.device | None = None,
    processor_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Calibrated probability maps of raw images, at each image's own size.

    The logits of :func:`segmentation_logits` (the rule the calibrator was
    fitted on through :func:`extract_logits`) go through
    ``calibrator.predict_proba`` image by image
    (:func:`sksegcal.pixels.predict_proba_maps`).

    Parameters
    ----------
    calibrator : fitted calibrator
    model, processor
        As for :func:`extract_logits`.
    images : list of raw images, or a dict with ``pixel_values``
        With prepared ``pixel_values``, ``target_sizes`` is required.
    target_sizes : sequence of (height, width), optional
        Default: each raw image's size.

    Returns
    -------
    ndarray of shape (N, C, H, W) when the sizes agree, else a list of (C, H_i, W_i)
    """
    from ..pixels import predict_proba_maps

    if target_sizes is None:
        if isinstance(images, Mapping):
            raise ValueError("Pass target_sizes with prepared pixel_values.")
        target_sizes = [_image_size(im) for im in images]
    device_ = _device_of(model, device)
    with eval_mode(model):
        logits = _forward(
            model, processor, images, target_sizes, device_, dict(processor_kwargs or {})
        )
    maps = [predict_proba_maps(calibrator, z[None].cpu().numpy())[0] for z in logits]
    if len({m.shape for m in maps}) == 1:
        return np.stack(maps)
    return maps
