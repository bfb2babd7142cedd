"""Calibrate the per-pixel probabilities of semantic segmentation models.

The estimators follow scikit-learn's API: ``fit(X, y)`` on a pixel table of
logits ``X`` (n_pixels, n_classes) and labels ``y`` (n_pixels,), then
``predict_proba``. Heavy submodules are imported on first use so that
``import sksegcal`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0.dev0"

# public name -> submodule that defines it; resolved lazily by __getattr__
_LAZY = {
    "SelectiveScalingCalibrator": "selective",
    "CalibratorSearchCV": "calibrators._search",
    "TemperatureScaling": "scaling",
    "VectorScaling": "scaling",
    "DirichletScaling": "scaling",
    "EnsembleTemperatureScaling": "scaling",
    "MetaCalScaling": "scaling",
    "LocalTemperatureScaling": "local_scaling",
    "LogitStore": "store",
    "TorchMLPClassifier": "mlp",
    "flatten_segmentation": "pixels",
    "unflatten_segmentation": "pixels",
}
_SUBMODULES = {
    "context",
    "datasets",
    "features",
    "integrations",
    "metrics",
    "mlp",
    "persistence",
    "pixels",
    "plotting",
    "scaling",
    "selective",
    "store",
}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES) + ["__version__"]

def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sksegcal' has no attribute {name!r}")


def __dir__():
    return __all__
