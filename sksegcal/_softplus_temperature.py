"""The softplus temperature fit (re-exported from :mod:`sksegcal.calibrators._solver`)."""

from .calibrators._solver import (  # noqa: F401
    SoftplusTemperatureFit,
    fit_softplus_temperature,
    sigmoid,
    softplus,
    softplus_inverse,
    softplus_nll,
    standardisation,
)
