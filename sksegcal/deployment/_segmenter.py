"""A segmentation network and a calibrator in one module: images in, calibrated maps out."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CalibratedSegmenter"]


@torch.jit.unused
def segmenter_logits(output) -> Tensor:
    """The logit map in a segmentation network's output.

    A tensor as it is; a mapping's ``"logits"`` (transformers) or ``"out"``
    (torchvision) entry; an object's ``.logits`` attribute (a transformers
    ``ModelOutput``); the first element of a tuple or list (transformers models
    built with ``torchscript=True``).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "out"):
            if key in output:
                return output[key]
        raise TypeError(
            f"the segmenter returned a mapping with keys {list(output)}; expected 'logits' or "
            "'out' holding the logit map"
        )
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find the logit map in a {type(output).__name__}; make the segmenter return "
        "a tensor (N, C, *spatial)"
    )


class CalibratedSegmenter(nn.Module):
    """``forward(images)``: the segmenter's logits, resized to the input, then calibrated.

    Parameters
    ----------
    segmenter : nn.Module
        Any segmentation network: it may return a tensor, a mapping with
        ``"logits"`` or ``"out"``, or an object with ``.logits``.
    calibrator : fitted calibrator or nn.Module
        A fitted calibrator of this package (its ``to_torch()`` module is
        used) or a calibrator module.
    resize : bool, default=True
        Resize logits whose spatial size differs from the images' to it, as the
        transformers bridge does (bilinear, trilinear for volumes,
        ``align_corners=False``) before calibrating: calibrators are fitted on
        logits at the labels' size.
    log : bool, default=False
        Return log-probabilities instead of probabilities.

    Examples
    --------
    >>> import torch
    >>> from sksegcal.deployment import CalibratedSegmenter, TemperatureScalingModule
    >>> net = torch.nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)
    >>> model = CalibratedSegmenter(net, TemperatureScalingModule(2.0)).eval()
    >>> model(torch.zeros(1, 3, 8, 8)).shape
    torch.Size([1, 4, 8, 8])
    """

    def __init__(
        self, segmenter: nn.Module, calibrator, *, resize: bool = True, log: bool = False
    ):
        super().__init__()
        if not isinstance(calibrator, nn.Module):
            from ._convert import to_torch

            calibrator = to_torch(calibrator)
        self.segmenter = segmenter
        self.calibrator = calibrator
        self.resize = bool(resize)
        self.log = bool(log)

    def forward(self, images: Tensor) -> Tensor:
        output = self.segmenter(images)
        if torch.jit.is_scripting():
            # a scripted segmenter returns its logit map (script the network so that it does)
            logits = output
        else:
            logits = segmenter_logits(output)
        size = images.shape[2:]
        if self.resize and logits.shape[2:] != size:
            if len(size) == 1:
                mode = "linear"
            elif len(size) == 2:
                mode = "bilinear"
            elif len(size) == 3:
                mode = "trilinear"
            else:
                raise ValueError("logits with more than 3 spatial axes cannot be resized")
            logits = F.interpolate(logits, size=size, mode=mode, align_corners=False)
        if self.log:
            return self.calibrator.log_proba(logits)
        return self.calibrator(logits)
