"""Any torch segmenter: logit extraction into a store or arrays, and calibrated inference.

Works with every ``nn.Module`` or callable that maps a batch of images to
``(N, C, *spatial)`` logits, 2-D or 3-D: segmentation_models_pytorch models,
MONAI networks, a torchvision segmentation model (its dict's ``"out"``), a
Hugging Face model's output (``.logits``) or your own module. Nothing here
imports torchvision or any model library.

* :func:`extract_logits`: run the model over a DataLoader (or any iterable of
  ``(images, labels)`` batches or dicts) and write each image's logits, resized
  to its label map's size, with the labels into a
  :class:`~sksegcal.store.LogitStore` (resumable) or return them as arrays.
* :func:`predict_proba`: calibrated probability maps at the input's size
  from a fitted calibrator.
* :func:`resize_logits`: the resizing rule both use; :func:`logits_of`: how
  the logits are found in a model's output.

The resizing rule (``resize="linear"``, the default): logits whose spatial
size differs from the labels' are interpolated to it, bilinearly for 2-D and
trilinearly for 3-D, with ``align_corners=False``, in float32, the way
segmentation frameworks post-process (transformers' image processors,
mmsegmentation's ``resize``). ``"nearest"`` uses ``nearest-exact``; None
refuses logits of another size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._extract import IMAGE_KEYS, ExtractedLogits, _first, eval_mode, extract, image_groups

__all__ = [
    "ExtractedLogits",
    "extract_logits",
    "image_groups",
    "logits_of",
    "predict_proba",
    "resize_logits",
]

_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def logits_of(outputs: Any, output_key: str | Callable | None = None) -> torch.Tensor:
    """The ``(N, C, *spatial)`` logits in a model's output.

    Parameters
    ----------
    outputs : tensor, dict, ModelOutput or tuple
        What the model returned.
    output_key : str or callable, optional
        A key (or attribute) to take, or a function of ``outputs`` returning
        the logits. Default: the tensor itself; else ``outputs["logits"]`` or
        ``outputs.logits``; else ``outputs["out"]`` (torchvision); else the
        first element of a tuple or list.
    """
    if callable(output_key):
        found = output_key(outputs)
    elif output_key is not None:
        if isinstance(outputs, Mapping) and output_key in outputs:
            found = outputs[output_key]
        elif hasattr(outputs, output_key):
            found = getattr(outputs, output_key)
        else:
            raise ValueError(f"The model's output has no {output_key!r}.")
    elif isinstance(outputs, torch.Tensor):
        found = outputs
    elif isinstance(outputs, Mapping) and ("logits" in outputs or "out" in outputs):
        found = outputs["logits"] if "logits" in outputs else outputs["out"]
    elif getattr(outputs, "logits", None) is not None:
        found = outputs.logits
    elif isinstance(outputs, (tuple, list)) and outputs:
        found = outputs[0]
    else:
        raise TypeError(
            f"Cannot find the logits in a model output of type {type(outputs).__name__}; "
            "pass output_key='name' or output_key=callable(outputs) -> tensor."
        )
    if not isinstance(found, torch.Tensor) or found.ndim < 3:
        raise ValueError(
            "The model's logits must be a tensor of shape (N, C, *spatial); got "
            f"{type(found).__name__} {tuple(getattr(found, 'shape', ()))}."
        )
    return found


def resize_logits(
    logits: torch.Tensor, size: Sequence[int], resize: str | None = "linear"
) -> torch.Tensor:
    """Logits ``(N, C, *spatial)`` at ``size``, by the module's stated rule.

    ``"linear"``: bilinear (2-D) or trilinear (3-D), ``align_corners=False``;
    ``"nearest"``: ``nearest-exact``; None: no resizing (a size mismatch is an
    error). The result is float32; logits already at ``size`` pass unchanged.
    """
    size = tuple(int(s) for s in size)
    logits = logits.float()
    if tuple(logits.shape[2:]) == size:
        return logits
    if len(size) != logits.ndim - 2:
        raise ValueError(
            f"Logits of shape {tuple(logits.shape)} have {logits.ndim - 2} spatial axes but "
            f"the labels {len(size)} ({size})."
        )
    if resize is None:
        raise ValueError(
            f"The model's logits have spatial size {tuple(logits.shape[2:])} but the labels "
            f"{size}; pass resize='linear' (or 'nearest') to resize them."
        )
    if resize == "linear":
        return F.interpolate(logits, size=size, mode=_LINEAR_MODES[len(size)], align_corners=False)
    if resize == "nearest":
        return F.interpolate(logits, size=size, mode="nearest-exact")
    raise ValueError(f"resize must be 'linear', 'nearest' or None; got {resize!r}.")


def _device_of(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cpu")


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).to(device)
    return x


def _image_batches(images):
    """Same-size groups of images: [(positions, (n, ...) tensor)]."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return [(list(range(len(images))), images)]
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return [
        (idx, torch.stack([torch.as_tensor(images[i]) for i in idx])) for idx in groups.values()
    ]


def _run(model, images, device, output_key):
    """The raw logits of ``images`` (a stacked batch or a list), per image."""
    out: list = [None] * len(images)
    with torch.inference_mode():
        for idx, batch in _image_batches(images):
            logits = logits_of(model(_to_device(batch, device)), output_key)
            if logits.shape[0] != len(idx):
                raise ValueError(
                    f"The model returned {logits.shape[0]} logit maps for {len(idx)} images."
                )
            for k, i in enumerate(idx):
                out[i] = logits[k : k + 1]
    return out


def extract_logits(
    model: torch.nn.Module | Callable,
    data: Iterable,
    store_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    resize: str | None = "linear",
    output_key: str | Callable | None = None,
    ignore_index: int = 255,
    names: Sequence[int | str] | None = None,
    groups: Mapping | Sequence | Callable | None = None,
    class_names: Sequence[str] | None = None,
    source: Mapping[str, Any] | None = None,
    progress: bool = True,
):
    """Run a torch segmenter over a data set and keep every image's logits with its labels.

    Each image's logits are resized to its label map's size by ``resize``
    (see :func:`resize_logits`) and stored as float32 (arrays) or float16 (a
    store). The model runs on its own device (``device`` overrides: the
    images are moved there), in eval mode, under ``torch.inference_mode``, one
    batch of ``data`` per forward pass; the model's training mode is restored
    afterwards.

    Parameters
    ----------
    model : nn.Module or callable
        Maps an ``(N, C_in, *spatial)`` batch to logits ``(N, C, *spatial')``,
        a dict or a ``ModelOutput`` holding them (see :func:`logits_of`).
    data : DataLoader or iterable of batches
        Each batch is ``(images, labels)`` (optionally ``(images, labels,
        names, groups)``) or a dict with the images under ``"image"`` /
        ``"images"`` / ``"pixel_values"`` / ``"img"`` / ``"inputs"``, the labels
        under ``"label"`` / ``"labels"`` / ``"mask"`` / ``"masks"`` (and
        optionally ``"name(s)"``, ``"group(s)"``). ``images``: a tensor
        ``(N, C_in, *spatial)`` or a list of ``(C_in, *spatial)`` tensors (of
        different sizes: forwarded one size at a time). ``labels``: ``(N,
        *spatial)`` (a ``(N, 1, *spatial)`` channel axis is dropped) or a list;
        each label map sets its image's output size. Keep the order fixed
        (``shuffle=False``) when images are named by position.
    store_path : str or path-like, optional
        Directory of a :class:`~sksegcal.store.LogitStore` to write (created,
        or resumed: images it already holds are not run again). None returns
        arrays instead.
    device : str or torch.device, optional
        Where to run; default the device of the model's parameters (CPU for a
        callable without any).
    resize : {"linear", "nearest"} or None, default="linear"
        The rule of :func:`resize_logits`.
    output_key : str or callable, optional
        Where the logits are in the model's output (:func:`logits_of`).
    ignore_index : int, default=255
        Label of unlabelled pixels.
    names : sequence of int or str, optional
        Image names, in data order; default: names in the batches, else the
        position 0, 1, ... in ``data``.
    groups : mapping, sequence or callable, optional
        The group (patient, video, ...) of each image: a mapping name ->
        group, a sequence in data order, or a function of the name; groups in
        the batches take precedence. Recorded in the store (read back with
        :func:`image_groups`) or returned with the arrays.
    class_names : sequence of str, optional
    source : mapping, optional
        More JSON-serialisable facts to record in the store's manifest (e.g.
        the checkpoint); a resume must match every key given.
    progress : bool, default=True
        Show a progress bar (tqdm when installed).

    Returns
    -------
    LogitStore or ExtractedLogits
        The store (with ``store_path``), else ``(logits, labels, names,
        groups)`` with stacked arrays when all images have one size.

    Examples
    --------
    >>> import torch
    >>> from sksegcal.integrations.torch import extract_logits
    >>> model = torch.nn.Conv2d(3, 4, 1)
    >>> data = [(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))]
    >>> out = extract_logits(model, data, progress=False)
    >>> out.logits.shape, out.labels.shape, out.names
    ((2, 4, 8, 8), (2, 8, 8), [0, 1])
    """
    if resize not in ("linear", "nearest", None):
        raise ValueError(f"resize must be 'linear', 'nearest' or None; got {resize!r}.")
    device_ = _device_of(model, device)

    def forward(inputs, shapes):
        if isinstance(inputs, Mapping):
            inputs = _first(inputs, IMAGE_KEYS, "images")
        raw = _run(model, inputs, device_, output_key)
        return [resize_logits(z, shape, resize)[0] for z, shape in zip(raw, shapes)]

    user_source = dict(source or {})
    info = {
        "framework": "torch",
        "torch_version": torch.__version__,
        "model": type(model).__name__,
        "resize": resize,
        "ignore_index": ignore_index,
        **user_source,
    }
    with eval_mode(model):
        return extract(
            data,
            forward,
            store_path=store_path,
            ignore_index=ignore_index,
            names=names,
            groups=groups,
            source=info,
            match_source=("model", "resize", *user_source),
            class_names=class_names,
            progress=progress,
        )


def predict_proba(
    calibrator,
    model: torch.nn.Module | Callable,
    images,
    *,
    size: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    resize: str | None = "linear",
    output_key: str | Callable | None = None,
) -> np.ndarray:
    """Calibrated probability maps of a batch of images at the input's size.

    The model's logits, resized by :func:`resize_logits` to ``size`` (default:
    the images' own spatial size), go through ``calibrator.predict_proba``
    image by image (:func:`sksegcal.pixels.predict_proba_maps`, which also
    builds the spatial context for calibrators that read it).

    Parameters
    ----------
    calibrator : fitted calibrator
        Fitted on logits of this model (e.g. through :func:`extract_logits`).
    model : nn.Module or callable
    images : tensor of shape (N, C_in, H, W) or (N, C_in, D, H, W)
    size : sequence of int, optional
        Output spatial size; default the images' spatial size.
    device, resize, output_key
        As for :func:`extract_logits`.

    Returns
    -------
    ndarray of shape (N, C, *size), float32
    """
    from ..pixels import predict_proba_maps

    device_ = _device_of(model, device)
    images = torch.as_tensor(images)
    size = tuple(images.shape[2:]) if size is None else tuple(size)
    with eval_mode(model), torch.inference_mode():
        logits = logits_of(model(images.to(device_)), output_key)
        logits = resize_logits(logits, size, resize)
    return predict_proba_maps(calibrator, logits.cpu().numpy())
