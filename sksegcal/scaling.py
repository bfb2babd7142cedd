"""Temperature scaling and the paper's other baselines (re-exported from
:mod:`sksegcal.calibrators`, where they live)."""

from .calibrators._affine import DirichletScaling, VectorScaling
from .calibrators._metacal import MetaCalScaling
from .calibrators._scaling import EnsembleTemperatureScaling, TemperatureScaling

__all__ = [
    "DirichletScaling",
    "EnsembleTemperatureScaling",
    "MetaCalScaling",
    "TemperatureScaling",
    "VectorScaling",
]
