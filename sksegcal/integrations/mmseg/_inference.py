"""Calibrated inference: a segmentor whose ``seg_logits`` are calibrated probabilities.

:func:`calibrate_model` patches a model's ``postprocess_result`` (an
instance attribute shadowing the class's method), :func:`uncalibrate_model`
removes the patch, :func:`is_calibrated` tells whether a model carries it.
Imports :mod:`._common`, :mod:`._loading` and :mod:`._calibrators`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...context import iter_image_rows
from ._calibrators import check_calibrator_classes, load_calibrator
from ._common import CHUNK_PIXELS, PROBA_FLAG
from ._loading import n_classes

if TYPE_CHECKING:
    from mmseg.models import BaseSegmentor

__all__ = ["calibrate_model", "is_calibrated", "proba_map", "uncalibrate_model"]


def proba_map(calibrator, logits, chunk_pixels: int, context: str | None = None):
    """Calibrated probabilities (C, H, W) of one image's logits (C, H, W), as a tensor.

    With ``context="spatial"`` each row of logits is followed by its pixel's
    context columns, computed on the whole image (the rows of
    ``flatten_segmentation(..., context="spatial", ignore_index=None)``).
    """
    c, h, w = logits.shape
    out = np.empty((h, w, c), dtype=np.float32)
    for rows, X in iter_image_rows(logits, context, chunk_pixels=chunk_pixels):
        out[rows] = calibrator.predict_proba(X).reshape(-1, w, c)
    proba = torch.from_numpy(out).permute(2, 0, 1).contiguous()
    return proba.to(device=logits.device)


class _CalibratedPostprocess:
    """``postprocess_result`` of a calibrated model (an instance attribute).

    It holds the model (not a bound method) so that ``copy.deepcopy`` and
    pickling of the model carry a working calibrated model along.
    """

    def __init__(
        self, model, calibrator, keep_logits: bool, chunk_pixels: int, context: str | None = None
    ):
        self.model = model
        self.calibrator = calibrator
        self.keep_logits = keep_logits
        self.chunk_pixels = chunk_pixels
        self.context = context

    def __call__(self, seg_logits, data_samples=None):
        from mmengine.structures import PixelData

        samples = type(self.model).postprocess_result(self.model, seg_logits, data_samples)
        for sample in samples:
            logits = sample.seg_logits.data
            # models patched before the context existed have no attribute for it
            context = getattr(self, "context", None)
            proba = proba_map(self.calibrator, logits, self.chunk_pixels, context)
            if self.keep_logits:
                sample.set_data({"seg_logits_uncalibrated": PixelData(data=logits)})
            # pred_sem_seg was computed from the logits above and is left as it is
            sample.set_data({"seg_logits": PixelData(data=proba)})
            sample.set_metainfo({PROBA_FLAG: True})
        return samples


def calibrate_model(
    model: BaseSegmentor,
    calibrator: Any,
    *,
    keep_logits: bool = False,
    chunk_pixels: int = CHUNK_PIXELS,
    trusted: bool | Iterable[str] | None = None,
) -> BaseSegmentor:
    """Make a segmentor's ``seg_logits`` calibrated probabilities (in place).

    After this, everything that goes through the model's
    ``postprocess_result`` (``mmseg.apis.inference_model``,
    ``model.test_step``, mmseg's test loop when ``runner.model`` is
    calibrated before ``runner.test()``) returns data samples whose

    * ``seg_logits.data`` holds ``calibrator.predict_proba`` of the model's
      logits, reshaped to (C, H, W) (probabilities, not logits);
    * ``pred_sem_seg`` is the model's own argmax, unchanged (selective and
      temperature scaling never change it; a calibrator that can, such as
      vector scaling, does not change it here either);
    * metainfo ``seg_logits_are_probabilities`` is True (read by
      :class:`CalibrationMetric`);
    * ``seg_logits_uncalibrated`` holds the logits if ``keep_logits``.

    The model is patched, not wrapped: it keeps its class, weights and
    device, so every mmseg tool that takes a segmentor takes it.
    :func:`uncalibrate_model` removes the patch; calling this again replaces
    the calibrator.

    Parameters
    ----------
    model : mmseg.models.BaseSegmentor
    calibrator : estimator, str or path-like
        A fitted sksegcal calibrator (anything with ``predict_proba`` on
        (n_pixels, n_classes) float32 logits), or the path of one saved with
        :func:`sksegcal.persistence.save`, loaded by
        :func:`sksegcal.persistence.load` with ``trusted``. One that reads
        the spatial context (``SelectiveScalingCalibrator(context="spatial")``,
        ``LocalTemperatureScaling()``, or a pipeline or search ending in one)
        gets each pixel's context columns after its logits, computed per
        image from ``seg_logits`` as
        ``flatten_segmentation(..., context="spatial")`` computes them.
    keep_logits : bool, default=False
        Also keep the raw logits in ``seg_logits_uncalibrated``.
    chunk_pixels : int, default=262144
        Pixels passed to ``predict_proba`` at once (bounds the memory).
    trusted : None, True or iterable of str, default=None
        For a path only, what you vouch for (as in
        :func:`sksegcal.persistence.load`): ``None`` loads a skops file
        safely and refuses a joblib/pickle file, since unpickling runs any
        code the file holds; ``True`` opens a pickle you made or trust; an
        iterable names extra types a skops file may hold.

    Returns
    -------
    model : the same model object, calibrated.

    Raises
    ------
    ValueError
        If ``calibrator`` is the path of a pickle and ``trusted`` is not
        True, the calibrator's class count is not the model's, or it reads a
        context of the user's own (``LocalTemperatureScaling(n_context=3)``).

    Examples
    --------
    >>> from mmseg.apis import inference_model  # doctest: +SKIP
    >>> model = calibrate_model(load_model(cfg, ckpt), "calibrator.skops")  # doctest: +SKIP
    >>> result = inference_model(model, "image.png")  # doctest: +SKIP
    >>> proba = result.seg_logits.data  # (C, H, W), sums to 1 over C  # doctest: +SKIP
    """
    if not hasattr(type(model), "postprocess_result"):
        raise TypeError(
            f"{type(model).__name__} has no postprocess_result; calibrate_model takes an mmseg "
            "segmentor (BaseSegmentor subclass such as EncoderDecoder)."
        )
    calibrator = load_calibrator(calibrator, trusted)
    context = check_calibrator_classes(calibrator, n_classes(model))
    if not isinstance(chunk_pixels, numbers.Integral) or chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be a positive integer; got {chunk_pixels!r}.")
    # an instance attribute shadows the class's method; deleting it restores the original
    model.postprocess_result = _CalibratedPostprocess(
        model, calibrator, bool(keep_logits), int(chunk_pixels), context
    )
    return model


def uncalibrate_model(model: BaseSegmentor) -> BaseSegmentor:
    """Undo :func:`calibrate_model`; returns the model."""
    if is_calibrated(model):
        del model.postprocess_result
    return model


def is_calibrated(model) -> bool:
    """Whether :func:`calibrate_model` patched ``model`` (and it was not undone)."""
    return isinstance(
        getattr(model, "__dict__", {}).get("postprocess_result"), _CalibratedPostprocess
    )
