"""Local temperature scaling (re-exported from :mod:`sksegcal.calibrators`, where it lives)."""

from .calibrators._local import LocalTemperatureScaling

__all__ = ["LocalTemperatureScaling"]
