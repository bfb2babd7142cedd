"""From a fitted calibrator to its module: one builder per calibrator class.

The calibrators' ``to_torch()`` methods call these; :func:`to_torch` picks the
builder of any fitted calibrator, a scikit-learn ``Pipeline`` or search object
around one included.
"""

from __future__ import annotations

from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._detectors import detector_module
from ._modules import (
    DirichletScalingModule,
    EnsembleTemperatureScalingModule,
    LocalTemperatureScalingModule,
    MetaCalModule,
    SelectiveScalingModule,
    TemperatureScalingModule,
    VectorScalingModule,
)

__all__ = ["to_torch"]


def _common(estimator) -> dict:
    return {"from_probabilities": getattr(estimator, "input_type", "logits") == "probabilities"}


def temperature_scaling_module(est) -> nn.Module:
    return TemperatureScalingModule(est.temperature_, **_common(est))


def vector_scaling_module(est) -> nn.Module:
    return VectorScalingModule(est.coef_, est.intercept_, **_common(est))


def dirichlet_scaling_module(est) -> nn.Module:
    return DirichletScalingModule(est.coef_, est.intercept_, **_common(est))


def ensemble_temperature_scaling_module(est) -> nn.Module:
    return EnsembleTemperatureScalingModule(est.temperature_, est.weights_, **_common(est))


def meta_cal_module(est) -> nn.Module:
    return MetaCalModule(est.temperature_, est.t_reject_, est.entropy_threshold_, **_common(est))


def selective_scaling_module(est) -> nn.Module:
    generalised = {}
    if est.mode == "generalised":
        generalised = {
            "coef": est.temperature_coef_,
            "intercept": est.temperature_intercept_,
            "mean": est.temperature_mean_,
            "scale": est.temperature_scale_,
        }
    return SelectiveScalingModule(
        detector_module(est.classifier_),
        features=est.features,
        t1=est.t1_,
        t2=est.t2_,
        mode=est.mode,
        threshold=est.threshold_,
        context=est.context == "spatial",
        **generalised,
        **_common(est),
    )


def local_temperature_scaling_module(est) -> nn.Module:
    if est.n_context not in (None, 0):
        raise ValueError(
            f"LocalTemperatureScaling(n_context={est.n_context}) reads context columns of "
            "your own, which a module cannot compute from the logits; supported: "
            "n_context=None (the spatial context, computed in torch) and n_context=0."
        )
    return LocalTemperatureScalingModule(
        est.coef_,
        est.intercept_,
        est.feature_mean_,
        est.feature_scale_,
        context=est.n_context is None,
        confidence_features=est.confidence_features,
        max_temperature=est.max_temperature,
    )


_BUILDERS = {
    "TemperatureScaling": temperature_scaling_module,
    "VectorScaling": vector_scaling_module,
    "DirichletScaling": dirichlet_scaling_module,
    "EnsembleTemperatureScaling": ensemble_temperature_scaling_module,
    "MetaCalScaling": meta_cal_module,
    "SelectiveScalingCalibrator": selective_scaling_module,
    "LocalTemperatureScaling": local_temperature_scaling_module,
}


def _unwrap(estimator):
    """The fitted calibrator inside a Pipeline (last step), a search or a FrozenEstimator."""
    for _ in range(8):
        if hasattr(estimator, "best_estimator_"):
            estimator = estimator.best_estimator_
        elif hasattr(estimator, "steps"):
            steps = [s for _, s in estimator.steps if s not in (None, "passthrough")]
            if len(steps) != 1:
                raise TypeError(
                    "a Pipeline converts only when the calibrator is its one step: the module "
                    "takes the logits themselves"
                )
            estimator = steps[0]
        elif type(estimator).__name__ == "FrozenEstimator":
            estimator = estimator.estimator
        else:
            return estimator
    return estimator


def to_torch(calibrator) -> nn.Module:
    """The ``nn.Module`` of a fitted calibrator: (N, C, *spatial) logits to its probabilities.

    Parameters
    ----------
    calibrator : fitted calibrator of this package
        Or a fitted ``Pipeline`` ending in one, or a fitted search object
        whose ``best_estimator_`` is one.

    Returns
    -------
    module : CalibratorModule
        In eval mode, its fitted numbers held as buffers.
    """
    estimator = _unwrap(calibrator)
    for klass in type(estimator).__mro__:
        builder = _BUILDERS.get(klass.__name__)
        if builder is not None:
            check_is_fitted(estimator)
            return builder(estimator).eval()
    raise TypeError(
        f"cannot convert {type(estimator).__name__} to torch; supported: "
        f"{', '.join(sorted(_BUILDERS))}."
    )
