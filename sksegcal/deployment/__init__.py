"""Fitted calibrators as torch modules: on any device, in TorchScript and ONNX.

``calibrator.to_torch()`` (or :func:`to_torch`) turns a fitted calibrator into
an :class:`~torch.nn.Module` from logits ``(N, C, *spatial)`` to the
probabilities its ``predict_proba`` gives; :class:`CalibratedSegmenter` puts
one behind a segmentation network; :func:`export_onnx` and
:func:`script_module` export either.
"""

from ._convert import to_torch
from ._detectors import (
    SUPPORTED_DETECTORS,
    ConstantDetector,
    LogisticDetector,
    MLPDetector,
    detector_module,
)
from ._export import export_onnx, onnx_predict, script_module
from ._functional import agnostic_features, spatial_context
from ._modules import (
    CalibratorModule,
    DirichletScalingModule,
    EnsembleTemperatureScalingModule,
    LocalTemperatureScalingModule,
    MetaCalModule,
    SelectiveScalingModule,
    SpatialContext,
    TemperatureScalingModule,
    VectorScalingModule,
)
from ._segmenter import CalibratedSegmenter

__all__ = [
    "SUPPORTED_DETECTORS",
    "CalibratedSegmenter",
    "CalibratorModule",
    "ConstantDetector",
    "DirichletScalingModule",
    "EnsembleTemperatureScalingModule",
    "LocalTemperatureScalingModule",
    "LogisticDetector",
    "MLPDetector",
    "MetaCalModule",
    "SelectiveScalingModule",
    "SpatialContext",
    "TemperatureScalingModule",
    "VectorScalingModule",
    "agnostic_features",
    "detector_module",
    "export_onnx",
    "onnx_predict",
    "script_module",
    "spatial_context",
    "to_torch",
]
