"""Calibrate the per-pixel probabilities of semantic segmentation models.

The estimators follow scikit-learn's API: ``fit(X, y)`` on a pixel table of
logits ``X`` (n_pixels, n_classes) and labels ``y`` (n_pixels,), then
``predict_proba``. Heavy submodules are imported on first use so that
``import sksegcal`` stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil

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
# every public submodule (a name without a leading underscore), found on disk: none is
# left out of the list, and none is imported before it is used
_SUBMODULES = {
    info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")
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
