"""The calibrators' base and solver (re-exported from :mod:`sksegcal.calibrators`)."""

from .calibrators._base import (  # noqa: F401
    LOG_PROBA_FLOOR,
    BaseLogitCalibrator,
    _library_versions,
    make_top_strict,
    scale_logits,
)
from .calibrators._solver import (  # noqa: F401
    TEMPERATURE_RTOL,
    TemperatureFit,
    fit_inverse_temperatures,
    fit_temperature,
    iter_chunks,
    nll_at_inverse_temperature,
    nll_derivatives,
    warn_fit,
)
