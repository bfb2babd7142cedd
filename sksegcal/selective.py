"""Selective scaling (re-exported from :mod:`sksegcal.calibrators`, where it lives)."""

from .calibrators._selective import (  # noqa: F401
    GENERALISED_INPUTS,
    UNIFORM_TEMPERATURE,
    SelectiveScalingCalibrator,
    _ConstantCorrectness,
    _guard_keeps,
    _guard_t_statistic,
    default_detector,
)

__all__ = ["SelectiveScalingCalibrator", "default_detector"]
