"""The calibrators: one family of temperature models, the baselines built from them,
cross-fitting, the guard against temperature scaling and model selection.

Layout: ``_solver`` (the streamed NLL with its derivatives, the bounded Newton
and the softplus fit), ``_models`` (one object per temperature model: global,
two temperatures hard or soft, softplus-linear), ``_base`` (the abstract
estimator base every calibrator uses), then one module per calibrator.

Public names are re-exported from :mod:`sksegcal` (and the historical modules
:mod:`sksegcal.selective`, :mod:`sksegcal.scaling`, :mod:`sksegcal.local_scaling`).
"""

from ._affine import DirichletScaling, VectorScaling
from ._base import BaseLogitCalibrator
from ._local import LocalTemperatureScaling
from ._metacal import MetaCalScaling
from ._models import GlobalTemperature, SoftplusTemperature, TwoTemperatures
from ._scaling import EnsembleTemperatureScaling, TemperatureScaling
from ._selective import SelectiveScalingCalibrator, default_detector

__all__ = [
    "BaseLogitCalibrator",
    "DirichletScaling",
    "EnsembleTemperatureScaling",
    "GlobalTemperature",
    "LocalTemperatureScaling",
    "MetaCalScaling",
    "SelectiveScalingCalibrator",
    "SoftplusTemperature",
    "TemperatureScaling",
    "TwoTemperatures",
    "VectorScaling",
    "default_detector",
]
