"""The calibrators: one family of temperature models, the baselines built from them,
cross-fitting, the guard against temperature scaling and model selection.

Public names are re-exported from :mod:`sksegcal` (and the historical modules
:mod:`sksegcal.selective`, :mod:`sksegcal.scaling`, :mod:`sksegcal.local_scaling`).
"""
